//! The in-process guard: RPC-name checks for Rust services, on the same compiled
//! [`Snapshot`] as the kernel path, with the same modes and verdicts.
//!
//! The kernel sees addresses and ports; the guard sees the RPC a client is about to make. A
//! service lists in its policy which RPCs it may call on which backend service (`rpc_allow`).
//! [`Guard::check`] judges a call from the caller's mode in the environment the guard was built
//! for:
//!
//! * `off`: [`Verdict::Allowed`], nothing judged;
//! * a matching `rpc_allow` pattern: [`Verdict::Allowed`], with the rule in the decision;
//! * no matching pattern: [`Verdict::WouldReject`] in `audit`, [`Verdict::Rejected`] in
//!   `enforce`. A call to a backend the caller has no `rpc_allow` entry for, or to an authority
//!   that is no service of the policy, is such a call: the guard denies by default, as the
//!   kernel does.
//!
//! A caller that is not a service of the snapshot (say, removed by a reload) is allowed:
//! [`Reason::UnknownCaller`]. [`GuardLayer::new`] refuses an unknown service up front.
//!
//! **Backends.** The backend is named by the call's authority, `[userinfo@]host[:port]`:
//! 1. an IP address is the service with a declared endpoint (`ip` or `cidr`, TCP or any) that
//!    holds the address and the port (the most specific endpoint wins: the longest prefix,
//!    then the fewest ports);
//! 2. a host name is the service with a declared `host` endpoint that matches it and the port
//!    (an exact name first, then wildcards, the longest domain first);
//! 3. otherwise a host name is the service of that name (`billing`, `billing:50051`), or a
//!    Kubernetes cluster name of it: `billing.<namespace>.svc` or
//!    `billing.<namespace>.svc.cluster.local`, with a namespace of one label.
//!
//! Names match case-insensitively, and a final `.` is ignored. An authority without a port
//! matches endpoints on any port.
//!
//! No other name is read as a service: not `billing.evil.com` or `billing.com` (a name that
//! merely starts with a service's name is some other host, and a call to it is a call to an
//! unknown backend), not the short `billing.prod` (also a valid external name), and not a
//! cluster domain other than `cluster.local`. A service reached by such a name declares it as a
//! `host` endpoint (`{ host = "billing.prod" }`), which rule 2 resolves exactly.
//!
//! **Snapshots.** The guard holds the current snapshot and its index in an [`ArcSwap`]: a check
//! loads it once, so every answer comes from exactly one snapshot, and a reload replaces both
//! at once. [`Guard::reload`] rereads the file (keeping the last good snapshot when the new one
//! does not load); [`Guard::watch`] polls the file and reloads when it changes.
//!
//! **Cost.** A check allocates nothing and does a fixed number of hash lookups, whatever the
//! number of rules (see the `matcher` module, `benches/guard.rs` and
//! `benches/guard_instructions.rs`). The common call, whose authority is the backend's name with
//! or without a port, takes one lookup when a method pattern allows it and two otherwise, from
//! one hashing pass over its strings; other authorities are resolved first, which takes one or
//! two more. Authorities that are IP addresses are owned as the snapshot's owner index says
//! (`Snapshot::owners`): an address written as an endpoint writes it is found by its text, any
//! other by one lookup per prefix length in use, longest first.

mod layer;
mod matcher;
mod metrics;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;

pub use layer::{CallError, GuardBody, GuardLayer, GuardService, ResponseFuture, RpcDenied};
pub use matcher::Reason;
pub use metrics::{GUARD_RELOADS_TOTAL, RPC_CALLS_TOTAL, describe_metrics};

use crate::policy::Mode;
use crate::snapshot::{ContentHash, RpcRule, Snapshot, SnapshotError};
use crate::verdict::Verdict;
use matcher::Matcher;

/// Loading or reloading a snapshot failed. The guard keeps its last good snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The snapshot file could not be read.
    #[error("cannot read snapshot `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid snapshot (bad magic, another format, damaged).
    #[error("invalid snapshot `{path}`: {source}")]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SnapshotError,
    },
    /// The snapshot has no such environment.
    #[error("environment `{environment}` is not in the snapshot (it has {known})")]
    UnknownEnvironment {
        /// The environment asked for.
        environment: String,
        /// The snapshot's environments, as a list.
        known: String,
    },
    /// The snapshot has no such service.
    #[error("service `{service}` is not in the snapshot")]
    UnknownService {
        /// The service asked for.
        service: String,
    },
    /// The guard was built from a snapshot in memory, so there is no file to reload.
    #[error("the guard was built from a snapshot in memory: there is no file to reload")]
    NoFile,
}

/// A snapshot with its index, as the guard holds it.
#[derive(Debug)]
struct Loaded {
    snapshot: Snapshot,
    matcher: Matcher,
    generation: u64,
}

impl Loaded {
    fn new(snapshot: Snapshot, environment: &str, generation: u64) -> Result<Loaded, LoadError> {
        let Some(env) = snapshot.environment_index(environment) else {
            let known = snapshot.environments().iter().map(|e| format!("`{}`", e.name)).collect::<Vec<_>>();
            return Err(LoadError::UnknownEnvironment { environment: environment.to_owned(), known: known.join(", ") });
        };
        let matcher = Matcher::new(&snapshot, env);
        Ok(Loaded { snapshot, matcher, generation })
    }

    fn name(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|id| self.snapshot.services().get(id as usize)).map(|s| s.name.as_str())
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The file holds the snapshot already in force.
    Unchanged,
    /// A new snapshot is in force.
    Replaced {
        /// Its generation (1 for the first snapshot the guard loaded).
        generation: u64,
        /// Its content hash.
        hash: ContentHash,
    },
}

#[derive(Debug)]
struct Shared {
    current: ArcSwap<Loaded>,
    environment: String,
    path: Option<PathBuf>,
    generations: AtomicU64,
    /// Serialises reloads, so two of them cannot interleave their read and store.
    reloading: Mutex<()>,
}

/// RPC-name checks against a compiled snapshot, for one environment. Cheap to clone (all
/// clones share the snapshot); safe to use from any number of threads.
#[derive(Debug, Clone)]
pub struct Guard {
    shared: Arc<Shared>,
}

/// Reads and verifies a snapshot file.
fn read_snapshot(path: &Path) -> Result<Snapshot, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
    Snapshot::from_bytes(&bytes).map_err(|source| LoadError::Snapshot { path: path.to_owned(), source })
}

impl Guard {
    /// Loads a snapshot file written by `policyctl compile -o FILE` and judges calls for
    /// `environment`. [`Guard::reload`] and [`Guard::watch`] reread this file.
    pub fn from_file(path: impl Into<PathBuf>, environment: &str) -> Result<Guard, LoadError> {
        let path = path.into();
        let snapshot = read_snapshot(&path)?;
        Self::build(snapshot, environment, Some(path))
    }

    /// Follows the snapshot the agent applies: the agent writes it to
    /// [`AGENT_SNAPSHOT_FILE`](crate::snapshot::AGENT_SNAPSHOT_FILE) in its state directory
    /// (`/var/lib/depfence` unless `--state-dir` says otherwise) whenever a policy comes into
    /// force. Call [`Guard::watch`] to pick up the next ones.
    pub fn from_agent(state_dir: impl AsRef<Path>, environment: &str) -> Result<Guard, LoadError> {
        Self::from_file(state_dir.as_ref().join(crate::snapshot::AGENT_SNAPSHOT_FILE), environment)
    }

    /// A guard over a snapshot already in memory (from the agent, or compiled in process).
    /// [`Guard::replace`] swaps it.
    pub fn from_snapshot(snapshot: Snapshot, environment: &str) -> Result<Guard, LoadError> {
        Self::build(snapshot, environment, None)
    }

    fn build(snapshot: Snapshot, environment: &str, path: Option<PathBuf>) -> Result<Guard, LoadError> {
        let loaded = Loaded::new(snapshot, environment, 1)?;
        Ok(Guard {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(loaded),
                environment: environment.to_owned(),
                path,
                generations: AtomicU64::new(1),
                reloading: Mutex::new(()),
            }),
        })
    }

    /// Judges a call from `service` to the RPC `rpc` (a request path such as
    /// `/billing.Billing/Charge`) on the backend named by `authority` (`host[:port]`). Does not
    /// allocate. The decision keeps the snapshot that made it alive; drop it soon.
    pub fn check(&self, service: &str, rpc: &str, authority: &str) -> Decision {
        let loaded = self.shared.current.load();
        let (verdict, mode, reason) = loaded.matcher.decide(service, rpc, authority);
        Decision { verdict, mode, reason, loaded: Held::Guard(loaded) }
    }

    /// The snapshot in force now, pinned: every check on it is judged by that one snapshot,
    /// whatever reloads happen meanwhile.
    pub fn pin(&self) -> Pinned {
        Pinned { loaded: self.shared.current.load_full() }
    }

    /// The environment the guard judges for.
    pub fn environment(&self) -> &str {
        &self.shared.environment
    }

    /// The snapshot file, when the guard was loaded from one.
    pub fn path(&self) -> Option<&Path> {
        self.shared.path.as_deref()
    }

    /// Puts `snapshot` in force for every later check. Fails (and changes nothing) when it
    /// lacks the guard's environment. Returns the new generation.
    pub fn replace(&self, snapshot: Snapshot) -> Result<u64, LoadError> {
        let _serial = self.shared.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.store(snapshot)
    }

    fn store(&self, snapshot: Snapshot) -> Result<u64, LoadError> {
        let generation = self.shared.generations.load(Ordering::Relaxed) + 1;
        let loaded = Loaded::new(snapshot, &self.shared.environment, generation)?;
        self.shared.generations.store(generation, Ordering::Relaxed);
        self.shared.current.store(Arc::new(loaded));
        Ok(generation)
    }

    /// Rereads the snapshot file. A file that does not load (unreadable, damaged, half
    /// written, without the environment) changes nothing: the last good snapshot stays.
    pub fn reload(&self) -> Result<Reloaded, LoadError> {
        let path = self.shared.path.as_deref().ok_or(LoadError::NoFile)?;
        let _serial = self.shared.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = read_snapshot(path).and_then(|snapshot| {
            if snapshot.hash() == self.shared.current.load().snapshot.hash() {
                return Ok(Reloaded::Unchanged);
            }
            let hash = snapshot.hash();
            self.store(snapshot).map(|generation| Reloaded::Replaced { generation, hash })
        });
        metrics::record_reload(&result);
        result
    }

    /// Watches the snapshot file: every `interval` a thread compares the file's size,
    /// modification time and inode with what it last loaded, and reloads when they change
    /// (an atomic rename onto the file counts). A failed reload is logged and retried at the
    /// next poll; the last good snapshot stays in force. The watch stops when the returned
    /// [`Watcher`] is dropped.
    pub fn watch(&self, interval: Duration) -> Result<Watcher, LoadError> {
        let path = self.shared.path.clone().ok_or(LoadError::NoFile)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let guard = self.clone();
        let thread = std::thread::Builder::new()
            .name("depfence-guard-watch".into())
            .spawn(move || watch_loop(&guard, &path, interval, &stopped))
            .map_err(|source| LoadError::Read { path: self.shared.path.clone().unwrap_or_default(), source })?;
        Ok(Watcher { stop: Some(stop), thread: Some(thread) })
    }

    /// The content hash of the snapshot in force.
    pub fn snapshot_hash(&self) -> ContentHash {
        self.shared.current.load().snapshot.hash()
    }

    /// The generation in force: 1 for the first snapshot, one more for each replacement.
    pub fn generation(&self) -> u64 {
        self.shared.current.load().generation
    }

    /// True when `service` is a service of the snapshot in force.
    pub fn has_service(&self, service: &str) -> bool {
        self.shared.current.load().snapshot.service(service).is_some()
    }
}

/// File identity for change detection: size, modification time, inode.
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?, meta.ino()))
}

fn watch_loop(guard: &Guard, path: &Path, interval: Duration, stopped: &mpsc::Receiver<()>) {
    // Nothing seen yet: the first poll rereads the file, so a change made after the guard
    // loaded it but before this thread took its first look is not missed.
    let mut seen = None;
    let mut last_error = None;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
        let now = stamp(path);
        if now.is_none() || now == seen {
            continue;
        }
        match guard.reload() {
            Ok(outcome) => {
                seen = now;
                last_error = None;
                if let Reloaded::Replaced { generation, hash } = outcome {
                    tracing::info!(path = %path.display(), generation, %hash, "guard snapshot reloaded");
                }
            }
            Err(error) => {
                // Retried at the next poll (the file may be half written); logged once per
                // distinct error.
                let message = error.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(path = %path.display(), error = %message, "guard snapshot not reloaded; the last good one stays");
                    last_error = Some(message);
                }
            }
        }
    }
}

/// Stops the watch thread of [`Guard::watch`] when dropped (and waits for it).
#[derive(Debug)]
pub struct Watcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The loop never panics; a join error would only repeat a panic already reported.
            let _ = thread.join();
        }
    }
}

/// A snapshot pinned by [`Guard::pin`].
#[derive(Debug, Clone)]
pub struct Pinned {
    loaded: Arc<Loaded>,
}

impl Pinned {
    /// As [`Guard::check`], on the pinned snapshot.
    pub fn check(&self, service: &str, rpc: &str, authority: &str) -> Decision {
        let (verdict, mode, reason) = self.loaded.matcher.decide(service, rpc, authority);
        Decision { verdict, mode, reason, loaded: Held::Arc(Arc::clone(&self.loaded)) }
    }

    /// The pinned snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.loaded.snapshot
    }

    /// Its generation.
    pub fn generation(&self) -> u64 {
        self.loaded.generation
    }
}

#[derive(Debug)]
enum Held {
    Guard(arc_swap::Guard<Arc<Loaded>>),
    Arc(Arc<Loaded>),
}

impl std::ops::Deref for Held {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        match self {
            Held::Guard(guard) => guard,
            Held::Arc(arc) => arc,
        }
    }
}

/// The outcome of a check: the verdict, the mode that applied, why, and the snapshot that
/// decided (kept alive while the decision lives).
#[derive(Debug)]
pub struct Decision {
    /// Allowed, would-reject (audit) or rejected (enforce).
    pub verdict: Verdict,
    /// The caller's mode in the guard's environment (`off` for an unknown caller).
    pub mode: Mode,
    /// Why.
    pub reason: Reason,
    loaded: Held,
}

impl Decision {
    /// The rule that allowed the call, if one did.
    pub fn rule(&self) -> Option<&RpcRule> {
        match self.reason {
            Reason::Rule { caller, rule, .. } => {
                self.loaded.snapshot.services().get(caller as usize)?.rpc_rules.get(rule as usize)
            }
            _ => None,
        }
    }

    /// Where the deciding rule was written (`file:line:col`), if a rule decided.
    pub fn rule_position(&self) -> Option<String> {
        let Reason::Rule { caller, .. } = self.reason else { return None };
        self.rule().map(|rule| self.loaded.snapshot.origin_position(caller, rule.origin))
    }

    /// The calling service's name, if it is a service of the snapshot.
    pub fn caller(&self) -> Option<&str> {
        self.loaded.name(self.reason.caller())
    }

    /// Where the calling service is defined (`file:line:col`): where its `rpc_allow` goes.
    pub fn caller_position(&self) -> Option<String> {
        self.reason.caller().map(|id| self.loaded.snapshot.service_position(id))
    }

    /// The backend service the authority named, if any.
    pub fn backend(&self) -> Option<&str> {
        self.loaded.name(self.reason.backend())
    }

    /// The snapshot that decided.
    pub fn snapshot(&self) -> &Snapshot {
        &self.loaded.snapshot
    }

    /// Its generation in the guard.
    pub fn generation(&self) -> u64 {
        self.loaded.generation
    }

    /// Counts the call in `depfence_rpc_calls_total{service, backend, verdict}` (the backend is
    /// `unknown` when the authority names no service). `service` is the caller as checked.
    pub fn record(&self, service: &str) {
        metrics::record_call(self, service);
    }

    /// The caller's and backend's names as shared strings, for metric labels.
    fn labels(&self) -> (Option<Arc<str>>, Option<Arc<str>>) {
        let label = |id: Option<u32>| id.and_then(|id| self.loaded.matcher.labels.get(id as usize)).cloned();
        (label(self.reason.caller()), label(self.reason.backend()))
    }
}
