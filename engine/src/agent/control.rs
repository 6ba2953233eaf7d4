//! The control socket: a Unix stream socket (mode 0600, root only) on which `policyctl` asks
//! the running agent for its status, its events, an explanation against the live policy, a
//! reload, a promotion, or a candidate policy. One JSON request line per connection; the
//! answer is one JSON line, or for `events --follow` a JSON line per event until the client
//! hangs up. The requests and responses and their encoding are `crate::control_protocol`'s
//! (re-exported here); this module holds what the agent answers with, the client side
//! (`policyctl`'s) and the server side, which hands each request to the state task as a
//! message.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, warn};

use super::config::{AgentError, io_error};
use super::telemetry::EventRecord;
pub use crate::control_protocol::{MAX_REQUEST_LINE, ProtocolError, Request, Response};
use crate::dns::DnsEvent;

/// The agent's status, as `policyctl status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent has applied its first policy.
    pub ready: bool,
    /// The agent's environment.
    pub environment: String,
    /// The policy path it watches.
    pub policy: PathBuf,
    /// Generation of the policy in force.
    pub generation: u32,
    /// Content hash of the policy in force.
    pub policy_hash: Option<String>,
    /// The last reload.
    pub last_reload: Option<ReloadStatus>,
    /// The candidate policy, if one is loaded.
    pub candidate: Option<CandidateStatus>,
    /// Services with cgroups on this machine.
    pub services: Vec<ServiceStatus>,
    /// Services of the policy that select no cgroup here.
    pub services_without_cgroups: usize,
    /// Kernel events lost (ring buffer full).
    pub events_dropped: u64,
    /// The DNS proxy, when it runs.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
}

/// The agent's DNS proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Its port on loopback.
    pub port: u16,
    /// Where it forwards allowed names.
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Addresses allowed in the kernel through resolved names (per protocol).
    pub admitted: usize,
}

/// How the last reload went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// When (RFC 3339).
    pub time: String,
    /// Whether it was applied.
    pub ok: bool,
    /// Why not: the located diagnostics (`file:line:col: …`) or the kernel error.
    pub errors: Vec<String>,
}

/// A loaded candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateStatus {
    /// Its path.
    pub path: PathBuf,
    /// Its content hash.
    pub hash: String,
}

/// One service on this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// Mode in this environment.
    pub mode: String,
    /// Since when (RFC 3339), or `unknown` (the agent's kernel state file was lost).
    pub mode_since: String,
    /// Its cgroups (relative to the cgroup2 mount).
    pub cgroups: Vec<String>,
    /// Its connections by verdict (the kernel's counters).
    #[serde(flatten)]
    pub counts: crate::verdict::Counts,
    /// The last would-reject event.
    pub last_would_reject: Option<EventRecord>,
    /// Its allow rules and their hits since the agent started, in rule order.
    #[serde(default)]
    pub rules: Vec<RuleStatus>,
}

/// One allow rule of a service and its hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    /// The rule in words.
    pub rule: String,
    /// The backend it reaches.
    pub backend: String,
    /// Where its allow entry was written.
    pub position: String,
    /// Hits since the agent started.
    pub hits: u64,
}

/// The answer to a promotion or demotion ([`Request::Promote`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeChanged {
    /// What was rewritten.
    pub outcome: crate::promote::Outcome,
    /// The policy generation in force afterwards.
    pub generation: u32,
}

/// The answer to `promote --dry-run`: the gate would accept a promotion on this evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionCheck {
    /// The evidence the gate accepted.
    pub evidence: crate::promote::Evidence,
}

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket is missing or refuses: no agent runs.
    #[error("no agent answers on {path} (is `policyctl agent` running?): {source}")]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    /// The agent sent an event that is not one.
    #[error("the agent's answer is not valid: {0}")]
    Protocol(#[from] serde_json::Error),
    /// The request could not be sent, or the answer is not a response.
    #[error(transparent)]
    Message(#[from] ProtocolError),
    /// The agent refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the body of the answer (blocking; for the CLI).
pub fn request(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| ClientError::NotRunning { path: socket.to_owned(), source })?;
    stream.write_all(&request.to_line()?)?;
    let mut answer = Vec::new();
    BufReader::new(stream).read_until(b'\n', &mut answer)?;
    let response = Response::from_line(&answer)?;
    if response.ok { Ok(response.body) } else { Err(ClientError::Refused(response.error.unwrap_or_default())) }
}

/// Sends an `events` request and calls `each` for every event line until the agent hangs up
/// or `each` returns false.
pub fn follow_events(
    socket: &Path,
    recent: usize,
    follow: bool,
    mut each: impl FnMut(EventRecord) -> bool,
) -> Result<(), ClientError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| ClientError::NotRunning { path: socket.to_owned(), source })?;
    stream.write_all(&Request::Events { follow, recent }.to_line()?)?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if let Ok(response) = Response::from_line(line.as_bytes()) {
            if !response.ok {
                return Err(ClientError::Refused(response.error.unwrap_or_default()));
            }
            continue;
        }
        if !each(serde_json::from_str(&line)?) {
            break;
        }
    }
    Ok(())
}

/// Makes the socket file root-only.
pub(crate) fn restrict(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// A message to the state task.
pub(super) enum Message {
    /// A control request, the uid of the process that sent it, and where to answer.
    Request(Request, Option<u32>, oneshot::Sender<Response>),
    /// A subscription to new events (with the recent ones).
    Subscribe(usize, oneshot::Sender<(Vec<EventRecord>, broadcast::Receiver<EventRecord>)>),
    /// A policy file changed; the watcher saw it at this instant (after the write).
    PolicyChanged(std::time::Instant),
    /// The DNS proxy judged a question (or saw something worth recording).
    Dns(DnsEvent),
}

/// Binds the control socket (replacing one an agent that died left), root only.
pub(super) fn bind(path: &Path) -> Result<tokio::net::UnixListener, AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    }
    // A socket left by an agent that died; nothing listens on it.
    if UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io_error("binding the control socket", path))?;
    restrict(path).map_err(io_error("restricting", path))?;
    Ok(listener)
}

/// Accepts control connections for as long as the agent runs.
pub(super) async fn serve(listener: tokio::net::UnixListener, tx: mpsc::Sender<Message>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, tx).await {
                warn!("control connection: {e}");
            }
        });
    }
}

async fn serve_connection(stream: tokio::net::UnixStream, tx: mpsc::Sender<Message>) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let peer = stream.peer_cred().ok();
    let (read, mut write) = stream.into_split();
    // One byte past the limit tells a line that is too long from one that just fits.
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_REQUEST_LINE).unwrap_or(u64::MAX).saturating_add(1);
    tokio::io::BufReader::new(read).take(limit).read_until(b'\n', &mut line).await?;
    let request = match Request::from_line(&line) {
        Ok(r) => r,
        Err(e) => {
            write.write_all(&Response::error(e.to_string()).to_line().map_err(std::io::Error::other)?).await?;
            return Ok(());
        }
    };
    info!(uid = peer.map(|p| p.uid()), pid = peer.and_then(|p| p.pid()), request = ?request, "control request");
    if let Request::Events { follow, recent } = request {
        let (reply, answer) = oneshot::channel();
        if tx.send(Message::Subscribe(recent, reply)).await.is_err() {
            return Ok(());
        }
        let Ok((recent, mut live)) = answer.await else { return Ok(()) };
        for event in recent {
            write.write_all(format!("{}\n", serde_json::to_string(&event)?).as_bytes()).await?;
        }
        if !follow {
            return Ok(());
        }
        loop {
            match live.recv().await {
                Ok(event) => write.write_all(format!("{}\n", serde_json::to_string(&event)?).as_bytes()).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => warn!(skipped = n, "events subscriber too slow"),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
    let (reply, answer) = oneshot::channel();
    if tx.send(Message::Request(request, peer.map(|p| p.uid()), reply)).await.is_err() {
        return Ok(());
    }
    let response = answer.await.unwrap_or_else(|_| Response::error("the agent is stopping"));
    write.write_all(&response.to_line().map_err(std::io::Error::other)?).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The answer the server sends on `client` after `sent`, within 5 s.
    async fn answer_to(sent: &[u8]) -> (Response, Option<Message>) {
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let serving = tokio::spawn(serve_connection(server, tx));
        let (read, mut write) = client.into_split();
        write.write_all(sent).await.unwrap();
        // The client keeps its side open: the server must not wait for more.
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(read);
        let message = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.ok().flatten();
        if let Some(Message::Request(_, _, reply)) = message {
            let _ = reply.send(Response::ok("answered"));
            let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
            read.expect("no answer within 5 s").unwrap();
            serving.await.unwrap().unwrap();
            return (Response::from_line(line.as_bytes()).unwrap(), None);
        }
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
        read.expect("no answer within 5 s").unwrap();
        serving.await.unwrap().unwrap();
        (Response::from_line(line.as_bytes()).unwrap(), message)
    }

    #[tokio::test]
    async fn a_request_line_that_never_ends_is_refused_at_the_limit() {
        let endless = vec![b' '; MAX_REQUEST_LINE + 4096];
        let (response, message) = answer_to(&endless).await;
        assert!(message.is_none(), "the state task was asked something");
        assert!(!response.ok);
        assert_eq!(response.error.unwrap(), format!("the request is longer than {MAX_REQUEST_LINE} bytes"));
    }

    #[tokio::test]
    async fn a_request_that_is_not_one_is_answered_with_why() {
        let (response, message) = answer_to(b"\xff\xfe not json\n").await;
        assert!(message.is_none());
        assert!(response.error.unwrap().starts_with("not a request: "));
    }

    #[tokio::test]
    async fn a_request_reaches_the_state_task_and_its_answer_the_client() {
        let (response, _) = answer_to(&Request::Status.to_line().unwrap()).await;
        assert_eq!(response, Response::ok("answered"));
    }
}
