//! Specifications of the results file: what goes in comes back out, and the
//! file refuses what would lose or misstate results.

use super::*;
use crate::comm::{Category, CommStat};
use crate::metrics::{BatchRecord, CategorySummary, RankRecord};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Runs `command` while no test has a results file open (see [`OPEN_FILES`]).
pub(crate) fn run_alone(command: &mut std::process::Command) -> std::io::Result<std::process::Output> {
    let _alone: RwLockWriteGuard<'_, ()> = OPEN_FILES.write().unwrap_or_else(|e| e.into_inner());
    command.output()
}

/// A child process inherits every open descriptor of the test binary, and
/// with it HDF5's lock on any file another test thread has open; that file
/// then cannot be reopened until the child exits. Tests that open files hold
/// this lock shared; a test that spawns a process holds it exclusively.
static OPEN_FILES: RwLock<()> = RwLock::new(());

/// A fresh path under the system temp directory, removed (with the plots
/// analyze writes beside it) on drop. Holds [`OPEN_FILES`] shared until
/// dropped or released.
pub(crate) struct TempPath(pub PathBuf, Option<RwLockReadGuard<'static, ()>>);

impl TempPath {
    pub fn new(tag: &str) -> Self {
        let guard = OPEN_FILES.read().unwrap_or_else(|e| e.into_inner());
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("fapool-{tag}-{}-{n}-{nanos}.h5", std::process::id());
        Self(std::env::temp_dir().join(name), Some(guard))
    }

    /// Gives up the shared lock, so this test may call [`run_alone`] once
    /// its own files are closed.
    pub fn release_lock(&mut self) {
        self.1 = None;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        for ext in ["tpot.svg", "tps.svg"] {
            let _ = std::fs::remove_file(self.0.with_extension(ext));
        }
    }
}

pub(crate) fn provenance() -> Provenance {
    Provenance {
        schema_version: SCHEMA_VERSION,
        tool_version: "0.1.0".into(),
        git_commit: "0123456789abcdef-dirty".into(),
        job_toml: "[model]\nname = \"tiny\"\n# ünïcode survives\n".into(),
        argv: vec!["fapool".into(), "run".into(), "jobs/tiny.toml".into()],
        hosts: vec!["node01".into(), "node01".into(), "node02".into(), "node02".into()],
        world_size: 4,
        backend: "cuda".into(),
        transport: "nccl".into(),
        mpi_library: "Open MPI v4.1.6".into(),
        cuda_version: Some("12.4".into()),
        nccl_version: Some("2.21.5".into()),
        driver_version: None,
        devices: vec![DeviceInfo { world_rank: 0, name: "NVIDIA H100 80GB HBM3".into(), uuid: "GPU-1234".into(), pci_bus_id: "00000000:19:00.0".into() }],
        slurm: [("SLURM_JOB_ID".to_string(), "4242".to_string()), ("SLURM_STEP_ID".to_string(), "0".to_string())].into(),
        seeds: Seeds { workload: 7, weights: 11 },
        started_utc: "2025-03-01T12:00:00Z".into(),
        categories: vec!["short".into(), "medium".into()],
        roles: vec![
            RoleRow { world_rank: 0, host: "node01".into(), local_rank: 0, strategy: "baseline".into(), role: "tp".into() },
            RoleRow { world_rank: 2, host: "node02".into(), local_rank: 0, strategy: "fapool".into(), role: "pool".into() },
        ],
    }
}

pub(crate) fn strategy(name: &str, kind: &str) -> StrategyInfo {
    StrategyInfo { name: name.into(), kind: kind.into(), params: format!("{{\"strategy\": \"{name}\", \"tp\": 2}}"), world_ranks_used: vec![0, 1, 2, 3] }
}

/// A batch whose TPOT is `tpot_s`: three output tokens, TTFT 10 ms.
pub(crate) fn batch(index: u32, seq_len: u32, tpot_s: f64) -> BatchRecord {
    let (sequences, output_tokens) = (2u32, 3u32);
    BatchRecord {
        batch_index: index,
        first_sequence: index * sequences,
        seq_len,
        num_sequences: sequences,
        output_tokens,
        requested_batch: 4,
        effective_batch: sequences,
        micro_batches: 2,
        pool_requested: index + 1,
        pool_effective: index,
        pool_fallback: index % 2 == 1,
        ttft_s: 0.010,
        e2e_s: 0.010 + 2.0 * tpot_s,
        itl_s: vec![tpot_s * 0.9, tpot_s * 1.1],
        tokens: (0..sequences * output_tokens).map(|t| 1000 * index + t).collect(),
        flops: 1.5e12,
    }
}

pub(crate) fn rank(batch_index: u32, world_rank: u32, energy: Option<f64>) -> RankRecord {
    RankRecord {
        batch_index,
        world_rank,
        role: if world_rank < 2 { "base".into() } else { "pool".into() },
        active: world_rank != 3,
        wall_s: 0.5,
        prefill_s: 0.1,
        decode_s: 0.4,
        comm: [
            (Category::TpAllreduce, CommStat { calls: 8, bytes: 1 << 20, seconds: 0.01 }),
            (Category::KvReplication, CommStat { calls: 2, bytes: 3 << 20, seconds: 0.02 }),
            (Category::Control, CommStat { calls: 1, bytes: 8, seconds: 1e-6 }),
        ]
        .into(),
        peak_memory_bytes: if world_rank == 1 { None } else { Some(2_000_000_000 + world_rank as u64) },
        memory_estimate_bytes: 1_900_000_000,
        energy_prefill_j: energy,
        energy_decode_j: energy.map(|e| 3.0 * e),
        flops: 3.0e11,
        compute_s: 0.45,
        wait_s: 0.05,
    }
}

pub(crate) fn ranks(batch_index: u32, energy: Option<f64>) -> Vec<RankRecord> {
    (0..4).map(|r| rank(batch_index, r, energy)).collect()
}

/// Writes a complete run: each (name, kind, TPOT per category) strategy gets
/// two batches in each category and a summary. Returns what was written.
pub(crate) fn write_run(path: &Path, strategies: &[(&str, &str, [f64; 2])]) -> Vec<(String, String, Vec<BatchRecord>, StoredSummary)> {
    let mut f = ResultsFile::create(path, false, &provenance()).unwrap();
    let mut written = Vec::new();
    for (name, kind, tpots) in strategies {
        f.begin_strategy(&strategy(name, kind)).unwrap();
        for (category, (seq_len, tpot)) in ["short", "medium"].into_iter().zip([(512, tpots[0]), (4096, tpots[1])]) {
            let batches = vec![batch(0, seq_len, tpot), batch(1, seq_len, tpot)];
            for b in &batches {
                f.append_batch(name, category, b, &ranks(b.batch_index, Some(2.0))).unwrap();
            }
            let wall_s = batches.iter().map(|b| b.e2e_s).sum();
            let stored = f.write_summary(name, category, &CategorySummary::from_batches(&batches, wall_s)).unwrap();
            written.push((name.to_string(), category.to_string(), batches, stored));
        }
    }
    f.set_status(RunStatus::Complete, Some("2025-03-01T13:00:00Z")).unwrap();
    written
}

#[test]
fn every_field_round_trips() {
    let path = TempPath::new("roundtrip");
    let written = write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004]), ("fapool", "fapool", [0.001, 0.002])]);
    {
        let mut f = ResultsFile::open_existing(&path.0).unwrap();
        f.store_prediction("fapool", "medium", "tpot_s", 0.0021).unwrap();
        f.store_prediction("fapool", "medium", "ttft_s", 0.5).unwrap();
        f.store_prediction_note("fapool", "medium", "source", "roofline of h200").unwrap();
        f.set_status(RunStatus::Complete, Some("2025-03-01T13:00:01Z")).unwrap();
    }

    let run = read_run(&path.0).unwrap();
    assert_eq!(run.provenance, provenance());
    assert_eq!(run.status, Some(RunStatus::Complete));
    assert_eq!(run.ended_utc.as_deref(), Some("2025-03-01T13:00:01Z"));
    assert_eq!(run.strategies.len(), 2);
    assert_eq!(run.strategies[0].info, strategy("baseline", "baseline"));
    assert_eq!(run.strategies[1].info, strategy("fapool", "fapool"));
    for (name, category, batches, stored) in &written {
        let c = run.strategy(name).unwrap().category(category).unwrap();
        assert_eq!(&c.batches, batches, "{name}/{category} batches");
        let expected_ranks: Vec<RankRecord> = batches.iter().flat_map(|b| ranks(b.batch_index, Some(2.0))).collect();
        assert_eq!(c.ranks, expected_ranks, "{name}/{category} ranks");
        assert_eq!(c.summary.as_ref(), Some(stored), "{name}/{category} summary");
    }
    let medium = run.strategy("fapool").unwrap().category("medium").unwrap();
    assert_eq!(medium.predictions, [("tpot_s".to_string(), 0.0021), ("ttft_s".to_string(), 0.5)].into());
    assert_eq!(medium.prediction_notes, [("source".to_string(), "roofline of h200".to_string())].into(), "text notes beside the figures (schema 4)");
    assert_eq!(run.category_order(), ["short", "medium"]);
}

#[test]
fn summary_tps_is_total_tokens_over_wall_time() {
    let path = TempPath::new("tps");
    let written = write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    let run = read_run(&path.0).unwrap();
    for (name, category, batches, _) in written {
        let s = &run.strategy(&name).unwrap().category(&category).unwrap().summary.as_ref().unwrap().summary;
        let tokens: u64 = batches.iter().map(|b| b.num_sequences as u64 * (b.seq_len + b.output_tokens) as u64).sum();
        assert_eq!(s.total_tokens, tokens);
        assert!((s.tps - tokens as f64 / s.wall_s).abs() < 1e-9 * s.tps);
    }
}

#[test]
fn summary_aggregates_memory_energy_and_communication_over_rank_rows() {
    let path = TempPath::new("aggregates");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    let run = read_run(&path.0).unwrap();
    let stored = run.strategies[0].categories[0].summary.clone().unwrap();
    let a = &stored.aggregates;
    // Two batches × four ranks; rank 1 has no memory reading, rank 3 is the largest.
    assert_eq!(a.rank_rows, 8);
    assert_eq!(a.peak_memory_max_bytes, Some(2_000_000_003));
    // 2 J prefill + 6 J decode on each of 8 rank rows.
    assert_eq!(a.energy_j, Some(64.0));
    assert_eq!(a.energy_j_per_token(stored.summary.total_tokens), Some(64.0 / stored.summary.total_tokens as f64));
    let kv = a.comm_of(Category::KvReplication).unwrap();
    assert_eq!((kv.calls, kv.bytes), (16, 8 * (3 << 20)));
    assert_eq!(stored.flops, 3.0e12);
}

#[test]
fn create_refuses_an_existing_file_without_force() {
    let path = TempPath::new("exists");
    std::fs::write(&path.0, b"earlier results").unwrap();
    let err = ResultsFile::create(&path.0, false, &provenance()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&path.0.display().to_string()), "{message}");
    assert!(message.contains("--force"), "{message}");
    assert_eq!(std::fs::read(&path.0).unwrap(), b"earlier results");
}

#[test]
fn create_with_force_replaces_an_existing_file() {
    let path = TempPath::new("force");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    ResultsFile::create(&path.0, true, &provenance()).unwrap();
    let run = read_run(&path.0).unwrap();
    assert!(run.strategies.is_empty());
    assert_eq!(run.status, Some(RunStatus::Running));
}

#[test]
fn completed_batches_lists_appended_batches_across_reopen() {
    let path = TempPath::new("completed");
    {
        let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
        f.begin_strategy(&strategy("fapool", "fapool")).unwrap();
        assert_eq!(f.completed_batches("fapool", "short").unwrap(), Vec::<u32>::new());
        for i in [0, 1, 3] {
            f.append_batch("fapool", "short", &batch(i, 512, 0.001), &ranks(i, None)).unwrap();
        }
        assert_eq!(f.completed_batches("fapool", "short").unwrap(), vec![0, 1, 3]);
    }
    let mut f = ResultsFile::open_existing(&path.0).unwrap();
    f.set_status(RunStatus::Running, None).unwrap();
    f.begin_strategy(&strategy("fapool", "fapool")).unwrap();
    assert_eq!(f.completed_batches("fapool", "short").unwrap(), vec![0, 1, 3]);
    f.append_batch("fapool", "short", &batch(2, 512, 0.001), &ranks(2, None)).unwrap();
    assert_eq!(f.completed_batches("fapool", "short").unwrap(), vec![0, 1, 3, 2]);
    assert_eq!(f.batches("fapool", "short").unwrap()[3], batch(2, 512, 0.001));
}

#[test]
fn resuming_sets_the_status_back_to_running_without_an_end_time() {
    let path = TempPath::new("resume-status");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004])]);
    let mut f = ResultsFile::open_existing(&path.0).unwrap();
    f.set_status(RunStatus::Running, None).unwrap();
    drop(f);
    let run = read_run(&path.0).unwrap();
    assert_eq!((run.status, run.ended_utc), (Some(RunStatus::Running), None));
}

#[test]
fn a_batch_cannot_be_recorded_twice() {
    let path = TempPath::new("duplicate");
    let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
    f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
    f.append_batch("baseline", "short", &batch(0, 512, 0.001), &ranks(0, None)).unwrap();
    let err = f.append_batch("baseline", "short", &batch(0, 512, 0.001), &ranks(0, None)).unwrap_err();
    assert!(matches!(err, ResultsError::DuplicateBatch { batch_index: 0, .. }), "{err}");
}

#[test]
fn appending_needs_a_begun_strategy_and_consistent_records() {
    let path = TempPath::new("invalid");
    let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
    let err = f.append_batch("baseline", "short", &batch(0, 512, 0.001), &[]).unwrap_err();
    assert!(matches!(err, ResultsError::UnknownStrategy(_)), "{err}");
    f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
    let mut short_tokens = batch(0, 512, 0.001);
    short_tokens.tokens.pop();
    assert!(matches!(f.append_batch("baseline", "short", &short_tokens, &[]), Err(ResultsError::Shape { .. })));
    assert!(matches!(f.append_batch("baseline", "short", &batch(0, 512, 0.001), &ranks(5, None)), Err(ResultsError::Shape { .. })));
    assert!(matches!(f.begin_strategy(&strategy("baseline", "fapool")), Err(ResultsError::StrategyMismatch { .. })));
    assert!(matches!(f.begin_strategy(&strategy("a/b", "fapool")), Err(ResultsError::InvalidName { .. })));
}

#[test]
fn energy_not_measured_reads_back_as_not_measured_not_zero() {
    let path = TempPath::new("energy");
    let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
    f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
    let b = batch(0, 512, 0.001);
    f.append_batch("baseline", "short", &b, &ranks(0, None)).unwrap();
    let stored = f.write_summary("baseline", "short", &CategorySummary::from_batches(&[b], 1.0)).unwrap();
    assert_eq!(stored.aggregates.energy_j, None);
    drop(f);

    let run = read_run(&path.0).unwrap();
    let c = &run.strategies[0].categories[0];
    assert!(c.ranks.iter().all(|r| r.energy_prefill_j.is_none() && r.energy_decode_j.is_none()));
    let agg = &c.summary.as_ref().unwrap().aggregates;
    assert_eq!(agg.energy_j, None);
    assert_eq!(agg.energy_j_per_token(100), None);
    assert_eq!(agg.energy_kwh_per_1000_inferences(2), None);
}

#[test]
fn reopening_trims_payload_rows_no_batch_references() {
    let path = TempPath::new("trim");
    {
        let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
        f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
        f.append_batch("baseline", "short", &batch(0, 512, 0.001), &ranks(0, None)).unwrap();
    }
    // What a crash between the payload and the batch row leaves behind.
    {
        let file = hdf5::File::open_rw(&path.0).unwrap();
        let itl = file.dataset("strategies/baseline/short/itl_s").unwrap();
        itl.resize((5,)).unwrap();
        let tokens = file.dataset("strategies/baseline/short/tokens").unwrap();
        tokens.resize((7, 3)).unwrap();
    }
    ResultsFile::open_existing(&path.0).unwrap();
    let file = hdf5::File::open(&path.0).unwrap();
    assert_eq!(file.dataset("strategies/baseline/short/itl_s").unwrap().shape(), vec![2]);
    assert_eq!(file.dataset("strategies/baseline/short/tokens").unwrap().shape(), vec![2, 3]);
    assert_eq!(file.dataset("strategies/baseline/short/ranks").unwrap().shape(), vec![4]);
}

#[test]
fn a_file_of_another_schema_version_is_refused() {
    let path = TempPath::new("schema");
    drop(ResultsFile::create(&path.0, false, &provenance()).unwrap());
    {
        let file = hdf5::File::open_rw(&path.0).unwrap();
        attrs::set_scalar(&file, "schema_version", 99u32).unwrap();
    }
    let err = read_run(&path.0).unwrap_err();
    assert!(matches!(err, ResultsError::UnsupportedSchema { found: 99, .. }), "{err}");
}

#[cfg(target_os = "linux")]
#[test]
fn child_processes_do_not_inherit_the_open_results_file() {
    let path = TempPath::new("cloexec");
    let f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
    let target = std::fs::canonicalize(&path.0).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|p| p == target) {
            let fd: libc::c_int = entry.file_name().to_str().unwrap().parse().unwrap();
            // SAFETY: reads the flags of a descriptor this process holds open.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert!(flags >= 0 && flags & libc::FD_CLOEXEC != 0, "descriptor {fd} would be inherited");
            seen += 1;
        }
    }
    assert!(seen > 0);
    drop(f);
}

#[test]
fn utc_timestamps_are_iso_8601() {
    assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    let t = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    assert_eq!(utc_timestamp(t), "2023-11-14T22:13:20Z");
    let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
    assert_eq!(utc_timestamp(leap), "2000-02-29T00:00:00Z");
}

const H5PY_CHECK: &str = r#"
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
assert f.attrs["format"] == "fapool-results", f.attrs["format"]
assert int(f.attrs["schema_version"]) == 4
assert f.attrs["status"] == "complete"
p = f["provenance"]
assert p.attrs["backend"] == "cuda"
assert "driver_version" not in p.attrs
assert "ünïcode" in p["job_toml"][()].decode()
assert [a.decode() for a in p["argv"][()]] == ["fapool", "run", "jobs/tiny.toml"]
assert p["slurm"].attrs["SLURM_JOB_ID"] == "4242"
roles = p["roles"][()]
assert roles["world_rank"].tolist() == [0, 2]
assert roles["role"][1].decode() == "pool"
g = f["strategies/fapool/medium"]
assert g.parent.attrs["kind"] == "fapool"
b = g["batches"][()]
assert b.dtype["pool_fallback"] == np.bool_, b.dtype
assert b["batch_index"].tolist() == [0, 1]
assert np.allclose(b["tpot_s"], 0.002)
itl = g["itl_s"][b["itl_offset"][1]: b["itl_offset"][1] + b["itl_count"][1]]
assert np.allclose(itl, [0.0018, 0.0022])
tok = g["tokens"][b["tokens_offset"][1]: b["tokens_offset"][1] + b["num_sequences"][1]]
assert tok.shape == (2, 3) and tok[0, 0] == 1000, tok
r = g["ranks"][()]
assert len(r) == 8 and r["role"][3].decode() == "pool"
assert r["peak_memory_bytes"][1] == -1
assert r["energy_measured"].all() and r["energy_decode_j"][0] == 6.0
assert r["kv_replication_calls"][0] == 2
s = g["summary"][0]
assert s["tps"] > 0 and abs(s["tps"] - s["total_tokens"] / s["wall_s"]) < 1e-6 * s["tps"]
c = g["comm"][()]
assert [x.decode() for x in c["category"]][0] == "tp_allreduce"
try:
    import pandas as pd
    df = pd.DataFrame(g["ranks"][()])
    assert len(df) == 8
except ImportError:
    pass
print("h5py ok")
"#;

#[test]
fn h5py_reads_compound_datasets_and_strings() {
    let python = Path::new("/usr/bin/python3");
    let has_h5py = python.exists() && run_alone(std::process::Command::new(python).args(["-c", "import h5py"])).map(|o| o.status.success()).unwrap_or(false);
    if !has_h5py {
        println!("skipped: /usr/bin/python3 with h5py is not available");
        return;
    }
    let mut path = TempPath::new("h5py");
    write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004]), ("fapool", "fapool", [0.001, 0.002])]);
    path.release_lock();
    let out = run_alone(std::process::Command::new(python).arg("-c").arg(H5PY_CHECK).arg(&path.0)).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "h5py check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("h5py ok"), "{stdout}");
}
#[test]
fn expert_rows_round_trip_and_the_summary_writes_their_routing() {
    let path = TempPath::new("experts");
    let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
    f.begin_strategy(&strategy("moe", "moe")).unwrap();
    let load = |world_rank, expert, decode, routed, received| crate::metrics::ExpertLoad { batch_index: 0, world_rank, layer: 1, expert, decode, routed, dropped: 1, received };
    let loads = vec![load(0, 0, false, 5, 6), load(1, 1, false, 3, 0), load(0, 0, true, 2, 1)];
    f.append_experts("moe", "short", &loads).unwrap();
    f.append_batch("moe", "short", &batch(0, 512, 0.001), &ranks(0, None)).unwrap();
    f.write_summary("moe", "short", &CategorySummary::from_batches(&[batch(0, 512, 0.001)], 1.0)).unwrap();
    drop(f);
    let c = read_run(&path.0).unwrap().strategies.remove(0).categories.remove(0);
    assert_eq!(c.experts, loads);
    assert_eq!(c.routing, crate::metrics::LayerRouting::of(&loads));
    assert_eq!((c.routing[0].assignments, c.routing[0].dropped, c.routing[0].expert_max), (8, 2, 6.0));
}

#[test]
fn reopening_trims_expert_rows_of_a_batch_never_recorded() {
    let path = TempPath::new("experts-trim");
    let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
    f.begin_strategy(&strategy("moe", "moe")).unwrap();
    let load = |batch_index| crate::metrics::ExpertLoad { batch_index, routed: 2, received: 2, ..Default::default() };
    f.append_experts("moe", "short", &[load(0)]).unwrap();
    f.append_batch("moe", "short", &batch(0, 512, 0.001), &ranks(0, None)).unwrap();
    // Batch 1's expert rows were written, its batch row never was.
    f.append_experts("moe", "short", &[load(1), load(1)]).unwrap();
    drop(f);
    drop(ResultsFile::open_existing(&path.0).unwrap());
    let c = read_run(&path.0).unwrap().strategies.remove(0).categories.remove(0);
    assert_eq!(c.experts, vec![load(0)]);
}

#[test]
fn empty_lists_round_trip() {
    let path = TempPath::new("empty");
    let empty = Provenance { schema_version: SCHEMA_VERSION, ..Default::default() };
    let mut f = ResultsFile::create(&path.0, false, &empty).unwrap();
    let info = StrategyInfo { name: "baseline".into(), kind: "baseline".into(), ..Default::default() };
    f.begin_strategy(&info).unwrap();
    drop(f);
    let run = read_run(&path.0).unwrap();
    assert_eq!(run.provenance, empty);
    assert_eq!(run.strategies[0].info, info);
    assert!(run.strategies[0].categories.is_empty());
}
