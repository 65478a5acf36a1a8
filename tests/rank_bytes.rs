//! Per-rank message bytes of FA Pool base 2 + pool 4 against the design's
//! table (docs/design.md, "Bytes per rank and layer"): every rank's bytes
//! per category in the results file are the table's per-layer figures times
//! the layers, plus the batch's one message outside the layers (the last
//! prompt row to the base root); and with direct results no rank moves more
//! than 1.25 x the mean of its role (the tree funnels through pool rank 0 by
//! design).

mod common;
use common::*;
use fapool::model::ModelConfig;
use fapool::results::read_run;
use std::collections::BTreeMap;

const BASE: usize = 2;
const POOL: usize = 4;
const SEQ: usize = 64;
/// The CPU backend computes in f32.
const ELEM: usize = 4;

/// One prompt of `SEQ` tokens, the pool fully active (SEQ / 16 = 4 ranks),
/// prefill only, the tiny model with `kv_heads` K/V heads.
fn job_toml(pool_ops: &str, aggregation: &str, chunks: usize, kv_heads: usize) -> String {
    format!(
        r#"
[run]
name = "bytes"
backend = "cpu"
[model]
preset = "tiny"
kv_heads = {kv_heads}
[workload]
sequences_per_category = 1
output_tokens = 1
batch_size = 1
seed = 7
[[workload.category]]
name = "one"
lengths = [{SEQ}]
[[strategy]]
kind = "fapool"
base = {BASE}
pool_max = {POOL}
threshold = 32
tokens_per_pool_gpu = 16
partition = "zigzag"
pool_ops = "{pool_ops}"
aggregation = "{aggregation}"
chunks = {chunks}
"#
    )
}

type Bytes = BTreeMap<&'static str, u64>;

/// The design's table: bytes per layer of each category, by role and
/// group rank (docs/design.md). `q` is the width of a row handed to the
/// pool: the normalised input (d) when the pool projects QKV, else Q, K and
/// V (d + 2 d_kv).
fn design_per_layer(cfg: &ModelConfig, pool_ops: &str, aggregation: &str, role: &str, index: usize) -> Bytes {
    // K/V rows are kv_heads × head_dim wide: replication moves heads / kv_heads times less than with every head.
    let (d, kv) = (cfg.d_model, cfg.kv_heads * cfg.head_dim);
    let q = if pool_ops == "attention" { d + 2 * kv } else { d };
    let row = |width: usize| (width * ELEM) as u64;
    let mut b = Bytes::new();
    match role {
        "base" => {
            let rows = SEQ / BASE;
            b.insert("pool_scatter", rows as u64 * row(q));
            b.insert("pool_to_base", rows as u64 * row(d));
            b.insert("tp_allgather", SEQ as u64 * row(d));
            b.insert("tp_reducescatter", SEQ as u64 * row(d));
        }
        _ => {
            let rows = SEQ / POOL;
            b.insert("pool_scatter", rows as u64 * row(q));
            b.insert("kv_replication", 2 * SEQ as u64 * row(kv));
            if aggregation == "direct" {
                b.insert("pool_to_base", rows as u64 * row(d));
            } else {
                // Binary tree to pool rank 0: a rank receives its subtree's
                // blocks and sends its own subtree's up; rank 0 sends all.
                // Rank r's subtree is r .. r + (lowest set bit of r), cut at
                // the pool's end; rank 0's is the whole pool.
                let subtree = |r: usize| if r == 0 { POOL } else { (r & r.wrapping_neg()).min(POOL - r) };
                let sub = subtree(index) as u64;
                let received = (sub - 1) * rows as u64 * row(d);
                let sent = if index == 0 { 0 } else { sub * rows as u64 * row(d) };
                b.insert("result_aggregation", received + sent);
                if index == 0 {
                    b.insert("pool_to_base", SEQ as u64 * row(d));
                }
            }
        }
    }
    b
}

fn measured(pool_ops: &str, aggregation: &str, chunks: usize, kv_heads: usize) -> Vec<(String, Bytes)> {
    let dir = scratch(&format!("rank-bytes-{}-{aggregation}-{chunks}-kv{kv_heads}", pool_ops.replace('+', "-")));
    let job = job(&dir, "bytes", &job_toml(pool_ops, aggregation, chunks, kv_heads));
    let out = dir.join("run.h5");
    let o = mpirun(BASE + POOL, &["run", job.to_str().unwrap(), "--backend", "cpu", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let run = read_run(&out).unwrap();
    let c = run.strategies[0].category("one").unwrap();
    let mut rows: Vec<_> = c.ranks.iter().collect();
    rows.sort_by_key(|r| r.world_rank);
    rows.iter().map(|r| (r.role.clone(), r.comm.iter().filter(|(_, s)| s.bytes > 0).map(|(k, s)| (k.name(), s.bytes)).collect())).collect()
}

fn check(pool_ops: &str, aggregation: &str, chunks: usize) {
    check_grouped(pool_ops, aggregation, chunks, ModelConfig::tiny().heads)
}

fn check_grouped(pool_ops: &str, aggregation: &str, chunks: usize, kv_heads: usize) {
    let cfg = ModelConfig { kv_heads, ..ModelConfig::tiny() };
    let layers = cfg.layers as u64;
    let got = measured(pool_ops, aggregation, chunks, kv_heads);
    assert_eq!(got.len(), BASE + POOL);
    let once = (cfg.d_model * ELEM) as u64;
    let mut last_row_owner = None;
    for (role, bytes) in &got {
        let (kind, index) = role.split_at(role.find(|c: char| c.is_ascii_digit()).unwrap());
        let index: usize = index.parse().unwrap();
        let mut want: Bytes = design_per_layer(&cfg, pool_ops, aggregation, kind, index).into_iter().map(|(k, v)| (k, v * layers)).collect();
        // The last prompt row goes from the base rank holding it to the base root.
        if kind == "base" {
            let extra = bytes.get("tp_allgather").copied().unwrap_or(0) - want["tp_allgather"];
            if index != 0 && extra != 0 {
                assert!(last_row_owner.replace(index).is_none(), "two base ranks sent the last row: {got:?}");
            }
            assert!(extra == 0 || extra == once, "{role}: {extra} bytes outside the layers");
            *want.get_mut("tp_allgather").unwrap() += extra;
        }
        assert_eq!(bytes, &want, "{role} ({pool_ops}, {aggregation}, chunks {chunks})");
    }
    // The base root received the row exactly when another rank sent it.
    let root_extra = got[0].1["tp_allgather"] - design_per_layer(&cfg, pool_ops, aggregation, "base", 0)["tp_allgather"] * layers;
    assert_eq!(root_extra, if last_row_owner.is_some() { once } else { 0 });
    if aggregation == "direct" {
        for role in ["base", "pool"] {
            let totals: Vec<u64> = got.iter().filter(|(r, _)| r.starts_with(role)).map(|(_, b)| b.values().sum()).collect();
            let mean = totals.iter().sum::<u64>() as f64 / totals.len() as f64;
            assert!(totals.iter().all(|&t| t as f64 <= 1.25 * mean), "{role}: {totals:?} against a mean of {mean}");
        }
    }
}

#[test]
fn pool_projecting_qkv_and_output_moves_the_designs_bytes() {
    check("qkv+attention+out", "direct", 1);
}

#[test]
fn pool_attending_only_receives_q_k_and_v_rows() {
    check("attention", "direct", 1);
}

#[test]
fn pool_projecting_qkv_returns_attention_rows() {
    check("qkv+attention", "direct", 2);
}

#[test]
fn chunks_move_the_same_bytes_in_more_messages() {
    check("qkv+attention+out", "direct", 4);
}

#[test]
fn the_tree_funnels_results_through_pool_rank_0() {
    check("qkv+attention+out", "tree", 1);
    check("attention", "tree", 2);
}

#[test]
fn grouped_kv_heads_divide_kv_replication_by_heads_over_kv_heads() {
    // 4 heads over 2 K/V heads: half the replication, and a hand-off of q plus the smaller k and v.
    check_grouped("attention", "direct", 2, 2);
    // One K/V head for all (MQA): a quarter.
    check_grouped("qkv+attention+out", "direct", 1, 1);
}
