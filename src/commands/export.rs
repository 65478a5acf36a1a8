//! `fapool export-weights`: a job's weights (seeded, or its checkpoint's)
//! written as a Hugging Face-style checkpoint, `model.safetensors` and
//! `config.json`, which `[model] config` and `weights` read back and other
//! frameworks load. No MPI, no device.

use super::{load, Failure};
use crate::backend::Dtype;
use crate::exit::Exit;
use crate::model::{export, Weights};
use std::path::Path;

/// `fapool export-weights JOB --out DIR`.
pub fn export_weights(job: &Path, out: &Path, dtype: Dtype, sets: &[String]) -> Result<(), Failure> {
    let (job, _) = load(job, sets)?;
    let m = job.model.resolve()?;
    let w = Weights::open(&m).map_err(|v| Failure::new(Exit::Usage, v.to_string()))?;
    export::write(&w, out, dtype).map_err(|e| Failure::new(Exit::Failure, e.to_string()))?;
    println!("wrote {} ({} parameters, {dtype}) and its config.json to {}", m.name, m.params(), out.display());
    Ok(())
}
