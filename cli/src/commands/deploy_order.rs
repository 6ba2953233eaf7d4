//! `policyctl deploy-order`: the order in which to roll out planned changes so that every step
//! meets the version requirements; the engine (`depfence::deploy::deploy_order`) finds it.

use std::io::Write as _;
use std::process::ExitCode;

use depfence::deploy::{OrderError, deploy_order};

use super::check_deploy::{changes_text, inputs};
use super::invalid;
use crate::args::{DeployArgs, ErrorFormat, Output};
use crate::error::{CliError, EXIT_UNSAFE_DEPLOY};
use crate::output::print_diagnostics_with;

/// Prints the order; exit 0 with an order, 12 when none works.
pub fn run(args: &DeployArgs, sets: &[String], format: ErrorFormat) -> Result<ExitCode, CliError> {
    let Some(inputs) = inputs(args, sets, format)? else { return Ok(invalid()) };
    let result = deploy_order(&inputs.requirements, &inputs.environment, &inputs.current, &inputs.plan);
    let mut out = std::io::stdout().lock();
    match (&result, args.output) {
        (Ok(order), Output::Json) => {
            serde_json::to_writer_pretty(&mut out, &order.to_json()).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        (Ok(order), Output::Text) => {
            writeln!(out, "deploy order (environment {}):", order.environment)?;
            for (i, step) in order.steps.iter().enumerate() {
                let from: Vec<String> = step.from.iter().map(ToString::to_string).collect();
                let from = if from.is_empty() { "(not deployed)".to_owned() } else { from.join(", ") };
                writeln!(out, "  {}. {} {from} -> {}", i + 1, step.service, step.to)?;
            }
            if !order.already_unmet.is_empty() {
                eprintln!(
                    "note: {} requirement(s) are unmet already now; `policyctl check-deploy` shows them",
                    order.already_unmet.len()
                );
            }
        }
        (Err(error), Output::Json) => {
            let diagnostics: Vec<serde_json::Value> =
                error.diagnostics().iter().map(|d| d.to_json(&inputs.sources)).collect();
            let kind = match error {
                OrderError::Unsafe(_) => "unsafe",
                _ => "conflict",
            };
            let document = serde_json::json!({
                "ok": false,
                "environment": inputs.environment,
                "error": kind,
                "message": error.to_string(),
                "diagnostics": diagnostics,
            });
            serde_json::to_writer_pretty(&mut out, &document).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        (Err(error), Output::Text) => {
            print_diagnostics_with(format, &inputs.sources, &error.diagnostics(), &format!("no safe order: {error}"))?;
            if format != ErrorFormat::Json {
                writeln!(out, "no safe order: {} ({})", changes_text(&inputs), error)?;
            }
        }
    }
    Ok(if result.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNSAFE_DEPLOY) })
}
