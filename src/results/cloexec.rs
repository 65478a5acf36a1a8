//! Keeps the results file's descriptor out of child processes.
//!
//! HDF5 opens files without `O_CLOEXEC` and locks them with `flock`. A child
//! process (a helper tool, a launcher) started while the file is open would
//! inherit the descriptor and with it the lock, and a later open of the same
//! file (a resumed run, `analyze`) would fail with "unable to lock file"
//! for as long as that child lives.

use std::path::Path;

/// Marks every descriptor of this process that refers to `path` close-on-exec.
/// Best effort: where `/proc/self/fd` cannot be read, nothing changes.
#[cfg(target_os = "linux")]
pub(crate) fn keep_from_children(path: &Path) {
    let Ok(target) = std::fs::canonicalize(path) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<libc::c_int>().ok()) else {
            continue;
        };
        if std::fs::read_link(entry.path()).is_ok_and(|p| p == target) {
            // SAFETY: fcntl on a descriptor number only reads and sets its
            // flags; a descriptor closed meanwhile makes it fail with EBADF,
            // which is harmless here.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn keep_from_children(_path: &Path) {}
