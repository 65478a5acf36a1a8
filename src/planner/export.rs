//! What a plan writes besides its tables: the DAG as Graphviz DOT (and SVG
//! through Graphviz's `dot` where it is installed) and the predicted
//! timeline as Chrome/Perfetto trace JSON in the layout of measured
//! timelines (`fapool run --trace`), so the two open side by side.
//!
//! In the DOT file each rank is a cluster holding its operations in program
//! order; collectives sit between the clusters they join; solid edges carry
//! data, bold edges point-to-point messages (labelled with their bytes),
//! dashed edges the compute stream's waits for messages.

use super::dag::{Dag, EdgeKind, NodeKind, Phase};
use super::timeline::Timeline;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Largest DAG rendered to SVG (Graphviz takes minutes beyond it).
pub const SVG_MAX_NODES: usize = 4000;

fn keep(phase: Phase, phases: &[Phase]) -> bool {
    phases.is_empty() || phases.contains(&phase)
}

fn node_label(dag: &Dag, id: usize) -> String {
    let n = &dag.nodes[id];
    match &n.kind {
        NodeKind::Compute(op) => format!("{}\\n{}", op.kind.name(), op.dims),
        NodeKind::Comm(c) => format!("{}\\n{} {} B", c.kind.name(), c.category_name(), c.bytes),
    }
}

/// The DOT text of the nodes of `phases` (all when empty); `roles` name the ranks.
pub fn dot(dag: &Dag, roles: &[String], phases: &[Phase]) -> String {
    let mut s = String::from("digraph deployment {\n  rankdir=TB;\n  newrank=true;\n  node [shape=box, fontsize=9];\n");
    for (r, prog) in dag.programs.iter().enumerate() {
        let ids: Vec<usize> = prog.iter().copied().filter(|&i| dag.nodes[i].ranks.len() == 1 && keep(dag.nodes[i].phase, phases)).collect();
        if ids.is_empty() {
            continue;
        }
        let _ = writeln!(s, "  subgraph cluster_{r} {{\n    label=\"rank {r} {}\";", roles.get(r).map_or("", String::as_str));
        for &i in &ids {
            let style = if dag.nodes[i].comm().is_some() { ", style=filled, fillcolor=lightblue" } else { "" };
            let _ = writeln!(s, "    n{i} [label=\"{}\"{style}];", node_label(dag, i));
        }
        for w in ids.windows(2) {
            let _ = writeln!(s, "    n{} -> n{} [style=dotted, arrowhead=none];", w[0], w[1]);
        }
        s.push_str("  }\n");
    }
    for (i, n) in dag.nodes.iter().enumerate() {
        if n.ranks.len() > 1 && keep(n.phase, phases) {
            let _ = writeln!(s, "  n{i} [label=\"{}\\nranks {:?}\", shape=ellipse, style=filled, fillcolor=lightyellow];", node_label(dag, i), n.ranks);
        }
    }
    for e in &dag.edges {
        if !(keep(dag.nodes[e.from].phase, phases) && keep(dag.nodes[e.to].phase, phases)) {
            continue;
        }
        match e.kind {
            EdgeKind::Data { .. } => {
                let _ = writeln!(s, "  n{} -> n{};", e.from, e.to);
            }
            EdgeKind::Wait { .. } => {
                let _ = writeln!(s, "  n{} -> n{} [style=dashed, color=gray];", e.from, e.to);
            }
            EdgeKind::Message { bytes, .. } => {
                let _ = writeln!(s, "  n{} -> n{} [style=bold, color=blue, label=\"{bytes} B\"];", e.from, e.to);
            }
        }
    }
    s.push_str("}\n");
    s
}

/// Writes `<stem>.dot` to `dir` and, when Graphviz is installed and the DAG
/// small enough, `<stem>.svg`; returns what it wrote and, where no SVG was
/// made, why.
pub fn write_dot(dag: &Dag, roles: &[String], phases: &[Phase], dir: &Path, stem: &str) -> std::io::Result<(Vec<PathBuf>, Option<String>)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{stem}.dot"));
    std::fs::write(&path, dot(dag, roles, phases))?;
    let mut wrote = vec![path.clone()];
    let shown = dag.nodes.iter().filter(|n| keep(n.phase, phases)).count();
    if shown > SVG_MAX_NODES {
        return Ok((wrote, Some(format!("{shown} nodes: no SVG beyond {SVG_MAX_NODES} (render the DOT file with a layout engine of your choice)"))));
    }
    let svg = dir.join(format!("{stem}.svg"));
    match std::process::Command::new("dot").arg("-Tsvg").arg(&path).arg("-o").arg(&svg).status() {
        Ok(s) if s.success() => {
            wrote.push(svg);
            Ok((wrote, None))
        }
        Ok(s) => Ok((wrote, Some(format!("Graphviz `dot` failed ({s})")))),
        Err(_) => Ok((wrote, Some("Graphviz `dot` is not installed (scripts/install-deps.sh installs it)".into()))),
    }
}

/// The predicted timeline as Chrome/Perfetto trace JSON laid out as `run
/// --trace` lays out a measured one (`runner::timeline`): a process per rank
/// named with its role, the compute thread (tid 0) with every operation
/// (shape, FLOPs, bytes) and every wait of the compute stream, a thread per
/// group's messages (tid 1000 + the group's id, its stream) with category,
/// bytes and peers, times in microseconds from the batch's start. Waiting
/// inside a message or collective shows as a `wait` event before it. Ranks
/// whose messages hold the compute stream (a CPU) keep them on tid 0.
pub fn trace(dag: &Dag, tl: &Timeline, roles: &[String], about: Value) -> Value {
    let mut ev: Vec<Value> = Vec::new();
    let mut named: BTreeSet<(usize, u32)> = BTreeSet::new();
    for (r, role) in roles.iter().enumerate() {
        if !dag.programs.get(r).is_some_and(|p| p.is_empty()) {
            ev.push(json!({"name": "process_name", "ph": "M", "pid": r, "args": {"name": format!("rank {r} ({role})")}}));
            ev.push(json!({"name": "thread_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": "compute"}}));
            named.insert((r, 0));
        }
    }
    let us = |t: f64| t * 1e6;
    for s in &tl.spans {
        let n = &dag.nodes[s.node];
        let (pid, tid) = (s.rank, s.stream);
        match &n.kind {
            NodeKind::Compute(op) => {
                let args = json!({"shape": op.dims.to_string(), "flops": op.flops, "bytes": op.bytes_read + op.bytes_written, "phase": n.phase.to_string(), "node": s.node});
                ev.push(json!({"name": op.kind.name(), "cat": "compute", "ph": "X", "pid": pid, "tid": tid, "ts": us(s.start), "dur": us(s.finish - s.start), "args": args}));
            }
            NodeKind::Comm(c) => {
                if named.insert((pid, tid)) {
                    ev.push(json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": format!("messages {}", c.group)}}));
                }
                let peers: Vec<usize> = c.sends.iter().chain(&c.recvs).map(|p| p.peer).collect();
                let category = c.category_name();
                let args = json!({"category": category, "bytes": c.bytes, "peers": peers, "group": &*c.group, "phase": n.phase.to_string(), "node": s.node});
                if s.start > s.ready {
                    ev.push(
                        json!({"name": format!("wait {category}"), "cat": "wait", "ph": "X", "pid": pid, "tid": tid, "ts": us(s.ready), "dur": us(s.start - s.ready), "args": {"category": category}}),
                    );
                }
                ev.push(json!({"name": format!("{} {category}", c.kind.name()), "cat": category, "ph": "X", "pid": pid, "tid": tid, "ts": us(s.start), "dur": us(s.finish - s.start), "args": args}));
            }
        }
    }
    json!({"traceEvents": ev, "displayTimeUnit": "ms", "otherData": about})
}

/// Writes a trace document to `path`.
pub fn write_trace(doc: &Value, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_vec(doc).map_err(std::io::Error::other)?)
}
