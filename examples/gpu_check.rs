//! Checks every CUDA kernel against its reference definition and, with
//! `--bench`, times attention and GEMMs, on one GPU (`fapool check-gpu` and
//! `fapool bench kernels` in one process, with the device described). Exits 1 when a check fails, 2 when
//! the CUDA backend cannot run here.
//!
//! ```text
//! gpu_check [--device N] [--dtype bf16|fp16|fp32|all] [--seed S]
//!           [--bench] [--seq 4096,16384,65536] [--iters 10]
//! ```

use fapool::backend::cuda::{probe, CudaBackend};
use fapool::backend::{Backend, Dtype};
use fapool::{bench, checks};

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device: usize = arg_value(&args, "--device").map(|s| s.parse().expect("--device N")).unwrap_or(0);
    let seed: u64 = arg_value(&args, "--seed").map(|s| s.parse().expect("--seed S")).unwrap_or(1);
    let iters: usize = arg_value(&args, "--iters").map(|s| s.parse().expect("--iters N")).unwrap_or(10);
    let seqs: Vec<usize> = arg_value(&args, "--seq").map(|s| s.split(',').map(|x| x.trim().parse().expect("--seq a,b,c")).collect()).unwrap_or_else(|| vec![4096, 16_384, 65_536]);
    let dtypes = match arg_value(&args, "--dtype").as_deref() {
        None | Some("all") => vec![Dtype::Bf16, Dtype::Fp16, Dtype::Fp32],
        Some("bf16") => vec![Dtype::Bf16],
        Some("fp16") => vec![Dtype::Fp16],
        Some("fp32") => vec![Dtype::Fp32],
        Some(other) => panic!("--dtype {other}: expected bf16, fp16, fp32 or all"),
    };

    let report = probe::probe_cuda_libraries();
    for line in report.lines() {
        println!("{line}");
    }
    if let Err(why) = probe::cuda_backend_libraries_present() {
        eprintln!("the CUDA backend cannot run here: {why}");
        std::process::exit(2);
    }

    let mut all_pass = true;
    for dtype in dtypes {
        let backend = match CudaBackend::new(device, dtype) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("CUDA backend on device {device}: {e}");
                std::process::exit(2);
            }
        };
        let t = std::time::Instant::now();
        if let Err(e) = backend.load_all_kernels() {
            eprintln!("kernels failed to load: {e}");
            std::process::exit(1);
        }
        println!(
            "\n{} (sm {}.{}, {} SMs, PCI {}), {dtype}, kernels built for {} in {:.1} s",
            backend.device_name().unwrap_or_default(),
            backend.compute_capability().0,
            backend.compute_capability().1,
            backend.sm_count(),
            backend.pci_bus_id().unwrap_or_default(),
            backend.kernel_arch(),
            t.elapsed().as_secs_f64()
        );
        let rows = checks::run_all(&backend, seed);
        all_pass &= checks::print_table(&rows);
        if args.iter().any(|a| a == "--bench") {
            match bench::kernels::run(&backend, &seqs, iters) {
                Ok(rows) => bench::print_table(&rows),
                Err(e) => {
                    eprintln!("benchmark failed: {e}");
                    all_pass = false;
                }
            }
        }
        println!("peak memory of this backend's buffers: {:.2} GiB", backend.peak_memory_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64);
    }
    std::process::exit(if all_pass { 0 } else { 1 });
}
