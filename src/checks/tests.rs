//! The checks themselves: they fail a backend that is wrong, they count NaN
//! as a failure, and the reference they compare with is self-consistent.

use super::reference as r;
use super::*;
use crate::backend::{BackendError, DecodeShape, PrefillShape, QkvSplit, Result, RowRun, StepVars};
use std::time::Instant;

/// One deliberate mistake in an otherwise correct backend.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// `gelu` scaled by 1.01.
    GeluOnePercentHigh,
    /// The last element of every RMSNorm output is never written.
    RmsnormLastUnwritten,
    /// Decode attention leaves out the last cached row.
    DecodeDropsLastKey,
    /// The router gives a tie to the highest expert index.
    RouterTiesUpwards,
    /// The rotary embedding turns q but leaves k as it was.
    RopeLeavesKUnrotated,
    /// Grouped attention reads K/V head `h % kv_heads` instead of `h / group`.
    GroupsInterleaved,
}

/// The CPU backend with one [`Fault`].
struct Faulty {
    cpu: CpuBackend,
    fault: Fault,
}

impl Backend for Faulty {
    type Buf = Vec<f32>;
    type Mark = Instant;
    type Graph = ();
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn size_bytes(&self, buf: &Vec<f32>) -> usize {
        buf.len() * 4
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        self.cpu.upload(host)
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        self.cpu.download(buf)
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        self.cpu.zeros(len)
    }
    fn zeros_f32(&self, len: usize) -> Result<Vec<f32>> {
        self.cpu.zeros_f32(len)
    }
    fn set_poison_outputs(&self, on: bool) {
        self.cpu.set_poison_outputs(on)
    }
    fn poison_outputs(&self) -> bool {
        self.cpu.poison_outputs()
    }
    fn embed(&self, table: &Vec<f32>, d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Result<Vec<f32>> {
        self.cpu.embed(table, d, tokens, nseq, n, pos0)
    }
    fn matmul(&self, x: &Vec<f32>, w: &Vec<f32>, m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
        self.cpu.matmul(x, w, m, k, n)
    }
    fn rmsnorm(&self, x: &Vec<f32>, weight: &Vec<f32>, rows: usize, cols: usize, eps: f32) -> Result<Vec<f32>> {
        let mut out = self.cpu.rmsnorm(x, weight, rows, cols, eps)?;
        if self.fault == Fault::RmsnormLastUnwritten && self.poison_outputs() {
            // What the poisoned buffer holds where the kernel did not write.
            if let Some(last) = out.last_mut() {
                *last = f32::NAN;
            }
        }
        Ok(out)
    }
    fn gelu(&self, x: &mut Vec<f32>) -> Result<()> {
        self.cpu.gelu(x)?;
        if self.fault == Fault::GeluOnePercentHigh {
            x.iter_mut().for_each(|v| *v *= 1.01);
        }
        Ok(())
    }
    fn gelu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<()> {
        self.cpu.gelu_mul(gate, up)
    }
    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        self.cpu.add_assign(x, y)
    }
    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<()> {
        self.cpu.silu_mul(gate, up)
    }
    fn split_qkv_rope(&self, qkv: &Vec<f32>, rows: usize, split: &QkvSplit) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (q, k, v) = self.cpu.split_qkv_rope(qkv, rows, split)?;
        if self.fault == Fault::RopeLeavesKUnrotated {
            let plain = self.cpu.split_qkv_rope(qkv, rows, &QkvSplit { rope: None, ..*split })?;
            return Ok((q, plain.1, v));
        }
        Ok((q, k, v))
    }
    fn gather_rows(&self, src: &Vec<f32>, cols: usize, runs: &[RowRun]) -> Result<Vec<f32>> {
        self.cpu.gather_rows(src, cols, runs)
    }
    fn scatter_rows(&self, dst: &mut Vec<f32>, cols: usize, runs: &[RowRun], src: &Vec<f32>) -> Result<()> {
        self.cpu.scatter_rows(dst, cols, runs, src)
    }
    fn attention_prefill(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, s: PrefillShape) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.fault == Fault::GroupsInterleaved && s.kv_heads < s.heads {
            // Repeat the K/V heads so that query head h meets K/V head h % kv_heads.
            let rows = s.nseq * s.kv_seq_stride;
            let spread = |x: &Vec<f32>| -> Vec<f32> { (0..rows).flat_map(|r| (0..s.heads).flat_map(move |h| x[(r * s.kv_heads + h % s.kv_heads) * s.head_dim..][..s.head_dim].to_vec())).collect() };
            return self.cpu.attention_prefill(q, &spread(k), &spread(v), PrefillShape { kv_heads: s.heads, ..s });
        }
        self.cpu.attention_prefill(q, k, v, s)
    }
    fn attention_decode(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, s: DecodeShape) -> Result<(Vec<f32>, Vec<f32>)> {
        let len = if self.fault == Fault::DecodeDropsLastKey { s.len.saturating_sub(1) } else { s.len };
        self.cpu.attention_decode(q, k, v, DecodeShape { len, ..s })
    }
    fn merge_partials(&self, o: &mut Vec<f32>, lse: &mut Vec<f32>, o2: &Vec<f32>, lse2: &Vec<f32>, rows: usize, head_dim: usize) -> Result<()> {
        self.cpu.merge_partials(o, lse, o2, lse2, rows, head_dim)
    }
    fn argmax(&self, logits: &Vec<f32>, rows: usize, cols: usize) -> Result<Vec<u32>> {
        self.cpu.argmax(logits, rows, cols)
    }
    fn router_top_k(&self, logits: &Vec<f32>, rows: usize, experts: usize, k: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.fault != Fault::RouterTiesUpwards {
            return self.cpu.router_top_k(logits, rows, experts, k);
        }
        // Experts in reverse order: the lowest index of a tie is the highest one.
        let reversed: Vec<f32> = logits.chunks(experts).flat_map(|row| row.iter().rev().copied()).collect();
        let (ids, weights) = self.cpu.router_top_k(&reversed, rows, experts, k)?;
        Ok((ids.iter().map(|&e| (experts - 1) as f32 - e).collect(), weights))
    }
    fn expert_slots(&self, ids: &Vec<f32>, assignments: usize, experts: usize, capacity: Option<usize>) -> Result<(Vec<f32>, Vec<usize>)> {
        self.cpu.expert_slots(ids, assignments, experts, capacity)
    }
    fn permute_to_experts(&self, x: &Vec<f32>, cols: usize, slots: &Vec<f32>, rows: usize, k: usize, kept: usize) -> Result<Vec<f32>> {
        self.cpu.permute_to_experts(x, cols, slots, rows, k, kept)
    }
    fn combine_from_experts(&self, y: &Vec<f32>, cols: usize, slots: &Vec<f32>, weights: &Vec<f32>, rows: usize, k: usize) -> Result<Vec<f32>> {
        self.cpu.combine_from_experts(y, cols, slots, weights, rows, k)
    }
    fn grouped_matmul(&self, x: &Vec<f32>, w: &Vec<f32>, groups: &[usize], k: usize, n: usize) -> Result<Vec<f32>> {
        self.cpu.grouped_matmul(x, w, groups, k, n)
    }
    fn set_step(&self, vars: &StepVars) -> Result<()> {
        self.cpu.set_step(vars)
    }
    fn embed_step(&self, table: &Vec<f32>, d: usize, nseq: usize) -> Result<Vec<f32>> {
        self.cpu.embed_step(table, d, nseq)
    }
    fn embed_step_tokens(&self, table: &Vec<f32>, d: usize, nseq: usize) -> Result<Vec<f32>> {
        self.cpu.embed_step_tokens(table, d, nseq)
    }
    fn store_step(&self, cache: &mut Vec<f32>, src: &Vec<f32>, nseq: usize, cap: usize, width: usize) -> Result<()> {
        self.cpu.store_step(cache, src, nseq, cap, width)
    }
    fn attention_decode_step(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, s: DecodeShape) -> Result<(Vec<f32>, Vec<f32>)> {
        self.cpu.attention_decode_step(q, k, v, s)
    }
    fn capture_end(&self) -> Result<()> {
        Err(BackendError::Unavailable { backend: "faulty", reason: "cannot record".into() })
    }
    fn replay(&self, _graph: &()) -> Result<()> {
        self.capture_end()
    }
    fn mark(&self) -> Result<Instant> {
        self.cpu.mark()
    }
    fn elapsed_s(&self, from: &Instant, to: &Instant) -> Result<f64> {
        self.cpu.elapsed_s(from, to)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }
}

impl CheckedBackend for Faulty {
    fn prefill_variants(&self, _head_dim: usize) -> Vec<&'static str> {
        vec!["cpu"]
    }
    fn select_prefill_variant(&self, _name: &str) -> &'static str {
        "cpu"
    }
}

fn failing(rows: &[CheckRow]) -> Vec<&CheckRow> {
    rows.iter().filter(|r| !r.pass).collect()
}

#[test]
fn a_gelu_one_percent_off_fails_the_gelu_check() {
    let be = Faulty { cpu: CpuBackend::new(), fault: Fault::GeluOnePercentHigh };
    let rows = run(&be, 3, gelu);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| !r.pass && (r.error - 0.01).abs() < 1e-3), "{rows:?}");
    // The other element-wise checks do not see the fault.
    assert!(failing(&run(&be, 3, gelu_mul)).is_empty());
}

#[test]
fn an_output_element_left_unwritten_fails_as_nan() {
    let be = Faulty { cpu: CpuBackend::new(), fault: Fault::RmsnormLastUnwritten };
    let rows = run(&be, 4, rmsnorm);
    assert!(!rows.is_empty() && rows.iter().all(|r| !r.pass && r.error.is_nan()), "{rows:?}");
    assert!(!be.poison_outputs(), "poisoning is switched off again after the check");
}

#[test]
fn decode_attention_that_drops_a_key_fails_but_an_empty_cache_still_passes() {
    let be = Faulty { cpu: CpuBackend::new(), fault: Fault::DecodeDropsLastKey };
    let rows = run(&be, 5, attention_decode);
    for r in &rows {
        // Zero length: nothing to drop; every other shape loses its last row.
        assert_eq!(r.pass, r.shape.contains("len 0 "), "{r:?}");
    }
}

#[test]
fn a_router_that_gives_ties_to_the_highest_index_fails_the_router_check() {
    let rows = run(&Faulty { cpu: CpuBackend::new(), fault: Fault::RouterTiesUpwards }, 8, router_top_k);
    assert!(!rows.is_empty() && rows.iter().all(|r| !r.pass), "{rows:?}");
    assert!(failing(&run(&CpuBackend::new(), 8, router_top_k)).is_empty());
}

#[test]
fn the_reference_slots_group_assignments_by_expert_and_drop_past_the_capacity() {
    let (slots, counts) = r::expert_slots(&[2, 0, 2, 1, 2, 0], 3, Some(2));
    assert_eq!(counts, vec![2, 1, 3]);
    // Expert 0 holds rows 0-1, expert 1 row 2, expert 2 rows 3-4; its third assignment is dropped.
    assert_eq!(slots, vec![Some(3), Some(0), Some(4), Some(2), None, Some(1)]);
    let (ids, w) = r::router_top_k(&[1.0, 3.0, 3.0, 0.0], 1, 4, 2);
    assert_eq!(ids, vec![1, 2]);
    assert!((w[0] - 0.5).abs() < 1e-12 && (w[1] - 0.5).abs() < 1e-12);
}

#[test]
fn a_rotation_that_leaves_k_unrotated_fails_only_the_rotating_splits() {
    let be = Faulty { cpu: CpuBackend::new(), fault: Fault::RopeLeavesKUnrotated };
    let rows = run(&be, 7, split_qkv_rope);
    for r in &rows {
        // A plain split has nothing to rotate; a rotation at position 0 turns nothing.
        let unturned = r.op == "split_qkv[grouped]" || r.shape.contains("[(0, 1)]");
        assert_eq!(r.pass, unturned, "{r:?}");
    }
}

#[test]
fn grouped_attention_that_pairs_the_wrong_kv_heads_fails_but_mqa_and_mha_cannot_tell() {
    let be = Faulty { cpu: CpuBackend::new(), fault: Fault::GroupsInterleaved };
    let rows = run(&be, 8, attention_prefill_grouped_heads);
    for r in &rows {
        // With one K/V head every pairing is the same one.
        assert_eq!(r.pass, r.shape.contains("kv 1 "), "{r:?}");
    }
}

#[test]
fn the_cpu_backend_passes_the_checks_it_is_asked_for() {
    let be = CpuBackend::new();
    let rows = run(&be, 6, split_qkv);
    assert!(rows.len() == 3 && failing(&rows).is_empty(), "{rows:?}");
    // It cannot record: only the eager decode steps have rows.
    let steps = run(&be, 6, decode_steps);
    assert!(steps.iter().all(|r| r.op == "decode_step[eager]" && r.pass), "{steps:?}");
}

#[test]
fn nan_or_a_one_sided_infinity_never_passes() {
    assert!(relative_l2(&[f32::NAN], &[1.0]).is_nan());
    assert!(relative_l2(&[f32::NEG_INFINITY], &[1.0]).is_infinite());
    assert!(relative_l2(&[1.0], &[1.0, 2.0]).is_nan());
    assert_eq!(relative_l2(&[1.0, f32::NEG_INFINITY], &[1.0, f32::NEG_INFINITY]), 0.0);
}

#[test]
fn random_inputs_are_reproducible_and_not_zero() {
    let a = Rng(7).normals(100, 1.0);
    assert_eq!(a, Rng(7).normals(100, 1.0));
    assert!(a.iter().all(|x| x.is_finite()) && a.iter().any(|&x| x != 0.0));
    let var = a.iter().map(|x| x * x).sum::<f32>() / 100.0;
    assert!((0.5..2.0).contains(&var), "{var}");
}

fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()) || x == y, "element {i}: {x} vs {y}");
    }
}

fn normals(n: usize, seed: u64) -> Vec<f64> {
    r::wide(&Rng(seed).normals(n, 1.0))
}

#[test]
fn the_reference_merge_of_two_cache_halves_is_attention_over_the_whole_cache() {
    let (nseq, cap, heads, dh) = (2, 9, 3, 4);
    let width = heads * dh;
    let (q, k, v) = (normals(nseq * width, 1), normals(nseq * cap * width, 2), normals(nseq * cap * width, 3));
    let whole = r::attention_decode(&q, &k, &v, DecodeShape { nseq, cap, len: cap, heads, kv_heads: heads, head_dim: dh });
    let half = |start: usize, len: usize| {
        let runs: Vec<RowRun> = (0..nseq).map(|n| RowRun::new(n * cap + start, len)).collect();
        let (kh, vh) = (r::gather_rows(&k, width, &runs), r::gather_rows(&v, width, &runs));
        r::attention_decode(&q, &kh, &vh, DecodeShape { nseq, cap: len, len, heads, kv_heads: heads, head_dim: dh })
    };
    let (a, b) = (half(0, 4), half(4, 5));
    let merged = r::merge_partials(&a.out, &a.lse, &b.out, &b.lse, nseq * heads, dh);
    close(&merged.out, &whole.out);
    close(&merged.lse, &whole.lse);
}

#[test]
fn a_reference_query_block_at_an_offset_equals_those_rows_of_the_full_prefill() {
    let (s, heads, dh) = (8, 2, 4);
    let width = heads * dh;
    let (q, k, v) = (normals(s * width, 4), normals(s * width, 5), normals(s * width, 6));
    let full = r::attention_prefill(&q, &k, &v, PrefillShape { nseq: 1, sq: s, skv: s, kv_seq_stride: s, heads, kv_heads: heads, head_dim: dh, q_offset: 0 });
    let block = r::attention_prefill(&q[3 * width..6 * width], &k, &v, PrefillShape { nseq: 1, sq: 3, skv: 6, kv_seq_stride: s, heads, kv_heads: heads, head_dim: dh, q_offset: 3 });
    close(&block.out, &full.out[3 * width..6 * width]);
    // The first query sees one key: its output is that key's value.
    close(&full.out[..dh], &v[..dh]);
    assert_eq!(r::attention_prefill(&q, &k, &v, PrefillShape { nseq: 1, sq: s, skv: 0, kv_seq_stride: s, heads, kv_heads: heads, head_dim: dh, q_offset: 0 }).lse, vec![f64::NEG_INFINITY; heads * s]);
}

#[test]
fn the_reference_sinusoid_starts_at_sine_zero_and_cosine_one() {
    assert_eq!((r::sinusoid(0, 0, 8), r::sinusoid(0, 1, 8)), (0.0, 1.0));
    assert!((r::sinusoid(3, 0, 8) - 3f64.sin()).abs() < 1e-15);
    assert!((r::gelu(10.0) - 10.0).abs() < 1e-9 && r::gelu(0.0) == 0.0);
}
