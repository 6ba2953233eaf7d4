//! Durable file writes, for every file depfence writes: snapshots, the evidence store and the
//! promotion log, the agent's kernel state, policy rewrites.
//!
//! [`replace`] never leaves a torn file behind: it writes a temporary file in the same
//! directory, syncs it, renames it over the target and syncs the directory, so after a crash
//! the path holds the old content or the new, whole. [`append`] adds whole lines and syncs them.
//! Who may read the result is explicit ([`Access`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Who may read a file written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The owner only (mode 0600; new directories 0700): evidence, logs, state.
    Private,
    /// Everyone may read (mode 0644): snapshots that unprivileged services load.
    Public,
    /// As the file being replaced (its mode, and its owner where the writer may give it away),
    /// following a symbolic link to the real file: policy files that people and tools own. A
    /// new file is private.
    KeepExisting,
}

/// [`replace_if_unchanged`] did not replace the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplaceError {
    /// The file no longer holds what the caller read: someone else changed it meanwhile.
    #[error("`{}` changed while it was being rewritten", .0.display())]
    Changed(PathBuf),
    /// Reading, writing, syncing or renaming failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Replaces `path` with `bytes` durably (see the module documentation). Missing parent
/// directories are created (0700 for [`Access::Private`], 0755 otherwise).
pub fn replace(path: &Path, bytes: &[u8], access: Access) -> io::Result<()> {
    match write_and_rename(path, bytes, access, None) {
        Ok(()) => Ok(()),
        Err(ReplaceError::Io(e)) => Err(e),
        Err(changed @ ReplaceError::Changed(_)) => Err(io::Error::other(changed)),
    }
}

/// [`replace`], but only if `path` still holds `expected` just before the rename (a policy file
/// that its owner may edit at the same time).
pub fn replace_if_unchanged(path: &Path, bytes: &[u8], access: Access, expected: &[u8]) -> Result<(), ReplaceError> {
    write_and_rename(path, bytes, access, Some(expected))
}

/// Appends `bytes` (whole lines) to `path` with one write and syncs them; a new file is
/// private (0600), in a private directory (0700) if that is new too. A file that ends in the
/// middle of a line (a write cut short by a crash or a full disk) gets a line break first, so
/// the damaged line stays alone and the appended lines stay whole.
pub fn append(path: &Path, bytes: &[u8]) -> io::Result<()> {
    create_parent(path, Access::Private)?;
    let mut file = OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(path)?;
    let len = file.metadata()?.len();
    let mut last = [0u8; 1];
    let torn = len > 0 && file.read_exact_at(&mut last, len - 1).is_ok() && last != *b"\n";
    if torn {
        let mut line = Vec::with_capacity(bytes.len() + 1);
        line.push(b'\n');
        line.extend_from_slice(bytes);
        file.write_all(&line)?;
    } else {
        file.write_all(bytes)?;
    }
    file.sync_data()
}

/// Moves a damaged file aside, to `<name>.damaged` next to it (replacing an older one), so its
/// bytes are kept for inspection and the next write starts a new file. Returns the new path.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".damaged");
    let aside = path.with_file_name(name);
    fs::rename(path, &aside)?;
    File::open(parent(path))?.sync_all()?;
    Ok(aside)
}

/// A new, empty temporary file beside `path` (in the same directory, so [`install`] renames it
/// atomically), hidden (a dotfile), with `mode`: for a writer that needs a path of its own, as
/// SQLite does. Dropped without [`install`], it is removed.
pub fn temp_beside(path: &Path, mode: u32) -> io::Result<tempfile::NamedTempFile> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".depfence-tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(parent(path))?;
    // The umask may have narrowed the mode.
    temp.as_file().set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(temp)
}

/// Puts a file made with [`temp_beside`] at `path` durably: syncs it, moves it into place and
/// syncs the directory. Without `replace_existing`, an existing `path` is never replaced (the
/// error is [`io::ErrorKind::AlreadyExists`], and the temporary file is removed), even when it
/// appears while the file was being written.
pub fn install(temp: tempfile::NamedTempFile, path: &Path, replace_existing: bool) -> io::Result<()> {
    temp.as_file().sync_all()?;
    let placed = if replace_existing { temp.persist(path) } else { temp.persist_noclobber(path) };
    placed.map_err(|e| e.error)?;
    File::open(parent(path))?.sync_all()
}

fn write_and_rename(path: &Path, bytes: &[u8], access: Access, expected: Option<&[u8]>) -> Result<(), ReplaceError> {
    let existing = if access == Access::KeepExisting {
        match fs::canonicalize(path) {
            Ok(real) => {
                let metadata = fs::metadata(&real)?;
                Some((real, metadata))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let target = existing.as_ref().map_or(path, |(real, _)| real.as_path());
    create_parent(target, access)?;
    let dir = parent(target);
    let mode = match (&existing, access) {
        (Some((_, metadata)), _) => metadata.mode() & 0o7777,
        (None, Access::Public) => 0o644,
        (None, Access::Private | Access::KeepExisting) => 0o600,
    };
    // A dotfile, so that a reader of the directory (a policy directory, say) never takes it for
    // one of its files.
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", target.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
        .suffix(".depfence-tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    temp.write_all(bytes)?;
    if let Some((_, metadata)) = &existing {
        // The umask may have narrowed the mode; only root may give the file away, and others
        // keep their own ownership.
        temp.as_file().set_permissions(fs::Permissions::from_mode(mode))?;
        let own = temp.as_file().metadata()?;
        if (own.uid(), own.gid()) != (metadata.uid(), metadata.gid()) {
            let _ = std::os::unix::fs::fchown(temp.as_file(), Some(metadata.uid()), Some(metadata.gid()));
        }
    }
    temp.as_file().sync_all()?;
    if let Some(expected) = expected
        && fs::read(target)? != expected
    {
        return Err(ReplaceError::Changed(path.to_owned()));
    }
    temp.persist(target).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The directory `path` is in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn create_parent(path: &Path, access: Access) -> io::Result<()> {
    let mode = if access == Access::Private { 0o700 } else { 0o755 };
    fs::DirBuilder::new().recursive(true).mode(mode).create(parent(path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".depfence-tmp"))
            .collect()
    }

    #[test]
    fn install_replaces_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.db");
        let temp = temp_beside(&path, 0o644).unwrap();
        fs::write(temp.path(), b"one").unwrap();
        install(temp, &path, false).unwrap();
        assert_eq!((fs::read(&path).unwrap(), mode(&path)), (b"one".to_vec(), 0o644));
        let temp = temp_beside(&path, 0o644).unwrap();
        fs::write(temp.path(), b"two").unwrap();
        let refused = install(temp, &path, false).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one", "kept");
        let temp = temp_beside(&path, 0o644).unwrap();
        fs::write(temp.path(), b"three").unwrap();
        install(temp, &path, true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn access_decides_the_mode_of_a_new_file_and_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("state/evidence.jsonl");
        replace(&private, b"a\n", Access::Private).unwrap();
        assert_eq!((mode(&private), mode(private.parent().unwrap())), (0o600, 0o700));
        let public = dir.path().join("snapshot.bin");
        replace(&public, b"snap", Access::Public).unwrap();
        assert_eq!(mode(&public), 0o644);
        assert_eq!(fs::read(&public).unwrap(), b"snap");
        let log = dir.path().join("log/promotions.jsonl");
        append(&log, b"1\n").unwrap();
        append(&log, b"2\n").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "1\n2\n");
        assert_eq!((mode(&log), mode(log.parent().unwrap())), (0o600, 0o700));
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn keep_existing_keeps_the_mode_and_follows_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("team.toml");
        fs::write(&real, "old").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("policy.toml");
        symlink(&real, &link).unwrap();
        replace(&link, b"new", Access::KeepExisting).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!((fs::read_to_string(&real).unwrap(), mode(&real)), ("new".to_owned(), 0o640));
        // A new file under KeepExisting is private.
        let fresh = dir.path().join("fresh.toml");
        replace(&fresh, b"x", Access::KeepExisting).unwrap();
        assert_eq!(mode(&fresh), 0o600);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn an_append_after_a_torn_line_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        fs::write(&log, "{\"a\":1}\n{\"b\":").unwrap();
        append(&log, b"{\"c\":3}\n").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "{\"a\":1}\n{\"b\":\n{\"c\":3}\n");
        append(&log, b"{\"d\":4}\n").unwrap();
        assert!(fs::read_to_string(&log).unwrap().ends_with("{\"c\":3}\n{\"d\":4}\n"));
    }

    #[test]
    fn a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        fs::write(&file, "junk").unwrap();
        let aside = set_aside(&file).unwrap();
        assert_eq!(aside, dir.path().join("state.json.damaged"));
        assert_eq!(fs::read_to_string(&aside).unwrap(), "junk");
        assert!(!file.exists());
    }

    #[test]
    fn a_concurrent_change_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        fs::write(&file, "theirs").unwrap();
        let result = replace_if_unchanged(&file, b"mine", Access::KeepExisting, b"what I read");
        assert!(matches!(result, Err(ReplaceError::Changed(_))), "{result:?}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "theirs");
        assert!(leftovers(dir.path()).is_empty(), "the temporary file is removed");
        replace_if_unchanged(&file, b"mine", Access::KeepExisting, b"theirs").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "mine");
    }
}
