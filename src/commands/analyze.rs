//! `fapool analyze`: comparison tables (and plots) from results files.

use super::Failure;
use crate::exit::Exit;
use std::path::PathBuf;

/// `fapool analyze FILE...`.
pub fn analyze(files: &[PathBuf]) -> Result<(), Failure> {
    crate::analyze::analyze(files, &mut std::io::stdout().lock()).map_err(|e| Failure::new(Exit::Failure, e.to_string()))
}
