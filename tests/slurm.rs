//! The batch scripts in `slurm/` under a real Slurm: a single-node cluster
//! that `scripts/slurm-local.sh` installs and starts once for this test
//! binary, and stops when the binary exits.
//!
//! Where Slurm cannot be installed or started (not root, no apt-get), these
//! tests print why and pass, except under CI (`CI=true`), where they fail.
//! A Slurm that was already running is used as it is and left running.

mod common;
use common::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest a submitted job may take, pending included, before a test gives up.
const JOB_LIMIT: Duration = Duration::from_secs(180);

fn local_slurm_script() -> PathBuf {
    repo_root().join("scripts/slurm-local.sh")
}

/// Stops the daemons that `slurm_is_up` started; runs when the test binary exits.
extern "C" fn stop_local_slurm() {
    let _ = command("bash").arg(local_slurm_script()).arg("stop").status();
}

fn controller_answers() -> bool {
    command("scontrol").arg("ping").output().map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("UP")).unwrap_or(false)
}

/// Starts Slurm once per test binary. `false` means "skip": no Slurm here.
fn slurm_is_up() -> bool {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        if controller_answers() {
            return Ok(());
        }
        let out = command("bash").arg(local_slurm_script()).arg("start").output().map_err(|e| format!("bash: {e}"))?;
        if !out.status.success() {
            return Err(text(&out));
        }
        // SAFETY: registers a plain `extern "C" fn` with the C library; it
        // runs once, at process exit, after every test has finished.
        unsafe {
            libc::atexit(stop_local_slurm);
        }
        Ok(())
    });
    match started {
        Ok(()) => true,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("CI must be able to start a local Slurm:\n{why}"),
        Err(why) => {
            // Straight to stderr: the test harness would hide an eprintln! of a passing test.
            let _ = writeln!(std::io::stderr(), "skipping: no local Slurm (scripts/slurm-local.sh start failed):\n{why}");
            false
        }
    }
}

/// A submitted job: its id, and the log it wrote (of its first task, for an array).
struct Job {
    id: String,
    log: PathBuf,
}

impl Job {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `scontrol show job` fields, e.g. `JobState`, `Restarts`, `ExitCode`.
    fn field(&self, name: &str) -> String {
        let out = command("scontrol").args(["show", "job", "-o", &self.id]).output().expect("scontrol runs");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string)).unwrap_or_default()
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Job) -> bool) {
        let start = Instant::now();
        while !done(self) {
            if start.elapsed() > JOB_LIMIT {
                let _ = command("scancel").arg(&self.id).status();
                panic!("job {} never {what}; state {}; log:\n{}", self.id, self.field("JobState"), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// `sbatch` from the repository root with the fapool binary, a scratch
/// results directory and a scratch log; `env` adds settings.
fn sbatch(dir: &Path, wait: bool, options: &[&str], script: &str, args: &[&str], env: &[(&str, &str)]) -> (Output, Job) {
    let array = options.iter().any(|o| o.starts_with("--array"));
    let log = dir.join(if array { "job-%A_%a.out" } else { "job-%j.out" });
    let limit = JOB_LIMIT.as_secs().to_string();
    let mut cmd = command("timeout");
    cmd.arg(&limit).arg("sbatch").arg("--parsable").arg(format!("--output={}", log.display()));
    if wait {
        cmd.arg("--wait");
    }
    cmd.args(options).arg(script).args(args).current_dir(repo_root());
    cmd.env("FAPOOL_BIN", BIN).env("FAPOOL_RESULTS_DIR", dir.join("results"));
    // mpirun refuses to run as root without these (the test may be root).
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("sbatch runs");
    // --parsable prints "<id>" or "<id>;<cluster>" on submission.
    let id = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
    assert!(!id.is_empty(), "sbatch submitted nothing:\n{}", text(&out));
    let log = match options.iter().find_map(|o| o.strip_prefix("--array=")) {
        Some(tasks) => dir.join(format!("job-{id}_{}.out", tasks.split([',', '-']).next().unwrap_or("0"))),
        None => dir.join(format!("job-{id}.out")),
    };
    (out, Job { id, log })
}

/// A job's file: complete, both quickstart strategies, exactly `categories`.
fn assert_results_file(path: &Path, log: &str, ranks: u32, categories: &[&str]) {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    assert!(size > 0, "no results file {} (or it is empty); log:\n{log}", path.display());
    let run = fapool::results::read_run(path).expect("the results file reads back");
    assert_eq!(run.status, Some(fapool::results::RunStatus::Complete), "{log}");
    assert_eq!(run.provenance.world_size, ranks);
    assert_eq!(run.strategies.len(), 2);
    for s in &run.strategies {
        assert_eq!(s.categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), categories, "{}", s.info.name);
        assert!(s.categories.iter().all(|c| !c.batches.is_empty() && c.summary.is_some()));
    }
    assert!(run.provenance.slurm.keys().any(|k| k == "SLURM_JOB_ID"), "{:?}", run.provenance.slurm);
}

#[test]
fn the_smoke_job_runs_to_completion_under_slurm_with_srun() {
    if !slurm_is_up() {
        return;
    }
    let dir = scratch("slurm-smoke-srun");
    let (out, job) = sbatch(&dir, true, &[], "slurm/smoke.sbatch", &[], &[]);
    let log = job.log_text();
    assert_eq!(out.status.code(), Some(0), "job {} failed:\n{}\n{log}", job.id, text(&out));
    assert!(log.contains("srun --mpi=pmix"), "{log}");
    assert_results_file(&dir.join(format!("results/smoke-{}.h5", job.id)), &log, 4, &["short", "medium", "long", "very_long"]);
}

#[test]
fn the_smoke_job_runs_to_completion_under_mpirun_inside_the_allocation() {
    if !slurm_is_up() {
        return;
    }
    let dir = scratch("slurm-smoke-mpirun");
    let (out, job) = sbatch(&dir, true, &[], "slurm/smoke.sbatch", &[], &[("FAPOOL_LAUNCHER", "mpirun")]);
    let log = job.log_text();
    assert_eq!(out.status.code(), Some(0), "job {} failed:\n{}\n{log}", job.id, text(&out));
    assert!(log.contains("mpirun -np 4"), "{log}");
    assert_results_file(&dir.join(format!("results/smoke-{}.h5", job.id)), &log, 4, &["short", "medium", "long", "very_long"]);
}

#[test]
fn an_array_task_runs_only_its_own_category() {
    if !slurm_is_up() {
        return;
    }
    let dir = scratch("slurm-array");
    // The script asks for 2 nodes x 8 GPUs; here task 1 runs on the one
    // node's CPUs with 2 ranks (the quickstart job shrunk to fit them).
    let options = ["--array=1", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0"];
    let args = ["--backend", "cpu", "--set", "workload.sequences_per_category=2", "--set", "strategy.0.pp=1", "--set", "strategy.1.base=1", "--set", "strategy.1.pool_max=1"];
    let (out, job) = sbatch(&dir, true, &options, "slurm/category-array.sbatch", &args, &[("FAPOOL_JOB", "jobs/quickstart.toml")]);
    let log = job.log_text();
    assert_eq!(out.status.code(), Some(0), "array job {} failed:\n{}\n{log}", job.id, text(&out));
    let measured: Vec<&str> = log.lines().filter(|l| l.contains(" batches ")).collect();
    assert!(!measured.is_empty() && measured.iter().all(|l| l.split_whitespace().nth(1) == Some("medium")), "task 1 must run only category 1 (medium):\n{log}");
    assert_results_file(&dir.join(format!("results/quickstart-medium-{}_1.h5", job.id)), &log, 2, &["medium"]);
}

/// A stand-in for fapool that writes its results file, then waits for
/// SIGUSR1 and exits 7 ("interrupted, measurements saved"), as fapool does;
/// given `--resume` it finishes at once. It says it runs only once its file
/// is written and its trap set: the test signals the job when every rank has
/// said so, and a USR1 before the trap would end the rank as a signal ends
/// a shell.
const INTERRUPTIBLE_RUN: &str = r#"#!/usr/bin/env bash
trap 'echo "rank $SLURM_PROCID: stopping"; kill $! 2>/dev/null; exit 7' USR1
prev=
for a in "$@"; do
  [ "$prev" = --resume ] && echo "rank $SLURM_PROCID: $*" && exit 0
  [ "$prev" = --out ] && [ "$SLURM_PROCID" = 0 ] && echo partial >"$a"
  prev=$a
done
echo "rank $SLURM_PROCID: $*"
sleep 120 &
wait
"#;

#[test]
fn a_job_warned_of_its_time_limit_stops_requeues_itself_and_resumes_its_results_file() {
    if !slurm_is_up() {
        return;
    }
    let dir = scratch("slurm-requeue");
    let stand_in = dir.join("fapool");
    std::fs::write(&stand_in, INTERRUPTIBLE_RUN).unwrap();
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stand_in = stand_in.to_str().unwrap().to_string();
    let (_, job) = sbatch(&dir, false, &[], "slurm/smoke.sbatch", &[], &[("FAPOOL_BIN", &stand_in)]);
    job.wait_until("started all 4 ranks", |j| (0..4).all(|r| j.log_text().contains(&format!("rank {r}: run"))));
    // What `--signal=B:USR1@120` does two minutes before the time limit.
    let signal = command("scancel").args(["--batch", "--signal=USR1", &job.id]).output().unwrap();
    assert!(signal.status.success(), "{}", text(&signal));
    job.wait_until("was requeued", |j| j.field("Restarts") == "1");
    // Slurm holds a requeued job back for a while; start it now.
    let _ = command("scontrol").args(["update", &format!("JobId={}", job.id), "StartTime=now"]).status();
    job.wait_until("completed", |j| j.field("JobState") == "COMPLETED");
    let log = job.log_text();
    let file = dir.join(format!("results/smoke-{}.h5", job.id));
    // The ranks got USR1 (any of them may be the first to stop; srun then
    // ends the others, so not every rank gets to say so).
    assert!(log.contains(": stopping") && log.contains("step exited with 7"), "the ranks did not get USR1:\n{log}");
    assert!(log.contains(&format!("--resume {}", file.display())), "the requeued run did not resume:\n{log}");
    assert_eq!(job.field("ExitCode"), "0:0", "{log}");
}

#[test]
fn a_world_size_that_does_not_match_slurm_ntasks_is_refused() {
    // A singleton where Slurm promised 4 tasks: what happens when srun starts
    // ranks without an MPI plugin they understand.
    let out = command(BIN).arg("env").env("SLURM_NTASKS", "4").env("SLURM_STEP_ID", "0").output().expect("fapool runs");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(t.contains("rule `ranks-match-slurm` broken"), "{t}");
}
