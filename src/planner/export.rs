//! What a plan writes besides its tables: the DAG as Graphviz DOT (and SVG
//! through Graphviz's `dot` where it is installed) and the predicted
//! timeline as Chrome/Perfetto trace JSON ([`crate::trace`]), the format of
//! measured timelines.
//!
//! In the DOT file each rank is a cluster holding its operations in program
//! order; collectives sit between the clusters they join; solid edges carry
//! data, bold edges point-to-point messages (labelled with their bytes).

use super::dag::{Dag, EdgeKind, NodeKind, Phase};
use super::timeline::Timeline;
use crate::trace::{Event, Trace};
use serde_json::json;
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

/// The predicted timeline as a trace; waiting inside messages and
/// collectives shows as `wait` events before them.
pub fn trace(dag: &Dag, tl: &Timeline, roles: &[String]) -> Trace {
    let mut t = Trace::new();
    for (r, role) in roles.iter().enumerate() {
        if !dag.programs.get(r).is_some_and(|p| p.is_empty()) {
            t.name_process(r, &format!("rank {r} {role}"));
        }
    }
    let us = 1e6;
    for s in &tl.spans {
        let n = &dag.nodes[s.node];
        let mut args = std::collections::BTreeMap::new();
        args.insert("phase".to_string(), json!(n.phase.to_string()));
        args.insert("node".to_string(), json!(s.node));
        let (name, cat) = match &n.kind {
            NodeKind::Compute(op) => {
                args.insert("shape".into(), json!(op.dims.to_string()));
                args.insert("flops".into(), json!(op.flops));
                args.insert("bytes".into(), json!(op.bytes_read + op.bytes_written));
                (op.kind.name().to_string(), "compute".to_string())
            }
            NodeKind::Comm(c) => {
                args.insert("bytes".into(), json!(c.bytes));
                args.insert("group".into(), json!(&*c.group));
                args.insert("category".into(), json!(c.category_name()));
                let peers: Vec<usize> = c.sends.iter().chain(&c.recvs).map(|p| p.peer).collect();
                if !peers.is_empty() {
                    args.insert("peer".into(), json!(peers));
                }
                if s.start > s.ready {
                    t.push(Event {
                        name: format!("wait {}", c.kind.name()),
                        cat: "wait".into(),
                        start_us: s.ready * us,
                        dur_us: (s.start - s.ready) * us,
                        pid: s.rank,
                        tid: s.stream,
                        args: args.clone(),
                    });
                }
                (c.kind.name().to_string(), c.category_name().to_string())
            }
        };
        t.push(Event { name, cat, start_us: s.start * us, dur_us: (s.finish - s.start) * us, pid: s.rank, tid: s.stream, args });
    }
    t
}
