//! An in-memory [`Dataplane`] for the agent's tests. The maps are plain collections, and a
//! connection is judged as the hook judges it: the cgroup's state, the kernel's own rule lookup
//! (`depfence_bpf_common::lookup`, through [`LoweredRules`]) and verdict rule, the counters and
//! an event for everything not allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use super::dataplane::Dataplane;
use crate::datapath::DatapathError;
use crate::datapath::abi::{self, CgroupState, Config, Event, RuleHitKey, lookup::Extra, verdict_of};
use crate::datapath::sweep::ClosedSocket;
use crate::lower::{CompiledRuleset, LoweredRules, destination};
use crate::snapshot::Connection;
use crate::verdict::{Counts, Verdict};

/// The kernel's maps and attachments, in memory.
#[derive(Debug, Default)]
pub(crate) struct FakeDataplane {
    rules: LoweredRules,
    cgroups: BTreeMap<u64, CgroupState>,
    counters: BTreeMap<u32, Counts>,
    rule_hits: BTreeMap<RuleHitKey, u64>,
    config: Config,
    events: Vec<Event>,
    attached: BTreeSet<u64>,
    /// Connections made and not closed: (cookie, cgroup, destination).
    open: Vec<(u64, u64, Connection)>,
    /// The cookie of the last connection made.
    last_cookie: u64,
}

impl FakeDataplane {
    /// A connection from a process in cgroup `cgroup_id`, judged as the connect hook judges it;
    /// None when no service's policy applies to the cgroup (the hook lets it pass, uncounted).
    pub(crate) fn connect(&mut self, cgroup_id: u64, conn: &Connection) -> Option<Verdict> {
        let state = *self.cgroups.get(&cgroup_id)?;
        if state.mode == abi::MODE_OFF {
            return Some(Verdict::Allowed);
        }
        let d = destination(conn);
        let hit = self.rules.first_match_with(state.ruleset_id, &d, Extra::active(&state));
        let verdict = Verdict::from_code(verdict_of(state.mode, hit != 0))?;
        self.count(cgroup_id, &state, &d, verdict);
        if hit != 0 {
            *self.rule_hits.entry(RuleHitKey { ruleset: state.ruleset_id, rule_id: hit }).or_default() += 1;
        }
        let candidate = state.candidate_ruleset;
        if candidate != 0
            && candidate != state.ruleset_id
            && self.rules.first_match_with(candidate, &d, Extra::candidate(&state)) == 0
        {
            self.count(cgroup_id, &state, &d, Verdict::CandidateWouldReject);
        }
        if verdict != Verdict::Rejected {
            self.last_cookie += 1;
            self.open.push((self.last_cookie, cgroup_id, *conn));
        }
        Some(verdict)
    }

    fn count(&mut self, cgroup_id: u64, state: &CgroupState, d: &abi::lookup::Destination, verdict: Verdict) {
        self.counters.entry(state.counter_slot).or_default()[verdict] += 1;
        if verdict.is_refusal() {
            let mut comm = [0u8; 16];
            comm[..4].copy_from_slice(b"test");
            self.events.push(Event {
                cgroup_id,
                policy_cgroup_id: cgroup_id,
                pid_tgid: (4242 << 32) | 4242,
                comm,
                addr: d.addr,
                port: d.port,
                proto: d.proto,
                family: d.family,
                verdict: verdict.code(),
                ruleset_id: state.ruleset_id,
                generation: state.generation,
                ..Event::default()
            });
        }
    }

    /// A registered cgroup's state.
    pub(crate) fn cgroup(&self, cgroup_id: u64) -> Option<CgroupState> {
        self.cgroups.get(&cgroup_id).copied()
    }

    /// The cgroups the hooks are attached to, in order.
    pub(crate) fn attached_ids(&self) -> Vec<u64> {
        self.attached.iter().copied().collect()
    }
}

impl Dataplane for FakeDataplane {
    fn install(&mut self, ruleset: &CompiledRuleset) -> Result<(), DatapathError> {
        self.rules.install(ruleset);
        Ok(())
    }

    fn uninstall(&mut self, ruleset: &CompiledRuleset) -> Result<usize, DatapathError> {
        self.rules.uninstall(ruleset);
        Ok(ruleset.exact.len() + ruleset.cidrs.len())
    }

    fn remove_ruleset(&mut self, ruleset: u32) -> Result<usize, DatapathError> {
        Ok(self.rules.remove_ruleset(ruleset))
    }

    fn ruleset_ids(&self) -> BTreeSet<u32> {
        self.rules.ruleset_ids()
    }

    fn set_cgroup(&mut self, cgroup_id: u64, state: CgroupState) -> Result<(), DatapathError> {
        self.cgroups.insert(cgroup_id, state);
        Ok(())
    }

    fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.cgroups.remove(&cgroup_id);
        Ok(())
    }

    fn cgroup_states(&self) -> Vec<(u64, CgroupState)> {
        self.cgroups.iter().map(|(id, state)| (*id, *state)).collect()
    }

    fn wait_for_readers(&self) -> Result<(), DatapathError> {
        Ok(())
    }

    fn counts(&self, slot: u32) -> Result<Counts, DatapathError> {
        Ok(self.counters.get(&slot).copied().unwrap_or_default())
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        self.counters.remove(&slot);
        Ok(())
    }

    fn rule_hits(&self) -> Result<BTreeMap<RuleHitKey, u64>, DatapathError> {
        Ok(self.rule_hits.clone())
    }

    fn take_rule_hits(&mut self, ruleset: u32) -> Result<Vec<(u32, u64)>, DatapathError> {
        let taken: Vec<RuleHitKey> = self.rule_hits.keys().filter(|k| k.ruleset == ruleset).copied().collect();
        Ok(taken.into_iter().filter_map(|k| Some((k.rule_id, self.rule_hits.remove(&k)?))).collect())
    }

    fn rule_hits_dropped(&self) -> u64 {
        0
    }

    fn config(&self) -> Result<Config, DatapathError> {
        Ok(self.config)
    }

    fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        self.config = config;
        Ok(())
    }

    fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn events_dropped(&self) -> u64 {
        0
    }

    fn attach(&mut self, _cgroup_dir: &Path, cgroup_id: u64) -> Result<(), DatapathError> {
        self.attached.insert(cgroup_id);
        Ok(())
    }

    fn detach(&mut self, cgroup_id: u64) {
        self.attached.remove(&cgroup_id);
    }

    fn attached(&self) -> BTreeSet<u64> {
        self.attached.clone()
    }

    /// No previous ABI in memory.
    fn remove_retired(&mut self) -> Result<usize, DatapathError> {
        Ok(0)
    }

    /// Finds the open connections the connect hook would now refuse (every one is outbound), and
    /// closes them in enforce.
    fn close_disallowed(&mut self, policy_of: &BTreeMap<u64, u64>) -> Result<Vec<ClosedSocket>, DatapathError> {
        let mut closed = Vec::new();
        let (rules, cgroups) = (&self.rules, &self.cgroups);
        self.open.retain(|(cookie, cgroup_id, conn)| {
            let Some((&policy_cgroup_id, state)) = policy_of.get(cgroup_id).and_then(|id| Some((id, cgroups.get(id)?)))
            else {
                return true;
            };
            let allowed = rules.first_match_with(state.ruleset_id, &destination(conn), Extra::active(state)) != 0;
            if state.mode == abi::MODE_OFF || allowed {
                return true;
            }
            let enforce = state.mode == abi::MODE_ENFORCE;
            closed.push(ClosedSocket {
                closed: enforce,
                cookie: *cookie,
                cgroup_id: *cgroup_id,
                policy_cgroup_id,
                protocol: destination(conn).proto,
                local: SocketAddr::new(conn.addr, 40000),
                remote: SocketAddr::new(conn.addr, conn.port),
                generation: state.generation,
            });
            !enforce
        });
        Ok(closed)
    }
}
