//! One function per subcommand; each returns the process exit code.

use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use depfence::agent::control::Request;
use depfence::compile::{self, Analysis, Compiled};
use depfence::diag::Diagnostics;
use depfence::policy::{self, Destination, Parsed};
use depfence::snapshot::{Connection, NetRule, ServiceRuleset, Snapshot};
use depfence::verdict::Verdict;

use crate::args::{Cli, Command, ErrorFormat, Output, RunMode, SnapshotFormat};
use crate::graph;
use crate::output::{CliError, EXIT_INVALID, print_diagnostics};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let format = cli.error_format;
    match cli.command {
        Command::Check { policy, deny_warnings } => check(policy.path()?, format, deny_warnings),
        Command::Compile { policy, output, format: encoding } => {
            let Some((_, compiled)) = compiled(policy.path()?, format)? else { return Ok(invalid()) };
            let bytes = match encoding {
                SnapshotFormat::Binary => compiled.snapshot.to_bytes()?,
                SnapshotFormat::Json => serde_json::to_vec_pretty(&compiled.snapshot).map_err(std::io::Error::from)?,
            };
            depfence::snapshot::write_file(&output, &bytes)
                .map_err(|source| CliError::Io { context: format!("writing `{}`", output.display()), source })?;
            let warnings = compiled.analysis.diagnostics.warnings().count();
            if warnings > 0 {
                eprintln!("note: the policy has {warnings} warning(s); run `policyctl check` to see them");
            }
            eprintln!(
                "compiled {} services, {} address rules{} into {} (sha256 {})",
                compiled.snapshot.services().len(),
                compiled.snapshot.net_rule_count(),
                rpc_rules_clause(&compiled.snapshot),
                output.display(),
                compiled.snapshot.hash()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph { policy, format: language } => {
            let Some((parsed, analysis)) = analyzed(policy.path()?, format, Show::SyntaxOnly)? else {
                return Ok(invalid());
            };
            let text = graph::render(&analysis, language);
            std::io::stdout().write_all(text.as_bytes())?;
            if analysis.diagnostics.has_errors() {
                eprintln!(
                    "note: the policy has {} error(s), highlighted in the graph; run `policyctl check` for details",
                    analysis.diagnostics.errors().count()
                );
            }
            drop(parsed);
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { live: true, from, to, output, socket, .. } => {
            crate::agent::explain(&socket.socket, &from, &to, output)
        }
        Command::Explain { policy, from, to, environment, output, .. } => {
            let connection = parse_destination(&to)?;
            let Some((parsed, compiled)) = compiled(policy.path()?, format)? else { return Ok(invalid()) };
            explain(&parsed, &compiled, &from, connection, environment.as_deref(), output)
        }
        Command::BootstrapOrder { policy, output } => {
            let Some((_, compiled)) = compiled(policy.path()?, format)? else { return Ok(invalid()) };
            bootstrap_order(&compiled.analysis, output)
        }
        Command::Run { policy, service, mode, command } => {
            let Some((_, compiled)) = compiled(policy.path()?, format)? else { return Ok(invalid()) };
            crate::run::run(&compiled.snapshot, &service, mode == RunMode::Enforce, &command)
        }
        Command::Status { kernel, pins, socket, output } => {
            if kernel || pins.is_some() || !socket.socket.exists() {
                crate::status::run(pins.as_deref(), output)
            } else {
                crate::agent::status(&socket.socket, output)
            }
        }
        Command::Agent {
            policy,
            environment,
            metrics_listen,
            pin_root,
            state_dir,
            socket,
            log_format,
            promote_window,
            promote_min_connections,
            promote_min_observed,
            dns,
        } => {
            let gate = depfence::promote::GateConfig {
                window: promote_window,
                min_connections: promote_min_connections,
                min_observed: promote_min_observed,
            };
            crate::agent::run_agent(
                gate,
                policy.path()?,
                environment,
                &metrics_listen,
                pin_root,
                state_dir,
                socket.socket,
                log_format,
                dns.settings(),
            )
        }
        Command::Reload { socket } => crate::agent::reload(&socket.socket),
        Command::Promote { service, enforce: _, environment, force, reason, dry_run, socket } => {
            let request =
                Request::Promote { service, environment, mode: policy::Mode::Enforce, force, reason, dry_run };
            crate::agent::change_mode(&socket.socket, request)
        }
        Command::Demote { service, environment, reason, socket } => {
            let request = Request::Promote {
                service,
                environment,
                mode: policy::Mode::Audit,
                force: false,
                reason,
                dry_run: false,
            };
            crate::agent::change_mode(&socket.socket, request)
        }
        Command::Events { follow, json, recent, socket } => crate::agent::events(&socket.socket, follow, json, recent),
        Command::Apply { candidate, drop: _, activate, socket } => {
            crate::agent::apply_candidate(&socket.socket, candidate, activate)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "policyctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn invalid() -> ExitCode {
    ExitCode::from(EXIT_INVALID)
}

/// Which diagnostics a command prints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Show {
    /// Errors and warnings (`check`).
    All,
    /// Everything, but only when there is an error (commands that need a valid policy).
    IfInvalid,
    /// Only syntax errors, which stop the analysis (`graph` draws a broken policy).
    SyntaxOnly,
}

/// Parses, and analyzes when the syntax allows, printing diagnostics as `show` says. Returns
/// None when the policy cannot be analyzed.
fn analyzed(path: &Path, format: ErrorFormat, show: Show) -> Result<Option<(Parsed, Analysis)>, CliError> {
    let parsed = policy::load(path)?;
    let Some(analysis) = compile::analyze_parsed(&parsed) else {
        print_diagnostics(format, &parsed.policy.sources, &parsed.diagnostics)?;
        return Ok(None);
    };
    if show == Show::All || (show == Show::IfInvalid && analysis.diagnostics.has_errors()) {
        print_diagnostics(format, &parsed.policy.sources, &analysis.diagnostics)?;
    }
    Ok(Some((parsed, analysis)))
}

/// Parses and compiles; prints the diagnostics and returns None when the policy is invalid.
fn compiled(path: &Path, format: ErrorFormat) -> Result<Option<(Parsed, Compiled)>, CliError> {
    let Some((parsed, analysis)) = analyzed(path, format, Show::IfInvalid)? else { return Ok(None) };
    match analysis.freeze() {
        Ok(compiled) => Ok(Some((parsed, compiled))),
        Err(compile::CompileError::Invalid(_)) => Ok(None),
        Err(compile::CompileError::Snapshot(e)) => Err(e.into()),
        Err(e) => Err(CliError::Usage(e.to_string())),
    }
}

fn check(path: &Path, format: ErrorFormat, deny_warnings: bool) -> Result<ExitCode, CliError> {
    let Some((_, analysis)) = analyzed(path, format, Show::All)? else { return Ok(invalid()) };
    let diagnostics: &Diagnostics = &analysis.diagnostics;
    if diagnostics.has_errors() || (deny_warnings && !diagnostics.is_empty()) {
        return Ok(invalid());
    }
    if format != ErrorFormat::Json {
        let compiled = analysis.freeze().map_err(|e| CliError::Usage(e.to_string()))?;
        let (snapshot, analysis) = (&compiled.snapshot, &compiled.analysis);
        println!(
            "ok: {} services, {} dependencies, {} address rules{}, {} environments; sha256 {}",
            snapshot.services().len(),
            analysis.edges.len(),
            snapshot.net_rule_count(),
            rpc_rules_clause(snapshot),
            snapshot.environments().len(),
            snapshot.hash()
        );
    }
    Ok(ExitCode::SUCCESS)
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

/// One backend's `rpc_allow` patterns of the explained service, for the in-process guard.
struct RpcGroup<'s> {
    backend: &'s str,
    /// The destination is an endpoint of this backend.
    destination: bool,
    /// (pattern, `file:line:col`)
    patterns: Vec<(String, String)>,
}

/// The `rpc_allow` patterns of `service`, per backend in the order written, and for each
/// service that owns the destination (`owners`) an entry even when it has none. Empty when the
/// service has no `rpc_allow` (it does not use the guard).
fn rpc_groups<'s>(snapshot: &'s Snapshot, service: &ServiceRuleset, owners: &[String]) -> Vec<RpcGroup<'s>> {
    if service.rpc_rules.is_empty() {
        return Vec::new();
    }
    let mut groups: Vec<RpcGroup<'s>> = Vec::new();
    for rule in &service.rpc_rules {
        let Some(backend) = snapshot.services().get(rule.target as usize).map(|s| s.name.as_str()) else { continue };
        let pattern = (rule.pattern.to_string(), snapshot.origin_position(rule.origin));
        match groups.iter_mut().find(|g| g.backend == backend) {
            Some(group) => group.patterns.push(pattern),
            None => groups.push(RpcGroup {
                backend,
                destination: owners.iter().any(|o| o == backend),
                patterns: vec![pattern],
            }),
        }
    }
    for owner in owners {
        if let Some((_, ruleset)) = snapshot.service(owner)
            && !groups.iter().any(|g| g.backend == owner)
        {
            groups.push(RpcGroup { backend: ruleset.name.as_str(), destination: true, patterns: Vec::new() });
        }
    }
    // The destination's backends first.
    groups.sort_by_key(|g| !g.destination);
    groups
}

fn parse_destination(text: &str) -> Result<Connection, CliError> {
    text.parse().map_err(|e: depfence::snapshot::ParseConnectionError| CliError::Usage(e.to_string()))
}

/// The services whose declared endpoints hold `addr`.
fn endpoint_owners(parsed: &Parsed, conn: &Connection) -> Vec<String> {
    let addr: IpAddr = conn.addr.to_canonical();
    parsed
        .policy
        .services
        .iter()
        .filter(|s| {
            s.endpoints.iter().any(|e| match &e.destination.value {
                Destination::Net(net) => {
                    net.contains(&addr)
                        && (e.ports.is_empty() || e.ports.iter().any(|p| p.contains(conn.port)))
                        && e.proto.covers(conn.proto)
                }
                Destination::Host(_) => false,
            })
        })
        .map(|s| s.name.value.clone())
        .collect()
}

/// Why adding a dependency `from -> to` would be wrong, if it would: a layer violation or a
/// new cycle.
fn dependency_objection(analysis: &Analysis, from: &str, to: &str) -> Option<String> {
    let (f, t) = (analysis.node(from)?, analysis.node(to)?);
    let (fnode, tnode) = (analysis.nodes.get(f)?, analysis.nodes.get(t)?);
    if let (Some(fl), Some(tl)) = (fnode.layer, tnode.layer)
        && tl > fl
    {
        let layer = |l: usize| analysis.layers.get(l).map_or("?", String::as_str);
        return Some(format!(
            "`{to}` is in the higher layer `{}` (`{from}` is in `{}`): depending on it would be a layer violation",
            layer(tl),
            layer(fl)
        ));
    }
    let mut adjacency = vec![Vec::new(); analysis.nodes.len()];
    for edge in analysis.edges.iter().filter(|e| e.critical && e.from != e.to) {
        if let Some(list) = adjacency.get_mut(edge.from) {
            list.push(edge.to);
        }
    }
    let path = depfence::graph::shortest_path(&adjacency, &[t], &[f])?;
    Some(format!(
        "`{to}` already depends on `{from}` ({}): depending on it would close a cycle",
        analysis.path_text(&path)
    ))
}

fn explain(
    parsed: &Parsed,
    compiled: &Compiled,
    from: &str,
    conn: Connection,
    environment: Option<&str>,
    output: Output,
) -> Result<ExitCode, CliError> {
    let snapshot = &compiled.snapshot;
    let Some((_, service)) = snapshot.service(from) else {
        let names = snapshot.services().iter().map(|s| s.name.as_str());
        let hint =
            depfence::problem::closest(from, names).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default();
        return Err(CliError::Usage(format!("unknown service `{from}`{hint}")));
    };
    let environments: Vec<usize> = match environment {
        Some(name) => vec![snapshot.environment_index(name).ok_or_else(|| {
            let known = snapshot.environments().iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ");
            CliError::Usage(format!("unknown environment `{name}` (the policy has: {known})"))
        })?],
        None => (0..snapshot.environments().len()).collect(),
    };
    let destination = match conn.addr {
        IpAddr::V6(v6) => format!("[{v6}]:{}/{}", conn.port, conn.proto),
        IpAddr::V4(v4) => format!("{v4}:{}/{}", conn.port, conn.proto),
    };
    let owners = endpoint_owners(parsed, &conn);
    let rule = service.matching_rule(&conn);
    // Rules that match the address but not the port or protocol: the usual near miss.
    let near: Vec<&NetRule> = if rule.is_none() {
        let addr = conn.addr.to_canonical();
        service.net_rules.iter().filter(|r| r.net.contains(&addr)).take(5).collect()
    } else {
        Vec::new()
    };
    let verdicts: Vec<(String, Verdict, String)> = environments
        .iter()
        .filter_map(|&e| {
            let env = snapshot.environments().get(e)?;
            let decision = service.decide(e, &conn);
            Some((env.name.clone(), decision.verdict, decision.mode.to_string()))
        })
        .collect();
    let rpc = rpc_groups(snapshot, service, &owners);

    if output == Output::Json {
        let document = serde_json::json!({
            "from": from,
            "to": destination,
            "destination_services": owners,
            "rule": rule.map(|r| serde_json::json!({
                "rule": snapshot.describe_rule(r),
                "position": snapshot.rule_position(r),
            })),
            "near_misses": near.iter().map(|r| serde_json::json!({
                "rule": snapshot.describe_rule(r),
                "position": snapshot.rule_position(r),
            })).collect::<Vec<_>>(),
            "verdicts": verdicts.iter().map(|(env, verdict, mode)| serde_json::json!({
                "environment": env, "mode": mode, "verdict": verdict,
            })).collect::<Vec<_>>(),
            "rpc_allow": rpc.iter().map(|g| serde_json::json!({
                "backend": g.backend,
                "destination": g.destination,
                "patterns": g.patterns.iter().map(|(rpc, position)| serde_json::json!({
                    "rpc": rpc, "position": position,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &document).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }

    let mut text = format!("{from} -> {destination}");
    if !owners.is_empty() {
        let _ = write!(
            text,
            " (an endpoint of {})",
            owners.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")
        );
    }
    text.push('\n');
    match rule {
        Some(rule) => {
            let _ = writeln!(text, "  allowed by {}", snapshot.describe_rule(rule));
            let _ = writeln!(text, "  written at {}", snapshot.rule_position(rule));
        }
        None => {
            let _ = writeln!(text, "  no rule of `{from}` allows it");
            for r in &near {
                let _ = writeln!(
                    text,
                    "  near miss: {} at {} (address matches; port or protocol does not)",
                    snapshot.describe_rule(r),
                    snapshot.rule_position(r)
                );
            }
            for owner in &owners {
                match dependency_objection(&compiled.analysis, from, owner) {
                    Some(objection) => {
                        let _ = writeln!(text, "  note: {objection}");
                    }
                    None => {
                        let _ = writeln!(
                            text,
                            "  help: to allow it, add `{{ service = \"{owner}\" }}` to the allow list of `{from}`"
                        );
                    }
                }
            }
        }
    }
    for (env, verdict, mode) in &verdicts {
        let word = match verdict {
            Verdict::Allowed if rule.is_some() => "allowed",
            Verdict::Allowed => "allowed (mode off: no evaluation)",
            Verdict::WouldReject => "would be rejected (audit: allowed, counted and reported)",
            Verdict::Rejected => "rejected (the caller gets EPERM)",
            Verdict::CandidateWouldReject => "would be rejected by the candidate",
        };
        let _ = writeln!(text, "  {env} ({mode}): {word}");
    }
    if !rpc.is_empty() {
        let _ = writeln!(text, "  rpc_allow of `{from}` (the in-process guard judges each call by these):");
        for group in &rpc {
            let mark = if group.destination { " (this destination)" } else { "" };
            if group.patterns.is_empty() {
                let _ = writeln!(text, "    `{}`{mark}: none (no rpc to it is allowed)", group.backend);
                continue;
            }
            let _ = writeln!(text, "    `{}`{mark}:", group.backend);
            for (pattern, position) in &group.patterns {
                let _ = writeln!(text, "      {pattern} at {position}");
            }
        }
    }
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn bootstrap_order(analysis: &Analysis, output: Output) -> Result<ExitCode, CliError> {
    let layer_name = |layer: Option<usize>| layer.and_then(|l| analysis.layers.get(l)).cloned();
    let stage_members = |components: &[usize]| -> Vec<(Vec<String>, bool)> {
        components
            .iter()
            .filter_map(|&c| analysis.components.get(c))
            .map(|c| (c.members.iter().map(|&m| analysis.name(m).to_owned()).collect(), c.intrinsic))
            .collect()
    };
    let mut out = std::io::stdout().lock();
    if output == Output::Json {
        let stages: Vec<_> = analysis
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                serde_json::json!({
                    "stage": i + 1,
                    "layer": layer_name(stage.layer),
                    "groups": stage_members(&stage.components).into_iter().map(|(members, intrinsic)| serde_json::json!({
                        "services": members, "intrinsic_cycle": intrinsic,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &stages).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut current_layer = None;
    for (i, stage) in analysis.stages.iter().enumerate() {
        let layer = layer_name(stage.layer).unwrap_or_else(|| "(no layer)".into());
        if current_layer.as_ref() != Some(&layer) {
            writeln!(out, "layer {layer}:")?;
            current_layer = Some(layer);
        }
        let groups: Vec<String> =
            stage_members(&stage.components)
                .into_iter()
                .map(|(members, intrinsic)| {
                    if intrinsic { format!("{{{}}} (intrinsic cycle)", members.join(", ")) } else { members.join(", ") }
                })
                .collect();
        writeln!(out, "  {:>3}. {}", i + 1, groups.join(", "))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use depfence::policy::Proto;

    #[test]
    fn destinations_parse() {
        let c = parse_destination("10.0.0.1:443").unwrap();
        assert_eq!((c.addr.to_string(), c.port, c.proto), ("10.0.0.1".into(), 443, Proto::Tcp));
        let c = parse_destination("[::1]:53/udp").unwrap();
        assert_eq!((c.addr.to_string(), c.port, c.proto), ("::1".into(), 53, Proto::Udp));
        assert!(parse_destination("10.0.0.1").is_err());
        assert!(parse_destination("10.0.0.1:443/sctp").is_err());
        assert!(parse_destination("10.0.0.1:443/any").is_err());
    }
}
