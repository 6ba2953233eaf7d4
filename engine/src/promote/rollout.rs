//! Promotion and demotion on evidence: the agent samples each service's kernel counters, keeps
//! the history in its state directory (so evidence outlives restarts), and `policyctl promote`
//! asks it to check the window, rewrite the mode in the policy file, apply it at once, and log
//! who did it, when and why.
//!
//! Evidence that cannot be trusted never grants a promotion: a damaged history file, counters
//! the history cannot account for, or a damaged kernel state file (the agent says so) mark the
//! evidence lost, and the gate refuses until a whole window has passed since; while a file of
//! the state directory cannot be written, promotions to enforce are refused outright.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tracing::{error, info};

use super::history::Continuity;
use super::rewrite::rewrite_service_mode;
use super::{
    Actor, CounterHistory, Evidence, GateConfig, PromotionRecord, Refusal, StoreError, append_log, gate, read_log,
};
use crate::verdict::Mode;

/// The counter history's file in the state directory.
pub const HISTORY_FILE: &str = "counter-history.jsonl";
/// The promotion log's file in the state directory.
pub const PROMOTION_LOG_FILE: &str = "promotions.jsonl";

/// The evidence store and the gate's settings.
pub struct Rollout {
    /// The gate.
    pub gate: GateConfig,
    history: CounterHistory,
    history_file: PathBuf,
    log_file: PathBuf,
    last_saved: SystemTime,
    /// Files of the state directory whose last write failed, and why.
    unwritable: BTreeMap<PathBuf, String>,
    /// Failed writes not yet taken by [`Rollout::take_failed_writes`].
    failed_writes: Vec<PathBuf>,
}

/// A file of the state directory that [`Rollout::open`] found damaged or could not read.
#[derive(Debug)]
pub struct DamagedFile {
    /// What is wrong, naming the file (and the first damaged line).
    pub error: StoreError,
    /// Lines that were skipped (0 when the file could not be read at all).
    pub skipped_lines: usize,
    /// Where the damaged file was moved, to be kept (the counter history; the promotion log,
    /// an audit trail, stays where it is and new records are appended after the damage).
    pub set_aside: Option<PathBuf>,
    /// Whether evidence was lost with it (the counter history's, not the promotion log's).
    pub evidence_lost: bool,
}

/// A change of a service's mode, as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeRequest {
    /// The service.
    pub service: String,
    /// The environment.
    pub environment: String,
    /// The mode asked for.
    pub mode: Mode,
    /// Past the evidence gate (needs a reason).
    pub force: bool,
    /// Why.
    pub reason: Option<String>,
    /// Who asked.
    pub who: Actor,
}

/// What a promotion or demotion did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The policy file that was rewritten.
    pub file: PathBuf,
    /// Whether it changed (false: the service already had the mode).
    pub changed: bool,
    /// The change as a diff.
    pub diff: String,
    /// The evidence the gate saw (promotions).
    pub evidence: Option<Evidence>,
    /// The refusal that `--force` overrode.
    pub overridden: Option<String>,
}

/// The user name of a uid, from the password database (`/etc/passwd`).
pub fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

impl Rollout {
    /// Loads the counter history from `state_dir` (a missing file is an empty history) and
    /// checks the promotion log. A damaged or unreadable history is set aside (its readable
    /// lines are kept) and the evidence of every service counts as lost from `now`; what was
    /// found is returned, for the agent to report.
    pub fn open(state_dir: &Path, gate: GateConfig, now: SystemTime) -> (Self, Vec<DamagedFile>) {
        let history_file = state_dir.join(HISTORY_FILE);
        let log_file = state_dir.join(PROMOTION_LOG_FILE);
        let mut damaged = Vec::new();
        let (mut history, problem) = match CounterHistory::load(&history_file) {
            Ok(loaded) => (loaded.history, loaded.first_damaged.map(|error| (error, loaded.skipped_lines))),
            Err(error) => (CounterHistory::default(), Some((error, 0))),
        };
        if let Some((error, skipped_lines)) = problem {
            let set_aside = crate::durable::set_aside(&history_file).ok();
            if set_aside.is_some() {
                history.rewrite_on_next_append();
            }
            history.mark_lost(None, now, &error.to_string());
            damaged.push(DamagedFile { error, skipped_lines, set_aside, evidence_lost: true });
        }
        if let Err(error) = read_log(&log_file) {
            damaged.push(DamagedFile { error, skipped_lines: 0, set_aside: None, evidence_lost: false });
        }
        let rollout = Self {
            gate,
            history,
            history_file,
            log_file,
            last_saved: SystemTime::UNIX_EPOCH,
            unwritable: BTreeMap::new(),
            failed_writes: Vec::new(),
        };
        (rollout, damaged)
    }

    /// Records a service's counters (called every second); `zeroed`: the agent zeroed them
    /// since the last call (a counter slot new to the service). Counters the history cannot
    /// account for (counts without an earlier reading, or counters that went back, that the
    /// agent did not zero) mark the service's evidence lost at `now`; returns why, then.
    pub fn record(
        &mut self,
        service: &str,
        now: SystemTime,
        allowed: u64,
        would_reject: u64,
        zeroed: bool,
    ) -> Option<String> {
        if zeroed {
            self.history.record_zeroed(service, now, allowed, would_reject);
            return None;
        }
        let reason = match self.history.record(service, now, allowed, would_reject) {
            Continuity::Continued => return None,
            Continuity::First if allowed == 0 && would_reject == 0 => return None,
            Continuity::First => format!(
                "the kernel counted {allowed} allowed and {would_reject} would-rejected connections of `{service}` \
                 that the counter history has no record of"
            ),
            Continuity::Reset { before: (old_allowed, old_would_reject) } => format!(
                "the kernel's counters of `{service}` went back from {old_allowed} allowed and {old_would_reject} \
                 would-rejected to {allowed} and {would_reject}: they were reset outside the agent (a reboot, \
                 removed pins), and what they counted since the last sample is lost"
            ),
        };
        self.history.mark_lost(Some(service), now, &reason);
        Some(reason)
    }

    /// Adds would-rejects the kernel did not count: connections made before the policy in force
    /// that enforce would close (after [`Rollout::record`] of the same `now`).
    pub fn record_would_reject(&mut self, service: &str, now: SystemTime, count: u64) {
        self.history.record_would_reject(service, now, count);
    }

    /// Marks the evidence of every service lost at `now` (the agent's kernel state file was
    /// damaged or missing, say).
    pub fn lose_evidence(&mut self, now: SystemTime, reason: &str) {
        self.history.mark_lost(None, now, reason);
    }

    /// Notes how a write of a file of the state directory went (the agent's kernel state file,
    /// say; the rollout notes its own): while the last write of one of them failed, promotions
    /// to enforce are refused. A failure, and a recovery, is logged once.
    pub fn note_write(&mut self, file: &Path, result: Result<(), String>) {
        match result {
            Ok(()) => {
                if self.unwritable.remove(file).is_some() {
                    info!(file = %file.display(), "the state file is written again");
                }
            }
            Err(message) => {
                self.failed_writes.push(file.to_owned());
                if self.unwritable.get(file) != Some(&message) {
                    error!(
                        file = %file.display(),
                        "{message}; enforcement and metrics go on, promotions to enforce are refused until it can be \
                         written"
                    );
                }
                self.unwritable.insert(file.to_owned(), message);
            }
        }
    }

    /// Why the state directory cannot be written now (the last failed write), if it cannot.
    pub fn unwritable(&self) -> Option<&str> {
        self.unwritable.values().next().map(String::as_str)
    }

    /// The files whose writes failed since the last call, one entry per failed write (the agent
    /// counts them).
    pub fn take_failed_writes(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.failed_writes)
    }

    /// The refusal of a promotion while the state directory cannot be written.
    fn check_writable(&self) -> Result<(), Refusal> {
        match self.unwritable() {
            Some(error) => Err(Refusal::StateNotWritable { error: error.to_owned() }),
            None => Ok(()),
        }
    }

    /// Counts a would-reject destination (from the events).
    pub fn record_destination(&mut self, service: &str, now: SystemTime, destination: &str) {
        self.history.record_destination(service, now, destination, 1);
    }

    /// Writes new samples to the state directory if 10 s have passed (or `force`). A failure
    /// is noted ([`Rollout::note_write`]); the samples stay in memory and are written later.
    pub fn persist(&mut self, now: SystemTime, force: bool) {
        let due = now.duration_since(self.last_saved).unwrap_or_default() >= Duration::from_secs(10);
        if !(due || force) {
            return;
        }
        self.last_saved = now;
        self.history.prune(now);
        let result = if self.history.appended_since_save() > 10_000 {
            self.history.save(&self.history_file)
        } else {
            self.history.append(&self.history_file)
        };
        let file = self.history_file.clone();
        self.note_write(&file, result.map_err(|e| e.to_string()));
    }

    /// The counter history (would-rejected destinations, rule hits, evidence over any window).
    pub fn history(&self) -> &CounterHistory {
        &self.history
    }

    /// Records hits of a service's allow rule (see [`CounterHistory::record_hits`]).
    pub fn record_hits(&mut self, service: &str, now: SystemTime, rule: &str, count: u64) {
        self.history.record_hits(service, now, rule, count);
    }

    /// The evidence for a service over the gate's window.
    pub fn evidence(&self, service: &str, now: SystemTime) -> Evidence {
        self.history.evidence(service, now, self.gate.window)
    }

    /// Runs the gate on the evidence now (after writing it out: a state directory that cannot
    /// be written refuses); returns the evidence it accepted.
    pub fn check(&mut self, service: &str, now: SystemTime) -> Result<Evidence, Refusal> {
        self.persist(now, true);
        self.check_writable()?;
        let evidence = self.evidence(service, now);
        gate(&evidence, &self.gate).map(|()| evidence)
    }

    /// Changes a service's mode in the policy at `policy` (after the gate, for a promotion to
    /// enforce, unless forced) and logs it; `now` ends the evidence window. The caller reloads.
    /// A promotion to enforce, forced or not, is refused while the state directory cannot be
    /// written: neither its evidence nor its record could be kept. A demotion is never refused
    /// for that.
    pub fn change_mode(&mut self, policy: &Path, change: ModeRequest, now: SystemTime) -> Result<Outcome, String> {
        let ModeRequest { service, environment, mode, force, reason, who } = change;
        let (service, environment) = (service.as_str(), environment.as_str());
        if force && reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err("--force needs --reason: say why the evidence is overridden".into());
        }
        let (evidence, overridden) = if mode == Mode::Enforce {
            self.persist(now, true);
            if let Err(refusal) = self.check_writable() {
                info!(service, environment, user = who.user, uid = who.uid, %refusal, "promotion refused");
                return Err(format!("promotion refused: {refusal}"));
            }
            let evidence = self.evidence(service, now);
            match gate(&evidence, &self.gate) {
                Ok(()) => (Some(evidence), None),
                Err(refusal) if force => (Some(evidence), Some(refusal.to_string())),
                Err(refusal) => {
                    info!(service, environment, user = who.user, uid = who.uid, %refusal, "promotion refused");
                    return Err(format!("promotion refused: {refusal}"));
                }
            }
        } else {
            (None, None)
        };
        let edit = rewrite_service_mode(policy, service, Some(environment), mode).map_err(|e| e.to_string())?;
        if let Some((from, to)) = edit.old_and_new().filter(|_| edit.changed) {
            let record = PromotionRecord {
                time: now,
                service: service.to_owned(),
                environment: environment.to_owned(),
                from,
                to,
                who: who.clone(),
                reason: reason.clone(),
                forced: overridden.is_some(),
                overridden: overridden.clone(),
                evidence: evidence.clone(),
            };
            // Counted, not noted: only the next promotion would write the log again, so it
            // cannot be what refuses one (the history, in the same directory, is).
            if let Err(e) = append_log(&self.log_file, &record) {
                error!("the change of {service} is not in the promotion log: {e}");
                self.failed_writes.push(self.log_file.clone());
            }
            info!(
                service,
                environment,
                from = ?from,
                to = ?to,
                user = who.user,
                uid = who.uid,
                reason = reason.as_deref().unwrap_or(""),
                forced = overridden.is_some(),
                file = %edit.file.display(),
                "mode changed"
            );
        }
        Ok(Outcome { file: edit.file.clone(), changed: edit.changed, diff: edit.diff.clone(), evidence, overridden })
    }
}
