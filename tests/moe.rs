//! The MoE deployment's routing as the results file records it: every
//! token reaches `top_k` experts per layer, each rank's experts process
//! exactly the rows its expert group sent them, and the expert traffic's
//! bytes are those rows; with a capacity, drops are counted and the run
//! completes; a trace's expert messages are the records'; analyze shows the
//! routing and marks the plan's targets met or missed.

mod common;
use common::*;
use fapool::metrics::ExpertLoad;
use fapool::results::{read_run, CategoryData};
use std::collections::BTreeMap;

/// tiny-moe: d 64 (f32 rows of 256 bytes), 8 experts, top 2.
const ROW_BYTES: u64 = 64 * 4;
const EXPERTS: u64 = 8;
const TOP_K: u64 = 2;

/// tiny-moe under EP = 4 × TP = 2 (SP) × DP = 2 on 4 ranks: expert groups
/// span both replicas and both TP ranks of each.
fn moe_job(strategy: &str) -> String {
    format!(
        r#"
[run]
name = "moe"
backend = "cpu"
[model]
preset = "tiny-moe"
[workload]
sequences_per_category = 5
output_tokens = 4
batch_size = 3
seed = 5
[[workload.category]]
name = "short"
lengths = [13, 24]
[[strategy]]
kind = "moe"
{strategy}
"#
    )
}

/// Runs a job on 4 CPU ranks; the results file's only category.
fn run_moe(tag: &str, strategy: &str, extra: &[&str]) -> CategoryData {
    let out = run_moe_file(tag, strategy, extra);
    read_run(&out).unwrap().strategies.remove(0).categories.remove(0)
}

/// Runs a job on 4 CPU ranks and checks its results file; the file.
fn run_moe_file(tag: &str, strategy: &str, extra: &[&str]) -> std::path::PathBuf {
    let dir = scratch(tag);
    let (path, out) = (job(&dir, tag, &moe_job(strategy)), dir.join("run.h5"));
    let mut args = vec!["run", path.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = mpirun(4, &args);
    assert!(o.status.success(), "{}", text(&o));
    let check = fapool(&["check", out.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check));
    out
}

const EP4_TP2_DP2: &str = "ep = 4\ntp = 2\ndp = 2";

/// The rows of one batch and phase.
fn of(c: &CategoryData, batch: u32, decode: bool) -> Vec<&ExpertLoad> {
    c.experts.iter().filter(|l| l.batch_index == batch && l.decode == decode).collect()
}

#[test]
fn every_token_is_routed_to_top_k_experts_in_every_layer() {
    let c = run_moe("moe-routed", EP4_TP2_DP2, &[]);
    assert!(!c.batches.is_empty());
    for b in &c.batches {
        let (n, s, out) = (b.num_sequences as u64, b.seq_len as u64, b.output_tokens as u64);
        for (decode, tokens) in [(false, n * s), (true, n * (out - 1))] {
            for layer in 0..2 {
                let routed: u64 = of(&c, b.batch_index, decode).iter().filter(|l| l.layer == layer).map(|l| l.routed).sum();
                assert_eq!(routed, tokens * TOP_K, "batch {} layer {layer} decode {decode}", b.batch_index);
            }
        }
    }
}

#[test]
fn each_rank_processes_the_rows_its_expert_group_sent_its_experts_and_moves_their_bytes() {
    let c = run_moe("moe-received", EP4_TP2_DP2, &[]);
    // One expert group of all four ranks: rank r holds experts 2r and 2r + 1.
    let holder = |expert: u32| expert / 2;
    for b in &c.batches {
        let loads: Vec<&ExpertLoad> = c.experts.iter().filter(|l| l.batch_index == b.batch_index).collect();
        let mut rows_out: BTreeMap<u32, u64> = BTreeMap::new();
        let mut rows_in: BTreeMap<u32, u64> = BTreeMap::new();
        for rank in 0..4u32 {
            let sent_to_experts: u64 = loads.iter().filter(|l| holder(l.expert) == rank).map(|l| l.routed - l.dropped).sum();
            let received: u64 = loads.iter().filter(|l| l.world_rank == rank).map(|l| l.received).sum();
            assert_eq!(received, sent_to_experts, "batch {} rank {rank}", b.batch_index);
            assert!(loads.iter().all(|l| l.received == 0 || holder(l.expert) == l.world_rank), "only holders process");
            // Rows crossing ranks: sent to other ranks' experts, and received from other ranks.
            rows_out.insert(rank, loads.iter().filter(|l| l.world_rank == rank && holder(l.expert) != rank).map(|l| l.routed - l.dropped).sum());
            let own: u64 = loads.iter().filter(|l| l.world_rank == rank && holder(l.expert) == rank).map(|l| l.routed - l.dropped).sum();
            rows_in.insert(rank, received - own);
        }
        for r in c.ranks.iter().filter(|r| r.batch_index == b.batch_index) {
            let rank = r.world_rank;
            let moved = (rows_out[&rank] + rows_in[&rank]) * ROW_BYTES;
            let dispatch = r.comm.iter().find(|(k, _)| k.name() == "expert_dispatch").map(|(_, s)| *s).unwrap();
            let combine = r.comm.iter().find(|(k, _)| k.name() == "expert_combine").map(|(_, s)| *s).unwrap();
            // Each layer call: one count exchange (2 × 4 bytes × 8 experts × 3/4 of the blocks) and one of rows.
            let count_bytes = dispatch.calls / 2 * 2 * 4 * EXPERTS * 3 / 4;
            assert_eq!(dispatch.bytes, count_bytes + moved, "rank {rank} dispatch");
            assert_eq!(combine.bytes, moved, "rank {rank} combine");
        }
    }
}

#[test]
fn with_a_capacity_the_dropped_assignments_are_counted_and_the_run_completes() {
    let c = run_moe("moe-capacity", &format!("{EP4_TP2_DP2}\ncapacity_factor = 0.5"), &[]);
    let dropped: u64 = c.experts.iter().map(|l| l.dropped).sum();
    let routed: u64 = c.experts.iter().map(|l| l.routed).sum();
    // Half a balanced share each: at least half of the assignments go.
    assert!(dropped * 2 >= routed && dropped < routed, "dropped {dropped} of {routed}");
    let kept: u64 = c.experts.iter().map(|l| l.routed - l.dropped).sum();
    assert_eq!(kept, c.experts.iter().map(|l| l.received).sum::<u64>());
    assert!(c.routing.iter().any(|r| r.dropped > 0), "{:?}", c.routing);
    assert!(c.batches.iter().all(|b| b.tokens.len() == (b.num_sequences * b.output_tokens) as usize));
}

#[test]
fn without_a_capacity_nothing_is_dropped() {
    let c = run_moe("moe-no-capacity", "ep = 2\ndp = 4", &[]);
    assert!(c.experts.iter().all(|l| l.dropped == 0));
    assert!(c.routing.iter().all(|r| r.expert_imbalance() >= 1.0 && r.rank_imbalance() >= 1.0), "{:?}", c.routing);
}

#[test]
fn a_traces_expert_messages_are_the_records() {
    let dir = scratch("moe-trace");
    let (path, out, traces) = (job(&dir, "moe-trace", &moe_job(EP4_TP2_DP2)), dir.join("run.h5"), dir.join("traces"));
    let o = mpirun(4, &["run", path.to_str().unwrap(), "--out", out.to_str().unwrap(), "--trace", traces.to_str().unwrap(), "--trace-batches", "all"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = read_run(&out).unwrap();
    let (s, c) = (&run.strategies[0], &run.strategies[0].categories[0]);
    for b in &c.batches {
        let file = traces.join(format!("{}-{}-b{}.json", s.info.name, c.name, b.batch_index));
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let mut traced: BTreeMap<(u32, String), u64> = BTreeMap::new();
        let mut ops: BTreeMap<String, usize> = BTreeMap::new();
        for e in doc["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X") {
            if e["tid"].as_u64().unwrap() >= 1000 {
                *traced.entry((e["pid"].as_u64().unwrap() as u32, e["cat"].as_str().unwrap().to_string())).or_default() += e["args"]["bytes"].as_u64().unwrap();
            } else {
                *ops.entry(e["name"].as_str().unwrap().to_string()).or_default() += 1;
            }
        }
        let mut recorded: BTreeMap<(u32, String), u64> = BTreeMap::new();
        for r in c.ranks.iter().filter(|r| r.batch_index == b.batch_index) {
            for (cat, stat) in r.comm.iter().filter(|(_, s)| s.bytes > 0) {
                recorded.insert((r.world_rank, cat.name().to_string()), stat.bytes);
            }
        }
        assert!(recorded.keys().any(|k| k.1 == "expert_dispatch") && recorded.keys().any(|k| k.1 == "expert_combine"));
        assert_eq!(traced, recorded, "batch {}", b.batch_index);
        for op in ["router_top_k", "expert_slots", "permute_to_experts", "grouped_matmul", "combine_from_experts"] {
            assert!(ops.contains_key(op), "no `{op}` on the compute tracks: {ops:?}");
        }
    }
}

#[test]
fn analyze_marks_the_plans_targets_met_or_missed() {
    let out = run_moe_file("moe-targets", &format!("{EP4_TP2_DP2}\nttft_limit_s = 1000.0\ntokens_per_ms_per_gpu_target = 1e9"), &[]);
    let a = fapool(&["analyze", out.to_str().unwrap()]);
    let t = text(&a);
    assert!(a.status.success(), "{t}");
    let row = |what: &str| t.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no `{what}` row:\n{t}")).to_string();
    assert!(row("TTFT (worst batch)").ends_with("met"), "{t}");
    assert!(row("tokens/ms/GPU").ends_with("missed"), "{t}");
    assert!(t.contains("expert routing (short)") && t.contains("expert_dispatch") && t.contains("expert_combine"), "{t}");
}
