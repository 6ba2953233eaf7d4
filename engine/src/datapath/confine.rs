//! One service's policy on a fresh child cgroup, for as long as a command runs in it: what
//! `policyctl run` does. The programs are loaded into a pin root of their own
//! (`<bpffs>/<name>`), attached to the new cgroup `<cgroup2>/<name>`, and the service's rules
//! are put in force there in the mode asked for. Dropping the [`Confinement`] unpins everything
//! (which detaches the programs) and removes the cgroup.
//!
//! A command starts in the cgroup with only its standard streams and the descriptors the caller
//! names: a socket keeps the cgroup it was created in, so one inherited from outside would
//! connect past the policy. It also starts with `no_new_privs`, so a setuid program it runs
//! cannot gain privileges (and with them the right to leave the cgroup).

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command};

use super::abi::{CgroupState, Config, Event, FLAG_ACTIVE_HAS_CIDR, prog_names};
use super::pins::{PinLayout, ensure_bpffs};
use super::{Datapath, DatapathError};
use crate::cgroup::{Cgroup2, CgroupError, ChildCgroup};
use crate::lower::{self, allows_from_snapshot};
use crate::snapshot::Snapshot;
use crate::verdict::{Counts, Mode, Verdict};

/// The counter slot and ruleset id of the one service a confinement loads.
const SLOT: u32 = 0;
const RULESET: u32 = 1;

/// A confinement could not be set up; nothing of it is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfineError {
    /// The snapshot has no such service.
    #[error("unknown service `{0}`")]
    UnknownService(String),
    /// The service's rules do not fit the kernel layout.
    #[error("service `{service}` does not fit the kernel layout: {source}")]
    Layout {
        /// The service.
        service: String,
        /// Why.
        source: lower::CompileError,
    },
    /// The cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// No bpffs, and none could be mounted.
    #[error("bpffs: {0}")]
    Bpffs(std::io::Error),
    /// Loading, attaching or writing the maps failed (needs root: CAP_BPF, CAP_SYS_ADMIN).
    #[error("kernel datapath: {0}")]
    Datapath(#[from] DatapathError),
    /// A descriptor to pass on to the command is not open.
    #[error("descriptor {0} is not open: it cannot be passed on to the command")]
    NotOpen(RawFd),
}

/// One service's policy in force on a child cgroup of its own.
pub struct Confinement {
    datapath: Datapath,
    pins: PinLayout,
    cgroup: ChildCgroup,
}

impl Confinement {
    /// Puts `service`'s address rules of environment `env` (an index into the snapshot's
    /// environments) in force in `mode` on a new child cgroup `name`.
    pub fn new(snapshot: &Snapshot, env: usize, service: &str, mode: Mode, name: &str) -> Result<Self, ConfineError> {
        let (_, ruleset) = snapshot.service(service).ok_or_else(|| ConfineError::UnknownService(service.to_owned()))?;
        let compiled = lower::compile(RULESET, &allows_from_snapshot(&ruleset.rules(env).net_rules))
            .map_err(|source| ConfineError::Layout { service: service.to_owned(), source })?;
        let cgroup2 = Cgroup2::discover()?;
        let cgroup = ChildCgroup::create(cgroup2.mount(), name)?;
        let (bpffs, _) = ensure_bpffs().map_err(ConfineError::Bpffs)?;
        let pins = PinLayout::new(bpffs.join(name));
        // Room for this one ruleset, not for the agent's million rules.
        let capacity = u32::try_from(compiled.exact.len()).unwrap_or(u32::MAX).max(512);
        let loaded = Datapath::load_with_rule_capacity(&pins, capacity).and_then(|mut datapath| {
            datapath.attach(cgroup.dir(), &prog_names::ALL)?;
            datapath.maps.install(&compiled)?;
            // One event per (destination, verdict) per second is plenty for a report.
            datapath.maps.set_config(Config { dedup_window_ns: 1_000_000_000, ..Config::default() })?;
            let flags = if compiled.cidrs.is_empty() { 0 } else { FLAG_ACTIVE_HAS_CIDR };
            let state = CgroupState {
                ruleset_id: RULESET,
                mode: mode.code(),
                flags,
                counter_slot: SLOT,
                generation: 1,
                ..CgroupState::default()
            };
            datapath.maps.set_cgroup(cgroup.id(), state)?;
            Ok(datapath)
        });
        match loaded {
            Ok(datapath) => Ok(Confinement { datapath, pins, cgroup }),
            Err(e) => {
                let _ = pins.remove_all();
                Err(e.into())
            }
        }
    }

    /// The cgroup the policy is in force on.
    pub fn cgroup(&self) -> &ChildCgroup {
        &self.cgroup
    }

    /// Where the maps and links are pinned.
    pub fn pin_root(&self) -> &Path {
        self.pins.root()
    }

    /// Starts `command` inside the cgroup, with its standard streams and the descriptors
    /// `pass` of this process (none other: they are close-on-exec in the child), and with
    /// `no_new_privs`.
    pub fn spawn(&self, command: &mut Command, pass: &[RawFd]) -> Result<Child, ConfineError> {
        let mut keep: Vec<u32> = Vec::with_capacity(pass.len());
        for &fd in pass {
            // SAFETY: F_GETFD reads the flags of a descriptor number; any number is fine to ask.
            #[expect(unsafe_code, reason = "fcntl(2) has no safe wrapper in std")]
            let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
            match u32::try_from(fd) {
                Ok(fd) if open => keep.push(fd),
                _ => return Err(ConfineError::NotOpen(fd)),
            }
        }
        keep.retain(|&fd| fd > 2);
        keep.sort_unstable();
        keep.dedup();
        #[expect(unsafe_code, reason = "pre_exec runs between fork and exec; it only makes system calls")]
        // SAFETY: `only_these_descriptors` makes async-signal-safe system calls (prctl, fcntl,
        // close_range) and allocates nothing; `keep` was allocated before the fork.
        unsafe {
            command.pre_exec(move || only_these_descriptors(&keep));
        }
        Ok(self.cgroup.spawn(command)?)
    }

    /// The events of everything the policy did not simply allow since the last call, with
    /// their verdicts.
    pub fn refusals(&mut self) -> Vec<(Verdict, Event)> {
        self.datapath
            .maps
            .drain_events()
            .into_iter()
            .filter_map(|e| Verdict::from_code(e.verdict).map(|v| (v, e)))
            .filter(|(v, _)| v.is_refusal())
            .collect()
    }

    /// The service's counters.
    pub fn counts(&self) -> Counts {
        self.datapath.maps.counts(SLOT).unwrap_or_default()
    }

    /// Ends every process still in the cgroup; returns how many there were.
    pub fn kill_all(&self) -> Result<usize, CgroupError> {
        self.cgroup.kill_all()
    }

    /// Unpins the maps and links (which detaches the programs) and removes the cgroup, saying
    /// what could not be removed. Dropping does the same, silently.
    pub fn close(self) -> std::io::Result<()> {
        self.pins.remove_all()
    }
}

impl Drop for Confinement {
    fn drop(&mut self) {
        // Unpinning the links detaches the programs; the cgroup goes when its field drops.
        if let Err(e) = self.pins.remove_all() {
            tracing::warn!(root = %self.pins.root().display(), "removing pins: {e}");
        }
    }
}

/// In the child, before exec: `no_new_privs`, and every descriptor from 3 on close-on-exec but
/// those in `keep` (ascending, each ≥ 3), which are made inheritable.
#[expect(unsafe_code, reason = "prctl(2), fcntl(2) and close_range(2) have no safe wrapper in std")]
fn only_these_descriptors(keep: &[u32]) -> std::io::Result<()> {
    let ok = |rc: i32| if rc == -1 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: system calls on this process's own attributes and descriptors.
    unsafe {
        ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        let mut first = 3u32;
        for &fd in keep {
            if fd > first {
                ok(libc::close_range(first, fd - 1, libc::CLOSE_RANGE_CLOEXEC as i32))?;
            }
            ok(libc::fcntl(fd as RawFd, libc::F_SETFD, 0))?;
            first = fd + 1;
        }
        ok(libc::close_range(first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32))
    }
}
