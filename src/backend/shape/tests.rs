//! The shape-only backend's records: dimensions, FLOPs, bytes, buffers, peaks.
use super::*;

fn ops(be: &ShapeBackend) -> Vec<OpRecord> {
    be.recorder()
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Entry::Op(o) => Some(o),
            _ => None,
        })
        .collect()
}

#[test]
fn a_matmul_records_its_dims_flops_bytes_and_buffers() {
    let be = ShapeBackend::new(Dtype::Bf16);
    let (x, w) = (be.zeros(6 * 4).unwrap(), be.zeros(4 * 5).unwrap());
    let y = be.matmul(&x, &w, 6, 4, 5).unwrap();
    assert_eq!((y.len, y.cols), (30, Some(5)));
    let op = ops(&be).pop().unwrap();
    assert_eq!(op.dims, OpDims::Gemm { m: 6, k: 4, n: 5 });
    assert_eq!(op.flops, 2.0 * 6.0 * 4.0 * 5.0);
    assert_eq!((op.bytes_read, op.bytes_written), (2 * (24 + 20), 2 * 30));
    assert_eq!(op.inputs.iter().map(|b| b.id).collect::<Vec<_>>(), vec![x.id, w.id]);
    assert_eq!(op.outputs[0].id, y.id);
}

#[test]
fn peak_memory_counts_live_buffers_since_the_reset() {
    let be = ShapeBackend::new(Dtype::Bf16);
    let keep = be.zeros(100).unwrap();
    drop(be.zeros(1000).unwrap());
    be.reset_peak_memory();
    assert_eq!(be.peak_memory_bytes(), Some(200));
    let tmp = be.zeros(50).unwrap();
    drop(tmp);
    assert_eq!(be.peak_memory_bytes(), Some(300));
    drop(keep);
}

#[test]
fn shapes_are_checked_as_on_the_cpu() {
    let be = ShapeBackend::new(Dtype::Fp32);
    let (x, w) = (be.zeros(3).unwrap(), be.zeros(4).unwrap());
    assert!(matches!(be.matmul(&x, &w, 2, 2, 2), Err(BackendError::Shape(_))));
    let kv = be.zeros(8).unwrap();
    let s = DecodeShape { nseq: 1, cap: 2, len: 3, heads: 1, kv_heads: 1, head_dim: 4 };
    assert!(matches!(be.attention_decode(&be.zeros(4).unwrap(), &kv, &kv, s), Err(BackendError::Shape(_))));
}

#[test]
fn causal_prefill_flops_count_the_keys_each_query_sees() {
    let s = PrefillShape { nseq: 1, sq: 4, skv: 4, kv_seq_stride: 4, heads: 1, kv_heads: 1, head_dim: 1, q_offset: 0 };
    assert_eq!(prefill_flops(&s), 4.0 * (1 + 2 + 3 + 4) as f64);
    // A block at offset 2 of a 6-token sequence: queries see 3..=6 keys.
    let s = PrefillShape { sq: 4, skv: 6, kv_seq_stride: 6, q_offset: 2, ..s };
    assert_eq!(prefill_flops(&s), 4.0 * (3 + 4 + 5 + 6) as f64);
    // Keys clipped to skv.
    let s = PrefillShape { sq: 4, skv: 4, kv_seq_stride: 4, q_offset: 2, ..s };
    assert_eq!(prefill_flops(&s), 4.0 * (3 + 4 + 4 + 4) as f64);
}

#[test]
fn decode_steps_attend_the_steps_length_and_argmax_gives_zeros() {
    let be = ShapeBackend::new(Dtype::Bf16);
    be.set_step(&StepVars { pos: 9, store_at: None, len: 7, tokens: vec![] }).unwrap();
    let (q, kv) = (be.zeros(4).unwrap(), be.zeros(40).unwrap());
    be.attention_decode_step(&q, &kv, &kv, DecodeShape { nseq: 1, cap: 10, len: 0, heads: 1, kv_heads: 1, head_dim: 4 }).unwrap();
    let mut cache = be.zeros(40).unwrap();
    be.store_step(&mut cache, &q, 1, 10, 4).unwrap();
    let logits = be.zeros(6).unwrap();
    assert_eq!(be.argmax(&logits, 2, 3).unwrap(), vec![0, 0]);
    let recorded = ops(&be);
    assert!(recorded.iter().any(|o| matches!(o.dims, OpDims::Decode(d) if d.len == 7)));
    assert!(!recorded.iter().any(|o| o.kind == OpKind::StoreStep), "no store without a store_at");
}
