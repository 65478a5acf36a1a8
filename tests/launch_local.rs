//! `scripts/launch-local.sh`, the workstation launcher: one rank per visible
//! GPU, CPU ranks without one, arguments passed to `fapool run`; and the main
//! job `scripts/quickstart.sh` chooses by the GPUs there are. A stand-in for
//! fapool reports what each rank was given, and a stand-in `nvidia-smi` plays
//! the GPUs.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

fn executable(path: &Path, script: &str) {
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A folder with a stand-in `nvidia-smi` that lists `gpus` GPUs (none: it
/// fails, as it does on a machine without a driver).
fn stand_in_gpus(dir: &Path, gpus: usize) -> std::path::PathBuf {
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let list: String = (0..gpus).map(|i| format!("echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'\n")).collect();
    let status = if gpus == 0 { 9 } else { 0 };
    executable(&bin_dir.join("nvidia-smi"), &format!("#!/bin/sh\n{list}exit {status}\n"));
    bin_dir
}

/// Runs the launcher where nvidia-smi lists `gpus` GPUs.
fn launch(tag: &str, gpus: usize, env: &[(&str, &str)], args: &[&str]) -> Output {
    let dir = scratch(tag);
    let stand_in = dir.join("fapool");
    executable(&stand_in, "#!/bin/sh\necho \"rank $OMPI_COMM_WORLD_RANK of $OMPI_COMM_WORLD_SIZE: $*\"\n");
    let bin_dir = stand_in_gpus(&dir, gpus);
    let mut cmd = command("bash");
    cmd.arg(repo_root().join("scripts/launch-local.sh")).args(args);
    cmd.env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default())).env("FAPOOL_BIN", &stand_in).env_remove("CUDA_VISIBLE_DEVICES");
    // The test machine may have fewer cores than the stand-in GPUs.
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("bash runs")
}

fn ranks(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("rank ")).map(str::to_string).collect()
}

#[test]
fn one_rank_per_visible_gpu() {
    let out = launch("launch-gpus", 3, &[], &["jobs/gpu-2.toml"]);
    let r = ranks(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(r.len(), 3, "{}", text(&out));
    assert!(r.iter().all(|l| l.contains("of 3: run jobs/gpu-2.toml")), "{}", text(&out));
}

#[test]
fn cuda_visible_devices_narrows_the_gpus() {
    let out = launch("launch-cvd", 4, &[("CUDA_VISIBLE_DEVICES", "1,3")], &["jobs/gpu-2.toml"]);
    assert_eq!(ranks(&out).len(), 2, "{}", text(&out));
}

#[test]
fn without_a_gpu_four_cpu_ranks_share_the_cores() {
    let out = launch("launch-cpu", 0, &[], &["jobs/quickstart.toml", "--backend", "cpu"]);
    let r = ranks(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(r.len(), 4, "{}", text(&out));
    assert!(r.iter().all(|l| l.ends_with("of 4: run jobs/quickstart.toml --backend cpu")), "{}", text(&out));
}

#[test]
fn fapool_ranks_sets_the_rank_count() {
    let out = launch("launch-ranks", 8, &[("FAPOOL_RANKS", "2")], &["jobs/gpu-2.toml"]);
    assert_eq!(ranks(&out).len(), 2, "{}", text(&out));
}

/// The command `scripts/quickstart.sh` would run where nvidia-smi lists `gpus` GPUs.
fn quickstart_plan(tag: &str, gpus: usize) -> String {
    let dir = scratch(tag);
    let bin_dir = stand_in_gpus(&dir, gpus);
    let out = command("bash")
        .arg(repo_root().join("scripts/quickstart.sh"))
        .arg("--plan")
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_main_job_runs_dense_4l_on_a_single_gpu_and_the_tiny_model_without_one() {
    assert_eq!(quickstart_plan("qs-cpu", 0), "mpirun -np 4 target/release/fapool run jobs/quickstart.toml --backend cpu");
    assert_eq!(quickstart_plan("qs-1gpu", 1), "mpirun -np 1 target/release/fapool run jobs/gpu-1.toml");
    assert_eq!(quickstart_plan("qs-8gpu", 8), "mpirun -np 2 target/release/fapool run jobs/gpu-2.toml");
    let job = fapool::spec::parse_job(&std::fs::read_to_string(repo_root().join("jobs/gpu-1.toml")).unwrap(), &[]).unwrap();
    assert_eq!(job.model.preset, "dense-4l");
    assert_eq!(job.workload.categories.len(), 4, "the four default categories");
    let facts = fapool::spec::LaunchFacts { world_size: 1, max_local_ranks: 1, visible_gpus: Some(1), memory_budget_bytes: 80 << 30, elem_bytes: 2 };
    fapool::spec::validate(&job, &facts).expect("jobs/gpu-1.toml fits one 80 GB GPU");
}
