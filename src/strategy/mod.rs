//! Strategies: who computes what. Each strategy is a folder with two parts:
//!
//! - a **layout** (pure arithmetic, no MPI and no device): the ranks it needs,
//!   the role of every rank and the groups it belongs to, the rules it checks
//!   against the model, and its memory estimate for a batch shape. This is
//!   the [`Deployment`] the job spec, the runner, the results file and the
//!   planner all ask, so "who does what" has one source of truth;
//! - a **dataflow** (what each rank does per phase, prefill and decode),
//!   calling backend and comm operations, implementing [`Strategy`].
//!
//! Strategies hold no timers and write no files: the runner times phases and
//! the comm layer accounts for every message. Shared pieces (tensor-parallel
//! layer math, layer shards, the KV cache, the binary tree, group
//! construction) live in [`common`]. The one `match` on strategy kinds is in
//! [`registry`]: adding a strategy means adding its folder and one line there.

pub mod baseline;
pub mod common;
pub mod fapool;
pub mod moe;
pub mod naive;
pub mod registry;

use crate::backend::{Backend, StepVars};
use crate::comm::{Comm, CommError, Group};
use crate::metrics::ExpertLoad;
use crate::model::ModelConfig;
use crate::rules::Violation;

/// Errors while executing a strategy.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The model's checkpoint broke a rule when it was opened (checked
    /// before any work, so only a file changed since then gets here).
    #[error(transparent)]
    Checkpoint(#[from] Violation),
    /// The dataflow was driven out of order (a bug, not bad input).
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, StrategyError>;

/// A protocol error: an operation called out of order.
pub fn protocol(what: impl Into<String>) -> StrategyError {
    StrategyError::Protocol(what.into())
}

/// The shape of one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub nseq: usize,
    pub seq_len: usize,
    pub out_tokens: usize,
}

impl BatchShape {
    /// Prompt plus generated tokens of one sequence (the KV cache's length).
    pub fn context(&self) -> usize {
        self.seq_len + self.out_tokens
    }
}

/// How a strategy will run a batch, decided in `begin_batch`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSetup {
    pub micro_batches: usize,
    pub pool_requested: usize,
    pub pool_effective: usize,
    /// This rank works on the batch (idle pool ranks and unused ranks do not).
    pub active: bool,
    /// The pool was requested but the batch runs base-only.
    pub pool_fallback: bool,
}

/// What the leader rank gets from a step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOut {
    pub tokens: Vec<u32>,
    /// `[nseq, vocab]` logits of the step, when asked for.
    pub logits: Option<Vec<f32>>,
}

impl StepOut {
    /// The outputs of consecutive micro-batches as one.
    pub fn concat(parts: &[StepOut], keep_logits: bool) -> StepOut {
        let tokens = parts.iter().flat_map(|o| o.tokens.iter().copied()).collect();
        let logits = keep_logits.then(|| parts.iter().flat_map(|o| o.logits.clone().unwrap_or_default()).collect());
        StepOut { tokens, logits }
    }
}

/// A deployment strategy as seen by one rank: the dataflow of its phases.
pub trait Strategy<B: Backend> {
    /// Prepares a batch of `shape`, at most `micro_batch_cap` sequences per
    /// micro-batch; `pool_usable` is false when a pool rank reported its
    /// device unusable (FA Pool then runs the batch on the base alone).
    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, pool_usable: bool) -> Result<BatchSetup>;
    /// Runs the prompt (`[nseq, seq_len]` tokens, known on every rank); the
    /// first generated tokens on the leader.
    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>>;
    /// Host half of the decode step that generates output index `step`
    /// (1-based after prefill's 0): shares the previous tokens (only the
    /// leader passes them) and returns this rank's step scalars for
    /// [`Backend::set_step`], or `None` when the rank has no part in the step.
    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<Option<StepVars>>;
    /// Device half: the step's kernels and messages, reading the scalars set
    /// with [`Backend::set_step`]. It neither waits for the device nor
    /// changes host state, so it can be recorded once and replayed at every
    /// later step of the batch. Returns the logits `[nseq, vocab]` on the leader.
    fn decode_device(&mut self) -> Result<Option<B::Buf>>;
    /// Samples the leader's logits (from this step's [`Strategy::decode_device`]
    /// or a replay of it) and advances host state.
    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>>;
    fn end_batch(&mut self) -> Result<()>;
    /// Whether [`Strategy::decode_device`] can be recorded once and
    /// replayed: it reads nothing back to the host (a mixture-of-experts
    /// step reads its expert counts, so it runs op by op).
    fn decode_recordable(&self) -> bool {
        true
    }
    /// What this rank counted per layer and expert over the batch
    /// (strategies with experts; `batch_index` is left for the runner),
    /// taken once before [`Strategy::end_batch`].
    fn take_expert_loads(&mut self) -> Vec<ExpertLoad> {
        Vec::new()
    }
}

/// Ranks that form disjoint groups of one kind (e.g. every stage's TP
/// group): each rank belongs to at most one of them, so one collective split
/// creates them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupFamily {
    /// The family's name, e.g. `tp` (groups are named `<strategy>/<family><index>`).
    pub name: &'static str,
    /// The groups, each as world ranks in group-rank order.
    pub groups: Vec<Vec<usize>>,
}

impl GroupFamily {
    /// The group of the family that holds world rank `rank`, and its index.
    pub fn group_of(&self, rank: usize) -> Option<(usize, &[usize])> {
        self.groups.iter().enumerate().find(|(_, g)| g.contains(&rank)).map(|(i, g)| (i, g.as_slice()))
    }
}

/// Who does what in a launch of a given world size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The role of every world rank ("tp0", "stage1-tp0", "base0", "pool2",
    /// "idle", ...), as the results file records it.
    pub roles: Vec<String>,
    /// The communicators the strategy creates when it is built.
    pub groups: Vec<GroupFamily>,
    /// The world rank that ends every step holding the generated tokens.
    pub leader: usize,
}

impl Layout {
    /// The role name of ranks outside the deployment.
    pub const IDLE: &'static str = "idle";

    /// World ranks the strategy runs on.
    pub fn ranks_used(&self) -> Vec<usize> {
        self.roles.iter().enumerate().filter(|(_, r)| r.as_str() != Self::IDLE).map(|(i, _)| i).collect()
    }

    /// The family named `name`.
    pub fn family(&self, name: &str) -> Option<&GroupFamily> {
        self.groups.iter().find(|f| f.name == name)
    }
}

/// Fewest and most world ranks a strategy can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankRange {
    pub min: usize,
    pub max: usize,
}

/// What a strategy is before any rank runs it. Pure: no MPI, no device.
pub trait Deployment {
    /// The kind name job specs and results files use (`baseline`, `fapool`).
    fn kind(&self) -> &'static str;
    /// The strategy's name: given in the spec, or derived from its settings.
    fn name(&self) -> String;
    /// Ranks it can run on.
    fn rank_range(&self) -> RankRange;
    /// The rules its settings must satisfy with this model.
    fn check(&self, model: &ModelConfig) -> std::result::Result<(), Violation>;
    /// Whether it runs models whose FFN is a mixture of experts (then it
    /// runs only those); the job rules refuse a model of the other kind.
    fn serves_experts(&self) -> bool {
        false
    }
    /// The rules its settings must satisfy with the workload's prompt
    /// lengths (every length of every category).
    fn check_prompts(&self, _lengths: &[usize]) -> std::result::Result<(), Violation> {
        Ok(())
    }
    /// Roles and groups of a launch of `world` ranks (`world` within
    /// [`Deployment::rank_range`]).
    fn layout(&self, world: usize) -> Layout;
    /// Device bytes the busiest rank needs for a batch of `shape`, with
    /// values of `elem` bytes: weights (as sharded), KV cache, activations
    /// and communication buffers.
    fn memory_bytes(&self, model: &ModelConfig, shape: BatchShape, world: usize, elem: usize) -> u64;

    /// Most sequences of `shape` one micro-batch may hold within `budget`
    /// bytes (at least 1: jobs where one sequence does not fit are refused
    /// before any work), at most `shape.nseq`.
    fn max_sequences(&self, model: &ModelConfig, shape: BatchShape, world: usize, elem: usize, budget: u64) -> usize {
        let fits = |n: usize| self.memory_bytes(model, BatchShape { nseq: n, ..shape }, world, elem) <= budget;
        let cap = shape.nseq.max(1);
        if fits(cap) {
            return cap;
        }
        let (mut lo, mut hi) = (1usize, cap);
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// What building a strategy on one rank needs.
pub struct BuildContext<'a, 'c, B: Backend> {
    pub be: &'a B,
    pub comm: &'a Comm<'c, B>,
    pub cfg: &'a ModelConfig,
    /// The world (every rank calls the build collectively).
    pub world: &'a Group,
}
