//! Safetensors checkpoints in Hugging Face's Llama naming
//! (`model.layers.N.self_attn.q_proj.weight`, ...): which checkpoint tensors
//! make up each of fapool's tensors ([`parts`]), opening a checkpoint (one
//! file, or a folder with `model.safetensors` or a sharded
//! `model.safetensors.index.json`) and checking it against the model, and
//! reading a shard with dtype conversion to f32.
//!
//! Hugging Face stores a linear layer's weight as `[out, in]`; fapool
//! multiplies `x · w` with `w` as `[in, out]`, so those tensors are read
//! transposed (the embedding and the norms are not). Files are
//! memory-mapped: a rank touches only the pages of the rows its shard
//! needs. Every problem is a rule violation naming the file and tensor.
//! This module must not allocate device memory.

use super::{dims, ModelConfig, Tensor};
use crate::rules::{violation, Violation};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A checkpoint problem: the rule it breaks and what broke it.
pub type CheckpointError = Violation;

/// One checkpoint tensor of a fapool tensor: its name, whether it is stored
/// `[out, in]` (read transposed), and how many of the fapool tensor's
/// columns it covers (the parts follow each other along the columns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub transposed: bool,
    pub cols: usize,
}

impl Part {
    /// The shape the checkpoint stores it in, for a fapool tensor of `rows` rows.
    pub fn stored_shape(&self, rows: usize) -> Vec<usize> {
        match (self.transposed, rows) {
            (true, _) => vec![self.cols, rows],
            (false, 1) => vec![self.cols],
            (false, _) => vec![rows, self.cols],
        }
    }
}

/// The checkpoint tensors of fapool tensor `t`, in column order.
pub fn parts(cfg: &ModelConfig, t: Tensor) -> Vec<Part> {
    let layer = |l: usize, s: &str| format!("model.layers.{l}.{s}.weight");
    let part = |name: String, transposed: bool, cols: usize| Part { name, transposed, cols };
    let (d, a, kv, f) = (cfg.d_model, cfg.attn_width(), cfg.kv_width(), cfg.ffn);
    match t {
        Tensor::Embedding => vec![part("model.embed_tokens.weight".into(), false, d)],
        Tensor::AttnNorm(l) => vec![part(layer(l, "input_layernorm"), false, d)],
        Tensor::Qkv(l) => vec![part(layer(l, "self_attn.q_proj"), true, a), part(layer(l, "self_attn.k_proj"), true, kv), part(layer(l, "self_attn.v_proj"), true, kv)],
        Tensor::Out(l) => vec![part(layer(l, "self_attn.o_proj"), true, d)],
        Tensor::FfnNorm(l) => vec![part(layer(l, "post_attention_layernorm"), false, d)],
        Tensor::Up(l) => vec![part(layer(l, "mlp.up_proj"), true, f)],
        Tensor::Gate(l) => vec![part(layer(l, "mlp.gate_proj"), true, f)],
        Tensor::Down(l) => vec![part(layer(l, "mlp.down_proj"), true, d)],
        // Mixture-of-experts tensors in Mixtral's names (its experts' w1 is
        // fapool's up, w2 its down: the experts are two-matrix GELU FFNs).
        Tensor::Router(l) => vec![part(layer(l, "block_sparse_moe.gate"), true, cfg.experts.map_or(0, |e| e.count))],
        Tensor::ExpertUp(l, e) => vec![part(layer(l, &format!("block_sparse_moe.experts.{e}.w1")), true, f)],
        Tensor::ExpertDown(l, e) => vec![part(layer(l, &format!("block_sparse_moe.experts.{e}.w2")), true, d)],
        Tensor::FinalNorm => vec![part("model.norm.weight".into(), false, d)],
        // Tied: the embedding table [vocab, d] is the head's [d, vocab] transposed.
        Tensor::Head if cfg.tie_embeddings => vec![part("model.embed_tokens.weight".into(), true, cfg.vocab)],
        Tensor::Head => vec![part("lm_head.weight".into(), true, cfg.vocab)],
    }
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
struct File {
    path: PathBuf,
    map: Mmap,
    /// Bytes before the data: the 8-byte length and the header.
    data_start: usize,
    metadata: Metadata,
}

/// An open checkpoint, checked against a model.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<File>,
    /// Each tensor's file (an index into `files`).
    at: BTreeMap<String, usize>,
}

fn unreadable(path: &Path, why: impl std::fmt::Display) -> Violation {
    violation("checkpoint-readable", format!("{}: {why}", path.display()))
}

impl File {
    fn open(path: &Path) -> Result<Self, Violation> {
        let file = std::fs::File::open(path).map_err(|e| unreadable(path, e))?;
        // SAFETY: the map is read-only and lives as long as the checkpoint;
        // a file changed by another process while mapped is outside what
        // the suite can guard (as for any program reading it).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| unreadable(path, e))?;
        let (n, metadata) = SafeTensors::read_metadata(&map).map_err(|e| unreadable(path, format!("not a safetensors file ({e:?})")))?;
        Ok(Self { path: path.to_path_buf(), map, data_start: 8 + n, metadata })
    }

    fn info(&self, name: &str) -> &TensorInfo {
        self.metadata.info(name).expect("listed in the index built from this file")
    }

    fn bytes(&self, name: &str) -> &[u8] {
        let (a, b) = self.info(name).data_offsets;
        &self.map[self.data_start + a..self.data_start + b]
    }
}

/// The file of each tensor a sharded checkpoint's index names.
type Index = BTreeMap<String, PathBuf>;

/// The files of a checkpoint at `path` and, for a sharded one, its index.
fn locate(path: &Path) -> Result<(Vec<PathBuf>, Option<Index>), Violation> {
    let index = if path.is_dir() {
        let idx = path.join("model.safetensors.index.json");
        if idx.is_file() {
            idx
        } else if path.join("model.safetensors").is_file() {
            return Ok((vec![path.join("model.safetensors")], None));
        } else {
            return Err(unreadable(path, "a folder without model.safetensors or model.safetensors.index.json"));
        }
    } else if path.extension().is_some_and(|e| e == "json") {
        path.to_path_buf()
    } else {
        return Ok((vec![path.to_path_buf()], None));
    };
    let text = std::fs::read_to_string(&index).map_err(|e| unreadable(&index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| unreadable(&index, format!("not JSON: {e}")))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| unreadable(&index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    let mut of = BTreeMap::new();
    for (name, file) in map {
        let file = dir.join(file.as_str().ok_or_else(|| unreadable(&index, format!("the file of `{name}` is not a string")))?);
        if !files.contains(&file) {
            files.push(file.clone());
        }
        of.insert(name.clone(), file);
    }
    Ok((files, Some(of)))
}

/// Whether values of `dtype` convert to f32 here.
fn converts(dtype: StDtype) -> bool {
    matches!(dtype, StDtype::BF16 | StDtype::F16 | StDtype::F32 | StDtype::F64)
}

/// Appends the values of `bytes` (little-endian `dtype`) to `out` as f32.
fn convert(dtype: StDtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        StDtype::BF16 => out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        StDtype::F16 => out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
        StDtype::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        StDtype::F64 => out.extend(bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)),
        other => unreachable!("dtype {other:?} was refused when the checkpoint was opened"),
    }
}

impl Checkpoint {
    /// Opens the checkpoint at `path` and checks that it holds every tensor
    /// of `cfg`'s model in its shape and in a dtype that converts (bf16,
    /// fp16, fp32, fp64), and no bias (the model family has none).
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<Self, CheckpointError> {
        let (paths, index) = locate(path)?;
        let files = paths.iter().map(|p| File::open(p)).collect::<Result<Vec<_>, _>>()?;
        let mut at = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.metadata.tensors().keys() {
                at.entry(name.clone()).or_insert(i);
            }
        }
        if let Some(index) = &index {
            // The index is what says where a tensor is; a file it names must hold it.
            for (name, file) in index {
                let i = paths.iter().position(|p| p == file).expect("listed");
                if files[i].metadata.info(name).is_none() {
                    return Err(violation("checkpoint-has-tensor", format!("`{name}`: the index puts it in {}, which does not hold it", file.display())));
                }
                at.insert(name.clone(), i);
            }
        }
        if let Some(bias) = at.keys().find(|n| n.ends_with(".bias")) {
            return Err(violation("checkpoint-no-bias", format!("{}: tensor `{bias}` is a bias, which this model family does not have", path.display())));
        }
        let ckpt = Self { files, at };
        for t in Tensor::all(cfg) {
            let rows = dims(cfg, t).0;
            for p in parts(cfg, t) {
                let file = ckpt.at.get(&p.name).map(|&i| &ckpt.files[i]).ok_or_else(|| violation("checkpoint-has-tensor", format!("{}: no tensor `{}`", path.display(), p.name)))?;
                let info = file.info(&p.name);
                let want = p.stored_shape(rows);
                if info.shape != want {
                    return Err(violation("checkpoint-tensor-shape", format!("{}: tensor `{}` has shape {:?}, the model needs {want:?}", file.path.display(), p.name, info.shape)));
                }
                if !converts(info.dtype) {
                    return Err(violation("checkpoint-tensor-dtype", format!("{}: tensor `{}` is {:?}; expected BF16, F16, F32 or F64", file.path.display(), p.name, info.dtype)));
                }
            }
        }
        Ok(ckpt)
    }

    /// Rows `rows` and column runs `cols` of fapool tensor `t`, row-major,
    /// read from the parts that hold them (converted to f32).
    pub fn shard(&self, cfg: &ModelConfig, t: Tensor, rows: Range<usize>, cols: &[Range<usize>]) -> Vec<f32> {
        let width: usize = cols.iter().map(|c| c.len()).sum();
        let mut out = vec![0.0f32; rows.len() * width];
        let full_rows = dims(cfg, t).0;
        let mut j0 = 0; // first output column of the current run
        let mut buf = Vec::new();
        for run in cols {
            let mut off = 0; // first fapool column of the current part
            for p in parts(cfg, t) {
                let (lo, hi) = (run.start.max(off), run.end.min(off + p.cols));
                if lo < hi {
                    let f = &self.files[self.at[&p.name]];
                    let dtype = f.info(&p.name).dtype;
                    let (bytes, es) = (f.bytes(&p.name), dtype.bitsize() / 8);
                    let at = j0 + lo - run.start;
                    if p.transposed {
                        // Stored [cols, full_rows]: column c is a stored row, its elements `rows` contiguous.
                        for c in lo..hi {
                            let base = ((c - off) * full_rows + rows.start) * es;
                            buf.clear();
                            convert(dtype, &bytes[base..base + rows.len() * es], &mut buf);
                            for (r, &x) in buf.iter().enumerate() {
                                out[r * width + at + c - lo] = x;
                            }
                        }
                    } else {
                        // Stored [full_rows, cols]: a fapool row is a stored row.
                        for (r, row) in rows.clone().enumerate() {
                            let base = (row * p.cols + lo - off) * es;
                            buf.clear();
                            convert(dtype, &bytes[base..base + (hi - lo) * es], &mut buf);
                            out[r * width + at..r * width + at + hi - lo].copy_from_slice(&buf);
                        }
                    }
                }
                off += p.cols;
            }
            j0 += run.len();
        }
        out
    }

    /// The checkpoint's files, in index order.
    pub fn file_paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }
}

/// Checks the checkpoint of `cfg` (if it has one) without keeping it open.
pub fn check(cfg: &ModelConfig) -> Result<(), CheckpointError> {
    match &cfg.weights {
        Some(path) => Checkpoint::open(path, cfg).map(|_| ()),
        None => Ok(()),
    }
}
