//! `policyctl promote` and `demote`: change a service's mode through the agent, which checks
//! the evidence (for a promotion), rewrites the policy file and applies it.

use std::path::Path;
use std::process::ExitCode;

use depfence::agent::control::{ModeChanged, PromotionCheck, Request};
use depfence::verdict::Mode;

use super::client::ask_and_report;
use crate::error::CliError;

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
