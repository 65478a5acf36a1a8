//! Job specs: the TOML a user writes (`[run]`, `[model]`, `[workload]` and
//! one `[[strategy]]` table per strategy), its `--set` overrides
//! ([`overrides`]), and the rules a job must satisfy before any work starts
//! ([`rules`]).
//!
//! Everything here is pure: no MPI, no devices. Each broken rule is a
//! [`SpecError`] that names the rule, so a user can find it in the README.

pub mod overrides;
pub mod rules;

pub use crate::strategy::registry::StrategySpec;
pub use rules::{validate, LaunchFacts};

use crate::backend::BackendKind;
use crate::model::{FfnKind, ModelConfig, PositionKind};
use crate::rules::{violation, Violation};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A job spec rule violation (or an unreadable spec).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read job spec {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("job spec is not valid TOML or has a wrong/unknown key: {0}")]
    Parse(String),
    #[error("--set {0}: expected key=value with a dotted key")]
    BadOverride(String),
    #[error(transparent)]
    Rule(#[from] Violation),
}

fn rule(rule: &'static str, detail: impl Into<String>) -> SpecError {
    SpecError::Rule(violation(rule, detail))
}

pub use crate::backend::Dtype;

/// `[run]`: how the job runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    pub name: String,
    pub backend: BackendKind,
    /// Element type on the GPU; default: the model preset's
    /// ([`ModelSpec::default_dtype`]).
    pub dtype: Option<Dtype>,
    /// Per-rank device memory budget (GiB); default: the device's memory.
    pub memory_budget_gib: Option<f64>,
    /// Run each category's first and last batches once, unrecorded and with
    /// two output tokens, before measuring it (kernel selection, allocations,
    /// NCCL connections, the pool's first activation), so set-up costs do not
    /// enter the figures.
    pub warmup: bool,
    /// Record each batch's first decode step as a CUDA graph and replay it
    /// for the other steps (CUDA backend; the CPU backend always runs steps
    /// one operation at a time).
    pub cuda_graphs: bool,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self { name: "job".into(), backend: BackendKind::Auto, dtype: None, memory_budget_gib: None, warmup: true, cuda_graphs: true }
    }
}

/// `[model]`: a preset or a Hugging Face `config.json`, optional
/// overrides of its family and dimensions, and optionally the safetensors
/// checkpoint its weights are read from (else they are seeded). Relative
/// paths are relative to the job spec's folder.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `dense-4l`, `tiny`, `llama-3-8b`, `llama-3-70b`, `moe-16l` or `tiny-moe` (empty with `config`).
    #[serde(default)]
    pub preset: String,
    /// A Hugging Face Llama-style `config.json` instead of a preset.
    pub config: Option<PathBuf>,
    /// A safetensors checkpoint: a `.safetensors` file, or a folder with
    /// `model.safetensors` or `model.safetensors.index.json`.
    pub weights: Option<PathBuf>,
    pub layers: Option<usize>,
    pub d_model: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub ffn: Option<usize>,
    pub ffn_kind: Option<FfnKind>,
    /// Experts per layer (a mixture-of-experts FFN; a dense preset given
    /// experts becomes one, with top 2 unless `top_k` says otherwise).
    pub experts: Option<usize>,
    /// Experts each token is routed to.
    pub top_k: Option<usize>,
    pub vocab: Option<usize>,
    pub norm_eps: Option<f32>,
    pub positions: Option<PositionKind>,
    pub rope_theta: Option<f64>,
    pub tie_embeddings: Option<bool>,
    pub max_seq_len: Option<usize>,
    pub weights_seed: Option<u64>,
}

impl ModelSpec {
    /// The model: the preset's or config's, with the overrides applied,
    /// checked against the family's rules (the checkpoint, if any, is
    /// checked by [`rules::validate`]).
    pub fn resolve(&self) -> Result<ModelConfig, SpecError> {
        let mut m = match (self.preset.as_str(), &self.config) {
            ("", Some(path)) => crate::model::hf_config::read(path)?,
            ("", None) => return Err(rule("model-preset-or-config", format!("[model] needs a preset (known: {}) or a config", ModelConfig::PRESETS.join(", ")))),
            (p, None) => ModelConfig::preset(p).ok_or_else(|| rule("model-preset-known", format!("unknown model preset `{p}` (known: {})", ModelConfig::PRESETS.join(", "))))?,
            (p, Some(c)) => return Err(rule("model-preset-or-config", format!("[model] gives both preset `{p}` and config {}: choose one", c.display()))),
        };
        // A multi-head model given other heads but no K/V heads stays multi-head.
        let multi_head = m.kv_heads == m.heads && self.kv_heads.is_none();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { m.$f = v; } )* };
        }
        set!(layers, d_model, heads, kv_heads, head_dim, ffn, ffn_kind, vocab, norm_eps, positions, rope_theta, tie_embeddings, max_seq_len, weights_seed);
        if multi_head {
            m.kv_heads = m.heads;
        }
        if self.experts.is_some() || self.top_k.is_some() {
            let was = m.experts.unwrap_or(crate::model::Experts { count: 0, top_k: 2 });
            m.experts = Some(crate::model::Experts { count: self.experts.unwrap_or(was.count), top_k: self.top_k.unwrap_or(was.top_k) });
        }
        if self.weights.is_some() {
            m.weights.clone_from(&self.weights);
        }
        check_model(&m)?;
        Ok(m)
    }

    /// The element type a GPU run uses when `[run] dtype` is not given:
    /// fp16 for the MoE presets (the MoE plan's), bf16 for the others.
    pub fn default_dtype(&self) -> Dtype {
        match self.preset.as_str() {
            "moe-16l" | "tiny-moe" => Dtype::Fp16,
            _ => Dtype::Bf16,
        }
    }
}

/// The family's rules for a model's own settings.
fn check_model(m: &ModelConfig) -> Result<(), SpecError> {
    if m.layers == 0 || m.d_model == 0 || m.heads == 0 || m.kv_heads == 0 || m.head_dim == 0 || m.ffn == 0 || m.vocab == 0 {
        return Err(rule("model-dims-positive", "layers, d_model, heads, kv_heads, head_dim, ffn and vocab must all be > 0"));
    }
    if m.heads % m.kv_heads != 0 {
        return Err(rule("kv-heads-divide-heads", format!("{} K/V heads do not divide {} query heads", m.kv_heads, m.heads)));
    }
    match m.positions {
        PositionKind::Sinusoidal if m.d_model % 2 != 0 => Err(rule("d-model-even", format!("d_model {} must be even (sin/cos position pairs)", m.d_model))),
        PositionKind::Rope if m.head_dim % 2 != 0 => Err(rule("rope-head-dim-even", format!("head_dim {} must be even (rotated pairs)", m.head_dim))),
        PositionKind::Rope if !(m.rope_theta > 1.0 && m.rope_theta.is_finite()) => Err(rule("rope-theta-above-one", format!("rope_theta {} must be a finite number above 1", m.rope_theta))),
        _ => Ok(()),
    }?;
    if let Some(e) = m.experts {
        if e.count == 0 || e.top_k == 0 {
            return Err(rule("experts-positive", format!("experts {} and top_k {} must both be > 0", e.count, e.top_k)));
        }
        if e.top_k > e.count {
            return Err(rule("top-k-within-experts", format!("top_k {} exceeds the {} experts per layer", e.top_k, e.count)));
        }
        if m.ffn_kind != FfnKind::Gelu {
            return Err(rule("experts-are-gelu", "experts are GELU FFNs (up, down): ffn_kind must be `gelu`"));
        }
    }
    Ok(())
}

/// A sequence-length category: a name and the lengths it draws from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategorySpec {
    pub name: String,
    /// Explicit lengths, or
    #[serde(default)]
    pub lengths: Vec<usize>,
    /// `[from, to, step]`: every multiple of `step` in `[from, to]`.
    pub range: Option<[usize; 3]>,
}

impl CategorySpec {
    pub fn resolved_lengths(&self) -> Vec<usize> {
        let mut v = self.lengths.clone();
        if let Some([from, to, step]) = self.range {
            let step = step.max(1);
            let mut x = from.div_ceil(step) * step;
            while x <= to {
                v.push(x);
                x += step;
            }
        }
        v
    }
}

/// `[workload]`: what is served.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSpec {
    #[serde(rename = "category")]
    pub categories: Vec<CategorySpec>,
    pub sequences_per_category: usize,
    pub output_tokens: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Exponent of the Zipf-like prompt-token distribution.
    pub zipf_exponent: f64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        let cat = |name: &str, lengths: Vec<usize>, range| CategorySpec { name: name.into(), lengths, range };
        Self {
            categories: vec![
                cat("short", vec![512, 1024, 2048], None),
                cat("medium", vec![4096, 6144, 8192], None),
                cat("long", vec![16384, 24576, 32768], None),
                cat("very_long", vec![], Some([32768, 65536, 1024])),
            ],
            sequences_per_category: 1000,
            output_tokens: 128,
            batch_size: 1024,
            seed: 0,
            zipf_exponent: 1.1,
        }
    }
}

/// A whole job.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default)]
    pub run: RunSpec,
    pub model: ModelSpec,
    #[serde(default)]
    pub workload: WorkloadSpec,
    #[serde(rename = "strategy")]
    pub strategies: Vec<StrategySpec>,
}

impl JobSpec {
    /// The element type on the GPU: `[run] dtype`, else the model preset's.
    pub fn dtype(&self) -> Dtype {
        self.run.dtype.unwrap_or_else(|| self.model.default_dtype())
    }
}

/// Parses a TOML job after applying `key=value` overrides (dotted keys;
/// numeric segments index arrays, e.g. `strategy.0.tp=4`).
pub fn parse_job(text: &str, overrides: &[String]) -> Result<JobSpec, SpecError> {
    let mut root: toml::Value = toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
    for o in overrides {
        overrides::apply(&mut root, o)?;
    }
    root.try_into().map_err(|e: toml::de::Error| SpecError::Parse(e.to_string()))
}

/// Reads a job spec, applies the overrides, and makes the model's relative
/// paths (`config`, `weights`) relative to the spec's folder.
pub fn load_job(path: &Path, overrides: &[String]) -> Result<(JobSpec, String), SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.display().to_string(), source })?;
    let mut job = parse_job(&text, overrides)?;
    let dir = path.parent().unwrap_or(Path::new(""));
    for p in [&mut job.model.config, &mut job.model.weights].into_iter().flatten() {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    }
    Ok((job, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_workload_is_the_specs() {
        let w = WorkloadSpec::default();
        assert_eq!(w.categories[0].resolved_lengths(), vec![512, 1024, 2048]);
        let vl = w.categories[3].resolved_lengths();
        assert_eq!((vl.len(), vl[0], *vl.last().unwrap()), (33, 32768, 65536));
        assert_eq!((w.sequences_per_category, w.output_tokens, w.batch_size), (1000, 128, 1024));
    }

    fn job_with(model: &str, run: &str) -> JobSpec {
        parse_job(&format!("[run]\n{run}\n[model]\n{model}\n[[strategy]]\nkind = \"baseline\"\ntp = 1\npp = 1\n"), &[]).unwrap()
    }

    #[test]
    fn the_moe_presets_run_in_fp16_unless_the_job_says_otherwise() {
        assert_eq!(job_with("preset = \"moe-16l\"", "").dtype(), Dtype::Fp16);
        assert_eq!(job_with("preset = \"dense-4l\"", "").dtype(), Dtype::Bf16);
        assert_eq!(job_with("preset = \"moe-16l\"", "dtype = \"bf16\"").dtype(), Dtype::Bf16);
    }

    #[test]
    fn top_k_larger_than_the_experts_is_refused() {
        let err = job_with("preset = \"tiny-moe\"\ntop_k = 9", "").model.resolve().unwrap_err();
        assert!(matches!(err, SpecError::Rule(ref v) if v.rule == "top-k-within-experts"), "{err}");
    }

    #[test]
    fn a_dense_preset_given_experts_routes_to_two_of_them() {
        let m = job_with("preset = \"tiny\"\nexperts = 4", "").model.resolve().unwrap();
        assert_eq!(m.experts, Some(crate::model::Experts { count: 4, top_k: 2 }));
    }
}
