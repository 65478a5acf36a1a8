//! `fapool check-gpu`: every CUDA kernel against the reference definitions
//! on fresh random inputs, outputs poisoned first (the same checks
//! `tests/kernels.rs` runs on every backend).

use super::Failure;
use crate::backend::cuda::CudaBackend;
use crate::backend::Dtype;
use crate::exit::Exit;

/// `fapool check-gpu --dtype bf16|fp16|fp32|all`.
pub fn check_gpu(dtype: &str, seed: u64) -> Result<(), Failure> {
    let dtypes = match dtype {
        "all" => vec![Dtype::Bf16, Dtype::Fp16, Dtype::Fp32],
        "bf16" => vec![Dtype::Bf16],
        "fp16" => vec![Dtype::Fp16],
        "fp32" => vec![Dtype::Fp32],
        other => return Err(Failure::new(Exit::Usage, format!("--dtype {other}: expected bf16, fp16, fp32 or all"))),
    };
    if let Err(why) = crate::backend::cuda::probe::cuda_backend_libraries_present() {
        return Err(Failure::new(Exit::Cuda, format!("the CUDA backend cannot run here: {why}")));
    }
    let mut pass = true;
    for d in dtypes {
        let be = CudaBackend::new(0, d).map_err(|e| Failure::new(Exit::Cuda, e.to_string()))?;
        println!("{} ({d})", be.device_name().unwrap_or_default());
        pass &= crate::checks::print_table(&crate::checks::run_all(&be, seed));
    }
    if pass {
        Ok(())
    } else {
        Err(Failure::silent(Exit::WrongResult))
    }
}
