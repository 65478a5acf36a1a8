//! The in-process transport: simulated ranks as threads of one process,
//! moving shape-only buffers ([`ShapeBackend`]) through shared state. Groups
//! are created by the same collective split protocol as on real ranks; every
//! collective is matched by group and order, every point-to-point message by
//! group, peer and order (MPI's non-overtaking rule, so device and host
//! messages share one channel per pair, as they do on the MPI transport).
//! Each transport call is recorded ([`MessageRecord`]: its category as
//! [`super::Comm`] announces it, kind, bytes as `Comm` counts them, peers,
//! group, and the ids that join sends to receives and collective members)
//! in the rank's program log, so the planner can join them into cross-rank
//! edges.
//!
//! No values move, so only what a rank needs to go on is waited for: a
//! receive waits for its messages (a call's all at once, woken only by a
//! message on the channel it waits on) and a split for its new group (a rank
//! that joins none does not wait). Sends do not
//! wait for their receivers, nor members of a collective for each other
//! (the DAG joins them by the collective's id; collectives issued in crossed
//! orders show as a cycle there). This is more permissive than real ranks,
//! so a job that runs on them never deadlocks here. A wait that no rank can
//! end — every live rank waiting — aborts every rank with a list of what
//! each waited for, as does a rank that fails or a mismatched collective.
//! It must not know about strategies.

pub use super::messages::{group_stream, MessageKind, MessageLog, MessageRecord, Part};
use super::{ordered_recv_parts, Category, CommError, Group, RecvPart, Result, SendPart, Timed, Transport};
use crate::backend::shape::{BufRef, Recorder, ShapeBackend, ShapeBuf};
use crate::backend::Backend;
use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, MutexGuard};
pub use world::SimWorld;
use world::{complete, root_cols, Arrival, Call, Channel, Completed, InFlight, Pending, State};

mod world;

/// A group's name and members as its records share them.
type GroupNames = (Arc<str>, Arc<[usize]>);

/// A point-to-point call's sent parts, received parts and received host values.
type Matched = (Vec<Part>, Vec<Part>, Vec<Vec<u32>>);

/// A host message's values: one slice per send.
type HostValues<'a> = &'a [&'a [u32]];

/// One simulated rank's transport.
pub struct SimTransport<'w> {
    world: &'w SimWorld,
    rank: usize,
    log: Rc<Recorder>,
    messages: MessageLog,
    /// Group id on this rank → the group's key in the shared state.
    keys: RefCell<BTreeMap<usize, usize>>,
    /// Collectives issued per group key (their order matches them).
    seq: RefCell<BTreeMap<usize, u64>>,
    /// Each group's name and members, shared by its records.
    shared: RefCell<BTreeMap<usize, GroupNames>>,
    category: Cell<Option<Category>>,
}

impl Drop for SimTransport<'_> {
    fn drop(&mut self) {
        self.world.finish();
    }
}

fn protocol(what: String) -> CommError {
    CommError::Protocol(what)
}

impl<'w> SimTransport<'w> {
    /// World rank `rank`'s transport, recording into `log` (the rank's
    /// backend recorder); returns it and its message records.
    pub fn new(world: &'w SimWorld, rank: usize, log: Rc<Recorder>) -> (Self, MessageLog) {
        let messages: MessageLog = Rc::default();
        let keys = RefCell::new([(0usize, 0usize)].into_iter().collect());
        (Self { world, rank, log, messages: messages.clone(), keys, seq: RefCell::default(), shared: RefCell::default(), category: Cell::new(None) }, messages)
    }

    fn key(&self, group: &Group) -> Result<usize> {
        self.keys.borrow().get(&group.id).copied().ok_or_else(|| protocol(format!("group `{}` (id {}) was not created on rank {}", group.name, group.id, self.rank)))
    }

    /// Waits (holding no lock while asleep) until `missing` finds nothing
    /// missing; meanwhile the rank waits on what it names (a channel, or
    /// `None`: a split), described by `what`.
    fn wait<'g>(&self, mut st: MutexGuard<'g, State>, missing: impl Fn(&State) -> Option<Option<Channel>>, what: &dyn Fn(Option<Channel>) -> String) -> Result<MutexGuard<'g, State>> {
        loop {
            if let Some(why) = &st.aborted {
                return Err(protocol(format!("simulated rank {}: {why}", self.rank)));
            }
            let Some(on) = missing(&st) else { return Ok(st) };
            if !st.blocked[self.rank] {
                st.block(self.rank, what(on), on);
                self.world.check_deadlock(&mut st);
                continue;
            }
            st = self.world.wake[self.rank].wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Joins collective number `seq` of group `key` with `arrival`; returns
    /// what the completed collective decided.
    fn collective(&self, group: &Group, arrival: Arrival) -> Result<Completed> {
        let key = self.key(group)?;
        let seq = {
            let mut s = self.seq.borrow_mut();
            let n = s.entry(key).or_insert(0);
            *n += 1;
            *n
        };
        let (me, size) = (group.rank(), group.size());
        let split = matches!(arrival.call, Call::Split(_));
        let joins_nothing = matches!(arrival.call, Call::Split(None));
        let mut st = self.world.lock();
        if !st.pending.contains_key(&(key, seq)) {
            let instance = st.fresh_id();
            st.pending.insert((key, seq), Pending { arrived: vec![None; size], count: 0, departed: 0, instance, outcome: None });
        }
        let p = st.pending.get_mut(&(key, seq)).expect("pending");
        p.arrived[me] = Some(arrival);
        p.count += 1;
        let instance = p.instance;
        if p.count == size {
            let arrived: Vec<Arrival> = p.arrived.iter().map(|a| a.clone().expect("every member arrived")).collect();
            let outcome = complete(&mut st, &group.name, instance, &arrived);
            if !split {
                // Nothing of a message collective is waited for: its members went on.
                st.pending.remove(&(key, seq));
                drop(st);
                if let Err(e) = &outcome {
                    self.world.abort(e);
                }
                return outcome.map_err(protocol);
            }
            st.pending.get_mut(&(key, seq)).expect("pending").outcome = Some(outcome);
            let released: Vec<usize> = group.world_ranks.iter().copied().filter(|&r| st.release(r)).collect();
            drop(st);
            self.world.wake_released(&released);
            st = self.world.lock();
        }
        if !split {
            // The DAG joins the members by `instance`; no values move, so no
            // member needs to wait for the others (a cross-order of
            // collectives shows as a cycle in the DAG).
            return Ok(Completed { instance, cols: root_cols(&st, key, seq).flatten(), groups: Arc::default() });
        }
        // A member that joins no new group needs nothing the split decides:
        // it goes on (unless it found the split broken).
        if !joins_nothing {
            let what = |_| format!("split {seq} of group `{}`", group.name);
            st = self.wait(st, |s| s.pending.get(&(key, seq)).is_none_or(|p| p.outcome.is_none()).then_some(None), &what)?;
        }
        let p = st.pending.get_mut(&(key, seq)).expect("pending");
        let outcome = p.outcome.clone();
        p.departed += 1;
        if p.departed == size {
            st.pending.remove(&(key, seq));
        }
        outcome.unwrap_or_else(|| Ok(Completed { instance, cols: None, groups: Arc::default() })).map_err(protocol)
    }

    /// Records a call; returns the marks `Comm` gets back, `done` naming the record.
    #[allow(clippy::too_many_arguments)]
    fn record(&self, kind: MessageKind, group: &Group, stream: u32, bytes: u64, collective: Option<u64>, sends: Vec<Part>, recvs: Vec<Part>, io: (Vec<BufRef>, Vec<BufRef>)) -> Timed<Option<usize>> {
        let (name, ranks) = self.shared.borrow_mut().entry(group.id).or_insert_with(|| (Arc::from(group.name.as_str()), Arc::from(group.world_ranks.as_slice()))).clone();
        // `Comm` announces the category of the calls it makes; a transport's
        // default methods built on others (none here) would share it.
        let rec = MessageRecord { category: self.category.get(), kind, group: name, group_ranks: ranks, bytes, collective, sends, recvs, inputs: io.0, outputs: io.1, stream };
        self.messages.borrow_mut().push(rec);
        let n = self.log.push_message();
        Timed { start: None, end: None, done: Some(n) }
    }

    /// Where a device message of `group` runs: the compute stream where
    /// messages hold it, else the group's own stream.
    fn stream_of(be: &ShapeBackend, group: &Group) -> u32 {
        if be.blocking_messages() {
            0
        } else {
            group_stream(group.id)
        }
    }

    fn me(&self, kind: MessageKind, len: usize, cols: Option<usize>) -> Arrival {
        Arrival { call: Call::Message(kind), len, cols, world_rank: self.rank }
    }

    /// Point-to-point: deposits `sends` and takes `recvs` (each `(peer,
    /// bytes)`); host messages carry `values` (one slice per send, or none)
    /// and return what each receive got.
    fn point_to_point(&self, group: &Group, host: bool, sends: &[(usize, u64, Option<usize>)], values: HostValues<'_>, recvs: &[(usize, u64)]) -> Result<Matched> {
        let key = self.key(group)?;
        let to: Vec<usize> = sends
            .iter()
            .map(|&(peer, ..)| group.world_ranks.get(peer).copied().ok_or_else(|| protocol(format!("send to rank {peer} of `{}` ({} ranks)", group.name, group.size()))))
            .collect::<Result<_>>()?;
        let mut st = self.world.lock();
        let (mut sent, mut released) = (Vec::new(), Vec::new());
        for (i, (&(_, bytes, cols), &to)) in sends.iter().zip(&to).enumerate() {
            let message = st.fresh_id();
            let values = values.get(i).map_or_else(Vec::new, |v| v.to_vec());
            let channel = (key, self.rank, to);
            st.channels.entry(channel).or_default().push_back(InFlight { message, bytes, host, cols, values });
            if st.awaits[to] == Some(channel) && st.release(to) {
                released.push(to);
            }
            sent.push(Part { peer: to, message, bytes, sent_bytes: bytes, cols });
        }
        drop(st);
        self.world.wake_released(&released);
        if recvs.is_empty() {
            return Ok((sent, Vec::new(), Vec::new()));
        }
        // The receives wait for all their messages at once (no values move:
        // taking them together is taking them in turn), each part needing
        // as many messages on its channel as parts up to it come from there.
        // The rank waits on the last channel short of its messages: peers
        // tend to send in rank order, so one wake-up usually finds them all.
        let mut from_count: FxHashMap<usize, usize> = FxHashMap::default();
        let mut needs = Vec::with_capacity(recvs.len());
        for &(peer, _) in recvs {
            let from = *group.world_ranks.get(peer).ok_or_else(|| protocol(format!("receive from rank {peer} of `{}` ({} ranks)", group.name, group.size())))?;
            let n = from_count.entry(from).or_default();
            *n += 1;
            needs.push(((key, from, self.rank), *n));
        }
        let missing = |s: &State| needs.iter().rev().find(|(c, n)| s.channels.get(c).map_or(0, VecDeque::len) < *n).map(|&(c, _)| Some(c));
        let what = |c: Option<Channel>| format!("a message from rank {} on `{}`", c.map_or(0, |c| c.1), group.name);
        let mut st = self.wait(self.world.lock(), missing, &what)?;
        let (mut got, mut received) = (Vec::new(), Vec::new());
        for (&(_, bytes), &(channel, _)) in recvs.iter().zip(&needs) {
            let from = channel.1;
            let m = st.channels.get_mut(&channel).and_then(VecDeque::pop_front).expect("a message is there");
            if m.host != host {
                let (a, b) = if host { ("token ids", "a device buffer") } else { ("a device buffer", "token ids") };
                return Err(protocol(format!("rank {} expects {a} from rank {from} on `{}`, the next message there is {b}", self.rank, group.name)));
            }
            got.push(Part { peer: from, message: m.message, bytes, sent_bytes: m.bytes, cols: m.cols });
            received.push(m.values);
        }
        Ok((sent, got, received))
    }
}

impl Transport<ShapeBackend> for SimTransport<'_> {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn world(&mut self, _backend: &ShapeBackend) -> Result<Group> {
        Ok(Group::new(0, "world", (0..self.world.size).collect(), self.rank))
    }

    fn split(&mut self, _backend: &ShapeBackend, parent: &Group, color: Option<u32>, id: usize, name: &str) -> Result<Option<Group>> {
        let arrival = Arrival { call: Call::Split(color), len: 0, cols: None, world_rank: self.rank };
        let done = self.collective(parent, arrival)?;
        let Some((key, ranks)) = done.groups.get(parent.rank()).cloned().flatten() else { return Ok(None) };
        let me = ranks.iter().position(|&r| r == self.rank).expect("a member of its own group");
        self.keys.borrow_mut().insert(id, key);
        Ok(Some(Group::new(id, name, ranks.to_vec(), me)))
    }

    fn all_reduce_sum(&self, be: &ShapeBackend, group: &Group, buf: &mut ShapeBuf) -> Result<Timed<Option<usize>>> {
        let done = self.collective(group, self.me(MessageKind::AllReduce, buf.len, buf.cols))?;
        let io = (vec![BufRef::from(&*buf)], vec![BufRef::from(&*buf)]);
        Ok(self.record(MessageKind::AllReduce, group, Self::stream_of(be, group), be.size_bytes(buf) as u64, Some(done.instance), vec![], vec![], io))
    }

    fn reduce_scatter_sum(&self, be: &ShapeBackend, group: &Group, send: &ShapeBuf, recv: &mut ShapeBuf) -> Result<Timed<Option<usize>>> {
        if send.len != recv.len * group.size() {
            return Err(CommError::Size(format!("reduce_scatter: send {} != {} x recv {}", send.len, group.size(), recv.len)));
        }
        let done = self.collective(group, self.me(MessageKind::ReduceScatter, send.len, send.cols))?;
        recv.cols = send.cols;
        let io = (vec![BufRef::from(send), BufRef::from(&*recv)], vec![BufRef::from(&*recv)]);
        Ok(self.record(MessageKind::ReduceScatter, group, Self::stream_of(be, group), be.size_bytes(send) as u64, Some(done.instance), vec![], vec![], io))
    }

    fn all_gather(&self, be: &ShapeBackend, group: &Group, send: &ShapeBuf, recv: &mut ShapeBuf) -> Result<Timed<Option<usize>>> {
        if recv.len != send.len * group.size() {
            return Err(CommError::Size(format!("all_gather: recv {} != {} x {}", recv.len, group.size(), send.len)));
        }
        let done = self.collective(group, self.me(MessageKind::AllGather, send.len, send.cols))?;
        recv.cols = send.cols;
        // The receive buffer (allocated by `Comm`) is the collective's to fill: it counts as read.
        let io = (vec![BufRef::from(send), BufRef::from(&*recv)], vec![BufRef::from(&*recv)]);
        Ok(self.record(MessageKind::AllGather, group, Self::stream_of(be, group), be.size_bytes(recv) as u64, Some(done.instance), vec![], vec![], io))
    }

    fn broadcast(&self, be: &ShapeBackend, group: &Group, root: usize, buf: &mut ShapeBuf) -> Result<Timed<Option<usize>>> {
        let kind = MessageKind::Broadcast { root };
        let done = self.collective(group, self.me(kind, buf.len, buf.cols))?;
        buf.cols = done.cols.or(buf.cols);
        let io = (vec![BufRef::from(&*buf)], vec![BufRef::from(&*buf)]);
        Ok(self.record(kind, group, Self::stream_of(be, group), be.size_bytes(buf) as u64, Some(done.instance), vec![], vec![], io))
    }

    fn exchange(&self, be: &ShapeBackend, group: &Group, sends: &[SendPart<'_, ShapeBackend>], recv: Option<&mut ShapeBuf>, recvs: &[RecvPart]) -> Result<Timed<Option<usize>>> {
        for p in sends {
            if p.range.end > p.buf.len || p.peer >= group.size() {
                return Err(CommError::Size(format!("send of elements {:?} of {} to rank {} of `{}`", p.range, p.buf.len, p.peer, group.name)));
            }
        }
        let recv_len = recv.as_ref().map_or(0, |b| b.len);
        ordered_recv_parts(recvs, recv_len)?;
        let elem = |b: &ShapeBuf| be.size_bytes(b).checked_div(b.len).unwrap_or(0) as u64;
        let out: Vec<(usize, u64, Option<usize>)> = sends.iter().map(|p| (p.peer, p.range.len() as u64 * elem(p.buf), p.buf.cols)).collect();
        let recv_elem = recv.as_ref().map_or(0, |b| elem(b));
        let inn: Vec<(usize, u64)> = recvs.iter().map(|p| (p.peer, p.range.len() as u64 * recv_elem)).collect();
        let (sent, got, _) = self.point_to_point(group, false, &out, &[], &inn)?;
        let mut inputs: Vec<BufRef> = sends.iter().map(|p| BufRef::from(p.buf)).collect();
        let mut outputs = Vec::new();
        if let Some(b) = recv {
            if got.len() == 1 && recvs[0].range.len() == b.len {
                b.cols = got[0].cols;
            }
            // Parts may leave rows of the buffer as they were: it is read too.
            inputs.push(BufRef::from(&*b));
            outputs.push(BufRef::from(&*b));
        }
        let bytes = sent.iter().chain(&got).map(|p| p.bytes).sum();
        Ok(self.record(MessageKind::Exchange, group, Self::stream_of(be, group), bytes, None, sent, got, (inputs, outputs)))
    }

    /// Blocks to and from every other rank as point-to-point parts (the
    /// rank's own block is its own: no message); empty blocks send nothing,
    /// on both sides alike, since both know the counts.
    fn all_to_all_v(&self, be: &ShapeBackend, group: &Group, send: &ShapeBuf, send_counts: &[usize], recv: &mut ShapeBuf, recv_counts: &[usize]) -> Result<Timed<Option<usize>>> {
        let (n, me) = (group.size(), group.rank());
        let (sent_total, recv_total) = (send_counts.iter().sum::<usize>(), recv_counts.iter().sum::<usize>());
        if send_counts.len() != n || recv_counts.len() != n || sent_total > send.len || recv_total > recv.len {
            return Err(CommError::Size(format!("all_to_all_v on `{}` of {n} ranks: counts {send_counts:?} of {} sent, {recv_counts:?} into {}", group.name, send.len, recv.len)));
        }
        let elem = |b: &ShapeBuf| be.size_bytes(b).checked_div(b.len).unwrap_or(0) as u64;
        // A rank sending nothing has an empty buffer: take the element size from the other.
        let (es, er) = (elem(send).max(elem(recv)), elem(recv).max(elem(send)));
        let out: Vec<(usize, u64, Option<usize>)> = (0..n).filter(|&p| p != me && send_counts[p] > 0).map(|p| (p, send_counts[p] as u64 * es, send.cols)).collect();
        let inn: Vec<(usize, u64)> = (0..n).filter(|&p| p != me && recv_counts[p] > 0).map(|p| (p, recv_counts[p] as u64 * er)).collect();
        let (sent, got, _) = self.point_to_point(group, false, &out, &[], &inn)?;
        recv.cols = send.cols.or(got.first().and_then(|p| p.cols));
        let inputs: Vec<BufRef> = std::iter::repeat_n(BufRef::from(send), sent.len()).chain(std::iter::once(BufRef::from(&*recv))).collect();
        let bytes = sent.iter().chain(&got).map(|p| p.bytes).sum();
        Ok(self.record(MessageKind::AllToAll, group, Self::stream_of(be, group), bytes, None, sent, got, (inputs, vec![BufRef::from(&*recv)])))
    }

    fn host_broadcast(&self, group: &Group, root: usize, data: &mut [u32]) -> Result<()> {
        let kind = MessageKind::HostBroadcast { root };
        let done = self.collective(group, self.me(kind, data.len(), None))?;
        self.record(kind, group, 0, std::mem::size_of_val(data) as u64, Some(done.instance), vec![], vec![], (vec![], vec![]));
        Ok(())
    }

    fn host_send(&self, group: &Group, dst: usize, data: &[u32]) -> Result<()> {
        let (sent, _, _) = self.point_to_point(group, true, &[(dst, std::mem::size_of_val(data) as u64, None)], &[data], &[])?;
        self.record(MessageKind::HostSend, group, 0, std::mem::size_of_val(data) as u64, None, sent, vec![], (vec![], vec![]));
        Ok(())
    }

    fn host_recv(&self, group: &Group, src: usize, data: &mut [u32]) -> Result<()> {
        let (_, got, received) = self.point_to_point(group, true, &[], &[], &[(src, std::mem::size_of_val(data) as u64)])?;
        if let Some(v) = received.first().filter(|v| v.len() == data.len()) {
            data.copy_from_slice(v);
        }
        self.record(MessageKind::HostRecv, group, 0, std::mem::size_of_val(data) as u64, None, vec![], got, (vec![], vec![]));
        Ok(())
    }

    /// One record for the whole host all-to-all, bytes as `Comm` counts them.
    fn host_all_to_all(&self, group: &Group, send: &[u32], recv: &mut [u32]) -> Result<()> {
        let (n, me) = (group.size(), group.rank());
        if send.len() != recv.len() || send.len() % n != 0 {
            return Err(CommError::Size(format!("host_all_to_all on `{}` of {n} ranks: {} sent, {} received", group.name, send.len(), recv.len())));
        }
        let per = (send.len() / n * 4) as u64;
        let peers: Vec<usize> = (0..n).filter(|&p| p != me).collect();
        let out: Vec<(usize, u64, Option<usize>)> = peers.iter().map(|&p| (p, per, None)).collect();
        let inn: Vec<(usize, u64)> = peers.iter().map(|&p| (p, per)).collect();
        let per_elems = send.len() / n;
        let blocks: Vec<&[u32]> = peers.iter().map(|&p| &send[p * per_elems..(p + 1) * per_elems]).collect();
        let (sent, got, received) = self.point_to_point(group, true, &out, &blocks, &inn)?;
        recv[me * per_elems..(me + 1) * per_elems].copy_from_slice(&send[me * per_elems..(me + 1) * per_elems]);
        for (&p, v) in peers.iter().zip(&received) {
            if v.len() != per_elems {
                return Err(CommError::Size(format!("host_all_to_all on `{}`: rank {p} sent {} counts, {per_elems} expected", group.name, v.len())));
            }
            recv[p * per_elems..(p + 1) * per_elems].copy_from_slice(v);
        }
        let bytes = 2 * std::mem::size_of_val(send) as u64 * peers.len() as u64 / n as u64;
        self.record(MessageKind::HostAllToAll, group, 0, bytes, None, sent, got, (vec![], vec![]));
        Ok(())
    }

    fn announce(&self, category: Category) {
        self.category.set(Some(category));
    }
}

#[cfg(test)]
mod tests;
