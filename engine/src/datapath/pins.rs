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

/// Pin layout: `<root>/maps/<MAP_NAME>`, `<root>/links/<prog>-<cgroup id>`.
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
    /// Unpin everything (links first: that detaches the programs), then remove the dirs.
    pub fn remove_all(&self) -> io::Result<()> {
        for dir in [self.links_dir(), self.maps_dir()] {
            match fs::read_dir(&dir) {
                Ok(rd) => {
                    for e in rd {
                        fs::remove_file(e?.path())?;
                    }
                    fs::remove_dir(&dir)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match fs::remove_dir(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
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
