//! `fapool validate`: every rule, no MPI, no device.

use super::{load, Failure, GIB};
use crate::model::ModelConfig;
use crate::spec::{self, JobSpec, LaunchFacts};
use crate::workload::Workload;
use std::path::Path;

/// What the launch would provide.
pub struct ValidateArgs {
    /// Ranks the launch would start.
    pub ranks: usize,
    /// Most ranks per node (default: all on one node).
    pub local_ranks: Option<usize>,
    /// GPUs visible per node (none for the CPU backend).
    pub gpus: Option<usize>,
    /// Per-rank memory budget in GiB (default: the job's, else 80).
    pub memory_gib: Option<f64>,
}

/// `fapool validate JOB --ranks N`.
pub fn validate(job: &Path, args: ValidateArgs, sets: &[String]) -> Result<(), Failure> {
    let (job, _) = load(job, sets)?;
    let elem = if args.gpus.is_some() { job.dtype().size_bytes() } else { 4 };
    let facts = LaunchFacts {
        world_size: args.ranks,
        max_local_ranks: args.local_ranks.unwrap_or(args.ranks),
        visible_gpus: args.gpus,
        memory_budget_bytes: (args.memory_gib.or(job.run.memory_budget_gib).unwrap_or(80.0) * GIB) as u64,
        elem_bytes: elem,
    };
    let m = spec::validate(&job, &facts)?;
    print_job_summary(&job, &m, args.ranks);
    println!("valid: {} ranks", args.ranks);
    Ok(())
}

fn print_job_summary(job: &JobSpec, m: &ModelConfig, world: usize) {
    println!(
        "model {}: {} layers, d_model {}, {} x {} heads ({} K/V), {} positions, ffn {} ({}){}, vocab {}{}: {:.3} B parameters ({:.3} B in layers)",
        m.name,
        m.layers,
        m.d_model,
        m.heads,
        m.head_dim,
        m.kv_heads,
        m.positions.name(),
        m.ffn,
        m.ffn_kind.name(),
        m.experts.map_or(String::new(), |e| format!(" in each of {} experts, top {} per token", e.count, e.top_k)),
        m.vocab,
        if m.tie_embeddings { ", tied embeddings" } else { "" },
        m.params() as f64 / 1e9,
        (m.layers as u64 * m.layer_params()) as f64 / 1e9
    );
    let w = Workload::new(&job.workload, m.vocab);
    for (c, cat) in job.workload.categories.iter().enumerate() {
        println!("category {}: lengths {:?}, {} sequences in {} batches", cat.name, cat.resolved_lengths(), job.workload.sequences_per_category, w.batches(c).len());
    }
    for s in &job.strategies {
        let d = s.deployment();
        let used = d.layout(world).ranks_used().len();
        println!("strategy {} ({}): uses {used} of {world} ranks", s.name(), s.kind());
    }
}
