//! `fapool run --trace DIR`: the timeline of chosen batches as a
//! Chrome/Perfetto trace (JSON that ui.perfetto.dev and chrome://tracing
//! open), one file per traced batch with every rank.
//!
//! Each rank is a process (`pid` = world rank, named with its role) and
//! each of its timelines a thread: `compute` (tid 0) holds every operation
//! the backend ran — name, shape, FLOPs or bytes — and every stretch the
//! compute timeline waited for a message (`wait <category>`); each group's
//! messages are on a thread of their own (tid 1000 + group id; on a GPU the
//! group's stream), with their category, bytes and peers. Times are
//! microseconds from the rank's own start of the batch (ranks start each
//! batch together, after a barrier). Host-side control messages (token ids)
//! are counted in the `control` category but are not on a device timeline.

use crate::backend::traced::TracedOp;
use crate::comm::CommTrace;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Which batches `--trace` records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceBatches {
    /// Every batch.
    All,
    /// The last batch of each category (its longest sequences).
    Last,
    /// The listed `(category, batch index)` pairs.
    Listed(Vec<(String, usize)>),
}

impl std::str::FromStr for TraceBatches {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(TraceBatches::All),
            "last" => Ok(TraceBatches::Last),
            list => list
                .split(',')
                .map(|item| {
                    let (c, i) = item.rsplit_once('/').ok_or_else(|| format!("--trace-batches {item}: expected all, last or CATEGORY/INDEX[,...]"))?;
                    let i = i.parse().map_err(|_| format!("--trace-batches {item}: `{i}` is not a batch index"))?;
                    Ok((c.to_string(), i))
                })
                .collect::<Result<Vec<_>, String>>()
                .map(TraceBatches::Listed),
        }
    }
}

/// Where traces go and which batches.
#[derive(Clone, Debug)]
pub struct TraceSpec {
    pub dir: PathBuf,
    pub batches: TraceBatches,
}

impl TraceSpec {
    /// Whether batch `index` of `category` (of `count` batches) is traced.
    pub fn wants(&self, category: &str, index: usize, count: usize) -> bool {
        match &self.batches {
            TraceBatches::All => true,
            TraceBatches::Last => index + 1 == count,
            TraceBatches::Listed(v) => v.iter().any(|(c, i)| c == category && *i == index),
        }
    }
}

/// Thread id of a group's message timeline.
pub fn message_tid(group_id: usize) -> usize {
    1000 + group_id
}

fn us(s: f64) -> f64 {
    s * 1e6
}

/// One rank's events of a traced batch.
pub fn rank_events(rank: usize, role: &str, ops: &[TracedOp], comm: &CommTrace) -> Vec<Value> {
    let mut ev = vec![
        json!({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": format!("rank {rank} ({role})")}}),
        json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}}),
    ];
    let mut named = std::collections::BTreeSet::new();
    for m in &comm.messages {
        if named.insert(m.group_id) {
            ev.push(json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": message_tid(m.group_id), "args": {"name": format!("messages {}", m.group)}}));
        }
    }
    for op in ops {
        ev.push(json!({"name": op.name, "cat": "compute", "ph": "X", "pid": rank, "tid": 0, "ts": us(op.start_s), "dur": us(op.end_s - op.start_s), "args": {"shape": op.shape, "flops": op.flops, "bytes": op.bytes}}));
    }
    for m in &comm.messages {
        ev.push(json!({
            "name": format!("{} {}", m.op, m.category.name()),
            "cat": m.category.name(),
            "ph": "X",
            "pid": rank,
            "tid": message_tid(m.group_id),
            "ts": us(m.start_s),
            "dur": us(m.end_s - m.start_s),
            "args": {"category": m.category.name(), "bytes": m.bytes, "peers": m.peers, "group": m.group}
        }));
    }
    for w in &comm.waits {
        ev.push(json!({"name": format!("wait {}", w.category.name()), "cat": "wait", "ph": "X", "pid": rank, "tid": 0, "ts": us(w.start_s), "dur": us(w.end_s - w.start_s), "args": {"category": w.category.name()}}));
    }
    ev
}

/// Gathers every rank's events to world rank 0, which writes the trace
/// file `path` (collective over the MPI world; outside any timed region).
pub fn gather_and_write(world: &SimpleCommunicator, mine: Vec<Value>, path: &Path, about: Value) -> std::io::Result<()> {
    let text = serde_json::to_string(&mine).map_err(std::io::Error::other)?;
    if world.rank() != 0 {
        world.process_at_rank(0).send(text.as_bytes());
        return Ok(());
    }
    let mut events = mine;
    for r in 1..world.size() {
        let (bytes, _) = world.process_at_rank(r).receive_vec::<u8>();
        let theirs: Vec<Value> = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
        events.extend(theirs);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let doc = json!({"traceEvents": events, "displayTimeUnit": "ms", "otherData": about});
    std::fs::write(path, serde_json::to_vec(&doc).map_err(std::io::Error::other)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_to_trace_parse_and_choose() {
        let spec = |b: &str| TraceSpec { dir: PathBuf::from("t"), batches: b.parse().unwrap() };
        assert!(spec("last").wants("long", 2, 3) && !spec("last").wants("long", 1, 3));
        assert!(spec("all").wants("short", 0, 5));
        let listed = spec("long/0,very_long/3");
        assert!(listed.wants("long", 0, 9) && listed.wants("very_long", 3, 9) && !listed.wants("long", 3, 9));
        assert!("long".parse::<TraceBatches>().is_err() && "long/x".parse::<TraceBatches>().is_err());
    }
}
