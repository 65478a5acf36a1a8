//! Finding the CUDA libraries before anything touches them.
//!
//! The CUDA bindings load the driver, NVRTC, cuBLAS, cuBLASLt and NCCL at run
//! time and abort the process when one is missing. This module looks for each
//! with `dlopen` under exactly the file names the bindings will try, closes it
//! again, and only then asks the present ones for versions and the visible
//! GPU count. `--backend auto` uses it to fall back to the CPU backend with a
//! clear message; `fapool env` prints the report.
//!
//! This module must not create a CUDA context or allocate device memory.

use std::ffi::{c_int, CString};

/// What was found. Library fields hold the file name that loaded, or `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LibraryReport {
    /// The CUDA driver (`libcuda.so.1`).
    pub driver: Option<String>,
    /// NVRTC, which compiles the kernels at run time.
    pub nvrtc: Option<String>,
    pub cublas: Option<String>,
    pub cublaslt: Option<String>,
    /// NCCL, for the collectives of multi-GPU runs.
    pub nccl: Option<String>,
    /// GPUs the driver sees (honours `CUDA_VISIBLE_DEVICES`); `None` without a driver.
    pub gpu_count: Option<usize>,
    /// CUDA version the driver supports, e.g. "13.0".
    pub driver_cuda_version: Option<String>,
    /// NVRTC's CUDA version, e.g. "13.0".
    pub nvrtc_version: Option<String>,
    /// cuBLAS version, e.g. "13.0.2".
    pub cublas_version: Option<String>,
    /// NCCL version, e.g. "2.28.3".
    pub nccl_version: Option<String>,
    /// Human-readable notes on what is missing or odd.
    pub notes: Vec<String>,
}

impl LibraryReport {
    /// Reasons a CUDA run (backend and NCCL transport) cannot start here;
    /// empty when it can.
    pub fn missing(&self) -> Vec<String> {
        let mut out = self.missing_for_backend();
        for (what, found) in [("cuBLASLt (libcublasLt.so)", &self.cublaslt), ("NCCL (libnccl.so)", &self.nccl)] {
            if found.is_none() {
                out.push(format!("{what} not found"));
            }
        }
        out
    }

    /// Reasons the CUDA backend alone (one GPU, no collectives) cannot run.
    pub fn missing_for_backend(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (what, found) in [("CUDA driver (libcuda.so.1)", &self.driver), ("NVRTC (libnvrtc.so.13/.12)", &self.nvrtc), ("cuBLAS (libcublas.so)", &self.cublas)] {
            if found.is_none() {
                out.push(format!("{what} not found"));
            }
        }
        match self.gpu_count {
            Some(0) => out.push("the CUDA driver sees no GPU".into()),
            None if self.driver.is_some() => out.push("the CUDA driver could not be initialised".into()),
            _ => {}
        }
        out
    }

    /// One line per item, for `fapool env`.
    pub fn lines(&self) -> Vec<String> {
        fn line(what: &str, lib: &Option<String>, version: Option<&Option<String>>) -> String {
            match (lib, version.and_then(|v| v.as_ref())) {
                (None, _) => format!("{what}: not found"),
                (Some(l), None) => format!("{what}: {l}"),
                (Some(l), Some(v)) => format!("{what}: {l} ({v})"),
            }
        }
        let cuda = |v: &Option<String>| v.as_ref().map(|v| format!("CUDA {v}"));
        let mut out = vec![
            line("CUDA driver", &self.driver, Some(&cuda(&self.driver_cuda_version))),
            line("NVRTC", &self.nvrtc, Some(&cuda(&self.nvrtc_version))),
            line("cuBLAS", &self.cublas, Some(&self.cublas_version)),
            line("cuBLASLt", &self.cublaslt, None),
            line("NCCL", &self.nccl, Some(&self.nccl_version)),
            format!("visible GPUs: {}", self.gpu_count.map(|n| n.to_string()).unwrap_or_else(|| "unknown (no driver)".into())),
        ];
        out.extend(self.notes.iter().map(|n| format!("note: {n}")));
        out
    }
}

/// Tries each candidate with `dlopen(RTLD_LAZY | RTLD_LOCAL)`; returns the
/// first that loads, closing it again.
fn first_loadable(candidates: &[String]) -> Option<String> {
    candidates.iter().find(|name| can_dlopen(name)).cloned()
}

fn can_dlopen(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string; a non-null handle is
    // closed exactly once. Loading runs the library's initialisers, which
    // the CUDA libraries keep free of side effects beyond their own state.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

/// The file names the bindings try for a library, in their order.
fn candidates(lib: &str) -> Vec<String> {
    cudarc::get_lib_name_candidates(lib)
}

/// The NVRTC library the bindings would load, if any.
pub fn nvrtc_library() -> Option<String> {
    first_loadable(&candidates("nvrtc"))
}

/// The NCCL library the bindings would load, if any.
pub fn nccl_library() -> Option<String> {
    first_loadable(&candidates("nccl"))
}

/// Probes every library and, where present, its version; never fails.
pub fn probe_cuda_libraries() -> LibraryReport {
    let mut r = LibraryReport {
        driver: first_loadable(&candidates("cuda")),
        nvrtc: nvrtc_library(),
        cublas: first_loadable(&candidates("cublas")),
        cublaslt: first_loadable(&candidates("cublasLt")),
        nccl: nccl_library(),
        ..Default::default()
    };
    if r.nccl.is_none() && can_dlopen("libnccl.so.2") {
        r.notes.push("libnccl.so.2 exists but libnccl.so does not; the NCCL bindings look for libnccl.so: add that symlink (or install the NCCL development package)".into());
    }
    if r.driver.is_some() {
        let mut v: c_int = 0;
        // SAFETY: the driver library is present (checked above), so the
        // binding can resolve the symbol; `v` is a valid out-pointer.
        if unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) } == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            r.driver_cuda_version = Some(format!("{}.{}", v / 1000, (v % 1000) / 10));
        }
        r.gpu_count = match cudarc::driver::result::init().and_then(|()| cudarc::driver::result::device::get_count()) {
            Ok(n) => Some(n.max(0) as usize),
            Err(e) => {
                r.notes.push(format!("cuInit failed: {e:?}"));
                None
            }
        };
    }
    if r.nvrtc.is_some() {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: NVRTC is present; both out-pointers are valid.
        if unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) } == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            r.nvrtc_version = Some(format!("{major}.{minor}"));
        }
    }
    if r.cublas.is_some() {
        use cudarc::cublas::sys::{cublasGetProperty, cublasStatus_t, libraryPropertyType};
        let mut parts = [0 as c_int; 3];
        let props = [libraryPropertyType::MAJOR_VERSION, libraryPropertyType::MINOR_VERSION, libraryPropertyType::PATCH_LEVEL];
        // SAFETY: cuBLAS is present; each out-pointer is valid. No handle is needed.
        let ok = props.iter().zip(parts.iter_mut()).all(|(&p, out)| unsafe { cublasGetProperty(p, out) } == cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        if ok {
            r.cublas_version = Some(format!("{}.{}.{}", parts[0], parts[1], parts[2]));
        }
    }
    if r.nccl.is_some() {
        if let Ok(code) = cudarc::nccl::result::get_nccl_version() {
            r.nccl_version = Some(format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100));
        }
    }
    r
}

/// Whether a CUDA run can start here: `Ok` with the report when every
/// library (driver, NVRTC, cuBLAS, cuBLASLt, NCCL) is present and at least
/// one GPU is visible, otherwise a message naming what is missing (for
/// `--backend auto` to print before it falls back to the CPU backend).
pub fn cuda_libraries_present() -> Result<LibraryReport, String> {
    explain(probe_cuda_libraries(), LibraryReport::missing)
}

/// Like [`cuda_libraries_present`], for the backend alone (no NCCL).
pub fn cuda_backend_libraries_present() -> Result<LibraryReport, String> {
    explain(probe_cuda_libraries(), LibraryReport::missing_for_backend)
}

fn explain(report: LibraryReport, missing: fn(&LibraryReport) -> Vec<String>) -> Result<LibraryReport, String> {
    let missing = missing(&report);
    if missing.is_empty() {
        Ok(report)
    } else {
        let mut msg = missing.join("; ");
        for n in &report.notes {
            msg.push_str("; ");
            msg.push_str(n);
        }
        Err(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_never_panics_and_reports_missing_libraries_by_name() {
        let report = probe_cuda_libraries();
        match cuda_libraries_present() {
            Ok(r) => assert!(r.gpu_count.unwrap_or(0) > 0),
            Err(msg) => {
                assert!(!msg.is_empty());
                assert!(!report.missing().is_empty());
            }
        }
        assert_eq!(report.lines().len(), 6 + report.notes.len());
    }

    #[test]
    fn a_library_that_does_not_exist_is_not_loadable() {
        assert!(!can_dlopen("libfapool-does-not-exist.so.7"));
        assert_eq!(first_loadable(&["libfapool-does-not-exist.so".into()]), None);
    }
}
