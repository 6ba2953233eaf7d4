//! Following the policy's files: a change (an edit, a `git pull`, a ConfigMap update) makes
//! the agent reload, after the burst of writes settles.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::warn;

/// Watches the policy (its directory for a file, recursively for a directory) and calls
/// `changed` with the instant it saw a change, after the change was made. Returns the watcher,
/// which must live as long as the agent.
pub fn watch_policy(path: &Path, changed: impl Fn(Instant) + Send + 'static) -> Option<notify::RecommendedWatcher> {
    use notify::event::{EventKind, ModifyKind, RenameMode};
    use notify::{RecursiveMode, Watcher as _};
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let (dir, mode) = if target.is_dir() {
        (target.clone(), RecursiveMode::Recursive)
    } else {
        (target.parent().map_or_else(|| PathBuf::from("/"), Path::to_owned), RecursiveMode::NonRecursive)
    };
    let file = (!target.is_dir()).then(|| target.clone());
    let handler = move |event: notify::Result<notify::Event>| {
        let seen = Instant::now();
        let Ok(event) = event else { return };
        // A rename is also reported as its two halves (`From`, `To`), each with its path.
        if event.kind.is_access() || event.kind == EventKind::Modify(ModifyKind::Name(RenameMode::Both)) {
            return;
        }
        let relevant = match &file {
            Some(file) => event.paths.iter().any(|p| p == file),
            None => event.paths.iter().any(|p| p.extension().is_some_and(|e| e == "toml")),
        };
        if relevant {
            changed(seen);
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(mut watcher) => match watcher.watch(&dir, mode) {
            Ok(()) => Some(watcher),
            Err(e) => {
                warn!("watching {}: {e}; reload with SIGHUP or `policyctl reload`", dir.display());
                None
            }
        },
        Err(e) => {
            warn!("file watching unavailable: {e}; reload with SIGHUP or `policyctl reload`");
            None
        }
    }
}
