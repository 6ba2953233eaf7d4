//! The agent's state and what it does with it: the policy in force and the candidate, the
//! cgroups found, the event log and the evidence; reloads, applies, requests from the control
//! socket, promotions. Everything here runs on the one state task, in order, over a
//! [`Dataplane`] and with the time given by the caller, so tests drive it without a kernel.
//!
//! An invalid policy is never applied: its located diagnostics go to the log and to `policyctl
//! status`, the reload-failure metric goes up, and the last good policy stays in force.
//!
//! The state directory's files are reported when damaged (log, `depfence_state_file_errors_total`)
//! and never stop enforcement: a damaged kernel state file is rebuilt from the kernel, a damaged
//! history is set aside, and either marks the evidence lost; a write that fails leaves what was
//! applied in force and refuses promotions until the directory can be written again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use metrics::{counter, gauge};
use tokio::sync::broadcast;
use tracing::{error, info, warn};

use super::compiler::{Attempt, PolicyCompiler};
use super::config::AgentConfig;
use super::control::{self, AgentStatus, CandidateStatus, ReloadStatus, Request, Response, RuleStatus, ServiceStatus};
use super::dataplane::Dataplane;
use super::discovery::{self, Selectors};
use super::dns::DnsRuntime;
use super::kernel::{Desired, Kernel, KernelError, Previous, StateFileProblem};
use super::publish::Publisher;
use super::telemetry::{self, EventLog, EventRecord};
use crate::cgroup::{FoundCgroup, nearest_registered};
use crate::compile::{CompileError, Compiled, compile_path};
use crate::datapath::abi::{self, user::words_addr};
use crate::datapath::sweep::ClosedSocket;
use crate::dns::DnsEvent;
use crate::explain::{Environments, Live, explain};
use crate::lower::proto_of;
use crate::promote::{Actor, ModeRequest, Rollout, user_name};
use crate::snapshot::{Connection, ContentHash, Snapshot};
use crate::timefmt::{rfc3339_seconds, unix_seconds};
use crate::verdict::{Mode, Verdict};

/// Connections of services in audit remembered as already reported (by socket cookie).
const MAX_WOULD_CLOSE_SEEN: usize = 65_536;

/// A compiled policy and the index of the agent's environment in it.
type InForce = (Arc<Compiled>, usize);

/// The state task's data.
pub struct State<D: Dataplane> {
    config: AgentConfig,
    kernel: Kernel<D>,
    active: Option<InForce>,
    /// Compiles the policy, keeping its last parse (so a reload re-parses changed files only),
    /// and starting at a change, while the burst of writes settles.
    compiler: PolicyCompiler,
    /// Files the last reload's compile parsed anew, and whether it started at the change.
    last_compile: (usize, bool),
    candidate: Option<(PathBuf, InForce)>,
    last_reload: Option<ReloadStatus>,
    found: Vec<FoundCgroup>,
    events: EventLog,
    event_tx: broadcast::Sender<EventRecord>,
    rollout: Rollout,
    dns: Option<DnsRuntime>,
    /// Connections the last applies' sweeps found, not yet turned into events.
    closed: Vec<ClosedSocket>,
    /// The policy hash last exported in `depfence_policy_info` (set to 0 when another replaces
    /// it, so that the agent reports one policy at a time).
    published_hash: Option<String>,
    /// Connections of services in audit that enforce would close, already reported (by
    /// cookie): one connection found by every sweep counts once.
    would_close_seen: BTreeSet<u64>,
    /// Would-rejects of such connections per service, for the next sample's evidence.
    would_close: BTreeMap<String, u64>,
    /// Services whose counters an apply zeroed, until their next sample (a service gone before
    /// it keeps its slot, and everything in it since the zeroing is its own).
    zeroed: BTreeSet<String>,
    /// Each rule's hits since the agent started: (service, rule) → hits.
    rule_hits: BTreeMap<(String, String), u64>,
    /// Hits not yet in the history (it records them once a step): (service, rule) → hits.
    unrecorded_hits: BTreeMap<(String, String), u64>,
    /// When hits were last recorded in the history.
    hits_recorded: SystemTime,
    /// The backends exported per service (bounded).
    backends_seen: BTreeMap<String, BTreeSet<String>>,
    /// The policies (active, candidate) the last apply built the kernel's rulesets from: the
    /// next apply keeps the rulesets of services whose rules stay.
    applied: Option<(InForce, Option<InForce>)>,
    /// The cgroup selectors of the policy in force (its regexes compiled once per policy, not
    /// at every apply), with the policy's hash.
    selectors: Option<(ContentHash, Arc<Selectors>)>,
    /// How long the last apply's kernel part took (the reload log says it).
    kernel_apply: Duration,
    /// Writes the snapshot in force for in-process guards.
    publisher: Publisher,
}

impl<D: Dataplane> State<D> {
    /// The state of a starting agent at `now`: nothing applied yet. Reports the files of the
    /// state directory found damaged (by the kernel books and the rollout), and marks the
    /// evidence lost when the kernel state file was not usable.
    pub fn new(config: AgentConfig, kernel: Kernel<D>, dns: Option<DnsRuntime>, now: SystemTime) -> Self {
        let (mut rollout, damaged) = Rollout::open(&config.state_dir, config.gate, now);
        for file in &damaged {
            telemetry::state_file_error(file.error.path(), file.error.kind());
            let aside = file.set_aside.as_ref().map(|p| format!("; kept as `{}`", p.display())).unwrap_or_default();
            if file.evidence_lost {
                error!(
                    skipped_lines = file.skipped_lines,
                    "{}{aside}; the evidence of every service counts as lost from now", file.error
                );
                telemetry::evidence_lost(None);
            } else {
                error!("{}; new records are appended after it", file.error);
            }
        }
        if let Some(problem) = kernel.state_problem() {
            telemetry::state_file_error(problem.path(), problem.kind());
            let aside = match problem {
                StateFileProblem::Damaged { set_aside: Some(p), .. } => format!("; kept as `{}`", p.display()),
                _ => String::new(),
            };
            error!(
                "{problem}{aside}; rebuilt from the kernel: counter slots from the registered cgroups, ruleset ids and \
                 the generation; mode-change times are unknown; the evidence of every service counts as lost from now"
            );
            rollout.lose_evidence(now, &problem.to_string());
            telemetry::evidence_lost(None);
        }
        // Unit tests count metrics per thread: there, every snapshot is written in line.
        let publisher = Publisher::new(&config.state_dir, !cfg!(test));
        let (event_tx, _) = broadcast::channel(4096);
        let compiler = PolicyCompiler::new(&config.policy);
        State {
            config,
            kernel,
            active: None,
            compiler,
            last_compile: (0, false),
            candidate: None,
            last_reload: None,
            found: Vec::new(),
            events: EventLog::default(),
            event_tx,
            rollout,
            dns,
            closed: Vec::new(),
            published_hash: None,
            would_close_seen: BTreeSet::new(),
            would_close: BTreeMap::new(),
            zeroed: BTreeSet::new(),
            rule_hits: BTreeMap::new(),
            unrecorded_hits: BTreeMap::new(),
            hits_recorded: now,
            backends_seen: BTreeMap::new(),
            applied: None,
            selectors: None,
            kernel_apply: Duration::ZERO,
            publisher,
        }
    }

    /// The settings.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Whether a policy is in force.
    pub fn ready(&self) -> bool {
        self.active.is_some()
    }

    /// The kernel books (tests inspect the in-memory dataplane through them).
    #[cfg(test)]
    pub(crate) fn kernel_mut(&mut self) -> &mut Kernel<D> {
        &mut self.kernel
    }

    /// How many policy files the last reload parsed anew (the others came from its cache).
    #[cfg(test)]
    pub(crate) fn policy_files_reparsed(&self) -> usize {
        self.last_compile.0
    }

    /// Whether the last reload applied a compile started at the change.
    #[cfg(test)]
    pub(crate) fn compiled_early(&self) -> bool {
        self.last_compile.1
    }

    /// Waits for the compile a change started (see [`State::policy_changed`]).
    #[cfg(test)]
    pub(crate) fn finish_early_compile(&mut self) {
        self.compiler.finish_early();
    }

    /// The kernel books, for the next agent (tests restart the agent on the same dataplane).
    #[cfg(test)]
    pub(crate) fn into_kernel(self) -> Kernel<D> {
        self.kernel
    }

    /// [`State::reload`] after reading every policy file, whatever its times say: what an
    /// operator asks for (SIGHUP, `policyctl reload`), and the way to pick up an edit the file
    /// times do not show (a network file system's cached attributes).
    pub fn reload_everything(&mut self, why: &str, now: SystemTime) -> bool {
        self.compiler.forget_stamps();
        self.reload(why, now)
    }

    /// The policy's files changed (the watcher saw it at `seen`): starts compiling them while
    /// the writes settle (the next [`State::reload_settled`] takes the result unless they
    /// changed again after the compile started).
    pub fn policy_changed(&mut self, seen: Instant) {
        self.compiler.changed(seen);
    }

    /// Compiles the policy and, if valid, applies it. Returns whether it is in force.
    pub fn reload(&mut self, why: &str, now: SystemTime) -> bool {
        self.reload_compiled(why, now, PolicyCompiler::compile)
    }

    /// [`State::reload`] once the writes the watcher reported have settled: applies the compile
    /// the first of them started unless a change was seen after it started.
    pub fn reload_settled(&mut self, now: SystemTime) -> bool {
        self.reload_compiled("policy file changed", now, PolicyCompiler::compile_settled)
    }

    fn reload_compiled(&mut self, why: &str, now: SystemTime, compile: fn(&mut PolicyCompiler) -> Attempt) -> bool {
        let started = Instant::now();
        let attempt = compile(&mut self.compiler);
        self.last_compile = (attempt.reparsed, attempt.early);
        let compiled_at = Instant::now();
        let result = self.in_force(&self.config.policy, attempt.result).and_then(|in_force| {
            let previous = self.active.replace(in_force);
            self.apply().map_err(|e| {
                self.active = previous;
                vec![format!("applying to the kernel: {e}")]
            })
        });
        let ok = result.is_ok();
        let errors = result.err().unwrap_or_default();
        if ok {
            // How long the reload took until the kernel had it (compile, then apply), so a
            // policy that grows slow to reload shows on a dashboard before it hurts. An early
            // compile ran while the writes settled: the reload only waited for its end.
            let (compile, apply) = (attempt.took, compiled_at.elapsed());
            let hash = self.active.as_ref().map(|(c, _)| c.snapshot.hash().to_string()).unwrap_or_default();
            if let Some((compiled, _)) = &self.active {
                self.publisher.publish(compiled);
            }
            info!(
                reason = why,
                generation = self.kernel.generation(),
                hash,
                files_reparsed = attempt.reparsed,
                files_unread = attempt.unread,
                compiled_early = attempt.early,
                compile_ms = compile.as_millis() as u64,
                apply_ms = apply.as_millis() as u64,
                kernel_ms = self.kernel_apply.as_millis() as u64,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "policy applied"
            );
            gauge!("depfence_policy_last_reload_duration_seconds", "stage" => "compile").set(compile.as_secs_f64());
            gauge!("depfence_policy_last_reload_duration_seconds", "stage" => "apply").set(apply.as_secs_f64());
            counter!("depfence_policy_reloads_total", "result" => "success").increment(1);
            gauge!("depfence_policy_last_reload_success_timestamp_seconds").set(unix_seconds(now));
        } else {
            for e in &errors {
                error!(target: "depfence::policy", "{e}");
            }
            error!(reason = why, errors = errors.len(), "policy rejected; the last good policy stays in force");
            counter!("depfence_policy_reloads_total", "result" => "failure").increment(1);
        }
        gauge!("depfence_policy_last_reload_successful").set(if ok { 1.0 } else { 0.0 });
        self.last_reload = Some(ReloadStatus { time: rfc3339_seconds(now), ok, errors });
        ok
    }

    /// The policy at `path` compiled for this agent's environment, or why not (one line each).
    fn compile(&self, path: &Path) -> Result<InForce, Vec<String>> {
        self.in_force(path, compile_path(path))
    }

    /// A compiled policy with the index of this agent's environment in it, or why not.
    fn in_force(&self, path: &Path, compiled: Result<Compiled, CompileError>) -> Result<InForce, Vec<String>> {
        let compiled = compiled.map_err(|e| e.lines())?;
        for warning in compiled.warning_lines() {
            warn!(target: "depfence::policy", "{warning}");
        }
        let env = compiled.snapshot.environment_index(&self.config.environment).ok_or_else(|| {
            let declared: Vec<&str> = compiled.snapshot.environments().iter().map(|e| e.name.as_str()).collect();
            vec![format!(
                "{}: the policy has no environment `{}` (it declares: {})",
                path.display(),
                self.config.environment,
                declared.join(", ")
            )]
        })?;
        Ok((Arc::new(compiled), env))
    }

    /// Applies the policy in force to the cgroups last found.
    fn apply(&mut self) -> Result<(), KernelError> {
        let Some((compiled, environment)) = self.active.clone() else { return Ok(()) };
        let snapshot = &compiled.snapshot;
        let selectors = match &self.selectors {
            Some((hash, selectors)) if *hash == snapshot.hash() => Arc::clone(selectors),
            _ => {
                let previous = self.selectors.as_ref().map(|(_, s)| s.as_ref());
                let selectors = Arc::new(Selectors::reusing(snapshot, previous));
                self.selectors = Some((snapshot.hash(), Arc::clone(&selectors)));
                selectors
            }
        };
        let (matched, conflicts) = selectors.assign(&self.found);
        for c in &conflicts {
            warn!(cgroup = c.cgroup, chosen = c.chosen, also = c.also, "two services select one cgroup");
        }
        let attach = discovery::attach_points(&matched);
        let candidate = self.candidate.as_ref().map(|(_, (c, e))| (&c.snapshot, *e));
        let previous = self.applied.as_ref().map(|((active, env), candidate)| Previous {
            active: (&active.snapshot, *env),
            candidate: candidate.as_ref().map(|(c, e)| (&c.snapshot, *e)),
        });
        let desired = Desired { snapshot, environment, candidate, matched: &matched, attach: &attach, previous };
        let kernel_started = Instant::now();
        let report = self.kernel.apply(&desired)?;
        self.kernel_apply = kernel_started.elapsed();
        self.applied = Some(((Arc::clone(&compiled), environment), self.candidate.as_ref().map(|(_, c)| c.clone())));
        self.zeroed.extend(report.counters_zeroed.iter().cloned());
        let state_file = self.kernel.state_file().to_owned();
        self.rollout.note_write(&state_file, report.state_error.clone().map_or(Ok(()), Err));
        self.count_failed_writes();
        if let Some(dns) = &self.dns {
            dns.follow(snapshot, environment, self.kernel.services().iter().map(|(n, s)| (n.clone(), s.slot)));
        }
        for cgroup in &report.registered {
            info!(cgroup, service = selectors.service_of(cgroup).unwrap_or_default(), "cgroup registered");
        }
        for id in &report.unregistered {
            info!(cgroup_id = id, "cgroup left the policy");
        }
        for (service, from, to) in &report.mode_changes {
            info!(service, from = from.map(Mode::as_str), to = to.as_str(), "mode");
        }
        if report.previous_abi_pins_removed > 0 {
            info!(
                pins = report.previous_abi_pins_removed,
                "upgrade: the previous ABI's programs are detached, this agent's enforce the policy"
            );
        }
        self.close_disallowed();
        // Every declared backend is exported (at 0 until hit), so a dashboard shows what is unused.
        for name in self.kernel.services().keys() {
            for (_, rule) in self.kernel.rule_names(name).map(|n| n.all().collect::<Vec<_>>()).unwrap_or_default() {
                telemetry::backend_hits(&mut self.backends_seen, name, &rule.backend, 0);
            }
        }
        gauge!("depfence_policy_generation").set(f64::from(self.kernel.generation()));
        let hash = snapshot.hash().to_string();
        let environment = self.config.environment.clone();
        if let Some(old) = self.published_hash.take().filter(|old| *old != hash) {
            gauge!("depfence_policy_info", "hash" => old, "environment" => environment.clone()).set(0.0);
        }
        gauge!("depfence_policy_info", "hash" => hash.clone(), "environment" => environment).set(1.0);
        self.published_hash = Some(hash);
        Ok(())
    }

    /// Sweeps for the connections that the policy now in force would refuse (a service just
    /// enforced, a rule just removed, a connection made before the policy): the hooks judge a
    /// connection only when it is made. Enforce closes them; audit reports them as evidence. A
    /// failure leaves the policy in force; it is logged and counted.
    fn close_disallowed(&mut self) {
        let registered: BTreeMap<u64, String> =
            self.kernel.services().values().flat_map(|s| s.cgroups.clone()).collect();
        let policy_of = nearest_registered(&self.found, &registered);
        match self.kernel.close_disallowed(&policy_of) {
            Ok(closed) => self.closed.extend(closed),
            Err(e) => {
                error!("closing the connections the policy no longer allows: {e}");
                counter!("depfence_socket_sweep_failures_total").increment(1);
            }
        }
    }

    /// The service that owns a destination, when the policy in force says.
    fn owner_name(&self, addr: std::net::IpAddr, port: u16, proto: u8) -> Option<String> {
        let (compiled, env) = self.active.as_ref()?;
        let owner = compiled.snapshot.owners(*env).owner_of(addr, Some(port), proto_of(proto))?;
        compiled.snapshot.services().get(owner as usize).map(|s| s.name.clone())
    }

    /// The cgroups in the tree now; applies when they changed.
    pub fn set_found(&mut self, found: Vec<FoundCgroup>) {
        if found == self.found {
            return;
        }
        self.found = found;
        if let Err(e) = self.apply() {
            error!("applying after a cgroup change: {e}");
        }
    }

    /// Reads the kernel's events into the log, the stream and the evidence, and the connections
    /// the last applies' sweeps found.
    pub fn drain_events(&mut self, now: SystemTime) {
        for closed in std::mem::take(&mut self.closed) {
            if !closed.closed && !self.would_close_seen.insert(closed.cookie) {
                continue;
            }
            if self.would_close_seen.len() > MAX_WOULD_CLOSE_SEEN {
                // Bounded: a connection forgotten here counts again (never less evidence).
                self.would_close_seen.clear();
            }
            let service = self.kernel.service_of_cgroup(closed.policy_cgroup_id).map(str::to_owned);
            let cgroup = self.cgroup_path(closed.cgroup_id);
            let destination_service = self.owner_name(closed.remote.ip(), closed.remote.port(), closed.protocol);
            let record = EventRecord::closed(&closed, service, cgroup, destination_service, now);
            let name = record.service.clone().unwrap_or_default();
            if closed.closed {
                info!(
                    service = name,
                    destination = record.destination,
                    "connection closed: the policy no longer allows it"
                );
            } else {
                info!(
                    service = name,
                    destination = record.destination,
                    "open connection the policy does not allow: enforce would close it (a would-reject)"
                );
                self.rollout.record_destination(&name, now, &record.destination);
                *self.would_close.entry(name.clone()).or_default() += 1;
            }
            counter!("depfence_connections_closed_total", "service" => name, "verdict" => record.verdict.as_str())
                .increment(1);
            self.record(record);
        }
        for event in self.kernel.drain_events() {
            let service = self.kernel.service_of_cgroup(event.policy_cgroup_id).map(str::to_owned);
            let cgroup = self.cgroup_path(event.cgroup_id);
            let destination_service = self.owner_name(words_addr(event.addr), event.port, event.proto);
            let Some(record) = EventRecord::new(&event, service, cgroup, destination_service, now) else { continue };
            if let (Some(service), Verdict::WouldReject) = (&record.service, record.verdict) {
                self.rollout.record_destination(service, now, &record.destination);
            }
            self.record(record);
        }
    }

    fn record(&mut self, record: EventRecord) {
        let _ = self.event_tx.send(record.clone());
        self.events.record(record);
    }

    fn cgroup_path(&self, id: u64) -> Option<String> {
        self.found.iter().find(|c| c.id == id).map(|c| c.relative.clone())
    }

    /// Records what the DNS proxy reported: judged questions that were not simply allowed go
    /// to the event log (and a would-reject counts as evidence against promotion).
    pub fn dns_event(&mut self, event: DnsEvent, now: SystemTime) {
        match event {
            DnsEvent::Query(query) if query.verdict != Verdict::Allowed => {
                let cgroup = self.cgroup_path(query.who.cgroup_id);
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
                self.record(record);
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

    /// Samples every service's counters into the metrics and the evidence (every second).
    /// Counters the evidence cannot account for mark the service's evidence lost.
    pub fn sample(&mut self, now: SystemTime) {
        for (name, service) in self.kernel.services() {
            let counts = self.kernel.counters(service.slot);
            telemetry::export_service(name, counts, service.mode, service.mode_since, service.cgroups.len());
            let zeroed = self.zeroed.remove(name);
            if let Some(reason) = self.rollout.record(name, now, counts.allowed, counts.would_reject, zeroed) {
                error!(
                    service = name,
                    "evidence lost: {reason}; promotions of `{name}` are refused for a whole window"
                );
                telemetry::evidence_lost(Some(name));
            }
            if let Some(count) = self.would_close.remove(name) {
                self.rollout.record_would_reject(name, now, count);
            }
        }
        self.sample_rule_hits(now);
        self.rollout.persist(now, false);
        self.count_failed_writes();
        counter!("depfence_events_dropped_total").absolute(self.kernel.events_dropped());
        counter!("depfence_rule_hits_dropped_total").absolute(self.kernel.rule_hits_dropped());
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

    /// Reads the rules' new hits into the metrics and the totals; once a history step has
    /// passed (or `force`), into the history.
    fn sample_rule_hits(&mut self, now: SystemTime) {
        match self.kernel.rule_hits() {
            Ok(hits) => {
                for h in hits {
                    telemetry::backend_hits(&mut self.backends_seen, &h.service, &h.rule.backend, h.hits);
                    let key = (h.service, h.rule.rule);
                    *self.rule_hits.entry(key.clone()).or_default() += h.hits;
                    *self.unrecorded_hits.entry(key).or_default() += h.hits;
                }
            }
            Err(e) => warn!("reading the rule hits: {e}"),
        }
        self.record_rule_hits(now, false);
    }

    fn record_rule_hits(&mut self, now: SystemTime, force: bool) {
        let step = self.rollout.history().limits().step;
        if !force && now.duration_since(self.hits_recorded).unwrap_or_default() < step {
            return;
        }
        self.hits_recorded = now;
        for ((service, rule), hits) in std::mem::take(&mut self.unrecorded_hits) {
            self.rollout.record_hits(&service, now, &rule, hits);
        }
    }

    /// Writes what the evidence store holds back (the agent is stopping).
    pub fn persist(&mut self, now: SystemTime) {
        self.sample_rule_hits(now);
        self.record_rule_hits(now, true);
        self.rollout.persist(now, true);
        self.count_failed_writes();
    }

    /// Counts the writes of state files that failed (the rollout logs them).
    fn count_failed_writes(&mut self) {
        for file in self.rollout.take_failed_writes() {
            telemetry::state_file_error(&file, "write");
        }
    }

    /// Before a promotion: writes the kernel books again if their last write failed, so a
    /// state directory that can be written again no longer refuses.
    fn retry_state_file(&mut self) {
        let file = self.kernel.state_file().to_owned();
        if self.rollout.unwritable().is_some() {
            let saved = self.kernel.save().map_err(|e| e.to_string());
            self.rollout.note_write(&file, saved);
        }
    }

    /// Turns the DNS redirect off (the agent is stopping).
    pub fn stop_dns(&mut self) {
        if self.dns.take().is_some()
            && let Err(e) = self.kernel.stop_dns_redirect()
        {
            warn!("turning the dns redirect off: {e}");
        }
    }

    /// The most recent events, and a subscription to the new ones.
    pub fn subscribe(&self, recent: usize) -> (Vec<EventRecord>, broadcast::Receiver<EventRecord>) {
        (self.events.recent(recent), self.event_tx.subscribe())
    }

    /// What `policyctl status` shows.
    pub fn status(&self) -> AgentStatus {
        let services = self
            .kernel
            .services()
            .iter()
            .map(|(name, s)| ServiceStatus {
                name: name.clone(),
                mode: s.mode.as_str().to_owned(),
                mode_since: s.mode_since.map_or_else(|| "unknown".to_owned(), rfc3339_seconds),
                cgroups: s.cgroups.values().cloned().collect(),
                counts: self.kernel.counters(s.slot),
                last_would_reject: self.events.last_would_reject(name).cloned(),
                rules: self
                    .kernel
                    .rule_names(name)
                    .map(|names| {
                        names
                            .all()
                            .map(|(_, r)| RuleStatus {
                                hits: self.rule_hits.get(&(name.clone(), r.rule.clone())).copied().unwrap_or(0),
                                rule: r.rule,
                                backend: r.backend,
                                position: r.position,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect::<Vec<_>>();
        let total = self.active.as_ref().map_or(0, |(c, _)| c.snapshot.services().len());
        AgentStatus {
            ready: self.active.is_some(),
            environment: self.config.environment.clone(),
            policy: self.config.policy.clone(),
            generation: self.kernel.generation(),
            policy_hash: self.active.as_ref().map(|(c, _)| c.snapshot.hash().to_string()),
            last_reload: self.last_reload.clone(),
            candidate: self
                .candidate
                .as_ref()
                .map(|(path, (c, _))| CandidateStatus { path: path.clone(), hash: c.snapshot.hash().to_string() }),
            services_without_cgroups: total.saturating_sub(services.len()),
            services,
            events_dropped: self.kernel.events_dropped(),
            dns: self.dns.as_ref().map(DnsRuntime::status),
        }
    }

    /// Answers a control request from user `uid`.
    pub fn handle(&mut self, request: Request, uid: Option<u32>, now: SystemTime) -> Response {
        match request {
            Request::Status => Response::ok(self.status()),
            Request::Explain { from, to } => self.explain(&from, &to),
            Request::Reload => {
                if self.reload_everything("policyctl reload", now) {
                    Response::ok(self.status())
                } else {
                    Response::error(format!(
                        "the policy was not applied; the last good one stays in force:\n{}",
                        self.reload_errors()
                    ))
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
            Request::ActivateCandidate => self.activate_candidate(now),
            Request::Promote { service, environment, mode, force, reason, dry_run } => {
                if dry_run {
                    return self.check_promotion(&service, environment, now);
                }
                let environment = environment.unwrap_or_else(|| self.config.environment.clone());
                let who = uid.map_or_else(
                    || Actor { user: "unknown".into(), uid: u32::MAX },
                    |uid| Actor { user: user_name(uid), uid },
                );
                self.change_mode(ModeRequest { service, environment, mode, force, reason, who }, now)
            }
            Request::Events { .. } => Response::error("events are streamed, not requested"),
            Request::Observed { window_secs } => Response::ok(self.observed(now, Duration::from_secs(window_secs))),
            Request::Usage { window_secs } => match self.usage(now, Duration::from_secs(window_secs)) {
                Some(usage) => Response::ok(usage),
                None => Response::error("no policy is in force yet"),
            },
        }
    }

    /// The declared dependencies of the services here and their hits in the window: the hits
    /// the history recorded, and those since its last step; how long each service was observed.
    fn usage(&mut self, now: SystemTime, window: Duration) -> Option<crate::usage::Usage> {
        self.sample_rule_hits(now);
        self.record_rule_hits(now, true);
        let (compiled, env) = self.active.as_ref()?;
        let mut usage = crate::usage::declared(&compiled.snapshot, *env, &self.config.environment, window);
        usage.per_rule = true;
        usage.services.retain(|s| self.kernel.services().contains_key(&s.service));
        for service in &mut usage.services {
            let evidence = self.rollout.history().evidence(&service.service, now, window);
            service.observed_for_secs = Some(evidence.observed_for.as_secs());
        }
        let names: Vec<String> = usage.services.iter().map(|s| s.service.clone()).collect();
        for service in names {
            for (rule, hits, first, last) in self.rollout.history().hits(&service, now, window) {
                // Listed means hit in the window, even when its steps there were dropped.
                usage.add_rule_hits(&service, &rule, hits.max(1), first, last);
            }
        }
        Some(usage)
    }

    /// Every service's would-rejected destinations in the window, as `learn` reads them: counts
    /// and times from the counter history, the processes from the recent events, this host.
    fn observed(&self, now: SystemTime, window: Duration) -> Vec<crate::learn::Observed> {
        let Some((compiled, _)) = &self.active else { return Vec::new() };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "localhost".into(), |h| h.trim().to_owned());
        let recent = self.events.recent(usize::MAX);
        let mut out = Vec::new();
        for service in compiled.snapshot.services() {
            for (destination, count, first, last) in self.rollout.history().destinations(&service.name, now, window) {
                let processes = recent
                    .iter()
                    .filter(|e| e.service.as_deref() == Some(service.name.as_str()) && e.destination == destination)
                    .map(|e| e.comm.clone())
                    .collect();
                let destination = match destination.parse::<Connection>() {
                    Ok(c) => crate::learn::Destination::Address { addr: c.addr, port: c.port, proto: c.proto },
                    Err(_) => crate::learn::Destination::Name { name: destination },
                };
                out.push(crate::learn::Observed {
                    service: service.name.clone(),
                    destination,
                    count,
                    hosts: [host.clone()].into(),
                    first_seen: Some(first),
                    last_seen: Some(last),
                    processes,
                });
            }
        }
        out
    }

    fn reload_errors(&self) -> String {
        self.last_reload.as_ref().map(|r| r.errors.join("\n")).unwrap_or_default()
    }

    fn explain(&self, from: &str, to: &str) -> Response {
        let Some((compiled, _)) = &self.active else { return Response::error("no policy in force yet") };
        let conn: Connection = match to.parse() {
            Ok(c) => c,
            Err(e) => return Response::error(e.to_string()),
        };
        let environment = Environments::Named(&self.config.environment);
        match explain(&compiled.snapshot, Some(&compiled.analysis), from, conn, environment) {
            Ok(mut explanation) => {
                explanation.live = Some(Live { generation: self.kernel.generation() });
                Response::ok(explanation)
            }
            Err(e) => Response::error(format!("the policy in force: {e}")),
        }
    }

    /// The policy in force, or the error answer when there is none or it lacks `service`.
    fn in_force_with(&self, service: &str) -> Result<&Snapshot, Response> {
        let Some((compiled, _)) = &self.active else { return Err(Response::error("no policy in force yet")) };
        if compiled.snapshot.service(service).is_none() {
            return Err(Response::error(format!("the policy in force has no service `{service}`")));
        }
        Ok(&compiled.snapshot)
    }

    /// The evidence gate alone: would a promotion to enforce be accepted now?
    fn check_promotion(&mut self, service: &str, environment: Option<String>, now: SystemTime) -> Response {
        if let Err(answer) = self.in_force_with(service) {
            return answer;
        }
        if environment.is_some_and(|e| e != self.config.environment) {
            return Response::error(format!(
                "this agent runs in `{}`; it has no evidence for other environments",
                self.config.environment
            ));
        }
        self.retry_state_file();
        let checked = self.rollout.check(service, now);
        self.count_failed_writes();
        match checked {
            Ok(evidence) => Response::ok(control::PromotionCheck { evidence }),
            Err(refusal) => Response::error(format!("promotion would be refused: {refusal}")),
        }
    }

    fn change_mode(&mut self, change: ModeRequest, now: SystemTime) -> Response {
        if let Err(answer) = self.in_force_with(&change.service) {
            return answer;
        }
        // The evidence is this machine's; an environment other than the agent's has none here.
        if change.mode == Mode::Enforce && !change.force && change.environment != self.config.environment {
            return Response::error(format!(
                "this agent runs in `{}`; it has no evidence for `{}` (ask an agent there, or --force)",
                self.config.environment, change.environment
            ));
        }
        let policy = self.config.policy.clone();
        if change.mode == Mode::Enforce {
            self.retry_state_file();
        }
        let changed = self.rollout.change_mode(&policy, change, now);
        self.count_failed_writes();
        let outcome = match changed {
            Ok(outcome) => outcome,
            Err(message) => return Response::error(message),
        };
        if outcome.changed && !self.reload("mode changed by policyctl", now) {
            return Response::error(format!(
                "the policy file was rewritten but not applied:\n{}",
                self.reload_errors()
            ));
        }
        Response::ok(control::ModeChanged { outcome, generation: self.kernel.generation() })
    }

    fn apply_candidate(&mut self, path: PathBuf) -> Response {
        let in_force = match self.compile(&path) {
            Ok(in_force) => in_force,
            Err(errors) => return Response::error(format!("the candidate is not valid:\n{}", errors.join("\n"))),
        };
        let previous = self.candidate.replace((path, in_force));
        match self.apply() {
            Ok(()) => Response::ok(self.status()),
            Err(e) => {
                self.candidate = previous;
                Response::error(format!("applying the candidate to the kernel: {e}"))
            }
        }
    }

    /// The candidate's files replace the policy's; the reload makes it active.
    fn activate_candidate(&mut self, now: SystemTime) -> Response {
        let Some((path, _)) = self.candidate.clone() else { return Response::error("no candidate is loaded") };
        if let Err(e) = replace_policy(&path, &self.config.policy) {
            return Response::error(format!("copying {} over {}: {e}", path.display(), self.config.policy.display()));
        }
        info!(candidate = %path.display(), policy = %self.config.policy.display(), "candidate activated");
        self.candidate = None;
        if self.reload("candidate activated", now) {
            Response::ok(self.status())
        } else {
            Response::error(format!("the activated policy was not applied:\n{}", self.reload_errors()))
        }
    }
}

/// Writes `from` over `to`, file for file (a policy file, or a directory of `*.toml` files:
/// files missing from `from` are removed). Each file is replaced durably, keeping its mode.
fn replace_policy(from: &Path, to: &Path) -> std::io::Result<()> {
    let write = |path: &Path, bytes: &[u8]| crate::durable::replace(path, bytes, crate::durable::Access::KeepExisting);
    match (from.is_dir(), to.is_dir()) {
        (false, false) => write(to, &std::fs::read(from)?),
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
                write(&to.join(name), &std::fs::read(from.join(name))?)?;
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
