//! `policyctl agent` and the commands that talk to a running agent over its control socket:
//! `status`, `events`, `reload`, `explain --live`, `apply --candidate`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use depfence::agent::control::{self, AgentStatus, ClientError, Request};
use depfence::agent::telemetry::EventRecord;
use depfence::agent::{AgentConfig, AgentError};

use crate::args::Output;
use crate::output::CliError;

/// Exit code when the agent cannot start because of its configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn client_error(error: ClientError) -> CliError {
    CliError::Usage(error.to_string())
}

fn ask(socket: &Path, request: &Request) -> Result<serde_json::Value, CliError> {
    control::request(socket, request).map_err(client_error)
}

/// Runs the agent until SIGINT or SIGTERM.
#[allow(clippy::too_many_arguments, reason = "the agent's command-line options")]
pub fn run_agent(
    gate: depfence::promote::GateConfig,
    policy: &Path,
    environment: String,
    metrics_listen: &str,
    pin_root: PathBuf,
    state_dir: PathBuf,
    socket: PathBuf,
    log_format: Output,
    dns: Option<depfence::agent::DnsSettings>,
) -> Result<ExitCode, CliError> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEPFENCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log_format {
        Output::Json => builder.json().init(),
        Output::Text => builder.init(),
    }
    let metrics_listen = if metrics_listen == "none" {
        None
    } else {
        Some(metrics_listen.parse().map_err(|_| {
            CliError::Usage(format!("--metrics-listen: `{metrics_listen}` is not an address like 127.0.0.1:9477"))
        })?)
    };
    let mut config = AgentConfig::new(policy.to_owned(), environment);
    config.metrics_listen = metrics_listen;
    config.pin_root = pin_root;
    config.state_dir = state_dir;
    config.control_socket = socket;
    config.gate = gate;
    config.dns = dns;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("depfence-agent")
        .build()
        .map_err(|source| CliError::Io { context: "starting the runtime".into(), source })?;
    let result = runtime.block_on(depfence::agent::run(config, shutdown_signal()));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error @ AgentError::UnknownEnvironment { .. }) => {
            tracing::error!("{error}");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
        Err(error) => {
            tracing::error!("{error}");
            Err(CliError::Usage(format!("agent: {error}")))
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// `policyctl status` from the agent.
pub fn status(socket: &Path, output: Output) -> Result<ExitCode, CliError> {
    let body = ask(socket, &Request::Status)?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&body).map_err(std::io::Error::from)?);
        return Ok(ExitCode::SUCCESS);
    }
    let status: AgentStatus = serde_json::from_value(body).map_err(std::io::Error::from)?;
    print!("{}", render_status(&status));
    Ok(ExitCode::SUCCESS)
}

fn render_status(s: &AgentStatus) -> String {
    let mut out = String::new();
    let hash = s.policy_hash.as_deref().map_or("none", |h| h.get(..12).unwrap_or(h));
    let _ = writeln!(
        out,
        "agent: environment {}  policy {}  generation {}  hash {hash}{}",
        s.environment,
        s.policy.display(),
        s.generation,
        if s.ready { "" } else { "  (no policy applied yet)" }
    );
    if let Some(r) = &s.last_reload {
        let _ = writeln!(
            out,
            "last reload: {} {}",
            r.time,
            if r.ok { "ok" } else { "FAILED (the last good policy stays in force)" }
        );
        for e in &r.errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    if let Some(c) = &s.candidate {
        let _ = writeln!(out, "candidate: {} (hash {})", c.path.display(), c.hash.get(..12).unwrap_or(&c.hash));
    }
    if let Some(d) = &s.dns {
        let upstreams: Vec<String> = d.upstreams.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "dns proxy: port {} on loopback, upstream {}, {} address(es) allowed by name",
            d.port,
            upstreams.join(", "),
            d.admitted
        );
    }
    if s.services.is_empty() {
        let _ = writeln!(out, "no service of the policy has a cgroup on this machine");
    }
    for svc in &s.services {
        let _ = writeln!(out, "\n{}  {}  (since {})", svc.name, svc.mode, svc.mode_since);
        let _ = writeln!(
            out,
            "  connections: {} allowed, {} would-reject, {} rejected{}",
            svc.counts.allowed,
            svc.counts.would_reject,
            svc.counts.rejected,
            if s.candidate.is_some() {
                format!(", {} candidate would-reject", svc.counts.candidate_would_reject)
            } else {
                String::new()
            }
        );
        let _ = writeln!(out, "  cgroups: {}", svc.cgroups.join(", "));
        if let Some(e) = &svc.last_would_reject {
            let _ = writeln!(
                out,
                "  last would-reject: {} {} by {} (pid {}) at {}",
                e.subject(),
                e.verdict,
                e.comm,
                e.pid,
                e.time
            );
        }
    }
    if s.services_without_cgroups > 0 {
        let _ = writeln!(out, "\n{} other service(s) of the policy have no cgroup here", s.services_without_cgroups);
    }
    if s.events_dropped > 0 {
        let _ = writeln!(out, "events dropped (ring buffer full): {}", s.events_dropped);
    }
    out
}

/// `policyctl reload`.
pub fn reload(socket: &Path) -> Result<ExitCode, CliError> {
    match control::request(socket, &Request::Reload) {
        Ok(body) => {
            let generation = body.get("generation").and_then(serde_json::Value::as_u64).unwrap_or(0);
            eprintln!("policy applied (generation {generation})");
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Refused(message)) => {
            eprintln!("{message}");
            Ok(ExitCode::from(crate::output::EXIT_INVALID))
        }
        Err(e) => Err(client_error(e)),
    }
}

/// `policyctl events`.
pub fn events(socket: &Path, follow: bool, json: bool, recent: usize) -> Result<ExitCode, CliError> {
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    control::follow_events(socket, recent, follow, |event| {
        let line = if json { serde_json::to_string(&event).unwrap_or_default() } else { render_event(&event) };
        if let Err(e) = std::io::Write::write_all(&mut stdout, format!("{line}\n").as_bytes())
            .and_then(|()| std::io::Write::flush(&mut stdout))
        {
            failed = Some(e);
            return false;
        }
        true
    })
    .map_err(client_error)?;
    match failed {
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Some(e) => Err(e.into()),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn render_event(e: &EventRecord) -> String {
    format!(
        "{}  {:<22} {:<14} {:<28} by {} (pid {}) in {}",
        e.time,
        e.verdict,
        e.service.as_deref().unwrap_or("?"),
        e.subject(),
        e.comm,
        e.pid,
        e.cgroup.as_deref().unwrap_or("?")
    )
}

/// `policyctl explain --live`.
pub fn explain(socket: &Path, from: &str, to: &str, output: Output) -> Result<ExitCode, CliError> {
    let body = ask(socket, &Request::Explain { from: from.to_owned(), to: to.to_owned() })?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&body).map_err(std::io::Error::from)?);
        return Ok(ExitCode::SUCCESS);
    }
    let field = |k: &str| body.get(k).and_then(serde_json::Value::as_str).unwrap_or("").to_owned();
    println!(
        "{from} → {to} in {} (generation {}, live): {}",
        field("environment"),
        body.get("generation").and_then(serde_json::Value::as_u64).unwrap_or(0),
        field("verdict")
    );
    println!("  mode {}", field("mode"));
    match body.get("rule").and_then(serde_json::Value::as_str) {
        Some(rule) => println!("  allowed by {rule}\n  written at {}", field("position")),
        None => println!("  no allow rule matches"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `policyctl apply --candidate PATH` / `--activate` / `--drop`.
pub fn apply_candidate(socket: &Path, candidate: Option<PathBuf>, activate: bool) -> Result<ExitCode, CliError> {
    let request = match candidate {
        Some(path) => Request::ApplyCandidate { path: std::path::absolute(&path)? },
        None if activate => Request::ActivateCandidate,
        None => Request::DropCandidate,
    };
    match control::request(socket, &request) {
        Ok(body) => {
            let status: AgentStatus = serde_json::from_value(body).map_err(std::io::Error::from)?;
            match &status.candidate {
                Some(c) => eprintln!(
                    "candidate {} is evaluated in shadow; `policyctl status` shows what it would reject",
                    c.path.display()
                ),
                None if activate => eprintln!("the candidate is now the policy (generation {})", status.generation),
                None => eprintln!("no candidate"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Refused(message)) => {
            eprintln!("{message}");
            Ok(ExitCode::from(crate::output::EXIT_INVALID))
        }
        Err(e) => Err(client_error(e)),
    }
}

/// `policyctl promote` / `demote` (a [`Request::Promote`]).
pub fn change_mode(socket: &Path, request: Request) -> Result<ExitCode, CliError> {
    let Request::Promote { service, mode, dry_run, .. } = &request else {
        return Err(CliError::Usage("not a mode change".into()));
    };
    let (service, dry_run) = (service.clone(), *dry_run);
    let verb = if *mode == depfence::policy::Mode::Enforce { "promoted" } else { "demoted" };
    match control::request(socket, &request) {
        Ok(body) if dry_run => {
            let evidence = body.get("evidence").cloned().unwrap_or_default();
            let count = |k: &str| evidence.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            eprintln!(
                "{service} may be promoted: {} connections, none would-rejected, in the last {}s",
                count("allowed"),
                count("window_secs")
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(body) => {
            let outcome = body.get("outcome").cloned().unwrap_or_default();
            let changed = outcome.get("changed").and_then(serde_json::Value::as_bool).unwrap_or(false);
            let file = outcome.get("file").and_then(serde_json::Value::as_str).unwrap_or("?");
            if !changed {
                eprintln!("{service} already has that mode; {file} is unchanged");
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(overridden) = outcome.get("overridden").and_then(serde_json::Value::as_str) {
                eprintln!("warning: forced past the evidence gate: {overridden}");
            }
            print!("{}", outcome.get("diff").and_then(serde_json::Value::as_str).unwrap_or(""));
            let generation = body.get("generation").and_then(serde_json::Value::as_u64).unwrap_or(0);
            eprintln!("{service} {verb}: {file} rewritten, applied as generation {generation}");
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Refused(message)) => {
            eprintln!("{message}");
            Ok(ExitCode::from(crate::output::EXIT_INVALID))
        }
        Err(e) => Err(client_error(e)),
    }
}
