//! `policyctl diff OLD NEW`: what a policy change does, per environment, for a reviewer: as
//! text, as Markdown for a pull-request comment, or as JSON. The exit code says whether the new
//! policy is valid and whether anything changes where a service enforces.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use depfence::compile::check_path;
use depfence::diff::{EnvironmentDiff, PolicyDiff, ProblemRef, diff};

use super::invalid;
use crate::args::{DiffFormat, ErrorFormat};
use crate::error::{CliError, EXIT_ENFORCEMENT_CHANGES};
use crate::output::print_diagnostics;

/// Compares the policies at `old` and `new` and prints the changes in `format`.
pub fn run(old: &Path, new: &Path, errors: ErrorFormat, format: DiffFormat) -> Result<ExitCode, CliError> {
    let (old_checked, new_checked) = (check_path(old)?, check_path(new)?);
    for checked in [&old_checked, &new_checked] {
        if checked.analysis.is_none() {
            print_diagnostics(errors, checked.sources(), checked.diagnostics())?;
            return Ok(invalid());
        }
    }
    let changes = diff(&old_checked, &new_checked).map_err(|e| CliError::Usage(e.to_string()))?;
    let names = (old.display().to_string(), new.display().to_string());
    let text = match format {
        DiffFormat::Text => text(&changes, &names),
        DiffFormat::Markdown => markdown(&changes, &names),
        DiffFormat::Json => {
            let mut json = serde_json::to_string_pretty(&changes).map_err(std::io::Error::from)?;
            json.push('\n');
            json
        }
    };
    print!("{text}");
    if !changes.new_policy_valid {
        Ok(invalid())
    } else if changes.enforcement_changes() {
        Ok(ExitCode::from(EXIT_ENFORCEMENT_CHANGES))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// The lines of one environment's changes, each a bullet's text (Markdown inline code where a
/// name is quoted with backticks, which plain text keeps too).
fn sections(env: &EnvironmentDiff) -> Vec<(&'static str, Vec<String>)> {
    let edge = |e: &depfence::diff::EdgeChange| {
        format!("`{}` -> `{}`{}", e.from, e.to, if e.critical { "" } else { " (not critical)" })
    };
    let problem = |p: &ProblemRef| {
        let severity = match p.severity {
            depfence::diag::Severity::Error => "error",
            depfence::diag::Severity::Warning => "warning",
        };
        format!("{severity}[{}]: {} ({})", p.code, p.message, p.position)
    };
    let mut rules = Vec::new();
    for change in &env.rules {
        rules.extend(change.added.iter().map(|r| format!("`{}` allows {r}", change.service)));
        rules.extend(change.removed.iter().map(|r| format!("`{}` no longer allows {r}", change.service)));
    }
    vec![
        ("services added", env.services_added.iter().map(|s| format!("`{s}`")).collect()),
        ("services removed", env.services_removed.iter().map(|s| format!("`{s}`")).collect()),
        ("modes", env.modes.iter().map(|m| format!("`{}`: {} -> {}", m.service, m.from, m.to)).collect()),
        (
            "verdicts that change",
            env.verdicts
                .iter()
                .map(|v| format!("`{}` -> {}: {} -> {}", v.service, v.connection, v.from, v.to))
                .collect(),
        ),
        ("rules", rules),
        ("dependencies added", env.edges_added.iter().map(edge).collect()),
        ("dependencies removed", env.edges_removed.iter().map(edge).collect()),
        ("new problems", env.problems_new.iter().map(problem).collect()),
        ("problems fixed", env.problems_fixed.iter().map(problem).collect()),
    ]
}

fn headline(env: &EnvironmentDiff) -> &'static str {
    if env.is_empty() {
        "no change"
    } else if env.enforcement_changes {
        "changes what is enforced"
    } else {
        "changes, none where a service enforces"
    }
}

fn text(changes: &PolicyDiff, (old, new): &(String, String)) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "policy diff {old} -> {new}");
    if !changes.new_policy_valid {
        let _ = writeln!(out, "the new policy is invalid (see its new problems): it cannot be applied");
    }
    for env in &changes.environments_added {
        let _ = writeln!(out, "environment {env}: added");
    }
    for env in &changes.environments_removed {
        let _ = writeln!(out, "environment {env}: removed");
    }
    for env in &changes.environments {
        let _ = writeln!(out, "environment {}: {}", env.environment, headline(env));
        for (title, lines) in sections(env) {
            if lines.is_empty() {
                continue;
            }
            let _ = writeln!(out, "  {title}:");
            for line in lines {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    out
}

fn markdown(changes: &PolicyDiff, (old, new): &(String, String)) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### depfence: `{old}` -> `{new}`\n");
    let summary = if changes.is_empty() {
        "No change to enforcement or to the dependency graph."
    } else if changes.enforcement_changes() {
        "**This change alters what is enforced.**"
    } else {
        "This change alters nothing a service enforces."
    };
    let _ = writeln!(out, "{summary}\n");
    if !changes.new_policy_valid {
        let _ = writeln!(out, "**The new policy is invalid** (see its new problems): it cannot be applied.\n");
    }
    for env in &changes.environments_added {
        let _ = writeln!(out, "- environment `{env}` added");
    }
    for env in &changes.environments_removed {
        let _ = writeln!(out, "- environment `{env}` removed");
    }
    if !changes.environments_added.is_empty() || !changes.environments_removed.is_empty() {
        out.push('\n');
    }
    for env in &changes.environments {
        let _ = writeln!(out, "#### Environment `{}`: {}\n", env.environment, headline(env));
        for (title, lines) in sections(env) {
            if lines.is_empty() {
                continue;
            }
            let _ = writeln!(out, "**{}**\n", capitalized(title));
            for line in lines {
                let _ = writeln!(out, "- {line}");
            }
            out.push('\n');
        }
    }
    out
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}
