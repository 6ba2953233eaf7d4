//! `policyctl status` with an agent running: its services, their modes, counters and last
//! would-reject (`status_kernel` shows the kernel's pinned state instead).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use depfence::agent::control::{AgentStatus, Request};

use super::client::ask_for;
use crate::args::Output;
use crate::error::CliError;

/// Prints the agent's status.
pub fn run(socket: &Path, output: Output) -> Result<ExitCode, CliError> {
    let status: AgentStatus = ask_for(socket, &Request::Status)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status).map_err(std::io::Error::from)?),
        Output::Text => print!("{}", render_status(&status)),
    }
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
                e.verdict.as_str(),
                e.comm,
                e.pid,
                e.time
            );
        }
        if !svc.rules.is_empty() {
            let _ = writeln!(out, "  rule hits since the agent started:");
            for rule in &svc.rules {
                let _ = writeln!(out, "    {:>10}  {}", rule.hits, rule.rule);
            }
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
