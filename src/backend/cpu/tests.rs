//! The CPU backend's operations against their definitions.

use super::*;
use crate::backend::{QkvSplit, Rope, RopePositions};
use crate::workload::Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
    }
}

#[test]
fn matmul_matches_the_definition() {
    let be = CpuBackend::new();
    let (m, k, n) = (5, 7, 3);
    let (x, w) = (random(m * k, 1), random(k * n, 2));
    let out = be.matmul(&x, &w, m, k, n).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k).map(|t| x[i * k + t] * w[t * n + j]).sum();
            assert!((out[i * n + j] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn rmsnorm_gives_unit_root_mean_square() {
    let be = CpuBackend::new();
    let x = random(4 * 16, 3);
    let ones = vec![1.0; 16];
    let y = be.rmsnorm(&x, &ones, 4, 16, 0.0).unwrap();
    for r in 0..4 {
        let ms: f32 = y[r * 16..(r + 1) * 16].iter().map(|v| v * v).sum::<f32>() / 16.0;
        assert!((ms - 1.0).abs() < 1e-5);
    }
}

#[test]
fn prefill_attention_is_causal_softmax_with_its_log_sum_exp() {
    let be = CpuBackend::new();
    let (s, h, dh) = (6, 2, 4);
    let w = h * dh;
    let (q, k, v) = (random(s * w, 4), random(s * w, 5), random(s * w, 6));
    let shape = PrefillShape { nseq: 1, sq: s, skv: s, kv_seq_stride: s, heads: h, kv_heads: h, head_dim: dh, q_offset: 0 };
    let (o, lse) = be.attention_prefill(&q, &k, &v, shape).unwrap();
    let scale = 1.0 / (dh as f32).sqrt();
    for hh in 0..h {
        for i in 0..s {
            let scores: Vec<f32> = (0..=i).map(|j| (0..dh).map(|c| q[i * w + hh * dh + c] * k[j * w + hh * dh + c]).sum::<f32>() * scale).collect();
            let z: f32 = scores.iter().map(|x| x.exp()).sum();
            assert!((lse[hh * s + i] - z.ln()).abs() < 1e-5);
            for c in 0..dh {
                let want: f32 = scores.iter().enumerate().map(|(j, x)| x.exp() / z * v[j * w + hh * dh + c]).sum();
                assert!((o[i * w + hh * dh + c] - want).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn a_query_block_at_an_offset_equals_those_rows_of_the_full_prefill() {
    let be = CpuBackend::new();
    let (n, s, h, dh) = (2, 10, 2, 4);
    let w = h * dh;
    let (q, k, v) = (random(n * s * w, 7), random(n * s * w, 8), random(n * s * w, 9));
    let full = be.attention_prefill(&q, &k, &v, PrefillShape { nseq: n, sq: s, skv: s, kv_seq_stride: s, heads: h, kv_heads: h, head_dim: dh, q_offset: 0 }).unwrap().0;
    let (off, len) = (4, 3);
    let runs: Vec<RowRun> = (0..n).map(|i| RowRun::new(i * s + off, len)).collect();
    let qb = be.gather_rows(&q, w, &runs).unwrap();
    let shape = PrefillShape { nseq: n, sq: len, skv: off + len, kv_seq_stride: s, heads: h, kv_heads: h, head_dim: dh, q_offset: off };
    let block = be.attention_prefill(&qb, &k, &v, shape).unwrap().0;
    close(&block, &be.gather_rows(&full, w, &runs).unwrap(), 1e-5);
}

#[test]
fn merging_split_kv_partials_equals_attention_over_the_whole_cache() {
    let be = CpuBackend::new();
    let (n, cap, h, dh) = (3, 12, 2, 8);
    let w = h * dh;
    let (q, k, v) = (random(n * w, 10), random(n * cap * w, 11), random(n * cap * w, 12));
    let whole = be.attention_decode(&q, &k, &v, DecodeShape { nseq: n, cap, len: cap, heads: h, kv_heads: h, head_dim: dh }).unwrap();
    // First 5 rows of each sequence in one slice, the other 7 in another.
    let split = |start: usize, len: usize| {
        let runs: Vec<RowRun> = (0..n).map(|i| RowRun::new(i * cap + start, len)).collect();
        (be.gather_rows(&k, w, &runs).unwrap(), be.gather_rows(&v, w, &runs).unwrap())
    };
    let ((k1, v1), (k2, v2)) = (split(0, 5), split(5, 7));
    let (mut o, mut lse) = be.attention_decode(&q, &k1, &v1, DecodeShape { nseq: n, cap: 5, len: 5, heads: h, kv_heads: h, head_dim: dh }).unwrap();
    let (o2, lse2) = be.attention_decode(&q, &k2, &v2, DecodeShape { nseq: n, cap: 7, len: 7, heads: h, kv_heads: h, head_dim: dh }).unwrap();
    be.merge_partials(&mut o, &mut lse, &o2, &lse2, n * h, dh).unwrap();
    close(&o, &whole.0, 1e-5);
    close(&lse, &whole.1, 1e-5);
}

#[test]
fn an_empty_slice_is_neutral_in_the_merge() {
    let be = CpuBackend::new();
    let (n, h, dh) = (2, 2, 4);
    let q = random(n * h * dh, 13);
    let kv = random(n * 4 * h * dh, 14);
    let (mut o, mut lse) = be.attention_decode(&q, &kv, &kv, DecodeShape { nseq: n, cap: 4, len: 4, heads: h, kv_heads: h, head_dim: dh }).unwrap();
    let (o0, lse0) = (o.clone(), lse.clone());
    let (oe, lsee) = be.attention_decode(&q, &kv, &kv, DecodeShape { nseq: n, cap: 4, len: 0, heads: h, kv_heads: h, head_dim: dh }).unwrap();
    assert!(lsee.iter().all(|x| *x == f32::NEG_INFINITY) && oe.iter().all(|x| *x == 0.0));
    be.merge_partials(&mut o, &mut lse, &oe, &lsee, n * h, dh).unwrap();
    assert_eq!((o, lse), (o0, lse0));
}

#[test]
fn embedding_adds_sinusoidal_positions_from_pos0() {
    let be = CpuBackend::new();
    let d = 8;
    let table = random(10 * d, 15);
    let x = be.embed(&table, d, &[3, 4], 1, 2, 5).unwrap();
    for c in 0..d {
        assert!((x[c] - (table[3 * d + c] + sinusoid(5, c, d))).abs() < 1e-6);
        assert!((x[d + c] - (table[4 * d + c] + sinusoid(6, c, d))).abs() < 1e-6);
    }
    assert_eq!(sinusoid(0, 0, d), 0.0);
    assert_eq!(sinusoid(0, 1, d), 1.0);
}

#[test]
fn step_operations_read_the_step_scalars() {
    let be = CpuBackend::new();
    let (nseq, cap, h, dh, d) = (2, 6, 2, 4, 8);
    let width = h * dh;
    let table = random(10 * d, 16);
    be.set_step(&StepVars { pos: 7, store_at: Some(3), len: 4, tokens: vec![9, 2] }).unwrap();
    // Embedding: the step's tokens at the step's position.
    assert_eq!(be.embed_step(&table, d, nseq).unwrap(), be.embed(&table, d, &[9, 2], nseq, 1, 7).unwrap());
    // Store: row 3 of each sequence, nothing else.
    let before = random(nseq * cap * width, 17);
    let row = random(nseq * width, 18);
    let mut cache = before.clone();
    be.store_step(&mut cache, &row, nseq, cap, width).unwrap();
    for n in 0..nseq {
        for r in 0..cap {
            let at = (n * cap + r) * width;
            let want = if r == 3 { &row[n * width..(n + 1) * width] } else { &before[at..at + width] };
            assert_eq!(&cache[at..at + width], want, "sequence {n} row {r}");
        }
    }
    // Attention: over the step's length whatever the shape says.
    let q = random(nseq * width, 19);
    let shape = DecodeShape { nseq, cap, len: 0, heads: h, kv_heads: h, head_dim: dh };
    assert_eq!(be.attention_decode_step(&q, &cache, &cache, shape).unwrap(), be.attention_decode(&q, &cache, &cache, DecodeShape { len: 4, ..shape }).unwrap());
    // A rank that owns no new row stores nothing; a row past the cache is refused.
    be.set_step(&StepVars { pos: 8, store_at: None, len: 4, tokens: vec![] }).unwrap();
    let mut untouched = cache.clone();
    be.store_step(&mut untouched, &random(nseq * width, 20), nseq, cap, width).unwrap();
    assert_eq!(untouched, cache);
    be.set_step(&StepVars { pos: 8, store_at: Some(cap), len: 4, tokens: vec![] }).unwrap();
    assert!(matches!(be.store_step(&mut untouched, &row, nseq, cap, width), Err(BackendError::Shape(_))));
    // The CPU cannot record: steps run op by op.
    assert!(!be.capture_begin().unwrap());
    assert!(be.capture_end().is_err());
}

#[test]
fn poisoning_starts_new_outputs_as_nan_and_leaves_zeros_zero() {
    let be = CpuBackend::new();
    be.set_poison_outputs(true);
    assert!(be.poison_outputs() && be.output(4).iter().all(|x| x.is_nan()));
    assert_eq!(be.zeros(3).unwrap(), vec![0.0; 3]);
    // Every element of an operation's output is still written.
    let y = be.rmsnorm(&random(12, 21), &vec![1.0; 4], 3, 4, 1e-6).unwrap();
    assert!(y.iter().all(|x| x.is_finite()));
    be.set_poison_outputs(false);
    assert_eq!(be.output(2), vec![0.0; 2]);
}

#[test]
fn argmax_takes_the_first_of_ties_and_shapes_are_checked() {
    let be = CpuBackend::new();
    assert_eq!(be.argmax(&vec![1.0, 3.0, 3.0, 0.0, -1.0, -2.0], 2, 3).unwrap(), vec![1, 0]);
    assert!(matches!(be.matmul(&vec![0.0; 3], &vec![0.0; 4], 2, 2, 2), Err(BackendError::Shape(_))));
}

#[test]
fn rope_turns_each_half_split_pair_by_its_position_and_leaves_v() {
    let be = CpuBackend::new();
    let (rows, dh) = (3, 4);
    // One q head, one K/V head; rows at positions 2, 3, 4.
    let qkv = random(rows * 3 * dh, 22);
    let segs = [(2, 3)];
    let rope = Rope { head_dim: dh, theta: 100.0, positions: RopePositions::Segments(&segs) };
    let (q, k, v) = be.split_qkv_rope(&qkv, rows, &QkvSplit { q_width: dh, kv_width: dh, rope: Some(rope) }).unwrap();
    for r in 0..rows {
        let pos = (2 + r) as f64;
        for (part, got) in [(0, &q), (1, &k)] {
            let x = &qkv[r * 3 * dh + part * dh..][..dh];
            for i in 0..dh / 2 {
                let angle = pos * 100f64.powf(-2.0 * i as f64 / dh as f64);
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                assert!((got[r * dh + i] - (x[i] * c - x[i + 2] * s)).abs() < 1e-6);
                assert!((got[r * dh + i + 2] - (x[i + 2] * c + x[i] * s)).abs() < 1e-6);
            }
        }
        assert_eq!(&v[r * dh..(r + 1) * dh], &qkv[r * 3 * dh + 2 * dh..][..dh]);
    }
}

#[test]
fn rotated_scores_depend_only_on_the_distance_between_positions() {
    let be = CpuBackend::new();
    let dh = 8;
    let qkv = random(3 * dh, 23);
    let at = |pos: usize| {
        let segs = [(pos, 1)];
        let rope = Rope { head_dim: dh, theta: 10_000.0, positions: RopePositions::Segments(&segs) };
        be.split_qkv_rope(&qkv, 1, &QkvSplit { q_width: dh, kv_width: dh, rope: Some(rope) }).unwrap()
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // q at 10 against k at 7, and q at 1010 against k at 1007: the same score.
    let (near, far) = ((at(10).0, at(7).1), (at(1010).0, at(1007).1));
    assert!((dot(&near.0, &near.1) - dot(&far.0, &far.1)).abs() < 1e-4);
}

#[test]
fn grouped_query_heads_attend_with_the_kv_heads_of_their_group() {
    let be = CpuBackend::new();
    let (s, h, kvh, dh) = (5, 4, 2, 4);
    let (q, k, v) = (random(s * h * dh, 24), random(s * kvh * dh, 25), random(s * kvh * dh, 26));
    let shape = PrefillShape { nseq: 1, sq: s, skv: s, kv_seq_stride: s, heads: h, kv_heads: kvh, head_dim: dh, q_offset: 0 };
    let (o, lse) = be.attention_prefill(&q, &k, &v, shape).unwrap();
    // The same as multi-head attention over K/V with each K/V head repeated for its two query heads.
    let repeat = |x: &Vec<f32>| -> Vec<f32> { (0..s).flat_map(|r| (0..h).flat_map(move |hh| x[(r * kvh + hh / 2) * dh..][..dh].to_vec())).collect() };
    let (o2, lse2) = be.attention_prefill(&q, &repeat(&k), &repeat(&v), PrefillShape { kv_heads: h, ..shape }).unwrap();
    close(&o, &o2, 1e-6);
    close(&lse, &lse2, 1e-6);
    let dshape = DecodeShape { nseq: 1, cap: s, len: s, heads: h, kv_heads: kvh, head_dim: dh };
    let (od, _) = be.attention_decode(&q[..h * dh].to_vec(), &k, &v, dshape).unwrap();
    let (od2, _) = be.attention_decode(&q[..h * dh].to_vec(), &repeat(&k), &repeat(&v), DecodeShape { kv_heads: h, ..dshape }).unwrap();
    close(&od, &od2, 1e-6);
    // K/V heads that do not divide the query heads are refused.
    assert!(matches!(be.attention_prefill(&q, &k, &v, PrefillShape { kv_heads: 3, ..shape }), Err(BackendError::Shape(_))));
}

#[test]
fn silu_mul_gates_by_x_times_its_sigmoid() {
    let be = CpuBackend::new();
    let mut g = vec![-2.0, 0.0, 3.0];
    be.silu_mul(&mut g, &vec![1.0, 5.0, 2.0]).unwrap();
    let want = [-2.0 / (1.0 + 2f32.exp()), 0.0, 2.0 * 3.0 / (1.0 + (-3f32).exp())];
    close(&g, &want, 1e-6);
}
