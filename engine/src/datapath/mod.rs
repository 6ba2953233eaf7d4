//! Load / attach / pin / adopt.
//!
//! Ownership: maps are pinned at `<root>/maps/<NAME>` as they are created (aya
//! `EbpfLoader::map_pin_path`; an existing pin is reused, which is how a restarted agent keeps
//! its state). Links are pinned at `<root>/links/<prog>-<cgroup id>`; a pinned link stays
//! attached after every fd is closed, so enforcement never lapses while the agent is down.
//! Removing the link pin (and closing fds) detaches; removing the map pins frees the maps.
use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::Key,
    },
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use depfence_bpf_common::{
    ABI_VERSION, CgroupState, CidrKeyData, CidrValue, Config, Event, Meta, RuleHitKey, RuleKey, RuleValue,
    VERDICT_COUNT, map_names, prog_names,
};

pub mod confine;
pub mod pins;
pub mod sockets;
pub mod status;
pub mod sweep;
mod sys;

/// The kernel ABI: map types, names and constants shared with the eBPF programs.
pub use depfence_bpf_common as abi;

use self::{pins::PinLayout, sys::ReaderBarrier};
use crate::cgroup::cgroup_id;
use crate::lower::CompiledRuleset;
use crate::verdict::{Counts, Verdict};

/// The eBPF object built by `engine/build.rs` (aya-build copies the `depfence-bpf` bin to
/// `OUT_DIR`). Empty when built with `AYA_BUILD_SKIP=1`.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/depfence-bpf"));

/// Loading, attaching or driving the datapath failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatapathError {
    /// The build skipped the eBPF object.
    #[error("the eBPF object is empty (built with AYA_BUILD_SKIP=1)")]
    NoObject,
    /// The kernel refused the object (the verifier log is in the source).
    #[error("loading the eBPF object")]
    Load(#[from] EbpfError),
    /// The object lacks a program this loader needs.
    #[error("program `{0}` is missing from the object")]
    MissingProgram(&'static str),
    /// The object lacks a map this loader needs.
    #[error("map `{0}` is missing from the object")]
    MissingMap(&'static str),
    /// A program operation failed.
    #[error("program `{name}`")]
    Program {
        /// The program.
        name: &'static str,
        /// What failed.
        #[source]
        source: ProgramError,
    },
    /// The kernel refused to attach a hook beside the programs already there.
    #[error(
        "cannot attach `{hook}` to {}: the cgroup or an ancestor holds a program on this hook that \
         was attached without BPF_F_ALLOW_MULTI and excludes all others (see `bpftool cgroup tree`)",
        cgroup.display()
    )]
    AttachRefused {
        /// The hook (program name).
        hook: &'static str,
        /// The cgroup.
        cgroup: PathBuf,
        /// The kernel's answer.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("map `{name}`")]
    Map {
        /// The map.
        name: &'static str,
        /// What failed.
        #[source]
        source: MapError,
    },
    /// A map has no room for the entries being written.
    #[error("map `{name}` is full ({capacity} entries); nothing of this ruleset is in force")]
    MapFull {
        /// The map.
        name: &'static str,
        /// Its capacity.
        capacity: u32,
    },
    /// A link operation failed.
    #[error("link")]
    Link(#[from] LinkError),
    /// Pinning failed.
    #[error("pin")]
    Pin(#[from] PinError),
    /// Pinned maps were made by a loader with another layout.
    #[error("pinned maps have ABI version {found}, this loader knows {ABI_VERSION}")]
    AbiMismatch {
        /// The version found in the pinned `DF_META`.
        found: u32,
    },
    /// A cgroup could not be read.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// A file-system operation failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// A failed raw bpf(2) command in aya's error type.
fn io_syscall(call: &'static str, io_error: io::Error) -> aya::sys::SyscallError {
    aya::sys::SyscallError { call, io_error }
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Opens one pinned map as a typed handle.
pub(crate) fn open_pinned<T: TryFrom<Map, Error = MapError>>(layout: &PinLayout, name: &'static str) -> Result<T> {
    let data = MapData::from_pin(layout.map(name)).map_err(map_err(name))?;
    T::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}

/// Typed handles on every map; the same whether they came from a fresh load or from pins.
pub struct Maps {
    /// `DF_CGROUPS`: cgroup id → state.
    pub cgroups: HashMap<MapData, u64, CgroupState>,
    /// `DF_RULES`: exact rules.
    pub rules: HashMap<MapData, RuleKey, RuleValue>,
    /// `DF_CIDRS`: address-block rules.
    pub cidrs: LpmTrie<MapData, CidrKeyData, CidrValue>,
    /// `DF_COUNTERS`: per-CPU counters, slot × verdict.
    pub counters: PerCpuArray<MapData, u64>,
    /// `DF_GLOBALS`: per-CPU global counters.
    pub globals: PerCpuArray<MapData, u64>,
    /// `DF_EVENTS`: the event ring buffer.
    pub events: RingBuf<MapData>,
    /// `DF_META`: the layout version.
    pub meta: Array<MapData, Meta>,
    /// `DF_CONFIG`: runtime settings.
    pub config: Array<MapData, Config>,
    /// `DF_RULE_HITS`: per-CPU hits of each rule of each ruleset.
    pub rule_hits: PerCpuHashMap<MapData, RuleHitKey, u64>,
    barrier: ReaderBarrier,
}

/// What one [`Maps::hot_swap`] did, and how long each step took.
#[derive(Clone, Copy, Debug, Default)]
pub struct SwapReport {
    /// Entries written for the new generation.
    pub installed: usize,
    /// Writing the new generation (before any cgroup sees it).
    pub install: std::time::Duration,
    /// Repointing the cgroups: one map update each, the moment of the swap.
    pub repoint: std::time::Duration,
    /// Waiting until no running hook can still read the old generation.
    pub wait_for_readers: std::time::Duration,
    /// Entries of the old generation deleted.
    pub retired: usize,
    /// Deleting the old generation.
    pub retire: std::time::Duration,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name));
        Ok(Self {
            cgroups: HashMap::try_from(take(map_names::CGROUPS)?).map_err(map_err(map_names::CGROUPS))?,
            rules: HashMap::try_from(take(map_names::RULES)?).map_err(map_err(map_names::RULES))?,
            cidrs: LpmTrie::try_from(take(map_names::CIDRS)?).map_err(map_err(map_names::CIDRS))?,
            counters: PerCpuArray::try_from(take(map_names::COUNTERS)?).map_err(map_err(map_names::COUNTERS))?,
            globals: PerCpuArray::try_from(take(map_names::GLOBALS)?).map_err(map_err(map_names::GLOBALS))?,
            events: RingBuf::try_from(take(map_names::EVENTS)?).map_err(map_err(map_names::EVENTS))?,
            meta: Array::try_from(take(map_names::META)?).map_err(map_err(map_names::META))?,
            config: Array::try_from(take(map_names::CONFIG)?).map_err(map_err(map_names::CONFIG))?,
            rule_hits: PerCpuHashMap::try_from(take(map_names::RULE_HITS)?).map_err(map_err(map_names::RULE_HITS))?,
            barrier: ReaderBarrier::new()?,
        })
    }

    /// Re-open every map from its pin (no programs are loaded).
    pub fn from_pins(layout: &PinLayout) -> Result<Self> {
        // The layout version first: the pins of another ABI may not have every map of this one.
        let meta: Array<MapData, Meta> = open_pinned(layout, map_names::META)?;
        let found = meta.get(&0, 0).map_err(map_err(map_names::META))?.abi_version;
        if found != ABI_VERSION {
            return Err(DatapathError::AbiMismatch { found });
        }
        let maps = Self {
            cgroups: open_pinned(layout, map_names::CGROUPS)?,
            rules: open_pinned(layout, map_names::RULES)?,
            cidrs: open_pinned(layout, map_names::CIDRS)?,
            counters: open_pinned(layout, map_names::COUNTERS)?,
            globals: open_pinned(layout, map_names::GLOBALS)?,
            events: open_pinned(layout, map_names::EVENTS)?,
            meta,
            config: open_pinned(layout, map_names::CONFIG)?,
            rule_hits: open_pinned(layout, map_names::RULE_HITS)?,
            barrier: ReaderBarrier::new()?,
        };
        Ok(maps)
    }

    /// Writes every entry of a compiled ruleset (before any cgroup points at it). Exact rules go
    /// in batches (`BPF_MAP_UPDATE_BATCH`).
    pub fn install(&mut self, c: &CompiledRuleset) -> Result<()> {
        let rules = IterableMap::map(&self.rules);
        if let Err(e) = sys::update_batch(rules.fd().as_fd(), &c.exact) {
            // Leave nothing half-written behind: no cgroup points at this ruleset yet.
            let keys: Vec<RuleKey> = c.exact.iter().map(|(k, _)| *k).collect();
            sys::delete_present(rules.fd().as_fd(), &keys);
            if e.raw_os_error() == Some(libc::E2BIG) {
                let capacity = rules.info().map(|i| i.max_entries()).unwrap_or(0);
                return Err(DatapathError::MapFull { name: map_names::RULES, capacity });
            }
            return Err(map_err(map_names::RULES)(MapError::from(io_syscall("BPF_MAP_UPDATE_BATCH", e))));
        }
        for (plen, data, v) in &c.cidrs {
            self.cidrs.insert(&Key::new(*plen, *data), v, 0).map_err(map_err(map_names::CIDRS))?;
        }
        Ok(())
    }

    /// Deletes every entry of a compiled ruleset that [`Maps::install`] wrote (after no cgroup
    /// points at it and [`Maps::wait_for_readers`] returned).
    pub fn uninstall(&mut self, c: &CompiledRuleset) -> Result<usize> {
        let keys: Vec<RuleKey> = c.exact.iter().map(|(k, _)| *k).collect();
        sys::delete_batch(IterableMap::map(&self.rules).fd().as_fd(), &keys)
            .map_err(|e| map_err(map_names::RULES)(MapError::from(io_syscall("BPF_MAP_DELETE_BATCH", e))))?;
        for (plen, data, _) in &c.cidrs {
            self.cidrs.remove(&Key::new(*plen, *data)).map_err(map_err(map_names::CIDRS))?;
        }
        Ok(keys.len() + c.cidrs.len())
    }

    /// Returns once every hook that was running has finished: after it, nothing reads a
    /// ruleset that no cgroup points at any more.
    pub fn wait_for_readers(&self) -> Result<()> {
        Ok(self.barrier.wait_for_readers()?)
    }

    /// Replaces a generation atomically per cgroup: writes `new` completely, repoints each
    /// cgroup with one map update (a connect sees either the old state or the new, never a
    /// mix), waits until no running hook can still read `old`, then deletes `old`.
    pub fn hot_swap(
        &mut self,
        new: &CompiledRuleset,
        cgroups: &[(u64, CgroupState)],
        old: Option<&CompiledRuleset>,
    ) -> Result<SwapReport> {
        let mut report = SwapReport::default();
        let t = std::time::Instant::now();
        self.install(new)?;
        report.installed = new.exact.len() + new.cidrs.len();
        report.install = t.elapsed();
        let t = std::time::Instant::now();
        for (id, state) in cgroups {
            self.set_cgroup(*id, *state)?;
        }
        report.repoint = t.elapsed();
        let t = std::time::Instant::now();
        self.wait_for_readers()?;
        report.wait_for_readers = t.elapsed();
        if let Some(old) = old {
            let t = std::time::Instant::now();
            report.retired = self.uninstall(old)?;
            report.retire = t.elapsed();
        }
        Ok(report)
    }

    /// Delete every entry of `ruleset` (after no cgroup points at it). Returns the count.
    pub fn remove_ruleset(&mut self, ruleset: u32) -> Result<usize> {
        let keys: Vec<RuleKey> = self.rules.keys().filter_map(|k| k.ok()).filter(|k| k.ruleset == ruleset).collect();
        for k in &keys {
            self.rules.remove(k).map_err(map_err(map_names::RULES))?;
        }
        let be = ruleset.to_be();
        let cidr_keys: Vec<Key<CidrKeyData>> =
            self.cidrs.keys().filter_map(|k| k.ok()).filter(|k| k.data().ruleset_be == be).collect();
        for k in &cidr_keys {
            self.cidrs.remove(k).map_err(map_err(map_names::CIDRS))?;
        }
        Ok(keys.len() + cidr_keys.len())
    }

    /// Every rule's hits, summed over CPUs, by (ruleset, rule id).
    pub fn rule_hits(&self) -> Result<std::collections::BTreeMap<RuleHitKey, u64>> {
        let mut hits = std::collections::BTreeMap::new();
        for entry in self.rule_hits.iter() {
            let (key, values) = entry.map_err(map_err(map_names::RULE_HITS))?;
            hits.insert(key, values.iter().sum());
        }
        Ok(hits)
    }

    /// Reads and deletes the hits of one ruleset (retired: no hook can count into it any more):
    /// (rule id, hits summed over CPUs).
    pub fn take_rule_hits(&mut self, ruleset: u32) -> Result<Vec<(u32, u64)>> {
        let found: Vec<(RuleHitKey, u64)> =
            self.rule_hits()?.into_iter().filter(|(key, _)| key.ruleset == ruleset).collect();
        for (key, _) in &found {
            match self.rule_hits.remove(key) {
                Err(MapError::KeyNotFound) | Ok(()) => {}
                Err(e) => return Err(map_err(map_names::RULE_HITS)(e)),
            }
        }
        Ok(found.into_iter().map(|(key, hits)| (key.rule_id, hits)).collect())
    }

    /// Writes the runtime settings.
    pub fn set_config(&mut self, config: Config) -> Result<()> {
        self.config.set(0, config, 0).map_err(map_err(map_names::CONFIG))
    }

    /// One map update: the atomic switch of mode / ruleset / candidate for a cgroup.
    pub fn set_cgroup(&mut self, cgroup_id: u64, state: CgroupState) -> Result<()> {
        self.cgroups.insert(cgroup_id, state, 0).map_err(map_err(map_names::CGROUPS))
    }

    /// Sum over CPUs of counter (slot, verdict).
    pub fn counter(&self, slot: u32, verdict: u32) -> Result<u64> {
        let v = self.counters.get(&(slot * VERDICT_COUNT + verdict), 0).map_err(map_err(map_names::COUNTERS))?;
        Ok(v.iter().sum())
    }

    /// Every counter of `slot`, summed over CPUs.
    pub fn counts(&self, slot: u32) -> Result<Counts> {
        let mut counts = Counts::default();
        for verdict in Verdict::ALL {
            counts[verdict] = self.counter(slot, verdict.code())?;
        }
        Ok(counts)
    }

    /// Zeroes the counters of `slot` on every CPU (before a slot is given to a new owner).
    pub fn reset_counters(&mut self, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io(e))?;
        for verdict in 0..VERDICT_COUNT {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).map_err(DatapathError::Io)?;
            self.counters.set(slot * VERDICT_COUNT + verdict, zeros, 0).map_err(map_err(map_names::COUNTERS))?;
        }
        Ok(())
    }

    /// Copies the counters of a retired ABI's maps (in `dir`) into these fresh ones, summed over
    /// CPUs, so an upgrade keeps the evidence: counters only ever grow. Skipped when that
    /// ABI's counters have another layout.
    fn carry_counters_from(&mut self, dir: &Path) -> Result<()> {
        let name = map_names::COUNTERS;
        let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
        let Ok(old) = PerCpuArray::<MapData, u64>::try_from(Map::from_map_data(data).map_err(map_err(name))?) else {
            return Ok(());
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io(e))?;
        let len = old.len().min(self.counters.len());
        for index in 0..len {
            let sum: u64 = old.get(&index, 0).map_err(map_err(name))?.iter().sum();
            if sum == 0 {
                continue;
            }
            let mut values = vec![0u64; cpus];
            if let Some(first) = values.first_mut() {
                *first = sum;
            }
            let values = aya::maps::PerCpuValues::try_from(values).map_err(DatapathError::Io)?;
            self.counters.set(index, values, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Removes a cgroup's entry (it left the policy, or it is gone).
    pub fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<()> {
        match self.cgroups.remove(&cgroup_id) {
            Err(MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(map_err(map_names::CGROUPS)(e)),
        }
    }

    /// Every (cgroup id, state) entry.
    pub fn cgroup_states(&self) -> Vec<(u64, CgroupState)> {
        self.cgroups.iter().filter_map(|entry| entry.ok()).collect()
    }

    /// The ruleset ids that have entries in `DF_RULES` or `DF_CIDRS` (a scan: for cleaning up
    /// after a restart, not for the hot path).
    pub fn ruleset_ids(&self) -> std::collections::BTreeSet<u32> {
        let exact = self.rules.keys().filter_map(|k| k.ok()).map(|k| k.ruleset);
        let cidr = self.cidrs.keys().filter_map(|k| k.ok()).map(|k| u32::from_be(k.data().ruleset_be));
        exact.chain(cidr).collect()
    }

    /// A global counter (`GLOBAL_*`), summed over CPUs.
    pub fn global(&self, idx: u32) -> Result<u64> {
        let v = self.globals.get(&idx, 0).map_err(map_err(map_names::GLOBALS))?;
        Ok(v.iter().sum())
    }

    /// Everything currently in the ring buffer.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: Event is Pod; length checked; unaligned read.
                #[expect(unsafe_code, reason = "a ring buffer item holds the bytes of an Event the kernel wrote")]
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
        out
    }
}

/// A loaded object plus its maps. Dropping it closes fds only: pinned links and maps stay.
pub struct Datapath {
    ebpf: Ebpf,
    /// The maps.
    pub maps: Maps,
    layout: PinLayout,
}

impl Datapath {
    /// Load the embedded object, creating (or reusing) pinned maps under `layout`, with room
    /// for [`abi::MAX_RULES`] exact rules.
    pub fn load(layout: &PinLayout) -> Result<Self> {
        Self::load_with_rule_capacity(layout, abi::MAX_RULES)
    }

    /// [`Datapath::load`] with `DF_RULES` sized for `capacity` exact rules (a swap needs room
    /// for the old and the new generation at once). The hash table's buckets take 16 bytes
    /// per entry of capacity up front, so a short-lived loader with a small policy asks for
    /// less. Pinned maps that already exist keep their size.
    pub fn load_with_rule_capacity(layout: &PinLayout, capacity: u32) -> Result<Self> {
        if BPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        // Pinned maps of an older ABI are taken over: moved aside, still attached and
        // enforcing, while this loader makes its own (the agent unpins them once its programs
        // enforce the policy, `PinLayout::remove_retired`). A newer ABI is refused: a downgrade
        // must be done by hand. Either way, before any program gets bound to the old maps.
        let mut retired = None;
        if layout.map(map_names::META).exists() {
            match Maps::from_pins(layout) {
                Ok(maps) => drop(maps),
                Err(DatapathError::AbiMismatch { found }) if found < ABI_VERSION => {
                    layout.retire(found)?;
                    retired = Some(found);
                }
                Err(e) => return Err(e),
            }
        }
        layout.create_dirs()?;
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map_names::RULES, capacity.max(1));
        let paths: Vec<(&'static str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, layout.map(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(BPF_OBJECT)?;
        // The benchmark's cost-floor programs are in the object only with `bench-programs`.
        let bench = prog_names::BENCH.into_iter().filter(|_| cfg!(feature = "bench-programs"));
        for name in prog_names::ALL.into_iter().chain(bench) {
            let loaded = match ebpf.program_mut(name).ok_or(DatapathError::MissingProgram(name))? {
                Program::CgroupSockAddr(prog) => prog.load(),
                Program::CgroupSock(prog) => prog.load(),
                Program::CgroupSockopt(prog) => prog.load(),
                Program::CgroupSkb(prog) => prog.load(),
                _ => Err(ProgramError::UnexpectedProgramType),
            };
            loaded.map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut maps = Maps::take(&mut ebpf)?;
        let meta = maps.meta.get(&0, 0).map_err(map_err(map_names::META))?;
        if meta.abi_version == 0 {
            if let Some(abi) = retired {
                maps.carry_counters_from(&layout.retired_maps_dir(abi))?;
            }
            let meta = Meta { abi_version: ABI_VERSION, _reserved: 0 };
            maps.meta.set(0, meta, 0).map_err(map_err(map_names::META))?;
        }
        Ok(Self { ebpf, maps, layout: layout.clone() })
    }

    /// Attach `progs` to the cgroup directory and pin each link. Returns the link pins.
    pub fn attach(&mut self, cgroup_dir: &Path, progs: &[&'static str]) -> Result<Vec<PathBuf>> {
        let cgroup = File::open(cgroup_dir)?;
        let cgid = cgroup_id(cgroup_dir)?;
        let mut pins = Vec::new();
        for &name in progs {
            match self.attach_one(&cgroup, cgroup_dir, cgid, name) {
                Ok(path) => pins.push(path),
                Err(error) => {
                    // All hooks or none: unpinning detaches the ones already attached.
                    for path in &pins {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(error);
                }
            }
        }
        Ok(pins)
    }

    fn attach_one(&mut self, cgroup: &File, cgroup_dir: &Path, cgid: u64, name: &'static str) -> Result<PathBuf> {
        let path = self.layout.link(name, cgid);
        let failed = |source: ProgramError| {
            let refused =
                matches!(&source, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EPERM));
            if refused {
                DatapathError::AttachRefused { hook: name, cgroup: cgroup_dir.to_owned(), source }
            } else {
                DatapathError::Program { name, source }
            }
        };
        // AllowMultiple fails with EINVAL (aya issue 1078); bpf_link attachments are multi in
        // the kernel anyway.
        let mode = CgroupAttachMode::Single;
        let link: FdLink = match self.ebpf.program_mut(name).ok_or(DatapathError::MissingProgram(name))? {
            Program::CgroupSockAddr(prog) => {
                let id = prog.attach(cgroup, mode).map_err(failed)?;
                prog.take_link(id).map_err(failed)?.try_into()?
            }
            Program::CgroupSock(prog) => {
                let id = prog.attach(cgroup, mode).map_err(failed)?;
                prog.take_link(id).map_err(failed)?.try_into()?
            }
            Program::CgroupSkb(prog) => {
                let id = prog.attach(cgroup, CgroupSkbAttachType::Egress, mode).map_err(failed)?;
                prog.take_link(id).map_err(failed)?.try_into()?
            }
            Program::CgroupSockopt(prog) if name == prog_names::SETSOCKOPT => {
                let prog_fd = prog.fd().map_err(failed)?;
                sys::attach_pinned(prog_fd.as_fd(), cgroup.as_fd(), sys::BPF_CGROUP_SETSOCKOPT, &path)
                    .map_err(|e| failed(ProgramError::SyscallError(io_syscall("bpf_link_create", e))))?;
                return Ok(path);
            }
            _ => return Err(DatapathError::Program { name, source: ProgramError::UnexpectedProgramType }),
        };
        let pinned = link.pin(&path)?;
        drop(pinned); // fd closed; the pin keeps the link (and the program) alive
        Ok(path)
    }

    /// Where the maps and links are pinned.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// The loaded object.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The underlying object (maps not taken into [`Maps`], e.g. benchmark-only ones).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Kernel-accounted (run_time_ns, run_cnt) of a program of this object. Counts only while
    /// stats are enabled (`aya::sys::enable_stats` fd held, or sysctl kernel.bpf_stats_enabled).
    pub fn prog_stats(&self, name: &'static str) -> Result<(u64, u64)> {
        let prog = self.ebpf.program(name).ok_or(DatapathError::MissingProgram(name))?;
        let info = prog.info().map_err(|source| DatapathError::Program { name, source })?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }
}

/// What a restarted agent holds: maps and links reopened from pins, no object loaded.
pub struct Adopted {
    /// The maps, opened from their pins.
    pub maps: Maps,
    /// (pin path, link). `FdLink::from(PinnedLink)` keeps the pin on bpffs; dropping the
    /// FdLink only closes our fd.
    pub links: Vec<(PathBuf, FdLink)>,
}

impl Adopted {
    /// Opens the maps and links pinned under `layout` (after checking the ABI version).
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let maps = Maps::from_pins(layout)?;
        let mut links = Vec::new();
        for entry in std::fs::read_dir(layout.links_dir())? {
            let path = entry?.path();
            let link = FdLink::from(PinnedLink::from_pin(&path)?);
            links.push((path, link));
        }
        Ok(Self { maps, links })
    }
}
