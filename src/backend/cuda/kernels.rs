//! The CUDA kernel sources and their run-time compilation with NVRTC.
//!
//! Every `.cu` file under `kernels/` is embedded in the binary with
//! `include_str!`, compiled once per process and device architecture (after
//! `kernels/common.cuh`, which is prepended to each file so NVRTC needs no
//! include path), and loaded once per backend. A file may have a target of
//! its own ([`KernelFile::target`]): `flash_sm90.cu` is built for `sm_90a`
//! and exists on sm_90 devices only. Compiled images are cached
//! process-wide; loaded modules and looked-up functions per backend, since
//! modules belong to a CUDA context.
//!
//! This module must not launch kernels or know their arguments: those are
//! declared in `contract` and launched by `launch`.

use super::ffi::NvrtcProgram;
use super::CudaError;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

/// The header every kernel file is compiled after.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One `.cu` file: one NVRTC program, one loaded module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFile {
    Elementwise,
    Norm,
    Embed,
    Copy,
    Argmax,
    Merge,
    Decode,
    Prefill,
    Flash,
    FlashSm90,
    Moe,
}

impl KernelFile {
    /// Every kernel file, in the order `compile_all` loads them.
    pub const ALL: [KernelFile; 11] = [
        KernelFile::Elementwise,
        KernelFile::Norm,
        KernelFile::Embed,
        KernelFile::Copy,
        KernelFile::Argmax,
        KernelFile::Merge,
        KernelFile::Decode,
        KernelFile::Prefill,
        KernelFile::Flash,
        KernelFile::FlashSm90,
        KernelFile::Moe,
    ];

    /// The file's name under `kernels/`.
    pub fn file_name(self) -> &'static str {
        match self {
            KernelFile::Elementwise => "elementwise.cu",
            KernelFile::Norm => "norm.cu",
            KernelFile::Embed => "embed.cu",
            KernelFile::Copy => "copy.cu",
            KernelFile::Argmax => "argmax.cu",
            KernelFile::Merge => "merge.cu",
            KernelFile::Decode => "decode.cu",
            KernelFile::Prefill => "prefill.cu",
            KernelFile::Flash => "flash.cu",
            KernelFile::FlashSm90 => "flash_sm90.cu",
            KernelFile::Moe => "moe.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            KernelFile::Elementwise => include_str!("../../../kernels/elementwise.cu"),
            KernelFile::Norm => include_str!("../../../kernels/norm.cu"),
            KernelFile::Embed => include_str!("../../../kernels/embed.cu"),
            KernelFile::Copy => include_str!("../../../kernels/copy.cu"),
            KernelFile::Argmax => include_str!("../../../kernels/argmax.cu"),
            KernelFile::Merge => include_str!("../../../kernels/merge.cu"),
            KernelFile::Decode => include_str!("../../../kernels/decode.cu"),
            KernelFile::Prefill => include_str!("../../../kernels/prefill.cu"),
            KernelFile::Flash => include_str!("../../../kernels/flash.cu"),
            KernelFile::FlashSm90 => include_str!("../../../kernels/flash_sm90.cu"),
            KernelFile::Moe => include_str!("../../../kernels/moe.cu"),
        }
    }

    /// The NVRTC target this file is built for on a device whose own target
    /// is `device_arch` (`sm_90`, ...), or `None` where it does not apply:
    /// `flash_sm90.cu` uses Hopper-only instructions (wgmma, setmaxnreg),
    /// which need the architecture-specific `sm_90a`.
    pub fn target(self, device_arch: &str) -> Option<String> {
        match self {
            KernelFile::FlashSm90 => (device_arch == "sm_90").then(|| "sm_90a".to_string()),
            _ => Some(device_arch.to_string()),
        }
    }

    /// The full program text NVRTC compiles: the common header, then the file.
    pub fn source(self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.file_name(), self.body())
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|&f| f == self).expect("listed in ALL")
    }
}

/// A compiled program: CUBIN for a real architecture (`sm_XY`), PTX for a
/// virtual one (`compute_XY`), plus NVRTC's log (ptxas statistics when asked).
#[derive(Clone, Debug)]
pub struct CompiledImage {
    pub arch: String,
    pub image: Vec<u8>,
    pub is_cubin: bool,
    pub log: String,
}

/// Compiles one kernel file with NVRTC for `arch` (`sm_90`, `compute_80`, ...).
/// `extra` options are appended (for example `--ptxas-options=-v`).
///
/// The caller must have checked that the NVRTC library can be loaded (see
/// `probe`): the bindings abort the process when it is missing.
pub fn compile(file: KernelFile, arch: &str, extra: &[&str]) -> Result<CompiledImage, CudaError> {
    let src = CString::new(file.source()).expect("kernel sources contain no NUL");
    let name = CString::new(file.file_name()).expect("file names contain no NUL");
    let mut options = vec![format!("--gpu-architecture={arch}"), "-std=c++17".to_string(), "--generate-line-info".to_string()];
    options.extend(extra.iter().map(|s| s.to_string()));
    let failed = |log: String| CudaError::Nvrtc { file: file.file_name(), arch: arch.into(), log };
    let prog = NvrtcProgram::new(&src, &name).map_err(|e| failed(format!("{e:?}")))?;
    let compiled = prog.compile(&options);
    let log = prog.log().unwrap_or_default();
    compiled.map_err(|e| failed(format!("{e:?}\n{log}")))?;
    let is_cubin = arch.starts_with("sm_");
    let image = if is_cubin { prog.cubin() } else { prog.ptx() }.map_err(|e| failed(format!("reading output: {e:?}")))?;
    Ok(CompiledImage { arch: arch.into(), image, is_cubin, log })
}

/// Compiled images by file and architecture.
type ImageCache = Mutex<HashMap<(KernelFile, String), Arc<CompiledImage>>>;

/// Process-wide cache of compiled images, keyed by file and architecture.
fn image_cache() -> &'static ImageCache {
    static CACHE: OnceLock<ImageCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn cached_image(file: KernelFile, arch: &str) -> Result<Arc<CompiledImage>, CudaError> {
    let key = (file, arch.to_string());
    if let Some(img) = image_cache().lock().expect("image cache lock").get(&key) {
        return Ok(img.clone());
    }
    // Compile outside the lock: files are independent and NVRTC is thread-safe.
    let img = Arc::new(compile(file, arch, &[])?);
    image_cache().lock().expect("image cache lock").entry(key).or_insert(img.clone());
    Ok(img)
}

/// The kernels of one backend: modules loaded into its context on first use.
pub struct KernelCache {
    ctx: Arc<CudaContext>,
    arch: String,
    modules: [OnceLock<Arc<CudaModule>>; KernelFile::ALL.len()],
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl KernelCache {
    /// `arch` is the NVRTC target, e.g. `sm_90`.
    pub fn new(ctx: Arc<CudaContext>, arch: String) -> Self {
        Self { ctx, arch, modules: Default::default(), functions: Mutex::new(HashMap::new()) }
    }

    /// The NVRTC target the kernels are built for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn module(&self, file: KernelFile) -> Result<Arc<CudaModule>, CudaError> {
        let slot = &self.modules[file.index()];
        if let Some(m) = slot.get() {
            return Ok(m.clone());
        }
        let arch = file.target(&self.arch).ok_or_else(|| CudaError::Unsupported(format!("{} needs an sm_90 (Hopper) device; this one is {}", file.file_name(), self.arch)))?;
        let img = cached_image(file, &arch)?;
        let ptx = if img.is_cubin { Ptx::from_binary(img.image.clone()) } else { Ptx::from_src(String::from_utf8_lossy(&img.image).trim_end_matches('\0').to_string()) };
        let module = self.ctx.load_module(ptx)?;
        Ok(slot.get_or_init(|| module).clone())
    }

    /// The kernel `name` of `file`, loading the module on first use.
    pub fn function(&self, file: KernelFile, name: &'static str) -> Result<CudaFunction, CudaError> {
        if let Some(f) = self.functions.lock().expect("function cache lock").get(name) {
            return Ok(f.clone());
        }
        let f = self.module(file)?.load_function(name)?;
        self.functions.lock().expect("function cache lock").insert(name, f.clone());
        Ok(f)
    }

    /// Compiles and loads every kernel file now (so that first calls are not
    /// timed with compilation in them).
    pub fn load_all(&self) -> Result<(), CudaError> {
        for file in KernelFile::ALL.into_iter().filter(|f| f.target(&self.arch).is_some()) {
            self.module(file)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spill bytes reported by ptxas for each function of a verbose log.
    fn spills(log: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut current = String::new();
        for line in log.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                current = rest.split('\'').next().unwrap_or("").to_string();
            }
            if line.contains("spill stores") {
                let n = line.split("bytes stack frame,").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).unwrap_or(0);
                out.push((current.clone(), n));
            }
        }
        out
    }

    #[test]
    fn the_hopper_kernel_file_is_built_for_sm_90a_on_sm_90_devices_only() {
        assert_eq!(KernelFile::FlashSm90.target("sm_90").as_deref(), Some("sm_90a"));
        assert_eq!(KernelFile::FlashSm90.target("sm_80"), None);
        assert_eq!(KernelFile::FlashSm90.target("sm_100"), None);
        assert_eq!(KernelFile::Flash.target("sm_90").as_deref(), Some("sm_90"));
        assert_eq!(KernelFile::Decode.target("sm_80").as_deref(), Some("sm_80"));
    }

    #[test]
    fn every_kernel_file_compiles_with_nvrtc() {
        let Some(lib) = crate::backend::cuda::probe::nvrtc_library() else {
            eprintln!("SKIPPED every_kernel_file_compiles_with_nvrtc: no NVRTC library found (set LD_LIBRARY_PATH to a directory holding libnvrtc.so.13 and libnvrtc-builtins)");
            return;
        };
        eprintln!("NVRTC: {lib}");
        for file in KernelFile::ALL {
            // The Hopper kernels exist only for sm_90a; every other file builds everywhere.
            let archs: &[&str] = if file == KernelFile::FlashSm90 { &["sm_90a"] } else { &["compute_80", "compute_90", "sm_80", "sm_90"] };
            for &arch in archs {
                let img = compile(file, arch, &["--ptxas-options=-v"]).unwrap_or_else(|e| panic!("{e}"));
                assert!(!img.image.is_empty(), "{} for {arch}: empty image", file.file_name());
                if arch.starts_with("sm_90") {
                    // For disassembly (`nvdisasm`): FAPOOL_CUBIN_DIR=dir keeps the images.
                    if let Ok(dir) = std::env::var("FAPOOL_CUBIN_DIR") {
                        std::fs::write(std::path::Path::new(&dir).join(format!("{}.{arch}.cubin", file.file_name())), &img.image).expect("write the cubin");
                    }
                    for (func, spill) in spills(&img.log) {
                        eprintln!("{:<14} {:<32} {arch} spill stores {spill} B", file.file_name(), func);
                        if file == KernelFile::Flash {
                            // The two-fragment kernel sits at 255 registers and
                            // spills 12 bytes (loop-invariant values, reloaded
                            // once per tile); it is still the fastest
                            // (docs/perf-notes.md). Anything more is a regression.
                            let budget = if func.contains("_w4m2_") { 16 } else { 0 };
                            assert!(spill <= budget, "{func} spills {spill} B of registers on sm_90 (budget {budget} B):\n{}", img.log);
                        }
                        if file == KernelFile::FlashSm90 {
                            // Both builds (exp2 with and without ftz).
                            assert_eq!(spill, 0, "{func} spills {spill} B of registers on {arch}:\n{}", img.log);
                        }
                    }
                    if file == KernelFile::FlashSm90 {
                        // Either note means ptxas undid the design: MMAs that wait
                        // for each other, or consumers held to the entry register count.
                        for note in ["wgmma.mma_async instructions are serialized", "'setmaxnreg' ignored"] {
                            assert!(!img.log.contains(note), "{}: ptxas reports \"{note}\":\n{}", file.file_name(), img.log);
                        }
                    }
                }
            }
            eprintln!("compiled {} for {}", file.file_name(), archs.join(", "));
        }
    }
}
