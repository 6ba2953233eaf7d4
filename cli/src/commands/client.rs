//! Asking the running agent over its control socket (`depfence::agent::control`).

use std::path::Path;

use depfence::agent::control::{self, Request};
use serde::de::DeserializeOwned;

use crate::error::CliError;

/// Sends `request`; the agent's answer as `T`. A refusal is [`CliError::Agent`] with
/// `ClientError::Refused` (exit 1).
pub fn ask_for<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<T, CliError> {
    let body = control::request(socket, request)?;
    serde_json::from_value(body).map_err(|e| CliError::Agent(e.into()))
}

/// Sends `request`; a refusal is printed and becomes exit code 1, with `done` run on success.
pub fn ask_and_report(
    socket: &Path,
    request: &Request,
    done: impl FnOnce(serde_json::Value) -> Result<std::process::ExitCode, CliError>,
) -> Result<std::process::ExitCode, CliError> {
    match control::request(socket, request) {
        Ok(body) => done(body),
        Err(control::ClientError::Refused(message)) => {
            eprintln!("{message}");
            Ok(std::process::ExitCode::from(crate::error::EXIT_INVALID))
        }
        Err(e) => Err(e.into()),
    }
}
