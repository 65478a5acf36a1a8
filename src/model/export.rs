//! Writes a model's weights as a Hugging Face-style checkpoint: one
//! `model.safetensors` in Llama naming (linear weights `[out, in]`, see
//! [`super::checkpoint`]) and a `config.json` ([`super::hf_config`]), which
//! `[model] config` and `weights` read back and other frameworks load.
//! This module must not allocate device memory.

use super::checkpoint::parts;
use super::weights::Weights;
use super::{hf_config, ModelConfig, Tensor};
use crate::backend::Dtype;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::Path;

/// Errors while writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("cannot write {path}: {why}")]
    Safetensors { path: String, why: String },
}

/// The checkpoint tensors of `w`'s model by name, each `(shape, values)`.
pub fn tensors(w: &Weights) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let cfg = w.cfg;
    let mut out = BTreeMap::new();
    for t in Tensor::all(cfg) {
        if t == Tensor::Head && cfg.tie_embeddings {
            continue; // the embedding table is the head
        }
        let (rows, cols) = w.dims(t);
        let full = w.full(t);
        let mut off = 0;
        for p in parts(cfg, t) {
            let values: Vec<f32> = if p.transposed {
                (0..p.cols).flat_map(|c| (0..rows).map(move |r| (r, c))).map(|(r, c)| full[r * cols + off + c]).collect()
            } else {
                (0..rows).flat_map(|r| full[r * cols + off..r * cols + off + p.cols].iter().copied()).collect()
            };
            out.insert(p.name.clone(), (p.stored_shape(rows), values));
            off += p.cols;
        }
    }
    out
}

fn bytes_of(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::Fp32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::Bf16 => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        Dtype::Fp16 => values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
    }
}

/// Writes `w`'s model into folder `dir` (created if missing) as
/// `model.safetensors` in `dtype` and `config.json`.
pub fn write(w: &Weights, dir: &Path, dtype: Dtype) -> Result<(), ExportError> {
    let io = |path: &Path, source| ExportError::Io { path: path.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let st_dtype = match dtype {
        Dtype::Fp32 => safetensors::Dtype::F32,
        Dtype::Bf16 => safetensors::Dtype::BF16,
        Dtype::Fp16 => safetensors::Dtype::F16,
    };
    let file = dir.join("model.safetensors");
    let fail = |why: String| ExportError::Safetensors { path: file.display().to_string(), why };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors(w).into_iter().map(|(name, (shape, values))| (name, shape, bytes_of(&values, dtype))).collect();
    let views =
        data.iter().map(|(name, shape, bytes)| TensorView::new(st_dtype, shape.clone(), bytes).map(|v| (name.clone(), v))).collect::<Result<Vec<_>, _>>().map_err(|e| fail(format!("{e:?}")))?;
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    safetensors::serialize_to_file(views, Some(meta), &file).map_err(|e| fail(format!("{e:?}")))?;
    let config = dir.join("config.json");
    let torch_dtype = match dtype {
        Dtype::Fp32 => "float32",
        Dtype::Bf16 => "bfloat16",
        Dtype::Fp16 => "float16",
    };
    let text = serde_json::to_string_pretty(&hf_config::to_json(w.cfg, torch_dtype)).expect("a JSON value");
    std::fs::write(&config, text + "\n").map_err(|e| io(&config, e))
}

/// Writes the seeded weights of `cfg` (see [`write`]).
pub fn export_seeded(cfg: &ModelConfig, dir: &Path, dtype: Dtype) -> Result<(), ExportError> {
    write(&Weights::seeded(cfg), dir, dtype)
}

#[cfg(test)]
mod tests {
    use super::super::checkpoint::Checkpoint;
    use super::super::{FfnKind, PositionKind};
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fapool-export-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn llama_tiny() -> ModelConfig {
        ModelConfig { kv_heads: 2, ffn_kind: FfnKind::Swiglu, positions: PositionKind::Rope, ..ModelConfig::tiny() }
    }

    fn rule_of(r: Result<Checkpoint, crate::rules::Violation>) -> &'static str {
        r.map(|_| ()).expect_err("the checkpoint should be refused").rule
    }

    #[test]
    fn an_exported_checkpoint_reads_back_every_tensor_and_shard() {
        for (m, dtype) in [(llama_tiny(), Dtype::Fp32), (ModelConfig { tie_embeddings: true, ..ModelConfig::tiny() }, Dtype::Fp32), (llama_tiny(), Dtype::Bf16)] {
            let dir = scratch(&format!("roundtrip-{}-{}", m.tie_embeddings, dtype));
            export_seeded(&m, &dir, dtype).unwrap();
            let read = hf_config::read(&dir.join("config.json")).unwrap();
            assert_eq!(read, m);
            let with = ModelConfig { weights: Some(dir.clone()), ..m.clone() };
            let (seeded, loaded) = (Weights::seeded(&m), Weights::open(&with).unwrap());
            let round = |x: f32| if dtype == Dtype::Bf16 { half::bf16::from_f32(x).to_f32() } else { x };
            for t in Tensor::all(&m) {
                assert_eq!(loaded.full(t), seeded.full(t).into_iter().map(round).collect::<Vec<_>>(), "{t:?}");
            }
            // A TP shard: rows 3..9 of K/V head 1's columns, and of the first head's q.
            let cols = seeded.qkv_columns(2..4);
            assert_eq!(loaded.shard(Tensor::Qkv(1), 3..9, &cols), seeded.shard(Tensor::Qkv(1), 3..9, &cols).into_iter().map(round).collect::<Vec<_>>());
            assert_eq!(loaded.shard(Tensor::Out(0), 16..32, &[0..64]), seeded.shard(Tensor::Out(0), 16..32, &[0..64]).into_iter().map(round).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let m = llama_tiny();
        let dir = scratch("missing");
        let mut ts = tensors(&Weights::seeded(&m));
        ts.remove("model.layers.1.mlp.gate_proj.weight");
        write_raw(&dir, &ts, safetensors::Dtype::F32);
        let err = Checkpoint::open(&dir, &m).unwrap_err();
        assert_eq!(err.rule, "checkpoint-has-tensor");
        assert!(err.detail.contains("model.layers.1.mlp.gate_proj.weight"), "{err}");
    }

    #[test]
    fn a_shape_mismatch_names_the_tensor_and_both_shapes() {
        let m = llama_tiny();
        let dir = scratch("shape");
        export_seeded(&ModelConfig { ffn: 128, ..m.clone() }, &dir, Dtype::Fp32).unwrap();
        let err = Checkpoint::open(&dir, &m).unwrap_err();
        assert_eq!(err.rule, "checkpoint-tensor-shape");
        assert!(err.detail.contains("model.layers.0.mlp.up_proj.weight") && err.detail.contains("[128, 64]") && err.detail.contains("[256, 64]"), "{err}");
    }

    #[test]
    fn a_tensor_of_an_integer_dtype_is_refused() {
        let m = llama_tiny();
        let dir = scratch("dtype");
        write_raw(&dir, &tensors(&Weights::seeded(&m)), safetensors::Dtype::I32);
        assert_eq!(rule_of(Checkpoint::open(&dir, &m)), "checkpoint-tensor-dtype");
    }

    #[test]
    fn an_unreadable_or_truncated_file_is_refused_with_its_path() {
        let m = llama_tiny();
        let dir = scratch("unreadable");
        assert_eq!(rule_of(Checkpoint::open(&dir.join("nothing.safetensors"), &m)), "checkpoint-readable");
        export_seeded(&m, &dir, Dtype::Fp32).unwrap();
        let file = dir.join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
        let err = Checkpoint::open(&dir, &m).unwrap_err();
        assert_eq!(err.rule, "checkpoint-readable");
        assert!(err.detail.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn a_sharded_checkpoint_is_read_through_its_index() {
        let m = llama_tiny();
        let dir = scratch("sharded");
        std::fs::create_dir_all(&dir).unwrap();
        let ts = tensors(&Weights::seeded(&m));
        let (first, second): (BTreeMap<_, _>, BTreeMap<_, _>) = ts.into_iter().partition(|(n, _)| n.contains("layers.0.") || n.contains("embed"));
        let mut map = serde_json::Map::new();
        for (file, part) in [("model-00001-of-00002.safetensors", &first), ("model-00002-of-00002.safetensors", &second)] {
            write_raw_file(&dir.join(file), part, safetensors::Dtype::F32);
            for name in part.keys() {
                map.insert(name.clone(), serde_json::json!(file));
            }
        }
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
        let with = ModelConfig { weights: Some(dir.clone()), ..m.clone() };
        let loaded = Weights::open(&with).unwrap();
        assert_eq!(loaded.full(Tensor::Down(1)), Weights::seeded(&m).full(Tensor::Down(1)));
        // A file the index names but that is gone.
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        assert_eq!(rule_of(Checkpoint::open(&dir, &m)), "checkpoint-readable");
    }

    fn write_raw(dir: &Path, ts: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, dtype: safetensors::Dtype) {
        std::fs::create_dir_all(dir).unwrap();
        write_raw_file(&dir.join("model.safetensors"), ts, dtype);
    }

    /// Writes `ts` with every value stored as `dtype` (4-byte types: the f32 bits).
    fn write_raw_file(file: &Path, ts: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, dtype: safetensors::Dtype) {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = ts.iter().map(|(n, (s, v))| (n.clone(), s.clone(), bytes_of(v, Dtype::Fp32))).collect();
        let views: Vec<(String, TensorView)> = data.iter().map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, file).unwrap();
    }
}
