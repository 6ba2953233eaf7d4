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
