//! Helpers for tests that launch the `fapool` binary, under `mpirun` where
//! they need ranks.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
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

/// A command for `program` whose process inherits only its standard
/// streams. The HDF5 library opens files without close-on-exec, so a child
/// another test starts while this process holds a results or calibration
/// file open would keep that file, with HDF5's lock on it, for as long as the
/// child lives, and a fapool that opens the file meanwhile would find it
/// locked. Every process the tests start is made here.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: the closure runs between fork and exec and calls only
    // close_range and fcntl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            inherit_only_standard_streams();
            Ok(())
        });
    }
    cmd
}

/// Marks every descriptor above the standard streams close-on-exec.
fn inherit_only_standard_streams() {
    // SAFETY: descriptor flags only; a descriptor that is not open fails
    // F_GETFD and is skipped.
    unsafe {
        if libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) == 0 {
            return;
        }
        for fd in 3..4096 {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Writes an HDF5 file that a child process will open, as `dir/name`.
/// A child another test starts while `write` holds the file open keeps it,
/// with HDF5's lock, until that child's exec (see [`command`]); the child
/// that should read it gets a copy this process never opened, so not even
/// that moment can lock it out.
pub fn hdf5_for_a_child(dir: &Path, name: &str, write: impl FnOnce(&Path)) -> PathBuf {
    let staged = dir.join(format!("{name}.staged"));
    write(&staged);
    let p = dir.join(name);
    std::fs::copy(&staged, &p).unwrap();
    p
}

fn mpi_env(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_rmaps_base_oversubscribe", "1")
}

/// `mpirun -np N fapool ARGS...`, oversubscribed (CI has 2 cores).
pub fn mpirun(np: usize, args: &[&str]) -> Output {
    let np = np.to_string();
    let mut cmd = command("mpirun");
    cmd.args(["--oversubscribe", "-np", &np, &bin()]).args(args);
    mpi_env(&mut cmd).output().expect("mpirun runs")
}

/// `mpirun -np N fapool ARGS...` with `VAR=value` set on every rank.
pub fn mpirun_with_env(np: usize, vars: &[&str], args: &[&str]) -> Output {
    let np = np.to_string();
    let mut cmd = command("mpirun");
    cmd.arg("--oversubscribe");
    for v in vars {
        cmd.args(["-x", v]);
    }
    cmd.args(["-np", &np, &bin()]).args(args);
    mpi_env(&mut cmd).output().expect("mpirun runs")
}

/// `fapool ARGS...` without mpirun (a singleton MPI process where MPI starts).
pub fn fapool(args: &[&str]) -> Output {
    let mut cmd = command(bin());
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
