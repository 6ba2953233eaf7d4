//! Printing diagnostics, and the errors and exit codes of `policyctl`.

use std::io::Write;

use depfence::diag::{Diagnostics, Sources};
use miette::{GraphicalReportHandler, GraphicalTheme};

use crate::args::ErrorFormat;

/// Exit code for an invalid policy.
pub const EXIT_INVALID: u8 = 1;
/// Exit code for a usage error (clap uses it too).
pub const EXIT_USAGE: u8 = 2;

/// Failures that are not problems in the policy text.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The policy could not be read.
    #[error(transparent)]
    Load(#[from] depfence::policy::LoadError),
    /// Writing output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// An argument is not valid.
    #[error("{0}")]
    Usage(String),
    /// The snapshot could not be encoded.
    #[error(transparent)]
    Snapshot(#[from] depfence::snapshot::SnapshotError),
}

impl From<std::io::Error> for CliError {
    fn from(source: std::io::Error) -> Self {
        CliError::Io { context: "writing output".into(), source }
    }
}

/// A closed pipe (`policyctl graph | head`) is not an error.
pub fn is_broken_pipe(error: &CliError) -> bool {
    matches!(error, CliError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Prints diagnostics in the chosen format: human and plain to standard error, JSON to standard
/// output (a program reading it gets one document).
pub fn print_diagnostics(format: ErrorFormat, sources: &Sources, diagnostics: &Diagnostics) -> Result<(), CliError> {
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
            text.push_str(&summary(diagnostics));
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
