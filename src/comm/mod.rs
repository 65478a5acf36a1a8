//! The communication layer: every collective and point-to-point message of
//! every strategy goes through [`Comm`], which records its category, bytes,
//! calls and time. Breakdowns therefore cannot drift from what was executed.
//!
//! A [`Transport`] moves device buffers (MPI for the CPU backend, NCCL for
//! CUDA); small host-side control messages (generated token ids) always go
//! over MPI. The in-process transport ([`sim_transport`]) runs simulated
//! ranks as threads of one process for the planner and records every
//! message. This module must not know about strategies or results files.

pub mod host;
pub mod messages;
pub mod mpi_transport;
pub mod nccl_transport;
pub mod sim_transport;

use crate::backend::Backend;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

/// Errors of the communication layer.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("message size mismatch: {0}")]
    Size(String),
    /// Groups or messages used out of order (a bug, not bad input).
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, CommError>;

/// What a message is for. The names are the results file's
/// (`docs/results-schema.md` defines each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Tensor-parallel all-reduce after row-parallel GEMMs.
    TpAllreduce,
    /// Pipeline-parallel activations (and tokens) between stages.
    PpP2p,
    /// Base root → pool ranks: the normalized hidden states of each block.
    PoolScatter,
    /// All-gather of K and V across the active pool ranks.
    KvReplication,
    /// Pool root → pool ranks: the decode step's hidden states.
    AttentionSync,
    /// Binary-tree gather (prefill) or log-sum-exp combine (decode) in the pool.
    ResultAggregation,
    /// Pool root → base root, and base root → base group, of attention output.
    PoolToBase,
    /// Token ids and other small control messages.
    Control,
}

impl Category {
    pub const ALL: [Category; 8] =
        [Category::TpAllreduce, Category::PpP2p, Category::PoolScatter, Category::KvReplication, Category::AttentionSync, Category::ResultAggregation, Category::PoolToBase, Category::Control];
    pub fn name(self) -> &'static str {
        match self {
            Category::TpAllreduce => "tp_allreduce",
            Category::PpP2p => "pp_p2p",
            Category::PoolScatter => "pool_scatter",
            Category::KvReplication => "kv_replication",
            Category::AttentionSync => "attention_sync",
            Category::ResultAggregation => "result_aggregation",
            Category::PoolToBase => "pool_to_base",
            Category::Control => "control",
        }
    }
}

/// A communicator: a named subset of the world's ranks. Plain data: the
/// transport keeps whatever it needs per group (an MPI communicator, an NCCL
/// communicator), keyed by `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// A process-unique id, the same on every member.
    pub id: usize,
    pub name: String,
    /// World ranks of the members, by group rank.
    pub world_ranks: Vec<usize>,
    rank: usize,
}

impl Group {
    pub fn new(id: usize, name: &str, world_ranks: Vec<usize>, rank: usize) -> Self {
        Self { id, name: name.to_string(), world_ranks, rank }
    }
    /// This rank's rank in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.world_ranks.len()
    }
}

/// Elements `range` of `buf`, sent to group rank `peer`.
pub struct SendPart<'a, B: Backend> {
    pub peer: usize,
    pub buf: &'a B::Buf,
    pub range: Range<usize>,
}

/// Elements `range` of the exchange's receive buffer, received from group rank `peer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvPart {
    pub peer: usize,
    pub range: Range<usize>,
}

/// The marks around one operation, on the timeline that ran it.
pub struct Timed<M> {
    pub start: M,
    pub end: M,
}

/// Moves device buffers between the ranks of a group, and small host
/// messages (token ids); creates the groups.
///
/// Each operation is blocking from the host's point of view on MPI and
/// stream-ordered on NCCL; it returns the marks around itself, from which
/// [`Comm`] accounts its time.
pub trait Transport<B: Backend> {
    fn name(&self) -> &'static str;
    /// The world as a group (collective over the world).
    fn world(&mut self, backend: &B) -> Result<Group>;
    /// Splits `parent` collectively: members passing the same `Some(color)`
    /// form one new group with id `id`, ordered by their parent rank; `None`
    /// opts out.
    fn split(&mut self, backend: &B, parent: &Group, color: Option<u32>, id: usize, name: &str) -> Result<Option<Group>>;
    fn all_reduce_sum(&self, backend: &B, group: &Group, buf: &mut B::Buf) -> Result<Timed<B::Mark>>;
    /// Every rank contributes `send` (same length on all ranks); `recv`
    /// holds `size × len(send)` elements in group-rank order.
    fn all_gather(&self, backend: &B, group: &Group, send: &B::Buf, recv: &mut B::Buf) -> Result<Timed<B::Mark>>;
    fn broadcast(&self, backend: &B, group: &Group, root: usize, buf: &mut B::Buf) -> Result<Timed<B::Mark>>;
    /// Point-to-point sends and receives issued together (an NCCL group
    /// call; non-blocking MPI completed together), so their order among
    /// themselves cannot deadlock. Receive parts are disjoint ranges of `recv`.
    fn exchange(&self, backend: &B, group: &Group, sends: &[SendPart<'_, B>], recv: Option<&mut B::Buf>, recvs: &[RecvPart]) -> Result<Timed<B::Mark>>;
    fn host_broadcast(&self, group: &Group, root: usize, data: &mut [u32]) -> Result<()>;
    fn host_send(&self, group: &Group, dst: usize, data: &[u32]) -> Result<()>;
    fn host_recv(&self, group: &Group, src: usize, data: &mut [u32]) -> Result<()>;
    /// The category [`Comm`] records the next operation or host message
    /// under. A transport that records messages (the planner's in-process
    /// transport) keeps it; the others ignore it.
    fn announce(&self, _category: Category) {}
}

/// Checks that receive parts are disjoint, within `len` elements, and
/// returns them ordered by their start.
pub fn ordered_recv_parts(parts: &[RecvPart], len: usize) -> Result<Vec<RecvPart>> {
    let mut v = parts.to_vec();
    v.sort_by_key(|p| p.range.start);
    let mut end = 0;
    for p in &v {
        if p.range.start < end || p.range.end > len || p.range.start > p.range.end {
            return Err(CommError::Size(format!("receive parts {parts:?} overlap or leave a buffer of {len} elements")));
        }
        end = p.range.end;
    }
    Ok(v)
}

/// Totals for one category on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStat {
    pub calls: u64,
    pub bytes: u64,
    pub seconds: f64,
}

struct Pending<M> {
    category: Category,
    bytes: u64,
    from: M,
    to: M,
}

/// The messages of a recorded step (see [`Comm::begin_recording`]): their
/// categories, bytes and the marks around each, which every replay records again.
pub struct RecordedMessages<M> {
    messages: Vec<Pending<M>>,
}

/// The recorded traffic of one rank since the last [`Comm::take_stats`].
struct Log<M> {
    pending: Vec<Pending<M>>,
    totals: BTreeMap<Category, CommStat>,
}

/// The one place messages go through.
pub struct Comm<'a, B: Backend> {
    backend: &'a B,
    transport: RefCell<Box<dyn Transport<B> + 'a>>,
    log: RefCell<Log<B::Mark>>,
    next_group_id: RefCell<usize>,
    heartbeat: RefCell<Option<crate::control::Heartbeat>>,
}

impl<'a, B: Backend> Comm<'a, B> {
    pub fn new(backend: &'a B, transport: Box<dyn Transport<B> + 'a>) -> Self {
        Self { backend, transport: RefCell::new(transport), log: RefCell::new(Log { pending: Vec::new(), totals: BTreeMap::new() }), next_group_id: RefCell::new(0), heartbeat: RefCell::new(None) }
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

    fn timed(&self, category: Category, bytes: usize, op: impl FnOnce(&dyn Transport<B>) -> Result<Timed<B::Mark>>) -> Result<()> {
        self.beat();
        let t = {
            let transport = self.transport.borrow();
            transport.announce(category);
            op(&**transport)?
        };
        self.beat();
        self.log.borrow_mut().pending.push(Pending { category, bytes: bytes as u64, from: t.start, to: t.end });
        Ok(())
    }

    fn bytes_of(&self, buf: &B::Buf) -> usize {
        self.backend.size_bytes(buf)
    }

    /// Bytes of `n` elements of `buf`'s type.
    fn bytes_of_elems(&self, buf: &B::Buf, n: usize) -> usize {
        self.bytes_of(buf).checked_div(self.backend.len(buf)).map_or(0, |elem| elem * n)
    }

    /// Sum-all-reduce in place. Bytes: the buffer's size.
    pub fn all_reduce(&self, category: Category, group: &Group, buf: &mut B::Buf) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let bytes = self.bytes_of(buf);
        self.timed(category, bytes, |t| t.all_reduce_sum(self.backend, group, buf))
    }

    /// All-gather of equal-sized contributions. Bytes: the gathered size.
    pub fn all_gather(&self, category: Category, group: &Group, send: &B::Buf) -> Result<B::Buf> {
        let n = self.backend.len(send);
        if group.size() == 1 {
            return Ok(self.backend.gather_rows(send, n.max(1), &[crate::backend::RowRun::new(0, usize::from(n > 0))])?);
        }
        let mut recv = self.backend.zeros(n * group.size())?;
        let bytes = self.bytes_of(&recv);
        self.timed(category, bytes, |t| t.all_gather(self.backend, group, send, &mut recv))?;
        Ok(recv)
    }

    /// Broadcast from group rank `root`. Bytes: the buffer's size.
    pub fn broadcast(&self, category: Category, group: &Group, root: usize, buf: &mut B::Buf) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let bytes = self.bytes_of(buf);
        self.timed(category, bytes, |t| t.broadcast(self.backend, group, root, buf))
    }

    /// Sends all of `buf` to group rank `dst`. Bytes: the message.
    pub fn send(&self, category: Category, group: &Group, dst: usize, buf: &B::Buf) -> Result<()> {
        let n = self.backend.len(buf);
        self.exchange(category, group, &[SendPart { peer: dst, buf, range: 0..n }], None, &[])
    }

    /// Receives exactly `len` model-dtype elements from group rank `src`.
    pub fn recv(&self, category: Category, group: &Group, src: usize, len: usize) -> Result<B::Buf> {
        let mut buf = self.backend.zeros(len)?;
        self.recv_into(category, group, src, &mut buf)?;
        Ok(buf)
    }

    /// Receives into `buf`, whose length and dtype must match the message.
    pub fn recv_into(&self, category: Category, group: &Group, src: usize, buf: &mut B::Buf) -> Result<()> {
        let n = self.backend.len(buf);
        self.exchange(category, group, &[], Some(buf), &[RecvPart { peer: src, range: 0..n }])
    }

    /// Sends and receives issued together (see [`Transport::exchange`]).
    /// Bytes: everything this rank sends and receives.
    pub fn exchange(&self, category: Category, group: &Group, sends: &[SendPart<'_, B>], recv: Option<&mut B::Buf>, recvs: &[RecvPart]) -> Result<()> {
        if sends.is_empty() && recvs.is_empty() {
            return Ok(());
        }
        let sent: usize = sends.iter().map(|p| self.bytes_of_elems(p.buf, p.range.len())).sum();
        let received: usize = match &recv {
            Some(buf) => recvs.iter().map(|p| self.bytes_of_elems(buf, p.range.len())).sum(),
            None if recvs.is_empty() => 0,
            None => return Err(CommError::Protocol("receive parts without a receive buffer".into())),
        };
        self.timed(category, sent + received, |t| t.exchange(self.backend, group, sends, recv, recvs))
    }

    fn record_host(&self, category: Category, bytes: usize, started: Instant) {
        self.beat();
        let mut log = self.log.borrow_mut();
        let stat = log.totals.entry(category).or_default();
        stat.calls += 1;
        stat.bytes += bytes as u64;
        stat.seconds += started.elapsed().as_secs_f64();
    }

    /// Broadcasts host token ids from group rank `root`.
    pub fn broadcast_tokens(&self, category: Category, group: &Group, root: usize, tokens: &mut [u32]) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let t = Instant::now();
        self.transport.borrow().announce(category);
        self.transport.borrow().host_broadcast(group, root, tokens)?;
        self.record_host(category, std::mem::size_of_val(tokens), t);
        Ok(())
    }

    pub fn send_tokens(&self, category: Category, group: &Group, dst: usize, tokens: &[u32]) -> Result<()> {
        let t = Instant::now();
        self.transport.borrow().announce(category);
        self.transport.borrow().host_send(group, dst, tokens)?;
        self.record_host(category, std::mem::size_of_val(tokens), t);
        Ok(())
    }

    pub fn recv_tokens(&self, category: Category, group: &Group, src: usize, tokens: &mut [u32]) -> Result<()> {
        let t = Instant::now();
        self.transport.borrow().announce(category);
        self.transport.borrow().host_recv(group, src, tokens)?;
        self.record_host(category, std::mem::size_of_val(tokens), t);
        Ok(())
    }

    /// Starts setting aside the messages of a step being recorded (a CUDA
    /// graph): they are not sent now, so they are accounted once per replay
    /// by [`Comm::account_replay`] instead of when issued.
    pub fn begin_recording(&self) -> usize {
        self.log.borrow().pending.len()
    }

    /// The messages issued since `begin_recording` returned `from`.
    pub fn end_recording(&self, from: usize) -> RecordedMessages<B::Mark> {
        let mut log = self.log.borrow_mut();
        let from = from.min(log.pending.len());
        RecordedMessages { messages: log.pending.split_off(from) }
    }

    /// Accounts one replay of recorded messages (waits for their marks).
    pub fn account_replay(&self, rec: &RecordedMessages<B::Mark>) -> Result<()> {
        self.beat();
        let mut log = self.log.borrow_mut();
        for p in &rec.messages {
            let secs = self.backend.elapsed_s(&p.from, &p.to)?;
            let stat = log.totals.entry(p.category).or_default();
            stat.calls += 1;
            stat.bytes += p.bytes;
            stat.seconds += secs;
        }
        Ok(())
    }

    /// Resolves pending timings and returns the totals since the last call.
    pub fn take_stats(&self) -> Result<BTreeMap<Category, CommStat>> {
        let mut log = self.log.borrow_mut();
        let pending = std::mem::take(&mut log.pending);
        for p in pending {
            let secs = self.backend.elapsed_s(&p.from, &p.to)?;
            let stat = log.totals.entry(p.category).or_default();
            stat.calls += 1;
            stat.bytes += p.bytes;
            stat.seconds += secs;
        }
        Ok(std::mem::take(&mut log.totals))
    }
}
