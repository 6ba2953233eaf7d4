//! `policyctl check-deploy`: may a planned deploy proceed under the policy's version
//! requirements? The engine (`depfence::deploy`) checks the states; this prints them.

use std::io::Write as _;
use std::process::ExitCode;

use depfence::compile::{VersionRequirement, check_path};
use depfence::deploy::{Plan, State, check_deploy, current_state, parse_deployed};
use depfence::diag::Sources;
use depfence::problem::closest;

use super::{environment_index, invalid};
use crate::args::{DeployArgs, ErrorFormat, Output};
use crate::error::{CliError, EXIT_UNSAFE_DEPLOY};
use crate::output::{print_diagnostics, print_diagnostics_with};

/// What both deploy commands read: the policy's requirements and sources, the environment, what
/// runs now and the plan.
pub(super) struct Inputs {
    pub requirements: Vec<VersionRequirement>,
    pub sources: Sources,
    pub environment: String,
    pub current: State,
    pub plan: Plan,
}

/// Reads the policy (invalid: its diagnostics are printed, None), the manifest (the same) and
/// the plan (a bad `--set` is a usage error). Warnings of the manifest are printed.
pub(super) fn inputs(args: &DeployArgs, sets: &[String], format: ErrorFormat) -> Result<Option<Inputs>, CliError> {
    let checked = check_path(args.policy.path()?)?;
    let Some(analysis) = checked.analysis.as_ref().filter(|a| !a.diagnostics.has_errors()) else {
        print_diagnostics(format, checked.sources(), checked.diagnostics())?;
        return Ok(None);
    };
    let environment = environment_index(&analysis.environments, Some(&args.environment))
        .map(|e| analysis.environments.get(e).cloned().unwrap_or_default())?;
    let known: Vec<&str> = analysis.nodes.iter().map(|n| n.name.as_str()).collect();

    let manifest = parse_deployed(&args.deployed)?;
    let mut diagnostics = manifest.diagnostics.clone();
    diagnostics.extend(manifest.deployed.unknown_services(known.iter().copied()));
    if diagnostics.has_errors() {
        print_diagnostics(format, &manifest.sources, &diagnostics)?;
        return Ok(None);
    }
    if !diagnostics.is_empty() && format != ErrorFormat::Json {
        print_diagnostics_with(format, &manifest.sources, &diagnostics, "the manifest has warnings")?;
    }

    let plan = Plan::parse(sets.iter().map(String::as_str)).map_err(|e| CliError::Usage(e.to_string()))?;
    for service in plan.changes.keys() {
        if !known.contains(&service.as_str()) {
            let hint =
                closest(service, known.iter().copied()).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default();
            return Err(CliError::Usage(format!("unknown service `{service}` in --set{hint}")));
        }
    }
    Ok(Some(Inputs {
        requirements: analysis.requirements.clone(),
        sources: checked.sources().clone(),
        environment,
        current: current_state(&manifest.deployed),
        plan,
    }))
}

/// `old -> new` for each change: `checkout 3.0.2 -> 3.1.0`.
pub(super) fn changes_text(inputs: &Inputs) -> String {
    let changes: Vec<String> = inputs
        .plan
        .changes
        .iter()
        .map(|(service, to)| {
            let from: Vec<String> =
                inputs.current.get(service).into_iter().flatten().map(ToString::to_string).collect();
            let from = if from.is_empty() { "(not deployed)".to_owned() } else { from.join(", ") };
            format!("{service} {from} -> {to}")
        })
        .collect();
    if changes.is_empty() { "no change".to_owned() } else { changes.join(", ") }
}

/// Checks the plan; exit 0 when safe, 12 when a requirement is broken.
pub fn run(args: &DeployArgs, sets: &[String], format: ErrorFormat) -> Result<ExitCode, CliError> {
    let Some(inputs) = inputs(args, sets, format)? else { return Ok(invalid()) };
    let result = check_deploy(&inputs.requirements, &inputs.environment, &inputs.current, &inputs.plan);
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, &result.to_json(&inputs.sources)).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        Output::Text => {
            let states: Vec<String> = result
                .states
                .iter()
                .map(|(kind, ok)| format!("{kind}: {}", if *ok { "ok" } else { "unsafe" }))
                .collect();
            let summary =
                format!("environment {}: {}; {}", inputs.environment, changes_text(&inputs), states.join(", "));
            print_diagnostics_with(
                format,
                &inputs.sources,
                &result.diagnostics(),
                &format!("the deploy is unsafe: {} requirement(s) unmet", result.violations.len()),
            )?;
            if format != ErrorFormat::Json {
                let verdict = if result.ok() { "safe" } else { "unsafe" };
                writeln!(out, "{verdict}: {summary}")?;
            }
        }
    }
    Ok(if result.ok() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNSAFE_DEPLOY) })
}
