//! Every kernel check of `fapool::checks`, written once and instantiated
//! for each backend (`for_each_kernel_check!`): `CHECK::matches_the_reference_on_cpu`
//! always runs; `CHECK::matches_the_reference_on_cuda` runs in every dtype
//! on device 0 where the CUDA backend can start, and elsewhere says SKIPPED
//! and passes, unless `FAPOOL_REQUIRE_GPU=1` asks for a GPU: then it fails.

use fapool::backend::cpu::CpuBackend;
use fapool::backend::cuda::{probe, CudaBackend};
use fapool::backend::Dtype;
use fapool::checks::{self, CheckRow, Checker};

/// Inputs are drawn from this seed (`FAPOOL_CHECK_SEED` overrides it), so a
/// failure can be rerun with the same values.
fn seed() -> u64 {
    std::env::var("FAPOOL_CHECK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7)
}

fn assert_pass(device: &str, rows: &[CheckRow]) {
    assert!(!rows.is_empty(), "{device}: the check produced no row");
    println!("{device}, seed {}", seed());
    assert!(checks::print_table(rows), "{device}: some outputs disagree with the reference");
}

fn on_cpu(check: fn(&mut Checker<CpuBackend>)) {
    assert_pass("cpu", &checks::run(&CpuBackend::new(), seed(), check));
}

fn on_cuda(name: &str, check: fn(&mut Checker<CudaBackend>)) {
    if let Err(why) = probe::cuda_backend_libraries_present() {
        let required = std::env::var("FAPOOL_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(!required, "FAPOOL_REQUIRE_GPU=1, but the CUDA backend cannot run here: {why}");
        eprintln!("SKIPPED {name}::matches_the_reference_on_cuda: {why}");
        return;
    }
    for dtype in [Dtype::Bf16, Dtype::Fp16, Dtype::Fp32] {
        let be = CudaBackend::new(0, dtype).expect("CUDA backend on device 0");
        assert_pass(&format!("cuda {dtype}"), &checks::run(&be, seed(), check));
    }
}

macro_rules! kernel_tests {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[test]
            fn matches_the_reference_on_cpu() {
                super::on_cpu(fapool::checks::$check)
            }
            #[test]
            fn matches_the_reference_on_cuda() {
                super::on_cuda(stringify!($check), fapool::checks::$check)
            }
        }
    )*};
}

fapool::for_each_kernel_check!(kernel_tests);
