//! What the in-process transport records of each call it makes: the kind,
//! category, group, bytes as `Comm` counts them, the parts of a
//! point-to-point call with the ids that join sends to receives, the id that
//! joins a collective's members, and the buffers read and written. Plain
//! data for the planner's DAG.

use super::Category;
use crate::backend::shape::BufRef;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// What a transport call was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    AllReduce,
    AllGather,
    Broadcast {
        root: usize,
    },
    ReduceScatter,
    /// Point-to-point sends and receives issued together.
    Exchange,
    /// Blocks of rows to and from every peer of the group (its own block
    /// stays in place): point-to-point parts, like an exchange.
    AllToAll,
    HostBroadcast {
        root: usize,
    },
    HostSend,
    HostRecv,
    /// Token counts to and from every peer of the group (host memory).
    HostAllToAll,
}

impl MessageKind {
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::AllReduce => "all_reduce",
            MessageKind::AllGather => "all_gather",
            MessageKind::Broadcast { .. } => "broadcast",
            MessageKind::ReduceScatter => "reduce_scatter",
            MessageKind::Exchange => "send_recv",
            MessageKind::AllToAll => "all_to_all",
            MessageKind::HostBroadcast { .. } => "host_broadcast",
            MessageKind::HostSend => "host_send",
            MessageKind::HostRecv => "host_recv",
            MessageKind::HostAllToAll => "host_all_to_all",
        }
    }
    /// A collective over the whole group (the others are point-to-point).
    pub fn is_collective(self) -> bool {
        matches!(self, MessageKind::AllReduce | MessageKind::AllGather | MessageKind::Broadcast { .. } | MessageKind::ReduceScatter | MessageKind::HostBroadcast { .. })
    }
    /// Point-to-point parts joined by message ids (sends and receives).
    pub fn has_parts(self) -> bool {
        matches!(self, MessageKind::Exchange | MessageKind::AllToAll | MessageKind::HostSend | MessageKind::HostRecv | MessageKind::HostAllToAll)
    }
    /// Token ids in host memory rather than a device buffer.
    pub fn is_host(self) -> bool {
        matches!(self, MessageKind::HostBroadcast { .. } | MessageKind::HostSend | MessageKind::HostRecv | MessageKind::HostAllToAll)
    }
}

/// One message of a point-to-point call: its peer and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// World rank of the peer.
    pub peer: usize,
    /// Joins a send to its receive (unique in the simulation).
    pub message: u64,
    /// Bytes this side moves.
    pub bytes: u64,
    /// Receives: bytes the matched send carried (differs only in a broken job).
    pub sent_bytes: u64,
    /// Row width of the sent buffer, where known.
    pub cols: Option<usize>,
}

/// One transport call on one rank.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageRecord {
    pub category: Option<Category>,
    pub kind: MessageKind,
    /// The group's name and world ranks (in group-rank order), shared by
    /// every record of the group.
    pub group: Arc<str>,
    pub group_ranks: Arc<[usize]>,
    /// Bytes as [`super::Comm`] counts the call (see `docs/design.md`).
    pub bytes: u64,
    /// Collectives: joins the members' calls (unique in the simulation).
    pub collective: Option<u64>,
    pub sends: Vec<Part>,
    pub recvs: Vec<Part>,
    pub inputs: Vec<BufRef>,
    pub outputs: Vec<BufRef>,
    /// 0: the compute stream (host messages, and every message where they
    /// hold it); else the group's own stream ([`group_stream`]).
    pub stream: u32,
}

/// The stream of group `id`'s device messages on a GPU, where every
/// communicator has a stream of its own (as trace files number their
/// message threads: 1000 + the group's id).
pub fn group_stream(id: usize) -> u32 {
    1000 + id as u32
}

/// A rank's message records, shared between its transport and whoever
/// collects them after the run.
pub type MessageLog = Rc<RefCell<Vec<MessageRecord>>>;
