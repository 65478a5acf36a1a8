//! The names of the results file's layout (documented in
//! `docs/results-schema.md`) and the check that a file is one this build
//! reads. The writer and the reader both take them from here.

use super::attrs;
use super::{Result, ResultsError};
use hdf5::File;
use std::path::Path;

/// The schema this code writes. Version 2 added the compute and waiting
/// times of every rank row and the `tp_allgather` and `tp_reducescatter`
/// categories; version 3 the `expert_dispatch` and `expert_combine`
/// categories and the `experts` and `routing` datasets of mixture-of-experts
/// strategies; version 4 the `prediction` group's text attributes
/// (`source`: what the planner costed with, `expert_routing`: the routing
/// a mixture-of-experts prediction assumes) beside its float figures.
pub const SCHEMA_VERSION: u32 = 4;

/// The oldest schema this code still reads (a version-1 rank row reads with
/// its wall time as compute time and no waiting; versions 1 and 2 have no
/// expert traffic; versions 1 to 3 hold only float predictions).
pub const OLDEST_READABLE: u32 = 1;

/// The value of the root attribute `format`, which marks a fapool results file.
pub const FORMAT_NAME: &str = "fapool-results";

/// The group holding one group per strategy.
pub(crate) const STRATEGIES: &str = "strategies";

/// The group holding the run's provenance.
pub(crate) const PROVENANCE: &str = "provenance";

/// Refuses files that are not fapool results files or use a schema this
/// build cannot read; returns the file's schema version.
pub(crate) fn check_format(file: &File, path: &Path) -> Result<u32> {
    if attrs::get_str(file, "format")?.as_deref() != Some(FORMAT_NAME) {
        return Err(ResultsError::NotResultsFile { path: path.to_path_buf() });
    }
    let found = attrs::get_scalar::<u32>(file, "schema_version")?.unwrap_or(0);
    if !(OLDEST_READABLE..=SCHEMA_VERSION).contains(&found) {
        return Err(ResultsError::UnsupportedSchema { path: path.to_path_buf(), found });
    }
    Ok(found)
}
