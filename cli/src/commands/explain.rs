//! `policyctl explain`: why a connection is allowed or not, against a policy file or, with
//! `--live`, against the agent's policy in force. The engine builds the explanation
//! (`depfence::explain`); this prints it.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use depfence::agent::control::Request;
use depfence::explain::{Environments, Explanation, explain};
use depfence::snapshot::{Connection, ParseConnectionError};

use super::{compiled, invalid};
use crate::args::{ErrorFormat, Output};
use crate::error::CliError;

fn parse_destination(text: &str) -> Result<Connection, CliError> {
    text.parse().map_err(|e: ParseConnectionError| CliError::Usage(e.to_string()))
}

/// Explains against the policy at `path`, in one environment or in every one.
pub fn offline(
    path: &Path,
    format: ErrorFormat,
    from: &str,
    to: &str,
    environment: Option<&str>,
    output: Output,
) -> Result<ExitCode, CliError> {
    let connection = parse_destination(to)?;
    let Some(compiled) = compiled(path, format)? else { return Ok(invalid()) };
    let environments = environment.map_or(Environments::All, Environments::Named);
    let explanation = explain(&compiled.snapshot, Some(&compiled.analysis), from, connection, environments)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    print(&explanation, output)
}

/// Explains against the agent's policy in force.
pub fn live(socket: &Path, from: &str, to: &str, output: Output) -> Result<ExitCode, CliError> {
    parse_destination(to)?;
    let request = Request::Explain { from: from.to_owned(), to: to.to_owned() };
    let explanation: Explanation = super::client::ask_for(socket, &request)?;
    print(&explanation, output)
}

fn print(explanation: &Explanation, output: Output) -> Result<ExitCode, CliError> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, explanation).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        Output::Text => write!(out, "{explanation}")?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use depfence::policy::Proto;

    use super::*;

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
