//! Checks of the operations of the model family beyond dense-4l: SwiGLU's
//! gated product, token embeddings without positions, the split of fused
//! QKV with grouped K/V widths and the rotary embedding of q and k (a
//! prompt, a pool rank's zigzag block of two segments, a decode step from
//! the step scalars), and attention with grouped K/V heads (GQA and MQA) in
//! prefill, every implementation the backend offers, and in split-KV decode,
//! chunks long enough for sm_90's bulk copies included. Shapes: the tiny
//! model's heads of 16, Llama 3 8B's 32 query and 8 K/V heads of 128, and
//! in prefill heads of 32 (moe-16l's 16) and 64 in groups of 2 and 4 and
//! under one K/V head.
//! The expected values come from `reference` only.

use super::reference as r;
use super::{CheckedBackend, Checker};
use crate::backend::{DecodeShape, PrefillShape, QkvSplit, Rope, RopePositions, StepVars};

/// The SiLU-gated product in place (SwiGLU).
pub fn silu_mul<B: CheckedBackend>(c: &mut Checker<B>) {
    for n in [1003, 77 * 14336 + 5] {
        let outcome = (|| {
            let (g, mut gb) = c.input(n, 3.0)?;
            let (u, ub) = c.input(n, 1.0)?;
            c.be.silu_mul(&mut gb, &ub)?;
            Ok(vec![(c.be.download(&gb)?, r::silu_mul(&g, &u))])
        })();
        c.push("silu_mul", format!("n {n}"), outcome);
    }
}

/// Token rows alone, as a model with rotary positions embeds them.
pub fn embed_tokens<B: CheckedBackend>(c: &mut Checker<B>) {
    for (vocab, d, n) in [(512, 64, 13), (1000, 4096, 37)] {
        let outcome = (|| {
            let (table, table_b) = c.input(vocab * d, 1.0)?;
            let tokens = c.rng.tokens(n, vocab);
            let got = c.be.download(&c.be.embed_tokens(&table_b, d, &tokens)?)?;
            Ok(vec![(got, r::embed_tokens(&table, d, &tokens))])
        })();
        c.push("embed_tokens", format!("vocab {vocab} d {d} tokens {n}"), outcome);
    }
}

/// The positions of `rows` rows laid out as `segs` per sequence.
fn positions(rows: usize, segs: &[(usize, usize)]) -> Vec<usize> {
    let per: Vec<usize> = segs.iter().flat_map(|&(st, len)| st..st + len).collect();
    (0..rows).map(|r| per[r % per.len()]).collect()
}

/// Splitting fused QKV of grouped widths, plain and with q and k rotated:
/// two sequences of a prompt at an offset, a zigzag block of two segments
/// at positions past 30000 (Llama's θ = 500000), and a decode step at the
/// step's position.
pub fn split_qkv_rope<B: CheckedBackend>(c: &mut Checker<B>) {
    // (sequences, segments, q heads, K/V heads, head_dim, θ)
    type Case<'a> = (usize, &'a [(usize, usize)], usize, usize, usize, f64);
    let cases: [Case; 4] = [(2, &[(5, 7)], 4, 2, 16, 10_000.0), (1, &[(30_000, 33), (61_000, 33)], 32, 8, 128, 500_000.0), (3, &[(0, 1)], 4, 1, 16, 10_000.0), (2, &[(0, 9)], 4, 4, 16, 10_000.0)];
    for (nseq, segs, qh, kh, dh, theta) in cases {
        let per: usize = segs.iter().map(|s| s.1).sum();
        let rows = nseq * per;
        let (qw, kw) = (qh * dh, kh * dh);
        for rotate in [false, true] {
            let outcome = (|| {
                let (x, xb) = c.input(rows * (qw + 2 * kw), 1.0)?;
                let rope = rotate.then_some(Rope { head_dim: dh, theta, positions: RopePositions::Segments(segs) });
                let (q, k, v) = c.be.split_qkv_rope(&xb, rows, &QkvSplit { q_width: qw, kv_width: kw, rope })?;
                let [mut qr, mut kr, vr] = r::split_qkv_widths(&x, rows, qw, kw);
                if rotate {
                    let pos = positions(rows, segs);
                    qr = r::rope(&qr, qw, dh, theta, &pos);
                    kr = r::rope(&kr, kw, dh, theta, &pos);
                }
                Ok(vec![(c.be.download(&q)?, qr), (c.be.download(&k)?, kr), (c.be.download(&v)?, vr)])
            })();
            let op = if rotate { "split_qkv_rope" } else { "split_qkv[grouped]" };
            c.push(op, format!("{nseq} seq x segments {segs:?}, {qh}+2x{kh} heads of {dh}, theta {theta}"), outcome);
        }
    }
    // A decode step: every row at the step's position.
    let (rows, qw, kw, dh, pos) = (5, 4 * 16, 2 * 16, 16, 4321);
    let outcome = (|| {
        c.be.set_step(&StepVars { pos, store_at: None, len: 0, tokens: Vec::new() })?;
        let (x, xb) = c.input(rows * (qw + 2 * kw), 1.0)?;
        let rope = Some(Rope { head_dim: dh, theta: 10_000.0, positions: RopePositions::Step });
        let (q, k, v) = c.be.split_qkv_rope(&xb, rows, &QkvSplit { q_width: qw, kv_width: kw, rope })?;
        let [qr, kr, vr] = r::split_qkv_widths(&x, rows, qw, kw);
        let at = vec![pos; rows];
        Ok(vec![(c.be.download(&q)?, r::rope(&qr, qw, dh, 10_000.0, &at)), (c.be.download(&k)?, r::rope(&kr, kw, dh, 10_000.0, &at)), (c.be.download(&v)?, vr)])
    })();
    c.push("split_qkv_rope[step]", format!("{rows} rows at the step's position {pos}, 4+2x2 heads of 16"), outcome);
}

/// One grouped prefill attention call with implementation `variant`.
fn prefill<B: CheckedBackend>(c: &mut Checker<B>, s: PrefillShape, variant: &str) {
    let before = c.be.select_prefill_variant(variant);
    let outcome = (|| {
        let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let (q, qb) = c.input(s.nseq * s.sq * width, 1.0)?;
        let (k, kb) = c.input(s.nseq * s.kv_seq_stride * kv_width, 1.0)?;
        let (v, vb) = c.input(s.nseq * s.kv_seq_stride * kv_width, 1.0)?;
        let (ob, lb) = c.be.attention_prefill(&qb, &kb, &vb, s)?;
        let want = r::attention_prefill(&q, &k, &v, s);
        Ok(vec![(c.be.download(&ob)?, want.out), (c.be.download(&lb)?, want.lse)])
    })();
    c.be.select_prefill_variant(before);
    let shape = format!("nseq {} sq {} skv {} stride {} heads {}x{} kv {} q_offset {}", s.nseq, s.sq, s.skv, s.kv_seq_stride, s.heads, s.head_dim, s.kv_heads, s.q_offset);
    c.push(&format!("attention_prefill_gqa[{variant}]"), shape, outcome);
}

/// Causal prefill with grouped K/V heads: groups of 2 and 4 and one K/V
/// head for all (MQA), a query block at an offset against a longer K/V
/// stride, every implementation the backend offers for each head size.
pub fn attention_prefill_grouped_heads<B: CheckedBackend>(c: &mut Checker<B>) {
    let shape = |nseq, sq, skv, stride, heads, kv_heads, head_dim, q_offset| PrefillShape { nseq, sq, skv, kv_seq_stride: stride, heads, kv_heads, head_dim, q_offset };
    for variant in c.be.prefill_variants(16) {
        for s in [shape(2, 7, 12, 16, 4, 2, 16, 5), shape(1, 33, 33, 33, 4, 1, 16, 0)] {
            prefill(c, s, variant);
        }
    }
    for variant in c.be.prefill_variants(128) {
        // Llama 3 8B's heads: a pool rank's block, and two whole sequences.
        prefill(c, shape(1, 200, 480, 512, 32, 8, 128, 280), variant);
        prefill(c, shape(2, 333, 333, 333, 8, 2, 128, 0), variant);
        // One K/V head for all, across several key tiles.
        prefill(c, shape(1, 300, 1000, 1024, 4, 1, 128, 700), variant);
    }
    for head_dim in [32, 64] {
        for variant in c.be.prefill_variants(head_dim) {
            // moe-16l's 16 heads in groups of 4, a pool rank's block; groups of 2 over whole sequences.
            prefill(c, shape(1, 200, 480, 512, 16, 4, head_dim, 280), variant);
            prefill(c, shape(2, 333, 333, 333, 8, 4, head_dim, 0), variant);
            // One K/V head for all, across several key tiles.
            prefill(c, shape(1, 300, 1000, 1024, 4, 1, head_dim, 700), variant);
        }
    }
}

/// Split-KV decode with grouped K/V heads: small heads, Llama 3 8B's at 4K,
/// one K/V head for all, and sequences of 33,900 rows whose chunks are
/// long enough for sm_90's bulk copies (two K/V heads of eight, and one of
/// 32: the most stages the bulk kernel's ring takes).
pub fn attention_decode_grouped_heads<B: CheckedBackend>(c: &mut Checker<B>) {
    let shape = |nseq, cap, len, heads, kv_heads, head_dim| DecodeShape { nseq, cap, len, heads, kv_heads, head_dim };
    for s in [shape(2, 20, 13, 4, 2, 16), shape(3, 4200, 4099, 32, 8, 128), shape(2, 300, 257, 8, 1, 128), shape(1, 34_000, 33_900, 8, 2, 128), shape(1, 34_000, 33_900, 32, 1, 128)] {
        let outcome = (|| {
            let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
            let (q, qb) = c.input(s.nseq * width, 1.0)?;
            let (k, kb) = c.input(s.nseq * s.cap * kv_width, 1.0)?;
            let (v, vb) = c.input(s.nseq * s.cap * kv_width, 1.0)?;
            let (ob, lb) = c.be.attention_decode(&qb, &kb, &vb, s)?;
            let want = r::attention_decode(&q, &k, &v, s);
            Ok(vec![(c.be.download(&ob)?, want.out), (c.be.download(&lb)?, want.lse)])
        })();
        c.push("attention_decode_gqa", format!("nseq {} cap {} len {} heads {}x{} kv {}", s.nseq, s.cap, s.len, s.heads, s.head_dim, s.kv_heads), outcome);
    }
}
