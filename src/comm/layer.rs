//! [`Comm`], the one place messages go through: every collective and
//! point-to-point message of every strategy is issued here and recorded with
//! its category, bytes, peers and time, so breakdowns and traces cannot
//! drift from what was executed.
//!
//! A message can be issued now and completed later ([`Comm::issue`],
//! [`Comm::complete`]): on a GPU the transport runs it on the group's own
//! stream, and completing it makes the compute timeline wait for it — the
//! time that wait takes is recorded as waiting. The buffers a message uses
//! belong to its [`Ticket`] until then, so they live as long as the message
//! needs them. A ticket that is not needed back can be detached; it is
//! completed at the next [`Comm::settle`] (the end of a phase).

use super::log::{CommTotals, Log, MessageRecord, RecordedMessages, WaitRecord};
use super::{Category, CommError, CommTrace, Group, RecvPart, Result, SendPart, Timed, Transport};
use crate::backend::{Backend, RowRun};
use std::cell::RefCell;
use std::ops::Range;

/// Elements `range` of a ticket's send buffer, to group rank `peer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendTo {
    pub peer: usize,
    pub range: Range<usize>,
}

/// A message issued and not yet completed: it owns the buffers it uses
/// until [`Comm::complete`] (a ticket dropped uncompleted would free them
/// while the message may still use them).
#[must_use = "a message's buffers live until it is completed"]
pub struct Ticket<B: Backend> {
    record: MessageRecord<B::Mark>,
    done: B::Mark,
    send: Option<B::Buf>,
    recv: Option<B::Buf>,
}

/// The one place messages go through.
pub struct Comm<'a, B: Backend> {
    backend: &'a B,
    transport: RefCell<Box<dyn Transport<B> + 'a>>,
    log: RefCell<Log<B::Mark>>,
    detached: RefCell<Vec<Ticket<B>>>,
    next_group_id: RefCell<usize>,
    heartbeat: RefCell<Option<crate::control::Heartbeat>>,
}

impl<'a, B: Backend> Comm<'a, B> {
    pub fn new(backend: &'a B, transport: Box<dyn Transport<B> + 'a>) -> Self {
        Self { backend, transport: RefCell::new(transport), log: RefCell::new(Log::default()), detached: RefCell::new(Vec::new()), next_group_id: RefCell::new(0), heartbeat: RefCell::new(None) }
    }

    /// Beats `h` around every message, so the watchdog sees a rank stuck in one.
    pub fn set_heartbeat(&self, h: crate::control::Heartbeat) {
        *self.heartbeat.borrow_mut() = Some(h);
    }

    fn beat(&self) {
        if let Some(h) = self.heartbeat.borrow().as_ref() {
            h.beat();
        }
    }

    pub fn transport_name(&self) -> &'static str {
        self.transport.borrow().name()
    }

    /// Splits `parent` collectively: ranks passing the same `Some(color)`
    /// form one new group (ordered by their parent rank); `None` opts out.
    /// Every member of `parent` must call this.
    pub fn split(&self, parent: &Group, color: Option<u32>, name: &str) -> Result<Option<Group>> {
        let id = {
            let mut next = self.next_group_id.borrow_mut();
            *next += 1;
            *next
        };
        self.transport.borrow_mut().split(self.backend, parent, color, id, name)
    }

    /// The world as a group (collective over the world).
    pub fn world_group(&self) -> Result<Group> {
        self.transport.borrow_mut().world(self.backend)
    }

    fn bytes_of(&self, buf: &B::Buf) -> usize {
        self.backend.size_bytes(buf)
    }

    /// Bytes of `n` elements of `buf`'s type.
    fn bytes_of_elems(&self, buf: &B::Buf, n: usize) -> usize {
        self.bytes_of(buf).checked_div(self.backend.len(buf)).map_or(0, |elem| elem * n)
    }

    fn record(category: Category, op: &'static str, group: &Group, peers: Vec<usize>, bytes: usize, t: Timed<B::Mark>) -> (MessageRecord<B::Mark>, B::Mark) {
        (MessageRecord { category, op, group: group.name.clone(), group_id: group.id, peers, bytes: bytes as u64, blocks_compute: false, from: t.start, to: t.end }, t.done)
    }

    /// Runs a collective and completes it at once.
    fn collective(&self, category: Category, op: &'static str, group: &Group, bytes: usize, run: impl FnOnce(&dyn Transport<B>) -> Result<Timed<B::Mark>>) -> Result<()> {
        self.beat();
        let t = self.transported(category, run)?;
        self.beat();
        // Sized up front: a collective of a thousand ranks lists 999 peers on each.
        let mut peers = Vec::with_capacity(group.size().saturating_sub(1));
        peers.extend((0..group.size()).filter(|&r| r != group.rank()));
        self.finish(Self::record(category, op, group, peers, bytes, t))
    }

    /// Runs one transport call, first announcing its category (a transport
    /// that records messages, the planner's, keeps it).
    fn transported<T>(&self, category: Category, run: impl FnOnce(&dyn Transport<B>) -> Result<T>) -> Result<T> {
        let transport = self.transport.borrow();
        transport.announce(category);
        run(&**transport)
    }

    /// Makes the compute timeline wait for a message (its `done` point) and records it.
    fn finish(&self, (mut record, done): (MessageRecord<B::Mark>, B::Mark)) -> Result<()> {
        if self.backend.messages_block_compute() {
            // The message itself held the compute timeline: all of it was waiting.
            record.blocks_compute = true;
            self.log.borrow_mut().pending.push(record);
            return Ok(());
        }
        let from = self.backend.mark()?;
        self.backend.wait_for(&done)?;
        let wait = WaitRecord { category: record.category, from, to: self.backend.mark()? };
        let mut log = self.log.borrow_mut();
        log.pending.push(record);
        log.waits.push(wait);
        Ok(())
    }

    /// Sum-all-reduce in place. Bytes: the buffer's size.
    pub fn all_reduce(&self, category: Category, group: &Group, buf: &mut B::Buf) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let bytes = self.bytes_of(buf);
        self.collective(category, "all_reduce", group, bytes, |t| t.all_reduce_sum(self.backend, group, buf))
    }

    /// All-gather of equal-sized contributions into a new buffer. Bytes: the
    /// gathered size. A group of one gathers nothing: its result is the
    /// contribution, copied once.
    pub fn all_gather(&self, category: Category, group: &Group, send: &B::Buf) -> Result<B::Buf> {
        let n = self.backend.len(send);
        if group.size() == 1 {
            return Ok(self.backend.gather_rows(send, n.max(1), &[RowRun::new(0, usize::from(n > 0))])?);
        }
        let mut recv = self.backend.empty(n * group.size())?;
        let bytes = self.bytes_of(&recv);
        self.collective(category, "all_gather", group, bytes, |t| t.all_gather(self.backend, group, send, &mut recv))?;
        Ok(recv)
    }

    /// Reduce-scatter of `send` (`size × len(recv)` elements): `recv` gets
    /// the sum of every rank's block of this rank. Bytes: `send`'s size.
    pub fn reduce_scatter(&self, category: Category, group: &Group, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        let bytes = self.bytes_of(send);
        self.collective(category, "reduce_scatter", group, bytes, |t| t.reduce_scatter_sum(self.backend, group, send, recv))
    }

    /// Broadcast from group rank `root`. Bytes: the buffer's size.
    pub fn broadcast(&self, category: Category, group: &Group, root: usize, buf: &mut B::Buf) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let bytes = self.bytes_of(buf);
        self.collective(category, "broadcast", group, bytes, |t| t.broadcast(self.backend, group, root, buf))
    }

    /// All-to-all of rows with counts per peer: block `p` of `send`
    /// (`send_rows[p]` rows of `cols`, blocks in group-rank order) goes to
    /// group rank `p`; returns what every rank sent this one, `recv_rows[p]`
    /// rows from rank `p`, in group-rank order. Completed at once. Bytes:
    /// the rows sent to and received from other ranks (a rank's own block
    /// moves no bytes between ranks).
    pub fn all_to_all_rows(&self, category: Category, group: &Group, send: &B::Buf, cols: usize, send_rows: &[usize], recv_rows: &[usize]) -> Result<B::Buf> {
        let total: usize = recv_rows.iter().sum();
        if group.size() == 1 {
            return Ok(self.backend.gather_rows(send, cols.max(1), &[RowRun::new(0, total)])?);
        }
        let me = group.rank();
        let elems = |rows: &[usize]| rows.iter().map(|r| r * cols).collect::<Vec<_>>();
        let (send_counts, recv_counts) = (elems(send_rows), elems(recv_rows));
        let moved: usize = (0..group.size()).filter(|&p| p != me).map(|p| send_counts[p] + recv_counts[p]).sum();
        let peers: Vec<usize> = (0..group.size()).filter(|&p| p != me && (send_counts[p] > 0 || recv_counts[p] > 0)).collect();
        let mut recv = self.backend.empty(total * cols)?;
        // Element bytes from a buffer that has elements (a rank may send nothing).
        let bytes = if self.backend.len(send) > 0 { self.bytes_of_elems(send, moved) } else { self.bytes_of_elems(&recv, moved) };
        self.beat();
        let t = self.transported(category, |t| t.all_to_all_v(self.backend, group, send, &send_counts, &mut recv, &recv_counts))?;
        self.beat();
        self.finish(Self::record(category, "all_to_all", group, peers, bytes, t))?;
        Ok(recv)
    }

    /// Host all-to-all of counts: `send` holds one block per group rank
    /// (block `p` for rank `p`, all of one length); returns the blocks every
    /// rank sent this one, in group-rank order. Bytes: the counts sent to
    /// and received from other ranks.
    pub fn all_to_all_counts(&self, category: Category, group: &Group, send: &[u32]) -> Result<Vec<u32>> {
        if group.size() == 1 {
            return Ok(send.to_vec());
        }
        let mut recv = vec![0u32; send.len()];
        let peers: Vec<usize> = (0..group.size()).filter(|&r| r != group.rank()).collect();
        let bytes = 2 * std::mem::size_of_val(send) * peers.len() / group.size();
        self.host(category, "host_all_to_all", group, peers, bytes, |t| t.host_all_to_all(group, send, &mut recv))?;
        Ok(recv)
    }

    /// Issues a message: parts of `send` to peers and parts of `recv` from
    /// peers, all together (see [`Transport::exchange`]). Bytes: what this
    /// rank sends and receives.
    pub fn issue(&self, category: Category, group: &Group, send: Option<(B::Buf, Vec<SendTo>)>, recv: Option<(B::Buf, Vec<RecvPart>)>) -> Result<Ticket<B>> {
        let (send_buf, send_to) = send.map_or((None, Vec::new()), |(b, to)| (Some(b), to));
        let (mut recv_buf, recv_from) = recv.map_or((None, Vec::new()), |(b, from)| (Some(b), from));
        let sends: Vec<SendPart<'_, B>> = match &send_buf {
            Some(b) => send_to.iter().map(|s| SendPart { peer: s.peer, buf: b, range: s.range.clone() }).collect(),
            None => Vec::new(),
        };
        let sent: usize = sends.iter().map(|p| self.bytes_of_elems(p.buf, p.range.len())).sum();
        let received: usize = recv_buf.as_ref().map_or(0, |b| recv_from.iter().map(|p| self.bytes_of_elems(b, p.range.len())).sum());
        let mut peers: Vec<usize> = send_to.iter().map(|s| s.peer).chain(recv_from.iter().map(|r| r.peer)).collect();
        peers.sort_unstable();
        peers.dedup();
        self.beat();
        let t = self.transported(category, |t| t.exchange(self.backend, group, &sends, recv_buf.as_mut(), &recv_from))?;
        self.beat();
        drop(sends);
        let (record, done) = Self::record(category, "exchange", group, peers, sent + received, t);
        Ok(Ticket { record, done, send: send_buf, recv: recv_buf })
    }

    /// Completes a message: the compute timeline waits for it; returns the
    /// receive buffer.
    pub fn complete(&self, ticket: Ticket<B>) -> Result<Option<B::Buf>> {
        let Ticket { record, done, send, recv } = ticket;
        self.finish((record, done))?;
        // The send buffer is freed after the compute timeline waited for the message.
        drop(send);
        Ok(recv)
    }

    /// Leaves a message in flight until the next [`Comm::settle`] (a send
    /// whose buffer the compute timeline does not need back).
    pub fn detach(&self, ticket: Ticket<B>) {
        self.detached.borrow_mut().push(ticket);
    }

    /// Completes every detached message.
    pub fn settle(&self) -> Result<()> {
        let tickets = std::mem::take(&mut *self.detached.borrow_mut());
        for t in tickets {
            self.complete(t)?;
        }
        Ok(())
    }

    /// Sends all of `buf` to group rank `dst`. Bytes: the message.
    pub fn send(&self, category: Category, group: &Group, dst: usize, buf: &B::Buf) -> Result<()> {
        let n = self.backend.len(buf);
        self.beat();
        let t = self.transported(category, |t| t.exchange(self.backend, group, &[SendPart { peer: dst, buf, range: 0..n }], None, &[]))?;
        self.beat();
        let bytes = self.bytes_of(buf);
        self.finish(Self::record(category, "send", group, vec![dst], bytes, t))
    }

    /// Receives exactly `len` model-dtype elements from group rank `src`.
    pub fn recv(&self, category: Category, group: &Group, src: usize, len: usize) -> Result<B::Buf> {
        let buf = self.backend.empty(len)?;
        let t = self.issue(category, group, None, Some((buf, vec![RecvPart { peer: src, range: 0..len }])))?;
        self.complete(t)?.ok_or_else(|| CommError::Protocol("a receive returned no buffer".into()))
    }

    /// Receives into `buf`, whose length and dtype must match the message.
    pub fn recv_into(&self, category: Category, group: &Group, src: usize, buf: &mut B::Buf) -> Result<()> {
        let n = self.backend.len(buf);
        self.beat();
        let t = self.transported(category, |t| t.exchange(self.backend, group, &[], Some(buf), &[RecvPart { peer: src, range: 0..n }]))?;
        self.beat();
        let bytes = self.bytes_of(buf);
        self.finish(Self::record(category, "recv", group, vec![src], bytes, t))
    }

    /// Host messages (token ids) run on the host between two marks of the
    /// compute timeline, which they hold: they are messages like any other
    /// (counted, traced) whose whole time is waiting.
    fn host(&self, category: Category, op: &'static str, group: &Group, peers: Vec<usize>, bytes: usize, run: impl FnOnce(&dyn Transport<B>) -> Result<()>) -> Result<()> {
        self.beat();
        let from = self.backend.mark()?;
        self.transported(category, run)?;
        let to = self.backend.mark()?;
        self.beat();
        let record = MessageRecord { category, op, group: group.name.clone(), group_id: group.id, peers, bytes: bytes as u64, blocks_compute: true, from, to };
        self.log.borrow_mut().pending.push(record);
        Ok(())
    }

    /// Broadcasts host token ids from group rank `root`.
    pub fn broadcast_tokens(&self, category: Category, group: &Group, root: usize, tokens: &mut [u32]) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let peers = (0..group.size()).filter(|&r| r != group.rank()).collect();
        let bytes = std::mem::size_of_val(tokens);
        self.host(category, "host_broadcast", group, peers, bytes, |t| t.host_broadcast(group, root, tokens))
    }

    pub fn send_tokens(&self, category: Category, group: &Group, dst: usize, tokens: &[u32]) -> Result<()> {
        self.host(category, "host_send", group, vec![dst], std::mem::size_of_val(tokens), |t| t.host_send(group, dst, tokens))
    }

    pub fn recv_tokens(&self, category: Category, group: &Group, src: usize, tokens: &mut [u32]) -> Result<()> {
        let bytes = std::mem::size_of_val(tokens);
        self.host(category, "host_recv", group, vec![src], bytes, |t| t.host_recv(group, src, tokens))
    }

    /// Starts setting aside the messages of a step being recorded (a CUDA
    /// graph): they are not sent now, so they are accounted once per replay
    /// by [`Comm::account_replay`] instead of when issued.
    pub fn begin_recording(&self) -> (usize, usize) {
        let log = self.log.borrow();
        (log.pending.len(), log.waits.len())
    }

    /// The messages issued since `begin_recording` returned `from`.
    pub fn end_recording(&self, from: (usize, usize)) -> RecordedMessages<B::Mark> {
        let mut log = self.log.borrow_mut();
        let (messages_at, waits_at) = (from.0.min(log.pending.len()), from.1.min(log.waits.len()));
        let messages = log.pending.split_off(messages_at);
        let waits = log.waits.split_off(waits_at);
        RecordedMessages { messages, waits }
    }

    /// Accounts one replay of recorded messages (waits for their marks).
    pub fn account_replay(&self, rec: &RecordedMessages<B::Mark>) -> Result<()> {
        self.beat();
        Ok(self.log.borrow_mut().resolve(self.backend, &rec.messages, &rec.waits)?)
    }

    /// Starts keeping every message and wait of the batch for a trace, with
    /// times counted from `origin`.
    pub fn start_trace(&self, origin: B::Mark) {
        self.log.borrow_mut().trace = Some((origin, CommTrace::default()));
    }

    /// Resolves pending timings and returns the totals since the last call
    /// (and the trace, if one was started).
    pub fn take_stats(&self) -> Result<(CommTotals, Option<CommTrace>)> {
        self.settle()?;
        let mut log = self.log.borrow_mut();
        log.resolve_pending(self.backend)?;
        let trace = log.trace.take().map(|(_, t)| t);
        Ok((std::mem::take(&mut log.totals), trace))
    }
}
