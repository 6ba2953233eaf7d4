//! What depfence holds in the kernel, read back from bpffs: for each pin root its maps (type,
//! fill level, locked memory), its pinned links (program, attach type, cgroup), the cgroups
//! registered in `DF_CGROUPS` with their counters, and the global counters.
//!
//! Read-only: this module opens pins and reads maps; it never mounts bpffs, creates, changes or
//! removes anything. A pin root is a directory directly under a bpffs mount whose name starts
//! with `depfence` and that holds `maps/DF_META` (the agent's `depfence/`, `policyctl run`'s
//! `depfence-run-<pid>/`).
//!
//! This file holds the data `policyctl status` shows, the error type and [`status`]; finding the
//! pin roots is in `roots`, reading one root in `inspect` ([`Inspector`]), and the names given
//! to kernel numbers in `names`.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{maps::MapError, programs::links::LinkError};
use serde::Serialize;

use super::DatapathError;
use crate::cgroup::Cgroup2;
use crate::verdict::Counts;

mod inspect;
mod names;
mod roots;

pub use inspect::{Inspector, fdinfo_field, fill_ratio};
pub use names::{attach_type_name, flag_names, mode_name};
pub use roots::{bpffs_mounts, check_pin_root, find_pin_roots, is_pin_root, pin_roots_in};

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
