//! The predicted timeline: a discrete simulation of every GPU's streams.
//! Each stream runs its nodes in program order; a node starts when its
//! stream is free and its data has arrived; a collective starts when its
//! last member reaches it and occupies every member for its algorithm's
//! time; a point-to-point message moves when both its sender and receiver
//! have reached their calls, one message at a time on each rank's outgoing
//! and incoming port. Overlap on separate streams, pipeline bubbles and
//! waiting come out of the simulation, not a formula. Each node remembers
//! what it waited for last, which gives the critical path.
//!
//! Events are handled in time order (a heap of stream-ready times), so ports
//! go to messages in the order their endpoints become ready. This module
//! times a DAG; it does not decide what the times mean (see `report`).

use super::cost::CostModel;
use super::dag::{Csr, Dag, EdgeKind, NodeId, NodeKind, Phase};
use rustc_hash::FxHashMap;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One node on one rank's stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    pub node: NodeId,
    pub rank: usize,
    pub stream: u32,
    /// The stream reached the node and its data was there.
    pub ready: f64,
    /// Work (or the transfer) began.
    pub start: f64,
    pub finish: f64,
}

/// One point-to-point message in flight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transfer {
    pub from: NodeId,
    pub to: NodeId,
    pub src: usize,
    pub dst: usize,
    pub bytes: u64,
    pub start: f64,
    pub end: f64,
}

/// A simulated batch.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub spans: Vec<Span>,
    pub transfers: Vec<Transfer>,
    /// Per node: when it finished on its last member.
    pub finish: Vec<f64>,
    /// Per node: what it waited for last (none: it waited for nothing).
    pub binding: Vec<Option<NodeId>>,
    /// Per node: seconds of work (collectives: the algorithm's time).
    pub duration: Vec<f64>,
    /// Per rank: seconds its host spent recording the first decode step
    /// (part of the host turn before it; see `CostModel::step_gap`).
    pub recording: Vec<f64>,
    /// Per node: the host's turn its rank took before it (the first node of
    /// a decode step on a compute stream; else 0).
    pub host_turn: Vec<f64>,
}

/// A lane's next event: (time, lane).
#[derive(Clone, Copy, PartialEq)]
struct Due(f64, usize);

impl Eq for Due {}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0).then_with(|| o.1.cmp(&self.1))
    }
}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// When a node's stream and data were there, and what it waited for last.
type Ready = (f64, Option<NodeId>);

/// One stream of one rank: its nodes in program order.
struct Lane {
    rank: usize,
    stream: u32,
    /// Each node and the rank's slot there (its member index found once,
    /// not at every visit).
    nodes: Vec<(NodeId, usize)>,
    cursor: usize,
    free_at: Ready,
}

struct Sim<'a> {
    dag: &'a Dag,
    cost: &'a CostModel,
    lanes: Vec<Lane>,
    lane_of: FxHashMap<(usize, u32), usize>,
    /// Per slot (node and member): ready time and what it waited for.
    ready: Vec<Option<Ready>>,
    /// Per node: members whose stream has reached it.
    arrived: Vec<u32>,
    armed: Vec<bool>,
    done: Vec<bool>,
    /// Per node and member (slot `slot[node] + member`): the producers of its data.
    slot: Vec<usize>,
    data_preds: Csr<NodeId>,
    waiters: FxHashMap<NodeId, Vec<usize>>,
    /// By message id: (sender node, receiver node, bytes), and when it moved.
    messages: Vec<Option<(NodeId, NodeId, u64)>>,
    parts: Vec<Vec<u64>>,
    /// Per node: its messages not moved yet (a call to P peers finishes
    /// when the count reaches 0, not by looking at all P each time one moves).
    unmoved: Vec<u32>,
    moved: Vec<Option<(f64, f64)>>,
    /// When each rank's outgoing and incoming port is free.
    out_port: Vec<f64>,
    in_port: Vec<f64>,
    /// Per rank: device operations of its first decode step (what recording it covers).
    first_step_ops: Vec<usize>,
    heap: BinaryHeap<Due>,
    tl: Timeline,
}

impl<'a> Sim<'a> {
    fn new(dag: &'a Dag, cost: &'a CostModel) -> Self {
        let n = dag.nodes.len();
        let mut lanes: Vec<Lane> = Vec::new();
        let mut lane_of: FxHashMap<(usize, u32), usize> = FxHashMap::default();
        let mut slot = Vec::with_capacity(n + 1);
        let mut at = 0;
        for node in &dag.nodes {
            slot.push(at);
            at += node.ranks.len();
        }
        for (r, prog) in dag.programs.iter().enumerate() {
            for &id in prog {
                let stream = dag.nodes[id].stream;
                let l = *lane_of.entry((r, stream)).or_insert_with(|| {
                    lanes.push(Lane { rank: r, stream, nodes: Vec::new(), cursor: 0, free_at: (0.0, None) });
                    lanes.len() - 1
                });
                let k = dag.nodes[id].member(r).expect("a program's node has its rank");
                lanes[l].nodes.push((id, slot[id] + k));
            }
        }
        let mut pairs: Vec<(usize, NodeId)> = Vec::with_capacity(dag.edges.len());
        let ids = dag.edges.iter().filter_map(|e| if let EdgeKind::Message { message, .. } = e.kind { Some(message as usize + 1) } else { None }).max().unwrap_or(0);
        let mut messages = vec![None; ids];
        let mut parts = vec![Vec::new(); n];
        for e in &dag.edges {
            match e.kind {
                EdgeKind::Data { rank, .. } | EdgeKind::Wait { rank } => {
                    if let Some(k) = dag.nodes[e.to].member(rank) {
                        pairs.push((slot[e.to] + k, e.from));
                    }
                }
                EdgeKind::Message { message, bytes, .. } => {
                    messages[message as usize] = Some((e.from, e.to, bytes));
                    parts[e.from].push(message);
                    parts[e.to].push(message);
                }
            }
        }
        let data_preds = Csr::new(at, &pairs);
        let ready = vec![None; at];
        let ranks = dag.programs.len();
        let first_step_ops = dag
            .programs
            .iter()
            .map(|prog| {
                prog.iter()
                    .filter(|&&id| {
                        let n = &dag.nodes[id];
                        n.phase == Phase::Decode(1) && !n.is_host_message() && !matches!(&n.kind, NodeKind::Compute(op) if op.kind == crate::backend::shape::OpKind::Alloc)
                    })
                    .count()
            })
            .collect();
        let tl = Timeline {
            spans: Vec::with_capacity(at),
            finish: vec![0.0; n],
            binding: vec![None; n],
            duration: vec![0.0; n],
            recording: vec![0.0; ranks],
            host_turn: vec![0.0; n],
            ..Default::default()
        };
        Self {
            dag,
            cost,
            lanes,
            lane_of,
            ready,
            arrived: vec![0; n],
            armed: vec![false; n],
            done: vec![false; n],
            slot,
            data_preds,
            waiters: FxHashMap::default(),
            moved: vec![None; messages.len()],
            messages,
            unmoved: parts.iter().map(|p| p.len() as u32).collect(),
            parts,
            out_port: vec![0.0; ranks],
            in_port: vec![0.0; ranks],
            first_step_ops,
            heap: BinaryHeap::new(),
            tl,
        }
    }

    /// Ends `id` on `lane` at `finish` and moves the lane on.
    fn advance(&mut self, lane: usize, id: NodeId, finish: f64) {
        let l = &mut self.lanes[lane];
        l.cursor += 1;
        l.free_at = (finish, Some(id));
        self.heap.push(Due(finish, lane));
    }

    fn complete(&mut self, id: NodeId, finish: f64) {
        self.done[id] = true;
        self.tl.finish[id] = finish;
        for lane in self.waiters.remove(&id).unwrap_or_default() {
            self.heap.push(Due(finish, lane));
        }
    }

    fn in_graph(&self, id: NodeId) -> bool {
        matches!(self.dag.nodes[id].phase, Phase::Decode(_))
    }

    /// Moves every message of `id` whose other end is armed; finishes the
    /// nodes all of whose messages moved.
    fn move_messages(&mut self, id: NodeId) {
        let mut touched = vec![id];
        for i in 0..self.parts[id].len() {
            let m = self.parts[id][i] as usize;
            if self.moved[m].is_some() {
                continue;
            }
            let (from, to, bytes) = self.messages[m].expect("a message edge");
            if !(self.armed[from] && self.armed[to]) {
                continue;
            }
            let (src, dst) = (self.dag.nodes[from].ranks[0], self.dag.nodes[to].ranks[0]);
            let (rf, _) = self.ready[self.slot[from]].expect("armed");
            let (rt, _) = self.ready[self.slot[to]].expect("armed");
            let start = rf.max(rt).max(self.out_port[src]).max(self.in_port[dst]);
            let host = self.dag.nodes[from].is_host_message();
            let end = start + self.cost.message_seconds(src, dst, bytes, host);
            self.out_port[src] = end;
            self.in_port[dst] = end;
            self.moved[m] = Some((start, end));
            self.unmoved[from] -= 1;
            self.unmoved[to] -= 1;
            self.tl.transfers.push(Transfer { from, to, src, dst, bytes, start, end });
            touched.push(if id == from { to } else { from });
        }
        for n in touched {
            if self.done[n] || !self.armed[n] || self.unmoved[n] > 0 {
                continue;
            }
            let (ready, bound) = self.ready[self.slot[n]].expect("armed");
            let (mut finish, mut binding, mut start) = (ready, bound, f64::INFINITY);
            for &m in &self.parts[n] {
                let (s, e) = self.moved[m as usize].expect("moved");
                start = start.min(s);
                if e > finish {
                    finish = e;
                    let (from, to, _) = self.messages[m as usize].expect("a message edge");
                    let peer = if from == n { to } else { from };
                    // Waiting for the peer when it arrived later than this rank.
                    if self.ready[self.slot[peer]].is_some_and(|(rp, _)| rp > ready) {
                        binding = Some(peer);
                    }
                }
            }
            let (rank, stream) = (self.dag.nodes[n].ranks[0], self.dag.nodes[n].stream);
            self.tl.binding[n] = binding;
            self.tl.spans.push(Span { node: n, rank, stream, ready, start: start.min(finish).max(ready), finish });
            self.complete(n, finish);
            let lane = self.lane_of[&(rank, stream)];
            self.advance(lane, n, finish);
        }
    }

    fn run_lane(&mut self, lane: usize) {
        loop {
            let (rank, stream) = (self.lanes[lane].rank, self.lanes[lane].stream);
            let Some(&(id, at)) = self.lanes[lane].nodes.get(self.lanes[lane].cursor) else { return };
            if self.ready[at].is_none() {
                let (mut ready, mut bound) = self.lanes[lane].free_at;
                for i in 0..self.data_preds.of(at).len() {
                    let p = self.data_preds.of(at)[i];
                    if !self.done[p] {
                        self.waiters.entry(p).or_default().push(lane);
                        return;
                    }
                    if self.tl.finish[p] > ready {
                        (ready, bound) = (self.tl.finish[p], Some(p));
                    }
                }
                // The host's turn between decode steps, where each rank's
                // compute stream enters a step (see `CostModel::step_gap`).
                if let Phase::Decode(step) = self.dag.nodes[id].phase {
                    let cursor = self.lanes[lane].cursor;
                    if stream == 0 && (cursor == 0 || self.dag.nodes[self.lanes[lane].nodes[cursor - 1].0].phase != Phase::Decode(step)) {
                        let gap = self.cost.step_gap(step, self.first_step_ops[rank]);
                        if step == 1 {
                            self.tl.recording[rank] = self.cost.recording(self.first_step_ops[rank]);
                        }
                        self.tl.host_turn[id] = gap;
                        ready += gap;
                    }
                }
                self.ready[at] = Some((ready, bound));
                self.arrived[id] += 1;
                if self.dag.nodes[id].comm().is_some() {
                    // Messages are matched in time order: come back at `ready`.
                    self.heap.push(Due(ready, lane));
                    return;
                }
            }
            let (ready, bound) = self.ready[at].expect("set");
            match &self.dag.nodes[id].kind {
                NodeKind::Compute(op) => {
                    let d = self.cost.op_seconds_on(op, self.in_graph(id), rank);
                    self.tl.duration[id] = d;
                    self.tl.binding[id] = bound;
                    self.tl.spans.push(Span { node: id, rank, stream, ready, start: ready, finish: ready + d });
                    self.complete(id, ready + d);
                    let l = &mut self.lanes[lane];
                    l.cursor += 1;
                    l.free_at = (ready + d, Some(id));
                }
                NodeKind::Comm(c) if c.kind.is_collective() => {
                    if self.done[id] || (self.arrived[id] as usize) < self.dag.nodes[id].ranks.len() {
                        return;
                    }
                    let (d, _) = self.cost.collective_seconds(c);
                    let members = self.slot[id]..self.slot[id] + self.dag.nodes[id].ranks.len();
                    let (start, last) = self.ready[members].iter().enumerate().map(|(i, r)| (r.expect("all").0, i)).fold((f64::NEG_INFINITY, 0), |a, b| if b.0 > a.0 { b } else { a });
                    self.tl.duration[id] = d;
                    self.tl.binding[id] = self.ready[self.slot[id] + last].expect("all").1;
                    let s = self.dag.nodes[id].stream;
                    for i in 0..self.dag.nodes[id].ranks.len() {
                        let r = self.dag.nodes[id].ranks[i];
                        let rd = self.ready[self.slot[id] + i].expect("all").0;
                        self.tl.spans.push(Span { node: id, rank: r, stream: s, ready: rd, start, finish: start + d });
                        let l = self.lane_of[&(r, s)];
                        self.advance(l, id, start + d);
                    }
                    self.complete(id, start + d);
                    return;
                }
                NodeKind::Comm(_) => {
                    if !self.armed[id] {
                        self.armed[id] = true;
                        self.move_messages(id);
                    }
                    return;
                }
            }
        }
    }
}

/// Simulates `dag` under `cost`. Fails with the nodes left waiting when the
/// DAG cannot finish (it would deadlock on real ranks too).
pub fn simulate(dag: &Dag, cost: &CostModel) -> Result<Timeline, String> {
    let mut sim = Sim::new(dag, cost);
    for lane in 0..sim.lanes.len() {
        sim.heap.push(Due(0.0, lane));
    }
    while let Some(Due(_, lane)) = sim.heap.pop() {
        sim.run_lane(lane);
    }
    if let Some(id) = (0..dag.nodes.len()).find(|&i| !sim.done[i]) {
        let left = sim.done.iter().filter(|d| !**d).count();
        return Err(format!("{left} nodes never ran, first {} ({})", id, dag.nodes[id].label()));
    }
    Ok(sim.tl)
}

impl Timeline {
    /// The critical path ending at `end`, earliest first.
    pub fn critical_path(&self, end: NodeId) -> Vec<NodeId> {
        let mut path = vec![end];
        let mut at = end;
        while let Some(b) = self.binding[at] {
            if path.len() > self.binding.len() || self.finish[b] > self.finish[at] {
                break;
            }
            path.push(b);
            at = b;
        }
        path.reverse();
        path
    }
}
