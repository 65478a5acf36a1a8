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
use super::dag::{Dag, EdgeKind, NodeId, NodeKind, Phase};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

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
}

#[derive(Clone, Copy, PartialEq)]
struct Due(f64, usize, u32);

impl Eq for Due {}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0).then_with(|| o.1.cmp(&self.1)).then_with(|| o.2.cmp(&self.2))
    }
}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// When a node's stream and data were there, and what it waited for last.
type Ready = (f64, Option<NodeId>);

struct Sim<'a> {
    dag: &'a Dag,
    cost: &'a CostModel,
    lanes: BTreeMap<(usize, u32), Vec<NodeId>>,
    cursor: BTreeMap<(usize, u32), usize>,
    free_at: BTreeMap<(usize, u32), (f64, Option<NodeId>)>,
    /// Per node and member: ready time and what it waited for.
    ready: Vec<Vec<Option<Ready>>>,
    armed: Vec<bool>,
    done: Vec<bool>,
    data_preds: BTreeMap<(NodeId, usize), Vec<NodeId>>,
    waiters: BTreeMap<NodeId, Vec<(usize, u32)>>,
    /// message id -> (sender node, receiver node, bytes)
    messages: BTreeMap<u64, (NodeId, NodeId, u64)>,
    parts: Vec<Vec<u64>>,
    moved: BTreeMap<u64, (f64, f64)>,
    /// When each rank's outgoing and incoming port is free.
    out_port: BTreeMap<usize, f64>,
    in_port: BTreeMap<usize, f64>,
    heap: BinaryHeap<Due>,
    tl: Timeline,
}

impl<'a> Sim<'a> {
    fn new(dag: &'a Dag, cost: &'a CostModel) -> Self {
        let n = dag.nodes.len();
        let mut lanes: BTreeMap<(usize, u32), Vec<NodeId>> = BTreeMap::new();
        for (r, prog) in dag.programs.iter().enumerate() {
            for &id in prog {
                lanes.entry((r, dag.nodes[id].stream)).or_default().push(id);
            }
        }
        let mut data_preds: BTreeMap<(NodeId, usize), Vec<NodeId>> = BTreeMap::new();
        let mut messages = BTreeMap::new();
        let mut parts = vec![Vec::new(); n];
        for e in &dag.edges {
            match e.kind {
                EdgeKind::Data { rank, .. } => data_preds.entry((e.to, rank)).or_default().push(e.from),
                EdgeKind::Message { message, bytes, .. } => {
                    messages.insert(message, (e.from, e.to, bytes));
                    parts[e.from].push(message);
                    parts[e.to].push(message);
                }
            }
        }
        let ready = dag.nodes.iter().map(|node| vec![None; node.ranks.len()]).collect();
        let cursor = lanes.keys().map(|k| (*k, 0)).collect();
        let free_at = lanes.keys().map(|k| (*k, (0.0, None))).collect();
        let tl = Timeline { finish: vec![0.0; n], binding: vec![None; n], duration: vec![0.0; n], ..Default::default() };
        Self {
            dag,
            cost,
            lanes,
            cursor,
            free_at,
            ready,
            armed: vec![false; n],
            done: vec![false; n],
            data_preds,
            waiters: BTreeMap::new(),
            messages,
            parts,
            moved: BTreeMap::new(),
            out_port: BTreeMap::new(),
            in_port: BTreeMap::new(),
            heap: BinaryHeap::new(),
            tl,
        }
    }

    fn member(&self, id: NodeId, rank: usize) -> usize {
        self.dag.nodes[id].ranks.iter().position(|&r| r == rank).expect("a member")
    }

    /// Ends `id` on `rank`'s stream at `finish` and moves the stream on.
    fn advance(&mut self, rank: usize, stream: u32, id: NodeId, finish: f64) {
        *self.cursor.get_mut(&(rank, stream)).expect("lane") += 1;
        self.free_at.insert((rank, stream), (finish, Some(id)));
        self.heap.push(Due(finish, rank, stream));
    }

    fn complete(&mut self, id: NodeId, finish: f64) {
        self.done[id] = true;
        self.tl.finish[id] = finish;
        for (r, s) in self.waiters.remove(&id).unwrap_or_default() {
            self.heap.push(Due(finish, r, s));
        }
    }

    fn in_graph(&self, id: NodeId) -> bool {
        matches!(self.dag.nodes[id].phase, Phase::Decode(_))
    }

    /// Moves every message of `id` whose other end is armed; finishes the
    /// nodes all of whose messages moved.
    fn move_messages(&mut self, id: NodeId) {
        let mut touched = vec![id];
        for m in self.parts[id].clone() {
            if self.moved.contains_key(&m) {
                continue;
            }
            let (from, to, bytes) = self.messages[&m];
            if !(self.armed[from] && self.armed[to]) {
                continue;
            }
            let (src, dst) = (self.dag.nodes[from].ranks[0], self.dag.nodes[to].ranks[0]);
            let (rf, _) = self.ready[from][0].expect("armed");
            let (rt, _) = self.ready[to][0].expect("armed");
            let out_free = self.out_port.get(&src).copied().unwrap_or(0.0);
            let in_free = self.in_port.get(&dst).copied().unwrap_or(0.0);
            let start = rf.max(rt).max(out_free).max(in_free);
            let host = self.dag.nodes[from].is_host_message();
            let end = start + self.cost.message_seconds(src, dst, bytes, host);
            self.out_port.insert(src, end);
            self.in_port.insert(dst, end);
            self.moved.insert(m, (start, end));
            self.tl.transfers.push(Transfer { from, to, src, dst, bytes, start, end });
            touched.push(if id == from { to } else { from });
        }
        for n in touched {
            if self.done[n] || !self.armed[n] || !self.parts[n].iter().all(|m| self.moved.contains_key(m)) {
                continue;
            }
            let (ready, bound) = self.ready[n][0].expect("armed");
            let mut finish = ready;
            let mut binding = bound;
            let mut start = f64::INFINITY;
            for m in &self.parts[n] {
                let (s, e) = self.moved[m];
                start = start.min(s);
                if e > finish {
                    finish = e;
                    let (from, to, _) = self.messages[m];
                    let peer = if from == n { to } else { from };
                    // Waiting for the peer when it arrived later than this rank.
                    if self.ready[peer][0].is_some_and(|(rp, _)| rp > ready) {
                        binding = Some(peer);
                    }
                }
            }
            let rank = self.dag.nodes[n].ranks[0];
            let stream = self.dag.nodes[n].stream;
            self.tl.binding[n] = binding;
            self.tl.spans.push(Span { node: n, rank, stream, ready, start: start.min(finish).max(ready), finish });
            self.complete(n, finish);
            self.advance(rank, stream, n, finish);
        }
    }

    fn run_lane(&mut self, rank: usize, stream: u32) {
        loop {
            let at = self.cursor[&(rank, stream)];
            let Some(&id) = self.lanes[&(rank, stream)].get(at) else { return };
            let k = self.member(id, rank);
            if self.ready[id][k].is_none() {
                let (mut ready, mut bound) = self.free_at[&(rank, stream)];
                for &p in self.data_preds.get(&(id, rank)).map(Vec::as_slice).unwrap_or(&[]) {
                    if !self.done[p] {
                        self.waiters.entry(p).or_default().push((rank, stream));
                        return;
                    }
                    if self.tl.finish[p] > ready {
                        (ready, bound) = (self.tl.finish[p], Some(p));
                    }
                }
                self.ready[id][k] = Some((ready, bound));
                if self.dag.nodes[id].comm().is_some() {
                    // Messages are matched in time order: come back at `ready`.
                    self.heap.push(Due(ready, rank, stream));
                    return;
                }
            }
            let (ready, bound) = self.ready[id][k].expect("set");
            match &self.dag.nodes[id].kind {
                NodeKind::Compute(op) => {
                    let d = self.cost.op_seconds(op, self.in_graph(id));
                    self.tl.duration[id] = d;
                    self.tl.binding[id] = bound;
                    self.tl.spans.push(Span { node: id, rank, stream, ready, start: ready, finish: ready + d });
                    self.complete(id, ready + d);
                    *self.cursor.get_mut(&(rank, stream)).expect("lane") += 1;
                    self.free_at.insert((rank, stream), (ready + d, Some(id)));
                }
                NodeKind::Comm(c) if c.kind.is_collective() => {
                    if self.done[id] || self.ready[id].iter().any(Option::is_none) {
                        return;
                    }
                    let (d, _) = self.cost.collective_seconds(c);
                    let (start, last) = self.ready[id].iter().enumerate().map(|(i, r)| (r.expect("all").0, i)).fold((f64::NEG_INFINITY, 0), |a, b| if b.0 > a.0 { b } else { a });
                    self.tl.duration[id] = d;
                    self.tl.binding[id] = self.ready[id][last].expect("all").1;
                    let members = self.dag.nodes[id].ranks.clone();
                    for (i, &r) in members.iter().enumerate() {
                        let rd = self.ready[id][i].expect("all").0;
                        let s = self.dag.nodes[id].stream;
                        self.tl.spans.push(Span { node: id, rank: r, stream: s, ready: rd, start, finish: start + d });
                        self.advance(r, s, id, start + d);
                    }
                    self.complete(id, start + d);
                    return;
                }
                NodeKind::Comm(_) => {
                    if self.armed[id] {
                        return;
                    }
                    self.armed[id] = true;
                    self.move_messages(id);
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
    let lanes: Vec<(usize, u32)> = sim.lanes.keys().copied().collect();
    for (r, s) in lanes {
        sim.heap.push(Due(0.0, r, s));
    }
    while let Some(Due(_, r, s)) = sim.heap.pop() {
        sim.run_lane(r, s);
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
