//! Checks of the dense and row operations, on the tiny model's shapes
//! (d 64, vocab 512) and dense-4l's (d 4096, vocab 32000), with row counts
//! that are not multiples of any tile. The expected values come from
//! `reference` only, never from another backend.

use super::reference as r;
use super::{CheckedBackend, Checker};
use crate::backend::{RowCopy, RowRun};

/// The embedding: token rows plus sinusoids, at a position offset; at
/// position 40000 an f32 angle would be off by milliradians.
pub fn embed<B: CheckedBackend>(c: &mut Checker<B>) {
    for (vocab, d, nseq, n, pos0) in [(512, 64, 2, 7, 3), (1000, 4096, 1, 17, 40_000)] {
        let outcome = (|| {
            let (table, table_b) = c.input(vocab * d, 1.0)?;
            let tokens = c.rng.tokens(nseq * n, vocab);
            let got = c.be.download(&c.be.embed(&table_b, d, &tokens, nseq, n, pos0)?)?;
            Ok(vec![(got, r::embed(&table, d, &tokens, nseq, n, pos0))])
        })();
        c.push("embed", format!("vocab {vocab} d {d} nseq {nseq} n {n} pos0 {pos0}"), outcome);
    }
}

/// GEMMs of the tiny model (one with no rows) and of dense-4l's QKV width.
pub fn matmul<B: CheckedBackend>(c: &mut Checker<B>) {
    for (m, k, n) in [(14, 64, 192), (0, 64, 64), (77, 4096, 384)] {
        let outcome = (|| {
            let (x, xb) = c.input(m * k, 1.0)?;
            let (w, wb) = c.input(k * n, 1.0 / (k as f32).sqrt())?;
            let got = c.be.download(&c.be.matmul(&xb, &wb, m, k, n)?)?;
            Ok(vec![(got, r::matmul(&x, &w, m, k, n))])
        })();
        c.push("matmul", format!("[{m}x{k}]x[{k}x{n}]"), outcome);
    }
}

/// RMSNorm, with a row width that is not a multiple of the vector width.
pub fn rmsnorm<B: CheckedBackend>(c: &mut Checker<B>) {
    for (rows, cols) in [(14, 64), (5, 100), (33, 4096)] {
        let outcome = (|| {
            let (x, xb) = c.input(rows * cols, 1.0)?;
            let (w, wb) = c.input(cols, 1.0)?;
            let got = c.be.download(&c.be.rmsnorm(&xb, &wb, rows, cols, 1e-6)?)?;
            Ok(vec![(got, r::rmsnorm(&x, &w, rows, cols, 1e-6))])
        })();
        c.push("rmsnorm", format!("{rows}x{cols}"), outcome);
    }
}

/// Element counts of the element-wise checks: a tail after the vector runs.
const ELEMENTWISE_LENS: [usize; 2] = [1003, 77 * 4096 + 5];

/// GELU in place.
pub fn gelu<B: CheckedBackend>(c: &mut Checker<B>) {
    for n in ELEMENTWISE_LENS {
        let outcome = (|| {
            let (x, mut xb) = c.input(n, 2.0)?;
            c.be.gelu(&mut xb)?;
            Ok(vec![(c.be.download(&xb)?, x.iter().map(|&v| r::gelu(v)).collect())])
        })();
        c.push("gelu", format!("n {n}"), outcome);
    }
}

/// The GELU-gated product in place.
pub fn gelu_mul<B: CheckedBackend>(c: &mut Checker<B>) {
    for n in ELEMENTWISE_LENS {
        let outcome = (|| {
            let (g, mut gb) = c.input(n, 2.0)?;
            let (u, ub) = c.input(n, 1.0)?;
            c.be.gelu_mul(&mut gb, &ub)?;
            Ok(vec![(c.be.download(&gb)?, r::gelu_mul(&g, &u))])
        })();
        c.push("gelu_mul", format!("n {n}"), outcome);
    }
}

/// The residual add in place.
pub fn add_assign<B: CheckedBackend>(c: &mut Checker<B>) {
    for n in ELEMENTWISE_LENS {
        let outcome = (|| {
            let (x, mut xb) = c.input(n, 1.0)?;
            let (y, yb) = c.input(n, 1.0)?;
            c.be.add_assign(&mut xb, &yb)?;
            Ok(vec![(c.be.download(&xb)?, r::add(&x, &y))])
        })();
        c.push("add_assign", format!("n {n}"), outcome);
    }
}

/// Splitting fused QKV, with a width whose rows are not 16-byte multiples.
pub fn split_qkv<B: CheckedBackend>(c: &mut Checker<B>) {
    for (rows, width) in [(14, 64), (5, 3), (9, 4096)] {
        let outcome = (|| {
            let (x, xb) = c.input(rows * 3 * width, 1.0)?;
            let (q, k, v) = c.be.split_qkv(&xb, rows, width)?;
            let [qr, kr, vr] = r::split_qkv(&x, rows, width);
            Ok(vec![(c.be.download(&q)?, qr), (c.be.download(&k)?, kr), (c.be.download(&v)?, vr)])
        })();
        c.push("split_qkv", format!("rows {rows} width {width}"), outcome);
    }
}

/// Row runs out of order, of one row and of none.
fn row_run_cases() -> [(usize, usize, Vec<RowRun>); 2] {
    [(16, 64, vec![RowRun::new(3, 4), RowRun::new(10, 2), RowRun::new(0, 1), RowRun::new(5, 0)]), (20, 4096, vec![RowRun::new(15, 5), RowRun::new(0, 3)])]
}

fn describe(runs: &[RowRun]) -> String {
    runs.iter().map(|r| format!("{}+{}", r.start, r.len)).collect::<Vec<_>>().join(",")
}

/// Gathering row runs into a new buffer.
pub fn gather_rows<B: CheckedBackend>(c: &mut Checker<B>) {
    for (src_rows, cols, runs) in row_run_cases() {
        let outcome = (|| {
            let (x, xb) = c.input(src_rows * cols, 1.0)?;
            let got = c.be.download(&c.be.gather_rows(&xb, cols, &runs)?)?;
            Ok(vec![(got, r::gather_rows(&x, cols, &runs))])
        })();
        c.push("gather_rows", format!("{src_rows}x{cols} runs {}", describe(&runs)), outcome);
    }
}

/// Scattering rows into the runs of an existing buffer (the rest kept).
pub fn scatter_rows<B: CheckedBackend>(c: &mut Checker<B>) {
    for (dst_rows, cols, runs) in row_run_cases() {
        let outcome = (|| {
            let total: usize = runs.iter().map(|r| r.len).sum();
            let (d, mut db) = c.input(dst_rows * cols, 1.0)?;
            let (s, sb) = c.input(total * cols, 1.0)?;
            c.be.scatter_rows(&mut db, cols, &runs, &sb)?;
            Ok(vec![(c.be.download(&db)?, r::scatter_rows(&d, cols, &runs, &s))])
        })();
        c.push("scatter_rows", format!("{dst_rows}x{cols} runs {}", describe(&runs)), outcome);
    }
}

/// Copying row ranges between buffers at other offsets (the rest of the
/// target kept), with copies longer than one 16 KiB tile of the kernel.
pub fn copy_rows<B: CheckedBackend>(c: &mut Checker<B>) {
    let cases = [
        (16, 12, 64, vec![RowCopy { src: 0, dst: 5, len: 3 }, RowCopy { src: 9, dst: 0, len: 2 }, RowCopy { src: 4, dst: 15, len: 1 }, RowCopy { src: 2, dst: 9, len: 0 }]),
        (24, 40, 4096, vec![RowCopy { src: 30, dst: 2, len: 9 }, RowCopy { src: 0, dst: 12, len: 1 }]),
    ];
    for (dst_rows, src_rows, cols, copies) in cases {
        let outcome = (|| {
            let (d, mut db) = c.input(dst_rows * cols, 1.0)?;
            let (s, sb) = c.input(src_rows * cols, 1.0)?;
            c.be.copy_rows(&mut db, cols, &sb, &copies)?;
            Ok(vec![(c.be.download(&db)?, r::copy_rows(&d, cols, &s, &copies))])
        })();
        let shape = copies.iter().map(|k| format!("{}->{}+{}", k.src, k.dst, k.len)).collect::<Vec<_>>().join(",");
        c.push("copy_rows", format!("{src_rows}x{cols} into {dst_rows} rows, {shape}"), outcome);
    }
}

/// Greedy sampling over the tiny and the dense-4l vocabulary; the error is
/// the fraction of rows whose index differs.
pub fn argmax<B: CheckedBackend>(c: &mut Checker<B>) {
    for (rows, cols) in [(5, 512), (3, 32_000)] {
        let outcome = (|| {
            let (x, xb) = c.input(rows * cols, 3.0)?;
            let got = c.be.argmax(&xb, rows, cols)?;
            let want = r::argmax(&x, rows, cols);
            let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
            Ok(vec![(vec![wrong as f32 / rows.max(1) as f32], vec![0.0])])
        })();
        c.push("argmax", format!("{rows}x{cols}"), outcome);
    }
}
