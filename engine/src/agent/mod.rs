//! `policyctl agent`: the daemon that keeps a policy in force on one machine.
//!
//! One task owns the state (the kernel handle, the policy in force, the event log) and does
//! everything in order: reloads (file change, SIGHUP, `policyctl reload`), cgroup scans
//! (every `scan_interval`, so a new cgroup is under its policy well within a second), event
//! draining and metric export. The control socket and the file watcher only send it messages.
//!
//! An invalid policy is never applied: its located diagnostics go to the log and to
//! `policyctl status`, the reload-failure metric goes up, and the last good policy stays in
//! force. When the agent stops (or dies), the pinned programs and maps keep enforcing; the
//! next agent adopts them.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use metrics::{counter, gauge};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info, warn};

use crate::cgroup::Cgroup2;
use crate::datapath::{abi, pins::PinLayout};
use crate::dns::kernel::KernelDns;
use crate::dns::{AllowChange, AllowSet, DenyResponse, DnsEvent, DnsPolicy, Proxy, ProxyConfig, TtlBounds};
use crate::snapshot::{Connection, Snapshot};
use crate::verdict::Verdict;

pub mod control;
pub mod discovery;
pub mod kernel;
pub mod telemetry;

use self::control::{AgentStatus, CandidateStatus, ReloadStatus, Request, Response, ServiceStatus};
use self::discovery::{FoundCgroup, Selectors};
use self::kernel::{Desired, Kernel};
use self::telemetry::{DestinationOwners, EventLog, EventRecord, unix_seconds};

/// Where the agent pins its maps and links by default.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/depfence";
/// Where the agent keeps its state (counter slots, promotion log, evidence) by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/depfence";
/// Default metrics address: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9477";

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Policy file or directory.
    pub policy: PathBuf,
    /// The environment this machine is in (selects each service's mode).
    pub environment: String,
    /// bpffs directory for pins.
    pub pin_root: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Control socket.
    pub control_socket: PathBuf,
    /// Prometheus listen address (None: no exporter).
    pub metrics_listen: Option<SocketAddr>,
    /// How often the cgroup tree is scanned.
    pub scan_interval: Duration,
    /// Exact-rule capacity of the kernel map (two generations must fit during a swap).
    pub rule_capacity: u32,
    /// What `promote --enforce` requires.
    pub gate: crate::promote::GateConfig,
    /// The DNS proxy for services with host rules (None: no proxy, and host rules allow
    /// nothing).
    pub dns: Option<DnsSettings>,
}

/// How the agent's DNS proxy runs.
#[derive(Debug, Clone, Default)]
pub struct DnsSettings {
    /// Its port on loopback; 0 takes a free one (the kernel redirect learns it either way).
    pub port: u16,
    /// Upstream servers; empty: the nameservers of /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    /// The answer to a denied name in enforce.
    pub deny: DenyResponse,
    /// How long an answered address stays allowed.
    pub ttl: TtlBounds,
}

impl AgentConfig {
    /// The defaults for a policy and an environment.
    pub fn new(policy: PathBuf, environment: String) -> Self {
        Self {
            policy,
            environment,
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            control_socket: PathBuf::from(control::DEFAULT_SOCKET),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().ok(),
            scan_interval: Duration::from_millis(250),
            rule_capacity: abi::MAX_RULES,
            gate: crate::promote::GateConfig::default(),
            dns: Some(DnsSettings::default()),
        }
    }
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No cgroup v2.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The kernel side could not be set up (needs root: CAP_BPF, CAP_SYS_ADMIN).
    #[error("kernel datapath: {0}")]
    Kernel(#[from] kernel::KernelError),
    /// A directory or socket could not be made.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics exporter could not start.
    #[error("metrics exporter on {addr}: {message}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The DNS proxy could not start.
    #[error("dns proxy: {0}")]
    Dns(#[from] crate::dns::DnsError),
    /// The policy does not declare the agent's environment.
    #[error("the policy has no environment `{environment}` (it declares: {declared})")]
    UnknownEnvironment {
        /// The one asked for.
        environment: String,
        /// The declared ones.
        declared: String,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AgentError + 'a {
    move |source| AgentError::Io { what, path: path.to_owned(), source }
}

/// A message to the state task.
enum Message {
    /// A control request, the uid of the process that sent it, and where to answer.
    Request(Request, Option<u32>, oneshot::Sender<Response>),
    /// A subscription to new events (with the recent ones).
    Subscribe(usize, oneshot::Sender<(Vec<EventRecord>, broadcast::Receiver<EventRecord>)>),
    /// A policy file changed.
    PolicyChanged,
    /// The DNS proxy judged a question (or saw something worth recording).
    Dns(DnsEvent),
}

/// The running DNS proxy and its kernel half.
struct DnsRuntime {
    proxy: Proxy,
    kernel: Arc<KernelDns>,
}

/// Starts the DNS proxy: questions are attributed from the kernel's slots, admitted addresses
/// go into `DF_NAMES` before the answer leaves, and events go to the state task.
async fn start_dns(
    settings: &DnsSettings,
    layout: &PinLayout,
    tx: mpsc::Sender<Message>,
) -> Result<DnsRuntime, AgentError> {
    let kernel = Arc::new(KernelDns::open(layout).map_err(kernel::KernelError::from)?);
    let sink = Arc::clone(&kernel);
    let allow = Arc::new(AllowSet::new(settings.ttl, abi::MAX_NAMES as usize / 2, move |change: &AllowChange| {
        if let Err(e) = sink.apply_change(change) {
            warn!("dns allow set: {e}");
        }
    }));
    tokio::spawn(Arc::clone(&allow).run_sweeper());
    let config = ProxyConfig {
        port: settings.port,
        upstreams: settings.upstreams.clone(),
        deny: settings.deny,
        ..ProxyConfig::default()
    };
    let events = move |event: DnsEvent| {
        telemetry::export_dns_event(&event);
        let allowed = matches!(&event, DnsEvent::Query(q) if q.verdict == Verdict::Allowed);
        if !allowed && tx.try_send(Message::Dns(event)).is_err() {
            counter!("depfence_dns_events_dropped_total").increment(1);
        }
    };
    let attributor: Arc<dyn crate::dns::Attributor> = Arc::clone(&kernel) as _;
    let proxy = Proxy::bind(config, DnsPolicy::default(), attributor, allow, events).await?;
    info!(port = proxy.port(), upstreams = ?proxy.upstreams(), "dns proxy listening on loopback");
    Ok(DnsRuntime { proxy, kernel })
}

/// A compiled policy or the rendered reasons it was refused.
fn compile_policy(path: &Path) -> Result<Snapshot, Vec<String>> {
    let compiled = crate::compile::compile_path(path).map_err(|e| e.lines())?;
    for warning in compiled.warning_lines() {
        warn!(target: "depfence::policy", "{warning}");
    }
    Ok(compiled.snapshot)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Writes the snapshot in force to the state directory, where in-process guards follow it
/// (`Guard::from_agent`). A failure is logged: the kernel already enforces the policy.
fn publish_snapshot(state_dir: &Path, snapshot: &Snapshot) {
    let path = state_dir.join(crate::snapshot::AGENT_SNAPSHOT_FILE);
    let written = snapshot
        .to_bytes()
        .map_err(|e| e.to_string())
        .and_then(|bytes| crate::snapshot::write_file(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = written {
        warn!(path = %path.display(), "cannot publish the snapshot for in-process guards: {e}");
    }
}

/// The state task's data.
struct Agent {
    config: AgentConfig,
    cgroup2: Cgroup2,
    kernel: Kernel,
    active: Option<(Arc<Snapshot>, usize)>,
    candidate: Option<(PathBuf, Arc<Snapshot>, usize)>,
    last_reload: Option<ReloadStatus>,
    found: Vec<FoundCgroup>,
    events: EventLog,
    event_tx: broadcast::Sender<EventRecord>,
    dropped: u64,
    rollout: crate::promote::Rollout,
    owners: DestinationOwners,
    dns: Option<DnsRuntime>,
}

impl Agent {
    /// Compiles the policy and, if valid, applies it. Returns whether it is in force.
    fn reload(&mut self, why: &str) -> bool {
        let started = std::time::Instant::now();
        let result = compile_policy(&self.config.policy).and_then(|snapshot| {
            let env = snapshot.environment_index(&self.config.environment).ok_or_else(|| {
                let declared: Vec<&str> = snapshot.environments().iter().map(|e| e.name.as_str()).collect();
                vec![format!(
                    "{}: the policy has no environment `{}` (it declares: {})",
                    self.config.policy.display(),
                    self.config.environment,
                    declared.join(", ")
                )]
            })?;
            let previous = self.active.replace((Arc::new(snapshot), env));
            match self.apply() {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.active = previous;
                    Err(vec![format!("applying to the kernel: {e}")])
                }
            }
        });
        let ok = result.is_ok();
        let errors = result.err().unwrap_or_default();
        if let (true, Some((snapshot, _))) = (ok, &self.active) {
            self.owners = DestinationOwners::new(snapshot);
            publish_snapshot(&self.config.state_dir, snapshot);
        }
        if ok {
            let hash = self.active.as_ref().map(|(s, _)| s.hash().to_string()).unwrap_or_default();
            info!(
                reason = why,
                generation = self.kernel.generation(),
                hash,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "policy applied"
            );
            counter!("depfence_policy_reloads_total", "result" => "success").increment(1);
            gauge!("depfence_policy_last_reload_success_timestamp_seconds").set(unix_seconds(SystemTime::now()));
        } else {
            for e in &errors {
                error!(target: "depfence::policy", "{e}");
            }
            error!(reason = why, errors = errors.len(), "policy rejected; the last good policy stays in force");
            counter!("depfence_policy_reloads_total", "result" => "failure").increment(1);
        }
        gauge!("depfence_policy_last_reload_successful").set(if ok { 1.0 } else { 0.0 });
        self.last_reload = Some(ReloadStatus { time: now_rfc3339(), ok, errors });
        ok
    }

    /// Applies the policy in force to the cgroups last found.
    fn apply(&mut self) -> Result<(), kernel::KernelError> {
        let Some((snapshot, environment)) = self.active.clone() else { return Ok(()) };
        let selectors = Selectors::new(&snapshot);
        let (matched, conflicts) = selectors.assign(&self.found);
        for c in &conflicts {
            warn!(cgroup = c.cgroup, chosen = c.chosen, also = c.also, "two services select one cgroup");
        }
        let attach = discovery::attach_points(&matched);
        let candidate = self.candidate.as_ref().map(|(_, s, e)| (s.as_ref(), *e));
        let desired = Desired { snapshot: &snapshot, environment, candidate, matched: &matched, attach: &attach };
        let report = self.kernel.apply(&desired)?;
        if let Some(dns) = &self.dns {
            dns.kernel.set_services(self.kernel.services().iter().map(|(name, s)| (name.as_str(), s.slot)));
            dns.proxy.set_policy(DnsPolicy::from_snapshot(&snapshot, environment));
        }
        for cgroup in &report.registered {
            info!(cgroup, service = selectors.service_of(cgroup).unwrap_or_default(), "cgroup registered");
        }
        for id in &report.unregistered {
            info!(cgroup_id = id, "cgroup left the policy");
        }
        for (service, from, to) in &report.mode_changes {
            info!(service, from = from.map(crate::policy::Mode::as_str), to = to.as_str(), "mode");
        }
        gauge!("depfence_policy_generation").set(f64::from(self.kernel.generation()));
        gauge!("depfence_policy_info", "hash" => snapshot.hash().to_string(), "environment" => self.config.environment.clone())
            .set(1.0);
        Ok(())
    }

    /// Re-reads the cgroup tree; applies if it changed.
    fn rescan(&mut self) {
        match discovery::walk(self.cgroup2.mount()) {
            Ok(found) if found != self.found => {
                self.found = found;
                if let Err(e) = self.apply() {
                    error!("applying after a cgroup change: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => warn!("scanning cgroups: {e}"),
        }
    }

    fn drain_events(&mut self) {
        let now = SystemTime::now();
        for event in self.kernel.maps().drain_events() {
            let service = self.kernel.service_of_cgroup(event.policy_cgroup_id).map(str::to_owned);
            let cgroup = self.found.iter().find(|c| c.id == event.cgroup_id).map(|c| c.relative.clone());
            let Some(record) = EventRecord::new(&event, service, cgroup, &self.owners, now) else { continue };
            if let (Some(service), Verdict::WouldReject) = (&record.service, record.verdict) {
                self.rollout.record_destination(service, now, &record.destination);
            }
            let _ = self.event_tx.send(record.clone());
            self.events.record(record);
        }
    }

    /// Records what the DNS proxy reported: judged questions that were not simply allowed go
    /// to the event log (and a would-reject counts as evidence against promotion).
    fn dns_event(&mut self, event: DnsEvent) {
        match event {
            DnsEvent::Query(query) if query.verdict != Verdict::Allowed => {
                let now = SystemTime::now();
                let cgroup = self.found.iter().find(|c| c.id == query.who.cgroup_id).map(|c| c.relative.clone());
                let record = EventRecord::from_query(&query, cgroup, self.kernel.generation(), now);
                if record.verdict == Verdict::WouldReject {
                    self.rollout.record_destination(&query.who.service, now, &record.destination);
                }
                info!(
                    service = %query.who.service,
                    name = query.name,
                    pid = query.who.pid,
                    comm = query.who.comm,
                    verdict = record.verdict.as_str(),
                    "dns question"
                );
                let _ = self.event_tx.send(record.clone());
                self.events.record(record);
            }
            DnsEvent::SharedAddress(shared) => warn!(
                service = %shared.service,
                addr = %shared.addr,
                allowed = shared.allowed_name,
                denied = shared.denied_name,
                "an allowed and a denied name share an address: connecting to it is allowed"
            ),
            DnsEvent::Unattributed { client, local, name, .. } => {
                warn!(%client, %local, name, "dns question from no known service: refused");
            }
            _ => {}
        }
    }

    fn export(&mut self) {
        let now = SystemTime::now();
        for (name, service) in self.kernel.services() {
            let counts = self.kernel.counters(service.slot);
            telemetry::export_service(name, counts, service.mode, service.mode_since, service.cgroups.len());
            self.rollout.record(name, now, counts.allowed, counts.would_reject);
        }
        self.rollout.persist(now, false);
        let dropped = self.kernel.maps().global(abi::GLOBAL_EVENTS_DROPPED).unwrap_or(0);
        counter!("depfence_events_dropped_total").absolute(dropped);
        self.dropped = dropped;
        let (rules, cidrs, cgroups) = self.kernel.fill();
        let fill = [
            ("DF_RULES", rules, self.config.rule_capacity),
            ("DF_CIDRS", cidrs, abi::MAX_CIDRS),
            ("DF_CGROUPS", cgroups, abi::MAX_CGROUPS),
        ];
        for (map, entries, capacity) in fill {
            gauge!("depfence_map_entries", "map" => map).set(entries as f64);
            gauge!("depfence_map_capacity", "map" => map).set(f64::from(capacity));
        }
    }

    fn status(&self) -> AgentStatus {
        let services = self
            .kernel
            .services()
            .iter()
            .map(|(name, s)| ServiceStatus {
                name: name.clone(),
                mode: s.mode.as_str().to_owned(),
                mode_since: humantime::format_rfc3339_seconds(s.mode_since).to_string(),
                cgroups: s.cgroups.values().cloned().collect(),
                counts: self.kernel.counters(s.slot),
                last_would_reject: self.events.last_would_reject(name).cloned(),
            })
            .collect::<Vec<_>>();
        let total = self.active.as_ref().map_or(0, |(s, _)| s.services().len());
        AgentStatus {
            ready: self.active.is_some(),
            environment: self.config.environment.clone(),
            policy: self.config.policy.clone(),
            generation: self.kernel.generation(),
            policy_hash: self.active.as_ref().map(|(s, _)| s.hash().to_string()),
            last_reload: self.last_reload.clone(),
            candidate: self
                .candidate
                .as_ref()
                .map(|(path, s, _)| CandidateStatus { path: path.clone(), hash: s.hash().to_string() }),
            services_without_cgroups: total.saturating_sub(services.len()),
            services,
            events_dropped: self.dropped,
            dns: self.dns.as_ref().map(|d| control::DnsStatus {
                port: d.proxy.port(),
                upstreams: d.proxy.upstreams().to_vec(),
                admitted: d.kernel.admitted(),
            }),
        }
    }

    fn explain(&self, from: &str, to: &str) -> Response {
        let Some((snapshot, _)) = &self.active else { return Response::error("no policy in force yet") };
        let conn: Connection = match to.parse() {
            Ok(c) => c,
            Err(e) => return Response::error(e.to_string()),
        };
        let environment = crate::explain::Environments::Named(&self.config.environment);
        match crate::explain::explain(snapshot, None, from, conn, environment) {
            Ok(mut explanation) => {
                explanation.live = Some(crate::explain::Live { generation: self.kernel.generation() });
                Response::ok(explanation)
            }
            Err(e) => Response::error(format!("the policy in force: {e}")),
        }
    }

    fn handle(&mut self, request: Request, uid: Option<u32>) -> Response {
        match request {
            Request::Status => Response::ok(self.status()),
            Request::Explain { from, to } => self.explain(&from, &to),
            Request::Reload => {
                if self.reload("policyctl reload") {
                    Response::ok(self.status())
                } else {
                    let errors = self.last_reload.as_ref().map(|r| r.errors.join("\n")).unwrap_or_default();
                    Response::error(format!("the policy was not applied; the last good one stays in force:\n{errors}"))
                }
            }
            Request::ApplyCandidate { path } => self.apply_candidate(path),
            Request::DropCandidate => {
                let previous = self.candidate.take();
                match self.apply() {
                    Ok(()) => Response::ok(self.status()),
                    Err(e) => {
                        self.candidate = previous;
                        Response::error(format!("applying to the kernel: {e}"))
                    }
                }
            }
            Request::ActivateCandidate => self.activate_candidate(),
            Request::Promote { service, environment, mode, force, reason, dry_run } => {
                if dry_run {
                    return self.check_promotion(&service, environment);
                }
                self.change_mode(&service, environment, mode, force, reason, uid)
            }
            Request::Events { .. } => Response::error("events are streamed, not requested"),
        }
    }

    /// The evidence gate alone: would a promotion to enforce be accepted now?
    fn check_promotion(&mut self, service: &str, environment: Option<String>) -> Response {
        let Some((snapshot, _)) = &self.active else { return Response::error("no policy in force yet") };
        if snapshot.service(service).is_none() {
            return Response::error(format!("the policy in force has no service `{service}`"));
        }
        if environment.is_some_and(|e| e != self.config.environment) {
            return Response::error(format!(
                "this agent runs in `{}`; it has no evidence for other environments",
                self.config.environment
            ));
        }
        match self.rollout.check(service, SystemTime::now()) {
            Ok(evidence) => Response::ok(control::PromotionCheck { evidence }),
            Err(refusal) => Response::error(format!("promotion would be refused: {refusal}")),
        }
    }

    fn change_mode(
        &mut self,
        service: &str,
        environment: Option<String>,
        mode: crate::policy::Mode,
        force: bool,
        reason: Option<String>,
        uid: Option<u32>,
    ) -> Response {
        let Some((snapshot, _)) = &self.active else { return Response::error("no policy in force yet") };
        if snapshot.service(service).is_none() {
            return Response::error(format!("the policy in force has no service `{service}`"));
        }
        let environment = environment.unwrap_or_else(|| self.config.environment.clone());
        let who = uid.map_or_else(
            || crate::promote::Actor { user: "unknown".into(), uid: u32::MAX },
            |uid| crate::promote::Actor { user: crate::promote::user_name(uid), uid },
        );
        // The evidence is this machine's; an environment other than the agent's has none here.
        if mode == crate::policy::Mode::Enforce && !force && environment != self.config.environment {
            return Response::error(format!(
                "this agent runs in `{}`; it has no evidence for `{environment}` (ask an agent there, or --force)",
                self.config.environment
            ));
        }
        let policy = self.config.policy.clone();
        let outcome = match self.rollout.change_mode(&policy, service, &environment, mode, force, reason, who) {
            Ok(outcome) => outcome,
            Err(message) => return Response::error(message),
        };
        if outcome.changed && !self.reload("mode changed by policyctl") {
            let errors = self.last_reload.as_ref().map(|r| r.errors.join("\n")).unwrap_or_default();
            return Response::error(format!("the policy file was rewritten but not applied:\n{errors}"));
        }
        Response::ok(control::ModeChanged { outcome, generation: self.kernel.generation() })
    }

    /// The candidate's files replace the policy's; the reload makes it active.
    fn activate_candidate(&mut self) -> Response {
        let Some((path, _, _)) = self.candidate.clone() else { return Response::error("no candidate is loaded") };
        if let Err(e) = replace_policy(&path, &self.config.policy) {
            return Response::error(format!("copying {} over {}: {e}", path.display(), self.config.policy.display()));
        }
        info!(candidate = %path.display(), policy = %self.config.policy.display(), "candidate activated");
        self.candidate = None;
        if self.reload("candidate activated") {
            Response::ok(self.status())
        } else {
            let errors = self.last_reload.as_ref().map(|r| r.errors.join("\n")).unwrap_or_default();
            Response::error(format!("the activated policy was not applied:\n{errors}"))
        }
    }

    fn apply_candidate(&mut self, path: PathBuf) -> Response {
        let snapshot = match compile_policy(&path) {
            Ok(s) => s,
            Err(errors) => return Response::error(format!("the candidate is not valid:\n{}", errors.join("\n"))),
        };
        let Some(env) = snapshot.environment_index(&self.config.environment) else {
            return Response::error(format!("the candidate has no environment `{}`", self.config.environment));
        };
        let previous = self.candidate.replace((path, Arc::new(snapshot), env));
        match self.apply() {
            Ok(()) => Response::ok(self.status()),
            Err(e) => {
                self.candidate = previous;
                Response::error(format!("applying the candidate to the kernel: {e}"))
            }
        }
    }
}

/// Runs the agent until `shutdown` completes. Pins stay in place when it returns: the
/// kernel keeps enforcing the last policy.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let cgroup2 = Cgroup2::discover()?;
    std::fs::create_dir_all(&config.state_dir).map_err(io_error("creating", &config.state_dir))?;
    let (bpffs, mounted) = crate::datapath::pins::ensure_bpffs()
        .map_err(io_error("mounting bpffs at", Path::new(crate::datapath::pins::BPFFS)))?;
    if mounted {
        info!(path = %bpffs.display(), "mounted bpffs");
    }
    // Validate what can be validated before touching the kernel.
    if let Ok(snapshot) = compile_policy(&config.policy)
        && snapshot.environment_index(&config.environment).is_none()
    {
        let declared: Vec<&str> = snapshot.environments().iter().map(|e| e.name.as_str()).collect();
        return Err(AgentError::UnknownEnvironment {
            environment: config.environment.clone(),
            declared: declared.join(", "),
        });
    }
    let layout = PinLayout::new(&config.pin_root);
    let mut kernel = Kernel::open(&layout, &config.state_dir, cgroup2.mount(), config.rule_capacity)?;
    let rollout = crate::promote::Rollout::open(&config.state_dir, config.gate);

    telemetry::describe();
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| AgentError::Metrics { addr, message: e.to_string() })?;
        info!(%addr, "metrics on http://{addr}/metrics");
    }

    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let listener = bind_control(&config.control_socket)?;
    tokio::spawn(serve_control(listener, tx.clone()));
    let _watcher = watch_policy(&config.policy, tx.clone());
    let dns = match &config.dns {
        Some(settings) => {
            let dns = start_dns(settings, &layout, tx.clone()).await?;
            let own = crate::dns::kernel::own_cgroup_id(&cgroup2).unwrap_or(0);
            kernel.set_dns_proxy(dns.proxy.port(), own);
            Some(dns)
        }
        None => None,
    };

    let (event_tx, _) = broadcast::channel(4096);
    let mut agent = Agent {
        config,
        cgroup2,
        kernel,
        active: None,
        candidate: None,
        last_reload: None,
        found: Vec::new(),
        events: EventLog::default(),
        event_tx,
        dropped: 0,
        rollout,
        owners: DestinationOwners::default(),
        dns,
    };
    // Consumers before producers: the event log exists before the first apply.
    agent.found = discovery::walk(agent.cgroup2.mount()).unwrap_or_default();
    tokio::task::block_in_place(|| agent.reload("start"));
    agent.export();
    info!(ready = agent.active.is_some(), "agent running");

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(io_error("installing the SIGHUP handler", Path::new("-")))?;
    let mut scan = tokio::time::interval(agent.config.scan_interval);
    let mut drain = tokio::time::interval(Duration::from_millis(100));
    let mut export = tokio::time::interval(Duration::from_secs(1));
    for timer in [&mut scan, &mut drain, &mut export] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    tokio::pin!(shutdown);
    let mut reload_at: Option<tokio::time::Instant> = None;
    loop {
        let settle = reload_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(settle), if reload_at.is_some() => {
                reload_at = None;
                tokio::task::block_in_place(|| agent.reload("policy file changed"));
            }
            _ = hangup.recv() => { tokio::task::block_in_place(|| agent.reload("SIGHUP")); }
            _ = scan.tick() => tokio::task::block_in_place(|| agent.rescan()),
            _ = drain.tick() => agent.drain_events(),
            _ = export.tick() => tokio::task::block_in_place(|| agent.export()),
            message = rx.recv() => match message {
                None => break,
                Some(Message::Dns(event)) => agent.dns_event(event),
                Some(Message::PolicyChanged) => {
                    // Editors write in several steps: let the burst settle, then read once.
                    reload_at = Some(tokio::time::Instant::now() + Duration::from_millis(200));
                }
                Some(Message::Request(request, uid, reply)) => {
                    agent.drain_events();
                    let response = tokio::task::block_in_place(|| agent.handle(request, uid));
                    let _ = reply.send(response);
                }
                Some(Message::Subscribe(recent, reply)) => {
                    agent.drain_events();
                    let _ = reply.send((agent.events.recent(recent), agent.event_tx.subscribe()));
                }
            },
        }
    }
    agent.rollout.persist(SystemTime::now(), true);
    if agent.dns.take().is_some()
        && let Err(e) = agent.kernel.stop_dns_redirect()
    {
        warn!("turning the dns redirect off: {e}");
    }
    info!("agent stopping; the kernel keeps enforcing the last policy");
    let _ = std::fs::remove_file(&agent.config.control_socket);
    Ok(())
}

/// Writes `from` over `to`, file for file (a policy file, or a directory of `*.toml` files:
/// files missing from `from` are removed). Each file is replaced atomically.
fn replace_policy(from: &Path, to: &Path) -> std::io::Result<()> {
    let write_atomic =
        |path: &Path, bytes: &[u8]| crate::durable::replace(path, bytes, crate::durable::Access::KeepExisting);
    match (from.is_dir(), to.is_dir()) {
        (false, false) => write_atomic(to, &std::fs::read(from)?),
        (true, true) => {
            let toml = |dir: &Path| -> std::io::Result<Vec<std::ffi::OsString>> {
                let mut names = Vec::new();
                for entry in std::fs::read_dir(dir)? {
                    let name = entry?.file_name();
                    if Path::new(&name).extension().is_some_and(|e| e == "toml") {
                        names.push(name);
                    }
                }
                Ok(names)
            };
            let new = toml(from)?;
            for name in &new {
                write_atomic(&to.join(name), &std::fs::read(from.join(name))?)?;
            }
            for name in toml(to)? {
                if !new.contains(&name) {
                    std::fs::remove_file(to.join(name))?;
                }
            }
            Ok(())
        }
        _ => Err(std::io::Error::other("the candidate and the policy must both be files or both directories")),
    }
}

fn bind_control(path: &Path) -> Result<tokio::net::UnixListener, AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    }
    // A socket left by an agent that died; nothing listens on it.
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io_error("binding the control socket", path))?;
    control::restrict(path).map_err(io_error("restricting", path))?;
    Ok(listener)
}

async fn serve_control(listener: tokio::net::UnixListener, tx: mpsc::Sender<Message>) {
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

/// Watches the policy (its directory for a file, recursively for a directory) and sends a
/// message on every change. Returns the watcher, which must live as long as the agent.
fn watch_policy(path: &Path, tx: mpsc::Sender<Message>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let (dir, mode) = if target.is_dir() {
        (target.clone(), RecursiveMode::Recursive)
    } else {
        (target.parent().map_or_else(|| PathBuf::from("/"), Path::to_owned), RecursiveMode::NonRecursive)
    };
    let file = (!target.is_dir()).then(|| target.clone());
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = match &file {
            Some(file) => event.paths.iter().any(|p| p == file),
            None => event.paths.iter().any(|p| p.extension().is_some_and(|e| e == "toml")),
        };
        if relevant {
            let _ = tx.try_send(Message::PolicyChanged);
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(mut watcher) => match watcher.watch(&dir, mode) {
            Ok(()) => Some(watcher),
            Err(e) => {
                warn!("watching {}: {e}; reload with SIGHUP or `policyctl reload`", dir.display());
                None
            }
        },
        Err(e) => {
            warn!("file watching unavailable: {e}; reload with SIGHUP or `policyctl reload`");
            None
        }
    }
}
