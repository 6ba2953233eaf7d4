//! `policyctl export --sqlite`: the policy, its dependency graph and the observed traffic as a
//! SQLite database (`depfence::export`, schema in docs/export-schema.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use depfence::agent::control::{AgentStatus, Request};
use depfence::compile::CompileError;
use depfence::export::{Evidence, Export, ExportError, Source, write_sqlite};
use depfence::learn::{Observed, observed_in_fleet};
use depfence::promote::prometheus::{Auth, Prometheus};

use super::client::ask_for;
use super::invalid;
use crate::args::ErrorFormat;
use crate::error::CliError;
use crate::output::print_diagnostics;

/// What `export` was asked.
pub struct Options {
    /// The policy.
    pub policy: PathBuf,
    /// The database file.
    pub sqlite: PathBuf,
    /// Only these environments (empty: every one).
    pub environments: Vec<String>,
    /// Replace an existing file.
    pub force: bool,
    /// Add the agent's evidence, from this control socket.
    pub agent: Option<PathBuf>,
    /// Add the fleet's evidence, from this Prometheus.
    pub prometheus: Option<String>,
    /// The window of evidence.
    pub window: Duration,
    /// How to print policy problems.
    pub format: ErrorFormat,
}

/// Compiles the policy, gathers the evidence asked for, writes the database.
pub fn run(options: &Options) -> Result<ExitCode, CliError> {
    let checked = depfence::compile::check_path(&options.policy)?;
    let policy = checked.parsed.policy.clone();
    let compiled = match checked.freeze() {
        Ok(compiled) => compiled,
        Err(CompileError::Invalid { sources, diagnostics }) => {
            print_diagnostics(options.format, &sources, &diagnostics)?;
            return Ok(invalid());
        }
        Err(CompileError::Load(e)) => return Err(e.into()),
        Err(e) => return Err(CliError::Compile(e)),
    };
    let exported: Vec<String> = if options.environments.is_empty() {
        compiled.analysis.environments.clone()
    } else {
        options.environments.clone()
    };
    let mut evidence = Vec::new();
    if let Some(url) = &options.prometheus {
        let auth = std::env::var("DEPFENCE_PROMETHEUS_TOKEN").map_or(Auth::None, Auth::Bearer);
        let prometheus = Prometheus::new(url, auth, Duration::from_secs(10));
        let services = policy.services.iter().map(|s| s.name.value.clone()).collect();
        for environment in &exported {
            if compiled.analysis.environment_index(environment).is_none() {
                continue; // the export refuses it, naming the environments
            }
            let observed =
                observed_in_fleet(&prometheus, environment, options.window, std::time::SystemTime::now(), &services)
                    .map_err(|e| CliError::Usage(format!("Prometheus: {e}")))?;
            evidence.push(Evidence {
                environment: environment.clone(),
                source: Source::Prometheus,
                window: options.window,
                observed,
            });
        }
    } else if let Some(socket) = &options.agent {
        let environment = ask_for::<AgentStatus>(socket, &Request::Status)?.environment;
        let observed: Vec<Observed> = ask_for(socket, &Request::Observed { window_secs: options.window.as_secs() })?;
        if !exported.contains(&environment) {
            eprintln!(
                "note: the agent runs in environment `{environment}`, which is not exported: no observed traffic"
            );
        }
        evidence.push(Evidence { environment, source: Source::Agent, window: options.window, observed });
    }
    let name = policy_name(&options.policy);
    let export =
        Export { policy: &policy, compiled: &compiled, name, environments: options.environments.clone(), evidence };
    let summary = write_sqlite(&options.sqlite, &export, options.force).map_err(|e| match e {
        ExportError::Exists(_) | ExportError::UnknownEnvironment { .. } => CliError::Usage(e.to_string()),
        ExportError::Io { path, source } => CliError::Io { context: format!("writing `{}`", path.display()), source },
        other => CliError::Io { context: "writing the export".into(), source: std::io::Error::other(other) },
    })?;
    eprintln!(
        "wrote {}: {} services, {} graph edges, {} rules, {} observed destinations in {} environment(s)",
        options.sqlite.display(),
        summary.services,
        summary.service_edges,
        summary.dependencies,
        summary.observed_edges,
        summary.environments
    );
    Ok(ExitCode::SUCCESS)
}

/// The policy's name: its directory's, or its file's without `.toml`.
fn policy_name(path: &std::path::Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map_or_else(|| "policy".to_owned(), |n| n.to_string_lossy().into_owned())
}
