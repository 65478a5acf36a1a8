//! `fapool bench kernels`' copy rows: the row copies every strategy uses
//! (gathering and scattering row runs, splitting fused QKV, copying row
//! runs between buffers) against the driver's device-to-device memcpy of
//! the same bytes in the same call, for rows from 4 KiB to one row of the
//! whole buffer (the single-row case is what a K/V gather of a long
//! sequence looks like). Bandwidth counts bytes read plus bytes written.
//! Correctness of the copies is `check-gpu`'s job (`#wrong` is `-`).

use super::{time_with_marks, Row};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Result, RowCopy, RowRun};

/// Bytes moved by each measured copy: 1 GiB, well beyond the L2.
const BYTES: usize = 1 << 30;
const WARMUP: usize = 2;

fn row(what: &str, shape: String, secs: f64, vs_memcpy: f64) -> Row {
    Row { what: what.into(), shape, median_ms: secs * 1e3, figure: 2.0 * BYTES as f64 / secs / 1e12, unit: format!("TB/s {vs_memcpy:.2}x"), busbw_gbs: f64::NAN, wrong: None }
}

/// Times each copy kernel over 1 GiB at several row sizes, beside a
/// memcpy of the same bytes; each row's unit says the ratio to memcpy.
pub fn run(b: &CudaBackend, iters: usize) -> Result<Vec<Row>> {
    let dt = b.dtype();
    let es = dt.size_bytes();
    let n = BYTES / es;
    let src = b.random_uniform(dt, n, 11, 1.0)?;
    let mut dst = b.empty(n)?;
    let memcpy = time_with_marks(b, WARMUP, iters, || b.memcpy(&mut dst, &src))?;
    let mut rows = vec![row("memcpy (device to device)", "1 GiB".into(), memcpy, 1.0)];
    for row_bytes in [4 << 10, 64 << 10, 1 << 20, BYTES] {
        let cols = row_bytes / es;
        let nrows = n / cols;
        let shape = if row_bytes == BYTES { "1 row of 1 GiB".to_string() } else { format!("{nrows} rows of {} KiB", row_bytes >> 10) };
        // One run of every row (a whole block), and every other row (many runs).
        let whole = [RowRun::new(0, nrows)];
        let t = time_with_marks(b, WARMUP, iters, || b.gather_rows(&src, cols, &whole).map(|_| ()))?;
        rows.push(row("gather_rows (one run)", shape.clone(), t, memcpy / t));
        let t = time_with_marks(b, WARMUP, iters, || b.scatter_rows(&mut dst, cols, &whole, &src))?;
        rows.push(row("scatter_rows (one run)", shape.clone(), t, memcpy / t));
        if nrows % 8 == 0 {
            // Eight runs, neighbours swapped: a reorder, as K/V replication does.
            let q = nrows / 8;
            let copies: Vec<RowCopy> = (0..8).map(|i| RowCopy { src: i * q, dst: (i ^ 1) * q, len: q }).collect();
            let t = time_with_marks(b, WARMUP, iters, || b.copy_rows(&mut dst, cols, &src, &copies))?;
            rows.push(row("copy_rows (8 runs)", shape.clone(), t, memcpy / t));
        }
    }
    // Splitting fused QKV: three strided copies of a third each (16K rows of dense-4l).
    let width = 4096;
    let qkv_rows = n / (3 * width);
    let t = time_with_marks(b, WARMUP, iters, || b.split_qkv(&src, qkv_rows, width).map(|_| ()))?;
    let moved = (qkv_rows * 3 * width * es) as f64 / BYTES as f64;
    rows.push(row("split_qkv", format!("{qkv_rows} rows of 3 x {width}"), t / moved, memcpy / (t / moved)));
    Ok(rows)
}
