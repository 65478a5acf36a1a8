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
