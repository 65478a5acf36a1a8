//! fapool: a benchmark suite for long-context LLM inference parallelism.
//!
//! The modules follow the path of data through a run:
//! job spec (`spec`, `workload`, `model`, the named `rules`) → cluster roles
//! and communicators (`cluster`) → strategy (`strategy`: each strategy's
//! layout — who computes what, its memory model — and dataflow) → backend
//! (kernels) and comm (collectives) → runner (timed batches, the sweep) →
//! metrics → results file (`results`) → analysis (`analyze`). `commands`
//! holds one file per CLI command; `bench` and `gpu_checks` measure and
//! check kernels and collectives.

// Weight shards are addressed as lists of column runs; a list of one run is
// the common case, not a mistaken `Vec` of a range.
#![allow(clippy::single_range_in_vec_init)]

pub mod analyze;
pub mod backend;
pub mod bench;
pub mod cluster;
pub mod comm;
pub mod commands;
pub mod control;
pub mod energy;
pub mod exit;
pub mod gpu_checks;
pub mod metrics;
pub mod model;
pub mod planner;
pub mod results;
pub mod rules;
pub mod runner;
pub mod spec;
pub mod strategy;
pub mod trace;
pub mod workload;
