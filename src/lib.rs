//! fapool: a benchmark suite for long-context LLM inference parallelism.
//!
//! The modules follow the path of data through a run:

// Weight shards are addressed as lists of column runs; a list of one run is
// the common case, not a mistaken `Vec` of a range.
#![allow(clippy::single_range_in_vec_init)]

pub mod analyze;
pub mod backend;
pub mod bench;
pub mod checks;
pub mod cluster;
pub mod comm;
pub mod commands;
pub mod control;
pub mod energy;
pub mod exit;
pub mod metrics;
pub mod model;
pub mod planner;
pub mod results;
pub mod rules;
pub mod runner;
pub mod spec;
pub mod strategy;
pub mod workload;
