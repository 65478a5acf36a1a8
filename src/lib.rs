//! fapool: a benchmark suite for long-context LLM inference parallelism.
//!
//! The modules follow the path of data through a run:
//! job spec (`spec`, `workload`, `model`) → cluster roles and communicators
//! (`cluster`) → strategy (`strategy`: who computes what) → backend (kernels)
//! and comm (collectives) → metrics (`metrics`, timed in `runner`) → results
//! file (`results`) → analysis (`analyze`). `memory` models what fits;
//! `checks` checks every backend's kernels against reference definitions,
//! and `bench` measures kernels and collectives.

// Weight shards are addressed as lists of column runs; a list of one run is
// the common case, not a mistaken `Vec` of a range.
#![allow(clippy::single_range_in_vec_init)]

pub mod analyze;
pub mod app;
pub mod backend;
pub mod bench;
pub mod checks;
pub mod cluster;
pub mod comm;
pub mod control;
pub mod energy;
pub mod exit;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod results;
pub mod runner;
pub mod spec;
pub mod strategy;
pub mod workload;
