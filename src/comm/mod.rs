//! The communication layer: every collective and point-to-point message of
//! every strategy goes through [`Comm`], which records its category, bytes,
//! calls and time. Breakdowns therefore cannot drift from what was executed.
//!
//! A [`Transport`] moves device buffers (MPI for the CPU backend, NCCL for
//! CUDA); small host-side control messages (generated token ids) always go
//! over MPI. This module must not know about strategies or results files.

pub mod mpi_transport;
pub mod nccl_transport;

use crate::backend::Backend;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::cell::RefCell;
use std::collections::BTreeMap;
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

/// A communicator: a named subset of the world's ranks.
pub struct Group {
    /// A process-unique id (the transport keys its own communicators by it).
    pub id: usize,
    pub name: String,
    pub comm: SimpleCommunicator,
    /// World ranks of the members, by group rank.
    pub world_ranks: Vec<usize>,
}

impl Group {
    pub fn rank(&self) -> usize {
        self.comm.rank() as usize
    }
    pub fn size(&self) -> usize {
        self.comm.size() as usize
    }
}

/// Moves device buffers between the ranks of a group.
///
/// Each operation is blocking from the host's point of view on MPI and
/// stream-ordered on NCCL; [`Comm`] times it with backend marks either way.
pub trait Transport<B: Backend> {
    fn name(&self) -> &'static str;
    /// Called collectively by every member when a group is created.
    fn attach(&mut self, backend: &B, group: &Group) -> Result<()>;
    fn all_reduce_sum(&self, backend: &B, group: &Group, buf: &mut B::Buf) -> Result<()>;
    /// Every rank contributes `send` (same length on all ranks); `recv`
    /// holds `size × len(send)` elements in group-rank order.
    fn all_gather(&self, backend: &B, group: &Group, send: &B::Buf, recv: &mut B::Buf) -> Result<()>;
    fn broadcast(&self, backend: &B, group: &Group, root: usize, buf: &mut B::Buf) -> Result<()>;
    fn send(&self, backend: &B, group: &Group, dst: usize, buf: &B::Buf) -> Result<()>;
    fn recv(&self, backend: &B, group: &Group, src: usize, buf: &mut B::Buf) -> Result<()>;
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
        let c = match color {
            Some(c) => Color::with_value(c as i32),
            None => Color::undefined(),
        };
        let Some(comm) = parent.comm.split_by_color(c) else {
            return Ok(None);
        };
        let me = parent.world_ranks[parent.rank()] as u64;
        let mut ranks = vec![0u64; comm.size() as usize];
        comm.all_gather_into(&me, &mut ranks[..]);
        let group = Group { id, name: name.to_string(), comm, world_ranks: ranks.into_iter().map(|r| r as usize).collect() };
        self.transport.borrow_mut().attach(self.backend, &group)?;
        Ok(Some(group))
    }

    /// Wraps the world communicator as a group (collective over the world).
    pub fn world_group(&self, world: SimpleCommunicator) -> Result<Group> {
        let n = world.size() as usize;
        let group = Group { id: 0, name: "world".into(), comm: world, world_ranks: (0..n).collect() };
        self.transport.borrow_mut().attach(self.backend, &group)?;
        Ok(group)
    }

    fn timed(&self, category: Category, bytes: usize, op: impl FnOnce(&dyn Transport<B>) -> Result<()>) -> Result<()> {
        self.beat();
        let from = self.backend.mark()?;
        op(&**self.transport.borrow())?;
        let to = self.backend.mark()?;
        self.beat();
        self.log.borrow_mut().pending.push(Pending { category, bytes: bytes as u64, from, to });
        Ok(())
    }

    fn bytes_of(&self, buf: &B::Buf) -> usize {
        self.backend.size_bytes(buf)
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
        let mut recv = self.backend.zeros(n * group.size())?;
        if group.size() == 1 {
            return Ok(self.backend.gather_rows(send, n.max(1), &[crate::backend::RowRun::new(0, usize::from(n > 0))])?);
        }
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

    pub fn send(&self, category: Category, group: &Group, dst: usize, buf: &B::Buf) -> Result<()> {
        let bytes = self.bytes_of(buf);
        self.timed(category, bytes, |t| t.send(self.backend, group, dst, buf))
    }

    /// Receives exactly `len` model-dtype elements from group rank `src`.
    pub fn recv(&self, category: Category, group: &Group, src: usize, len: usize) -> Result<B::Buf> {
        let mut buf = self.backend.zeros(len)?;
        self.recv_into(category, group, src, &mut buf)?;
        Ok(buf)
    }

    /// Receives into `buf`, whose length and dtype must match the message.
    pub fn recv_into(&self, category: Category, group: &Group, src: usize, buf: &mut B::Buf) -> Result<()> {
        let bytes = self.bytes_of(buf);
        self.timed(category, bytes, |t| t.recv(self.backend, group, src, buf))
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
    pub fn broadcast_tokens(&self, category: Category, group: &Group, root: usize, tokens: &mut [u32]) {
        if group.size() == 1 {
            return;
        }
        let t = Instant::now();
        group.comm.process_at_rank(root as i32).broadcast_into(tokens);
        self.record_host(category, std::mem::size_of_val(tokens), t);
    }

    pub fn send_tokens(&self, category: Category, group: &Group, dst: usize, tokens: &[u32]) {
        let t = Instant::now();
        group.comm.process_at_rank(dst as i32).send(tokens);
        self.record_host(category, std::mem::size_of_val(tokens), t);
    }

    pub fn recv_tokens(&self, category: Category, group: &Group, src: usize, tokens: &mut [u32]) {
        let t = Instant::now();
        group.comm.process_at_rank(src as i32).receive_into(tokens);
        self.record_host(category, std::mem::size_of_val(tokens), t);
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
