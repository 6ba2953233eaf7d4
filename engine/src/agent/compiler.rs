//! The agent's compiles of its policy. A change to the policy's files starts a compile at once,
//! on a thread of its own, while the agent waits for the burst of writes to settle; the reload
//! at the end of the settle takes that result when no change was seen after the compile
//! started, and compiles again otherwise. So the settle and the compile overlap, and what the
//! agent applies is always a compile that started after the last change it saw: the watcher
//! sees a change after it is made, so a compile started after that instant reads it.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::compile::{CompileError, Compiled, IncrementalCompiler};

/// One compile of the policy and what it took.
pub struct Attempt {
    /// The compiled policy, or why not.
    pub result: Result<Compiled, CompileError>,
    /// How long the compile ran.
    pub took: Duration,
    /// How many files it parsed anew.
    pub reparsed: usize,
    /// How many files it did not read (their stamps were those of the cached texts).
    pub unread: usize,
    /// Whether it started at the change (early), not at the reload.
    pub early: bool,
}

/// Compiles the agent's policy, starting as soon as a change is seen.
pub struct PolicyCompiler {
    path: PathBuf,
    /// Keeps the last parse and analysis; held by one compile at a time.
    compiler: Arc<Mutex<IncrementalCompiler>>,
    early: Option<Early>,
}

/// A compile started by a change.
struct Early {
    job: Job,
    /// When it started, before it read any file.
    started: Instant,
    /// A change was seen after it started: its result may not be what the files hold.
    stale: bool,
}

/// What a compile on the pool sends back: its attempt, or its panic.
type Outcome = std::thread::Result<Attempt>;

/// A compile on rayon's pool, whose threads already hold the memory of the last compiles (a
/// thread of its own would grow an allocator arena of its own).
struct Job(Receiver<Outcome>);

impl Job {
    fn start(compiler: Arc<Mutex<IncrementalCompiler>>, path: PathBuf) -> Job {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rayon::spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(&compiler, &path, true)));
            let _ = tx.send(outcome);
        });
        Job(rx)
    }

    /// Waits for the compile; `None` if it was lost (the job sends before it ends, so only a
    /// pool torn down loses it). A compile that panicked panics here.
    fn finish(self) -> Option<Attempt> {
        self.0.recv().ok().map(|outcome| outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    }
}

impl PolicyCompiler {
    /// A compiler for the policy at `path` (a file or a directory); nothing compiled yet.
    pub fn new(path: &Path) -> Self {
        PolicyCompiler { path: path.to_owned(), compiler: Arc::default(), early: None }
    }

    /// A change to the policy's files was seen at `seen`: starts compiling them now, or, when
    /// a compile started before `seen` is under way or done, marks its result stale.
    pub fn changed(&mut self, seen: Instant) {
        match &mut self.early {
            Some(early) => early.stale |= seen >= early.started,
            None => {
                let started = Instant::now();
                let job = Job::start(Arc::clone(&self.compiler), self.path.clone());
                self.early = Some(Early { job, started, stale: false });
            }
        }
    }

    /// The policy as its files are now, at the end of a settle: the early compile's result when
    /// no change was seen after it started, else a compile started now.
    pub fn compile_settled(&mut self) -> Attempt {
        if let Some(early) = self.early.take()
            && let Some(attempt) = early.job.finish()
            && !early.stale
        {
            return attempt;
        }
        run(&self.compiler, &self.path, false)
    }

    /// The policy as its files are now, compiled now: for a reload the watcher may not have
    /// reported the changes before (the agent's own writes, a reload asked for). An early
    /// compile's result is dropped.
    pub fn compile(&mut self) -> Attempt {
        self.drop_early();
        run(&self.compiler, &self.path, false)
    }

    /// Makes the next compile read every file ([`IncrementalCompiler::forget_stamps`]); an early
    /// compile's result is dropped.
    pub fn forget_stamps(&mut self) {
        self.drop_early();
        lock(&self.compiler).forget_stamps();
    }

    fn drop_early(&mut self) {
        if let Some(early) = self.early.take() {
            let _ = early.job.finish();
        }
    }

    /// Waits for the early compile to finish (tests make a change after it deterministically).
    #[cfg(test)]
    pub(crate) fn finish_early(&mut self) {
        if let Some(early) = &mut self.early
            && let Ok(outcome) = early.job.0.recv()
        {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let _ = tx.send(outcome);
            early.job = Job(rx);
        }
    }
}

fn lock(compiler: &Mutex<IncrementalCompiler>) -> std::sync::MutexGuard<'_, IncrementalCompiler> {
    // A compile that panicked re-raises its panic in the reload that takes its result.
    compiler.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run(compiler: &Mutex<IncrementalCompiler>, path: &Path, early: bool) -> Attempt {
    let mut compiler = lock(compiler);
    let started = Instant::now();
    let result = compiler.compile_path(path);
    Attempt { result, took: started.elapsed(), reparsed: compiler.reparsed(), unread: compiler.unread(), early }
}
