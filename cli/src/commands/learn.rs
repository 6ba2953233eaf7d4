//! `policyctl learn`: the allow entries the agent's audit evidence asks for, checked against the
//! dependency model (`depfence::learn`), as a diff to review or written into the policy files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use depfence::agent::control::{AgentStatus, Request};
use depfence::durable::{Access, replace};
use depfence::learn::{Learned, Observed, learn, observed_in_fleet};
use depfence::policy::edit::line_diff;
use depfence::promote::prometheus::{Auth, Prometheus};

use super::client::ask_for;
use crate::args::Output;
use crate::error::{CliError, EXIT_NEEDS_DECISION, EXIT_PROPOSALS};

/// What `learn` was asked.
pub struct Options {
    /// Only these services (empty: every one).
    pub services: Vec<String>,
    /// The policy checkout.
    pub policy: PathBuf,
    /// The window of evidence.
    pub window: Duration,
    /// The environment (None: the agent's).
    pub environment: Option<String>,
    /// Write instead of printing a diff.
    pub write: bool,
    /// Read the fleet's evidence from this Prometheus instead of the agent.
    pub prometheus: Option<String>,
    /// Output format.
    pub output: Output,
    /// The agent's control socket.
    pub socket: PathBuf,
}

/// Reads the evidence from the agent, proposes, prints or writes.
pub fn run(options: &Options) -> Result<ExitCode, CliError> {
    let parsed = depfence::policy::load(&options.policy)?;
    let files: Vec<(String, String)> =
        parsed.policy.sources.files().iter().map(|f| (f.name().to_owned(), f.text().to_owned())).collect();
    let (environment, mut observed) = match &options.prometheus {
        Some(url) => {
            let declared: Vec<String> = parsed.policy.declared_environments().into_iter().map(|e| e.name).collect();
            let environment = match &options.environment {
                Some(env) => env.clone(),
                None => declared.get(super::environment_index(&declared, None)?).cloned().unwrap_or_default(),
            };
            let auth = std::env::var("DEPFENCE_PROMETHEUS_TOKEN").map_or(Auth::None, Auth::Bearer);
            let prometheus = Prometheus::new(url, auth, Duration::from_secs(10));
            let services = parsed.policy.services.iter().map(|s| s.name.value.clone()).collect();
            let observed =
                observed_in_fleet(&prometheus, &environment, options.window, std::time::SystemTime::now(), &services)
                    .map_err(|e| CliError::Usage(format!("Prometheus: {e}")))?;
            (environment, observed)
        }
        None => {
            let environment = match &options.environment {
                Some(env) => env.clone(),
                None => ask_for::<AgentStatus>(&options.socket, &Request::Status)?.environment,
            };
            let observed: Vec<Observed> =
                ask_for(&options.socket, &Request::Observed { window_secs: options.window.as_secs() })?;
            (environment, observed)
        }
    };
    if !options.services.is_empty() {
        observed.retain(|o| options.services.contains(&o.service));
    }
    let learned = learn(files, &environment, observed).map_err(|e| CliError::Usage(e.to_string()))?;
    if options.write {
        for (name, _, new) in &learned.changes {
            replace(std::path::Path::new(name), new.as_bytes(), Access::KeepExisting)
                .map_err(|source| CliError::Io { context: format!("writing `{name}`"), source })?;
        }
    }
    match options.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&learned).map_err(std::io::Error::from)?),
        Output::Text => print!("{}", text(&learned, options.write)),
    }
    Ok(if !learned.needs_decision.is_empty() {
        ExitCode::from(EXIT_NEEDS_DECISION)
    } else if !learned.proposals.is_empty() {
        ExitCode::from(EXIT_PROPOSALS)
    } else {
        ExitCode::SUCCESS
    })
}

fn text(learned: &Learned, written: bool) -> String {
    let mut out = String::new();
    if learned.proposals.is_empty() && learned.needs_decision.is_empty() {
        out.push_str(&format!(
            "nothing to propose in {}: every would-reject is allowed already, or there is none\n",
            learned.environment
        ));
    }
    for p in &learned.proposals {
        let note =
            if p.outside_every_service { " (an address no declared service owns: declare its owner?)" } else { "" };
        out.push_str(&format!("propose for `{}`: {}{note}\n", p.service, p.entry.toml(&p.reason())));
    }
    for n in &learned.needs_decision {
        out.push_str(&format!(
            "needs a decision for `{}`: {}\n",
            n.proposal.service,
            n.proposal.entry.toml(&n.proposal.reason())
        ));
        for problem in &n.problems {
            out.push_str(&format!("  {problem}\n"));
        }
    }
    for (name, old, new) in &learned.changes {
        if written {
            out.push_str(&format!("wrote {name}\n"));
        } else {
            out.push_str(&line_diff(name, old, new));
        }
    }
    out
}
