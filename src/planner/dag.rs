//! The deployment as a DAG, built from a recording of the strategy's own
//! run: a compute node per operation (op, shapes, FLOPs, bytes, GPU,
//! stream), a communication node per collective (one node, every member's
//! program holds it) and per point-to-point call (one per rank, joined by
//! message edges carrying the bytes), data edges from each buffer's last
//! writer to its readers (one per buffer a reader reads, however often),
//! each rank's program order per stream, and waits of the compute stream
//! for messages on their groups' streams (where `Comm` completes them).
//!
//! Phases come from the runner's markers: operations before its second
//! synchronisation set the batch up, those before the third are the prefill,
//! and each decode step runs from its host half (the messages before its
//! `set_step`) to the end of its device half and sampling. This module
//! only builds; validation, costs and timing live beside it.

use super::execute::Recording;
use crate::backend::shape::{BufRef, Entry, Marker, OpKind, OpRecord};
use crate::comm::sim_transport::{MessageKind, MessageRecord, Part};
use crate::comm::Category;
use crate::strategy::{BatchSetup, BatchShape};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeMap;

pub type NodeId = usize;

/// Which part of the batch a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// `begin_batch`, before the batch's clock starts.
    Setup,
    Prefill,
    /// Decode step `k` (1-based: the step that generates output token `k`).
    Decode(usize),
    Teardown,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Setup => f.write_str("setup"),
            Phase::Prefill => f.write_str("prefill"),
            Phase::Decode(k) => write!(f, "decode{k}"),
            Phase::Teardown => f.write_str("teardown"),
        }
    }
}

/// A collective or one rank's point-to-point call.
#[derive(Clone, Debug, PartialEq)]
pub struct CommNode {
    pub kind: MessageKind,
    pub category: Option<Category>,
    pub group: std::sync::Arc<str>,
    pub group_ranks: std::sync::Arc<[usize]>,
    /// Bytes as `Comm` counts the call on each rank that makes it.
    pub bytes: u64,
    pub sends: Vec<Part>,
    pub recvs: Vec<Part>,
}

impl CommNode {
    /// Point-to-point: its messages are edges (a collective's members share its node).
    fn collective_free(&self) -> bool {
        !self.kind.is_collective()
    }

    pub fn category_name(&self) -> &'static str {
        self.category.map_or("uncategorized", Category::name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    Compute(OpRecord),
    Comm(CommNode),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub phase: Phase,
    /// World ranks whose programs hold the node (a collective's members, or one rank).
    pub ranks: Vec<usize>,
    pub stream: u32,
    /// Buffers read and written, per rank in `ranks` order (moved out of
    /// the operation's record).
    pub inputs: Vec<Vec<BufRef>>,
    pub outputs: Vec<Vec<BufRef>>,
}

impl Node {
    /// A short name: the op or message kind and its category.
    pub fn label(&self) -> String {
        match &self.kind {
            NodeKind::Compute(op) => op.kind.name().to_string(),
            NodeKind::Comm(c) => format!("{} {}", c.kind.name(), c.category_name()),
        }
    }

    pub fn op(&self) -> Option<&OpRecord> {
        match &self.kind {
            NodeKind::Compute(op) => Some(op),
            NodeKind::Comm(_) => None,
        }
    }

    pub fn comm(&self) -> Option<&CommNode> {
        match &self.kind {
            NodeKind::Comm(c) => Some(c),
            NodeKind::Compute(_) => None,
        }
    }

    /// The position of world rank `rank` among the node's ranks (they are
    /// in ascending order: ranks are joined to a collective in rank order).
    pub fn member(&self, rank: usize) -> Option<usize> {
        self.ranks.binary_search(&rank).ok()
    }

    /// A host message (token ids), not device work.
    pub fn is_host_message(&self) -> bool {
        self.comm().is_some_and(|c| c.kind.is_host())
    }
}

/// Why an edge exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeKind {
    /// Buffer `buf` of `rank` written by `from`, read by `to`.
    Data { rank: usize, buf: u64 },
    /// A point-to-point message: the bytes the receive expects and the send carried.
    Message { message: u64, bytes: u64, sent_bytes: u64 },
    /// Rank `rank`'s compute stream waits for the message `from` (its
    /// completion) before running `to`.
    Wait { rank: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub from: NodeId,
    pub to: NodeId,
    pub kind: EdgeKind,
}

/// Per-node lists in compressed rows: node `i`'s items are
/// `items[start[i]..start[i + 1]]` (one allocation for a whole DAG).
#[derive(Clone, Debug, Default)]
pub struct Csr<T> {
    start: Vec<u32>,
    items: Vec<T>,
}

impl<T: Copy + Default> Csr<T> {
    /// Lists of `n` nodes from `(node, item)` pairs, in pair order per node.
    pub fn new(n: usize, pairs: &[(usize, T)]) -> Self {
        let mut start = vec![0u32; n + 1];
        for &(i, _) in pairs {
            start[i + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut items = vec![T::default(); pairs.len()];
        for &(i, t) in pairs {
            items[fill[i] as usize] = t;
            fill[i] += 1;
        }
        Self { start, items }
    }

    pub fn of(&self, i: usize) -> &[T] {
        &self.items[self.start[i] as usize..self.start[i + 1] as usize]
    }
}

/// The DAG of one batch of one strategy.
#[derive(Clone, Debug)]
pub struct Dag {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Each world rank's nodes in issue order.
    pub programs: Vec<Vec<NodeId>>,
    /// Per rank, the node that first wrote each buffer (absent: held before the batch).
    pub creators: Vec<FxHashMap<u64, NodeId>>,
    pub leader: usize,
    pub shape: BatchShape,
    /// The leader's batch setup.
    pub setup: BatchSetup,
    /// Per rank: did it work on the batch.
    pub active: Vec<bool>,
    /// Per rank: peak bytes of its buffers during the batch.
    pub peak_bytes: Vec<u64>,
}

/// Per-rank node phases from the markers of its program.
fn phases_of(entries: &[Entry], messages: &[MessageRecord]) -> Vec<(usize, Phase)> {
    let mut out: Vec<(usize, Phase)> = Vec::new();
    let (mut syncs, mut step, mut steps_seen) = (0usize, 1usize, 0usize);
    let is_host = |e: &Entry| matches!(e, Entry::Message(i) if messages[*i].kind.is_host());
    for (i, e) in entries.iter().enumerate() {
        match e {
            Entry::Marker(Marker::Sync) => syncs += 1,
            Entry::Marker(Marker::SetStep { .. }) if syncs == 3 => {
                steps_seen += 1;
                if steps_seen > 1 {
                    step += 1;
                    // The host half of this step (its token messages) ran before its `set_step`.
                    for (j, ph) in out.iter_mut().rev() {
                        if !is_host(&entries[*j]) || *ph != Phase::Decode(step - 1) {
                            break;
                        }
                        *ph = Phase::Decode(step);
                    }
                }
            }
            Entry::Marker(Marker::SetStep { .. }) => {}
            Entry::Op(_) | Entry::Message(_) | Entry::Marker(Marker::WaitFor(_)) => {
                let phase = match syncs {
                    0 | 1 => Phase::Setup,
                    2 => Phase::Prefill,
                    3 => Phase::Decode(step),
                    _ => Phase::Teardown,
                };
                out.push((i, phase));
            }
        }
    }
    out
}

/// Whether `inputs[k]`'s buffer is among `inputs[..k]`: a call may read
/// one buffer several times (an exchange sends its parts of one buffer to
/// every peer), which is one data edge, not one per read. `seen` holds the
/// ids of a call with many reads (cleared at its first).
fn read_before(inputs: &[BufRef], k: usize, seen: &mut FxHashSet<u64>) -> bool {
    const SCAN: usize = 8;
    if inputs.len() <= SCAN {
        return inputs[..k].iter().any(|b| b.id == inputs[k].id);
    }
    if k == 0 {
        seen.clear();
    }
    !seen.insert(inputs[k].id)
}

impl Dag {
    /// Builds the DAG of a recorded batch (taking its records apart).
    pub fn build(rec: Recording) -> Dag {
        let n = rec.programs.len();
        let setup = rec.setup().clone();
        // Room for every entry at once: a plan of 1024 ranks holds 180 k nodes.
        let entries: usize = rec.programs.iter().map(|p| p.entries.len()).sum();
        let mut dag = Dag {
            nodes: Vec::with_capacity(entries),
            edges: Vec::with_capacity(2 * entries),
            programs: rec.programs.iter().map(|p| Vec::with_capacity(p.entries.len())).collect(),
            creators: vec![FxHashMap::default(); n],
            leader: rec.leader,
            shape: rec.shape,
            setup,
            active: rec.programs.iter().map(|p| p.setup.active).collect(),
            peak_bytes: rec.programs.iter().map(|p| p.peak_bytes).collect(),
        };
        let mut collectives: FxHashMap<u64, NodeId> = FxHashMap::default();
        let mut senders: FxHashMap<u64, NodeId> = FxHashMap::default();
        let mut pending_recvs: Vec<(NodeId, u64, u64, u64)> = Vec::new();
        let mut distinct: FxHashSet<u64> = FxHashSet::default();
        for p in rec.programs {
            let r = p.rank;
            let phases = phases_of(&p.entries, &p.messages);
            let mut messages: Vec<Option<MessageRecord>> = p.messages.into_iter().map(Some).collect();
            let mut entries: Vec<Option<Entry>> = p.entries.into_iter().map(Some).collect();
            let mut last_writer: FxHashMap<u64, NodeId> = FxHashMap::with_capacity_and_hasher(entries.len(), Default::default());
            dag.creators[r].reserve(entries.len());
            // The rank's message records by index, and the messages its compute stream waits for next.
            let mut message_node: Vec<Option<NodeId>> = vec![None; messages.len()];
            let mut waits: Vec<NodeId> = Vec::new();
            for (i, phase) in phases {
                let (id, inputs, outputs) = match entries[i].take() {
                    Some(Entry::Marker(Marker::WaitFor(m))) => {
                        waits.extend(message_node.get(m).copied().flatten());
                        continue;
                    }
                    Some(Entry::Op(mut op)) => {
                        let (inputs, outputs) = (std::mem::take(&mut op.inputs), std::mem::take(&mut op.outputs));
                        let id = dag.nodes.len();
                        let stream = op.stream;
                        dag.nodes.push(Node { kind: NodeKind::Compute(op), phase, ranks: vec![r], stream, inputs: Vec::with_capacity(1), outputs: Vec::with_capacity(1) });
                        (id, inputs, outputs)
                    }
                    Some(Entry::Message(index)) => {
                        let mut m = messages[index].take().expect("each message once");
                        let (inputs, outputs) = (std::mem::take(&mut m.inputs), std::mem::take(&mut m.outputs));
                        let id = match m.collective.and_then(|c| collectives.get(&c).copied()) {
                            Some(id) => {
                                dag.nodes[id].ranks.push(r);
                                id
                            }
                            None => {
                                let id = dag.nodes.len();
                                if let Some(c) = m.collective {
                                    collectives.insert(c, id);
                                }
                                let c = CommNode { kind: m.kind, category: m.category, group: m.group, group_ranks: m.group_ranks, bytes: m.bytes, sends: m.sends, recvs: m.recvs };
                                // One member's reads and writes (a collective's grow as members join).
                                dag.nodes.push(Node { kind: NodeKind::Comm(c), phase, ranks: vec![r], stream: m.stream, inputs: Vec::with_capacity(1), outputs: Vec::with_capacity(1) });
                                id
                            }
                        };
                        message_node[index] = Some(id);
                        if let NodeKind::Comm(c) = &dag.nodes[id].kind {
                            if c.collective_free() {
                                for s in &c.sends {
                                    senders.insert(s.message, id);
                                }
                                pending_recvs.extend(c.recvs.iter().map(|p| (id, p.message, p.bytes, p.sent_bytes)));
                            }
                        }
                        (id, inputs, outputs)
                    }
                    _ => continue,
                };
                dag.programs[r].push(id);
                if dag.nodes[id].stream == 0 {
                    for w in waits.drain(..) {
                        dag.edges.push(Edge { from: w, to: id, kind: EdgeKind::Wait { rank: r } });
                    }
                }
                for (k, b) in inputs.iter().enumerate() {
                    if read_before(&inputs, k, &mut distinct) {
                        continue;
                    }
                    if let Some(&w) = last_writer.get(&b.id).filter(|&&w| w != id) {
                        dag.edges.push(Edge { from: w, to: id, kind: EdgeKind::Data { rank: r, buf: b.id } });
                    }
                }
                for b in &outputs {
                    last_writer.insert(b.id, id);
                    dag.creators[r].entry(b.id).or_insert(id);
                }
                dag.nodes[id].inputs.push(inputs);
                dag.nodes[id].outputs.push(outputs);
            }
        }
        for (to, message, bytes, sent_bytes) in pending_recvs {
            if let Some(&from) = senders.get(&message) {
                dag.edges.push(Edge { from, to, kind: EdgeKind::Message { message, bytes, sent_bytes } });
            }
        }
        dag
    }

    /// Calls and bytes of each rank's messages by category, as `Comm` counts them.
    pub fn comm_by_rank(&self) -> Vec<BTreeMap<Category, (u64, u64)>> {
        self.programs
            .iter()
            .map(|prog| {
                let mut m: BTreeMap<Category, (u64, u64)> = BTreeMap::new();
                for &id in prog {
                    if let Some(c) = self.nodes[id].comm() {
                        let e = m.entry(c.category.unwrap_or(Category::Control)).or_default();
                        e.0 += 1;
                        e.1 += c.bytes;
                    }
                }
                m
            })
            .collect()
    }

    /// Nodes of `phase`.
    pub fn nodes_in(&self, phase: Phase) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.nodes.len()).filter(move |&i| self.nodes[i].phase == phase)
    }

    /// Decode steps recorded.
    pub fn decode_steps(&self) -> usize {
        self.nodes.iter().filter_map(|n| if let Phase::Decode(k) = n.phase { Some(k) } else { None }).max().unwrap_or(0)
    }

    /// The leader's sampling operations (its argmax nodes) in `phase`.
    pub fn sampled(&self, phase: Phase) -> Vec<NodeId> {
        self.programs[self.leader].iter().copied().filter(|&i| self.nodes[i].phase == phase && self.nodes[i].op().is_some_and(|o| o.kind == OpKind::Argmax)).collect()
    }

    /// Indices of the data and message edges into each node.
    pub fn preds(&self) -> Csr<usize> {
        let pairs: Vec<(usize, usize)> = self.edges.iter().enumerate().map(|(i, e)| (e.to, i)).collect();
        Csr::new(self.nodes.len(), &pairs)
    }

    /// Compute and communication nodes.
    pub fn counts(&self) -> (usize, usize) {
        let comm = self.nodes.iter().filter(|n| n.comm().is_some()).count();
        (self.nodes.len() - comm, comm)
    }
}
