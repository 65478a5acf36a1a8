//! `fapool run --trace DIR` writes a Chrome/Perfetto trace of the chosen
//! batches: JSON with a track per rank and timeline (compute, and each
//! group's messages), intervals that do not cross on any track, and the
//! same message bytes per category as the results file's records of that
//! batch; and every rank row has its compute and waiting time.

mod common;
use common::*;
use fapool::results::read_run;
use std::collections::{BTreeMap, BTreeSet};

fn quickstart_job() -> String {
    repo_root().join("jobs/quickstart.toml").to_string_lossy().into_owned()
}

/// Runs the quickstart with `--trace` and returns (results file, trace dir).
fn traced_run(tag: &str, batches: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(tag);
    let (out, traces) = (dir.join("run.h5"), dir.join("traces"));
    let o = mpirun(
        4,
        &["run", &quickstart_job(), "--backend", "cpu", "--out", out.to_str().unwrap(), "--trace", traces.to_str().unwrap(), "--trace-batches", batches, "--set", "workload.sequences_per_category=6"],
    );
    assert!(o.status.success(), "{}", text(&o));
    (out, traces)
}

fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    doc["traceEvents"].as_array().expect("a traceEvents array").clone()
}

#[test]
fn a_trace_has_a_named_track_per_rank_and_timeline_whose_intervals_do_not_cross() {
    let (_, traces) = traced_run("trace-tracks", "long/1");
    let file = traces.join("fapool-b2-p2-zigzag-long-b1.json");
    let ev = events(&file);
    let processes: BTreeSet<u64> = ev.iter().filter(|e| e["name"] == "process_name").map(|e| e["pid"].as_u64().unwrap()).collect();
    assert_eq!(processes, (0..4).collect(), "one process per rank");
    let named: BTreeSet<(u64, u64)> = ev.iter().filter(|e| e["name"] == "thread_name").map(|e| (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap())).collect();
    let mut tracks: BTreeMap<(u64, u64), Vec<(f64, f64)>> = BTreeMap::new();
    for e in ev.iter().filter(|e| e["ph"] == "X") {
        let key = (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap());
        assert!(named.contains(&key), "track {key:?} has no name");
        let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
        assert!(ts >= 0.0 && dur >= 0.0, "{e}");
        tracks.entry(key).or_default().push((ts, ts + dur));
    }
    // Every rank computes; the base and pool ranks exchange on their bridges.
    for rank in 0..4 {
        assert!(tracks.contains_key(&(rank, 0)), "rank {rank} has no compute track");
        assert!(tracks.keys().any(|&(p, t)| p == rank && t >= 1000), "rank {rank} has no message track");
    }
    let names: BTreeSet<&str> = ev.iter().filter(|e| e["ph"] == "X").filter_map(|e| e["name"].as_str()).collect();
    for op in ["matmul", "attention_prefill", "rmsnorm", "exchange pool_scatter", "exchange pool_to_base", "all_gather kv_replication"] {
        assert!(names.contains(op), "no `{op}` in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("wait ")), "waiting is shown");
    // Intervals on one track are disjoint or nested (a microsecond of rounding allowed).
    for (key, mut spans) in tracks {
        spans.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        let mut open: Vec<f64> = Vec::new();
        for (s, e) in spans {
            while open.last().is_some_and(|&end| end <= s + 1.0) {
                open.pop();
            }
            if let Some(&end) = open.last() {
                assert!(e <= end + 1.0, "track {key:?}: [{s}, {e}] crosses an interval ending at {end}");
            }
            open.push(e);
        }
    }
}

#[test]
fn a_traces_message_bytes_are_the_results_files_records() {
    let (out, traces) = traced_run("trace-bytes", "last");
    let run = read_run(&out).unwrap();
    for s in &run.strategies {
        for c in &s.categories {
            let last = c.batches.last().unwrap().batch_index;
            let file = traces.join(format!("{}-{}-b{last}.json", s.info.name, c.name));
            let mut traced: BTreeMap<(u32, String), u64> = BTreeMap::new();
            for e in events(&file).iter().filter(|e| e["ph"] == "X" && e["tid"].as_u64().unwrap() >= 1000) {
                *traced.entry((e["pid"].as_u64().unwrap() as u32, e["cat"].as_str().unwrap().to_string())).or_default() += e["args"]["bytes"].as_u64().unwrap();
            }
            let mut recorded: BTreeMap<(u32, String), u64> = BTreeMap::new();
            for r in c.ranks.iter().filter(|r| r.batch_index == last) {
                for (cat, stat) in &r.comm {
                    // Token ids on the host included: every message is on the trace.
                    if stat.bytes > 0 {
                        recorded.insert((r.world_rank, cat.name().to_string()), stat.bytes);
                    }
                }
            }
            assert!(!recorded.is_empty());
            assert_eq!(traced, recorded, "{} {}", s.info.name, c.name);
        }
    }
}

#[test]
fn rank_rows_record_compute_and_waiting_time() {
    let (out, _) = traced_run("trace-rows", "last");
    let run = read_run(&out).unwrap();
    let pool = run.strategy("fapool-b2-p2-zigzag").unwrap().category("long").unwrap();
    for r in &pool.ranks {
        if r.active {
            assert!((r.compute_s + r.wait_s - r.wall_s).abs() < 1e-9, "{r:?}");
            assert!(r.wait_s > 0.0 && r.compute_s > 0.0, "{r:?}");
            assert!(r.idle_share() > 0.0 && r.idle_share() < 1.0);
        } else {
            assert_eq!(r.idle_share(), 1.0);
        }
    }
}
