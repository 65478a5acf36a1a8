//! Helpers for tests that launch the `fapool` binary, under `mpirun` where
//! they need ranks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_fapool");

/// The fapool binary the launching helpers run: `FAPOOL_TEST_BIN` where set
/// (a test binary carried to another machine), else the one cargo built.
pub fn bin() -> String {
    std::env::var("FAPOOL_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A fresh scratch directory for one test.
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fapool-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mpi_env(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_rmaps_base_oversubscribe", "1")
}

/// `mpirun -np N fapool ARGS...`, oversubscribed (CI has 2 cores).
pub fn mpirun(np: usize, args: &[&str]) -> Output {
    let np = np.to_string();
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", &np, &bin()]).args(args);
    mpi_env(&mut cmd).output().expect("mpirun runs")
}

/// `mpirun -np N fapool ARGS...` with `VAR=value` set on every rank.
pub fn mpirun_with_env(np: usize, vars: &[&str], args: &[&str]) -> Output {
    let np = np.to_string();
    let mut cmd = Command::new("mpirun");
    cmd.arg("--oversubscribe");
    for v in vars {
        cmd.args(["-x", v]);
    }
    cmd.args(["-np", &np, &bin()]).args(args);
    mpi_env(&mut cmd).output().expect("mpirun runs")
}

/// `fapool ARGS...` without mpirun (a singleton MPI process where MPI starts).
pub fn fapool(args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    mpi_env(&mut cmd).output().expect("fapool runs")
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Writes a job file and returns its path.
pub fn job(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, toml).unwrap();
    p
}

/// A tiny-model job header with one category below the pool threshold
/// (32 tokens in the tests' fapool settings) and one above.
pub fn tiny_job_header(sequences: usize, output_tokens: usize) -> String {
    format!(
        r#"
[run]
name = "test"
backend = "cpu"

[model]
preset = "tiny"

[workload]
sequences_per_category = {sequences}
output_tokens = {output_tokens}
batch_size = 3
seed = 11

[[workload.category]]
name = "below"
lengths = [8, 20]

[[workload.category]]
name = "above"
lengths = [33, 64]
"#
    )
}

/// The repository: `FAPOOL_REPO_ROOT` where set (tests run on another
/// machine), else where cargo built the tests.
pub fn repo_root() -> PathBuf {
    std::env::var_os("FAPOOL_REPO_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
