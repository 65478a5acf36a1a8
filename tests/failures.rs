//! A failure in the middle of a run ends every rank with the exit code of its
//! kind (4: a CUDA/cuBLAS/NVRTC error, 5: an NCCL error), whichever rank it
//! hits, and loses no batch completed before it. The faults are injected
//! (`FAPOOL_FAULT`) on the CPU backend, through the same error types the
//! CUDA backend and the NCCL transport raise.

mod common;
use common::*;
use fapool::results::{read_run, RunStatus};
use std::time::{Duration, Instant};

fn quickstart_job() -> String {
    repo_root().join("jobs/quickstart.toml").to_string_lossy().into_owned()
}

/// `mpirun -np 4 fapool run jobs/quickstart.toml` with `FAPOOL_FAULT=fault`.
fn run_with_fault(tag: &str, fault: &str) -> (std::process::Output, std::path::PathBuf, Duration) {
    let dir = scratch(tag);
    let out = dir.join("run.h5");
    let mut cmd = command("mpirun");
    cmd.args(["--oversubscribe", "-np", "4", BIN, "run", &quickstart_job(), "--backend", "cpu", "--out", out.to_str().unwrap()]);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("FAPOOL_FAULT", fault);
    let t = Instant::now();
    let o = cmd.output().expect("mpirun runs");
    (o, out, t.elapsed())
}

fn batches_in(path: &std::path::Path) -> usize {
    read_run(path).unwrap().strategies.iter().flat_map(|s| &s.categories).map(|c| c.batches.len()).sum()
}

#[test]
fn a_device_error_on_rank_0_exits_4_and_the_file_names_the_batch() {
    let (o, out, took) = run_with_fault("deverr0", "device-error:rank=0:batch=2");
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains("injected device error"), "{t}");
    assert!(took < Duration::from_secs(120), "took {took:?}");
    let run = read_run(&out).unwrap();
    assert_eq!(run.status, Some(RunStatus::Failed));
    assert_eq!(run.failed_batch.as_deref(), Some("baseline-tp2-pp2/short/2"), "{:?}", run.failure);
    assert_eq!(batches_in(&out), 2, "the two batches before the failure are kept");
}

#[test]
fn a_device_error_on_another_rank_exits_4_and_keeps_the_completed_batches() {
    let (o, out, took) = run_with_fault("deverr2", "device-error:rank=2:batch=3");
    let t = text(&o);
    assert_eq!(o.status.code(), Some(4), "{t}");
    assert!(t.contains("rank 2") && t.contains("injected device error"), "{t}");
    assert!(took < Duration::from_secs(120), "took {took:?}");
    assert_eq!(batches_in(&out), 3);
}

#[test]
fn a_communication_error_exits_5() {
    let (o, out, _) = run_with_fault("commerr", "comm-error:rank=1:batch=1");
    let t = text(&o);
    assert_eq!(o.status.code(), Some(5), "{t}");
    assert!(t.contains("injected communication error"), "{t}");
    assert_eq!(batches_in(&out), 1);
}
