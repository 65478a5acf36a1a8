//! Tests of the calibration's measurement helpers (tiles, the grid, the decode loop).
use super::*;
use crate::backend::cpu::CpuBackend;

#[test]
fn large_patterns_repeat_a_random_tile_to_their_last_row() {
    assert_eq!(tile_cols(TILE), None);
    assert_eq!(tile_cols(16_777_259), None, "a prime length has no row width");
    assert_eq!(tile_cols(TILE + 1), Some(65281), "257 × 65281");
    assert_eq!(tile_cols(1 << 30), Some(65536));
    assert_eq!(tile_cols(TILE + 3 * 4096), Some(4096));
    let be = CpuBackend::new();
    be.set_poison_outputs(true);
    let len = TILE + 3 * 4096;
    let host = be.download(&pattern(&be, len).unwrap()).unwrap();
    assert_eq!(host.len(), len);
    let bound = 3f32.sqrt();
    assert!(host.iter().all(|v| v.abs() <= bound), "every value written (outputs poisoned with NaN) and uniform on ±√3");
    let (mean, var) = (host.iter().map(|&v| v as f64).sum::<f64>() / len as f64, host.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / len as f64);
    assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.01, "unit variance: mean {mean}, variance {var}");
    assert!((TILE..len).all(|i| host[i] == host[i - TILE]), "the rows past the tile repeat it");
    let small = be.download(&pattern(&be, 1000).unwrap()).unwrap();
    let other = be.download(&pattern(&be, 1000).unwrap()).unwrap();
    assert_ne!(small, other, "each buffer draws its own values");
}

#[test]
fn the_grid_takes_the_models_projection_widths_and_the_jobs_prompt_lengths() {
    let cfg = crate::model::ModelConfig::dense_4l();
    let g = Grid::gpu().for_model(&cfg, 2).with_lengths(&[4096, 65536, 65536]);
    for n in [12288, 4096, 16384, 32000] {
        assert!(g.gemm_n.contains(&n), "n = {n} in {:?}", g.gemm_n);
    }
    assert!(g.gemm_k.contains(&16384) && g.gemm_k.windows(2).all(|w| w[0] < w[1]), "{:?}", g.gemm_k);
    assert_eq!(g.prefill_sq.iter().filter(|&&s| s == 65536).count(), 1, "{:?}", g.prefill_sq);
    assert!(g.prefill_sq.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn the_decode_loop_overhead_on_a_backend_that_cannot_record_has_no_recording_cost() {
    let be = CpuBackend::new();
    let c = Calibration { bandwidth: [("elementwise".to_string(), vec![[1e4, 1e-6], [1e8, 1e-2]])].into(), ..Default::default() };
    let lo = loop_overhead(&be, Dtype::Fp32, &c, &crate::model::ModelConfig::tiny()).unwrap();
    assert_eq!((lo.record_s, lo.record_per_op_s), (0.0, 0.0));
    assert!(lo.step_s.is_finite() && lo.step_s >= 0.0 && lo.step_s < 0.1, "{lo:?}");
}

#[test]
fn recording_is_fitted_as_a_fixed_part_and_a_part_per_operation() {
    // 300 us + 14 us per op above steady steps of 1 ms and 1.5 ms.
    let (fixed, per_op) = recording_fit((20, (1e-3 + 300e-6 + 20.0 * 14e-6, 1e-3)), (80, (1.5e-3 + 300e-6 + 80.0 * 14e-6, 1.5e-3)));
    assert!((fixed - 300e-6).abs() < 1e-9 && (per_op - 14e-6).abs() < 1e-12, "{fixed} {per_op}");
    // A larger step that records for less has no part per operation; a first step faster than a steady one costs nothing.
    let (fixed, per_op) = recording_fit((20, (2e-3, 1e-3)), (80, (1.5e-3, 1e-3)));
    assert!((fixed - 1e-3).abs() < 1e-12 && per_op == 0.0, "{fixed} {per_op}");
    assert_eq!(recording_fit((20, (0.9e-3, 1e-3)), (80, (0.9e-3, 1e-3))), (0.0, 0.0));
    // Excess growing faster than the operations: the fixed part is not negative.
    let (fixed, per_op) = recording_fit((20, (1e-3 + 20e-6, 1e-3)), (80, (1e-3 + 200e-6, 1e-3)));
    assert_eq!(fixed, 0.0);
    assert!((per_op - 3e-6).abs() < 1e-12, "{per_op}");
}
