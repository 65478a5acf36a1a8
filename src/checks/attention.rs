//! Checks of the attention operations: causal prefill (every implementation
//! the backend offers, at heads of 16, 32, 64 and 128), decode, the merge of partial results, and decode
//! steps driven by the step scalars, op by op and recorded once and replayed.
//! The expected values come from `reference` only, never from another backend.

use super::reference::{self as r, wide};
use super::{CheckedBackend, Checker, Pairs};
use crate::backend::{DecodeShape, PrefillShape, StepVars};

/// Merging partial results, with rows that have no keys on one side or on both.
pub fn merge_partials<B: CheckedBackend>(c: &mut Checker<B>) {
    for (rows, head_dim) in [(64, 16), (32 * 3, 128)] {
        let outcome = (|| {
            let (o, mut ob) = c.input(rows * head_dim, 1.0)?;
            let (o2, o2b) = c.input(rows * head_dim, 1.0)?;
            let mut lse = c.rng.normals(rows, 3.0);
            let mut lse2 = c.rng.normals(rows, 3.0);
            for r in (0..rows).step_by(5) {
                lse[r] = f32::NEG_INFINITY;
            }
            for r in (0..rows).step_by(7) {
                lse2[r] = f32::NEG_INFINITY;
            }
            let mut lb = c.be.upload_f32(&lse)?;
            let l2b = c.be.upload_f32(&lse2)?;
            c.be.merge_partials(&mut ob, &mut lb, &o2b, &l2b, rows, head_dim)?;
            let want = r::merge_partials(&o, &wide(&lse), &o2, &wide(&lse2), rows, head_dim);
            Ok(vec![(c.be.download(&ob)?, want.out), (c.be.download(&lb)?, want.lse)])
        })();
        c.push("merge_partials", format!("rows {rows} head_dim {head_dim}"), outcome);
    }
}

/// One prefill attention call with implementation `variant`.
fn prefill<B: CheckedBackend>(c: &mut Checker<B>, s: PrefillShape, variant: &str) {
    let before = c.be.select_prefill_variant(variant);
    let outcome = (|| {
        let width = s.heads * s.head_dim;
        let (q, qb) = c.input(s.nseq * s.sq * width, 1.0)?;
        let (k, kb) = c.input(s.nseq * s.kv_seq_stride * width, 1.0)?;
        let (v, vb) = c.input(s.nseq * s.kv_seq_stride * width, 1.0)?;
        let (ob, lb) = c.be.attention_prefill(&qb, &kb, &vb, s)?;
        let want = r::attention_prefill(&q, &k, &v, s);
        Ok(vec![(c.be.download(&ob)?, want.out), (c.be.download(&lb)?, want.lse)])
    })();
    c.be.select_prefill_variant(before);
    let shape = format!("nseq {} sq {} skv {} stride {} heads {}x{} q_offset {}", s.nseq, s.sq, s.skv, s.kv_seq_stride, s.heads, s.head_dim, s.q_offset);
    c.push(&format!("attention_prefill[{variant}]"), shape, outcome);
}

/// Prefill with the tiny model's heads of 16: a query block at an offset
/// against a longer K/V stride, a length past one tile, and no keys at all.
pub fn attention_prefill_small_heads<B: CheckedBackend>(c: &mut Checker<B>) {
    let tiny = |nseq, sq, skv, stride, q_offset| PrefillShape { nseq, sq, skv, kv_seq_stride: stride, heads: 4, kv_heads: 4, head_dim: 16, q_offset };
    for variant in c.be.prefill_variants(16) {
        for s in [tiny(2, 7, 12, 16, 5), tiny(1, 33, 33, 33, 0), tiny(2, 5, 0, 4, 0)] {
            prefill(c, s, variant);
        }
    }
}

/// A prefill shape with heads of 128.
fn dense(nseq: usize, sq: usize, skv: usize, stride: usize, heads: usize, q_offset: usize) -> PrefillShape {
    PrefillShape { nseq, sq, skv, kv_seq_stride: stride, heads, kv_heads: heads, head_dim: 128, q_offset }
}

/// Prefill with dense-4l's heads of 128, every implementation the backend offers.
pub fn attention_prefill_dense_heads<B: CheckedBackend>(c: &mut Checker<B>) {
    for variant in c.be.prefill_variants(128) {
        // A pool rank's block: queries 280..480 against K/V rows 0..480 of 512.
        prefill(c, dense(1, 200, 480, 512, 32, 280), variant);
        // Plain causal prefill, two sequences, length not a multiple of any tile.
        prefill(c, dense(2, 333, 333, 333, 8, 0), variant);
        // Queries past the end of K/V see all of it.
        prefill(c, dense(1, 100, 480, 512, 4, 450), variant);
        // No keys at all.
        prefill(c, dense(1, 70, 0, 64, 2, 0), variant);
    }
}

/// Prefill with heads of 128 where the kernels' tiles and pipelines have
/// their edges (the Hopper kernel's 128-row query blocks and 128-key tiles
/// in a two-stage ring, the others' smaller tiles), every implementation the
/// backend offers.
pub fn attention_prefill_tile_edges<B: CheckedBackend>(c: &mut Checker<B>) {
    for variant in c.be.prefill_variants(128) {
        // Eight key tiles of 128: the K/V ring wraps several times.
        prefill(c, dense(1, 1000, 1000, 1000, 4, 0), variant);
        // Three sequences, queries at an offset inside a tile, a K/V stride longer than skv.
        prefill(c, dense(3, 130, 1337, 1400, 2, 1207), variant);
        // A pool rank's block: queries 1700..2000 against K/V rows 0..2000 of 2048.
        prefill(c, dense(1, 300, 2000, 2048, 4, 1700), variant);
        // One query row per sequence, at the end of its K/V.
        prefill(c, dense(2, 1, 700, 768, 4, 699), variant);
        // A diagonal that cuts the tiles unevenly (offset 43, 257 rows).
        prefill(c, dense(1, 257, 300, 320, 2, 43), variant);
    }
}

/// A prefill shape with `heads` heads of `head_dim` and as many K/V heads.
#[allow(clippy::too_many_arguments)]
fn heads_of(head_dim: usize, nseq: usize, sq: usize, skv: usize, stride: usize, heads: usize, q_offset: usize) -> PrefillShape {
    PrefillShape { nseq, sq, skv, kv_seq_stride: stride, heads, kv_heads: heads, head_dim, q_offset }
}

/// Prefill with heads of 32 (moe-16l's 16 heads) and 64, every
/// implementation the backend offers for them: whole sequences, a pool
/// rank's block, queries past the end of K/V, no keys.
pub fn attention_prefill_heads_32_64<B: CheckedBackend>(c: &mut Checker<B>) {
    for head_dim in [32, 64] {
        let shape = |nseq, sq, skv, stride, heads, q_offset| heads_of(head_dim, nseq, sq, skv, stride, heads, q_offset);
        for variant in c.be.prefill_variants(head_dim) {
            // Two sequences of moe-16l's heads, length not a multiple of any tile.
            prefill(c, shape(2, 333, 333, 333, 16, 0), variant);
            // A pool rank's block: queries 280..480 against K/V rows 0..480 of 512.
            prefill(c, shape(1, 200, 480, 512, 16, 280), variant);
            // Queries past the end of K/V see all of it.
            prefill(c, shape(1, 100, 480, 512, 4, 450), variant);
            // No keys at all.
            prefill(c, shape(1, 70, 0, 64, 2, 0), variant);
        }
    }
}

/// Prefill with heads of 32 and 64 where the tensor-core kernels' tiles
/// have their edges (64-key tiles in a double buffer, query blocks of 64
/// and 128 rows), every implementation the backend offers for them.
pub fn attention_prefill_tile_edges_32_64<B: CheckedBackend>(c: &mut Checker<B>) {
    for head_dim in [32, 64] {
        let shape = |nseq, sq, skv, stride, heads, q_offset| heads_of(head_dim, nseq, sq, skv, stride, heads, q_offset);
        for variant in c.be.prefill_variants(head_dim) {
            // Exactly one key tile and one 64-row query block.
            prefill(c, shape(1, 64, 64, 64, 2, 0), variant);
            // One row past a 128-row query block and past two key tiles.
            prefill(c, shape(2, 129, 129, 129, 2, 0), variant);
            // Sixteen key tiles: the double buffer is refilled many times.
            prefill(c, shape(1, 1000, 1000, 1000, 2, 0), variant);
            // Three sequences, queries at an offset inside a tile, a K/V stride longer than skv.
            prefill(c, shape(3, 130, 1337, 1400, 2, 1207), variant);
            // One query row per sequence, at the end of its K/V.
            prefill(c, shape(2, 1, 700, 768, 4, 699), variant);
            // A diagonal that cuts the tiles unevenly (offset 43, 257 rows).
            prefill(c, shape(1, 257, 300, 320, 2, 43), variant);
        }
    }
}

/// Decode attention at long, zero and one-row lengths, small and dense
/// heads, and one sequence of 33,900 rows of two heads: chunks of 256 rows
/// and more, which on sm_90 are fed by bulk copies (`decode_bulk`).
pub fn attention_decode<B: CheckedBackend>(c: &mut Checker<B>) {
    let shape = |nseq, cap, len, heads, head_dim| DecodeShape { nseq, cap, len, heads, kv_heads: heads, head_dim };
    let shapes = [shape(2, 20, 13, 4, 16), shape(2, 8, 0, 4, 16), shape(3, 1, 1, 4, 16), shape(2, 5000, 4099, 32, 128), shape(1, 64, 0, 32, 128), shape(1, 34_000, 33_900, 2, 128)];
    for s in shapes {
        let outcome = (|| {
            let width = s.heads * s.head_dim;
            let (q, qb) = c.input(s.nseq * width, 1.0)?;
            let (k, kb) = c.input(s.nseq * s.cap * width, 1.0)?;
            let (v, vb) = c.input(s.nseq * s.cap * width, 1.0)?;
            let (ob, lb) = c.be.attention_decode(&qb, &kb, &vb, s)?;
            let want = r::attention_decode(&q, &k, &v, s);
            Ok(vec![(c.be.download(&ob)?, want.out), (c.be.download(&lb)?, want.lse)])
        })();
        c.push("attention_decode", format!("nseq {} cap {} len {} heads {}x{}", s.nseq, s.cap, s.len, s.heads, s.head_dim), outcome);
    }
}

/// A miniature decode step from the step scalars, op by op and (where the
/// backend records) recorded once and replayed: embed the step's tokens,
/// store them as the new K and V row, attend with them as the query; at
/// four positions, one of them storing nothing (a pool rank that does not
/// own the step's token). Outputs of every step and the final caches are
/// compared with the reference doing the same. The third case, one sequence
/// of a 34,000-row cache of two heads, has chunks of 256 rows and more,
/// which on sm_90 are fed by bulk copies (`decode_bulk`); the fourth is
/// Llama 3's grouped K/V heads (8 for 32 query heads) at 8K, the K/V rows
/// embedded from a table of their own width.
pub fn decode_steps<B: CheckedBackend>(c: &mut Checker<B>) {
    let cases = [
        (DecodeShape { nseq: 2, cap: 40, len: 30, heads: 4, kv_heads: 4, head_dim: 16 }, 64),
        (DecodeShape { nseq: 3, cap: 4200, len: 4096, heads: 32, kv_heads: 32, head_dim: 128 }, 100),
        (DecodeShape { nseq: 1, cap: 34_000, len: 33_000, heads: 2, kv_heads: 2, head_dim: 128 }, 100),
        (DecodeShape { nseq: 2, cap: 8200, len: 8064, heads: 32, kv_heads: 8, head_dim: 128 }, 100),
    ];
    for (s, vocab) in cases {
        for record in [false, true] {
            let shape = format!("nseq {} cap {} len {}..{} heads {}x{} kv {}, 4 steps", s.nseq, s.cap, s.len + 1, s.len + 3, s.heads, s.head_dim, s.kv_heads);
            let op = if record { "decode_step[recorded]" } else { "decode_step[eager]" };
            // `None`: the backend cannot record, so there is nothing more to check.
            if let Some(outcome) = steps(c, s, vocab, record).transpose() {
                c.push(op, shape, outcome);
            }
        }
    }
}

/// The steps of [`decode_steps`]; `None` when `record` is asked of a
/// backend that cannot record.
fn steps<B: CheckedBackend>(c: &mut Checker<B>, s: DecodeShape, vocab: usize, record: bool) -> crate::backend::Result<Option<Pairs>> {
    let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let (table, table_b) = c.input(vocab * width, 1.0)?;
    let (kv_table, kv_table_b) = c.input(vocab * kv_width, 1.0)?;
    let (mut kc, mut kb) = c.input(s.nseq * s.cap * kv_width, 1.0)?;
    let (mut vc, mut vb) = c.input(s.nseq * s.cap * kv_width, 1.0)?;
    // The frequency tables are made outside the recording (as prefill does).
    c.be.embed(&table_b, width, &[0], 1, 1, 0)?;
    c.be.embed(&kv_table_b, kv_width, &[0], 1, 1, 0)?;
    let plan = [(s.len + 1000, true, s.len + 1), (s.len + 1001, true, s.len + 2), (s.len + 1002, false, s.len + 2), (s.len + 1003, true, s.len + 3)];
    let be = c.be;
    let step_on_device = |kb: &mut B::Buf, vb: &mut B::Buf| -> crate::backend::Result<(B::Buf, B::Buf)> {
        let x = be.embed_step(&table_b, width, s.nseq)?;
        let row = be.embed_step(&kv_table_b, kv_width, s.nseq)?;
        be.store_step(kb, &row, s.nseq, s.cap, kv_width)?;
        be.store_step(vb, &row, s.nseq, s.cap, kv_width)?;
        be.attention_decode_step(&x, kb, vb, s)
    };
    let mut pairs = Vec::new();
    let mut recorded: Option<(B::Graph, B::Buf, B::Buf)> = None;
    for &(pos, store, len) in &plan {
        let vars = StepVars { pos, store_at: store.then_some(len - 1), len, tokens: c.rng.tokens(s.nseq, vocab) };
        be.set_step(&vars)?;
        let (o, l) = if record {
            if recorded.is_none() {
                if !be.capture_begin()? {
                    return Ok(None);
                }
                let out = step_on_device(&mut kb, &mut vb);
                let rec = be.capture_end();
                let (o, l) = out?;
                recorded = Some((rec?, o, l));
            }
            let (rec, o, l) = recorded.as_ref().expect("recorded above");
            be.replay(rec)?;
            (be.download(o)?, be.download(l)?)
        } else {
            let (o, l) = step_on_device(&mut kb, &mut vb)?;
            (be.download(&o)?, be.download(&l)?)
        };
        let x = r::embed(&table, width, &vars.tokens, s.nseq, 1, pos);
        let row = r::embed(&kv_table, kv_width, &vars.tokens, s.nseq, 1, pos);
        kc = r::store_rows_at(&kc, &row, s.nseq, s.cap, kv_width, vars.store_at);
        vc = r::store_rows_at(&vc, &row, s.nseq, s.cap, kv_width, vars.store_at);
        let want = r::attention_decode(&x, &kc, &vc, DecodeShape { len, ..s });
        pairs.push((o, want.out));
        pairs.push((l, want.lse));
    }
    pairs.push((be.download(&kb)?, kc));
    pairs.push((be.download(&vb)?, vc));
    Ok(Some(pairs))
}
