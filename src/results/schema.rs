//! The names of the results file's layout (documented in
//! `docs/results-schema.md`) and the check that a file is one this build
//! reads. The writer and the reader both take them from here.

use super::attrs;
use super::{Result, ResultsError};
use hdf5::File;
use std::path::Path;

/// The schema this code writes and reads. Readers reject any other version.
pub const SCHEMA_VERSION: u32 = 1;

/// The value of the root attribute `format`, which marks a fapool results file.
pub const FORMAT_NAME: &str = "fapool-results";

/// The group holding one group per strategy.
pub(crate) const STRATEGIES: &str = "strategies";

/// The group holding the run's provenance.
pub(crate) const PROVENANCE: &str = "provenance";

/// Refuses files that are not fapool results files or use another schema.
pub(crate) fn check_format(file: &File, path: &Path) -> Result<()> {
    if attrs::get_str(file, "format")?.as_deref() != Some(FORMAT_NAME) {
        return Err(ResultsError::NotResultsFile { path: path.to_path_buf() });
    }
    let found = attrs::get_scalar::<u32>(file, "schema_version")?.unwrap_or(0);
    if found != SCHEMA_VERSION {
        return Err(ResultsError::UnsupportedSchema { path: path.to_path_buf(), found });
    }
    Ok(())
}
