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
mod layer;
mod log;
pub mod messages;
pub mod mpi_transport;
pub mod nccl_transport;
pub mod sim_transport;
pub mod traced;

pub use layer::{Comm, SendTo, Ticket};
pub use log::{CommStat, CommTotals, CommTrace, MessageRecord, RecordedMessages, TracedMessage, TracedWait};

use crate::backend::Backend;
use std::ops::Range;

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
    /// All-gather of sequence-sharded rows inside a TP group (FA Pool's base
    /// before its column-parallel FFN, and the last rows to the LM head).
    TpAllgather,
    /// Reduce-scatter of row-parallel partial sums back to the rows' owners
    /// inside a TP group (FA Pool's base after its FFN).
    TpReducescatter,
    /// Pipeline-parallel activations (and tokens) between stages.
    PpP2p,
    /// Base → pool ranks: each block's hidden states (or q/k/v) for attention.
    PoolScatter,
    /// All-gather of K and V across the active pool ranks.
    KvReplication,
    /// Pool root → pool ranks: a decode step's hidden states.
    AttentionSync,
    /// Binary-tree gather (prefill, `aggregation = "tree"`) or log-sum-exp
    /// combine (decode) in the pool.
    ResultAggregation,
    /// Pool → base: attention output back to the rows' owners.
    PoolToBase,
    /// Token rows to the ranks holding their experts (and the token counts
    /// that size them), inside an expert-parallel group.
    ExpertDispatch,
    /// Expert outputs back to the ranks holding their tokens.
    ExpertCombine,
    /// Token ids and other small control messages.
    Control,
}

impl Category {
    pub const ALL: [Category; 12] = [
        Category::TpAllreduce,
        Category::TpAllgather,
        Category::TpReducescatter,
        Category::PpP2p,
        Category::PoolScatter,
        Category::KvReplication,
        Category::AttentionSync,
        Category::ResultAggregation,
        Category::PoolToBase,
        Category::ExpertDispatch,
        Category::ExpertCombine,
        Category::Control,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Category::TpAllreduce => "tp_allreduce",
            Category::TpAllgather => "tp_allgather",
            Category::TpReducescatter => "tp_reducescatter",
            Category::PpP2p => "pp_p2p",
            Category::PoolScatter => "pool_scatter",
            Category::KvReplication => "kv_replication",
            Category::AttentionSync => "attention_sync",
            Category::ResultAggregation => "result_aggregation",
            Category::PoolToBase => "pool_to_base",
            Category::ExpertDispatch => "expert_dispatch",
            Category::ExpertCombine => "expert_combine",
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

/// The marks around one operation, on the timeline that ran it, and the
/// point the compute timeline waits for to use its result.
pub struct Timed<M> {
    pub start: M,
    pub end: M,
    /// The operation's completion as a dependency (on a GPU a plain event
    /// on the message's stream; `end` may be a timing node of a recording,
    /// which orders nothing).
    pub done: M,
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
    /// Every rank contributes `send` (`size × len(recv)` elements, group-rank
    /// blocks); `recv` gets the sum of every rank's block of its own rank.
    fn reduce_scatter_sum(&self, backend: &B, group: &Group, send: &B::Buf, recv: &mut B::Buf) -> Result<Timed<B::Mark>>;
    /// Point-to-point sends and receives issued together (an NCCL group
    /// call; non-blocking MPI completed together), so their order among
    /// themselves cannot deadlock. Receive parts are disjoint ranges of `recv`.
    fn exchange(&self, backend: &B, group: &Group, sends: &[SendPart<'_, B>], recv: Option<&mut B::Buf>, recvs: &[RecvPart]) -> Result<Timed<B::Mark>>;
    /// All-to-all with counts per peer: block `p` of `send` (`send_counts[p]`
    /// elements, blocks in group-rank order) goes to group rank `p`, and
    /// `recv` gets block `p` (`recv_counts[p]` elements) from rank `p`,
    /// this rank's own block included. By default one [`Transport::exchange`]
    /// (an NCCL group of sends and receives); MPI overrides it with
    /// `MPI_Alltoallv`.
    fn all_to_all_v(&self, backend: &B, group: &Group, send: &B::Buf, send_counts: &[usize], recv: &mut B::Buf, recv_counts: &[usize]) -> Result<Timed<B::Mark>> {
        if send_counts.len() != group.size() || recv_counts.len() != group.size() {
            return Err(CommError::Size(format!("all_to_all_v on `{}` of {} ranks: {} send and {} receive counts", group.name, group.size(), send_counts.len(), recv_counts.len())));
        }
        let blocks = |counts: &[usize]| -> Vec<Range<usize>> {
            let mut at = 0;
            counts
                .iter()
                .map(|&n| {
                    at += n;
                    at - n..at
                })
                .collect()
        };
        let sends: Vec<SendPart<'_, B>> = blocks(send_counts).into_iter().enumerate().filter(|(_, r)| !r.is_empty()).map(|(peer, range)| SendPart { peer, buf: send, range }).collect();
        let recvs: Vec<RecvPart> = blocks(recv_counts).into_iter().enumerate().filter(|(_, r)| !r.is_empty()).map(|(peer, range)| RecvPart { peer, range }).collect();
        self.exchange(backend, group, &sends, Some(recv), &recvs)
    }
    fn host_broadcast(&self, group: &Group, root: usize, data: &mut [u32]) -> Result<()>;
    fn host_send(&self, group: &Group, dst: usize, data: &[u32]) -> Result<()>;
    fn host_recv(&self, group: &Group, src: usize, data: &mut [u32]) -> Result<()>;
    /// Host all-to-all: `send` holds `size` equal blocks, block `p` for group
    /// rank `p`; `recv` (as long) gets block `p` from rank `p`. By default
    /// pairwise blocking messages in an order that cannot deadlock (each
    /// rank meets its peers in ascending order, the lower rank sending
    /// first); MPI overrides it with `MPI_Alltoall`.
    fn host_all_to_all(&self, group: &Group, send: &[u32], recv: &mut [u32]) -> Result<()> {
        let (n, me) = (group.size(), group.rank());
        if send.len() != recv.len() || send.len() % n != 0 {
            return Err(CommError::Size(format!("host_all_to_all on `{}` of {n} ranks: {} sent, {} received", group.name, send.len(), recv.len())));
        }
        let per = send.len() / n;
        recv[me * per..(me + 1) * per].copy_from_slice(&send[me * per..(me + 1) * per]);
        for peer in (0..n).filter(|&p| p != me) {
            let (out, into) = (&send[peer * per..(peer + 1) * per], peer * per..(peer + 1) * per);
            if me < peer {
                self.host_send(group, peer, out)?;
                self.host_recv(group, peer, &mut recv[into])?;
            } else {
                self.host_recv(group, peer, &mut recv[into])?;
                self.host_send(group, peer, out)?;
            }
        }
        Ok(())
    }
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
