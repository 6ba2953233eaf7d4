//! `policyctl unused`: the declared dependencies and allow rules nothing used in a window, from
//! the local agent's rule hits or the fleet's (`depfence::usage`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use depfence::agent::control::Request;
use depfence::promote::prometheus::{Auth, Prometheus};
use depfence::timefmt::Human;
use depfence::usage::{Usage, usage_in_fleet};

use super::client::ask_for;
use crate::args::{ErrorFormat, Output};
use crate::error::{CliError, EXIT_UNUSED};

/// Where the hits come from.
pub enum Source {
    /// The local agent, at this control socket.
    Agent(PathBuf),
    /// The fleet's Prometheus, judged against a policy in an environment.
    Prometheus {
        /// Its URL.
        url: String,
        /// The policy.
        policy: PathBuf,
        /// The environment (None: the policy's only one).
        environment: Option<String>,
    },
}

/// Asks for the use of every declared dependency, prints what was unused.
pub fn run(source: &Source, window: Duration, output: Output, format: ErrorFormat) -> Result<ExitCode, CliError> {
    let usage: Usage = match source {
        Source::Agent(socket) => ask_for(socket, &Request::Usage { window_secs: window.as_secs() })?,
        Source::Prometheus { url, policy, environment } => {
            let Some(compiled) = super::compiled(policy, format)? else { return Ok(super::invalid()) };
            let snapshot = &compiled.snapshot;
            let names: Vec<String> = snapshot.environments().iter().map(|e| e.name.clone()).collect();
            let env = super::environment_index(&names, environment.as_deref())?;
            let auth = std::env::var("DEPFENCE_PROMETHEUS_TOKEN").map_or(Auth::None, Auth::Bearer);
            let prometheus = Prometheus::new(url, auth, Duration::from_secs(10));
            let environment = names.get(env).cloned().unwrap_or_default();
            usage_in_fleet(&prometheus, snapshot, env, &environment, window, SystemTime::now())
                .map_err(|e| CliError::Usage(format!("Prometheus: {e}")))?
        }
    };
    let unused = usage.unused();
    match output {
        Output::Json => {
            let document = serde_json::json!({ "usage": usage, "unused": unused });
            println!("{}", serde_json::to_string_pretty(&document).map_err(std::io::Error::from)?);
        }
        Output::Text => print!("{}", text(&usage)),
    }
    Ok(if unused.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNUSED) })
}

/// Unused dependencies, then unused rules of used ones, then what the answer may miss.
fn text(usage: &Usage) -> String {
    let unused = usage.unused();
    let window = Human(usage.window);
    let mut out = String::new();
    if unused.is_empty() {
        out.push_str(&format!("every declared dependency was used in the last {window} ({})\n", usage.environment));
    }
    for (service, backend) in &unused.dependencies {
        out.push_str(&format!("unused dependency: `{service}` -> `{backend}` (no hit in the last {window})\n"));
        let rules = usage
            .services
            .iter()
            .filter(|s| &s.service == service)
            .flat_map(|s| &s.backends)
            .filter(|b| &b.backend == backend)
            .flat_map(|b| &b.rules);
        for rule in rules {
            out.push_str(&format!("  rule {}{}\n", rule.rule, at(&rule.position)));
        }
    }
    for (service, rule, position) in &unused.rules {
        out.push_str(&format!("unused rule of `{service}`: {rule}{}\n", at(position)));
    }
    for (service, observed) in &unused.partial {
        out.push_str(&format!(
            "note: `{service}` was observed for only {} of the {window} window; hits before that are not known\n",
            Human(*observed)
        ));
    }
    out
}

fn at(position: &str) -> String {
    if position.is_empty() { String::new() } else { format!(" (at {position})") }
}
