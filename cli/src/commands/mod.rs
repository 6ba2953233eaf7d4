//! One module per subcommand; each returns the process exit code. This module dispatches, and
//! holds what the policy-reading commands share: reading a policy through the engine's compile
//! entry point and printing its diagnostics.

mod agent;
mod apply;
mod bootstrap_order;
mod check;
mod check_deploy;
mod client;
mod compile;
mod completions;
mod dependents;
mod deploy_order;
mod diff;
mod events;
mod explain;
mod export;
mod graph;
mod learn;
mod promote;
mod reload;
mod run;
mod status;
mod status_kernel;
mod unused;

use std::path::Path;
use std::process::ExitCode;

use depfence::compile::{self as engine, Analysis, Checked, CompileError, Compiled, Graph};
use depfence::snapshot::Snapshot;

use crate::args::{Cli, Command, ErrorFormat};
use crate::error::{CliError, EXIT_INVALID};
use crate::output::print_diagnostics;

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let format = cli.error_format;
    match cli.command {
        Command::Check { policy, deny_warnings, environment } => {
            check::run(policy.path()?, format, deny_warnings, environment.as_deref())
        }
        Command::Compile { policy, output, format: encoding } => {
            compile::run(policy.path()?, format, &output, encoding)
        }
        Command::Graph { policy, format: language, environment } => {
            graph::run(policy.path()?, format, language, environment.as_deref())
        }
        Command::Explain { live: true, from, to, output, socket, .. } => {
            explain::live(&socket.socket, &from, &to, output)
        }
        Command::Explain { policy, from, to, environment, output, .. } => {
            explain::offline(policy.path()?, format, &from, &to, environment.as_deref(), output)
        }
        Command::BootstrapOrder { policy, output, environment } => {
            bootstrap_order::run(policy.path()?, format, output, environment.as_deref())
        }
        Command::CheckDeploy { deploy, sets } => check_deploy::run(&deploy, &sets, format),
        Command::DeployOrder { deploy, sets } => deploy_order::run(&deploy, &sets, format),
        Command::Run { policy, service, environment, mode, pass_fds, command } => {
            run::run(policy.path()?, format, &service, environment.as_deref(), mode, &pass_fds, &command)
        }
        Command::Status { kernel, pins, socket, output } => {
            if kernel || pins.is_some() || !socket.socket.exists() {
                status_kernel::run(pins.as_deref(), output)
            } else {
                status::run(&socket.socket, output)
            }
        }
        Command::Agent(args) => agent::run(args),
        Command::Reload { socket } => reload::run(&socket.socket),
        Command::Promote { service, enforce: _, environment, dry_run, fleet, .. } if fleet.prometheus.is_some() => {
            promote::fleet(&service, environment.as_deref(), dry_run, &fleet, format)
        }
        Command::Promote { service, enforce: _, environment, force, reason, dry_run, socket, fleet: _ } => {
            promote::promote(&socket.socket, service, environment, force, reason, dry_run)
        }
        Command::Demote { service, environment, reason, socket } => {
            promote::demote(&socket.socket, service, environment, reason)
        }
        Command::Events { follow, json, recent, socket } => events::run(&socket.socket, follow, json, recent),
        Command::Apply { candidate, drop: _, activate, socket } => apply::run(&socket.socket, candidate, activate),
        Command::Diff { old, new, output } => diff::run(&old, &new, format, output),
        Command::Learn { services, policy, window, environment, write, prometheus, agent, output, socket } => {
            learn::run(&learn::Options {
                services,
                policy,
                window,
                environment,
                write,
                prometheus,
                output,
                socket: agent.unwrap_or(socket.socket),
            })
        }
        Command::Unused { window, prometheus, policy, environment, agent, output, socket } => {
            let source = match (prometheus, policy) {
                (Some(url), Some(policy)) => unused::Source::Prometheus { url, policy, environment },
                _ => unused::Source::Agent(agent.unwrap_or(socket.socket)),
            };
            unused::run(&source, window, output, format)
        }
        Command::Dependents { service, policy, transitive, environment, output } => {
            dependents::run(policy.path()?, format, &service, transitive, environment.as_deref(), output)
        }
        Command::Export { policy, sqlite, environments, force, deployed, agent, prometheus, window } => {
            export::run(&export::Options {
                policy: policy.path()?.to_owned(),
                sqlite,
                environments,
                force,
                deployed,
                agent,
                prometheus,
                window,
                format,
            })
        }
        Command::Completions { shell } => completions::run(shell),
    }
}

/// Exit code 1: the policy is invalid (its diagnostics were printed).
fn invalid() -> ExitCode {
    ExitCode::from(EXIT_INVALID)
}

/// Which diagnostics a command prints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Show {
    /// Errors and warnings (`check`).
    All,
    /// Only syntax errors, which stop the analysis (`graph` draws a broken policy).
    SyntaxOnly,
}

/// Reads and analyzes the policy, printing its diagnostics as `show` says. None when the
/// policy cannot be analyzed (its syntax errors were printed).
fn checked(path: &Path, format: ErrorFormat, show: Show) -> Result<Option<Checked>, CliError> {
    let checked = engine::check_path(path)?;
    if checked.analysis.is_none() || show == Show::All {
        print_diagnostics(format, checked.sources(), checked.diagnostics())?;
    }
    Ok(checked.analysis.is_some().then_some(checked))
}

/// Compiles the policy; prints every diagnostic and returns None when it is invalid.
fn compiled(path: &Path, format: ErrorFormat) -> Result<Option<Compiled>, CliError> {
    match engine::compile_path(path) {
        Ok(compiled) => Ok(Some(compiled)),
        Err(CompileError::Invalid { sources, diagnostics }) => {
            print_diagnostics(format, &sources, &diagnostics)?;
            Ok(None)
        }
        Err(CompileError::Load(e)) => Err(e.into()),
        Err(e) => Err(CliError::Compile(e)),
    }
}

/// The index of the environment a command judges: the one asked for, or the policy's only one.
fn environment_index(environments: &[String], asked: Option<&str>) -> Result<usize, CliError> {
    let known = || environments.join(", ");
    match asked {
        Some(name) => environments
            .iter()
            .position(|e| e == name)
            .ok_or_else(|| CliError::Usage(format!("unknown environment `{name}` (the policy has: {})", known()))),
        None if environments.len() == 1 => Ok(0),
        None => Err(CliError::Usage(format!(
            "the policy has several environments ({}); choose one with --environment",
            known()
        ))),
    }
}

/// The dependency graph a command judges: the asked environment's, or the one graph every
/// environment shares. Says on stderr which environments it is the graph of.
fn judged_graph<'a>(analysis: &'a Analysis, asked: Option<&str>) -> Result<&'a Graph, CliError> {
    let graph = match (asked, analysis.graphs.as_slice()) {
        (None, [only]) => Some(only),
        (None, _) => {
            let groups: Vec<String> = analysis.graphs.iter().map(|g| g.environments.join(", ")).collect();
            return Err(CliError::Usage(format!(
                "the environments' dependency graphs differ ({}); choose one with --environment",
                groups.join(" | ")
            )));
        }
        (Some(_), _) => analysis.graph(environment_index(&analysis.environments, asked)?),
    };
    let graph = graph.ok_or_else(|| CliError::Usage("the policy has no dependency graph".into()))?;
    match asked {
        Some(name) if graph.environments.len() > 1 => {
            eprintln!("judged: environment {name} (the same graph in {})", graph.environments.join(", "))
        }
        Some(name) => eprintln!("judged: environment {name}"),
        None => eprintln!("{}", judged_text(&graph.environments)),
    }
    Ok(graph)
}

/// `judged: environment prod` / `judged: environments prod, qa`.
fn judged_text(environments: &[String]) -> String {
    let noun = if environments.len() == 1 { "environment" } else { "environments" };
    format!("judged: {noun} {}", environments.join(", "))
}

/// `N address rules`, or per environment when they differ: `address rules: prod 3, qa 4`.
fn address_rules_clause(snapshot: &Snapshot) -> String {
    let counts: Vec<(String, usize)> = (0..snapshot.environments().len())
        .filter_map(|e| Some((snapshot.environments().get(e)?.name.clone(), snapshot.net_rule_count(e))))
        .collect();
    match counts.as_slice() {
        [(_, n), rest @ ..] if rest.iter().all(|(_, m)| m == n) => format!("{n} address rules"),
        _ => {
            let each: Vec<String> = counts.iter().map(|(e, n)| format!("{e} {n}")).collect();
            format!("address rules {}", each.join(", "))
        }
    }
}

/// `, N rpc rules (M services)` for the summaries of `check` and `compile`; empty for a policy
/// without `rpc_allow`, whose summary stays as it was.
fn rpc_rules_clause(snapshot: &Snapshot) -> String {
    let rules = snapshot.rpc_rule_count();
    if rules == 0 {
        return String::new();
    }
    let callers = snapshot.services().iter().filter(|s| !s.rpc_rules.is_empty()).count();
    let services = if callers == 1 { "service" } else { "services" };
    format!(", {rules} rpc rules ({callers} {services})")
}
