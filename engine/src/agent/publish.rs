//! The snapshot in force, published in the state directory for in-process guards
//! (`Guard::from_agent` loads it and follows it).
//!
//! The first snapshot is written before the agent says it is ready, so a guard started then
//! finds it. Later ones are written by a thread of their own, newest first (one queued behind a
//! write is replaced by a newer one): encoding and writing a large snapshot takes a few hundred
//! milliseconds, during which the agent goes on registering cgroups and answering requests.
//! Each write replaces the file whole (`snapshot::write_file`), so a guard never reads half of
//! one. Dropping the publisher waits for the last write.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use tracing::{error, warn};

use super::telemetry;
use crate::compile::Compiled;
use crate::snapshot::{AGENT_SNAPSHOT_FILE, Snapshot};

/// Publishes each applied policy's snapshot in the state directory.
pub(super) struct Publisher {
    state_dir: PathBuf,
    /// False: every snapshot is written in line (the agent's unit tests, whose metrics recorder
    /// sees only the test's own thread).
    in_background: bool,
    /// The writer thread's queue, once the first snapshot is written.
    queue: Option<mpsc::Sender<Arc<Compiled>>>,
    writer: Option<JoinHandle<()>>,
}

impl Publisher {
    /// A publisher for `state_dir` that writes all but the first snapshot on a thread of its
    /// own when `in_background`; reports a published snapshot that guards cannot load.
    pub(super) fn new(state_dir: &Path, in_background: bool) -> Self {
        check_published(state_dir);
        Publisher { state_dir: state_dir.to_owned(), in_background, queue: None, writer: None }
    }

    /// Publishes `compiled`'s snapshot: now, the first time; later, on the writer thread.
    pub(super) fn publish(&mut self, compiled: &Arc<Compiled>) {
        if let Some(queue) = &self.queue
            && queue.send(Arc::clone(compiled)).is_ok()
        {
            return;
        }
        write(&self.state_dir, &compiled.snapshot);
        if !self.in_background {
            return;
        }
        let (queue, pending) = mpsc::channel::<Arc<Compiled>>();
        let state_dir = self.state_dir.clone();
        let writer = std::thread::Builder::new().name("depfence-publish".into()).spawn(move || {
            while let Ok(mut newest) = pending.recv() {
                while let Ok(newer) = pending.try_recv() {
                    newest = newer;
                }
                write(&state_dir, &newest.snapshot);
            }
        });
        match writer {
            Ok(writer) => {
                self.queue = Some(queue);
                self.writer = Some(writer);
            }
            // Without the thread every snapshot is written here, as the first one was.
            Err(e) => warn!("cannot start the snapshot writer thread, publishing in line: {e}"),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            error!("the snapshot writer thread panicked");
        }
    }
}

/// Writes the snapshot to the state directory. A failure is logged and counted: the kernel
/// already enforces the policy.
fn write(state_dir: &Path, snapshot: &Snapshot) {
    let path = state_dir.join(AGENT_SNAPSHOT_FILE);
    let written = snapshot
        .to_bytes()
        .map_err(|e| e.to_string())
        .and_then(|bytes| crate::snapshot::write_file(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = written {
        telemetry::state_file_error(&path, "write");
        warn!(path = %path.display(), "cannot publish the snapshot for in-process guards: {e}");
    }
}

/// Reports a published snapshot that in-process guards cannot load (damaged, or unreadable);
/// the next applied policy replaces it.
fn check_published(state_dir: &Path) {
    let path = state_dir.join(AGENT_SNAPSHOT_FILE);
    let problem = match std::fs::read(&path) {
        Ok(bytes) => match Snapshot::from_bytes(&bytes) {
            Ok(_) => return,
            Err(e) => ("corrupt", format!("`{}` is not a valid snapshot: {e}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => ("read", format!("cannot read `{}`: {e}", path.display())),
    };
    telemetry::state_file_error(&path, problem.0);
    error!("{}; in-process guards cannot load it until a policy is applied and published again", problem.1);
}
