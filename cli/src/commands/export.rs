//! `policyctl export --sqlite`: the policy, its dependency graph, the deployed versions and the
//! observed traffic as a SQLite database (`depfence::export`, schema in docs/export-schema.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use depfence::agent::control::{AgentStatus, Request};
use depfence::compile::CompileError;
use depfence::deploy::{ParsedDeployed, parse_deployed};
use depfence::export::{Evidence, Export, ExportError, Manifest, Source, write_sqlite};
use depfence::learn::{Observed, observed_in_fleet};
use depfence::promote::prometheus::{Auth, Prometheus};
use depfence::usage::{Usage, usage_in_fleet};

use super::client::ask_for;
use super::invalid;
use crate::args::ErrorFormat;
use crate::error::CliError;
use crate::output::{print_diagnostics, print_diagnostics_with};

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
    /// Deployed-versions manifests: `ENV=FILE`, or `FILE` when one environment is exported.
    pub deployed: Vec<String>,
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
    let Some(manifests) = manifests(options, &exported, &compiled)? else { return Ok(invalid()) };
    let mut evidence = Vec::new();
    if let Some(url) = &options.prometheus {
        let auth = std::env::var("DEPFENCE_PROMETHEUS_TOKEN").map_or(Auth::None, Auth::Bearer);
        let prometheus = Prometheus::new(url, auth, Duration::from_secs(10));
        let services = policy.services.iter().map(|s| s.name.value.clone()).collect();
        for environment in &exported {
            let Some(env) = compiled.snapshot.environment_index(environment) else {
                continue; // the export refuses it, naming the environments
            };
            let now = SystemTime::now();
            let fetch = |e| CliError::Usage(format!("Prometheus: {e}"));
            let observed =
                observed_in_fleet(&prometheus, environment, options.window, now, &services).map_err(fetch)?;
            let usage = usage_in_fleet(&prometheus, &compiled.snapshot, env, environment, options.window, now)
                .map_err(fetch)?;
            evidence.push(Evidence {
                environment: environment.clone(),
                source: Source::Prometheus,
                window: options.window,
                observed,
                usage: Some(usage),
            });
        }
    } else if let Some(socket) = &options.agent {
        let environment = ask_for::<AgentStatus>(socket, &Request::Status)?.environment;
        let window_secs = options.window.as_secs();
        let observed: Vec<Observed> = ask_for(socket, &Request::Observed { window_secs })?;
        let usage: Usage = ask_for(socket, &Request::Usage { window_secs })?;
        if !exported.contains(&environment) {
            eprintln!(
                "note: the agent runs in environment `{environment}`, which is not exported: no observed traffic"
            );
        }
        evidence.push(Evidence {
            environment,
            source: Source::Agent,
            window: options.window,
            observed,
            usage: Some(usage),
        });
    }
    let name = policy_name(&options.policy);
    let export = Export {
        policy: &policy,
        compiled: &compiled,
        name,
        environments: options.environments.clone(),
        evidence,
        deployed: manifests
            .iter()
            .map(|(environment, manifest)| Manifest { environment: environment.as_str(), manifest })
            .collect(),
    };
    let summary = write_sqlite(&options.sqlite, &export, options.force).map_err(|e| match e {
        ExportError::Exists(_)
        | ExportError::UnknownEnvironment { .. }
        | ExportError::NotExported(_)
        | ExportError::TwoManifests(_) => CliError::Usage(e.to_string()),
        ExportError::Io { path, source } => CliError::Io { context: format!("writing `{}`", path.display()), source },
        other => CliError::Io { context: "writing the export".into(), source: std::io::Error::other(other) },
    })?;
    eprintln!(
        "wrote {}: {} services, {} graph edges, {} rules, {} requirements, {} deployed versions, {} observed \
         destinations in {} environment(s)",
        options.sqlite.display(),
        summary.services,
        summary.service_edges,
        summary.dependencies,
        summary.requirements,
        summary.deployed_versions,
        summary.observed_edges,
        summary.environments
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads each `--deployed` manifest: (environment, manifest). None when one has errors (they
/// were printed, as `check-deploy` prints them); warnings (services the policy does not know,
/// left out of the export) are printed.
fn manifests(
    options: &Options,
    exported: &[String],
    compiled: &depfence::compile::Compiled,
) -> Result<Option<Vec<(String, ParsedDeployed)>>, CliError> {
    let known: Vec<&str> = compiled.snapshot.services().iter().map(|s| s.name.as_str()).collect();
    let mut manifests = Vec::new();
    for argument in &options.deployed {
        let (environment, file) = match (argument.split_once('='), exported) {
            (Some((environment, file)), _) => (environment.to_owned(), file),
            (None, [only]) => (only.clone(), argument.as_str()),
            (None, _) => {
                return Err(CliError::Usage(format!(
                    "`--deployed {argument}` names no environment; pass `--deployed ENV={argument}` (or export one \
                     environment with `-e ENV`)"
                )));
            }
        };
        let manifest = parse_deployed(std::path::Path::new(file))?;
        let mut diagnostics = manifest.diagnostics.clone();
        diagnostics.extend(manifest.deployed.unknown_services(known.iter().copied()));
        if diagnostics.has_errors() {
            print_diagnostics(options.format, &manifest.sources, &diagnostics)?;
            return Ok(None);
        }
        if !diagnostics.is_empty() && options.format != ErrorFormat::Json {
            print_diagnostics_with(options.format, &manifest.sources, &diagnostics, "the manifest has warnings")?;
        }
        manifests.push((environment, manifest));
    }
    Ok(Some(manifests))
}

/// The policy's name: its directory's, or its file's without `.toml`.
fn policy_name(path: &std::path::Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map_or_else(|| "policy".to_owned(), |n| n.to_string_lossy().into_owned())
}
