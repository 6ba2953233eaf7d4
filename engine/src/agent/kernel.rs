//! What the agent has put in the kernel, and how it moves from one policy (or one set of
//! cgroups) to the next without a connect ever seeing a mix of two generations.
//!
//! Rulesets are installed only for services that have a cgroup on this machine. Each service
//! keeps its counter slot across reloads and restarts (the slot map is saved in the state
//! directory). A policy reload is a delta: a service whose address rules changed gets a fresh
//! ruleset id, so its old and new generation sit side by side until its cgroups have been
//! repointed and no hook can still read the old one; a service whose rules lower to the same
//! kernel entries as in the policy last applied (`lower::same_kernel_rules`) keeps its ruleset,
//! and a cgroup whose state (ruleset, mode, flags) stays is not written at all, so it keeps the
//! generation that last changed it.
//!
//! The state file is a cache of what the pinned maps say: when it is damaged, unreadable, or
//! missing while the maps hold a previous agent's cgroups, the books are rebuilt from the
//! kernel ([`StateFileProblem`]): a service whose cgroups are registered keeps the counter slot
//! they count into (`DF_CGROUPS` holds it) and its mode, whose start is then unknown; ruleset
//! ids and the generation continue past the kernel's. A slot or ruleset id the kernel still
//! uses is never handed out again. A state file that cannot be written does not undo an apply:
//! the kernel is in force, and the failure is reported ([`ApplyReport::state_error`]).
//!
//! Rule hits (`DF_RULE_HITS`) are keyed by ruleset id, so the books name each active ruleset's
//! rules ([`RuleNames`]) and read a retired ruleset's last hits before deleting them: every hit
//! is attributed to the rule that decided it, across swaps ([`Kernel::rule_hits`]). Hits on a
//! previous agent's rulesets after it stopped are not attributed (they are deleted with them).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use super::dataplane::Dataplane;
use crate::cgroup::FoundCgroup;
use crate::datapath::sweep::ClosedSocket;
use crate::datapath::{
    Datapath, DatapathError,
    abi::{
        CgroupState, Config, Event, FLAG_ACTIVE_HAS_CIDR, FLAG_CANDIDATE_HAS_CIDR, FLAG_DNS, MAX_COUNTER_SLOTS,
        RuleHitKey,
    },
    pins::PinLayout,
};
use crate::lower::{CompileError, CompiledRuleset, allows_from_snapshot, compile, same_kernel_rules};
use crate::snapshot::{ContentHash, Snapshot};
use crate::timefmt::{from_unix_seconds, to_unix_seconds};
use crate::usage::{RuleName, RuleNames};
use crate::verdict::{Counts, Mode};

/// Applying a policy to the kernel failed; what was in force before stays in force.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A map or program operation failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// A service's rules do not fit the kernel layout.
    #[error("service `{service}`: {source}")]
    Layout {
        /// The service.
        service: String,
        /// Why.
        #[source]
        source: CompileError,
    },
    /// More services on this machine than counter slots.
    #[error("more than {MAX_COUNTER_SLOTS} services have cgroups on this machine")]
    NoFreeSlot,
    /// The state file could not be read or written.
    #[error("state file {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = KernelError> = std::result::Result<T, E>;

/// The kernel state file in the state directory.
pub const KERNEL_STATE_FILE: &str = "kernel-state.json";

/// Why the kernel state file could not be used at start; the books were rebuilt from the
/// pinned maps instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateFileProblem {
    /// The file is not valid kernel state (torn, truncated, overwritten).
    #[error("`{path}` is damaged at line {line} column {column}: {message}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// 1-based line of the first error.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser says.
        message: String,
        /// Where the damaged file was moved, if it could be.
        set_aside: Option<PathBuf>,
    },
    /// The file could not be read.
    #[error("cannot read `{path}`: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// The file is missing while the pinned maps hold a previous agent's cgroups.
    #[error("`{path}` is missing, but the pinned maps hold {cgroups} cgroup entries of a previous agent")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The entries in `DF_CGROUPS`.
        cgroups: usize,
    },
}

impl StateFileProblem {
    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            Self::Damaged { path, .. } | Self::Unreadable { path, .. } | Self::Missing { path, .. } => path,
        }
    }

    /// The kind, as the metric labels it: `corrupt`, `read` or `missing`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Damaged { .. } => "corrupt",
            Self::Unreadable { .. } => "read",
            Self::Missing { .. } => "missing",
        }
    }
}

/// What the agent remembers across restarts (the kernel holds the rest).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    /// Counter slot of each service that ever had a cgroup here.
    slots: BTreeMap<String, u32>,
    /// The next ruleset id to hand out.
    next_ruleset: u32,
    /// The policy generation in force.
    generation: u32,
    /// Content hash of the active policy in force, so that a restart with the same policy
    /// keeps its generation.
    #[serde(default)]
    applied_hash: Option<String>,
    /// Each service's mode and since when (Unix seconds; null: unknown, the books were rebuilt
    /// from the kernel): a restart is not a mode change.
    #[serde(default)]
    modes: BTreeMap<String, (Mode, Option<u64>)>,
}

/// One service with cgroups on this machine.
#[derive(Debug)]
pub struct InstalledService {
    /// Its counter slot.
    pub slot: u32,
    /// Its mode in this environment.
    pub mode: Mode,
    /// When the mode last changed (or the service was first applied); None when unknown (the
    /// state file was lost and the mode was read back from the kernel).
    pub mode_since: Option<SystemTime>,
    /// Its active ruleset id and entries.
    pub ruleset: (u32, CompiledRuleset),
    /// The candidate ruleset evaluated in shadow, if any.
    pub candidate: Option<(u32, CompiledRuleset)>,
    /// Its cgroups: id → path relative to the cgroup2 mount.
    pub cgroups: BTreeMap<u64, String>,
    /// The state its cgroups point at.
    pub state: CgroupState,
}

/// Which of a service's rulesets an apply writes anew (None: the installed one stays).
struct Planned {
    active: Option<(u32, CompiledRuleset)>,
    /// `Some(None)`: no candidate.
    candidate: Option<Option<(u32, CompiledRuleset)>>,
}

/// True when a service's address rules in `new` lower to the kernel entries its rules in `old`
/// lowered to (see [`same_kernel_rules`]).
fn same_rules(old: (&Snapshot, usize), new: (&Snapshot, usize), service: &str) -> bool {
    match (old.0.service(service), new.0.service(service)) {
        (Some((_, a)), Some((_, b))) => same_kernel_rules(&a.rules(old.1).net_rules, &b.rules(new.1).net_rules),
        _ => false,
    }
}

/// The desired state: a policy, the environment, and the cgroups matched on this machine.
pub struct Desired<'a> {
    /// The active policy.
    pub snapshot: &'a Snapshot,
    /// Index of the agent's environment in the snapshot.
    pub environment: usize,
    /// A candidate policy evaluated in shadow, with its environment index.
    pub candidate: Option<(&'a Snapshot, usize)>,
    /// (cgroup, service) pairs.
    pub matched: &'a [(&'a FoundCgroup, String)],
    /// The matched cgroups that get the programs attached.
    pub attach: &'a [&'a FoundCgroup],
    /// The policies the kernel's rulesets were built from by the last apply (active and
    /// candidate, with their environment indexes): a service whose address rules are the same
    /// in the new policy keeps its ruleset (a delta apply). None: every ruleset is rebuilt.
    pub previous: Option<Previous<'a>>,
}

/// What the last apply built the kernel's rulesets from.
#[derive(Clone, Copy)]
pub struct Previous<'a> {
    /// The active policy and its environment index.
    pub active: (&'a Snapshot, usize),
    /// The candidate policy and its environment index.
    pub candidate: Option<(&'a Snapshot, usize)>,
}

/// What one apply changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Rulesets written.
    pub installed: usize,
    /// Rulesets deleted after the swap.
    pub retired: usize,
    /// Cgroups newly registered.
    pub registered: Vec<String>,
    /// Cgroups removed from the policy.
    pub unregistered: Vec<u64>,
    /// Cgroups that got the programs attached.
    pub attached: Vec<String>,
    /// Services whose mode changed: (service, from, to).
    pub mode_changes: Vec<(String, Option<Mode>, Mode)>,
    /// Pins of a previous ABI removed (its programs detached) once this agent's enforced.
    pub previous_abi_pins_removed: usize,
    /// Services given a counter slot new to them, zeroed first: their counts start here.
    pub counters_zeroed: Vec<String>,
    /// Why the state file could not be written (the apply is in force nonetheless).
    pub state_error: Option<String>,
}

/// Where a service's counter slot came from.
enum SlotOrigin {
    /// The books had it.
    Known,
    /// The kernel had it: a registered cgroup of the service counts into it; with that cgroup's
    /// mode.
    Adopted(Mode),
    /// A free slot, zeroed.
    New,
}

/// The agent's books on the kernel (counter slots, ruleset ids, the generation, each service's
/// mode and since when) and the procedure that moves the kernel from one desired state to the
/// next, over a [`Dataplane`]: the real one ([`Datapath`]), or an in-memory one in tests.
pub struct Kernel<D: Dataplane = Datapath> {
    dataplane: D,
    cgroup2_mount: PathBuf,
    state_file: PathBuf,
    persisted: Persisted,
    services: BTreeMap<String, InstalledService>,
    /// Ids of the cgroups with our links attached.
    attached: BTreeSet<u64>,
    /// True until the first apply has removed what a previous agent left and no longer needs.
    cleanup_pending: bool,
    /// Hashes of the active and candidate policies last applied.
    applied: Option<(ContentHash, Option<ContentHash>)>,
    /// The DNS proxy's port and own cgroup, when it runs (the redirect's half of `DF_CONFIG`).
    dns: Option<(u16, u64)>,
    /// Why the state file was not used at start, if it was not.
    problem: Option<StateFileProblem>,
    /// The rules of each active ruleset, by ruleset id.
    rule_names: BTreeMap<u32, RuleNames>,
    /// Each rule's hits as last read.
    hits_read: BTreeMap<RuleHitKey, u64>,
    /// Hits of retired rulesets not yet handed out by [`Kernel::rule_hits`].
    retired_hits: Vec<RuleHits>,
}

/// Hits of one rule of a service since they were last handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleHits {
    /// The service.
    pub service: String,
    /// The rule.
    pub rule: RuleName,
    /// New hits.
    pub hits: u64,
}

impl Kernel<Datapath> {
    /// Loads the programs (reusing the pinned maps under `layout`, so counters and enforcement
    /// carry on from a previous agent) and reads the state file in `state_dir`.
    pub fn open(layout: &PinLayout, state_dir: &Path, cgroup2_mount: &Path, rule_capacity: u32) -> Result<Self> {
        let datapath = Datapath::load_with_rule_capacity(layout, rule_capacity)?;
        Kernel::with_dataplane(datapath, state_dir, cgroup2_mount)
    }
}

impl<D: Dataplane> Kernel<D> {
    /// The books for `dataplane`, from the state file in `state_dir`; the hooks' attachments
    /// are the dataplane's (a previous agent's links stay).
    ///
    /// A damaged or unreadable state file, or a missing one while the maps hold a previous
    /// agent's cgroups, does not stop the agent: the books are rebuilt from the kernel (see the
    /// module documentation) and [`Kernel::state_problem`] says why. A damaged file is moved to
    /// `kernel-state.json.damaged`.
    pub fn with_dataplane(dataplane: D, state_dir: &Path, cgroup2_mount: &Path) -> Result<Self> {
        let state_file = state_dir.join(KERNEL_STATE_FILE);
        let cgroups = dataplane.cgroup_states();
        let (mut persisted, problem) = match std::fs::read(&state_file) {
            Ok(bytes) => match serde_json::from_slice::<Persisted>(&bytes) {
                Ok(persisted) => (persisted, None),
                Err(e) => {
                    let set_aside = crate::durable::set_aside(&state_file).ok();
                    let message = e.to_string();
                    let position = format!(" at line {} column {}", e.line(), e.column());
                    let problem = StateFileProblem::Damaged {
                        path: state_file.clone(),
                        line: e.line(),
                        column: e.column(),
                        message: message.strip_suffix(&position).unwrap_or(&message).to_owned(),
                        set_aside,
                    };
                    (Persisted::default(), Some(problem))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && cgroups.is_empty() => (Persisted::default(), None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Persisted::default(),
                Some(StateFileProblem::Missing { path: state_file.clone(), cgroups: cgroups.len() }),
            ),
            Err(e) => {
                let problem = StateFileProblem::Unreadable { path: state_file.clone(), message: e.to_string() };
                (Persisted::default(), Some(problem))
            }
        };
        // A previous agent killed before it saved its books may have written rulesets with ids
        // past the saved counter (half a swap, or a whole one): a new ruleset must never share
        // an id with anything in the kernel, or it would mix with what that agent left.
        let in_kernel = cgroups.iter().flat_map(|(_, s)| [s.ruleset_id, s.candidate_ruleset]);
        if let Some(highest) = dataplane.ruleset_ids().into_iter().chain(in_kernel).max() {
            persisted.next_ruleset = persisted.next_ruleset.max(highest.saturating_add(1));
        }
        if problem.is_some() {
            persisted.generation = cgroups.iter().map(|(_, s)| s.generation).max().unwrap_or(0);
        }
        let attached = dataplane.attached();
        Ok(Self {
            dataplane,
            cgroup2_mount: cgroup2_mount.to_owned(),
            state_file,
            persisted,
            services: BTreeMap::new(),
            attached,
            cleanup_pending: true,
            applied: None,
            dns: None,
            problem,
            rule_names: BTreeMap::new(),
            hits_read: BTreeMap::new(),
            retired_hits: Vec::new(),
        })
    }

    /// Why the state file was not used at start (the books were rebuilt from the kernel).
    pub fn state_problem(&self) -> Option<&StateFileProblem> {
        self.problem.as_ref()
    }

    /// The state file.
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// From the next apply on, services with host rules send their DNS to the proxy on
    /// `port` (loopback); processes in `exempt_cgroup` (the proxy's own) are never redirected.
    pub fn set_dns_proxy(&mut self, port: u16, exempt_cgroup: u64) {
        self.dns = Some((port, exempt_cgroup));
    }

    /// Turns the DNS redirect off (the agent is stopping): DNS goes to the servers the clients
    /// name again, instead of to a port nobody will answer on.
    pub fn stop_dns_redirect(&mut self) -> Result<()> {
        self.dns = None;
        let config = self.dataplane.config()?;
        self.dataplane.set_config(Config { dns_proxy_port: 0, dns_exempt_cgroup: 0, ..config })?;
        Ok(())
    }

    /// The events the hooks reported since the last call.
    pub fn drain_events(&mut self) -> Vec<Event> {
        self.dataplane.drain_events()
    }

    /// Finds the connections the policy in force would refuse now, closing them in enforce.
    pub fn close_disallowed(&mut self, policy_of: &BTreeMap<u64, u64>) -> Result<Vec<ClosedSocket>> {
        Ok(self.dataplane.close_disallowed(policy_of)?)
    }

    /// Events lost because the ring buffer was full.
    pub fn events_dropped(&self) -> u64 {
        self.dataplane.events_dropped()
    }

    /// The dataplane (tests drive the in-memory one through it).
    #[cfg(test)]
    pub(crate) fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// The dataplane, for the next agent (tests restart the agent on the same in-memory maps).
    #[cfg(test)]
    pub(crate) fn into_dataplane(self) -> D {
        self.dataplane
    }

    /// The services with cgroups on this machine.
    pub fn services(&self) -> &BTreeMap<String, InstalledService> {
        &self.services
    }

    /// The policy generation in force (counts applied policies, kept across restarts).
    pub fn generation(&self) -> u32 {
        self.persisted.generation
    }

    /// The service a registered cgroup id belongs to.
    pub fn service_of_cgroup(&self, cgroup_id: u64) -> Option<&str> {
        self.services.iter().find(|(_, s)| s.cgroups.contains_key(&cgroup_id)).map(|(name, _)| name.as_str())
    }

    fn new_ruleset_id(&mut self) -> u32 {
        self.persisted.next_ruleset = self.persisted.next_ruleset.max(1);
        let id = self.persisted.next_ruleset;
        self.persisted.next_ruleset = id.checked_add(1).unwrap_or(1);
        id
    }

    /// The counter slot of a service with `cgroups`: the one the books have; else the one its
    /// registered cgroups count into, unless another service has it (the books are older than
    /// the kernel); else a free slot that no service and no registered cgroup uses.
    fn slot_for(&mut self, service: &str, cgroups: &[&FoundCgroup]) -> Result<(u32, SlotOrigin)> {
        if let Some(slot) = self.persisted.slots.get(service) {
            return Ok((*slot, SlotOrigin::Known));
        }
        let states = self.dataplane.cgroup_states();
        let claimed: BTreeSet<u32> = self.persisted.slots.values().copied().collect();
        let adoptable = cgroups.iter().find_map(|cgroup| {
            let (_, state) = states.iter().find(|(id, _)| *id == cgroup.id)?;
            (!claimed.contains(&state.counter_slot) && state.counter_slot < MAX_COUNTER_SLOTS)
                .then_some((state.counter_slot, Mode::from_code(state.mode)))
        });
        if let Some((slot, mode)) = adoptable {
            self.persisted.slots.insert(service.to_owned(), slot);
            return Ok((slot, mode.map_or(SlotOrigin::Known, SlotOrigin::Adopted)));
        }
        let used: BTreeSet<u32> = claimed.into_iter().chain(states.iter().map(|(_, s)| s.counter_slot)).collect();
        let slot = (0..MAX_COUNTER_SLOTS).find(|s| !used.contains(s)).ok_or(KernelError::NoFreeSlot)?;
        self.persisted.slots.insert(service.to_owned(), slot);
        Ok((slot, SlotOrigin::New))
    }

    /// A fresh ruleset for `service`'s address rules in environment `env`.
    fn compile_for(&mut self, snapshot: &Snapshot, env: usize, service: &str) -> Result<(u32, CompiledRuleset)> {
        let rules =
            snapshot.service(service).map(|(_, s)| allows_from_snapshot(&s.rules(env).net_rules)).unwrap_or_default();
        let id = self.new_ruleset_id();
        let compiled =
            compile(id, &rules).map_err(|source| KernelError::Layout { service: service.to_owned(), source })?;
        Ok((id, compiled))
    }

    /// Brings the kernel to `desired`. With a new policy (`desired.snapshot` differs from the
    /// last one applied) every service whose rules changed gets a fresh ruleset (every service,
    /// without a `desired.previous` that matches what was applied); otherwise only cgroups and
    /// services that appeared or vanished change. On error nothing of the new state is in
    /// force.
    pub fn apply(&mut self, desired: &Desired<'_>) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        let key = (desired.snapshot.hash(), desired.candidate.map(|(c, _)| c.hash()));
        let new_policy = self.applied != Some(key);
        let mut wanted: BTreeMap<&str, Vec<&FoundCgroup>> = BTreeMap::new();
        for (cgroup, service) in desired.matched {
            wanted.entry(service.as_str()).or_default().push(cgroup);
        }

        // 1. Write every ruleset the new state needs, before anything points at it: for a new
        //    policy (or candidate), those of the services whose address rules changed (all of them
        //    without a trusted previous policy); else those of services new on this machine.
        let previous =
            desired.previous.filter(|p| self.applied == Some((p.active.0.hash(), p.candidate.map(|(c, _)| c.hash()))));
        let mut fresh: BTreeMap<String, Planned> = BTreeMap::new();
        for &service in wanted.keys() {
            let installed = self.services.get(service).map(|s| (s.ruleset.0, s.candidate.is_some()));
            if installed.is_some() && !new_policy {
                continue;
            }
            let keep_active = installed.is_some()
                && previous.is_some_and(|p| same_rules(p.active, (desired.snapshot, desired.environment), service));
            let keep_candidate = installed.is_some_and(|(_, candidate)| candidate)
                && previous.is_some_and(|p| match (p.candidate, desired.candidate) {
                    (Some(old), Some(new)) => same_rules(old, new, service),
                    _ => false,
                });
            let active = match keep_active {
                true => None,
                false => Some(self.compile_for(desired.snapshot, desired.environment, service)?),
            };
            // A kept ruleset's rules keep their meaning; their words and positions may not.
            let id = active.as_ref().map(|a| a.0).or(installed.map(|(id, _)| id)).unwrap_or_default();
            self.rule_names.insert(id, RuleNames::of(desired.snapshot, service, desired.environment));
            let candidate = match (desired.candidate, keep_candidate) {
                (Some(_), true) => None,
                (Some((candidate, env)), false) => Some(Some(self.compile_for(candidate, env, service)?)),
                (None, _) => Some(None),
            };
            fresh.insert(service.to_owned(), Planned { active, candidate });
        }
        let mut written: Vec<&CompiledRuleset> = Vec::new();
        for planned in fresh.values() {
            let new = planned.active.iter().chain(planned.candidate.iter().flatten());
            for (_, ruleset) in new {
                if let Err(e) = self.dataplane.install(ruleset) {
                    for done in &written {
                        let _ = self.dataplane.uninstall(done);
                    }
                    for planned in fresh.values() {
                        if let Some((id, _)) = &planned.active {
                            self.rule_names.remove(id);
                        }
                    }
                    return Err(e.into());
                }
                written.push(ruleset);
                report.installed += 1;
            }
        }

        // 2. Repoint every matched cgroup: one map update each.
        // The generation counts active policies; a candidate coming or going is not one.
        let active_hash = key.0.to_string();
        if self.persisted.applied_hash.as_deref() != Some(active_hash.as_str()) {
            self.persisted.generation = self.persisted.generation.wrapping_add(1).max(1);
        }
        self.persisted.applied_hash = Some(active_hash);
        let now = SystemTime::now();
        let mut retire: Vec<(u32, CompiledRuleset)> = Vec::new();
        let mut next_services: BTreeMap<String, InstalledService> = BTreeMap::new();
        for (&service, cgroups) in &wanted {
            let (slot, origin) = self.slot_for(service, cgroups)?;
            if let SlotOrigin::New = origin {
                self.dataplane.reset_counters(slot)?;
                report.counters_zeroed.push(service.to_owned());
            }
            let mode = desired
                .snapshot
                .service(service)
                .and_then(|(_, s)| s.modes.get(desired.environment).copied())
                .unwrap_or(Mode::Off);
            let mut old = self.services.remove(service);
            let planned = fresh.remove(service).unwrap_or(Planned { active: None, candidate: None });
            // What stays is taken from the old books (a placeholder left there, never retired).
            let ruleset = match (planned.active, old.as_mut()) {
                (Some(new), _) => new,
                (None, Some(old)) => (old.ruleset.0, std::mem::take(&mut old.ruleset.1)),
                (None, None) => continue,
            };
            let candidate = match (planned.candidate, old.as_mut()) {
                (Some(new), _) => new,
                (None, Some(old)) => old.candidate.as_mut().map(|(id, c)| (*id, std::mem::take(c))),
                (None, None) => None,
            };
            let remembered = match (self.persisted.modes.get(service), &origin) {
                (Some((m, since)), _) => Some((*m, since.map(from_unix_seconds))),
                // The kernel knows the mode it enforces, not since when.
                (None, SlotOrigin::Adopted(m)) => Some((*m, None)),
                (None, _) => None,
            };
            let (mode_since, old_mode) = match old.as_ref().map(|o| (o.mode, o.mode_since)).or(remembered) {
                Some((m, since)) if m == mode => (since, Some(m)),
                Some((m, _)) => (Some(now), Some(m)),
                None => (Some(now), None),
            };
            self.persisted.modes.insert(service.to_owned(), (mode, mode_since.map(to_unix_seconds)));
            if old_mode != Some(mode) || old.is_none() {
                report.mode_changes.push((service.to_owned(), old_mode, mode));
            }
            let mut flags = 0;
            if !ruleset.1.cidrs.is_empty() {
                flags |= FLAG_ACTIVE_HAS_CIDR;
            }
            if candidate.as_ref().is_some_and(|c| !c.1.cidrs.is_empty()) {
                flags |= FLAG_CANDIDATE_HAS_CIDR;
            }
            let has_names = desired
                .snapshot
                .service(service)
                .is_some_and(|(_, s)| !s.rules(desired.environment).host_rules.is_empty());
            if self.dns.is_some() && has_names {
                flags |= FLAG_DNS;
            }
            let mut state = CgroupState {
                ruleset_id: ruleset.0,
                mode: mode.code(),
                candidate_ruleset: candidate.as_ref().map_or(0, |c| c.0),
                flags,
                counter_slot: slot,
                generation: self.persisted.generation,
            };
            // Only cgroups whose state changes are repointed: a service whose ruleset, mode and
            // flags stay keeps the generation that last changed them (its events say so).
            let unchanged = old.as_ref().filter(|o| CgroupState { generation: o.state.generation, ..state } == o.state);
            if let Some(old) = unchanged {
                state = old.state;
            }
            let mut registered = BTreeMap::new();
            for cgroup in cgroups {
                let known = old.as_ref().is_some_and(|o| o.cgroups.contains_key(&cgroup.id));
                if !(known && unchanged.is_some()) {
                    self.dataplane.set_cgroup(cgroup.id, state)?;
                }
                if !old.as_ref().is_some_and(|o| o.cgroups.contains_key(&cgroup.id)) {
                    report.registered.push(cgroup.relative.clone());
                }
                registered.insert(cgroup.id, cgroup.relative.clone());
            }
            if let Some(old) = old {
                if old.ruleset.0 != ruleset.0 {
                    retire.push(old.ruleset);
                }
                if let Some(c) = old.candidate.filter(|c| candidate.as_ref().is_none_or(|n| n.0 != c.0)) {
                    retire.push(c);
                }
            }
            next_services.insert(
                service.to_owned(),
                InstalledService { slot, mode, mode_since, ruleset, candidate, cgroups: registered, state },
            );
        }
        // Services that no longer have a cgroup here (or left the policy).
        for (_, old) in std::mem::take(&mut self.services) {
            for id in old.cgroups.keys() {
                self.dataplane.remove_cgroup(*id)?;
                report.unregistered.push(*id);
            }
            retire.push(old.ruleset);
            if let Some(c) = old.candidate {
                retire.push(c);
            }
        }
        // Cgroups that left their service but whose service stays.
        let registered: BTreeSet<u64> = next_services.values().flat_map(|s| s.cgroups.keys().copied()).collect();
        for (id, _) in self.dataplane.cgroup_states() {
            if !registered.contains(&id) {
                self.dataplane.remove_cgroup(id)?;
                report.unregistered.push(id);
            }
        }
        self.services = next_services;

        // 3. Attach where needed; detach where no longer needed.
        let wanted_points: BTreeMap<u64, &FoundCgroup> = desired.attach.iter().map(|c| (c.id, *c)).collect();
        for (id, cgroup) in &wanted_points {
            if self.attached.contains(id) {
                continue;
            }
            let dir = self.cgroup2_mount.join(&cgroup.relative);
            self.dataplane.attach(&dir, *id)?;
            self.attached.insert(*id);
            report.attached.push(cgroup.relative.clone());
        }
        let stale: Vec<u64> = self.attached.iter().filter(|id| !wanted_points.contains_key(id)).copied().collect();
        for id in stale {
            self.dataplane.detach(id);
            self.attached.remove(&id);
        }
        let max_level = desired.matched.iter().map(|(c, _)| c.relative.split('/').count() as u32).max().unwrap_or(0);
        let (dns_proxy_port, dns_exempt_cgroup) = self.dns.map_or((0, 0), |(port, cgroup)| (u32::from(port), cgroup));
        self.dataplane.set_config(Config {
            max_level,
            dns_proxy_port,
            dedup_window_ns: 1_000_000_000,
            dns_exempt_cgroup,
        })?;

        // 4. Free what no cgroup points at any more, once no running hook can read it.
        self.dataplane.wait_for_readers()?;
        for (id, ruleset) in &retire {
            self.harvest_hits(*id)?;
            self.dataplane.uninstall(ruleset)?;
            report.retired += 1;
        }
        if self.cleanup_pending {
            // Rulesets a previous agent left behind.
            let live: BTreeSet<u32> = self
                .services
                .values()
                .flat_map(|s| std::iter::once(s.ruleset.0).chain(s.candidate.as_ref().map(|c| c.0)))
                .collect();
            for id in self.dataplane.ruleset_ids() {
                if !live.contains(&id) {
                    self.dataplane.take_rule_hits(id)?;
                    report.retired += usize::from(self.dataplane.remove_ruleset(id)? > 0);
                }
            }
            // An upgrade: the previous ABI's programs enforced beside ours until now.
            report.previous_abi_pins_removed = self.dataplane.remove_retired()?;
            self.cleanup_pending = false;
        }
        self.applied = Some(key);
        // The kernel is in force whether or not its books can be written.
        report.state_error = self.save().err().map(|e| e.to_string());
        Ok(report)
    }

    /// Writes the books to the state file (each apply does; call it again after a failure).
    pub fn save(&self) -> Result<()> {
        let io = |source| KernelError::State { path: self.state_file.clone(), source };
        let text = serde_json::to_vec_pretty(&self.persisted).map_err(std::io::Error::other).map_err(io)?;
        crate::durable::replace(&self.state_file, &text, crate::durable::Access::Private).map_err(io)
    }

    /// Entries this agent has in (`DF_RULES`, `DF_CIDRS`, `DF_CGROUPS`), from its own books:
    /// counting the maps would take one syscall per entry.
    pub fn fill(&self) -> (usize, usize, usize) {
        let rulesets = self.services.values().flat_map(|s| std::iter::once(&s.ruleset).chain(s.candidate.as_ref()));
        let (exact, cidrs) = rulesets.fold((0, 0), |(e, c), (_, r)| (e + r.exact.len(), c + r.cidrs.len()));
        (exact, cidrs, self.services.values().map(|s| s.cgroups.len()).sum())
    }

    /// Reads and deletes a retired ruleset's hits, keeping those not yet handed out.
    fn harvest_hits(&mut self, ruleset: u32) -> Result<()> {
        let hits = self.dataplane.take_rule_hits(ruleset)?;
        let Some(names) = self.rule_names.remove(&ruleset) else { return Ok(()) };
        for (rule_id, total) in hits {
            let read = self.hits_read.remove(&RuleHitKey { ruleset, rule_id }).unwrap_or(0);
            if let Some(rule) = names.name(rule_id)
                && total > read
            {
                self.retired_hits.push(RuleHits { service: names.service.clone(), rule, hits: total - read });
            }
        }
        self.hits_read.retain(|key, _| key.ruleset != ruleset);
        Ok(())
    }

    /// The rule hits since the last call: of the active rulesets, and of those retired since.
    pub fn rule_hits(&mut self) -> Result<Vec<RuleHits>> {
        let mut out = std::mem::take(&mut self.retired_hits);
        for (key, total) in self.dataplane.rule_hits()? {
            let Some(names) = self.rule_names.get(&key.ruleset) else { continue };
            let read = self.hits_read.insert(key, total).unwrap_or(0);
            if let Some(rule) = names.name(key.rule_id)
                && total > read
            {
                out.push(RuleHits { service: names.service.clone(), rule, hits: total - read });
            }
        }
        Ok(out)
    }

    /// The rules of a service's active ruleset.
    pub fn rule_names(&self, service: &str) -> Option<&RuleNames> {
        self.services.get(service).and_then(|s| self.rule_names.get(&s.ruleset.0))
    }

    /// Allowed connections whose rule's hit the kernel could not count (its map was full).
    pub fn rule_hits_dropped(&self) -> u64 {
        self.dataplane.rule_hits_dropped()
    }

    /// The counters of a service's slot.
    pub fn counters(&self, slot: u32) -> Counts {
        self.dataplane.counts(slot).unwrap_or_default()
    }
}
