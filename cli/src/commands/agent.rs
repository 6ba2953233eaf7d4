//! `policyctl agent`: the daemon that keeps the policy in force on this machine
//! (`depfence::agent`), until SIGINT or SIGTERM.

use std::process::ExitCode;

use depfence::agent::AgentConfig;

use crate::args::{AgentArgs, Output};
use crate::error::CliError;

/// Runs the agent with the command line's settings.
pub fn run(args: AgentArgs) -> Result<ExitCode, CliError> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEPFENCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        Output::Json => builder.json().init(),
        Output::Text => builder.init(),
    }
    let metrics_listen = match args.metrics_listen.as_str() {
        "none" => None,
        text => Some(text.parse().map_err(|_| {
            CliError::Usage(format!("--metrics-listen: `{text}` is not an address like 127.0.0.1:9477"))
        })?),
    };
    let mut config = AgentConfig::new(args.policy.path()?.to_owned(), args.environment);
    config.metrics_listen = metrics_listen;
    config.pin_root = args.pin_root;
    config.state_dir = args.state_dir;
    config.control_socket = args.socket.socket;
    config.gate = depfence::promote::GateConfig {
        window: args.promote_window,
        min_connections: args.promote_min_connections,
        min_observed: args.promote_min_observed,
    };
    config.dns = args.dns.settings();
    config.lock_wait = args.lock_wait;
    config.reload_settle = args.reload_settle;
    config.takeover = args.takeover;
    config.cgroup_root = args.cgroup_root.map(|r| r.strip_prefix("/").map_or(r.clone(), std::path::Path::to_owned));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("depfence-agent")
        .build()
        .map_err(|source| CliError::Io { context: "starting the runtime".into(), source })?;
    runtime.block_on(depfence::agent::run(config, shutdown_signal())).map_err(|error| {
        tracing::error!("{error}");
        CliError::AgentRun(error)
    })?;
    Ok(ExitCode::SUCCESS)
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
