//! `policyctl apply --candidate PATH | --activate | --drop`: a candidate policy evaluated in the
//! kernel beside the active one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use depfence::agent::control::{AgentStatus, Request};

use super::client::ask_and_report;
use crate::error::CliError;

/// Loads `candidate`, or activates or drops the loaded one.
pub fn run(socket: &Path, candidate: Option<PathBuf>, activate: bool) -> Result<ExitCode, CliError> {
    let request = match candidate {
        Some(path) => Request::ApplyCandidate { path: std::path::absolute(&path)? },
        None if activate => Request::ActivateCandidate,
        None => Request::DropCandidate,
    };
    ask_and_report(socket, &request, |body| {
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
    })
}
