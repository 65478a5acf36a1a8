//! The results file of a real run, read back: schema fields, the metric
//! definitions, tokens equal across strategies, and no overwriting without
//! `--force`. Also the quickstart's time budget.

mod common;
use common::*;
use fapool::results::{read_run, RunStatus};
use std::time::{Duration, Instant};

fn quickstart(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let job = repo_root().join("jobs/quickstart.toml");
    let mut args = vec!["run", job.to_str().unwrap(), "--backend", "cpu", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    mpirun(4, &args)
}

#[test]
fn the_quickstart_completes_on_4_ranks_in_under_2_minutes_and_reads_back() {
    let dir = scratch("quickstart");
    let out = dir.join("q.h5");
    let t = Instant::now();
    let o = quickstart(&out, &[]);
    let took = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(took < Duration::from_secs(120), "quickstart took {took:?}");

    let run = read_run(&out).expect("results file reads back");
    assert_eq!(run.status, Some(RunStatus::Complete));
    let p = &run.provenance;
    assert_eq!(p.schema_version, fapool::results::SCHEMA_VERSION);
    assert_eq!(p.world_size, 4);
    assert_eq!(p.backend, "cpu");
    assert!(p.job_toml.contains("[[strategy]]"));
    assert!(p.argv.iter().any(|a| a == "run"));
    assert_eq!(p.hosts.len(), 4);
    assert!(!p.mpi_library.is_empty() && !p.started_utc.is_empty());
    assert_eq!(p.categories, vec!["short", "medium", "long", "very_long"]);
    assert_eq!(run.strategies.len(), 2);

    let (base, pool) = (&run.strategies[0], &run.strategies[1]);
    assert_eq!((base.info.kind.as_str(), pool.info.kind.as_str()), ("baseline", "fapool"));
    for s in &run.strategies {
        // Roles in the provenance are what each rank reported in its rows.
        for c in &s.categories {
            for r in &c.ranks {
                let role = p.roles.iter().find(|x| x.strategy == s.info.name && x.world_rank == r.world_rank).expect("role row");
                assert_eq!(role.role, r.role);
            }
        }
    }
    for cat in &p.categories {
        let (b, f) = (base.category(cat).unwrap(), pool.category(cat).unwrap());
        // Both strategies ran the same batches and generated the same tokens.
        assert_eq!(b.batches.len(), f.batches.len());
        for (x, y) in b.batches.iter().zip(&f.batches) {
            assert_eq!((x.seq_len, x.num_sequences), (y.seq_len, y.num_sequences));
            assert_eq!(x.tokens, y.tokens, "{cat}: tokens differ between strategies");
            assert_eq!(x.itl_s.len(), x.output_tokens as usize - 1);
            assert!(x.ttft_s > 0.0 && x.e2e_s >= x.ttft_s);
        }
        for c in [b, f] {
            let s = &c.summary.as_ref().expect("summary written").summary;
            let tokens: u64 = c.batches.iter().map(|x| x.total_tokens()).sum();
            let wall: f64 = c.batches.iter().map(|x| x.e2e_s).sum();
            assert_eq!(s.total_tokens, tokens);
            assert!((s.tps - tokens as f64 / wall).abs() <= 1e-9 * s.tps, "TPS {} vs {}", s.tps, tokens as f64 / wall);
            // Every rank reported every batch; energy on CPU is not measured (not zero).
            assert_eq!(c.ranks.len(), 4 * c.batches.len());
            assert!(c.ranks.iter().all(|r| r.energy_prefill_j.is_none()));
            assert!(c.ranks.iter().any(|r| r.peak_memory_bytes.unwrap_or(0) > 0));
        }
    }
    // The pool was used above the threshold (32 tokens) and its traffic recorded.
    let long = pool.category("long").unwrap();
    assert!(long.batches.iter().all(|b| b.pool_effective == 2 && b.pool_requested == 2));
    let scatter: u64 = long.ranks.iter().map(|r| r.comm.get(&fapool::comm::Category::PoolScatter).map(|s| s.bytes).unwrap_or(0)).sum();
    let kv: u64 = long.ranks.iter().map(|r| r.comm.get(&fapool::comm::Category::KvReplication).map(|s| s.bytes).unwrap_or(0)).sum();
    assert!(scatter > 0 && kv > 0);
    assert!(pool.category("short").unwrap().batches.iter().all(|b| b.pool_effective == 0));

    let a = fapool(&["analyze", out.to_str().unwrap()]);
    let at = text(&a);
    assert!(a.status.success(), "{at}");
    assert!(at.contains("very_long") && at.contains("fapool-b2-p2-zigzag"), "{at}");
}

#[test]
fn an_existing_results_file_is_not_overwritten_without_force() {
    let dir = scratch("noforce");
    let out = dir.join("exists.h5");
    std::fs::write(&out, b"precious").unwrap();
    let o = quickstart(&out, &["--set", "workload.sequences_per_category=2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let o = quickstart(&out, &["--set", "workload.sequences_per_category=2", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read_run(&out).unwrap().status, Some(RunStatus::Complete));
}

#[test]
fn reading_energy_counters_stays_out_of_e2e_and_the_inter_token_latencies() {
    // Every energy read takes 60 ms here; E2E must still be TTFT plus the
    // inter-token latencies (what separates them is a few lines of host code).
    let dir = scratch("slow-meter");
    let out = dir.join("s.h5");
    let job = repo_root().join("jobs/quickstart.toml");
    let args = ["run", job.to_str().unwrap(), "--backend", "cpu", "--out", out.to_str().unwrap(), "--set", "workload.sequences_per_category=2", "--set", "run.warmup=false"];
    let o = mpirun_with_env(4, &["FAPOOL_TEST_METER_DELAY_MS=60"], &args);
    assert!(o.status.success(), "{}", text(&o));
    let run = read_run(&out).expect("results file reads back");
    let mut batches = 0;
    for s in &run.strategies {
        for c in &s.categories {
            for b in &c.batches {
                let gap = b.e2e_s - b.ttft_s - b.itl_s.iter().sum::<f64>();
                assert!(gap.abs() < 0.02, "{} {} batch {}: E2E - TTFT - sum(ITL) = {gap} s", s.info.name, c.name, b.batch_index);
                batches += 1;
            }
        }
    }
    assert!(batches > 0);
}

#[test]
fn a_schema_version_1_file_reads_and_refuses_to_be_continued() {
    // A real two-GPU run written before the compute and waiting times existed.
    let v1 = repo_root().join("results/gpu-2-h200x2.h5");
    let run = read_run(&v1).expect("version 1 reads");
    assert_eq!(run.provenance.schema_version, 1);
    let ranks: Vec<_> = run.strategies.iter().flat_map(|s| &s.categories).flat_map(|c| &c.ranks).collect();
    assert!(!ranks.is_empty());
    assert!(ranks.iter().all(|r| r.wait_s == 0.0 && r.compute_s == r.wall_s), "version 1 has no waiting recorded");
    let dir = scratch("v1resume");
    let copy = dir.join("old.h5");
    std::fs::copy(&v1, &copy).unwrap();
    let err = fapool::results::ResultsFile::open_existing(&copy).unwrap_err().to_string();
    assert!(err.contains("schema version 1") && err.contains("start a new file"), "{err}");
}

#[test]
fn a_schema_version_2_file_reads_without_expert_traffic_and_refuses_to_be_continued() {
    // A tiny TP=2 run on the CPU written before the expert categories existed.
    let v2 = repo_root().join("tests/data/schema-2-tiny.h5");
    let run = read_run(&v2).expect("version 2 reads");
    assert_eq!(run.provenance.schema_version, 2);
    let categories: Vec<_> = run.strategies.iter().flat_map(|s| &s.categories).collect();
    assert!(categories.iter().all(|c| c.experts.is_empty() && c.routing.is_empty()));
    let ranks: Vec<_> = categories.iter().flat_map(|c| &c.ranks).collect();
    assert!(!ranks.is_empty() && ranks.iter().all(|r| r.comm.keys().all(|k| !k.name().starts_with("expert_"))));
    assert!(ranks.iter().any(|r| r.wait_s > 0.0 && r.comm.keys().any(|k| k.name() == "tp_allreduce")), "version 2 records waiting and TP traffic");
    let dir = scratch("v2resume");
    let copy = dir.join("old.h5");
    std::fs::copy(&v2, &copy).unwrap();
    let err = fapool::results::ResultsFile::open_existing(&copy).unwrap_err().to_string();
    assert!(err.contains("schema version 2") && err.contains("start a new file"), "{err}");
}
