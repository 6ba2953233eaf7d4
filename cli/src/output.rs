//! Printing diagnostics: for people (miette), one line each, or as JSON.

use std::io::Write;

use depfence::diag::{Diagnostics, Sources};
use miette::{GraphicalReportHandler, GraphicalTheme};

use crate::args::ErrorFormat;
use crate::error::CliError;

/// Prints diagnostics in the chosen format: human and plain to standard error, JSON to standard
/// output (a program reading it gets one document).
pub fn print_diagnostics(format: ErrorFormat, sources: &Sources, diagnostics: &Diagnostics) -> Result<(), CliError> {
    print_diagnostics_with(format, sources, diagnostics, &summary(diagnostics))
}

/// [`print_diagnostics`] with another last line for the human form (the findings of a command
/// on a valid policy, such as `check-deploy`'s, are not the policy's validity).
pub fn print_diagnostics_with(
    format: ErrorFormat,
    sources: &Sources,
    diagnostics: &Diagnostics,
    summary: &str,
) -> Result<(), CliError> {
    match format {
        ErrorFormat::Human if diagnostics.is_empty() => {}
        ErrorFormat::Human => {
            let theme = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                GraphicalTheme::unicode()
            } else {
                GraphicalTheme::unicode_nocolor()
            };
            let handler = GraphicalReportHandler::new_themed(theme).with_context_lines(1);
            let mut text = String::new();
            for diagnostic in diagnostics.iter() {
                let report = diagnostic.report(sources);
                // Rendering into a String cannot fail.
                let _ = handler.render_report(&mut text, &report);
                text.push('\n');
            }
            text.push_str(summary);
            text.push('\n');
            std::io::stderr().write_all(text.as_bytes())?;
        }
        ErrorFormat::Plain => {
            let mut text = String::new();
            for diagnostic in diagnostics.iter() {
                text.push_str(&diagnostic.to_plain(sources));
                text.push('\n');
            }
            std::io::stderr().write_all(text.as_bytes())?;
        }
        ErrorFormat::Json => {
            let document = serde_json::json!({
                "valid": !diagnostics.has_errors(),
                "errors": diagnostics.errors().count(),
                "warnings": diagnostics.warnings().count(),
                "diagnostics": diagnostics.iter().map(|d| d.to_json(sources)).collect::<Vec<_>>(),
            });
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &document).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

fn summary(diagnostics: &Diagnostics) -> String {
    let errors = diagnostics.errors().count();
    let warnings = diagnostics.warnings().count();
    let plural = |n: usize, word: &str| if n == 1 { format!("{n} {word}") } else { format!("{n} {word}s") };
    if errors > 0 {
        format!("policy is invalid: {}, {}", plural(errors, "error"), plural(warnings, "warning"))
    } else {
        format!("policy is valid: {}", plural(warnings, "warning"))
    }
}
