//! Run control: the signals that stop a sweep at the next safe point, the
//! watchdog that turns a hung rank into a clean job-wide abort, and the fault
//! injection the tests use. Fault injection is compiled in but inert unless
//! `FAPOOL_FAULT` is set.

use crate::exit::Exit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// SIGTERM and SIGUSR1 (Slurm's warning before the time limit) request a stop
/// at the next batch boundary.
pub fn install_stop_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR1, on_stop_signal as *const () as libc::sighandler_t);
    }
}

/// Whether this rank received a stop signal.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Ends every rank of the job with `code` (`MPI_Abort`): what a rank does
/// when it cannot go on and its peers may be waiting for it in a collective.
pub fn abort_job(code: Exit) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: MPI_Abort may be called at any time after MPI_Init; it ends
    // every rank of the job and does not return.
    unsafe {
        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code.code());
    }
    unreachable!("MPI_Abort returned")
}

/// A fault to inject at a given world rank and global batch number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The rank stops making progress (sleeps forever).
    Hang,
    /// The rank exits abruptly (code 42), as after a crash.
    Exit,
    /// The rank reports its device unusable before the batch.
    Device,
    /// A device (CUDA) error in the batch's work on that rank.
    DeviceError,
    /// A communication (NCCL) error in the batch's work on that rank.
    CommError,
}

/// What an injected fault leaves the batch to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultEffect {
    /// Nothing happened: run the batch.
    None,
    /// Run the batch, but the pool's device is unusable.
    DeviceUnusable,
    /// The batch fails with a device error.
    DeviceError,
    /// The batch fails with a communication error.
    CommError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub rank: usize,
    pub batch: u64,
}

impl Fault {
    /// Parses `FAPOOL_FAULT`, e.g. `hang:rank=1:batch=2` (batch counts every
    /// batch of the run from 0, across strategies and categories).
    pub fn from_env() -> Option<Self> {
        Self::parse(&std::env::var("FAPOOL_FAULT").ok()?)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let kind = match parts.next()? {
            "hang" => FaultKind::Hang,
            "exit" => FaultKind::Exit,
            "device" => FaultKind::Device,
            "device-error" => FaultKind::DeviceError,
            "comm-error" => FaultKind::CommError,
            _ => return None,
        };
        let (mut rank, mut batch) = (None, None);
        for p in parts {
            let (k, v) = p.split_once('=')?;
            match k {
                "rank" => rank = v.parse().ok(),
                "batch" => batch = v.parse().ok(),
                _ => return None,
            }
        }
        Some(Self { kind, rank: rank?, batch: batch? })
    }

    /// Applies the fault if it is due (a hang or an exit happens here).
    pub fn apply(self, rank: usize, batch: u64) -> FaultEffect {
        if self.rank != rank || self.batch != batch {
            return FaultEffect::None;
        }
        match self.kind {
            FaultKind::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            FaultKind::Exit => std::process::exit(42),
            FaultKind::Device => FaultEffect::DeviceUnusable,
            FaultKind::DeviceError => FaultEffect::DeviceError,
            FaultKind::CommError => FaultEffect::CommError,
        }
    }
}

/// Aborts the whole job (exit [`Exit::Timeout`]) when this rank makes no
/// progress for `timeout`.
///
/// Progress is a heartbeat the runner beats at every batch boundary and the
/// comm layer at every message; a rank stuck in a collective whose peer hangs
/// stops beating. Every rank's watchdog fires at about the same moment, but
/// the failure must be in the results file before any rank aborts: rank 0
/// (which owns the file) runs `on_timeout` — marking the batch failed — and
/// then aborts; every other rank waits [`Watchdog::grace`] first, so rank 0's
/// abort normally ends it, and aborts itself only if rank 0 could not.
pub struct Watchdog {
    beat: Arc<AtomicU64>,
    origin: Instant,
}

impl Watchdog {
    /// How long ranks other than 0 wait after their own timeout before
    /// aborting: longer than rank 0 needs to mark the file.
    pub fn grace(timeout: Duration) -> Duration {
        timeout.max(Duration::from_secs(10))
    }

    pub fn start(timeout: Duration, rank: usize, on_timeout: impl Fn() + Send + 'static) -> Self {
        let beat = Arc::new(AtomicU64::new(0));
        let origin = Instant::now();
        let watched = beat.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200).min(timeout / 4));
            let last = Duration::from_millis(watched.load(Ordering::SeqCst));
            let idle = origin.elapsed().saturating_sub(last);
            if idle > timeout {
                eprintln!("fapool: rank {rank}: no progress for {:.0} s (--timeout {:.0} s); aborting the job", idle.as_secs_f64(), timeout.as_secs_f64());
                if rank == 0 {
                    on_timeout();
                } else {
                    std::thread::sleep(Self::grace(timeout));
                }
                abort_job(Exit::Timeout);
            }
        });
        Self { beat, origin }
    }

    /// Records progress now.
    pub fn beat(&self) {
        self.beat.store(self.origin.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    /// A cheap handle to beat from elsewhere.
    pub fn handle(&self) -> Heartbeat {
        Heartbeat { beat: self.beat.clone(), origin: self.origin }
    }
}

/// A clone of the watchdog's heartbeat.
#[derive(Clone)]
pub struct Heartbeat {
    beat: Arc<AtomicU64>,
    origin: Instant,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.beat.store(self.origin.elapsed().as_millis() as u64, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_with_rank_and_batch() {
        assert_eq!(Fault::parse("hang:rank=1:batch=2"), Some(Fault { kind: FaultKind::Hang, rank: 1, batch: 2 }));
        assert_eq!(Fault::parse("device:batch=0:rank=3"), Some(Fault { kind: FaultKind::Device, rank: 3, batch: 0 }));
        assert_eq!(Fault::parse("device-error:rank=0:batch=1"), Some(Fault { kind: FaultKind::DeviceError, rank: 0, batch: 1 }));
        assert_eq!(Fault::parse("comm-error:rank=2:batch=0"), Some(Fault { kind: FaultKind::CommError, rank: 2, batch: 0 }));
        assert_eq!(Fault::parse("explode:rank=1:batch=2"), None);
        assert_eq!(Fault::parse("hang:rank=1"), None);
    }

    #[test]
    fn a_device_fault_only_fires_at_its_rank_and_batch() {
        let f = Fault { kind: FaultKind::Device, rank: 2, batch: 5 };
        assert_eq!(f.apply(1, 5), FaultEffect::None);
        assert_eq!(f.apply(2, 4), FaultEffect::None);
        assert_eq!(f.apply(2, 5), FaultEffect::DeviceUnusable);
        assert_eq!(Fault { kind: FaultKind::DeviceError, ..f }.apply(2, 5), FaultEffect::DeviceError);
    }
}
