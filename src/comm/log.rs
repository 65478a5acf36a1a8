//! The record of one rank's traffic: every message with its category,
//! bytes, peers and the marks around it, and the time the compute timeline
//! spent waiting for messages. Totals per category go to the results file;
//! the messages themselves to traces.

use super::Category;
use crate::backend::Backend;
use std::collections::BTreeMap;

/// Totals for one category on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStat {
    pub calls: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// One message as issued: what it was and the marks around it on the
/// timeline (stream) that ran it.
pub struct MessageRecord<M> {
    pub category: Category,
    /// The operation, e.g. `exchange`, `all_gather`, `reduce_scatter`.
    pub op: &'static str,
    /// The group's name and id (the timeline a GPU runs it on).
    pub group: String,
    pub group_id: usize,
    /// Group ranks this rank sent to and received from.
    pub peers: Vec<usize>,
    pub bytes: u64,
    /// The message held the compute timeline while it ran (blocking MPI):
    /// all of its time was waiting.
    pub blocks_compute: bool,
    pub from: M,
    pub to: M,
}

/// A stretch of time the compute timeline waited for a message.
pub struct WaitRecord<M> {
    pub category: Category,
    pub from: M,
    pub to: M,
}

/// What one rank's traffic added up to since the last [`super::Comm::take_stats`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommTotals {
    pub by_category: BTreeMap<Category, CommStat>,
    /// Seconds the compute timeline waited for messages.
    pub wait_s: f64,
}

/// The messages of a recorded step (see [`super::Comm::begin_recording`]):
/// their categories, bytes and the marks around each, which every replay
/// records again.
pub struct RecordedMessages<M> {
    pub(super) messages: Vec<MessageRecord<M>>,
    pub(super) waits: Vec<WaitRecord<M>>,
}

/// A resolved message of a traced batch: seconds from the batch's start.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedMessage {
    pub category: Category,
    pub op: &'static str,
    pub group: String,
    pub group_id: usize,
    pub peers: Vec<usize>,
    pub bytes: u64,
    pub start_s: f64,
    pub end_s: f64,
}

/// A resolved wait of a traced batch: seconds from the batch's start.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedWait {
    pub category: Category,
    pub start_s: f64,
    pub end_s: f64,
}

/// Everything a traced batch's messages and waits were.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommTrace {
    pub messages: Vec<TracedMessage>,
    pub waits: Vec<TracedWait>,
}

/// One rank's log.
pub(super) struct Log<M> {
    pub pending: Vec<MessageRecord<M>>,
    pub waits: Vec<WaitRecord<M>>,
    pub totals: CommTotals,
    /// While a batch is traced: its start and what was resolved so far.
    pub trace: Option<(M, CommTrace)>,
}

impl<M> Default for Log<M> {
    fn default() -> Self {
        Self { pending: Vec::new(), waits: Vec::new(), totals: CommTotals::default(), trace: None }
    }
}

impl<M> Log<M> {
    /// Adds resolved messages and waits (the pending ones, or a replay's).
    pub fn resolve<B: Backend<Mark = M>>(&mut self, backend: &B, messages: &[MessageRecord<M>], waits: &[WaitRecord<M>]) -> crate::backend::Result<()> {
        for p in messages {
            let secs = backend.elapsed_s(&p.from, &p.to)?;
            let stat = self.totals.by_category.entry(p.category).or_default();
            stat.calls += 1;
            stat.bytes += p.bytes;
            stat.seconds += secs;
            if p.blocks_compute {
                self.totals.wait_s += secs;
            }
            if let Some((origin, t)) = &mut self.trace {
                let start_s = backend.elapsed_s(origin, &p.from)?;
                t.messages.push(TracedMessage { category: p.category, op: p.op, group: p.group.clone(), group_id: p.group_id, peers: p.peers.clone(), bytes: p.bytes, start_s, end_s: start_s + secs });
                if p.blocks_compute {
                    t.waits.push(TracedWait { category: p.category, start_s, end_s: start_s + secs });
                }
            }
        }
        for w in waits {
            let secs = backend.elapsed_s(&w.from, &w.to)?;
            self.totals.wait_s += secs;
            if let Some((origin, t)) = &mut self.trace {
                let start_s = backend.elapsed_s(origin, &w.from)?;
                t.waits.push(TracedWait { category: w.category, start_s, end_s: start_s + secs });
            }
        }
        Ok(())
    }

    /// Resolves everything pending.
    pub fn resolve_pending<B: Backend<Mark = M>>(&mut self, backend: &B) -> crate::backend::Result<()> {
        let (messages, waits) = (std::mem::take(&mut self.pending), std::mem::take(&mut self.waits));
        self.resolve(backend, &messages, &waits)
    }
}
