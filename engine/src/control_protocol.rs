//! The control socket's protocol, between `policyctl` and the agent: one [`Request`] line per
//! connection, answered by one [`Response`] line (for `events`, by a line per event). A line is
//! JSON and a newline. The agent reads at most [`MAX_REQUEST_LINE`] bytes of a request, so a
//! client cannot make it buffer without end. Both sides encode and decode here (the client and
//! the server are `agent::control`); it needs no agent, so the fuzz target decodes with it too.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::verdict::Mode;

/// The longest request line the agent reads, its newline included.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// A request or response line could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A request line longer than [`MAX_REQUEST_LINE`].
    #[error("the request is longer than {MAX_REQUEST_LINE} bytes")]
    TooLong,
    /// A request line that is not a request.
    #[error("not a request: {0}")]
    NotARequest(serde_json::Error),
    /// A response line that is not a response.
    #[error("the agent's answer is not valid: {0}")]
    NotAResponse(serde_json::Error),
    /// A message that cannot be written as JSON (a path that is not UTF-8).
    #[error("cannot encode the message: {0}")]
    Encode(serde_json::Error),
}

/// `value` as one line: JSON and a newline.
fn line(value: &impl Serialize) -> Result<Vec<u8>, ProtocolError> {
    let mut line = serde_json::to_vec(value).map_err(ProtocolError::Encode)?;
    line.push(b'\n');
    Ok(line)
}

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Per-service mode, generation, counters and last would-reject.
    Status,
    /// Recent events, and with `follow` every new one as it comes.
    Events {
        /// Keep the connection open and stream new events.
        follow: bool,
        /// How many recent events to send first.
        recent: usize,
    },
    /// Judge a connection against the live policy.
    Explain {
        /// The service making the connection.
        from: String,
        /// `ADDR:PORT[/PROTO]`.
        to: String,
    },
    /// Re-read the policy now.
    Reload,
    /// Change a service's mode in the policy file (after the evidence gate, unless forced).
    Promote {
        /// The service.
        service: String,
        /// The environment (default: the agent's).
        environment: Option<String>,
        /// `enforce` to promote, `audit` to demote.
        mode: Mode,
        /// Force past the evidence gate (needs a reason).
        force: bool,
        /// Why (logged with who and when).
        reason: Option<String>,
        /// Only check the evidence; change nothing.
        #[serde(default)]
        dry_run: bool,
    },
    /// Load a candidate policy, evaluated in the kernel beside the active one.
    ApplyCandidate {
        /// Policy file or directory.
        path: PathBuf,
    },
    /// Make the candidate the active policy (its files replace the policy's).
    ActivateCandidate,
    /// Stop evaluating the candidate.
    DropCandidate,
    /// Every service's would-rejected destinations in the last `window_secs` (for `learn`).
    Observed {
        /// The window, in seconds.
        window_secs: u64,
    },
    /// The declared dependencies and rules of every service here and their hits in the last
    /// `window_secs` (for `unused`).
    Usage {
        /// The window, in seconds.
        window_secs: u64,
    },
}

/// The agent's answer: `ok` with a payload, or an error message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The error, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The payload.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub body: serde_json::Value,
}

impl Response {
    /// A success with a payload.
    pub fn ok(body: impl Serialize) -> Self {
        Self { ok: true, error: None, body: serde_json::to_value(body).unwrap_or_default() }
    }
    /// A failure.
    pub fn error(message: impl Into<String>) -> Self {
        Self { ok: false, error: Some(message.into()), body: serde_json::Value::Null }
    }
}

impl Request {
    /// The request as the client sends it: one line, at most [`MAX_REQUEST_LINE`] bytes.
    pub fn to_line(&self) -> Result<Vec<u8>, ProtocolError> {
        let line = line(self)?;
        if line.len() > MAX_REQUEST_LINE {
            return Err(ProtocolError::TooLong);
        }
        Ok(line)
    }

    /// Decodes a request line as the agent read it (with or without its newline; the agent reads
    /// at most one byte more than [`MAX_REQUEST_LINE`], to tell a line that is too long).
    pub fn from_line(line: &[u8]) -> Result<Request, ProtocolError> {
        if line.len() > MAX_REQUEST_LINE {
            return Err(ProtocolError::TooLong);
        }
        serde_json::from_slice(line).map_err(ProtocolError::NotARequest)
    }
}

impl Response {
    /// The response as the agent sends it: one line.
    pub fn to_line(&self) -> Result<Vec<u8>, ProtocolError> {
        line(self)
    }

    /// Decodes a response line (with or without its newline).
    pub fn from_line(line: &[u8]) -> Result<Response, ProtocolError> {
        serde_json::from_slice(line).map_err(ProtocolError::NotAResponse)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

    use super::*;

    fn every_request() -> Vec<Request> {
        vec![
            Request::Status,
            Request::Events { follow: true, recent: 20 },
            Request::Explain { from: "web".into(), to: "10.0.0.1:443/tcp".into() },
            Request::Reload,
            Request::Promote {
                service: "db".into(),
                environment: Some("prod".into()),
                mode: Mode::Enforce,
                force: true,
                reason: Some("line one\nline two".into()),
                dry_run: false,
            },
            Request::ApplyCandidate { path: PathBuf::from("/etc/depfence/candidate.toml") },
            Request::ActivateCandidate,
            Request::DropCandidate,
        ]
    }

    #[test]
    fn requests_survive_their_line() {
        for request in every_request() {
            let line = request.to_line().unwrap();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "{request:?}");
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Request::from_line(&line).unwrap(), request);
            // Without its newline too (a client that closes instead).
            assert_eq!(Request::from_line(&line[..line.len() - 1]).unwrap(), request);
        }
        // `dry_run` may be left out.
        let line =
            br#"{"request":"promote","service":"db","environment":null,"mode":"audit","force":false,"reason":null}"#;
        assert!(matches!(Request::from_line(line).unwrap(), Request::Promote { dry_run: false, .. }));
    }

    #[test]
    fn a_request_line_over_the_limit_is_refused_whatever_it_holds() {
        // Valid JSON, padded past the limit: refused for its length, not parsed.
        let mut line = Request::Status.to_line().unwrap();
        line.splice(0..0, std::iter::repeat_n(b' ', MAX_REQUEST_LINE));
        assert!(matches!(Request::from_line(&line), Err(ProtocolError::TooLong)));
        assert_eq!(
            Request::from_line(&line).unwrap_err().to_string(),
            format!("the request is longer than {MAX_REQUEST_LINE} bytes")
        );
        // At the limit exactly, it is read.
        line.drain(..line.len() - MAX_REQUEST_LINE);
        assert_eq!(Request::from_line(&line).unwrap(), Request::Status);
    }

    #[test]
    fn a_request_too_long_to_read_is_refused_before_it_is_sent() {
        let request = Request::Explain { from: "web".into(), to: "x".repeat(MAX_REQUEST_LINE) };
        assert!(matches!(request.to_line(), Err(ProtocolError::TooLong)));
    }

    #[test]
    fn garbage_gives_a_one_line_error() {
        for line in [&b""[..], b"\n", b"{", b"\xff\xfe{}", b"{\"request\":\"shutdown\"}", b"[1,2,3]", b"null"] {
            let error = Request::from_line(line).unwrap_err();
            assert!(matches!(error, ProtocolError::NotARequest(_)), "{line:?}: {error:?}");
            let message = error.to_string();
            assert!(message.starts_with("not a request: ") && !message.contains('\n'), "{message}");
        }
        assert!(matches!(Response::from_line(b"{\"ok\":1}"), Err(ProtocolError::NotAResponse(_))));
    }

    /// Found by the `control_request` fuzz target: a long number read to the nearest float but
    /// one, which then changed on its next trip.
    #[test]
    fn numbers_in_a_response_are_read_exactly() {
        let digits = format!("{}0", "6".repeat(102));
        let line = format!(r#"{{"ok":true,"body":{{"ratio":{digits},"small":0.1,"tiny":5e-324}}}}"#);
        let response = Response::from_line(line.as_bytes()).unwrap();
        let number = |key: &str| response.body.get(key).and_then(serde_json::Value::as_f64).unwrap();
        assert_eq!(number("ratio"), digits.parse::<f64>().unwrap());
        assert_eq!(number("small"), 0.1);
        assert_eq!(number("tiny"), 5e-324);
        let again = Response::from_line(&response.to_line().unwrap()).unwrap();
        assert_eq!(again, response);
    }

    #[test]
    fn responses_survive_their_line() {
        for response in [
            Response::ok(serde_json::json!({"ready": true, "services": ["a", "b"], "ratio": 0.5})),
            Response::ok(()),
            Response::error("no policy in force yet"),
        ] {
            let line = response.to_line().unwrap();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(Response::from_line(&line).unwrap(), response);
        }
    }
}
