//! The suite against implementations no one here wrote: Hugging Face
//! transformers' Llama (a committed fixture: a tiny random Llama with
//! grouped K/V heads, RoPE and SwiGLU saved by `save_pretrained`, and
//! transformers' float64 logits and greedy tokens for four prompts, made by
//! `scripts/hf_fixture.py`), and a NumPy model (`scripts/numpy_reference.py`)
//! reading the checkpoint `fapool export-weights` writes of the dense-4l
//! architecture. The single-rank model and every strategy (baseline TP and
//! PP, K/V heads split and replicated; FA Pool with the pool active, each
//! partition, `pool_ops` and aggregation) must give logits within 1e-4
//! relative and the same greedy tokens, on the CPU backend under mpirun.
//! Bad checkpoints are refused by name before any work (exit 2).

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    repo_root().join("tests/fixtures/hf-llama-tiny")
}

/// A job over a model read from `config` and `weights`, with `strategies`.
fn checkpoint_job(dir: &Path, config: &Path, weights: &Path, strategies: &str) -> PathBuf {
    let toml = format!(
        "[run]\nbackend = \"cpu\"\n[model]\nconfig = \"{}\"\nweights = \"{}\"\n[workload]\nsequences_per_category = 2\noutput_tokens = 4\n[[workload.category]]\nname = \"unused\"\nlengths = [9]\n{strategies}",
        config.display(),
        weights.display()
    );
    job(dir, "crosscheck", &toml)
}

/// Every layout of 4 ranks for a model of 4 heads: TP 2 (K/V heads split)
/// and 4 (replicated), TP × PP and PP alone, FA Pool base 2 + pool 2 and
/// base 1 + pool 3 with the pool active for the 20-token prompts.
const FOUR_RANK_STRATEGIES: &str = r#"
[[strategy]]
kind = "baseline"
tp = 2
pp = 1
[[strategy]]
kind = "baseline"
tp = 4
pp = 1
[[strategy]]
kind = "baseline"
tp = 2
pp = 2
[[strategy]]
kind = "baseline"
tp = 1
pp = 2
micro_batches = 2
[[strategy]]
kind = "fapool"
name = "b2p2-zigzag-chunks2"
base = 2
pool_max = 2
threshold = 16
tokens_per_pool_gpu = 8
partition = "zigzag"
chunks = 2
[[strategy]]
kind = "fapool"
name = "b2p2-contiguous-attention-tree"
base = 2
pool_max = 2
threshold = 16
tokens_per_pool_gpu = 8
pool_ops = "attention"
aggregation = "tree"
micro_batches = 2
[[strategy]]
kind = "fapool"
name = "b1p3-zigzag-qkv-attention"
base = 1
pool_max = 3
threshold = 16
tokens_per_pool_gpu = 8
partition = "zigzag"
pool_ops = "qkv+attention"
"#;

/// `fapool verify --reference` on 4 ranks; returns the table.
fn verify_against(job: &Path, reference: &Path) -> String {
    let out = mpirun(4, &["verify", job.to_str().unwrap(), "--backend", "cpu", "--tolerance", "1e-4", "--reference", reference.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("the single-rank model and all strategies reproduce the reference") && !t.contains("FAIL"), "{t}");
    t
}

/// Rows of the table whose strategy is `name` and whose pool size is `pool`.
fn rows_with_pool(table: &str, name: &str, pool: &str) -> usize {
    table.lines().filter(|l| l.split_whitespace().next() == Some(name) && l.split_whitespace().nth(5) == Some(pool)).count()
}

#[test]
fn every_strategy_reproduces_hugging_face_transformers_llama() {
    let dir = scratch("hf-llama");
    let f = fixture();
    let job = checkpoint_job(&dir, &f.join("config.json"), &f, FOUR_RANK_STRATEGIES);
    let t = verify_against(&job, &f.join("reference.json"));
    assert!(t.contains("transformers"), "{t}");
    // Both batches (9 and 20 tokens) for the single-rank model and the seven strategies.
    assert_eq!(t.lines().filter(|l| l.contains(" reference ")).count(), 2 * 8, "{t}");
    // The 20-token batch ran with the pool: 2 of 2 ranks, 3 of 3.
    assert_eq!(rows_with_pool(&t, "b2p2-zigzag-chunks2", "2"), 1, "{t}");
    assert_eq!(rows_with_pool(&t, "b1p3-zigzag-qkv-attention", "3"), 1, "{t}");
}

/// `scripts/numpy_reference.py DIR --out FILE` with the system's Python and NumPy.
fn numpy_reference(folder: &Path, out: &Path) {
    let o = command("/usr/bin/python3").arg(repo_root().join("scripts/numpy_reference.py")).arg(folder).arg("--out").arg(out).output().expect("python3 runs");
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[test]
fn every_strategy_reproduces_a_numpy_model_of_an_exported_dense_4l_architecture() {
    // dense-4l's architecture (sinusoidal positions, GELU FFN, untied) at tiny dimensions.
    let dir = scratch("numpy-dense");
    let spec = job(&dir, "tiny", "[model]\npreset = \"tiny\"\n[workload]\n[[workload.category]]\nname = \"x\"\nlengths = [9]\n[[strategy]]\nkind = \"baseline\"\ntp = 1\npp = 1\n");
    let ckpt = dir.join("checkpoint");
    let o = fapool(&["export-weights", spec.to_str().unwrap(), "--out", ckpt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let reference = dir.join("numpy.json");
    numpy_reference(&ckpt, &reference);
    let job = checkpoint_job(&dir, &ckpt.join("config.json"), &ckpt, FOUR_RANK_STRATEGIES);
    let t = verify_against(&job, &reference);
    assert!(t.contains("NumPy"), "{t}");
}

#[test]
fn the_numpy_model_agrees_with_the_suite_on_the_hugging_face_llama_too() {
    // The NumPy model's RoPE, grouped heads and SwiGLU, against fapool on transformers' checkpoint.
    let dir = scratch("numpy-llama");
    let f = fixture();
    let reference = dir.join("numpy.json");
    numpy_reference(&f, &reference);
    let job = checkpoint_job(&dir, &f.join("config.json"), &f, "[[strategy]]\nkind = \"baseline\"\ntp = 1\npp = 1\n");
    let o = fapool(&["verify", job.to_str().unwrap(), "--backend", "cpu", "--reference", reference.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("reproduce the reference"), "{}", text(&o));
}

#[test]
fn a_checkpoint_of_another_shape_is_refused_naming_the_tensor_before_any_work() {
    let dir = scratch("bad-shape");
    let f = fixture();
    // The fixture's config with a wider FFN than its weights have.
    let config = std::fs::read_to_string(f.join("config.json")).unwrap().replace("\"intermediate_size\": 256", "\"intermediate_size\": 512");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let job = checkpoint_job(&dir, &dir.join("config.json"), &f, "[[strategy]]\nkind = \"baseline\"\ntp = 1\npp = 1\n");
    let o = fapool(&["validate", job.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("checkpoint-tensor-shape") && t.contains("model.layers.0.mlp.up_proj.weight") && t.contains("[256, 64]"), "{t}");
}

#[test]
fn an_unreadable_checkpoint_is_refused_naming_the_file_before_any_work() {
    let dir = scratch("bad-file");
    let f = fixture();
    std::fs::write(dir.join("model.safetensors"), b"not a checkpoint").unwrap();
    let job = checkpoint_job(&dir, &f.join("config.json"), &dir.join("model.safetensors"), "[[strategy]]\nkind = \"baseline\"\ntp = 1\npp = 1\n");
    let o = mpirun(1, &["run", job.to_str().unwrap(), "--backend", "cpu", "--out", dir.join("r.h5").to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("checkpoint-readable") && t.contains("model.safetensors"), "{t}");
    assert!(!dir.join("r.h5").exists(), "no results file for a job refused before any work");
}
