//! Job specs: the TOML a user writes, its `--set` overrides, and the rules a
//! job must satisfy before any work starts (SPEC section 3).
//!
//! Everything here is pure: no MPI, no devices. Each broken rule is a
//! [`SpecError`] that names the rule, so a user can find it in the docs.

use crate::backend::BackendKind;
use crate::model::{FfnKind, ModelConfig};
use serde::{Deserialize, Serialize};

/// A job spec rule violation (or an unreadable spec).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read job spec {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("job spec is not valid TOML or has a wrong/unknown key: {0}")]
    Parse(String),
    #[error("--set {0}: expected key=value with a dotted key")]
    BadOverride(String),
    #[error("rule `{rule}` broken: {detail}")]
    Rule { rule: &'static str, detail: String },
}

fn rule(rule: &'static str, detail: impl Into<String>) -> SpecError {
    SpecError::Rule { rule, detail: detail.into() }
}

pub use crate::backend::Dtype;

/// `[run]`: how the job runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    pub name: String,
    pub backend: BackendKind,
    pub dtype: Dtype,
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
        Self { name: "job".into(), backend: BackendKind::Auto, dtype: Dtype::Bf16, memory_budget_gib: None, warmup: true, cuda_graphs: true }
    }
}

/// `[model]`: a preset and optional overrides of its dimensions.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub preset: String,
    pub layers: Option<usize>,
    pub d_model: Option<usize>,
    pub heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub ffn: Option<usize>,
    pub ffn_kind: Option<FfnKind>,
    pub vocab: Option<usize>,
    pub norm_eps: Option<f32>,
    pub max_seq_len: Option<usize>,
    pub weights_seed: Option<u64>,
}

impl ModelSpec {
    pub fn resolve(&self) -> Result<ModelConfig, SpecError> {
        let mut m = match self.preset.as_str() {
            "dense-4l" => ModelConfig::dense_4l(),
            "tiny" => ModelConfig::tiny(),
            other => return Err(rule("model-preset-known", format!("unknown model preset `{other}` (known: dense-4l, tiny)"))),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { m.$f = v; } )* };
        }
        set!(layers, d_model, heads, head_dim, ffn, ffn_kind, vocab, norm_eps, max_seq_len, weights_seed);
        if m.layers == 0 || m.d_model == 0 || m.heads == 0 || m.head_dim == 0 || m.ffn == 0 || m.vocab == 0 {
            return Err(rule("model-dims-positive", "layers, d_model, heads, head_dim, ffn and vocab must all be > 0"));
        }
        if m.d_model % 2 != 0 {
            return Err(rule("d-model-even", format!("d_model {} must be even (sin/cos position pairs)", m.d_model)));
        }
        Ok(m)
    }
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

/// `[workload]`: what is served (SPEC section 3).
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

/// How a pool block partitions the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// Pool rank i gets the i-th contiguous block (as in the paper).
    #[default]
    Contiguous,
    /// Pool rank i gets chunks i and 2P-1-i of 2P chunks, balancing causal work.
    Zigzag,
}

/// Static Megatron-style TP × PP.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    pub name: Option<String>,
    pub tp: usize,
    pub pp: usize,
    /// Prefill micro-batches (fill/drain schedule); 0 = one per stage.
    #[serde(default)]
    pub micro_batches: usize,
}

/// Base group + elastic attention pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FapoolSpec {
    pub name: Option<String>,
    /// Base group size (TP degree of the base).
    pub base: usize,
    /// Largest pool the job may activate (more than launched is capped).
    pub pool_max: usize,
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    #[serde(default = "default_tokens_per_pool_gpu")]
    pub tokens_per_pool_gpu: usize,
    #[serde(default)]
    pub partition: Partition,
    /// Micro-batches per batch (sequences split M ways).
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// Overlap base FFN of micro-batch j with pool attention of j+1.
    #[serde(default = "yes")]
    pub overlap: bool,
}

fn default_threshold() -> usize {
    4096
}
fn default_tokens_per_pool_gpu() -> usize {
    1024
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// One strategy to run on the job's workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StrategySpec {
    Baseline(BaselineSpec),
    Fapool(FapoolSpec),
}

impl StrategySpec {
    pub fn kind(&self) -> &'static str {
        match self {
            StrategySpec::Baseline(_) => "baseline",
            StrategySpec::Fapool(_) => "fapool",
        }
    }

    /// The strategy's name: given, or derived from its layout.
    pub fn name(&self) -> String {
        match self {
            StrategySpec::Baseline(b) => b.name.clone().unwrap_or_else(|| format!("baseline-tp{}-pp{}", b.tp, b.pp)),
            StrategySpec::Fapool(f) => f.name.clone().unwrap_or_else(|| {
                format!(
                    "fapool-b{}-p{}-{}",
                    f.base,
                    f.pool_max,
                    match f.partition {
                        Partition::Contiguous => "contiguous",
                        Partition::Zigzag => "zigzag",
                    }
                )
            }),
        }
    }

    /// Fewest and most world ranks the strategy can use.
    pub fn rank_range(&self) -> (usize, usize) {
        match self {
            StrategySpec::Baseline(b) => (b.tp * b.pp, b.tp * b.pp),
            StrategySpec::Fapool(f) => (f.base + 1, f.base + f.pool_max),
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

/// Parses a TOML job after applying `key=value` overrides (dotted keys;
/// numeric segments index arrays, e.g. `strategy.0.tp=4`).
pub fn parse_job(text: &str, overrides: &[String]) -> Result<JobSpec, SpecError> {
    let mut root: toml::Value = toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
    for o in overrides {
        apply_override(&mut root, o)?;
    }
    root.try_into().map_err(|e: toml::de::Error| SpecError::Parse(e.to_string()))
}

pub fn load_job(path: &std::path::Path, overrides: &[String]) -> Result<(JobSpec, String), SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.display().to_string(), source })?;
    Ok((parse_job(&text, overrides)?, text))
}

fn apply_override(root: &mut toml::Value, o: &str) -> Result<(), SpecError> {
    let (key, raw) = o.split_once('=').ok_or_else(|| SpecError::BadOverride(o.into()))?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    };
    let segs: Vec<&str> = key.trim().split('.').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(SpecError::BadOverride(o.into()));
    }
    let mut cur = root;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    t.insert(seg.to_string(), value);
                    return Ok(());
                }
                t.entry(seg.to_string()).or_insert_with(|| toml::Value::Table(Default::default()))
            }
            toml::Value::Array(a) => {
                let idx: usize = seg.parse().map_err(|_| SpecError::BadOverride(format!("{o}: `{seg}` must index an array")))?;
                let len = a.len();
                let slot = a.get_mut(idx).ok_or_else(|| SpecError::BadOverride(format!("{o}: index {idx} out of range (array has {len})")))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => return Err(SpecError::BadOverride(format!("{o}: `{seg}` is inside a plain value"))),
        };
    }
    Ok(())
}

/// What the launch provides, for checking a job before any work.
#[derive(Clone, Debug)]
pub struct LaunchFacts {
    pub world_size: usize,
    /// Most ranks on one node.
    pub max_local_ranks: usize,
    /// GPUs visible on a node (None on the CPU backend).
    pub visible_gpus: Option<usize>,
    /// Per-rank memory budget, bytes.
    pub memory_budget_bytes: u64,
    /// Bytes per model value on the device.
    pub elem_bytes: usize,
}

/// Checks every SPEC section 3 rule that needs no device.
pub fn validate(job: &JobSpec, facts: &LaunchFacts) -> Result<ModelConfig, SpecError> {
    let m = job.model.resolve()?;
    let w = &job.workload;
    if job.strategies.is_empty() {
        return Err(rule("at-least-one-strategy", "the job lists no [[strategy]]"));
    }
    if w.categories.is_empty() {
        return Err(rule("at-least-one-category", "the workload lists no [[workload.category]]"));
    }
    if w.sequences_per_category == 0 || w.batch_size == 0 {
        return Err(rule("workload-positive", "sequences_per_category and batch_size must be > 0"));
    }
    if w.output_tokens == 0 {
        return Err(rule("output-tokens-positive", "output_tokens must be at least 1"));
    }
    for c in &w.categories {
        let lengths = c.resolved_lengths();
        if lengths.is_empty() {
            return Err(rule("category-has-lengths", format!("category `{}` has no lengths", c.name)));
        }
        for &s in &lengths {
            if s == 0 {
                return Err(rule("sequence-length-positive", format!("category `{}` has a zero-length sequence", c.name)));
            }
            if s + w.output_tokens > m.max_seq_len {
                return Err(rule("sequence-within-max", format!("category `{}`: {} prompt + {} output tokens exceed the model's max_seq_len {}", c.name, s, w.output_tokens, m.max_seq_len)));
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for s in &job.strategies {
        if !names.insert(s.name()) {
            return Err(rule("strategy-names-unique", format!("two strategies are named `{}`", s.name())));
        }
        match s {
            StrategySpec::Baseline(b) => {
                if b.tp == 0 || b.pp == 0 {
                    return Err(rule("parallel-degrees-positive", format!("{}: tp and pp must be >= 1", s.name())));
                }
                check_tp(&m, b.tp, &s.name())?;
                if m.layers % b.pp != 0 {
                    return Err(rule("layers-divisible-by-pp", format!("{}: {} layers are not divisible by pp={}", s.name(), m.layers, b.pp)));
                }
            }
            StrategySpec::Fapool(f) => {
                if f.base == 0 || f.pool_max == 0 {
                    return Err(rule("parallel-degrees-positive", format!("{}: base and pool_max must be >= 1", s.name())));
                }
                check_tp(&m, f.base, &s.name())?;
                if f.tokens_per_pool_gpu == 0 || f.micro_batches == 0 {
                    return Err(rule("pool-policy-positive", format!("{}: tokens_per_pool_gpu and micro_batches must be >= 1", s.name())));
                }
            }
        }
    }
    // World size: enough for every strategy's minimum, and no rank that no strategy can use.
    let need_min = job.strategies.iter().map(|s| s.rank_range().0).max().unwrap_or(1);
    let need_max = job.strategies.iter().map(|s| s.rank_range().1).max().unwrap_or(1);
    if facts.world_size < need_min || facts.world_size > need_max {
        let detail: Vec<String> = job
            .strategies
            .iter()
            .map(|s| {
                let (lo, hi) = s.rank_range();
                if lo == hi {
                    format!("{} needs {lo}", s.name())
                } else {
                    format!("{} needs {lo}..={hi}", s.name())
                }
            })
            .collect();
        let want = if need_min == need_max { format!("{need_min}") } else { format!("{need_min}..={need_max}") };
        return Err(rule("ranks-match-job", format!("{} ranks launched, the job needs {want} ({})", facts.world_size, detail.join(", "))));
    }
    if let Some(gpus) = facts.visible_gpus {
        if facts.max_local_ranks > gpus {
            return Err(rule("one-rank-per-gpu", format!("{} ranks on one node but only {gpus} visible GPUs", facts.max_local_ranks)));
        }
    }
    for s in &job.strategies {
        let est = crate::memory::estimate_peak(&m, s, w, facts.world_size, facts.elem_bytes);
        if est.min_bytes > facts.memory_budget_bytes {
            return Err(rule(
                "memory-fits",
                format!(
                    "{}: even one sequence of the longest category needs {:.2} GiB on its busiest rank, the budget is {:.2} GiB",
                    s.name(),
                    est.min_bytes as f64 / (1u64 << 30) as f64,
                    facts.memory_budget_bytes as f64 / (1u64 << 30) as f64
                ),
            ));
        }
    }
    Ok(m)
}

fn check_tp(m: &ModelConfig, t: usize, name: &str) -> Result<(), SpecError> {
    if m.heads % t != 0 {
        return Err(rule("heads-divisible-by-tp", format!("{name}: {} heads are not divisible by tp={t}", m.heads)));
    }
    if m.ffn % t != 0 {
        return Err(rule("ffn-divisible-by-tp", format!("{name}: ffn {} is not divisible by tp={t}", m.ffn)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
[model]
preset = "tiny"
[workload]
sequences_per_category = 4
output_tokens = 4
[[workload.category]]
name = "short"
lengths = [16, 32]
[[strategy]]
kind = "baseline"
tp = 2
pp = 2
[[strategy]]
kind = "fapool"
base = 2
pool_max = 2
"#;

    fn facts(world: usize) -> LaunchFacts {
        LaunchFacts { world_size: world, max_local_ranks: world, visible_gpus: None, memory_budget_bytes: 1 << 30, elem_bytes: 4 }
    }

    fn broken(job: &JobSpec, f: &LaunchFacts) -> &'static str {
        match validate(job, f) {
            Err(SpecError::Rule { rule, .. }) => rule,
            other => panic!("expected a rule violation, got {other:?}"),
        }
    }

    fn with(sets: &[&str]) -> JobSpec {
        parse_job(JOB, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn the_example_job_is_valid_on_four_ranks() {
        assert!(validate(&with(&[]), &facts(4)).is_ok());
    }

    #[test]
    fn zero_length_sequences_are_rejected() {
        assert_eq!(broken(&with(&["workload.category.0.lengths=[0, 16]"]), &facts(4)), "sequence-length-positive");
    }

    #[test]
    fn sequences_over_the_maximum_are_rejected() {
        assert_eq!(broken(&with(&["model.max_seq_len=32"]), &facts(4)), "sequence-within-max");
    }

    #[test]
    fn heads_not_divisible_by_tp_are_rejected() {
        assert_eq!(broken(&with(&["strategy.0.tp=3", "strategy.0.pp=1"]), &facts(4)), "heads-divisible-by-tp");
    }

    #[test]
    fn ffn_not_divisible_by_tp_are_rejected() {
        assert_eq!(broken(&with(&["model.ffn=250", "strategy.0.tp=4", "strategy.0.pp=1"]), &facts(4)), "ffn-divisible-by-tp");
    }

    #[test]
    fn layers_not_divisible_by_pp_are_rejected() {
        assert_eq!(broken(&with(&["model.layers=3"]), &facts(4)), "layers-divisible-by-pp");
    }

    #[test]
    fn a_world_size_the_job_cannot_use_is_rejected() {
        assert_eq!(broken(&with(&[]), &facts(3)), "ranks-match-job");
        assert_eq!(broken(&with(&[]), &facts(5)), "ranks-match-job");
    }

    #[test]
    fn more_local_ranks_than_gpus_are_rejected() {
        let f = LaunchFacts { visible_gpus: Some(2), ..facts(4) };
        assert_eq!(broken(&with(&[]), &f), "one-rank-per-gpu");
    }

    #[test]
    fn a_memory_estimate_that_does_not_fit_is_rejected() {
        let f = LaunchFacts { memory_budget_bytes: 1000, ..facts(4) };
        assert_eq!(broken(&with(&[]), &f), "memory-fits");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse_job(&JOB.replace("pp = 2", "pp = 2\nbogus_key = 1"), &[]).unwrap_err().to_string();
        assert!(err.contains("bogus_key"), "{err}");
    }

    #[test]
    fn overrides_reach_nested_tables_and_arrays() {
        let j = with(&["workload.sequences_per_category=20", "strategy.1.partition=\"zigzag\"", "run.name=sweep"]);
        assert_eq!(j.workload.sequences_per_category, 20);
        assert_eq!(j.run.name, "sweep");
        assert!(matches!(&j.strategies[1], StrategySpec::Fapool(f) if f.partition == Partition::Zigzag));
    }

    #[test]
    fn the_default_workload_is_the_specs() {
        let w = WorkloadSpec::default();
        assert_eq!(w.categories[0].resolved_lengths(), vec![512, 1024, 2048]);
        let vl = w.categories[3].resolved_lengths();
        assert_eq!((vl.len(), vl[0], *vl.last().unwrap()), (33, 32768, 65536));
        assert_eq!((w.sequences_per_category, w.output_tokens, w.batch_size), (1000, 128, 1024));
    }
}
