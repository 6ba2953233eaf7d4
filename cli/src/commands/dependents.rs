//! `policyctl dependents`: who depends on a service, as the engine lists it
//! (`depfence::dependents`), printed as a table or JSON.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use depfence::dependents::{Dependents, dependents};

use super::{Show, checked, invalid, judged_graph};
use crate::args::{ErrorFormat, Output};
use crate::error::CliError;

/// Prints the dependents of `service` in the graph of `environment` (or the one graph every
/// environment shares).
pub fn run(
    path: &Path,
    format: ErrorFormat,
    service: &str,
    transitive: bool,
    environment: Option<&str>,
    output: Output,
) -> Result<ExitCode, CliError> {
    let Some(analysis) = checked(path, format, Show::SyntaxOnly)?.and_then(|c| c.analysis) else {
        return Ok(invalid());
    };
    let graph = judged_graph(&analysis, environment)?;
    let found = dependents(&analysis, graph, service, transitive).map_err(|e| CliError::Usage(e.to_string()))?;
    let text = match output {
        Output::Json => {
            let mut text = serde_json::to_string_pretty(&found).map_err(std::io::Error::from)?;
            text.push('\n');
            text
        }
        Output::Text => table(&found),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    if analysis.diagnostics.has_errors() {
        eprintln!(
            "note: the policy has {} error(s); run `policyctl check` for details",
            analysis.diagnostics.errors().count()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per dependent, columns aligned.
fn table(found: &Dependents) -> String {
    let how = if found.transitive { "directly or through others" } else { "directly" };
    if found.dependents.is_empty() {
        return format!("no service depends on `{}` ({how})\n", found.service);
    }
    let mut rows = vec![["SERVICE", "TIER", "CRITICAL", "DISTANCE", "OWNER", "LAYER", "PATH"].map(str::to_owned)];
    for d in &found.dependents {
        rows.push([
            d.service.clone(),
            d.tier.map_or("-".to_owned(), |t| t.to_string()),
            if d.critical { "yes" } else { "no" }.to_owned(),
            d.distance.to_string(),
            d.owner.clone().unwrap_or_else(|| "-".to_owned()),
            d.layer.clone().unwrap_or_else(|| "-".to_owned()),
            d.path.join(" -> "),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let count = found.dependents.len();
    let noun = if count == 1 { "service depends" } else { "services depend" };
    let mut out = format!("{count} {noun} on `{}` ({how}):\n", found.service);
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
