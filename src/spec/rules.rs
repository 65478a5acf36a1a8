//! The rules a job must satisfy before any work starts. Model and workload
//! rules are checked here; each strategy checks its own settings
//! ([`crate::strategy::Deployment::check`]); the launch rules compare the job
//! with what the launch provides ([`LaunchFacts`]).

use super::{rule, JobSpec, SpecError};
use crate::model::ModelConfig;
use crate::strategy::BatchShape;

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

/// Checks every rule that needs no device: the model, the workload, each
/// strategy's own rules, the world size, one rank per GPU and the memory fit.
pub fn validate(job: &JobSpec, facts: &LaunchFacts) -> Result<ModelConfig, SpecError> {
    let m = job.model.resolve()?;
    // The checkpoint's files, tensors, shapes and dtypes, before any device work.
    crate::model::checkpoint::check(&m)?;
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
        let serves = s.deployment().serves_experts();
        if serves != m.experts.is_some() {
            let why = if serves { format!("it runs mixture-of-experts models and {} has a dense FFN", m.name) } else { format!("it runs dense models and {} has a mixture of experts", m.name) };
            return Err(rule("strategy-serves-model", format!("{} ({}): {why}", s.name(), s.kind())));
        }
        s.deployment().check(&m)?;
        s.deployment().check_prompts(&w.categories.iter().flat_map(|c| c.resolved_lengths()).collect::<Vec<_>>())?;
    }
    // World size: enough for every strategy's minimum, and no rank that no strategy can use.
    let need_min = job.strategies.iter().map(|s| s.deployment().rank_range().min).max().unwrap_or(1);
    let need_max = job.strategies.iter().map(|s| s.deployment().rank_range().max).max().unwrap_or(1);
    if facts.world_size < need_min || facts.world_size > need_max {
        let detail: Vec<String> = job
            .strategies
            .iter()
            .map(|s| {
                let r = s.deployment().rank_range();
                let (lo, hi) = (r.min, r.max);
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
    // One sequence of the longest category must fit every strategy's busiest rank.
    let longest = w.categories.iter().flat_map(|c| c.resolved_lengths()).max().unwrap_or(0);
    let one = BatchShape { nseq: 1, seq_len: longest, out_tokens: w.output_tokens };
    for s in &job.strategies {
        let min_bytes = s.deployment().memory_bytes(&m, one, facts.world_size, facts.elem_bytes);
        if min_bytes > facts.memory_budget_bytes {
            return Err(rule(
                "memory-fits",
                format!(
                    "{}: even one sequence of the longest category needs {:.2} GiB on its busiest rank, the budget is {:.2} GiB",
                    s.name(),
                    min_bytes as f64 / (1u64 << 30) as f64,
                    facts.memory_budget_bytes as f64 / (1u64 << 30) as f64
                ),
            ));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{parse_job, StrategySpec};
    use crate::strategy::fapool::Partition;

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
            Err(SpecError::Rule(v)) => v.rule,
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
    fn a_dense_strategy_refuses_a_mixture_of_experts_model() {
        assert_eq!(broken(&with(&["model.preset=\"tiny-moe\""]), &facts(4)), "strategy-serves-model");
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
}
