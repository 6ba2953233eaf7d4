//! One agent per pin root and per state directory. Two agents on the same pins would replace
//! each other's policy in the kernel while each reports its own as in force; two on the same
//! state directory would mix their evidence. So the agent holds an exclusive `flock(2)` on
//! both directories (a bpffs directory can be locked like any other) for its whole life; the
//! kernel drops it when the process exits, however it exits.
//!
//! A second agent finds the holder's pid in `/proc/locks`. It waits a bounded time for it to
//! exit (a restart that overlaps the old process), or, asked to take over, sends it SIGTERM
//! and waits for it to exit; never both agents at once.

use std::fs::{File, TryLockError};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// How often a waiting agent tries the lock again.
const RETRY: Duration = Duration::from_millis(50);

/// The locks an agent holds; dropping it releases them.
#[derive(Debug)]
pub struct AgentLock {
    _held: Vec<File>,
}

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process holds it and did not let go in time.
    #[error("{} holds `{}`{}", holder_text(*holder), path.display(), giving_up(*holder, *waited, *takeover))]
    Held {
        /// The directory.
        path: PathBuf,
        /// The holder, when this process can see it.
        holder: Option<u32>,
        /// How long this agent waited.
        waited: Duration,
        /// Whether the holder was asked to stop (SIGTERM).
        takeover: bool,
    },
    /// The directory could not be opened or locked.
    #[error("locking `{}`: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn holder_text(holder: Option<u32>) -> String {
    holder.map_or_else(
        || "another process (its pid is not visible here)".to_owned(),
        |pid| format!("another agent (pid {pid})"),
    )
}

fn giving_up(holder: Option<u32>, waited: Duration, takeover: bool) -> String {
    let waited = crate::timefmt::Human(waited);
    match (takeover, holder) {
        (true, None) => "; it cannot be signalled from here: stop it where it runs".to_owned(),
        (true, Some(_)) => format!(" and did not exit within {waited} of SIGTERM"),
        (false, _) => format!(" and did not exit within {waited}; stop it, or start this agent with --takeover"),
    }
}

impl AgentLock {
    /// Takes an exclusive lock on each directory (the same directory twice is locked once).
    /// When another process holds one: waits up to `wait` for it to exit; with `takeover`,
    /// first sends it SIGTERM (the holder is found in `/proc/locks`).
    pub fn acquire(dirs: &[&Path], wait: Duration, takeover: bool) -> Result<AgentLock, LockError> {
        let mut held = Vec::new();
        let mut seen = Vec::new();
        for dir in dirs {
            let io = |source| LockError::Io { path: dir.to_path_buf(), source };
            let file = File::open(dir).map_err(io)?;
            let id = file.metadata().map(|m| (m.dev(), m.ino())).map_err(io)?;
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            held.push(lock(dir, file, id, wait, takeover)?);
        }
        Ok(AgentLock { _held: held })
    }
}

fn lock(dir: &Path, file: File, id: (u64, u64), wait: Duration, takeover: bool) -> Result<File, LockError> {
    let io = |source| LockError::Io { path: dir.to_path_buf(), source };
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(TryLockError::WouldBlock) => {}
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    let holder = holder_of(id);
    let who = holder_text(holder);
    let waiting = crate::timefmt::Human(wait);
    match (takeover, holder) {
        (true, Some(pid)) => {
            warn!(pid, path = %dir.display(), "{who} holds `{}`: taking over (SIGTERM), waiting up to {waiting}", dir.display());
            terminate(pid).map_err(io)?;
        }
        (true, None) => {
            return Err(LockError::Held { path: dir.to_path_buf(), holder, waited: Duration::ZERO, takeover });
        }
        (false, _) => warn!(
            pid = holder,
            path = %dir.display(),
            "{who} holds `{}`: waiting up to {waiting} for it to exit (or start this agent with --takeover)",
            dir.display()
        ),
    }
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => {
                info!(path = %dir.display(), waited_ms = started.elapsed().as_millis() as u64, "the previous agent exited");
                return Ok(file);
            }
            Err(TryLockError::WouldBlock) if started.elapsed() < wait => std::thread::sleep(RETRY),
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held { path: dir.to_path_buf(), holder, waited: wait, takeover });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
    }
}

/// The process that holds a `flock` on the file `(device, inode)`, from `/proc/locks`.
fn holder_of((dev, ino): (u64, u64)) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, (libc::major(dev), libc::minor(dev), ino))
}

/// The holder in a `/proc/locks` text: `1: FLOCK  ADVISORY  WRITE 4242 00:29:5138132 0 EOF`
/// (device numbers in hex); waiters (`1: -> FLOCK …`) and pid 0 (not visible here) are not.
fn holder_in(locks: &str, (major, minor, ino): (u32, u32, u64)) -> Option<u32> {
    locks.lines().find_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        if fields.next()? != "FLOCK" {
            return None;
        }
        let pid: u32 = fields.nth(2)?.parse().ok()?;
        let mut file = fields.next()?.split(':');
        let (maj, min) = (u32::from_str_radix(file.next()?, 16).ok()?, u32::from_str_radix(file.next()?, 16).ok()?);
        let inode: u64 = file.next()?.parse().ok()?;
        ((maj, min, inode) == (major, minor, ino) && pid != 0).then_some(pid)
    })
}

fn terminate(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[expect(unsafe_code, reason = "kill(2) has no safe wrapper in std")]
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:29:5138132 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 4343 00:29:5138132 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 777 fd:01:12 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 0 103:02:99 0 EOF\n";
        assert_eq!(holder_in(locks, (0, 0x29, 5_138_132)), Some(4242));
        assert_eq!(holder_in(locks, (0xfd, 1, 12)), None, "a POSIX lock is another kind");
        assert_eq!(holder_in(locks, (0x103, 2, 99)), None, "pid 0: not visible here");
        assert_eq!(holder_in(locks, (0, 0x29, 1)), None);
    }

    #[test]
    fn a_second_holder_is_refused_by_name_or_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = AgentLock::acquire(&[dir.path(), dir.path()], Duration::ZERO, false).unwrap();
        let error = AgentLock::acquire(&[dir.path()], Duration::from_secs(1), false).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "another agent (pid {}) holds `{}` and did not exit within 1s; stop it, or start this agent with \
                 --takeover",
                std::process::id(),
                dir.path().display()
            )
        );
        // A restart that overlaps the old agent waits for it to go.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        let started = Instant::now();
        let second = AgentLock::acquire(&[dir.path()], Duration::from_secs(10), false);
        assert!(second.is_ok() && started.elapsed() >= Duration::from_millis(150), "{second:?}");
        release.join().unwrap();
    }
}
