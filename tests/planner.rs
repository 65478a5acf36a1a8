//! The planner as users meet it: its DAGs hold exactly the messages the
//! real run records (the no-drift check, 2 and 4 ranks, every strategy; for
//! MoE the calls, and the bytes outside the routing-dependent expert
//! traffic), a MoE plan states its routing assumption,
//! the MoE plan check reports its GPU arithmetic, and bad cluster and
//! calibration files are refused naming their rule (exit 2).

mod common;
use common::*;
use fapool::comm::Category;
use fapool::planner::{self, Planner};
use fapool::results::read_run;
use fapool::spec::parse_job;
use fapool::strategy::BatchShape;
use std::collections::BTreeMap;

/// A tiny-model CPU job: categories below and above the pool threshold.
fn drift_job(strategies: &str) -> String {
    format!(
        r#"
[run]
name = "drift"
backend = "cpu"
memory_budget_gib = 1.0
warmup = false

[model]
preset = "tiny"

[workload]
sequences_per_category = 3
output_tokens = 4
batch_size = 2
seed = 5

[[workload.category]]
name = "below"
lengths = [12]

[[workload.category]]
name = "above"
lengths = [40, 56]
{strategies}"#
    )
}

const TWO_RANKS: &str = r#"
[[strategy]]
kind = "baseline"
tp = 2
pp = 1

[[strategy]]
kind = "baseline"
tp = 1
pp = 2

[[strategy]]
kind = "fapool"
base = 1
pool_max = 1
threshold = 16
tokens_per_pool_gpu = 16
"#;

const FOUR_RANKS: &str = r#"
[[strategy]]
kind = "baseline"
tp = 2
pp = 2

[[strategy]]
kind = "fapool"
base = 2
pool_max = 2
threshold = 16
tokens_per_pool_gpu = 16
partition = "zigzag"
micro_batches = 2

[[strategy]]
kind = "fapool"
name = "fapool-serial"
base = 2
pool_max = 2
threshold = 16
tokens_per_pool_gpu = 8
overlap = false
micro_batches = 2
"#;

type Counts = BTreeMap<Category, (u64, u64)>;

/// Runs the job under mpirun and compares every batch's per-rank messages
/// (calls and bytes by category) with the planner's DAG of the same batch.
fn planner_dag_has_the_runs_messages(np: usize, strategies: &str, tag: &str) {
    let dir = scratch(tag);
    let spec_text = drift_job(strategies);
    let path = job(&dir, "job", &spec_text);
    let out = dir.join("run.h5");
    let o = mpirun(np, &["run", path.to_str().unwrap(), "--backend", "cpu", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let run = read_run(&out).unwrap();
    let job = parse_job(&spec_text, &[]).unwrap();
    let cfg = job.model.resolve().unwrap();
    let cost = planner::cost_model(&job, None, None, np).unwrap();
    let p = Planner { job: &job, cfg: &cfg, cost: &cost, world: np, decode_steps: 0 };
    let mut compared = 0;
    for spec in &job.strategies {
        let stored = run.strategy(&spec.name()).expect("the strategy ran");
        for c in &stored.categories {
            for b in &c.batches {
                let shape = BatchShape { nseq: b.num_sequences as usize, seq_len: b.seq_len as usize, out_tokens: b.output_tokens as usize };
                let dag = p.point(spec, shape).unwrap().dag;
                let planned = dag.comm_by_rank();
                for r in c.ranks.iter().filter(|r| r.batch_index == b.batch_index) {
                    let measured: Counts = r.comm.iter().map(|(k, s)| (*k, (s.calls, s.bytes))).collect();
                    assert_eq!(planned[r.world_rank as usize], measured, "{} {} batch {} rank {}: planned (left) vs recorded (right)", spec.name(), c.name, b.batch_index, r.world_rank);
                    compared += 1;
                }
            }
        }
    }
    assert!(compared >= 2 * np * job.strategies.len(), "compared {compared} rank rows");
    // Beside every category's measurement: the planner's prediction of it (the CPU model here).
    for s in &run.strategies {
        for c in &s.categories {
            for name in ["ttft_s", "tpot_s", "e2e_s", "tps", "comm_share"] {
                assert!(c.predictions.get(name).is_some_and(|v| v.is_finite() && *v >= 0.0), "{} {}: no `{name}` prediction in {:?}", s.info.name, c.name, c.predictions);
            }
            assert_eq!(c.predictions.get("calibrated"), Some(&0.0));
            assert_eq!(c.prediction_notes.get("source").map(String::as_str), Some("roofline of cpu"), "what the figures assume (schema 4)");
        }
    }
    let errors = planner::predict::errors(&run);
    assert!(errors.iter().any(|e| e.quantity == "tpot_s" && e.measured.is_some() && e.error.is_some()), "{errors:?}");
    // `analyze` prints them beside the measurements, with what they rest on.
    let a = fapool(&["analyze", out.to_str().unwrap()]);
    let shown = text(&a);
    assert!(a.status.success() && shown.contains("planner prediction vs measurement"), "{shown}");
    assert!(shown.contains(&format!("  {}: source: roofline of cpu", job.strategies[0].name())), "{shown}");
}

#[test]
fn the_dag_of_two_ranks_holds_exactly_the_messages_the_run_records() {
    planner_dag_has_the_runs_messages(2, TWO_RANKS, "drift2");
}

#[test]
fn the_dag_of_four_ranks_holds_exactly_the_messages_the_run_records() {
    planner_dag_has_the_runs_messages(4, FOUR_RANKS, "drift4");
}

/// A tiny mixture-of-experts CPU job on 4 ranks: EP 4 over TP 2 × DP 2, and EP 2 over PP 2 × DP 2.
const MOE_JOB: &str = r#"
[run]
name = "moe-drift"
backend = "cpu"
memory_budget_gib = 1.0
warmup = false

[model]
preset = "tiny-moe"

[workload]
sequences_per_category = 2
output_tokens = 3
batch_size = 2
seed = 3

[[workload.category]]
name = "c"
lengths = [24]

[[strategy]]
kind = "moe"
ep = 4
tp = 2
pp = 1
dp = 2

[[strategy]]
kind = "moe"
ep = 2
tp = 1
pp = 2
dp = 2
"#;

#[test]
fn the_moe_dag_has_the_runs_calls_and_its_bytes_outside_expert_traffic() {
    // Expert traffic follows the routing, which a shape-only run assumes
    // balanced: its calls match the run's, its bytes are the balanced
    // share. Every other category matches in calls and bytes.
    let dir = scratch("moe-drift");
    let path = job(&dir, "job", MOE_JOB);
    let out = dir.join("run.h5");
    let o = mpirun(4, &["run", path.to_str().unwrap(), "--backend", "cpu", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let run = read_run(&out).unwrap();
    let job = parse_job(MOE_JOB, &[]).unwrap();
    let cfg = job.model.resolve().unwrap();
    let cost = planner::cost_model(&job, None, None, 4).unwrap();
    let p = Planner { job: &job, cfg: &cfg, cost: &cost, world: 4, decode_steps: 0 };
    let expert = [Category::ExpertDispatch, Category::ExpertCombine];
    let mut expert_calls = 0;
    for spec in &job.strategies {
        let stored = run.strategy(&spec.name()).expect("the strategy ran");
        for c in &stored.categories {
            for b in &c.batches {
                let shape = BatchShape { nseq: b.num_sequences as usize, seq_len: b.seq_len as usize, out_tokens: b.output_tokens as usize };
                let planned = p.point(spec, shape).unwrap().dag.comm_by_rank();
                for r in c.ranks.iter().filter(|r| r.batch_index == b.batch_index) {
                    let measured: Counts = r.comm.iter().map(|(k, s)| (*k, (s.calls, s.bytes))).collect();
                    let mine = &planned[r.world_rank as usize];
                    for (k, &(calls, bytes)) in measured.iter().filter(|(_, v)| v.0 > 0) {
                        let (pc, pb) = mine.get(k).copied().unwrap_or_default();
                        assert_eq!(pc, calls, "{} rank {} {}: planned calls vs recorded", spec.name(), r.world_rank, k.name());
                        if expert.contains(k) {
                            expert_calls += calls;
                        } else {
                            assert_eq!(pb, bytes, "{} rank {} {}: planned bytes vs recorded", spec.name(), r.world_rank, k.name());
                        }
                    }
                    assert!(mine.keys().all(|k| measured.get(k).is_some_and(|v| v.0 > 0)), "{} rank {}: planned categories the run did not use: {mine:?}", spec.name(), r.world_rank);
                }
            }
        }
    }
    assert!(expert_calls > 0, "the expert groups exchanged tokens");
}

#[test]
fn a_moe_plan_states_its_routing_assumption() {
    let job = repo_root().join("jobs/moe-quickstart.toml");
    let o = fapool(&["plan", job.to_str().unwrap(), "--seq", "32"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("expert routing (8 experts, top 2): balanced routing assumed"), "{t}");
    assert!(t.contains("moe-ep4-tp2-pp1-dp2") && t.contains("expert_dispatch"), "{t}");
}

#[test]
fn the_moe_plan_check_reports_its_gpu_arithmetic() {
    let plan = repo_root().join("jobs/moe-plan.toml");
    let o = fapool(&["plan", "--check", plan.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "an inconsistent plan exits 2:\n{t}");
    assert!(t.contains("world = TP x PP x DP = 2 x 2 x 8 = 32; the plan says 16 GPUs"), "{t}");
    assert!(t.contains("EP x TP x PP x SP x DP (every degree its own GPUs): 256"), "{t}");
    assert!(t.contains("TP x PP x EP (EP as the only data-parallel degree: DP = EP): 16 = the plan's 16 GPUs"), "{t}");
    assert!(t.contains("rule `plan-consistent` broken"), "{t}");
}

fn plan_fails_with(rule: &str, args: &[&str]) {
    let o = fapool(&[&["plan"], args].concat());
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "exit 2 for `{rule}`:\n{t}");
    assert!(t.contains(&format!("rule `{rule}`")), "names `{rule}`:\n{t}");
}

const CLUSTER: &str = "name = \"t\"\ngpu = \"a100-80gb-sxm\"\nnodes = 2\ngpus_per_node = 4\nnvlink_gbs = 600\nib_gbs = 25\n";

fn cluster_file(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("cluster.toml");
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn quickstart() -> String {
    repo_root().join("jobs/quickstart.toml").to_string_lossy().into_owned()
}

#[test]
fn a_cluster_file_with_an_unknown_key_is_refused() {
    let dir = scratch("cluster-key");
    let c = cluster_file(&dir, &format!("{CLUSTER}infiniband = \"hdr\"\n"));
    plan_fails_with("cluster-keys-known", &[&quickstart(), "--cluster", &c]);
}

#[test]
fn a_zero_bandwidth_is_refused() {
    let dir = scratch("cluster-bw");
    let c = cluster_file(&dir, &CLUSTER.replace("nvlink_gbs = 600", "nvlink_gbs = 0"));
    plan_fails_with("cluster-bandwidth-positive", &[&quickstart(), "--cluster", &c]);
}

#[test]
fn gpus_per_node_must_divide_the_deployment() {
    let dir = scratch("cluster-div");
    let c = cluster_file(&dir, &CLUSTER.replace("gpus_per_node = 4", "gpus_per_node = 3"));
    plan_fails_with("gpus-per-node-divides-deployment", &[&quickstart(), "--cluster", &c]);
}

#[test]
fn a_deployment_larger_than_the_cluster_is_refused() {
    let dir = scratch("cluster-size");
    let c = cluster_file(&dir, &CLUSTER.replace("nodes = 2", "nodes = 1").replace("gpus_per_node = 4", "gpus_per_node = 2"));
    plan_fails_with("deployment-fits-cluster", &[&quickstart(), "--cluster", &c]);
}

/// A calibration file with one GEMM point, in `dtype`.
fn calibration_file(dir: &std::path::Path, dtype: fapool::backend::Dtype) -> String {
    let c = planner::calibration::Calibration { dtype, backend: "cpu".into(), device: "cpu".into(), heads: 4, head_dim: 16, gemm: vec![[16.0, 64.0, 64.0, 1e-5]], ..Default::default() };
    hdf5_for_a_child(dir, "cal.h5", |p| c.write(p).unwrap()).to_string_lossy().into_owned()
}

#[test]
fn a_calibration_file_of_another_dtype_is_refused() {
    let dir = scratch("cal-dtype");
    let cal = calibration_file(&dir, fapool::backend::Dtype::Fp16);
    plan_fails_with("calibration-dtype-matches", &[&quickstart(), "--calibration", &cal]);
}

#[test]
fn a_calibration_file_of_another_schema_version_is_refused() {
    let dir = scratch("cal-version");
    let p = hdf5_for_a_child(&dir, "cal.h5", |staged| {
        let f = hdf5::File::create(staged).unwrap();
        let format: hdf5::types::VarLenUnicode = planner::calibration::FORMAT.parse().unwrap();
        f.new_attr::<hdf5::types::VarLenUnicode>().shape(()).create("format").unwrap().write_scalar(&format).unwrap();
        f.new_attr::<u64>().shape(()).create("schema_version").unwrap().write_scalar(&(planner::calibration::SCHEMA_VERSION as u64 + 1)).unwrap();
    });
    plan_fails_with("calibration-schema-version", &[&quickstart(), "--calibration", p.to_str().unwrap()]);
}

#[test]
fn a_plan_compares_the_strategies_and_writes_dags_and_timelines() {
    let dir = scratch("plan-out");
    let out = dir.to_string_lossy().into_owned();
    let o = fapool(&["plan", &quickstart(), "--seq", "24,64", "--dot", &out, "--trace", &out]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("comparison with baseline-tp2-pp2") && t.contains("crossover (4 GPUs, TPOT)"), "{t}");
    let dot = std::fs::read_to_string(dir.join("fapool-b2-p2-zigzag-s64-prefill.dot")).unwrap();
    assert!(dot.starts_with("digraph") && dot.contains("kv_replication"), "the pool's K/V all-gather is in the DAG");
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fapool-b2-p2-zigzag-s64.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["ph"] == "X" && e["cat"] == "pool_scatter" && e["pid"] == 0), "the base root's scatter is on rank 0's timeline");
    assert!(events.iter().any(|e| e["name"] == "process_name" && e["args"]["name"] == "rank 2 (pool0)"));
}

#[test]
fn a_search_reports_the_best_of_each_strategy_and_the_settings_it_could_not_vary() {
    let o = fapool(&["plan", &quickstart(), "--search", "--gpus", "4", "--seq", "64", "--vary", "no_such_setting=1,2"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("baseline:") && t.contains("fapool:") && t.contains("best"), "{t}");
    assert!(t.contains("`no_such_setting` is not a setting of baseline yet") && t.contains("`no_such_setting` is not a setting of fapool yet"), "{t}");
    assert!(t.contains("crossover (4 GPUs, TPOT)"), "{t}");
}

#[test]
fn a_run_with_a_calibration_file_of_another_dtype_stops_before_any_work() {
    let dir = scratch("run-cal");
    let cal = calibration_file(&dir, fapool::backend::Dtype::Bf16);
    let path = job(&dir, "job", &drift_job(TWO_RANKS));
    let out = dir.join("run.h5");
    let o = mpirun(2, &["run", path.to_str().unwrap(), "--backend", "cpu", "--calibration", &cal, "--out", out.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("rule `calibration-dtype-matches`") && !out.exists(), "{t}");
}
