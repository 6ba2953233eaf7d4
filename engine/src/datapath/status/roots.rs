//! Finding pin roots: the bpffs mounts, the `depfence*` directories under them that hold
//! `maps/DF_META`, and whether the `policyctl run` that made a run's pins is still alive.
use std::{
    collections::BTreeSet,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::{PinRoots, Result, StatusError, io_error};
use crate::cgroup::mount_points;
use crate::datapath::{
    abi::map_names,
    pins::{PinLayout, ROOT_PREFIX},
};

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

/// Whether process `pid` is a `policyctl`.
pub(super) fn is_policyctl(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == "policyctl")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;

    #[test]
    fn a_test_binary_is_not_policyctl() {
        assert!(!is_policyctl(std::process::id()));
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
}
