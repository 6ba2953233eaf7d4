//! `policyctl compile`: a policy into a snapshot file.

use std::path::Path;
use std::process::ExitCode;

use super::{address_rules_clause, compiled, invalid, rpc_rules_clause};
use crate::args::{ErrorFormat, SnapshotFormat};
use crate::error::CliError;

/// Compiles the policy at `path` into `output`, in `encoding`.
pub fn run(path: &Path, format: ErrorFormat, output: &Path, encoding: SnapshotFormat) -> Result<ExitCode, CliError> {
    let Some(compiled) = compiled(path, format)? else { return Ok(invalid()) };
    let bytes = match encoding {
        SnapshotFormat::Binary => compiled.snapshot.to_bytes().map_err(|e| CliError::Compile(e.into()))?,
        SnapshotFormat::Json => serde_json::to_vec_pretty(&compiled.snapshot).map_err(std::io::Error::from)?,
    };
    depfence::snapshot::write_file(output, &bytes)
        .map_err(|source| CliError::Io { context: format!("writing `{}`", output.display()), source })?;
    let warnings = compiled.analysis.diagnostics.warnings().count();
    if warnings > 0 {
        eprintln!("note: the policy has {warnings} warning(s); run `policyctl check` to see them");
    }
    eprintln!(
        "compiled {} services, {}{} into {} (sha256 {})",
        compiled.snapshot.services().len(),
        address_rules_clause(&compiled.snapshot),
        rpc_rules_clause(&compiled.snapshot),
        output.display(),
        compiled.snapshot.hash()
    );
    Ok(ExitCode::SUCCESS)
}
