//! The control socket: a Unix stream socket (mode 0600, root only) on which `policyctl` asks
//! the running agent for its status, its events, an explanation against the live policy, a
//! reload, a promotion, or a candidate policy. One JSON request line per connection; the
//! answer is one JSON line, or for `events --follow` a JSON line per event until the client
//! hangs up. This module holds the protocol, the client side (`policyctl`'s) and the server
//! side, which hands each request to the state task as a message.
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
use crate::dns::DnsEvent;

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
        mode: crate::policy::Mode,
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
    /// The agent sent something that is not a response.
    #[error("the agent's answer is not valid: {0}")]
    Protocol(#[from] serde_json::Error),
    /// The agent refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the body of the answer (blocking; for the CLI).
pub fn request(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| ClientError::NotRunning { path: socket.to_owned(), source })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    let response: Response = serde_json::from_str(&answer)?;
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
    let mut line = serde_json::to_vec(&Request::Events { follow, recent })?;
    line.push(b'\n');
    stream.write_all(&line)?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if let Ok(response) = serde_json::from_str::<Response>(&line) {
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
    /// A policy file changed.
    PolicyChanged,
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
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let peer = stream.peer_cred().ok();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(read).read_line(&mut line).await?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let answer = Response::error(format!("not a request: {e}"));
            write.write_all(format!("{}\n", serde_json::to_string(&answer)?).as_bytes()).await?;
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
    write.write_all(format!("{}\n", serde_json::to_string(&response)?).as_bytes()).await?;
    Ok(())
}
