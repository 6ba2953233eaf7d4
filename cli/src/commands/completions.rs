//! `policyctl completions`: shell completions.

use std::process::ExitCode;

use crate::args::Cli;
use crate::error::CliError;

/// Prints the completions for `shell`.
pub fn run(shell: clap_complete::Shell) -> Result<ExitCode, CliError> {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "policyctl", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
