//! `policyctl promote` and `demote`: change a service's mode through the agent, which checks
//! the evidence (for a promotion), rewrites the policy file and applies it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use depfence::agent::control::{ModeChanged, PromotionCheck, Request};
use depfence::promote::fleet::{FleetOutcome, FleetRecord, FleetRequest, append_fleet_log, decide};
use depfence::promote::prometheus::{Auth, Prometheus};
use depfence::verdict::Mode;

use super::client::ask_and_report;
use super::{compiled, environment_index, invalid};
use crate::args::{ErrorFormat, FleetArgs, Output};
use crate::error::{CliError, EXIT_INCONCLUSIVE};

/// Promotes `service` to enforce (or, with `dry_run`, only asks whether the gate would accept).
pub fn promote(
    socket: &Path,
    service: String,
    environment: Option<String>,
    force: bool,
    reason: Option<String>,
    dry_run: bool,
) -> Result<ExitCode, CliError> {
    let request =
        Request::Promote { service: service.clone(), environment, mode: Mode::Enforce, force, reason, dry_run };
    if dry_run {
        return ask_and_report(socket, &request, |body| {
            let PromotionCheck { evidence } = serde_json::from_value(body).map_err(std::io::Error::from)?;
            eprintln!(
                "{service} may be promoted: {} connections, none would-rejected, in the last {}s",
                evidence.allowed,
                evidence.window.as_secs()
            );
            Ok(ExitCode::SUCCESS)
        });
    }
    change(socket, &request, &service, "promoted")
}

/// Demotes `service` to audit.
pub fn demote(
    socket: &Path,
    service: String,
    environment: Option<String>,
    reason: Option<String>,
) -> Result<ExitCode, CliError> {
    let request = Request::Promote {
        service: service.clone(),
        environment,
        mode: Mode::Audit,
        force: false,
        reason,
        dry_run: false,
    };
    change(socket, &request, &service, "demoted")
}

fn change(socket: &Path, request: &Request, service: &str, verb: &str) -> Result<ExitCode, CliError> {
    ask_and_report(socket, request, |body| {
        let ModeChanged { outcome, generation } = serde_json::from_value(body).map_err(std::io::Error::from)?;
        let file = outcome.file.display();
        if !outcome.changed {
            eprintln!("{service} already has that mode; {file} is unchanged");
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(overridden) = &outcome.overridden {
            eprintln!("warning: forced past the evidence gate: {overridden}");
        }
        print!("{}", outcome.diff);
        eprintln!("{service} {verb}: {file} rewritten, applied as generation {generation}");
        Ok(ExitCode::SUCCESS)
    })
}

/// `promote SERVICE --enforce --prometheus URL --policy PATH`: decides on the fleet's evidence
/// in Prometheus, and when the gate promotes, rewrites the service's mode in the policy checkout
/// (the user commits it). Every decision is appended to the fleet promotion log.
pub fn fleet(
    service: &str,
    environment: Option<&str>,
    dry_run: bool,
    args: &FleetArgs,
    errors: ErrorFormat,
) -> Result<ExitCode, CliError> {
    let (Some(url), Some(policy)) = (args.prometheus.as_deref(), args.policy.as_deref()) else {
        return Err(CliError::Usage("--prometheus needs --policy PATH".into()));
    };
    let Some(compiled) = compiled(policy, errors)? else { return Ok(invalid()) };
    let snapshot = &compiled.snapshot;
    let names: Vec<String> = snapshot.environments().iter().map(|e| e.name.clone()).collect();
    let env = environment_index(&names, environment)?;
    let env_name = names.get(env).cloned().unwrap_or_default();
    let Some((_, ruleset)) = snapshot.service(service) else {
        return Err(CliError::Usage(format!("the policy has no service `{service}`")));
    };
    if ruleset.mode(env) != Mode::Audit {
        return Err(CliError::Usage(format!(
            "`{service}` is in {} in `{env_name}`, not in audit: only a service in audit is promoted",
            ruleset.mode(env)
        )));
    }
    let request = FleetRequest {
        service: service.to_owned(),
        environment: env_name.clone(),
        hash: snapshot.hash().to_string(),
        window: args.window,
        time: SystemTime::now(),
        min_connections: args.min_connections,
        min_per_host: args.min_per_host,
        job: args.job.clone(),
    };
    let prometheus = Prometheus::new(url, auth(args)?, args.timeout);
    let decision = decide(&prometheus, &request);

    let mut rewritten = None;
    if decision.outcome == FleetOutcome::Promoted && !dry_run {
        let edit = depfence::promote::rewrite::rewrite_service_mode(policy, service, Some(&env_name), Mode::Enforce)
            .map_err(|e| {
                CliError::Usage(format!("the gate promoted `{service}`, but the policy was not rewritten: {e}"))
            })?;
        if args.output == Output::Text {
            eprint!("{}", edit.diff);
        }
        rewritten = Some(edit.file);
    }
    let uid = process_uid();
    let record = FleetRecord {
        decision,
        who: depfence::promote::Actor { user: depfence::promote::user_name(uid), uid },
        dry_run,
        rewritten,
    };
    let log = args.log.clone().unwrap_or_else(|| default_log(policy));
    append_fleet_log(&log, &record).map_err(|e| CliError::Io {
        context: format!("appending to `{}`", log.display()),
        source: std::io::Error::other(e.to_string()),
    })?;

    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&record).map_err(std::io::Error::from)?),
        Output::Text => print_decision(&record),
    }
    Ok(match record.decision.outcome {
        FleetOutcome::Promoted => ExitCode::SUCCESS,
        FleetOutcome::Refused => invalid(),
        FleetOutcome::Inconclusive => ExitCode::from(EXIT_INCONCLUSIVE),
    })
}

fn print_decision(record: &FleetRecord) {
    let d = &record.decision;
    let verdict = match (d.outcome, record.dry_run) {
        (FleetOutcome::Promoted, true) => "may be promoted (dry run: nothing written)",
        (FleetOutcome::Promoted, false) => "promoted",
        (FleetOutcome::Refused, _) => "refused",
        (FleetOutcome::Inconclusive, _) => "inconclusive: the evidence cannot decide",
    };
    println!("{} in {}: {verdict}", d.service, d.environment);
    for reason in &d.reasons {
        println!("  {reason}");
    }
    for host in &d.hosts {
        println!("  host {}: {} allowed, {} would-reject", host.instance, host.allowed, host.would_reject);
    }
    if let Some(file) = &record.rewritten {
        println!("  {} now enforces in {}: commit {}", d.service, d.environment, file.display());
    }
}

/// The bearer token or basic password, from a file or the environment.
fn auth(args: &FleetArgs) -> Result<Auth, CliError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|source| CliError::Io { context: format!("reading `{}`", path.display()), source })
    };
    if let Some(user) = &args.basic_user {
        let password = match &args.basic_password_file {
            Some(path) => read(path)?,
            None => std::env::var("DEPFENCE_PROMETHEUS_PASSWORD").map_err(|_| {
                CliError::Usage("--basic-user needs --basic-password-file or $DEPFENCE_PROMETHEUS_PASSWORD".into())
            })?,
        };
        return Ok(Auth::Basic { user: user.clone(), password });
    }
    if let Some(path) = &args.bearer_token_file {
        return Ok(Auth::Bearer(read(path)?));
    }
    Ok(std::env::var("DEPFENCE_PROMETHEUS_TOKEN").map_or(Auth::None, Auth::Bearer))
}

/// `depfence-promotions.jsonl` beside a policy file, or inside a policy directory.
fn default_log(policy: &Path) -> PathBuf {
    let dir = if policy.is_dir() { policy } else { policy.parent().unwrap_or(Path::new(".")) };
    dir.join("depfence-promotions.jsonl")
}

/// This process's user id (the owner of `/proc/self`).
fn process_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| std::os::unix::fs::MetadataExt::uid(&m))
}
