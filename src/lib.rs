//! fapool: a benchmark suite for long-context LLM inference parallelism.
//!
//! The modules follow the path of data through a run:
//! job spec → cluster roles and communicators → strategy (who computes what)
//! → backend (kernels) and comm (collectives) → metrics → results file →
//! analysis.

pub mod backend;
pub mod comm;
pub mod energy;
pub mod gpu_checks;
pub mod metrics;
