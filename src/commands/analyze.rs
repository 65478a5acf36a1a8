//! `fapool analyze` (tables, plots, exports, comparisons of results files)
//! and `fapool check` (a results file's schema and internal consistency).

use super::Failure;
use crate::analyze::AnalyzeArgs;
use crate::exit::Exit;
use std::path::Path;

/// `fapool analyze FILE... [--plots DIR] [--csv DIR] [--json FILE] [--slo ...] [--compare A B]`.
pub fn analyze(args: &AnalyzeArgs) -> Result<(), Failure> {
    crate::analyze::analyze(args, &mut std::io::stdout().lock()).map_err(|e| Failure::new(e.exit(), e.to_string()))
}

/// `fapool check FILE`: exit 8 with every reason when the file is
/// inconsistent, 2 when it is not a readable results file.
pub fn check(file: &Path) -> Result<(), Failure> {
    match crate::analyze::check(file, &mut std::io::stdout().lock()) {
        Ok(report) if report.passed() => Ok(()),
        Ok(_) => Err(Failure::silent(Exit::WrongResult)),
        Err(e) => Err(Failure::new(e.exit(), e.to_string())),
    }
}
