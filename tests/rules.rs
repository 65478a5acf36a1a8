//! Bad input gets a clear error naming the broken rule, with a non-zero exit,
//! before any work.

mod common;
use common::*;

const JOB: &str = r#"
[run]
backend = "cpu"
[model]
preset = "tiny"
[workload]
sequences_per_category = 2
output_tokens = 2
[[workload.category]]
name = "short"
lengths = [16]
[[strategy]]
kind = "baseline"
tp = 2
pp = 2
"#;

fn validate_fails(tag: &str, extra: &[&str], rule: &str) {
    let dir = scratch(tag);
    let path = job(&dir, tag, JOB);
    let mut args = vec!["validate", path.to_str().unwrap()];
    if !extra.contains(&"--ranks") {
        args.extend(["--ranks", "4"]);
    }
    args.extend_from_slice(extra);
    let out = fapool(&args);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains(&format!("rule `{rule}` broken")), "expected rule {rule}:\n{t}");
}

#[test]
fn a_valid_job_validates() {
    let dir = scratch("valid");
    let path = job(&dir, "valid", JOB);
    let out = fapool(&["validate", path.to_str().unwrap(), "--ranks", "4"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("parameters"));
}

#[test]
fn zero_length_sequence() {
    validate_fails("zero", &["--set", "workload.category.0.lengths=[0]"], "sequence-length-positive");
}

#[test]
fn sequence_over_max() {
    validate_fails("overmax", &["--set", "model.max_seq_len=17"], "sequence-within-max");
}

#[test]
fn heads_not_divisible_by_tp() {
    validate_fails("heads", &["--set", "model.heads=3", "--set", "model.head_dim=16"], "heads-divisible-by-tp");
}

#[test]
fn ffn_not_divisible_by_tp() {
    validate_fails("ffn", &["--set", "model.ffn=255"], "ffn-divisible-by-tp");
}

#[test]
fn layers_not_divisible_by_pp() {
    validate_fails("layers", &["--set", "model.layers=3"], "layers-divisible-by-pp");
}

#[test]
fn ranks_not_what_the_job_needs() {
    validate_fails("ranks", &["--ranks", "3"], "ranks-match-job");
}

#[test]
fn more_local_ranks_than_gpus() {
    validate_fails("gpus", &["--gpus", "2"], "one-rank-per-gpu");
}

#[test]
fn memory_estimate_does_not_fit() {
    validate_fails("memory", &["--memory-gib", "0.00001"], "memory-fits");
}

#[test]
fn unknown_key_is_named() {
    let dir = scratch("unknown");
    let path = job(&dir, "unknown", &JOB.replace("pp = 2", "pp = 2\ntpp = 3"));
    let out = fapool(&["validate", path.to_str().unwrap(), "--ranks", "4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("tpp"), "{}", text(&out));
}

#[test]
fn run_with_the_wrong_rank_count_stops_before_any_work() {
    let dir = scratch("runranks");
    let path = job(&dir, "runranks", JOB);
    let res = dir.join("out.h5");
    let out = mpirun(3, &["run", path.to_str().unwrap(), "--out", res.to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("rule `ranks-match-job` broken"), "{t}");
    assert!(!res.exists(), "no results file may be created");
}

const FAPOOL_JOB: &str = r#"
[run]
backend = "cpu"
[model]
preset = "tiny"
[workload]
sequences_per_category = 2
output_tokens = 2
[[workload.category]]
name = "short"
lengths = [16]
[[workload.category]]
name = "long"
lengths = [40, 48]
[[strategy]]
kind = "fapool"
base = 1
pool_max = 1
threshold = 32
"#;

fn fapool_validate(tag: &str, sets: &[&str]) -> (Option<i32>, String) {
    let dir = scratch(tag);
    let path = job(&dir, tag, FAPOOL_JOB);
    let mut args = vec!["validate", path.to_str().unwrap(), "--ranks", "2"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = fapool(&args);
    (out.status.code(), text(&out))
}

#[test]
fn more_chunks_than_the_shortest_pooled_prompt_are_refused() {
    // The shortest prompt the pool serves has 40 tokens; the 16-token one runs base-only.
    assert_eq!(fapool_validate("chunks-ok", &["strategy.0.chunks=40"]).0, Some(0));
    let (code, t) = fapool_validate("chunks-over", &["strategy.0.chunks=41"]);
    assert_eq!(code, Some(2), "{t}");
    assert!(t.contains("rule `chunks-within-prompt` broken") && t.contains("40 tokens"), "{t}");
}

#[test]
fn zero_chunks_are_refused() {
    let (code, t) = fapool_validate("chunks-zero", &["strategy.0.chunks=0"]);
    assert_eq!(code, Some(2), "{t}");
    assert!(t.contains("rule `chunks-positive` broken"), "{t}");
}

#[test]
fn an_unknown_pool_ops_is_refused_by_name() {
    let (code, t) = fapool_validate("pool-ops", &["strategy.0.pool_ops=\"qkv+ffn\""]);
    assert_eq!(code, Some(2), "{t}");
    assert!(t.contains("rule `pool-ops-known` broken") && t.contains("qkv+ffn"), "{t}");
}

#[test]
fn an_unknown_aggregation_is_refused_by_name() {
    let (code, t) = fapool_validate("aggregation", &["strategy.0.aggregation=\"ring\""]);
    assert_eq!(code, Some(2), "{t}");
    assert!(t.contains("ring") && t.contains("direct") && t.contains("tree"), "{t}");
}

#[test]
fn bench_sides_refuses_chunks_it_cannot_cut() {
    for (args, rule) in [(&["--chunks", "0"][..], "chunks-positive"), (&["--seq", "4", "--chunks", "8"][..], "chunks-within-prompt")] {
        let mut all = vec!["bench", "sides", "--backend", "cpu", "--model", "tiny"];
        all.extend_from_slice(args);
        let o = fapool(&all);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(rule), "{}", text(&o));
    }
}

/// tiny-moe (2 layers, 4 heads, 8 experts, top 2) under EP = 2 × DP = 2 on 2 ranks.
const MOE_JOB: &str = r#"
[run]
backend = "cpu"
[model]
preset = "tiny-moe"
[workload]
sequences_per_category = 2
output_tokens = 2
[[workload.category]]
name = "short"
lengths = [16]
[[strategy]]
kind = "moe"
ep = 2
dp = 2
"#;

fn moe_validate(tag: &str, ranks: &str, sets: &[&str]) -> (Option<i32>, String) {
    let dir = scratch(tag);
    let path = job(&dir, tag, MOE_JOB);
    let mut args = vec!["validate", path.to_str().unwrap(), "--ranks", ranks];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = fapool(&args);
    (out.status.code(), text(&out))
}

fn moe_refused(tag: &str, ranks: &str, sets: &[&str], rule: &str) {
    let (code, t) = moe_validate(tag, ranks, sets);
    assert_eq!(code, Some(2), "{t}");
    assert!(t.contains(&format!("rule `{rule}` broken")), "expected rule {rule}:\n{t}");
}

#[test]
fn a_valid_moe_job_validates_and_reports_its_experts() {
    let (code, t) = moe_validate("moe-valid", "2", &[]);
    assert_eq!(code, Some(0), "{t}");
    assert!(t.contains("8 experts, top 2"), "{t}");
}

#[test]
fn experts_not_divisible_by_ep() {
    moe_refused("moe-ep", "3", &["strategy.0.ep=3", "strategy.0.dp=3"], "experts-divisible-by-ep");
}

#[test]
fn moe_heads_not_divisible_by_tp() {
    moe_refused("moe-tp", "3", &["strategy.0.ep=1", "strategy.0.dp=1", "strategy.0.tp=3"], "heads-divisible-by-tp");
}

#[test]
fn moe_layers_not_divisible_by_pp() {
    moe_refused("moe-pp", "6", &["strategy.0.pp=3"], "layers-divisible-by-pp");
}

#[test]
fn a_world_that_does_not_match_the_moe_degrees() {
    moe_refused("moe-world", "4", &[], "ranks-match-job");
}

#[test]
fn top_k_larger_than_the_experts() {
    moe_refused("moe-topk", "2", &["model.top_k=9"], "top-k-within-experts");
}

#[test]
fn expert_groups_wider_than_a_stage() {
    moe_refused("moe-ep-stage", "2", &["strategy.0.ep=4", "strategy.0.dp=2"], "ep-divides-stage-ranks");
}

#[test]
fn a_dense_strategy_on_an_moe_model_and_back() {
    moe_refused("moe-dense-model", "2", &["model.preset=\"tiny\""], "strategy-serves-model");
    let dir = scratch("dense-on-moe");
    let path = job(&dir, "dense-on-moe", &JOB.replace("preset = \"tiny\"", "preset = \"tiny-moe\""));
    let out = fapool(&["validate", path.to_str().unwrap(), "--ranks", "4"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("rule `strategy-serves-model` broken"), "{}", text(&out));
}

#[test]
fn an_moe_run_with_a_broken_rule_stops_before_any_work() {
    let dir = scratch("moe-run-rule");
    let path = job(&dir, "moe-run-rule", MOE_JOB);
    let res = dir.join("out.h5");
    let out = mpirun(2, &["run", path.to_str().unwrap(), "--out", res.to_str().unwrap(), "--set", "model.experts=3"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("rule `experts-divisible-by-ep` broken"), "{t}");
    assert!(!res.exists(), "no results file may be created");
}
