//! `fapool bench`: commands that measure and report, in the shape of
//! nccl-tests: this harness does what every benchmark shares (warm-up,
//! timing through the backend's marks, medians, the correctness column, the
//! printed table and the HDF5 file), and each measured operation says only
//! what is specific to it. [`kernels`] times the model's kernels on one GPU
//! (GEMMs on dense-4l's shapes, prefill attention 4K–64K, decode attention,
//! RMSNorm); [`comm`] times each collective and point-to-point message
//! through the communication layer over message sizes, on every rank of the
//! launch (NCCL on GPUs, MPI on the CPU backend), one small file per
//! collective; [`moe`] times one mixture-of-experts FFN layer beside
//! PyTorch's figures of the same layer.
//!
//! This module must not be used by the timed paths of a run; it reports
//! what it measures and decides nothing.

pub mod comm;
pub mod copies;
pub mod kernels;
pub mod moe;
pub mod sides;

use crate::backend::Backend;
use hdf5::types::VarLenUnicode;

/// One measured row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub what: String,
    pub shape: String,
    pub median_ms: f64,
    pub figure: f64,
    pub unit: String,
    /// Bus bandwidth (GB/s) for collectives, nccl-tests' definition; NaN otherwise.
    pub busbw_gbs: f64,
    /// Elements that differed from the expected result after a call
    /// (summed over the ranks on rank 0); `None`: not checked here (the
    /// kernels are checked by `fapool check-gpu`).
    pub wrong: Option<u64>,
}

#[derive(hdf5::H5Type, Clone)]
#[repr(C)]
struct H5Row {
    what: VarLenUnicode,
    shape: VarLenUnicode,
    median_ms: f64,
    figure: f64,
    unit: VarLenUnicode,
    busbw_gbs: f64,
    /// -1: not checked.
    wrong: i64,
}

fn vlen(s: &str) -> VarLenUnicode {
    s.parse().unwrap_or_default()
}

/// Writes rows to `path` as the compound dataset `/bench` (attrs: device,
/// kind). The fields are those of [`Row`], `wrong` as -1 where not checked.
pub fn write_h5(path: &std::path::Path, kind: &str, device: &str, rows: &[Row]) -> hdf5::Result<()> {
    let f = hdf5::File::create(path)?;
    let data: Vec<H5Row> = rows
        .iter()
        .map(|r| H5Row {
            what: vlen(&r.what),
            shape: vlen(&r.shape),
            median_ms: r.median_ms,
            figure: r.figure,
            unit: vlen(&r.unit),
            busbw_gbs: r.busbw_gbs,
            wrong: r.wrong.map_or(-1, |w| i64::try_from(w).unwrap_or(i64::MAX)),
        })
        .collect();
    let ds = f.new_dataset_builder().with_data(&data).create("bench")?;
    ds.new_attr::<VarLenUnicode>().create("kind")?.write_scalar(&vlen(kind))?;
    ds.new_attr::<VarLenUnicode>().create("device")?.write_scalar(&vlen(device))?;
    Ok(())
}

/// Prints rows as a table; `#wrong` is `-` where nothing was checked.
pub fn print_table(rows: &[Row]) {
    println!("{:<34} {:<30} {:>11} {:>10} {:<8} {:>10} {:>7}", "operation", "shape", "median ms", "figure", "unit", "busbw GB/s", "#wrong");
    for r in rows {
        let bus = if r.busbw_gbs.is_nan() { "-".to_string() } else { format!("{:.1}", r.busbw_gbs) };
        let wrong = r.wrong.map_or("-".to_string(), |w| w.to_string());
        println!("{:<34} {:<30} {:>11.4} {:>10.1} {:<8} {:>10} {:>7}", r.what, r.shape, r.median_ms, r.figure, r.unit, bus, wrong);
    }
}

/// The middle value (the upper one of the two middles for an even count);
/// NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median seconds of `op` over `iters` calls, each timed by a pair of
/// backend marks, after `warmup` untimed calls and a synchronisation.
pub fn time_with_marks<B: Backend>(be: &B, warmup: usize, iters: usize, mut op: impl FnMut() -> crate::backend::Result<()>) -> crate::backend::Result<f64> {
    for _ in 0..warmup {
        op()?;
    }
    be.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = be.mark()?;
        op()?;
        let t1 = be.mark()?;
        times.push(be.elapsed_s(&t0, &t1)?);
    }
    Ok(median(times))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn the_median_of_an_even_count_is_the_upper_middle_and_of_none_nan() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn timing_runs_the_warm_up_and_every_timed_call() {
        let mut calls = 0;
        let t = time_with_marks(&CpuBackend::new(), 2, 5, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 7);
        assert!(t >= 0.0 && t.is_finite());
    }

    #[test]
    fn the_results_file_keeps_the_columns_and_marks_unchecked_rows() {
        let dir = std::env::temp_dir().join(format!("fapool-bench-h5-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.h5");
        let rows = vec![
            Row { what: "all_reduce".into(), shape: "1 MiB x 2 ranks".into(), median_ms: 0.5, figure: 2.0, unit: "GB/s alg".into(), busbw_gbs: 2.0, wrong: Some(0) },
            Row { what: "rmsnorm".into(), shape: "[4x4]".into(), median_ms: 0.1, figure: 1.0, unit: "TB/s".into(), busbw_gbs: f64::NAN, wrong: None },
        ];
        write_h5(&path, "comm", "cpu", &rows).unwrap();
        let ds = hdf5::File::open(&path).unwrap().dataset("bench").unwrap();
        let back: Vec<H5Row> = ds.read_raw().unwrap();
        assert_eq!((back[0].what.as_str(), back[0].wrong, back[1].wrong), ("all_reduce", 0, -1));
        assert_eq!(ds.attr("kind").unwrap().read_scalar::<VarLenUnicode>().unwrap().as_str(), "comm");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
