//! bpffs and the pin layout: what depfence keeps in the kernel survives the loader through pins.
use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

/// Mount points of a file-system type, from `/proc/self/mounts`.
fn mounts_of(fstype: &str) -> io::Result<Vec<PathBuf>> {
    Ok(crate::cgroup::mount_points(&fs::read_to_string("/proc/self/mounts")?, fstype))
}

/// Default bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Returns a bpffs mount, mounting one at /sys/fs/bpf if none exists.
/// Returns (mount point, whether we mounted it).
pub fn ensure_bpffs() -> io::Result<(PathBuf, bool)> {
    if let Some(m) = mounts_of("bpf")?.into_iter().next() {
        return Ok((m, false));
    }
    fs::create_dir_all(BPFFS)?;
    let (src, dst, ty) = (c"bpf", CString::new(BPFFS)?, c"bpf");
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings; no data argument.
    #[expect(unsafe_code, reason = "mount(2) has no safe wrapper in std")]
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), flags, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((PathBuf::from(BPFFS), true))
}

/// Prefix of the pin roots' names: the agent's `depfence/`, `policyctl run`'s
/// `depfence-run-<pid>/`.
pub const ROOT_PREFIX: &str = "depfence";

/// The name of `policyctl run`'s pin root (and cgroup) for process `pid`.
pub fn run_root_name(pid: u32) -> String {
    format!("{ROOT_PREFIX}-run-{pid}")
}

/// The process of a `policyctl run` pin root, from its name.
pub fn run_pid(root: &Path) -> Option<u32> {
    root.file_name()?.to_str()?.strip_prefix(ROOT_PREFIX)?.strip_prefix("-run-")?.parse().ok()
}

/// Pin layout: `<root>/maps/<MAP_NAME>`, `<root>/links/<prog>-<cgroup id>`. During an upgrade
/// to a new ABI, the previous ABI's pins wait in `<root>/maps-abi<N>` and `<root>/links-abi<N>`
/// (still attached, still enforcing) until the new programs enforce the policy.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// A layout rooted at `root` (a directory on a bpffs).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Where maps are pinned.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// Where links are pinned.
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// The pin of one map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    /// The pin of one program's link to one cgroup.
    pub fn link(&self, prog: &str, cgroup_id: u64) -> PathBuf {
        self.links_dir().join(format!("{prog}-{cgroup_id}"))
    }
    /// The cgroup id in a link pin's name, `<prog>-<cgroup id>`.
    pub fn cgroup_of_link(pin: &Path) -> Option<u64> {
        pin.file_name()?.to_str()?.rsplit_once('-')?.1.parse().ok()
    }

    /// The cgroups with links pinned here (none when the directory does not exist).
    pub fn linked_cgroups(&self) -> std::collections::BTreeSet<u64> {
        let Ok(entries) = fs::read_dir(self.links_dir()) else { return Default::default() };
        entries.flatten().filter_map(|e| Self::cgroup_of_link(&e.path())).collect()
    }

    /// Creates the directories.
    pub fn create_dirs(&self) -> io::Result<()> {
        fs::create_dir_all(self.maps_dir())?;
        fs::create_dir_all(self.links_dir())
    }
    /// Where the maps of a retired ABI wait (bpffs allows no dot in a name).
    pub fn retired_maps_dir(&self, abi: u32) -> PathBuf {
        self.root.join(format!("maps-abi{abi}"))
    }

    /// Where the links of a retired ABI wait.
    pub fn retired_links_dir(&self, abi: u32) -> PathBuf {
        self.root.join(format!("links-abi{abi}"))
    }

    /// Moves the pins of ABI `abi` aside (`maps-abi<N>`, `links-abi<N>`): its links stay
    /// attached and its maps alive, so its programs go on enforcing, while a loader of another
    /// ABI creates its own maps and links at the usual places.
    pub fn retire(&self, abi: u32) -> io::Result<()> {
        // bpffs renames pins but not directories that hold them: one pin at a time. Links
        // first, `DF_META` last: until it moves, the next loader finds the old ABI where it
        // looks and retires the rest.
        move_pins(&self.links_dir(), &self.retired_links_dir(abi), None)?;
        move_pins(&self.maps_dir(), &self.retired_maps_dir(abi), Some(crate::datapath::abi::map_names::META))
    }

    /// The retired directories: `(links, maps)` of each ABI moved aside.
    pub fn retired(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.strip_prefix("links-abi")
                        .or_else(|| n.strip_prefix("maps-abi"))
                        .is_some_and(|v| v.parse::<u32>().is_ok())
                })
            })
            .collect();
        // Links before maps: unpinning a link detaches its program.
        dirs.sort_by_key(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("links")));
        dirs
    }

    /// Unpins what [`PinLayout::retire`] moved aside (links first: that detaches the old
    /// programs), once the new ones enforce. Returns how many pins went.
    pub fn remove_retired(&self) -> io::Result<usize> {
        let mut removed = 0;
        for dir in self.retired() {
            removed += remove_dir_of_pins(&dir)?;
        }
        Ok(removed)
    }

    /// Unpin everything (links first: that detaches the programs), then remove the dirs.
    pub fn remove_all(&self) -> io::Result<()> {
        self.remove_retired()?;
        for dir in [self.links_dir(), self.maps_dir()] {
            remove_dir_of_pins(&dir)?;
        }
        match fs::remove_dir(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Moves every pin of `from` into `to` (created if missing), `last` after the others.
fn move_pins(from: &Path, to: &Path, last: Option<&str>) -> io::Result<()> {
    let entries = match fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    fs::create_dir_all(to)?;
    let mut names: Vec<std::ffi::OsString> = entries.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
    names.sort_by_key(|name| last.is_some_and(|last| name == last));
    for name in names {
        fs::rename(from.join(&name), to.join(&name))?;
    }
    Ok(())
}

/// Unpins every entry of `dir` and removes it; a missing directory is fine. Returns the count.
fn remove_dir_of_pins(dir: &Path) -> io::Result<usize> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut removed = 0;
            for e in rd {
                fs::remove_file(e?.path())?;
                removed += 1;
            }
            fs::remove_dir(dir)?;
            Ok(removed)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// 8 random hex chars from /dev/urandom, for unique cgroup and pin names.
pub fn random_suffix() -> String {
    let mut b = [0u8; 4];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = io::Read::read_exact(&mut f, &mut b);
    }
    if b == [0; 4] {
        b = std::process::id().to_ne_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_are_read_back() {
        let layout = PinLayout::new("/sys/fs/bpf/depfence");
        assert_eq!(PinLayout::cgroup_of_link(&layout.link("df_connect4", 7853)), Some(7853));
        assert_eq!(PinLayout::cgroup_of_link(Path::new("/x/links/df_connect4")), None);
        assert_eq!(PinLayout::cgroup_of_link(Path::new("/x/links/df-x")), None);
        assert_eq!(run_pid(&Path::new("/sys/fs/bpf").join(run_root_name(9494))), Some(9494));
        assert_eq!(run_pid(Path::new("/sys/fs/bpf/depfence")), None);
        assert_eq!(run_pid(Path::new("/sys/fs/bpf/depfence-run-x")), None);
    }
}
