//! Every CUDA kernel agrees with the CPU reference, in every dtype — on a
//! machine with a GPU. Elsewhere the test says it skipped and passes.

use fapool::backend::cuda::{probe, CudaBackend};
use fapool::backend::Dtype;
use fapool::gpu_checks::{check_kernels, print_table};

#[test]
fn every_cuda_kernel_matches_the_cpu_reference() {
    if let Err(why) = probe::cuda_backend_libraries_present() {
        eprintln!("SKIPPED every_cuda_kernel_matches_the_cpu_reference: {why}");
        return;
    }
    for dtype in [Dtype::Bf16, Dtype::Fp16, Dtype::Fp32] {
        let backend = CudaBackend::new(0, dtype).expect("CUDA backend on device 0");
        let rows = check_kernels(&backend, 7);
        assert!(print_table(&rows), "{dtype}: some kernels disagree with the CPU reference");
    }
}
