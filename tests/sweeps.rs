//! Long sweeps as batch jobs: stop on a signal and resume, survive SIGKILL at
//! any moment, abort every rank when one hangs, split batches that do not fit
//! the memory budget, and the same workload on any rank count.

mod common;
use common::*;
use fapool::results::{read_run, RunStatus};
use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn quickstart_job() -> String {
    repo_root().join("jobs/quickstart.toml").to_string_lossy().into_owned()
}

/// Starts `mpirun -np 4 fapool run ...` as the leader of a new session, so
/// the job (mpirun and every rank, which mpirun puts in process groups of
/// their own) can be killed at once, as a node failure would.
fn spawn_run(args: &[&str]) -> std::process::Child {
    let mut cmd = command("mpirun");
    cmd.args(["--oversubscribe", "-np", "4", BIN, "run"]).args(args);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no parent state.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().expect("mpirun starts")
}

/// SIGKILL to every process of the session `sid`.
fn kill_session(sid: u32) {
    let _ = command("pkill").args(["-KILL", "-s", &sid.to_string()]).status();
}

/// Every (strategy, category, batch index) in a file, asserting none twice.
fn batches_once(path: &std::path::Path) -> BTreeSet<(String, String, u32)> {
    let run = read_run(path).expect("the file reads");
    let mut seen = BTreeSet::new();
    for s in &run.strategies {
        for c in &s.categories {
            for b in &c.batches {
                assert!(seen.insert((s.info.name.clone(), c.name.clone(), b.batch_index)), "batch recorded twice: {} {} {}", s.info.name, c.name, b.batch_index);
            }
        }
    }
    seen
}

/// The batches a complete run of the quickstart job with `sequences` per category holds.
fn expected(sequences: usize) -> usize {
    let job = fapool::spec::parse_job(&std::fs::read_to_string(quickstart_job()).unwrap(), &[format!("workload.sequences_per_category={sequences}")]).unwrap();
    let w = fapool::workload::Workload::new(&job.workload, 512);
    job.strategies.len() * (0..job.workload.categories.len()).map(|c| w.batches(c).len()).sum::<usize>()
}

#[test]
fn sigusr1_stops_at_a_safe_point_and_resume_completes_every_batch_once() {
    let dir = scratch("sigusr1");
    let out = dir.join("sweep.h5");
    let set = "workload.sequences_per_category=60";
    let mut child = spawn_run(&[&quickstart_job(), "--backend", "cpu", "--out", out.to_str().unwrap(), "--set", set]);
    // The signal goes once the first batch is reported, whatever the machine's
    // speed: the sweep is then started and far from its end.
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = String::new();
        let mut signalled = false;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if !signalled && line.starts_with("progress:") {
                // mpirun forwards SIGUSR1 to every rank, as Slurm's --signal does to a step.
                unsafe { libc::kill(pid, libc::SIGUSR1) };
                signalled = true;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    let o = child.wait_with_output().unwrap();
    let t = format!("{}{}", reader.join().unwrap(), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(7), "expected the interrupted exit code:\n{t}");
    let run = read_run(&out).unwrap();
    assert_eq!(run.status, Some(RunStatus::Interrupted));
    let before = batches_once(&out).len();
    assert!(before > 0, "{t}");

    let o = mpirun(4, &["run", &quickstart_job(), "--backend", "cpu", "--resume", out.to_str().unwrap(), "--set", set]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read_run(&out).unwrap().status, Some(RunStatus::Complete));
    let all = batches_once(&out);
    assert!(all.len() > before);
    assert_eq!(all.len(), expected(60));

    // The resumed file holds what an uninterrupted run's holds, timings aside.
    let whole = dir.join("whole.h5");
    let o = mpirun(4, &["run", &quickstart_job(), "--backend", "cpu", "--out", whole.to_str().unwrap(), "--set", set]);
    assert!(o.status.success(), "{}", text(&o));
    let (resumed, uninterrupted) = (read_run(&out).unwrap(), read_run(&whole).unwrap());
    let untimed = |r: &fapool::results::RunData| -> Vec<_> {
        r.strategies
            .iter()
            .flat_map(|s| {
                s.categories.iter().flat_map(move |c| {
                    c.batches.iter().map(move |b| (s.info.name.clone(), c.name.clone(), b.batch_index, b.seq_len, b.num_sequences, b.micro_batches, b.pool_effective, b.tokens.clone()))
                })
            })
            .collect()
    };
    assert_eq!(untimed(&resumed), untimed(&uninterrupted));
    assert_eq!(resumed.provenance.roles, uninterrupted.provenance.roles);
}

/// The batches a run reported complete on stdout before it died.
fn reported(stdout: &str) -> usize {
    stdout.lines().filter(|l| l.starts_with("progress:")).count()
}

#[test]
fn twenty_sigkills_lose_no_completed_batch_and_resume_completes_the_sweep() {
    let dir = scratch("sigkill");
    let out = dir.join("sweep.h5");
    let set = "workload.sequences_per_category=1000";
    let mut rng = fapool::workload::Rng::new(2024);
    let mut trials = 0;
    let mut reported_total = 0;
    let mut first = true;
    while trials < 20 {
        let target = out.to_str().unwrap();
        let mode = if first { "--out" } else { "--resume" };
        let mut child = spawn_run(&[&quickstart_job(), "--backend", "cpu", mode, target, "--set", set]);
        let delay = 300 + rng.below(2500) as u64;
        std::thread::sleep(Duration::from_millis(delay));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            kill_session(child.id());
        }
        let o = child.wait_with_output().unwrap();
        if first && !out.exists() {
            continue; // killed before the file was created: nothing to check yet
        }
        first = false;
        if finished {
            break;
        }
        trials += 1;
        reported_total += reported(&String::from_utf8_lossy(&o.stdout));
        // h5py opens it, and it holds every batch reported complete so far.
        let py = command("/usr/bin/python3")
            .args(["-c", "import h5py,sys; f=h5py.File(sys.argv[1],'r'); print(sum(g['batches'].shape[0] for s in f['strategies'].values() for g in s.values()))", target])
            .output()
            .expect("python3 runs");
        assert!(py.status.success(), "h5py cannot open the file after a kill: {}", String::from_utf8_lossy(&py.stderr));
        let in_file: usize = String::from_utf8_lossy(&py.stdout).trim().parse().unwrap();
        assert!(in_file >= reported_total, "trial {trials}: {in_file} batches in the file, {reported_total} reported complete");
        assert_eq!(batches_once(&out).len(), in_file);
        reported_total = in_file;
    }
    assert_eq!(trials, 20, "the sweep finished before 20 kills");
    println!("crash trials: {trials} SIGKILLs, {reported_total} batches held at the last kill, 0 lost");
    let o = mpirun(4, &["run", &quickstart_job(), "--backend", "cpu", "--resume", out.to_str().unwrap(), "--set", set]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(batches_once(&out).len(), expected(1000));
    assert_eq!(read_run(&out).unwrap().status, Some(RunStatus::Complete));
}

#[test]
fn a_hung_rank_makes_every_rank_exit_with_the_timeout_code() {
    let dir = scratch("hang");
    let out = dir.join("hang.h5");
    let timeout = 5;
    let t = Instant::now();
    let mut cmd = command("mpirun");
    cmd.args(["--oversubscribe", "-np", "4", BIN, "run", &quickstart_job(), "--backend", "cpu", "--out", out.to_str().unwrap(), "--timeout", &timeout.to_string()]);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("FAPOOL_FAULT", "hang:rank=1:batch=3");
    let o = cmd.output().unwrap();
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(took < Duration::from_secs(timeout + 30), "took {took:?}");
    // Batches completed before the hang are in the file, which names the
    // batch that failed.
    assert_eq!(batches_once(&out).len(), 3);
    let run = read_run(&out).unwrap();
    assert_eq!(run.status, Some(RunStatus::Failed));
    assert_eq!(run.failed_batch.as_deref(), Some("baseline-tp2-pp2/short/3"), "{:?}", run.failure);
}

#[test]
fn a_pool_rank_with_an_unusable_device_makes_the_batch_run_base_only() {
    let dir = scratch("fallback");
    let out = dir.join("fallback.h5");
    // quickstart on 4 ranks: rank 3 is pool rank 1. The fault fires at the
    // run's global batch number of fapool's first `long` batch (batches run
    // strategy by strategy, category by category).
    let job = fapool::spec::parse_job(&std::fs::read_to_string(quickstart_job()).unwrap(), &[]).unwrap();
    let w = fapool::workload::Workload::new(&job.workload, 512);
    let per_category: Vec<usize> = (0..job.workload.categories.len()).map(|c| w.batches(c).len()).collect();
    let first_long = per_category.iter().sum::<usize>() + per_category[0] + per_category[1];
    let mut cmd = command("mpirun");
    cmd.args(["--oversubscribe", "-np", "4", BIN, "run", &quickstart_job(), "--backend", "cpu", "--out", out.to_str().unwrap()]);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("FAPOOL_FAULT", format!("device:rank=3:batch={first_long}"));
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let run = read_run(&out).unwrap();
    let long = run.strategy("fapool-b2-p2-zigzag").unwrap().category("long").unwrap();
    let (first, rest) = long.batches.split_first().unwrap();
    assert!(first.pool_fallback && first.pool_effective == 0 && first.pool_requested == 2, "{first:?}");
    assert!(rest.iter().all(|b| !b.pool_fallback && b.pool_effective == 2));
    // The fallback batch still generated the baseline's tokens.
    let base = run.strategy("baseline-tp2-pp2").unwrap().category("long").unwrap();
    assert_eq!(base.batches[0].tokens, first.tokens);
}

#[test]
fn a_batch_over_the_memory_budget_is_split_with_identical_results() {
    use fapool::spec::{parse_job, StrategySpec};
    let text_job = std::fs::read_to_string(quickstart_job()).unwrap();
    let job = parse_job(&text_job, &[]).unwrap();
    let cfg = job.model.resolve().unwrap();
    let s = &job.strategies[0];
    assert!(matches!(s, StrategySpec::Baseline(_)));
    // A budget that fits 2 but not 4 sequences of 128 tokens.
    let bytes = |nseq| s.deployment().memory_bytes(&cfg, fapool::strategy::BatchShape { nseq, seq_len: 128, out_tokens: 8 }, 4, 4);
    let (two, four) = (bytes(2), bytes(4));
    assert!(two < four);
    let budget_gib = (two + (four - two) / 4) as f64 / (1u64 << 30) as f64;
    let dir = scratch("membudget");
    let (small, large) = (dir.join("small.h5"), dir.join("large.h5"));
    for (out, gib) in [(&small, budget_gib), (&large, 64.0)] {
        let o = mpirun(4, &["run", &quickstart_job(), "--backend", "cpu", "--out", out.to_str().unwrap(), "--set", &format!("run.memory_budget_gib={gib}")]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let (a, b) = (read_run(&small).unwrap(), read_run(&large).unwrap());
    let cat = |r: &fapool::results::RunData| r.strategy("baseline-tp2-pp2").unwrap().category("long").unwrap().batches.clone();
    let (split, whole) = (cat(&a), cat(&b));
    let b128 = split.iter().find(|x| x.seq_len == 128 && x.num_sequences == 4).expect("a batch of 4 sequences of 128 tokens");
    assert!(b128.micro_batches >= 2 && b128.effective_batch <= 2, "{b128:?}");
    for (x, y) in split.iter().zip(&whole) {
        assert_eq!(x.tokens, y.tokens, "splitting changed the result");
    }
}

#[test]
fn the_same_seed_gives_the_same_sequences_on_any_rank_count() {
    // Baseline TP=2 on 2 ranks and TP=2 x PP=2 on 4 ranks serve the same
    // workload: same batches, same prompts, hence the same tokens.
    let dir = scratch("ranks");
    let job = job(&dir, "ranks", &format!("{}\n[[strategy]]\nkind = \"baseline\"\ntp = 2\npp = 1\n", tiny_job_header(5, 4)));
    let job4 = dir.join("ranks4.toml");
    std::fs::write(&job4, std::fs::read_to_string(&job).unwrap().replace("pp = 1", "pp = 2")).unwrap();
    let (a, b) = (dir.join("a.h5"), dir.join("b.h5"));
    assert!(mpirun(2, &["run", job.to_str().unwrap(), "--out", a.to_str().unwrap()]).status.success());
    assert!(mpirun(4, &["run", job4.to_str().unwrap(), "--out", b.to_str().unwrap()]).status.success());
    let (ra, rb) = (read_run(&a).unwrap(), read_run(&b).unwrap());
    for (ca, cb) in ra.strategies[0].categories.iter().zip(&rb.strategies[0].categories) {
        assert_eq!(ca.batches.len(), cb.batches.len());
        for (x, y) in ca.batches.iter().zip(&cb.batches) {
            assert_eq!((x.seq_len, x.num_sequences, &x.tokens), (y.seq_len, y.num_sequences, &y.tokens));
        }
    }
}
