//! cgroup v2: finding the mount, naming cgroups, creating and removing the child cgroups depfence
//! runs commands in, cgroup ids (the inode number of the directory, which is what
//! `bpf_get_current_cgroup_id()` returns in the kernel), and finding a cgroup's directory by its
//! id ([`CgroupPaths`]).
//!
//! The cgroup2 hierarchy is at `/sys/fs/cgroup` on unified systems and at
//! `/sys/fs/cgroup/unified` on hybrid ones; [`Cgroup2::discover`] reads `/proc/self/mounts`
//! instead of guessing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// No cgroup2 file system is mounted.
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mounts)")]
    NotMounted,
    /// A path relative to the mount is not acceptable.
    #[error("cgroup path `{0}` must be relative to the cgroup2 mount and stay below it")]
    BadPath(String),
    /// A file-system operation failed.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_owned(), source }
}

/// The mounted cgroup2 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2 {
    mount: PathBuf,
}

impl Cgroup2 {
    /// Finds the cgroup2 mount point in `/proc/self/mounts`.
    pub fn discover() -> Result<Self, CgroupError> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(io_error("reading", Path::new("/proc/self/mounts")))?;
        Self::from_mounts(&mounts).ok_or(CgroupError::NotMounted)
    }

    /// Finds the cgroup2 mount in the text of a mounts table.
    pub fn from_mounts(mounts: &str) -> Option<Self> {
        mount_points(mounts, "cgroup2").into_iter().next().map(|mount| Cgroup2 { mount })
    }

    /// The mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The directory of a cgroup given relative to the mount (as in a policy's `cgroup = …`).
    pub fn path_of(&self, relative: &str) -> Result<PathBuf, CgroupError> {
        let relative = relative.trim_matches('/');
        let clean = Path::new(relative).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !clean {
            return Err(CgroupError::BadPath(relative.to_owned()));
        }
        Ok(self.mount.join(relative))
    }

    /// The path of a cgroup directory relative to the mount.
    pub fn relative<'p>(&self, dir: &'p Path) -> Option<&'p Path> {
        dir.strip_prefix(&self.mount).ok()
    }

    /// Depth of a cgroup directory below the mount (the root is 0), as
    /// `bpf_get_current_ancestor_cgroup_id` counts levels.
    pub fn level(&self, dir: &Path) -> Result<u32, CgroupError> {
        let relative = self.relative(dir).ok_or_else(|| CgroupError::BadPath(dir.display().to_string()))?;
        Ok(relative.components().count() as u32)
    }

    /// The cgroup the calling process is in, as a directory.
    pub fn current(&self) -> Result<PathBuf, CgroupError> {
        let text = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io_error("reading", Path::new("/proc/self/cgroup")))?;
        // The v2 entry is `0::/path`.
        let path = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
        Ok(self.mount.join(path.trim_start_matches('/')))
    }
}

/// Mount points of file systems of type `fstype` in the text of a mounts table
/// (`/proc/self/mounts`).
pub fn mount_points(mounts: &str, fstype: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == fstype).then(|| PathBuf::from(unescape_mount(mount)))
        })
        .collect()
}

/// `/proc/self/mounts` escapes spaces and a few other bytes as octal `\ooo`.
fn unescape_mount(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(rest.get(..pos).unwrap_or_default());
        let code = rest.get(pos + 1..pos + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = rest.get(pos + 4..).unwrap_or_default();
            }
            None => {
                out.push('\\');
                rest = rest.get(pos + 1..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

/// The id the kernel gives a cgroup: the inode number of its directory.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(dir).map(|m| m.ino()).map_err(io_error("reading", dir))
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
        if let Ok(meta) = std::fs::metadata(mount) {
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
            let Ok(children) = child_cgroups(&dir) else { continue };
            let mut found = None;
            for (path, ino) in children {
                if ino == id {
                    found = Some(path.clone());
                }
                self.seen.insert(ino, path.clone());
                self.queue.push_back(path);
            }
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// Starts `command` inside the cgroup `dir`: the child moves itself in between fork and exec,
/// so it and everything it starts are under the cgroup's policy from its first instruction.
pub fn spawn_in(dir: &Path, command: &mut std::process::Command) -> Result<std::process::Child, CgroupError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let path = dir.join("cgroup.procs");
    let procs = std::fs::OpenOptions::new().write(true).open(&path).map_err(io_error("opening", &path))?;
    let fd = procs.as_raw_fd();
    #[expect(unsafe_code, reason = "pre_exec runs between fork and exec; it only calls write(2)")]
    // SAFETY: write(2) is async-signal-safe; `procs` outlives the spawn below.
    unsafe {
        command.pre_exec(move || {
            // Writing "0" moves the writing process itself.
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 { Ok(()) } else { Err(io::Error::last_os_error()) }
        });
    }
    let child = command.spawn().map_err(io_error("starting a command in", dir));
    drop(procs);
    child
}

/// A child cgroup that depfence created and removes on drop (moving any process still in it to
/// the parent first).
#[derive(Debug)]
pub struct ChildCgroup {
    dir: PathBuf,
    id: u64,
}

impl ChildCgroup {
    /// Creates `parent/name`. Fails if it exists: depfence never adopts a cgroup it did not make.
    pub fn create(parent: &Path, name: &str) -> Result<Self, CgroupError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CgroupError::BadPath(name.to_owned()));
        }
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(io_error("creating cgroup", &dir))?;
        let id = cgroup_id(&dir)?;
        Ok(ChildCgroup { dir, id })
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its cgroup id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(io_error("moving a process into", &procs))
    }

    /// Starts `command` inside this cgroup (see [`spawn_in`]).
    pub fn spawn(&self, command: &mut std::process::Command) -> Result<std::process::Child, CgroupError> {
        spawn_in(&self.dir, command)
    }

    /// Kills every process in this cgroup and its descendants at once (`cgroup.kill`, Linux
    /// 5.14+), then waits up to a second for them to be gone. Returns how many there were.
    pub fn kill_all(&self) -> Result<usize, CgroupError> {
        let before = self.processes()?.len();
        if before == 0 {
            return Ok(0);
        }
        let kill = self.dir.join("cgroup.kill");
        std::fs::write(&kill, "1").map_err(io_error("writing", &kill))?;
        for _ in 0..100 {
            if self.processes()?.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(before)
    }

    /// The processes in this cgroup.
    pub fn processes(&self) -> Result<Vec<u32>, CgroupError> {
        let procs = self.dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&procs).map_err(io_error("reading", &procs))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Moves remaining processes to the parent and removes the directory.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        let result = self.remove_now();
        self.dir = PathBuf::new();
        result
    }

    fn remove_now(&self) -> Result<(), CgroupError> {
        if self.dir.as_os_str().is_empty() {
            return Ok(());
        }
        if let Some(parent) = self.dir.parent() {
            let parent_procs = parent.join("cgroup.procs");
            for pid in self.processes().unwrap_or_default() {
                // A process may exit meanwhile; its removal from the list is what we want.
                let _ = std::fs::write(&parent_procs, pid.to_string());
            }
        }
        // rmdir of a cgroup fails with EBUSY for a short while after its last process left.
        let mut last = None;
        for _ in 0..50 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(CgroupError::Io {
            action: "removing cgroup",
            path: self.dir.clone(),
            source: last.unwrap_or_else(|| io::Error::other("busy")),
        })
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if let Err(error) = self.remove_now() {
            // Never panic in drop; say what was left behind.
            eprintln!("depfence: {error}");
        }
    }
}

/// A cgroup found in the tree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FoundCgroup {
    /// Path relative to the cgroup2 mount, without a leading `/` (the root is "").
    pub relative: String,
    /// The cgroup id (inode number of the directory).
    pub id: u64,
}

/// For each of `found`, the cgroup whose policy applies to it, as the hooks find it: itself if
/// it is in `registered` (id → relative path), else its nearest registered ancestor. Cgroups
/// under no registered one are left out.
pub fn nearest_registered(found: &[FoundCgroup], registered: &BTreeMap<u64, String>) -> BTreeMap<u64, u64> {
    let by_path: BTreeMap<&str, u64> = registered.iter().map(|(id, path)| (path.as_str(), *id)).collect();
    let mut out = BTreeMap::new();
    for cgroup in found {
        let mut path = cgroup.relative.as_str();
        loop {
            if let Some(&id) = by_path.get(path) {
                out.insert(cgroup.id, id);
                break;
            }
            match path.rsplit_once('/') {
                Some((parent, _)) => path = parent,
                None => break,
            }
        }
    }
    out
}

/// Every cgroup below `mount` (the root itself excluded: depfence never attaches there), in
/// path order. Cgroups that vanish during the walk are skipped.
pub fn walk(mount: &Path) -> io::Result<Vec<FoundCgroup>> {
    let mut out = Vec::new();
    let mut stack = vec![mount.to_owned()];
    while let Some(dir) = stack.pop() {
        let children = match child_cgroups(&dir) {
            Ok(children) => children,
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != mount => continue,
            Err(e) => return Err(e),
        };
        for (child, id) in children {
            let relative = child.strip_prefix(mount).unwrap_or(&child).to_string_lossy().into_owned();
            out.push(FoundCgroup { relative, id });
            stack.push(child);
        }
    }
    out.sort();
    Ok(out)
}

/// The child cgroups of `dir` and their ids (cgroups that vanish meanwhile are left out). A
/// cgroup is a real directory: the file type of an entry does not follow symbolic links.
fn child_cgroups(dir: &Path) -> io::Result<impl Iterator<Item = (PathBuf, u64)>> {
    Ok(std::fs::read_dir(dir)?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).filter_map(|entry| {
        let id = entry.metadata().ok()?.ino();
        Some((entry.path(), id))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_falls_under_its_nearest_registered_ancestor() {
        let found: Vec<FoundCgroup> = [("a", 1), ("a/b", 2), ("a/b/c", 3), ("a/bc", 4), ("d", 5), ("a/b/c/e", 6)]
            .into_iter()
            .map(|(relative, id)| FoundCgroup { relative: relative.to_owned(), id })
            .collect();
        let registered = BTreeMap::from([(1, "a".to_owned()), (3, "a/b/c".to_owned())]);
        let expected = BTreeMap::from([(1, 1), (2, 1), (3, 3), (4, 1), (6, 3)]);
        assert_eq!(nearest_registered(&found, &registered), expected);
    }

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_systems() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(Cgroup2::from_mounts(hybrid).unwrap().mount(), Path::new("/sys/fs/cgroup/unified"));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(Cgroup2::from_mounts(unified).unwrap().mount(), Path::new("/sys/fs/cgroup"));
        assert_eq!(Cgroup2::from_mounts("proc /proc proc rw 0 0\n"), None);
        let escaped = "cgroup2 /mnt/with\\040space cgroup2 rw 0 0\n";
        assert_eq!(Cgroup2::from_mounts(escaped).unwrap().mount(), Path::new("/mnt/with space"));
    }

    #[test]
    fn cgroup_paths_walk_lazily_to_any_depth() {
        let tree = tempfile::tempdir().unwrap();
        let deep = tree.path().join("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(tree.path().join("z")).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
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

    #[test]
    fn policy_paths_stay_below_the_mount() {
        let cg = Cgroup2 { mount: PathBuf::from("/sys/fs/cgroup") };
        assert_eq!(cg.path_of("system.slice/x.service").unwrap(), Path::new("/sys/fs/cgroup/system.slice/x.service"));
        assert_eq!(cg.path_of("/system.slice/").unwrap(), Path::new("/sys/fs/cgroup/system.slice"));
        assert!(cg.path_of("../etc").is_err());
        assert!(cg.path_of("a/./b").is_ok());
        assert!(cg.path_of("a/../b").is_err());
    }

    #[test]
    fn walk_lists_nested_directories_with_ids() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("x/y")).unwrap();
        std::fs::create_dir_all(dir.path().join("z")).unwrap();
        std::fs::write(dir.path().join("x/cgroup.procs"), "").unwrap();
        let found = walk(dir.path()).unwrap();
        let paths: Vec<&str> = found.iter().map(|c| c.relative.as_str()).collect();
        assert_eq!(paths, ["x", "x/y", "z"]);
        assert_eq!(found[1].id, std::fs::metadata(dir.path().join("x/y")).unwrap().ino());
    }
}
