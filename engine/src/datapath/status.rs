//! What depfence holds in the kernel, read back from bpffs: for each pin root its maps (type,
//! fill level, locked memory), its pinned links (program, attach type, cgroup), the cgroups
//! registered in `DF_CGROUPS` with their counters, and the global counters.
//!
//! Read-only: this module opens pins and reads maps; it never mounts bpffs, creates, changes or
//! removes anything. A pin root is a directory directly under a bpffs mount whose name starts
//! with `depfence` and that holds `maps/DF_META` (the agent's `depfence/`, `policyctl run`'s
//! `depfence-run-<pid>/`).
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, MapType},
    programs::{
        links::{FdLink, LinkError, LinkType, PinnedLink},
        loaded_programs,
    },
};
use serde::Serialize;

use super::{
    DatapathError, Maps,
    abi::{
        ABI_VERSION, DedupKey, FLAG_ACTIVE_HAS_CIDR, FLAG_CANDIDATE_HAS_CIDR, FLAG_DNS, FLAG_EVENT_ALLOWED,
        FLAG_EVENT_NO_DEDUP, GLOBAL_BAD_SLOT, GLOBAL_EVENTS_DEDUPED, GLOBAL_EVENTS_DROPPED, GLOBAL_UNREGISTERED, Meta,
        map_names,
    },
    pins::{PinLayout, ROOT_PREFIX, run_pid},
};
use crate::cgroup::{Cgroup2, mount_points};
use crate::verdict::{Counts, Mode};

/// Reading the kernel state failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// The kernel or the file system refused access: reading BPF objects needs root.
    #[error("permission denied reading `{path}`: reading BPF objects needs root (CAP_BPF and CAP_SYS_ADMIN)")]
    PermissionDenied {
        /// What could not be read.
        path: PathBuf,
    },
    /// The given pin root does not exist.
    #[error("`{0}` does not exist")]
    NotFound(PathBuf),
    /// The given directory is not a depfence pin root.
    #[error("`{0}` is not a depfence pin root: it has no `maps/DF_META` pin")]
    NotPinRoot(PathBuf),
    /// A file-system read failed.
    #[error("reading `{path}`: {source}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A pinned map could not be opened or read.
    #[error("map `{path}`: {source}")]
    Map {
        /// The map's pin.
        path: PathBuf,
        /// The error.
        source: Box<MapError>,
    },
    /// A pinned link could not be opened or read.
    #[error("link `{path}`: {source}")]
    Link {
        /// The link's pin.
        path: PathBuf,
        /// The error.
        source: Box<LinkError>,
    },
    /// Opening the maps as the loader does failed.
    #[error("maps under `{path}`: {source}")]
    Maps {
        /// The pin root.
        path: PathBuf,
        /// The error.
        source: Box<DatapathError>,
    },
}

type Result<T, E = StatusError> = std::result::Result<T, E>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StatusError + '_ {
    move |source| match source.kind() {
        io::ErrorKind::PermissionDenied => StatusError::PermissionDenied { path: path.to_owned() },
        _ => StatusError::Io { path: path.to_owned(), source },
    }
}

fn map_syscall_io(error: &MapError) -> Option<&io::Error> {
    match error {
        MapError::SyscallError(e) => Some(&e.io_error),
        _ => None,
    }
}

fn map_error(path: &Path) -> impl FnOnce(MapError) -> StatusError + '_ {
    move |source| match map_syscall_io(&source).map(io::Error::kind) {
        Some(io::ErrorKind::PermissionDenied) => StatusError::PermissionDenied { path: path.to_owned() },
        Some(io::ErrorKind::NotFound) => StatusError::NotFound(path.to_owned()),
        _ => StatusError::Map { path: path.to_owned(), source: Box::new(source) },
    }
}

fn link_error(path: &Path) -> impl FnOnce(LinkError) -> StatusError + '_ {
    move |source| match &source {
        LinkError::SyscallError(e) if e.io_error.kind() == io::ErrorKind::PermissionDenied => {
            StatusError::PermissionDenied { path: path.to_owned() }
        }
        LinkError::SyscallError(e) if e.io_error.kind() == io::ErrorKind::NotFound => {
            StatusError::NotFound(path.to_owned())
        }
        _ => StatusError::Link { path: path.to_owned(), source: Box::new(source) },
    }
}

fn maps_error(path: &Path) -> impl FnOnce(DatapathError) -> StatusError + '_ {
    move |source| match source {
        DatapathError::Map { source, .. } => map_error(path)(source),
        source => StatusError::Maps { path: path.to_owned(), source: Box::new(source) },
    }
}

/// Everything `policyctl status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// bpffs mount points (none: nothing can be pinned).
    pub bpffs: Vec<PathBuf>,
    /// The cgroup2 mount, where cgroup ids are resolved to paths.
    pub cgroup2: Option<PathBuf>,
    /// `kernel.bpf_stats_enabled`: program run counts and times only advance while it is on.
    pub bpf_stats_enabled: Option<bool>,
    /// One entry per pin root.
    pub roots: Vec<RootStatus>,
}

/// One pin root: a set of maps and the links that attach depfence programs to cgroups.
#[derive(Debug, Clone, Serialize)]
pub struct RootStatus {
    /// The directory on bpffs.
    pub root: PathBuf,
    /// `DF_META`'s ABI version.
    pub abi_version: u32,
    /// Whether this build knows that version (otherwise contents are not decoded).
    pub abi_supported: bool,
    /// The pinned maps, in `map_names::ALL` order.
    pub maps: Vec<MapStatus>,
    /// The pinned links, by pin name.
    pub links: Vec<LinkStatus>,
    /// The cgroups registered in `DF_CGROUPS`, by id.
    pub cgroups: Vec<CgroupStatus>,
    /// `DF_GLOBALS`, summed over CPUs (None when the ABI is unknown).
    pub globals: Option<GlobalCounters>,
    /// `DF_CONFIG` (None when the ABI is unknown).
    pub config: Option<ConfigStatus>,
    /// Inconsistencies worth a look: missing pins, links to removed cgroups, …
    pub warnings: Vec<String>,
}

impl RootStatus {
    /// Kernel memory locked by the maps of this root, in bytes (as far as reported).
    pub fn memlock_bytes(&self) -> u64 {
        self.maps.iter().filter_map(|m| m.memlock_bytes).sum()
    }
}

/// One pinned map.
#[derive(Debug, Clone, Serialize)]
pub struct MapStatus {
    /// Map name (`DF_*`).
    pub name: String,
    /// Kernel map id.
    pub id: u32,
    /// Kernel map type, as bpftool names it (`hash`, `lpm_trie`, `percpu_array`, …).
    pub map_type: String,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity (for a ring buffer: its size in bytes).
    pub max_entries: u32,
    /// Entries in use: the number of keys of a hash or trie; for `DF_COUNTERS`, the counter
    /// slots that registered cgroups use. None for arrays (always full) and the ring buffer.
    pub entries: Option<u64>,
    /// `entries / max_entries`.
    pub fill: Option<f64>,
    /// Kernel memory charged to the map (`memlock` in its fdinfo).
    pub memlock_bytes: Option<u64>,
}

/// One pinned link: a program attached to a cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    /// The pin.
    pub pin: PathBuf,
    /// Kernel link id.
    pub link_id: u32,
    /// Kernel link type (`cgroup`).
    pub link_type: String,
    /// Attach type (`connect4`, `sendmsg6`, `recvmsg4`, `getpeername6`, …), from the link's fdinfo.
    pub attach_type: Option<String>,
    /// The attached program.
    pub program: ProgramStatus,
    /// The cgroup id: from the kernel while attached, else from the pin name.
    pub cgroup_id: Option<u64>,
    /// The cgroup directory, if it still exists.
    pub cgroup_path: Option<PathBuf>,
    /// Whether the cgroup still exists.
    pub cgroup_exists: bool,
    /// Whether the kernel still has the link attached (a removed cgroup detaches it).
    pub attached: bool,
}

/// A loaded program.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    /// Kernel program id.
    pub id: u32,
    /// Program name (at most 15 bytes, as the kernel keeps it).
    pub name: Option<String>,
    /// Times it ran (counts only while `kernel.bpf_stats_enabled` is on).
    pub run_count: Option<u64>,
    /// Total run time in nanoseconds (same condition).
    pub run_time_ns: Option<u64>,
}

/// One cgroup registered in `DF_CGROUPS`.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupStatus {
    /// Cgroup id (inode of its directory).
    pub id: u64,
    /// Its directory, if it still exists.
    pub path: Option<PathBuf>,
    /// Whether it still exists.
    pub exists: bool,
    /// `off`, `audit`, `enforce` (or `unknown(N)`).
    pub mode: String,
    /// Active ruleset id (0: none, every destination is a miss).
    pub ruleset: u32,
    /// Candidate (shadow) ruleset id, if any.
    pub candidate_ruleset: Option<u32>,
    /// Policy generation.
    pub generation: u32,
    /// `FLAG_*` names.
    pub flags: Vec<String>,
    /// Row in `DF_COUNTERS`.
    pub counter_slot: u32,
    /// The counters of that row, summed over CPUs (None if the slot cannot be read).
    pub counters: Option<Counts>,
}

/// `DF_GLOBALS`, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GlobalCounters {
    /// Events lost because the ring buffer was full.
    pub events_dropped: u64,
    /// Events suppressed by the de-duplication window.
    pub events_deduped: u64,
    /// Hook runs for processes without a registered cgroup ancestor (allowed).
    pub unregistered: u64,
    /// Cgroup entries naming a counter slot out of range (a loader bug).
    pub bad_slot: u64,
}

/// `DF_CONFIG`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConfigStatus {
    /// Deepest registered cgroup level (0: unknown).
    pub max_level: u32,
    /// Event de-duplication window in nanoseconds (0: off).
    pub dedup_window_ns: u64,
}

/// bpffs mounts and the depfence pin roots under them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinRoots {
    /// bpffs mount points, from `/proc/self/mounts`.
    pub bpffs: Vec<PathBuf>,
    /// Pin roots, sorted.
    pub roots: Vec<PathBuf>,
}

/// Whether `dir` looks like a pin root (it has `maps/DF_META`).
pub fn is_pin_root(dir: &Path) -> bool {
    PinLayout::new(dir).map(map_names::META).symlink_metadata().is_ok()
}

/// Finds the pin roots under every mounted bpffs. Mounts nothing: with no bpffs mounted both
/// lists are empty.
pub fn find_pin_roots() -> Result<PinRoots> {
    let bpffs = bpffs_mounts()?;
    let roots = pin_roots_in(&bpffs)?;
    Ok(PinRoots { bpffs, roots })
}

/// The bpffs mount points, from `/proc/self/mounts`.
pub fn bpffs_mounts() -> Result<Vec<PathBuf>> {
    let mounts_path = Path::new("/proc/self/mounts");
    let mounts = fs::read_to_string(mounts_path).map_err(io_error(mounts_path))?;
    Ok(mount_points(&mounts, "bpf"))
}

/// The pin roots directly under the given bpffs mounts: directories named `depfence*` that hold
/// `maps/DF_META`. A root reachable through two mounts of one bpffs is listed once.
pub fn pin_roots_in(mounts: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut seen = BTreeSet::new();
    let mut roots = Vec::new();
    for mount in mounts {
        let entries = match fs::read_dir(mount) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(mount)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error(mount))?;
            let named = entry.file_name().to_str().is_some_and(|n| n.starts_with(ROOT_PREFIX));
            let dir = entry.path();
            if !named || !entry.file_type().is_ok_and(|t| t.is_dir()) || !is_pin_root(&dir) {
                continue;
            }
            let Ok(meta) = fs::metadata(&dir) else { continue };
            if seen.insert((meta.dev(), meta.ino())) {
                roots.push(dir);
            }
        }
    }
    roots.sort();
    Ok(roots)
}

/// Checks that `dir` is a readable pin root, with errors that name it.
pub fn check_pin_root(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StatusError::NotFound(dir.to_owned())),
        Err(e) => return Err(io_error(dir)(e)),
        Ok(m) if !m.is_dir() => return Err(StatusError::NotPinRoot(dir.to_owned())),
        Ok(_) => {}
    }
    let meta = PinLayout::new(dir).map(map_names::META);
    match meta.symlink_metadata() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StatusError::NotPinRoot(dir.to_owned())),
        Err(e) => Err(io_error(&meta)(e)),
    }
}

/// Reads the status of one pin root (`Some`) or of every pin root found under bpffs (`None`).
/// A root that disappears while it is read (a `policyctl run` ending) is left out.
pub fn status(pins: Option<&Path>) -> Result<Status> {
    let found = match pins {
        Some(dir) => {
            check_pin_root(dir)?;
            PinRoots { bpffs: bpffs_mounts()?, roots: vec![dir.to_owned()] }
        }
        None => find_pin_roots()?,
    };
    let roots = found.roots;
    let cgroup2 = Cgroup2::discover().ok().map(|c| c.mount().to_owned());
    let mut inspector = Inspector::new(cgroup2.as_deref());
    let mut out = Vec::new();
    for root in roots {
        match inspector.root(&root) {
            Ok(r) => out.push(r),
            Err(_) if pins.is_none() && !is_pin_root(&root) => {}
            Err(e) => return Err(e),
        }
    }
    let stats = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok();
    Ok(Status { bpffs: found.bpffs, cgroup2, bpf_stats_enabled: stats.map(|s| s.trim() != "0"), roots: out })
}

/// Reads pin roots, sharing the cgroup-path walk and the program list between them.
pub struct Inspector {
    cgroups: Option<CgroupPaths>,
    programs: Option<HashMap<u32, ProgramStatus>>,
}

impl Inspector {
    /// An inspector resolving cgroup ids under `cgroup2` (the mount), if given.
    pub fn new(cgroup2: Option<&Path>) -> Self {
        Self { cgroups: cgroup2.map(CgroupPaths::new), programs: None }
    }

    fn cgroup_path(&mut self, id: u64) -> Option<PathBuf> {
        self.cgroups.as_mut()?.find(id)
    }

    fn program(&mut self, id: u32) -> ProgramStatus {
        let programs = self.programs.get_or_insert_with(|| {
            loaded_programs()
                .flatten()
                .map(|p| {
                    let status = ProgramStatus {
                        id: p.id(),
                        name: p.name_as_str().map(str::to_owned),
                        run_count: Some(p.run_count()),
                        run_time_ns: Some(u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX)),
                    };
                    (p.id(), status)
                })
                .collect()
        });
        programs.get(&id).cloned().unwrap_or(ProgramStatus { id, name: None, run_count: None, run_time_ns: None })
    }

    /// Reads one pin root.
    pub fn root(&mut self, root: &Path) -> Result<RootStatus> {
        check_pin_root(root)?;
        let layout = PinLayout::new(root);
        let mut warnings = Vec::new();

        let meta_path = layout.map(map_names::META);
        let meta_map = open_map(&meta_path)?;
        let meta: Array<MapData, Meta> = Array::try_from(meta_map).map_err(map_error(&meta_path))?;
        let abi_version = meta.get(&0, 0).map_err(map_error(&meta_path))?.abi_version;
        let abi_supported = abi_version == ABI_VERSION;
        if !abi_supported {
            warnings.push(format!(
                "ABI version {abi_version} is not the one this build knows ({ABI_VERSION}): contents not decoded"
            ));
        }

        let mut maps = Vec::new();
        for name in map_names::ALL {
            let path = layout.map(name);
            match map_status(name, &path) {
                Ok(m) => maps.push(m),
                Err(StatusError::NotFound(_)) => warnings.push(format!("map pin `{}` is missing", path.display())),
                Err(e) => return Err(e),
            }
        }

        let links = self.links(&layout, &mut warnings)?;

        let (cgroups, globals, config) = if abi_supported && maps.len() == map_names::ALL.len() {
            let typed = Maps::from_pins(&layout).map_err(maps_error(root))?;
            let cgroups = self.cgroups(&typed, &mut warnings);
            fill_entries(&mut maps, &typed, &layout, &cgroups, &mut warnings);
            let global = |idx| typed.global(idx).unwrap_or(0);
            let globals = GlobalCounters {
                events_dropped: global(GLOBAL_EVENTS_DROPPED),
                events_deduped: global(GLOBAL_EVENTS_DEDUPED),
                unregistered: global(GLOBAL_UNREGISTERED),
                bad_slot: global(GLOBAL_BAD_SLOT),
            };
            let config = typed
                .config
                .get(&0, 0)
                .ok()
                .map(|c| ConfigStatus { max_level: c.max_level, dedup_window_ns: c.dedup_window_ns });
            (cgroups, Some(globals), config)
        } else {
            (Vec::new(), None, None)
        };

        let mut gone: Vec<(Option<u64>, usize)> = Vec::new();
        for link in links.iter().filter(|l| !l.attached || !l.cgroup_exists) {
            match gone.iter_mut().find(|(id, _)| *id == link.cgroup_id) {
                Some((_, n)) => *n += 1,
                None => gone.push((link.cgroup_id, 1)),
            }
        }
        for (id, n) in gone {
            let id = id.map_or_else(|| "?".to_owned(), |id| id.to_string());
            let links = if n == 1 { "1 link is".to_owned() } else { format!("{n} links are") };
            warnings
                .push(format!("cgroup {id} no longer exists: {links} detached, but the pins keep the programs loaded"));
        }
        for cgroup in &cgroups {
            if !cgroup.exists {
                warnings.push(format!("registered cgroup {} no longer exists (stale DF_CGROUPS entry)", cgroup.id));
            }
        }

        if let Some(pid) = run_pid(root).filter(|pid| !is_policyctl(*pid)) {
            warnings.push(format!(
                "the `policyctl run` (pid {pid}) that made these pins is gone: they are leftovers (`rm -r {}` removes them)",
                root.display()
            ));
        }

        Ok(RootStatus {
            root: root.to_owned(),
            abi_version,
            abi_supported,
            maps,
            links,
            cgroups,
            globals,
            config,
            warnings,
        })
    }

    fn links(&mut self, layout: &PinLayout, warnings: &mut Vec<String>) -> Result<Vec<LinkStatus>> {
        let dir = layout.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warnings.push(format!("`{}` is missing: nothing is attached", dir.display()));
                return Ok(Vec::new());
            }
            Err(e) => return Err(io_error(&dir)(e)),
        };
        let mut pins: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        pins.sort();
        let mut links = Vec::new();
        for pin in pins {
            let link = match PinnedLink::from_pin(&pin) {
                Ok(link) => FdLink::from(link),
                // Unpinned between the listing and the open: a run ending.
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(link_error(&pin)(e)),
            };
            let info = link.info().map_err(link_error(&pin))?;
            let fdinfo = link_fdinfo(info.id()).unwrap_or_default();
            let kernel_cgroup = fdinfo_field(&fdinfo, "cgroup_id").and_then(|v| v.parse::<u64>().ok());
            let attached = kernel_cgroup.is_some_and(|id| id != 0);
            let cgroup_id = kernel_cgroup.filter(|id| *id != 0).or_else(|| PinLayout::cgroup_of_link(&pin));
            let cgroup_path = if attached { cgroup_id.and_then(|id| self.cgroup_path(id)) } else { None };
            links.push(LinkStatus {
                link_id: info.id(),
                link_type: info.link_type().map_or_else(|_| "unknown".to_owned(), link_type_name),
                attach_type: fdinfo_field(&fdinfo, "attach_type").and_then(|v| v.parse().ok()).map(attach_type_name),
                program: self.program(info.program_id()),
                cgroup_exists: cgroup_path.is_some(),
                cgroup_path,
                cgroup_id,
                attached,
                pin,
            });
            drop(link); // our fd only; the pin keeps the link
        }
        Ok(links)
    }

    fn cgroups(&mut self, maps: &Maps, warnings: &mut Vec<String>) -> Vec<CgroupStatus> {
        let mut entries = Vec::new();
        for item in maps.cgroups.iter() {
            match item {
                Ok(entry) => entries.push(entry),
                Err(e) => warnings.push(format!("reading DF_CGROUPS: {e}")),
            }
        }
        entries.sort_by_key(|(id, _)| *id);
        let mut out = Vec::new();
        for (id, state) in entries {
            let counters = maps.counts(state.counter_slot);
            if let Err(e) = &counters {
                warnings.push(format!("cgroup {id}: counter slot {}: {e}", state.counter_slot));
            }
            let path = self.cgroup_path(id);
            out.push(CgroupStatus {
                id,
                exists: path.is_some(),
                path,
                mode: mode_name(state.mode),
                ruleset: state.ruleset_id,
                candidate_ruleset: (state.candidate_ruleset != 0).then_some(state.candidate_ruleset),
                generation: state.generation,
                flags: flag_names(state.flags),
                counter_slot: state.counter_slot,
                counters: counters.ok(),
            });
        }
        out
    }
}

fn open_map(path: &Path) -> Result<Map> {
    let data = MapData::from_pin(path).map_err(map_error(path))?;
    Map::from_map_data(data).map_err(map_error(path))
}

/// Kernel facts of one map: type, sizes, capacity, memlock. Entries are filled in later.
fn map_status(name: &str, path: &Path) -> Result<MapStatus> {
    let data = MapData::from_pin(path).map_err(map_error(path))?;
    let info = data.info().map_err(map_error(path))?;
    let fd = data.fd().as_fd().as_raw_fd();
    let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    Ok(MapStatus {
        name: name.to_owned(),
        id: info.id(),
        map_type: info.map_type().map_or_else(|_| "unknown".to_owned(), map_type_name),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        entries: None,
        fill: None,
        memlock_bytes: fdinfo_field(&fdinfo, "memlock").and_then(|v| v.parse().ok()),
    })
}

/// Counts the entries of the hashes and the trie (one key walk each), and the counter slots
/// the registered cgroups use.
fn fill_entries(
    maps: &mut [MapStatus],
    typed: &Maps,
    layout: &PinLayout,
    cgroups: &[CgroupStatus],
    warnings: &mut Vec<String>,
) {
    for map in maps {
        let count = match map.name.as_str() {
            map_names::CGROUPS => Some(count_keys(typed.cgroups.keys())),
            map_names::RULES => Some(count_keys(typed.rules.keys())),
            map_names::CIDRS => Some(count_keys(typed.cidrs.keys())),
            map_names::DEDUP => {
                let path = layout.map(map_names::DEDUP);
                let dedup = open_map(&path)
                    .and_then(|m| BpfHashMap::<MapData, DedupKey, u64>::try_from(m).map_err(map_error(&path)));
                match dedup {
                    Ok(dedup) => Some(count_keys(dedup.keys())),
                    Err(e) => {
                        warnings.push(format!("counting DF_DEDUP: {e}"));
                        None
                    }
                }
            }
            map_names::COUNTERS => {
                let slots: BTreeSet<u32> = cgroups.iter().map(|c| c.counter_slot).collect();
                Some(Ok(slots.len() as u64))
            }
            _ => None,
        };
        match count {
            Some(Ok(n)) => {
                map.entries = Some(n);
                map.fill = Some(fill_ratio(n, map.max_entries));
            }
            Some(Err(e)) => warnings.push(format!("counting {}: {e}", map.name)),
            None => {}
        }
    }
}

/// Counts keys, stopping at the first error (a map changing under the walk may end it early;
/// the count is then a lower bound and says so).
fn count_keys<K>(keys: impl Iterator<Item = Result<K, MapError>>) -> Result<u64, MapError> {
    let mut n = 0u64;
    for key in keys {
        key?;
        n += 1;
    }
    Ok(n)
}

/// `entries / max_entries`, 0 for an empty capacity.
pub fn fill_ratio(entries: u64, max_entries: u32) -> f64 {
    if max_entries == 0 { 0.0 } else { entries as f64 / f64::from(max_entries) }
}

/// The value of `key:` in a `/proc/<pid>/fdinfo/<fd>` text (`key:\tvalue` lines).
pub fn fdinfo_field<'a>(fdinfo: &'a str, key: &str) -> Option<&'a str> {
    fdinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// The fdinfo of our own fd on the link with kernel id `link_id` (aya's `FdLink` does not lend
/// its fd, so find it among ours: `anon_inode:bpf-link` fds whose `link_id` matches).
fn link_fdinfo(link_id: u32) -> Option<String> {
    let want = link_id.to_string();
    for entry in fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let is_link = fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-link");
        if !is_link {
            continue;
        }
        let Ok(text) = fs::read_to_string(Path::new("/proc/self/fdinfo").join(entry.file_name())) else { continue };
        if fdinfo_field(&text, "link_id") == Some(want.as_str()) {
            return Some(text);
        }
    }
    None
}

/// Whether process `pid` is a `policyctl`.
fn is_policyctl(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == "policyctl")
}

/// `MODE_*` by name.
pub fn mode_name(mode: u32) -> String {
    Mode::from_code(mode).map_or_else(|| format!("unknown({mode})"), |m| m.as_str().to_owned())
}

/// `FLAG_*` bits by name; unknown bits as hex.
pub fn flag_names(flags: u32) -> Vec<String> {
    let known = [
        (FLAG_ACTIVE_HAS_CIDR, "active_has_cidr"),
        (FLAG_CANDIDATE_HAS_CIDR, "candidate_has_cidr"),
        (FLAG_EVENT_ALLOWED, "event_allowed"),
        (FLAG_EVENT_NO_DEDUP, "event_no_dedup"),
        (FLAG_DNS, "dns"),
    ];
    let mut names: Vec<String> =
        known.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| (*n).to_owned()).collect();
    let rest = known.iter().fold(flags, |f, (bit, _)| f & !bit);
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    names
}

/// A cgroup sock_addr attach type (`enum bpf_attach_type`) by the name of its hook.
pub fn attach_type_name(attach_type: u32) -> String {
    match attach_type {
        10 => "connect4".to_owned(),
        11 => "connect6".to_owned(),
        14 => "sendmsg4".to_owned(),
        15 => "sendmsg6".to_owned(),
        19 => "recvmsg4".to_owned(),
        20 => "recvmsg6".to_owned(),
        29 => "getpeername4".to_owned(),
        30 => "getpeername6".to_owned(),
        other => format!("attach_type({other})"),
    }
}

fn link_type_name(t: LinkType) -> String {
    match t {
        LinkType::Cgroup => "cgroup".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn map_type_name(t: MapType) -> String {
    let name = match t {
        MapType::Hash => "hash",
        MapType::Array => "array",
        MapType::PerCpuHash => "percpu_hash",
        MapType::PerCpuArray => "percpu_array",
        MapType::LruHash => "lru_hash",
        MapType::LruPerCpuHash => "lru_percpu_hash",
        MapType::LpmTrie => "lpm_trie",
        MapType::ArrayOfMaps => "array_of_maps",
        MapType::HashOfMaps => "hash_of_maps",
        MapType::RingBuf => "ringbuf",
        other => return format!("{other:?}").to_lowercase(),
    };
    name.to_owned()
}

/// Finds cgroup directories by id (the inode number) under the cgroup2 mount: a breadth-first
/// walk that stops as soon as the id turns up and remembers every directory it passed, so a
/// second lookup continues where the first stopped. Depth is not assumed.
#[derive(Debug)]
pub struct CgroupPaths {
    queue: VecDeque<PathBuf>,
    seen: HashMap<u64, PathBuf>,
}

impl CgroupPaths {
    /// A walk of the tree under `mount`.
    pub fn new(mount: &Path) -> Self {
        let mut seen = HashMap::new();
        if let Ok(meta) = fs::metadata(mount) {
            seen.insert(meta.ino(), mount.to_owned());
        }
        Self { queue: VecDeque::from([mount.to_owned()]), seen }
    }

    /// The directory whose inode is `id`, if there is one.
    pub fn find(&mut self, id: u64) -> Option<PathBuf> {
        if let Some(path) = self.seen.get(&id) {
            return Some(path.clone());
        }
        while let Some(dir) = self.queue.pop_front() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            let mut found = None;
            for entry in entries.flatten() {
                // file_type does not follow symlinks; cgroup directories are real directories.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                if meta.ino() == id {
                    found = Some(path.clone());
                }
                self.seen.insert(meta.ino(), path.clone());
                self.queue.push_back(path);
            }
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests fail by panicking")]

    use super::*;

    const MAP_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\nmap_type:\t1\nkey_size:\t24\n\
        value_size:\t4\nmax_entries:\t2097152\nmap_flags:\t0x1\nmap_extra:\t0x0\nmemlock:\t33555416\n\
        map_id:\t1734\nfrozen:\t0\n";
    const LINK_FDINFO: &str = "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t1038\nlink_type:\tcgroup\n\
        link_id:\t540\nprog_tag:\ted0765918a89f255\nprog_id:\t1565\ncgroup_id:\t7872\nattach_type:\t15\n";

    #[test]
    fn fdinfo_fields_are_read_by_exact_key() {
        assert_eq!(fdinfo_field(MAP_FDINFO, "memlock"), Some("33555416"));
        assert_eq!(fdinfo_field(MAP_FDINFO, "map_id"), Some("1734"));
        assert_eq!(fdinfo_field(MAP_FDINFO, "map"), None);
        assert_eq!(fdinfo_field(LINK_FDINFO, "cgroup_id"), Some("7872"));
        assert_eq!(
            fdinfo_field(LINK_FDINFO, "attach_type").map(|v| attach_type_name(v.parse().unwrap())).unwrap(),
            "sendmsg6"
        );
        assert_eq!(fdinfo_field(LINK_FDINFO, "link_type"), Some("cgroup"));
        assert_eq!(fdinfo_field("", "memlock"), None);
    }

    #[test]
    fn names_of_modes_flags_and_attach_types() {
        assert_eq!(mode_name(super::super::abi::MODE_OFF), "off");
        assert_eq!(mode_name(super::super::abi::MODE_AUDIT), "audit");
        assert_eq!(mode_name(super::super::abi::MODE_ENFORCE), "enforce");
        assert_eq!(mode_name(7), "unknown(7)");
        assert_eq!(flag_names(0), Vec::<String>::new());
        assert_eq!(
            flag_names(FLAG_ACTIVE_HAS_CIDR | FLAG_EVENT_NO_DEDUP | 1 << 9),
            ["active_has_cidr", "event_no_dedup", "0x200"]
        );
        assert_eq!(
            [10, 11, 14, 15, 19, 20, 29, 30, 3].map(attach_type_name),
            [
                "connect4",
                "connect6",
                "sendmsg4",
                "sendmsg6",
                "recvmsg4",
                "recvmsg6",
                "getpeername4",
                "getpeername6",
                "attach_type(3)"
            ]
        );
    }

    #[test]
    fn a_test_binary_is_not_policyctl() {
        assert!(!is_policyctl(std::process::id()));
    }

    #[test]
    fn fill_ratio_handles_empty_capacity() {
        assert_eq!(fill_ratio(0, 0), 0.0);
        assert_eq!(fill_ratio(1, 4), 0.25);
        assert_eq!(fill_ratio(16_384, 16_384), 1.0);
    }

    #[test]
    fn pin_roots_are_depfence_directories_with_a_meta_pin() {
        let bpffs = tempfile::tempdir().unwrap();
        let mk = |rel: &str| fs::create_dir_all(bpffs.path().join(rel)).unwrap();
        let touch = |rel: &str| fs::write(bpffs.path().join(rel), b"").unwrap();
        mk("depfence/maps");
        touch("depfence/maps/DF_META");
        mk("depfence-run-12/maps");
        touch("depfence-run-12/maps/DF_META");
        mk("depfence-empty/maps"); // no DF_META
        mk("other/maps");
        touch("other/maps/DF_META"); // not named depfence*
        touch("depfence-file"); // not a directory
        mk("nested/depfence/maps");
        touch("nested/depfence/maps/DF_META"); // not directly under the mount
        let mounts = [bpffs.path().to_owned(), PathBuf::from("/nonexistent-bpffs")];
        let roots = pin_roots_in(&mounts).unwrap();
        assert_eq!(roots, [bpffs.path().join("depfence"), bpffs.path().join("depfence-run-12")]);
        // The same file system twice (a bind mount) lists each root once.
        let twice = [bpffs.path().to_owned(), bpffs.path().join("nested/..")];
        assert_eq!(pin_roots_in(&twice).unwrap().len(), 2);

        assert!(check_pin_root(&bpffs.path().join("depfence")).is_ok());
        let missing = bpffs.path().join("gone");
        assert!(matches!(check_pin_root(&missing), Err(StatusError::NotFound(p)) if p == missing));
        let empty = bpffs.path().join("depfence-empty");
        assert!(matches!(check_pin_root(&empty), Err(StatusError::NotPinRoot(p)) if p == empty));
        let file = bpffs.path().join("depfence-file");
        assert!(matches!(check_pin_root(&file), Err(StatusError::NotPinRoot(_))));
    }

    #[test]
    fn cgroup_paths_walk_lazily_to_any_depth() {
        let tree = tempfile::tempdir().unwrap();
        let deep = tree.path().join("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r");
        fs::create_dir_all(&deep).unwrap();
        fs::create_dir_all(tree.path().join("z")).unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let mut paths = CgroupPaths::new(tree.path());
        assert_eq!(paths.find(ino(tree.path())).unwrap(), tree.path());
        // A shallow id is found before the walk descends far.
        assert_eq!(paths.find(ino(&tree.path().join("z"))).unwrap(), tree.path().join("z"));
        assert!(paths.queue.len() <= 2, "walked too far: {:?}", paths.queue);
        assert_eq!(paths.find(ino(&deep)).unwrap(), deep);
        // Already seen: answered from memory.
        assert_eq!(paths.find(ino(&tree.path().join("a/b"))).unwrap(), tree.path().join("a/b"));
        assert_eq!(paths.find(u64::MAX), None);
    }
}
