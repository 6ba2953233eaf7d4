//! `policyctl check`: every problem of a policy, and a summary when it is valid.

use std::path::Path;
use std::process::ExitCode;

use depfence::diag::Diagnostics;

use super::{Show, address_rules_clause, checked, environment_index, invalid, judged_text, rpc_rules_clause};
use crate::args::ErrorFormat;
use crate::error::CliError;
use crate::output::print_diagnostics;

/// Checks the policy at `path`, in every environment or in `environment` only; exit 1 on
/// errors (or on warnings with `deny_warnings`).
pub fn run(
    path: &Path,
    format: ErrorFormat,
    deny_warnings: bool,
    environment: Option<&str>,
) -> Result<ExitCode, CliError> {
    let Some(checked) = checked(path, format, if environment.is_some() { Show::SyntaxOnly } else { Show::All })? else {
        return Ok(invalid());
    };
    let all = checked.analysis.as_ref().map(|a| a.environments.clone()).unwrap_or_default();
    let judged = match environment {
        Some(_) => all.get(environment_index(&all, environment)?).cloned().into_iter().collect(),
        None => all,
    };
    // Judged in one environment: the problems found there (or in every environment).
    let mut diagnostics = Diagnostics::default();
    let mut elsewhere = 0;
    for diag in checked.diagnostics().iter() {
        if diag.environments().is_empty() || diag.environments().iter().any(|e| judged.contains(e)) {
            diagnostics.push(diag.clone());
        } else if diag.severity() == depfence::diag::Severity::Error {
            elsewhere += 1;
        }
    }
    if environment.is_some() {
        print_diagnostics(format, checked.sources(), &diagnostics)?;
    }
    if format != ErrorFormat::Json {
        eprintln!("{}", judged_text(&judged));
        if elsewhere > 0 {
            eprintln!(
                "note: {elsewhere} error(s) in other environments; the policy compiles only when every environment is valid"
            );
        }
    }
    if diagnostics.has_errors() || (deny_warnings && !diagnostics.is_empty()) {
        return Ok(invalid());
    }
    if format != ErrorFormat::Json && elsewhere == 0 {
        let compiled = checked.freeze().map_err(CliError::Compile)?;
        let (snapshot, analysis) = (&compiled.snapshot, &compiled.analysis);
        let graphs: Vec<_> = match environment.and_then(|name| analysis.environment_index(name)) {
            Some(e) => analysis.graph(e).into_iter().collect(),
            None => analysis.graphs.iter().collect(),
        };
        let dependencies = match graphs.as_slice() {
            [only] => format!("{} dependencies", only.edges.len()),
            _ => {
                let each: Vec<String> =
                    graphs.iter().map(|g| format!("{} {}", g.environments.join("/"), g.edges.len())).collect();
                format!("dependencies {}", each.join(", "))
            }
        };
        println!(
            "ok: {} services, {}, {}{}, {} environments; sha256 {}",
            snapshot.services().len(),
            dependencies,
            address_rules_clause(snapshot),
            rpc_rules_clause(snapshot),
            snapshot.environments().len(),
            snapshot.hash()
        );
    }
    Ok(ExitCode::SUCCESS)
}
