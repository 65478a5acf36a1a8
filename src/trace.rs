//! Timelines as Chrome/Perfetto trace JSON (the "Trace Event Format"):
//! one complete event (`"ph": "X"`) per operation or message, with its name,
//! category, start and duration in microseconds, `pid` = world rank, `tid` =
//! stream, and `args` (shape, FLOPs, bytes, peer, category, ...), plus
//! metadata events naming each process (rank and role) and thread
//! (stream). `fapool plan --trace` writes predicted timelines with it and a
//! measured timeline uses the same writer, so the two open side by side in
//! Perfetto or chrome://tracing.
//!
//! This module formats events; it measures and predicts nothing.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// One operation or message on one rank's stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    /// What kind of work: `compute`, a communication category, `wait`.
    pub cat: String,
    pub start_us: f64,
    pub dur_us: f64,
    /// World rank.
    pub pid: usize,
    /// Stream.
    pub tid: u32,
    pub args: BTreeMap<String, Value>,
}

/// A whole timeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    pub events: Vec<Event>,
    processes: BTreeMap<usize, String>,
    threads: BTreeMap<(usize, u32), String>,
}

/// The suite's stream names: 0 computes, 1 communicates.
pub fn stream_name(tid: u32) -> String {
    match tid {
        0 => "compute".into(),
        1 => "comm".into(),
        n => format!("stream{n}"),
    }
}

impl Trace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Names rank `pid` (e.g. "rank 3 pool1").
    pub fn name_process(&mut self, pid: usize, name: &str) {
        self.processes.insert(pid, name.to_string());
    }

    /// Names stream `tid` of rank `pid`.
    pub fn name_thread(&mut self, pid: usize, tid: u32, name: &str) {
        self.threads.insert((pid, tid), name.to_string());
    }

    pub fn push(&mut self, e: Event) {
        self.threads.entry((e.pid, e.tid)).or_insert_with(|| stream_name(e.tid));
        self.events.push(e);
    }

    /// The trace as JSON: `{"traceEvents": [...], "displayTimeUnit": "ms"}`.
    pub fn to_json(&self) -> Value {
        let mut out: Vec<Value> = Vec::with_capacity(self.events.len() + self.processes.len() + self.threads.len());
        for (pid, name) in &self.processes {
            out.push(json!({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}));
            out.push(json!({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}));
        }
        for ((pid, tid), name) in &self.threads {
            out.push(json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}));
        }
        for e in &self.events {
            let args: Map<String, Value> = e.args.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            out.push(json!({"name": e.name, "cat": e.cat, "ph": "X", "ts": e.start_us, "dur": e.dur_us, "pid": e.pid, "tid": e.tid, "args": args}));
        }
        json!({"traceEvents": out, "displayTimeUnit": "ms"})
    }

    /// Writes the JSON to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string(&self.to_json()).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_names_follow_the_trace_event_format() {
        let mut t = Trace::new();
        t.name_process(1, "rank 1 pool0");
        t.push(Event { name: "matmul".into(), cat: "compute".into(), start_us: 10.0, dur_us: 2.5, pid: 1, tid: 0, args: [("m".to_string(), json!(64))].into() });
        let v = t.to_json();
        let ev = v["traceEvents"].as_array().unwrap();
        let x = ev.iter().find(|e| e["ph"] == "X").unwrap();
        assert_eq!((x["ts"].as_f64(), x["dur"].as_f64(), x["pid"].as_u64(), x["args"]["m"].as_u64()), (Some(10.0), Some(2.5), Some(1), Some(64)));
        assert!(ev.iter().any(|e| e["name"] == "process_name" && e["args"]["name"] == "rank 1 pool0"));
        assert!(ev.iter().any(|e| e["name"] == "thread_name" && e["args"]["name"] == "compute"));
    }
}
