//! The kernel side the agent drives, as a trait: the maps and the program attachments of one
//! pin root. [`Datapath`] (aya, the real kernel) implements it; the agent's tests implement it
//! in memory (`agent::fake`), so the agent's logic runs without privileges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::datapath::abi::{
    CgroupState, Config, Event, GLOBAL_EVENTS_DROPPED, GLOBAL_RULE_HITS_DROPPED, RuleHitKey, map_names, prog_names,
};
use crate::datapath::sweep::ClosedSocket;
use crate::datapath::{Datapath, DatapathError, map_err};
use crate::lower::CompiledRuleset;
use crate::verdict::Counts;

/// The maps and attachments of one pin root, as the agent uses them.
pub trait Dataplane {
    /// Writes every entry of a ruleset (before any cgroup points at it); all or nothing.
    fn install(&mut self, ruleset: &CompiledRuleset) -> Result<(), DatapathError>;
    /// Deletes the entries a ruleset's install wrote; returns how many.
    fn uninstall(&mut self, ruleset: &CompiledRuleset) -> Result<usize, DatapathError>;
    /// Deletes every entry of a ruleset id, whoever wrote it; returns how many.
    fn remove_ruleset(&mut self, ruleset: u32) -> Result<usize, DatapathError>;
    /// The ruleset ids that have entries.
    fn ruleset_ids(&self) -> BTreeSet<u32>;
    /// Points a cgroup at a state: one update, the atomic switch of mode, ruleset, candidate.
    fn set_cgroup(&mut self, cgroup_id: u64, state: CgroupState) -> Result<(), DatapathError>;
    /// Removes a cgroup's entry (absent is fine).
    fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<(), DatapathError>;
    /// Every registered cgroup and its state.
    fn cgroup_states(&self) -> Vec<(u64, CgroupState)>;
    /// Returns once no running hook can still read a ruleset that no cgroup points at.
    fn wait_for_readers(&self) -> Result<(), DatapathError>;
    /// The counters of a slot.
    fn counts(&self, slot: u32) -> Result<Counts, DatapathError>;
    /// Zeroes the counters of a slot (before it gets a new owner).
    fn reset_counters(&mut self, slot: u32) -> Result<(), DatapathError>;
    /// Every rule's hits, by (ruleset, rule id).
    fn rule_hits(&self) -> Result<BTreeMap<RuleHitKey, u64>, DatapathError>;
    /// Reads and deletes the hits of a ruleset no hook can count into any more: (rule id, hits).
    fn take_rule_hits(&mut self, ruleset: u32) -> Result<Vec<(u32, u64)>, DatapathError>;
    /// Allowed connections whose rule's hit could not be counted (the hits map was full).
    fn rule_hits_dropped(&self) -> u64;
    /// The runtime settings.
    fn config(&self) -> Result<Config, DatapathError>;
    /// Writes the runtime settings.
    fn set_config(&mut self, config: Config) -> Result<(), DatapathError>;
    /// The events reported since the last call.
    fn drain_events(&mut self) -> Vec<Event>;
    /// Events lost because the ring buffer was full.
    fn events_dropped(&self) -> u64;
    /// Attaches every hook to a cgroup (its directory and id), pinned so it outlives the agent.
    fn attach(&mut self, cgroup_dir: &Path, cgroup_id: u64) -> Result<(), DatapathError>;
    /// Detaches every hook from a cgroup.
    fn detach(&mut self, cgroup_id: u64);
    /// The cgroups the hooks are attached to (a restarted agent finds its predecessor's).
    fn attached(&self) -> BTreeSet<u64>;
    /// Finds the connections the policy in force would refuse now and closes them in enforce;
    /// `policy_of` maps each cgroup to the registered one whose policy applies to it.
    fn close_disallowed(&mut self, policy_of: &BTreeMap<u64, u64>) -> Result<Vec<ClosedSocket>, DatapathError>;
    /// Unpins what a loader of a previous ABI left attached beside this one (an upgrade), once
    /// this one enforces; returns how many pins went.
    fn remove_retired(&mut self) -> Result<usize, DatapathError>;
}

impl Dataplane for Datapath {
    fn install(&mut self, ruleset: &CompiledRuleset) -> Result<(), DatapathError> {
        self.maps.install(ruleset)
    }

    fn uninstall(&mut self, ruleset: &CompiledRuleset) -> Result<usize, DatapathError> {
        self.maps.uninstall(ruleset)
    }

    fn remove_ruleset(&mut self, ruleset: u32) -> Result<usize, DatapathError> {
        self.maps.remove_ruleset(ruleset)
    }

    fn ruleset_ids(&self) -> BTreeSet<u32> {
        self.maps.ruleset_ids()
    }

    fn set_cgroup(&mut self, cgroup_id: u64, state: CgroupState) -> Result<(), DatapathError> {
        self.maps.set_cgroup(cgroup_id, state)
    }

    fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.maps.remove_cgroup(cgroup_id)
    }

    fn cgroup_states(&self) -> Vec<(u64, CgroupState)> {
        self.maps.cgroup_states()
    }

    fn wait_for_readers(&self) -> Result<(), DatapathError> {
        self.maps.wait_for_readers()
    }

    fn counts(&self, slot: u32) -> Result<Counts, DatapathError> {
        self.maps.counts(slot)
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        self.maps.reset_counters(slot)
    }

    fn rule_hits(&self) -> Result<BTreeMap<RuleHitKey, u64>, DatapathError> {
        self.maps.rule_hits()
    }

    fn take_rule_hits(&mut self, ruleset: u32) -> Result<Vec<(u32, u64)>, DatapathError> {
        self.maps.take_rule_hits(ruleset)
    }

    fn rule_hits_dropped(&self) -> u64 {
        self.maps.global(GLOBAL_RULE_HITS_DROPPED).unwrap_or(0)
    }

    fn config(&self) -> Result<Config, DatapathError> {
        self.maps.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        self.maps.set_config(config)
    }

    fn drain_events(&mut self) -> Vec<Event> {
        self.maps.drain_events()
    }

    fn events_dropped(&self) -> u64 {
        self.maps.global(GLOBAL_EVENTS_DROPPED).unwrap_or(0)
    }

    fn attach(&mut self, cgroup_dir: &Path, _cgroup_id: u64) -> Result<(), DatapathError> {
        Datapath::attach(self, cgroup_dir, &prog_names::ALL).map(drop)
    }

    fn detach(&mut self, cgroup_id: u64) {
        for prog in prog_names::ALL {
            let _ = std::fs::remove_file(self.layout().link(prog, cgroup_id));
        }
    }

    fn attached(&self) -> BTreeSet<u64> {
        self.layout().linked_cgroups()
    }

    fn close_disallowed(&mut self, policy_of: &BTreeMap<u64, u64>) -> Result<Vec<ClosedSocket>, DatapathError> {
        Datapath::close_disallowed(self, policy_of)
    }

    fn remove_retired(&mut self) -> Result<usize, DatapathError> {
        Ok(self.layout().remove_retired()?)
    }
}
