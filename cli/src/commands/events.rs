//! `policyctl events`: the agent's recent events (would-rejects and rejections, with the
//! process), and with `--follow` every new one as it comes.

use std::path::Path;
use std::process::ExitCode;

use depfence::agent::control;
use depfence::agent::telemetry::EventRecord;

use crate::error::CliError;

/// Prints the agent's recent events, and with `follow` every new one.
pub fn run(socket: &Path, follow: bool, json: bool, recent: usize) -> Result<ExitCode, CliError> {
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
    })?;
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
        e.verdict.as_str(),
        e.service.as_deref().unwrap_or("?"),
        e.subject(),
        e.comm,
        e.pid,
        e.cgroup.as_deref().unwrap_or("?")
    )
}
