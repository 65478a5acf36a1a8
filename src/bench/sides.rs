//! `fapool bench sides`: FA Pool's two sides timed apart on one device, at
//! the shapes of a base of one rank and a pool of one (the 2-GPU layout),
//! and a TP=2 rank's layer beside them; from these, the TTFT each would
//! have on two devices linked at a given bandwidth.
//!
//! Per layer and prefill unit (one causal chunk of a one-sequence prompt,
//! contiguous partition), the ops are those FA Pool's dataflow runs
//! (strategy/fapool/base.rs and pool.rs) with `pool_ops` placing the
//! projections:
//! - base, before the hand-off: RMSNorm, and the QKV projection when the pool
//!   does not project;
//! - pool: the QKV projection (when the pool projects) and split, the rows
//!   of K and V kept for decode, the chunk's K/V copied into the layer's
//!   prefix (not with one chunk: its K/V is the prefix), the queries'
//!   gather, causal attention against the prefix up to the chunk's end,
//!   the output's scatter, and the output projection (when the pool
//!   projects it);
//! - base, after the return: the output projection (when the pool does not
//!   project it), the residual, RMSNorm, the FFN and its residual.
//!
//! A TP rank's layer (`tp` ranks): RMSNorm, its heads' QKV projection and
//! split, its K/V stored, causal attention over its heads, its output
//! projection, the residual, RMSNorm, its FFN columns, the residual (the
//! two all-reduces are the link's, below).
//!
//! The predictions walk FA Pool's schedule ([`schedule`]) with the measured
//! unit times, each hand-off and return taking bytes / `link` on top of its
//! issue; TP=2 is layers × (its layer + two all-reduces of the rows at
//! `allreduce` algorithm bandwidth). The embedding and LM head (one row per
//! sequence) are left out of both. Data is random; values do not matter
//! for speed. This module times only through the harness
//! ([`time_with_marks`]) and decides nothing.

use super::{time_with_marks, Row};
use crate::backend::{Backend, PrefillShape, QkvSplit, Result, RowCopy, RowRun};
use crate::model::ModelConfig;
use crate::strategy::fapool::layout::PoolOps;
use crate::strategy::fapool::units::{schedule, split_parts, Step};

/// Untimed calls before each timing.
const WARMUP: usize = 1;

/// What to time and how to predict.
#[derive(Clone, Debug)]
pub struct SidesArgs {
    pub seq: Vec<usize>,
    pub chunks: Vec<usize>,
    pub iters: usize,
    /// Point-to-point bandwidth between the two devices, GB/s (predictions only).
    pub link_gbs: Option<f64>,
    /// All-reduce algorithm bandwidth of two devices, GB/s (predictions only).
    pub allreduce_gbs: Option<f64>,
}

/// Per-unit times of one layer (seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct SideTimes {
    /// Base before each hand-off, and after each return (same for every unit).
    pub base_pre: f64,
    pub base_post: f64,
    /// Pool per unit, in causal order.
    pub pool: Vec<f64>,
    /// Bytes of one unit's hand-off and of its return.
    pub down_bytes: f64,
    pub up_bytes: f64,
}

impl SideTimes {
    pub fn base_layer(&self) -> f64 {
        (self.base_pre + self.base_post) * self.pool.len() as f64
    }
    pub fn pool_layer(&self) -> f64 {
        self.pool.iter().sum()
    }
}

/// TTFT of FA Pool base 1 + pool 1 over `layers` layers: every rank walks
/// the pipelined schedule; the base runs its steps in order, the pool
/// attends each hand-off in order once it has arrived, and a return waits
/// for the pool's result to arrive.
pub fn predict_fapool(t: &SideTimes, layers: usize, link_bps: f64) -> f64 {
    let units = t.pool.len();
    let (mut base, mut pool) = (0.0f64, 0.0f64);
    let mut result = vec![vec![0.0f64; units]; layers];
    for step in schedule(layers, units, true) {
        match step {
            Step::Handoff { layer, unit } => {
                base += t.base_pre;
                let arrives = base + t.down_bytes / link_bps;
                pool = pool.max(arrives) + t.pool[unit];
                result[layer][unit] = pool + t.up_bytes / link_bps;
            }
            Step::Return { layer, unit } => base = base.max(result[layer][unit]) + t.base_post,
        }
    }
    base
}

/// TTFT of TP=2: every layer's compute, then two all-reduces of `bytes`.
pub fn predict_tp(layer_s: f64, layers: usize, allreduce_bytes: f64, allreduce_bps: f64) -> f64 {
    layers as f64 * (layer_s + 2.0 * allreduce_bytes / allreduce_bps)
}

/// Uniform values in [-scale, scale) from a fixed LCG (data for timing only).
fn random<B: Backend>(be: &B, n: usize, seed: u64, scale: f32) -> Result<B::Buf> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    let host: Vec<f32> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    be.upload(&host)
}

/// One layer's weights of one rank: all heads and FFN columns divided by `tp`.
struct LayerWeights<B: Backend> {
    norm: B::Buf,
    qkv: B::Buf,
    out: B::Buf,
    up: B::Buf,
    down: B::Buf,
}

impl<B: Backend> LayerWeights<B> {
    fn new(be: &B, m: &ModelConfig, tp: usize) -> Result<Self> {
        let (d, a, kv, f) = (m.d_model, m.attn_width() / tp, m.kv_heads_per_rank(tp) * m.head_dim, m.ffn / tp);
        Ok(Self { norm: random(be, d, 1, 1.0)?, qkv: random(be, d * (a + 2 * kv), 2, 0.02)?, out: random(be, a * d, 3, 0.02)?, up: random(be, d * f, 4, 0.02)?, down: random(be, f * d, 5, 0.02)? })
    }
}

/// FA Pool's per-unit times for `s` tokens in `chunks` chunks.
pub fn fapool_sides<B: Backend>(be: &B, m: &ModelConfig, w: &LayerWeightsFor<B>, s: usize, chunks: usize, ops: PoolOps, iters: usize) -> Result<SideTimes> {
    let w = &w.0;
    let (d, a, kv, dh, heads, f, eps) = (m.d_model, m.attn_width(), m.kv_width(), m.head_dim, m.heads, m.ffn, m.norm_eps);
    let (qkv_w, split) = (a + 2 * kv, QkvSplit { q_width: a, kv_width: kv, rope: None });
    let cuts = split_parts(s, chunks.min(s).max(1));
    let c = cuts[0].len();
    let x = random(be, c * d, 11, 1.0)?;
    let handoff = if ops.pool_qkv() { random(be, c * d, 12, 1.0)? } else { random(be, c * qkv_w, 12, 1.0)? };
    let base_pre = time_with_marks(be, WARMUP, iters, || {
        let h = be.rmsnorm(&x, &w.norm, c, d, eps)?;
        if !ops.pool_qkv() {
            be.matmul(&h, &w.qkv, c, d, qkv_w)?;
        }
        Ok(())
    })?;
    let result = if ops.pool_out() { random(be, c * d, 14, 1.0)? } else { random(be, c * a, 14, 1.0)? };
    // The residual is added in place, as on the base.
    let mut xx = random(be, c * d, 17, 1.0)?;
    let base_post = time_with_marks(be, WARMUP, iters, || {
        let projected;
        let r = if ops.pool_out() {
            &result
        } else {
            projected = be.matmul(&result, &w.out, c, a, d)?;
            &projected
        };
        be.add_assign(&mut xx, r)?;
        let h = be.rmsnorm(&xx, &w.norm, c, d, eps)?;
        let mut up = be.matmul(&h, &w.up, c, d, f)?;
        be.gelu(&mut up)?;
        let ffn = be.matmul(&up, &w.down, c, f, d)?;
        be.add_assign(&mut xx, &ffn)
    })?;
    // The pool's cache and prefix of the whole sequence.
    let (mut cache_k, mut cache_v) = (be.empty(s * kv)?, be.empty(s * kv)?);
    let (mut pre_k, mut pre_v) = (random(be, s * kv, 15, 1.0)?, random(be, s * kv, 16, 1.0)?);
    let mut pool = Vec::with_capacity(cuts.len());
    for cut in &cuts {
        let (st, len) = (cut.start, cut.len());
        let t = time_with_marks(be, WARMUP, iters, || {
            let (q, k, v) = if ops.pool_qkv() { be.split_qkv_rope(&be.matmul(&handoff, &w.qkv, len, d, qkv_w)?, len, &split)? } else { be.split_qkv_rope(&handoff, len, &split)? };
            let keep = [RowCopy { src: 0, dst: st, len }];
            be.copy_rows(&mut cache_k, kv, &k, &keep)?;
            be.copy_rows(&mut cache_v, kv, &v, &keep)?;
            let one = cuts.len() == 1;
            if !one {
                be.copy_rows(&mut pre_k, kv, &k, &keep)?;
                be.copy_rows(&mut pre_v, kv, &v, &keep)?;
            }
            let (kp, vp) = if one { (&k, &v) } else { (&pre_k, &pre_v) };
            let run = [RowRun::new(0, len)];
            let q_seg = be.gather_rows(&q, a, &run)?;
            let stride = if one { len } else { s };
            let shape = PrefillShape { nseq: 1, sq: len, skv: st + len, kv_seq_stride: stride, heads, kv_heads: m.kv_heads, head_dim: dh, q_offset: st };
            let (o, _) = be.attention_prefill(&q_seg, kp, vp, shape)?;
            let mut blk = be.empty(len * a)?;
            be.scatter_rows(&mut blk, a, &run, &o)?;
            if ops.pool_out() {
                be.matmul(&blk, &w.out, len, a, d)?;
            }
            Ok(())
        })?;
        pool.push(t);
    }
    let e = be.dtype().size_bytes() as f64;
    let width = |pool_side: bool| if pool_side { d } else { qkv_w };
    Ok(SideTimes { base_pre, base_post, pool, down_bytes: (c * width(ops.pool_qkv())) as f64 * e, up_bytes: (c * if ops.pool_out() { d } else { a }) as f64 * e })
}

/// A layer's weights for [`fapool_sides`] (all heads, all FFN columns).
pub struct LayerWeightsFor<B: Backend>(LayerWeights<B>);

/// A TP rank's layer over `s` tokens (without its all-reduces).
fn tp_layer<B: Backend>(be: &B, m: &ModelConfig, tp: usize, s: usize, iters: usize) -> Result<f64> {
    let w = LayerWeights::new(be, m, tp)?;
    let (d, a, dh, heads, f, eps) = (m.d_model, m.attn_width() / tp, m.head_dim, m.heads / tp, m.ffn / tp, m.norm_eps);
    let kv_heads = m.kv_heads_per_rank(tp);
    let kv = kv_heads * dh;
    let mut x = random(be, s * d, 21, 1.0)?;
    let (mut ck, mut cv) = (be.empty(s * kv)?, be.empty(s * kv)?);
    time_with_marks(be, WARMUP, iters, || {
        let h = be.rmsnorm(&x, &w.norm, s, d, eps)?;
        let qkv = be.matmul(&h, &w.qkv, s, d, a + 2 * kv)?;
        let (q, k, v) = be.split_qkv_rope(&qkv, s, &QkvSplit { q_width: a, kv_width: kv, rope: None })?;
        let all = [RowCopy { src: 0, dst: 0, len: s }];
        be.copy_rows(&mut ck, kv, &k, &all)?;
        be.copy_rows(&mut cv, kv, &v, &all)?;
        let (o, _) = be.attention_prefill(&q, &k, &v, PrefillShape { nseq: 1, sq: s, skv: s, kv_seq_stride: s, heads, kv_heads, head_dim: dh, q_offset: 0 })?;
        let y = be.matmul(&o, &w.out, s, a, d)?;
        be.add_assign(&mut x, &y)?;
        let h = be.rmsnorm(&x, &w.norm, s, d, eps)?;
        let mut up = be.matmul(&h, &w.up, s, d, f)?;
        be.gelu(&mut up)?;
        let ffn = be.matmul(&up, &w.down, s, f, d)?;
        be.add_assign(&mut x, &ffn)
    })
}

fn row(what: String, shape: String, secs: f64, figure: f64, unit: &str) -> Row {
    Row { what, shape, median_ms: secs * 1e3, figure, unit: unit.into(), busbw_gbs: f64::NAN, wrong: None }
}

/// Every row: per `s`, a TP=2 rank's layer; per `pool_ops` and chunk count,
/// the base's and the pool's layer (sum over its units); with bandwidths
/// given, the predicted TTFTs (figure: ms; FA Pool's also against TP=2).
pub fn run<B: Backend>(be: &B, m: &ModelConfig, args: &SidesArgs) -> Result<Vec<Row>> {
    let w = LayerWeightsFor(LayerWeights::new(be, m, 1)?);
    let e = be.dtype().size_bytes() as f64;
    let mut rows = Vec::new();
    for &s in &args.seq {
        let tp = tp_layer(be, m, 2, s, args.iters)?;
        rows.push(row("TP=2 rank layer".into(), format!("S {s}"), tp, tp * 1e3, "ms"));
        let tp_ttft = args.allreduce_gbs.map(|bw| predict_tp(tp, m.layers, (s * m.d_model) as f64 * e, bw * 1e9));
        if let Some(t) = tp_ttft {
            rows.push(row("TP=2 TTFT".into(), format!("S {s}, {} layers", m.layers), t, t * 1e3, "ms"));
        }
        for ops in [PoolOps::Attention, PoolOps::QkvAttention, PoolOps::QkvAttentionOut] {
            for &c in &args.chunks {
                let t = fapool_sides(be, m, &w, s, c, ops, args.iters)?;
                let shape = format!("S {s}, {} chunks", t.pool.len());
                rows.push(row(format!("base layer [{}]", ops.name()), shape.clone(), t.base_layer(), t.base_layer() * 1e3, "ms"));
                rows.push(row(format!("pool layer [{}]", ops.name()), shape.clone(), t.pool_layer(), t.pool_layer() / t.base_layer(), "x base"));
                if let Some(link) = args.link_gbs {
                    let p = predict_fapool(&t, m.layers, link * 1e9);
                    let (figure, unit) = tp_ttft.map_or((p * 1e3, "ms"), |tp| (p / tp, "x TP=2"));
                    rows.push(row(format!("FA Pool TTFT [{}]", ops.name()), shape, p, figure, unit));
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn times(pre: f64, post: f64, pool: &[f64]) -> SideTimes {
        SideTimes { base_pre: pre, base_post: post, pool: pool.to_vec(), down_bytes: 0.0, up_bytes: 0.0 }
    }

    #[test]
    fn one_chunk_runs_the_sides_one_after_another() {
        // Per layer: base pre 1, pool 4, base post 2, nothing to overlap.
        let t = times(1.0, 2.0, &[4.0]);
        assert_eq!(predict_fapool(&t, 3, 1e9), 3.0 * 7.0);
    }

    #[test]
    fn chunks_overlap_the_pool_with_the_base_across_layers() {
        // Two equal chunks, pool 2 and base 2 per unit: after the first
        // hand-off the two sides alternate without waiting, so four layers
        // take the pipeline's fill plus the busier side's time.
        let t = times(0.0, 2.0, &[2.0, 2.0]);
        let p = predict_fapool(&t, 4, 1e9);
        assert_eq!(p, 2.0 + 4.0 * 2.0 * 2.0);
        assert!(p < predict_fapool(&times(0.0, 4.0, &[4.0]), 4, 1e9));
    }

    #[test]
    fn the_link_adds_to_each_hand_off_and_return() {
        let t = SideTimes { down_bytes: 1e9, up_bytes: 2e9, ..times(1.0, 1.0, &[1.0]) };
        assert_eq!(predict_fapool(&t, 2, 1e9), 2.0 * (1.0 + 1.0 + 1.0 + 2.0 + 1.0));
        assert_eq!(predict_tp(1.0, 4, 1e9, 1e9), 4.0 * 3.0);
    }

    #[test]
    fn every_row_is_measured_on_the_cpu_backend_at_tiny_shapes() {
        let args = SidesArgs { seq: vec![64], chunks: vec![1, 4], iters: 1, link_gbs: Some(10.0), allreduce_gbs: Some(10.0) };
        let rows = run(&CpuBackend::new(), &ModelConfig::tiny(), &args).unwrap();
        // TP layer and its prediction, then per pool_ops × chunks: base, pool, prediction.
        assert_eq!(rows.len(), 2 + 3 * 2 * 3);
        assert!(rows.iter().all(|r| r.median_ms > 0.0 && r.figure.is_finite() && r.figure > 0.0), "{rows:?}");
        let four = rows.iter().find(|r| r.what == "FA Pool TTFT [attention]" && r.shape == "S 64, 4 chunks").unwrap();
        assert_eq!(four.unit, "x TP=2");
        assert!(four.median_ms > 0.0);
    }
}
