//! The built-in GPU table the roofline uses when no calibration file is
//! given: dense bf16/fp16 and fp32 peaks, HBM bandwidth, memory, SMs,
//! NVLink bandwidth as vendors quote it and a typical InfiniBand link per
//! GPU, plus the efficiency curves' ceilings.
//!
//! Peaks and bandwidths are the vendors' data-sheet figures (dense, without
//! sparsity). The efficiency ceilings are stated assumptions: Hopper's come
//! from the suite's own measurements on an H200 (cuBLAS 8192³ GEMM at 765
//! TFLOP/s of 989; the suite's mma.sync flash kernel at about 320 TFLOP/s;
//! decode attention at up to 4.0 TB/s of 4.8; copies at 4.13 TB/s); Ampere's
//! are typical cuBLAS and FlashAttention-2-class fractions for the same
//! instruction set. `docs/planner.md` compares the roofline with the
//! measured H200 figures. This module is data; the cost model uses it.

/// One GPU model.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSpec {
    /// The table key cluster files name (`a100-80gb-sxm`, `h200`, `cpu`).
    pub key: &'static str,
    /// Substrings of the driver's device name that identify it.
    pub matches: &'static [&'static str],
    pub memory_gib: f64,
    /// Dense bf16/fp16 tensor-core peak (TFLOP/s).
    pub tflops_16: f64,
    /// fp32 peak without TF32 (TFLOP/s).
    pub tflops_32: f64,
    /// HBM bandwidth (TB/s).
    pub hbm_tbs: f64,
    pub sms: usize,
    /// NVLink bandwidth per GPU as vendors quote it, both directions together (GB/s); 0 without NVLink.
    pub nvlink_gbs: f64,
    /// PCIe bandwidth per direction (GB/s), the peer path without NVLink.
    pub pcie_gbs: f64,
    /// Typical InfiniBand per GPU, one direction (GB/s): HDR 25, NDR 50.
    pub ib_gbs: f64,
    /// Ceilings of the efficiency curves (fractions of the peaks).
    pub gemm_eff: f64,
    pub attention_eff: f64,
    pub decode_bw_eff: f64,
    pub copy_bw_eff: f64,
    /// Host-side cost of one kernel launched eagerly and inside a replayed graph (s).
    pub launch_s: f64,
    pub graph_launch_s: f64,
}

/// The table.
pub fn table() -> Vec<GpuSpec> {
    let a100 = |key, matches, memory_gib, hbm_tbs, nvlink_gbs| GpuSpec {
        key,
        matches,
        memory_gib,
        tflops_16: 312.0,
        tflops_32: 19.5,
        hbm_tbs,
        sms: 108,
        nvlink_gbs,
        pcie_gbs: 32.0,
        ib_gbs: 25.0,
        gemm_eff: 0.80,
        attention_eff: 0.45,
        decode_bw_eff: 0.75,
        copy_bw_eff: 0.85,
        launch_s: 4e-6,
        graph_launch_s: 1.5e-6,
    };
    let hopper = |key, matches, memory_gib, hbm_tbs| GpuSpec {
        key,
        matches,
        memory_gib,
        tflops_16: 989.0,
        tflops_32: 67.0,
        hbm_tbs,
        sms: 132,
        nvlink_gbs: 900.0,
        pcie_gbs: 64.0,
        ib_gbs: 50.0,
        gemm_eff: 0.77,
        attention_eff: 0.32,
        decode_bw_eff: 0.83,
        copy_bw_eff: 0.86,
        launch_s: 4e-6,
        graph_launch_s: 1.5e-6,
    };
    vec![
        a100("a100-40gb-sxm", &["A100-SXM4-40GB", "A100 SXM4 40GB"], 40.0, 1.555, 600.0),
        a100("a100-80gb-sxm", &["A100-SXM4-80GB", "A100 SXM4 80GB", "A100 80GB HBM2e"], 80.0, 2.039, 600.0),
        a100("a100-40gb-pcie", &["A100-PCIE-40GB", "A100 PCIe 40GB"], 40.0, 1.555, 0.0),
        a100("a100-80gb-pcie", &["A100-PCIE-80GB", "A100 80GB PCIe"], 80.0, 1.935, 0.0),
        hopper("h100-sxm", &["H100 80GB HBM3", "H100-SXM5-80GB", "H100 SXM"], 80.0, 3.35),
        hopper("h200", &["H200"], 140.0, 4.8),
        cpu(),
    ]
}

/// One CPU core as the CPU backend uses it (f32, one rank per core): a
/// placeholder for runs without a calibration file, which is what makes
/// CPU predictions meaningful (`fapool calibrate` on the CPU backend).
pub fn cpu() -> GpuSpec {
    GpuSpec {
        key: "cpu",
        matches: &[],
        memory_gib: 8.0,
        // matrixmultiply's f32 GEMM on one AVX2 core, and plain loops elsewhere.
        tflops_16: 0.05,
        tflops_32: 0.05,
        hbm_tbs: 0.01,
        sms: 1,
        nvlink_gbs: 10.0,
        pcie_gbs: 5.0,
        ib_gbs: 5.0,
        gemm_eff: 0.8,
        attention_eff: 0.05,
        decode_bw_eff: 0.3,
        copy_bw_eff: 0.5,
        launch_s: 2e-7,
        graph_launch_s: 2e-7,
    }
}

/// The entry with this key.
pub fn by_key(key: &str) -> Option<GpuSpec> {
    table().into_iter().find(|g| g.key == key)
}

/// The entry a driver's device name identifies (PCIe before SXM where both could match).
pub fn by_device_name(name: &str) -> Option<GpuSpec> {
    table().into_iter().find(|g| g.matches.iter().any(|m| name.contains(m)))
}

/// Every key, for messages.
pub fn keys() -> Vec<&'static str> {
    table().iter().map(|g| g.key).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_find_their_entry() {
        assert_eq!(by_device_name("NVIDIA H200").unwrap().key, "h200");
        assert_eq!(by_device_name("NVIDIA A100-SXM4-80GB").unwrap().key, "a100-80gb-sxm");
        assert_eq!(by_device_name("NVIDIA A100-PCIE-40GB").unwrap().key, "a100-40gb-pcie");
        assert!(by_device_name("NVIDIA GeForce RTX 4090").is_none());
    }
}
