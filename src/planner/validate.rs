//! Validation of a deployment DAG. Each rule has a name; a failure names the
//! rule and the node (or GPU) that breaks it:
//!
//! - `dag-acyclic`: data, message and program-order edges form no cycle (a
//!   cycle is a deadlock on real ranks);
//! - `message-bytes-match`: every receive has its send, and expects the bytes
//!   the send carries;
//! - `edge-shapes-match`: a buffer read has the length its writer gave it, and
//!   a GEMM's `k` equals its input's width where the writer knew the width;
//! - `reaches-output`: every node's result reaches the leader's sampled
//!   tokens, the residual stream of any row (every position's hidden state
//!   is the model's output there) or the state the phase leaves behind (KV
//!   caches, buffers created earlier), over data and message edges; nodes
//!   that move and compute nothing are exempt. The same operation at the same
//!   place of another rank's program whose copy reaches is replicated work
//!   (the residual stream every TP rank keeps) and counts; token messages (host memory)
//!   reach the next step's embedding through the step scalars and count too;
//! - `residual-per-sub-layer`: the residual stream the leader samples from
//!   carries two residual additions per layer (attention and FFN);
//! - `memory-within-capacity`: the memory model's busiest rank and every
//!   rank's simulated allocation peak fit the GPU.

use super::dag::{Csr, Dag, EdgeKind, NodeId, NodeKind, Phase};
use crate::backend::shape::{OpDims, OpKind};
use crate::comm::sim_transport::MessageKind;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, VecDeque};

/// A broken DAG rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rule `{rule}` broken at {at}: {detail}")]
pub struct DagViolation {
    pub rule: &'static str,
    /// The node or GPU, in words.
    pub at: String,
    pub node: Option<NodeId>,
    pub detail: String,
}

/// What memory the deployment may use.
#[derive(Clone, Copy, Debug)]
pub struct MemoryLimit {
    /// Bytes of one GPU.
    pub capacity: u64,
    /// `Deployment::memory_bytes` of the batch as run (its busiest rank).
    pub model_estimate: u64,
}

/// "node 12 (rank 3, prefill, matmul m=.. k=.. n=..)".
pub fn describe(dag: &Dag, id: NodeId) -> String {
    let n = &dag.nodes[id];
    let ranks = if n.ranks.len() == 1 { format!("rank {}", n.ranks[0]) } else { format!("ranks {:?}", n.ranks) };
    let what = match &n.kind {
        NodeKind::Compute(op) => format!("{} {}", op.kind.name(), op.dims),
        NodeKind::Comm(c) => format!("{} {} on `{}`, {} bytes", c.kind.name(), c.category_name(), c.group, c.bytes),
    };
    format!("node {id} ({ranks}, {}, {what})", n.phase)
}

fn broken(dag: &Dag, rule: &'static str, id: NodeId, detail: String) -> DagViolation {
    DagViolation { rule, at: describe(dag, id), node: Some(id), detail }
}

/// Every edge the schedule obeys, over the DAG's nodes and one departure
/// per sending call (ids from `dag.nodes.len()` on): data, waits, each
/// rank's program order per stream, and messages. A message leaves when its
/// sender reaches its call, not when the call completes (the call's own
/// receives may still be due: an exchange or all-to-all sends and receives
/// together), so a message runs from the call's departure, which follows
/// what the call waits for, to the receiver. One departure per call keeps
/// the edges linear in the DAG: a call sending to P peers waits for its
/// predecessors once, not once per message.
pub struct ScheduleEdges {
    /// DAG nodes and departures.
    pub nodes: usize,
    pub edges: Vec<(NodeId, NodeId)>,
}

pub fn all_edges(dag: &Dag) -> ScheduleEdges {
    let n = dag.nodes.len();
    let mut e: Vec<(NodeId, NodeId)> = Vec::with_capacity(dag.edges.len() + n);
    for prog in &dag.programs {
        let mut last: BTreeMap<u32, NodeId> = BTreeMap::new();
        for &id in prog {
            if let Some(prev) = last.insert(dag.nodes[id].stream, id) {
                if prev != id {
                    e.push((prev, id));
                }
            }
        }
    }
    e.extend(dag.edges.iter().filter(|x| !matches!(x.kind, EdgeKind::Message { .. })).map(|x| (x.from, x.to)));
    let messages = || dag.edges.iter().filter(|x| matches!(x.kind, EdgeKind::Message { .. }));
    let mut departure: Vec<Option<NodeId>> = vec![None; n];
    let mut nodes = n;
    for x in messages() {
        departure[x.from].get_or_insert_with(|| {
            nodes += 1;
            nodes - 1
        });
    }
    // What a sending call waits for, its departure waits for too.
    for i in 0..e.len() {
        let (a, b) = e[i];
        if let Some(d) = departure[b] {
            e.push((a, d));
        }
    }
    e.extend(messages().map(|x| (departure[x.from].expect("a departure per sender"), x.to)));
    ScheduleEdges { nodes, edges: e }
}

/// A topological order of every node, or a node on a cycle (or after one).
pub fn topological_order(dag: &Dag) -> Result<Vec<NodeId>, NodeId> {
    let real = dag.nodes.len();
    let ScheduleEdges { nodes: n, edges } = all_edges(dag);
    let mut indeg = vec![0usize; n];
    for &(_, b) in &edges {
        indeg[b] += 1;
    }
    let succ = Csr::new(n, &edges);
    let mut queue: VecDeque<NodeId> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(real);
    while let Some(v) = queue.pop_front() {
        if v < real {
            order.push(v);
        }
        for &w in succ.of(v) {
            indeg[w] -= 1;
            if indeg[w] == 0 {
                queue.push_back(w);
            }
        }
    }
    if order.len() < real {
        // A departure left over leaves its receivers over too: a DAG node names the cycle.
        return Err((0..real).find(|&i| indeg[i] > 0).expect("a node left"));
    }
    Ok(order)
}

fn check_messages(dag: &Dag) -> Result<(), DagViolation> {
    let mut matched: FxHashSet<u64> = FxHashSet::default();
    for e in &dag.edges {
        if let EdgeKind::Message { message, bytes, sent_bytes } = e.kind {
            matched.insert(message);
            if bytes != sent_bytes {
                let from = describe(dag, e.from);
                return Err(broken(dag, "message-bytes-match", e.to, format!("the receive expects {bytes} bytes, its send ({from}) carries {sent_bytes}")));
            }
        }
    }
    for (id, n) in dag.nodes.iter().enumerate() {
        if let Some(c) = n.comm() {
            if let Some(p) = c.recvs.iter().find(|p| !matched.contains(&p.message)) {
                return Err(broken(dag, "message-bytes-match", id, format!("the receive from rank {} has no send", p.peer)));
            }
        }
    }
    Ok(())
}

fn check_shapes(dag: &Dag) -> Result<(), DagViolation> {
    for e in &dag.edges {
        let EdgeKind::Data { rank, buf } = e.kind else { continue };
        let len_at = |id: NodeId, outputs: bool| {
            let n = &dag.nodes[id];
            let k = n.member(rank)?;
            let side = if outputs { &n.outputs[k] } else { &n.inputs[k] };
            side.iter().find(|b| b.id == buf).map(|b| b.len)
        };
        if let (Some(w), Some(r)) = (len_at(e.from, true), len_at(e.to, false)) {
            if w != r {
                return Err(broken(dag, "edge-shapes-match", e.to, format!("reads buffer {buf} of rank {rank} as {r} elements; {} wrote {w}", describe(dag, e.from))));
            }
        }
    }
    for (id, n) in dag.nodes.iter().enumerate() {
        if let NodeKind::Compute(op) = &n.kind {
            if let (OpKind::Matmul, OpDims::Gemm { k, .. }) = (op.kind, op.dims) {
                if let Some(cols) = n.inputs[0].first().and_then(|b| b.cols) {
                    if cols != k {
                        return Err(broken(dag, "edge-shapes-match", id, format!("the GEMM's k is {k} but its input rows are {cols} wide")));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The nodes whose results are outputs: sampled tokens, token messages
/// and state the phase leaves behind.
fn outputs(dag: &Dag) -> Vec<NodeId> {
    let n = dag.nodes.len();
    let retained = |id: NodeId| {
        let node = &dag.nodes[id];
        node.ranks.iter().zip(&node.outputs).any(|(&r, outs)| outs.iter().any(|b| dag.creators[r].get(&b.id).is_none_or(|&c| dag.nodes[c].phase < node.phase)))
    };
    // Token messages reach the next step's embedding through the step
    // scalars, which are not buffers: they count as reaching, as does
    // sampling anywhere.
    // Any rank's sampling counts: data-parallel replicas sample their own
    // sequences and pass the tokens on in host memory.
    let sampled = |i: NodeId| dag.nodes[i].op().is_some_and(|o| o.kind == OpKind::Argmax);
    (0..n).filter(|&i| sampled(i) || dag.nodes[i].is_host_message() || retained(i)).collect()
}

/// Marks live the nodes whose results reach one of `roots` (and the roots),
/// over data and message edges.
fn spread_live(dag: &Dag, preds: &Csr<usize>, live: &mut [bool], mut stack: Vec<NodeId>) {
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut live[v], true) {
            continue;
        }
        stack.extend(preds.of(v).iter().map(|&e| dag.edges[e].from).filter(|&p| !live[p]));
    }
}

/// A key that is the same for the same operation at the same place of two
/// ranks' programs: phase, kind, work, and its occurrence on the rank.
type TwinKey = (Phase, OpKind, u64, u64, u64, usize);

/// Twin keys of the compute nodes whose (phase, kind) is in `wanted`.
fn twin_keys(dag: &Dag, wanted: &FxHashSet<(Phase, OpKind)>) -> FxHashMap<NodeId, TwinKey> {
    let mut keys = FxHashMap::default();
    for prog in &dag.programs {
        let mut seen: FxHashMap<(Phase, OpKind, u64, u64, u64), usize> = FxHashMap::default();
        for &id in prog {
            let n = &dag.nodes[id];
            if let NodeKind::Compute(op) = &n.kind {
                if !wanted.contains(&(n.phase, op.kind)) {
                    continue;
                }
                let base = (n.phase, op.kind, op.flops.to_bits(), op.bytes_read, op.bytes_written);
                let k = seen.entry(base).or_default();
                keys.insert(id, (base.0, base.1, base.2, base.3, base.4, *k));
                *k += 1;
            }
        }
    }
    keys
}

/// The residual additions into the stream: every row's hidden state is
/// the model's output at its position, sampled or not (a prompt's rows
/// before its last one, computed in a buffer of their own when a prompt is
/// cut into chunks, are as much the prefill's result as its last row).
fn stream_additions(dag: &Dag, lineage: &mut Lineage<'_>) -> Vec<NodeId> {
    let mut out = Vec::new();
    for (id, n) in dag.nodes.iter().enumerate() {
        if n.op().is_some_and(|o| o.kind == OpKind::Add) {
            if let Some(target) = n.outputs.first().and_then(|o| o.first()) {
                if lineage.is_stream((id, n.ranks[0], target.id)) {
                    out.push(id);
                }
            }
        }
    }
    out
}

fn check_reaches_output(dag: &Dag, preds: &Csr<usize>, lineage: &mut Lineage<'_>) -> Result<(), DagViolation> {
    let mut live = vec![false; dag.nodes.len()];
    spread_live(dag, preds, &mut live, outputs(dag));
    if live.iter().any(|l| !l) {
        // What reaches the residual stream is live too (what reaches the
        // outputs already is).
        spread_live(dag, preds, &mut live, stream_additions(dag, lineage));
    }
    // A node that moves and computes nothing (an empty copy of a rank
    // without rows, a buffer allocated for a receive) wastes nothing.
    let idle = |i: NodeId| match &dag.nodes[i].kind {
        NodeKind::Compute(op) => op.flops == 0.0 && op.bytes_read + op.bytes_written == 0,
        NodeKind::Comm(c) => c.bytes == 0,
    };
    let dead: Vec<NodeId> = (0..dag.nodes.len()).filter(|&i| !live[i] && !idle(i) && !matches!(dag.nodes[i].phase, Phase::Setup | Phase::Teardown)).collect();
    if dead.is_empty() {
        return Ok(());
    }
    // Replicated work: the same operation at the same place of another
    // rank's program is live there (TP ranks keep the residual stream).
    let wanted: FxHashSet<(Phase, OpKind)> = dead.iter().filter_map(|&i| dag.nodes[i].op().map(|o| (dag.nodes[i].phase, o.kind))).collect();
    let keys = twin_keys(dag, &wanted);
    let live_keys: FxHashSet<TwinKey> = keys.iter().filter(|(id, _)| live[**id]).map(|(_, k)| *k).collect();
    for id in dead {
        if !keys.get(&id).is_some_and(|k| live_keys.contains(k)) {
            return Err(broken(dag, "reaches-output", id, "its result reaches neither the leader's sampled tokens nor state the phase leaves behind, and no other rank's copy of it does".into()));
        }
    }
    Ok(())
}

/// A buffer version: the node that wrote it, the rank, the buffer.
type Version = (NodeId, usize, u64);

/// The residual stream, found backwards from where it is sampled: versions
/// written by the embedding, by a residual addition into the stream, or
/// copied, sent or gathered from the stream.
struct Lineage<'a> {
    dag: &'a Dag,
    preds: &'a Csr<usize>,
    /// Message id -> the version its send read.
    sent: FxHashMap<u64, Version>,
    memo: FxHashMap<Version, bool>,
}

impl<'a> Lineage<'a> {
    fn new(dag: &'a Dag, preds: &'a Csr<usize>) -> Self {
        let mut l = Self { dag, preds, sent: FxHashMap::default(), memo: FxHashMap::default() };
        for (id, n) in dag.nodes.iter().enumerate() {
            if let Some(c) = n.comm().filter(|c| matches!(c.kind, MessageKind::Exchange | MessageKind::AllToAll)) {
                for (j, p) in c.sends.iter().enumerate() {
                    if let Some(v) = n.inputs[0].get(j).and_then(|b| l.version(id, n.ranks[0], b.id)) {
                        l.sent.insert(p.message, v);
                    }
                }
            }
        }
        l
    }

    /// The version of `buf` on `rank` that node `id` reads.
    fn version(&self, id: NodeId, rank: usize, buf: u64) -> Option<Version> {
        self.preds.of(id).iter().map(|&e| &self.dag.edges[e]).find_map(|e| match e.kind {
            EdgeKind::Data { rank: r, buf: b } if r == rank && b == buf => Some((e.from, r, b)),
            _ => None,
        })
    }

    /// What version `v` is made from, if it can be the stream (`Some(vec![])`: the embedding).
    fn candidates(&self, v: Version) -> Option<Vec<Version>> {
        let n = &self.dag.nodes[v.0];
        let k = n.member(v.1)?;
        let ins = |k: usize| n.inputs[k].iter().filter_map(|b| self.version(v.0, n.ranks[k], b.id)).collect::<Vec<_>>();
        match &n.kind {
            NodeKind::Compute(op) => match op.kind {
                OpKind::Embed => Some(vec![]),
                OpKind::Add => n.inputs[k].first().and_then(|b| self.version(v.0, v.1, b.id)).map(|t| vec![t]),
                OpKind::GatherRows | OpKind::ScatterRows | OpKind::CopyRows => Some(ins(k)),
                _ => None,
            },
            NodeKind::Comm(c) if matches!(c.kind, MessageKind::Exchange | MessageKind::AllToAll) => Some(c.recvs.iter().filter_map(|p| self.sent.get(&p.message).copied()).collect()),
            // A collective's result carries the stream any member brought.
            NodeKind::Comm(_) => Some((0..n.ranks.len()).flat_map(ins).collect()),
        }
    }

    fn is_stream(&mut self, v: Version) -> bool {
        let mut stack = vec![(v, false)];
        while let Some((x, expanded)) = stack.pop() {
            if self.memo.contains_key(&x) {
                continue;
            }
            match self.candidates(x) {
                None => {
                    self.memo.insert(x, false);
                }
                Some(c) if c.is_empty() => {
                    let embed = self.dag.nodes[x.0].op().is_some_and(|o| o.kind == OpKind::Embed);
                    self.memo.insert(x, embed);
                }
                Some(c) if expanded => {
                    let any = c.iter().any(|y| self.memo.get(y) == Some(&true));
                    self.memo.insert(x, any);
                }
                Some(c) => {
                    stack.push((x, true));
                    stack.extend(c.into_iter().filter(|y| !self.memo.contains_key(y)).map(|y| (y, false)));
                }
            }
        }
        self.memo[&v]
    }

    /// The residual additions every element of stream version `top` went
    /// through since its embedding. A copy, gather or message takes its
    /// sources' count, which must agree (rows of different depths mixed in
    /// one buffer are an error, returned as the two counts); an addition
    /// into the stream adds one. Counting per element, not per buffer, keeps
    /// a rank that embeds a micro-batch and keeps part of its rows (a
    /// sequence-parallel base) right.
    fn depth(&mut self, top: Version) -> Result<u64, (u64, u64)> {
        let mut depth: FxHashMap<Version, u64> = FxHashMap::default();
        let mut stack = vec![(top, false)];
        while let Some((v, expanded)) = stack.pop() {
            if depth.contains_key(&v) {
                continue;
            }
            let kind = self.dag.nodes[v.0].op().map(|o| o.kind);
            if kind == Some(OpKind::Embed) {
                depth.insert(v, 0);
                continue;
            }
            let sources: Vec<Version> = self.candidates(v).unwrap_or_default().into_iter().filter(|&s| self.is_stream(s)).collect();
            if !expanded {
                stack.push((v, true));
                stack.extend(sources.into_iter().filter(|s| !depth.contains_key(s)).map(|s| (s, false)));
                continue;
            }
            let mut seen = sources.iter().filter_map(|s| depth.get(s).copied());
            let first = seen.next().unwrap_or(0);
            if let Some(other) = seen.find(|&d| d != first) {
                return Err((first, other));
            }
            depth.insert(v, first + u64::from(kind == Some(OpKind::Add)));
        }
        Ok(depth[&top])
    }
}

fn check_residuals(dag: &Dag, preds: &Csr<usize>, st: &mut Lineage<'_>, layers: usize) -> Result<(), DagViolation> {
    let phases: Vec<Phase> = std::iter::once(Phase::Prefill).chain((1..=dag.decode_steps()).map(Phase::Decode)).collect();
    for phase in phases {
        for id in dag.sampled(phase) {
            // The nearest residual-stream version the sampled logits come from.
            let mut queue: VecDeque<NodeId> = VecDeque::from([id]);
            let mut seen = FxHashSet::from_iter([id]);
            let mut found = None;
            'search: while let Some(v) = queue.pop_front() {
                for &e in preds.of(v) {
                    let e = &dag.edges[e];
                    if let EdgeKind::Data { rank, buf } = e.kind {
                        if st.is_stream((e.from, rank, buf)) {
                            found = Some((e.from, rank, buf));
                            break 'search;
                        }
                        if seen.insert(e.from) {
                            queue.push_back(e.from);
                        }
                    }
                }
            }
            let Some(top) = found else {
                return Err(broken(dag, "residual-per-sub-layer", id, "the tokens come from no residual stream (no embedding reaches them)".into()));
            };
            let need = 2 * layers as u64;
            match st.depth(top) {
                Ok(d) if d == need => {}
                Ok(d) => {
                    return Err(broken(
                        dag,
                        "residual-per-sub-layer",
                        id,
                        format!("the residual stream it samples from went through {d} residual additions per element; {layers} layers need {need} (attention and FFN each)"),
                    ))
                }
                Err((a, b)) => return Err(broken(dag, "residual-per-sub-layer", id, format!("the residual stream it samples from mixes rows of {a} and {b} residual additions"))),
            }
        }
    }
    Ok(())
}

fn check_memory(dag: &Dag, limit: &MemoryLimit) -> Result<(), DagViolation> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let detail = |what: &str, b: u64| format!("{what} {:.2} GiB, the GPU holds {:.2} GiB", gib(b), gib(limit.capacity));
    if limit.model_estimate > limit.capacity {
        return Err(DagViolation { rule: "memory-within-capacity", at: "the busiest rank (memory model)".into(), node: None, detail: detail("the memory model needs", limit.model_estimate) });
    }
    if let Some((r, &b)) = dag.peak_bytes.iter().enumerate().find(|(_, &b)| b > limit.capacity) {
        return Err(DagViolation { rule: "memory-within-capacity", at: format!("GPU {r}"), node: None, detail: detail("its buffers peak at", b) });
    }
    Ok(())
}

/// Checks every rule on `dag` of a model of `layers` layers; returns a topological order.
pub fn validate(dag: &Dag, layers: usize, memory: Option<&MemoryLimit>) -> Result<Vec<NodeId>, DagViolation> {
    let order = topological_order(dag).map_err(|id| broken(dag, "dag-acyclic", id, "lies on a cycle of data, message and program-order edges (a deadlock on real ranks)".into()))?;
    check_messages(dag)?;
    check_shapes(dag)?;
    let preds = dag.preds();
    // One lineage of the residual stream for both rules (it remembers what it found).
    let mut lineage = Lineage::new(dag, &preds);
    check_reaches_output(dag, &preds, &mut lineage)?;
    check_residuals(dag, &preds, &mut lineage, layers)?;
    if let Some(m) = memory {
        check_memory(dag, m)?;
    }
    Ok(order)
}
