//! GPU energy readings through NVML, and the identity of the GPU they come
//! from (UUID, driver version) for the results' provenance.
//!
//! A [`GpuMonitor`] is bound to the NVML device that is the same physical GPU
//! as a CUDA device, matched by PCI bus id (CUDA and NVML number devices
//! differently, and `CUDA_VISIBLE_DEVICES` renumbers only CUDA's). Readings
//! are cheap (a driver call each) and meant to be taken at phase boundaries:
//! energy per phase is the difference of two [`GpuMonitor::energy_j`] calls.
//!
//! NVML is loaded at run time; when it is missing every constructor returns
//! an [`EnergyError`], never a panic, so runs without it simply record no
//! energy. This module must not decide what is measured or when.

use nvml_wrapper::Nvml;

/// Errors of the energy layer.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    #[error("NVML is not available: {0}")]
    Unavailable(String),
    #[error("no NVML device has PCI bus id {0}")]
    NoSuchDevice(String),
    #[error("NVML: {0}")]
    Nvml(String),
}

pub type Result<T> = std::result::Result<T, EnergyError>;

fn nvml_err(e: nvml_wrapper::error::NvmlError) -> EnergyError {
    EnergyError::Nvml(e.to_string())
}

/// Energy readings of one GPU.
pub struct GpuMonitor {
    nvml: Nvml,
    index: u32,
    uuid: String,
    driver_version: String,
}

/// NVML writes bus ids as `00000000:19:00.0`, CUDA as `0000:19:00.0`;
/// compare them without the domain's leading zeros and case.
fn normalise_bus_id(id: &str) -> String {
    let id = id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) => {
            format!("{:x}:{rest}", u32::from_str_radix(domain, 16).unwrap_or(0))
        }
        None => id,
    }
}

impl GpuMonitor {
    /// Binds to the GPU at `pci_bus_id` (as `CudaBackend::pci_bus_id` gives it).
    pub fn new(pci_bus_id: &str) -> Result<Self> {
        let nvml = Nvml::init().map_err(|e| EnergyError::Unavailable(e.to_string()))?;
        let want = normalise_bus_id(pci_bus_id);
        let count = nvml.device_count().map_err(nvml_err)?;
        let mut found = None;
        for i in 0..count {
            let dev = nvml.device_by_index(i).map_err(nvml_err)?;
            let bus = dev.pci_info().map_err(nvml_err)?.bus_id;
            if normalise_bus_id(&bus) == want {
                found = Some((i, dev.uuid().map_err(nvml_err)?));
                break;
            }
        }
        let (index, uuid) = found.ok_or_else(|| EnergyError::NoSuchDevice(pci_bus_id.to_string()))?;
        let driver_version = nvml.sys_driver_version().map_err(nvml_err)?;
        Ok(Self { nvml, index, uuid, driver_version })
    }

    fn device(&self) -> Result<nvml_wrapper::Device<'_>> {
        self.nvml.device_by_index(self.index).map_err(nvml_err)
    }

    /// The GPU's total energy counter since the driver loaded, in joules
    /// (NVML counts millijoules; Volta and newer).
    pub fn energy_j(&self) -> Result<f64> {
        Ok(self.device()?.total_energy_consumption().map_err(nvml_err)? as f64 / 1e3)
    }

    /// The GPU's UUID (`GPU-...`), stable across reboots and renumbering.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }
    /// The NVIDIA driver version, e.g. "580.65.06".
    pub fn driver_version(&self) -> &str {
        &self.driver_version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_match_across_cuda_and_nvml_spellings() {
        assert_eq!(normalise_bus_id("0000:19:00.0"), normalise_bus_id("00000000:19:00.0"));
        assert_eq!(normalise_bus_id("0000:1A:00.0"), normalise_bus_id("00000000:1a:00.0"));
        assert_ne!(normalise_bus_id("0000:19:00.0"), normalise_bus_id("0000:1a:00.0"));
    }

    #[test]
    fn a_missing_nvml_or_device_is_an_error_not_a_panic() {
        // With NVML present this bus id matches no device; without it NVML is unavailable.
        assert!(GpuMonitor::new("ffff:ff:1f.7").is_err());
    }
}
