//! Typed process exit codes (documented in the README).

/// How a fapool process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// An unexpected internal error.
    Failure = 1,
    /// Bad command line or job spec (a rule of the spec is broken).
    Usage = 2,
    /// MPI start-up or launch layout problem.
    Mpi = 3,
    /// CUDA, cuBLAS or NVRTC error (or the CUDA backend is unavailable).
    Cuda = 4,
    /// NCCL error.
    Nccl = 5,
    /// A rank did not reach a collective within `--timeout`.
    Timeout = 6,
    /// Stopped by SIGTERM or SIGUSR1, with what was measured saved.
    Interrupted = 7,
    /// A strategy did not reproduce the single-rank model.
    WrongResult = 8,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}
