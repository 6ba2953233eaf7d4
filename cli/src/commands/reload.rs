//! `policyctl reload`: the agent re-reads its policy now (as SIGHUP does).

use std::path::Path;
use std::process::ExitCode;

use depfence::agent::control::{AgentStatus, Request};

use super::client::ask_and_report;
use crate::error::CliError;

/// Asks the agent on `socket` to reload; exit 1 (with its reasons) if the policy was refused.
pub fn run(socket: &Path) -> Result<ExitCode, CliError> {
    ask_and_report(socket, &Request::Reload, |body| {
        let status: AgentStatus = serde_json::from_value(body).map_err(std::io::Error::from)?;
        eprintln!("policy applied (generation {})", status.generation);
        Ok(ExitCode::SUCCESS)
    })
}
