//! `fapool bench moe`: one mixture-of-experts FFN layer on one device at a
//! model's shapes (moe-16l: d 512, 16 experts of hidden 1024, top 2), for
//! several token counts: the router GEMM, the softmax top-k, the expert
//! slots (with their one host read), the rows' permutation, one GEMM per
//! expert up, GELU, one GEMM per expert down, and the weighted combine —
//! the operations the `moe` strategy runs per layer with every expert on
//! the rank (EP = 1). Beside each, when PyTorch's figures of the same layer
//! are given (`scripts/torch_reference.py moe`), the ratio of the two
//! times, PyTorch's over fapool's (above 1: fapool is faster).
//!
//! Data is random (uniform weights scaled by 1/√fan-in, normal inputs), so
//! the routing is near even, as PyTorch's is. This module times only
//! through the harness ([`time_with_marks`]) and decides nothing.

use super::{time_with_marks, Row};
use crate::backend::{Backend, Result};
use crate::model::ModelConfig;
use std::collections::BTreeMap;

/// Untimed calls before each timing.
const WARMUP: usize = 2;

/// What to time.
#[derive(Clone, Debug)]
pub struct MoeBenchArgs {
    /// Tokens of the layer (a prefill's rows, or a decode step's sequences).
    pub tokens: Vec<usize>,
    pub iters: usize,
    /// PyTorch's median milliseconds per token count (`moe_layer_T<tokens>_ms`).
    pub reference: BTreeMap<usize, f64>,
}

/// PyTorch's times from its JSON (`moe_layer_T<tokens>_ms` keys).
pub fn reference_times(json: &serde_json::Value) -> BTreeMap<usize, f64> {
    let Some(map) = json.as_object() else { return BTreeMap::new() };
    map.iter()
        .filter_map(|(k, v)| {
            let tokens = k.strip_prefix("moe_layer_T")?.strip_suffix("_ms")?.parse().ok()?;
            Some((tokens, v.as_f64()?))
        })
        .collect()
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

/// FLOPs of the layer's GEMMs for `tokens` tokens: the router and each
/// token's `top_k` experts, up and down.
pub fn layer_flops(m: &ModelConfig, tokens: usize) -> f64 {
    let e = m.experts.map_or(1, |e| e.count);
    let k = m.experts.map_or(1, |e| e.top_k);
    2.0 * tokens as f64 * (m.d_model * e + k * 2 * m.d_model * m.ffn) as f64
}

/// Median seconds of one MoE layer over `tokens` rows.
pub fn time_layer<B: Backend>(be: &B, m: &ModelConfig, tokens: usize, iters: usize) -> Result<f64> {
    let (d, f) = (m.d_model, m.ffn);
    let Some(e) = m.experts else { return Err(crate::backend::BackendError::Shape(format!("model {} has no experts", m.name))) };
    let router = random(be, d * e.count, 1, (3.0 / d as f32).sqrt())?;
    let up = random(be, e.count * d * f, 2, (3.0 / d as f32).sqrt())?;
    let down = random(be, e.count * f * d, 3, (3.0 / f as f32).sqrt())?;
    let x = random(be, tokens * d, 4, 1.7)?;
    time_with_marks(be, WARMUP, iters, || {
        let logits = be.matmul(&x, &router, tokens, d, e.count)?;
        let (ids, weights) = be.router_top_k(&logits, tokens, e.count, e.top_k)?;
        let (slots, counts) = be.expert_slots(&ids, tokens * e.top_k, e.count, None)?;
        let rows = be.permute_to_experts(&x, d, &slots, tokens, e.top_k, tokens * e.top_k)?;
        let mut h = be.grouped_matmul(&rows, &up, &counts, d, f)?;
        be.gelu(&mut h)?;
        let y = be.grouped_matmul(&h, &down, &counts, f, d)?;
        be.combine_from_experts(&y, d, &slots, &weights, tokens, e.top_k)?;
        Ok(())
    })
}

/// Per token count: the layer's time (figure: TFLOP/s of its GEMMs) and,
/// with a PyTorch time for it, PyTorch's time over fapool's.
pub fn run<B: Backend>(be: &B, m: &ModelConfig, args: &MoeBenchArgs) -> Result<Vec<Row>> {
    let e = m.experts.map_or((0, 0), |e| (e.count, e.top_k));
    let mut rows = Vec::new();
    for &t in &args.tokens {
        let secs = time_layer(be, m, t, args.iters)?;
        let shape = format!("T {t}, d {}, {}x{} top {}", m.d_model, e.0, m.ffn, e.1);
        let row = |what: &str, figure: f64, unit: &str| Row { what: what.into(), shape: shape.clone(), median_ms: secs * 1e3, figure, unit: unit.into(), busbw_gbs: f64::NAN, wrong: None };
        rows.push(row("moe layer", layer_flops(m, t) / secs / 1e12, "TFLOP/s"));
        if let Some(&torch_ms) = args.reference.get(&t) {
            rows.push(row("moe layer vs PyTorch", torch_ms / (secs * 1e3), "x torch"));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn pytorch_times_are_read_by_token_count() {
        let json: serde_json::Value = serde_json::from_str(r#"{"device": "x", "moe_layer_T128_ms": 0.25, "moe_layer_T4096_ms": 1.5, "moe_layer_T4096_loop_ms": 2.0}"#).unwrap();
        assert_eq!(reference_times(&json), BTreeMap::from([(128, 0.25), (4096, 1.5)]));
    }

    #[test]
    fn every_token_count_is_timed_and_compared_where_pytorch_has_it() {
        let args = MoeBenchArgs { tokens: vec![16, 64], iters: 2, reference: BTreeMap::from([(64, 1.0)]) };
        let rows = run(&CpuBackend::new(), &ModelConfig::tiny_moe(), &args).unwrap();
        assert_eq!(rows.iter().map(|r| r.what.as_str()).collect::<Vec<_>>(), ["moe layer", "moe layer", "moe layer vs PyTorch"]);
        assert!(rows.iter().all(|r| r.median_ms > 0.0 && r.figure.is_finite() && r.figure > 0.0), "{rows:?}");
    }
}
