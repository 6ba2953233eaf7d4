//! `policyctl check`: every problem of a policy, and a summary when it is valid.

use std::path::Path;
use std::process::ExitCode;

use super::{Show, checked, invalid, rpc_rules_clause};
use crate::args::ErrorFormat;
use crate::error::CliError;

/// Checks the policy at `path`; exit 1 on errors (or on warnings with `deny_warnings`).
pub fn run(path: &Path, format: ErrorFormat, deny_warnings: bool) -> Result<ExitCode, CliError> {
    let Some(checked) = checked(path, format, Show::All)? else { return Ok(invalid()) };
    let diagnostics = checked.diagnostics();
    if diagnostics.has_errors() || (deny_warnings && !diagnostics.is_empty()) {
        return Ok(invalid());
    }
    if format != ErrorFormat::Json {
        let compiled = checked.freeze().map_err(CliError::Compile)?;
        let (snapshot, analysis) = (&compiled.snapshot, &compiled.analysis);
        println!(
            "ok: {} services, {} dependencies, {} address rules{}, {} environments; sha256 {}",
            snapshot.services().len(),
            analysis.edges.len(),
            snapshot.net_rule_count(),
            rpc_rules_clause(snapshot),
            snapshot.environments().len(),
            snapshot.hash()
        );
    }
    Ok(ExitCode::SUCCESS)
}
