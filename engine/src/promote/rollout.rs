//! Promotion and demotion on evidence: the agent samples each service's kernel counters, keeps
//! the history in its state directory (so evidence outlives restarts), and `policyctl promote`
//! asks it to check the window, rewrite the mode in the policy file, apply it at once, and log
//! who did it, when and why.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::rewrite::rewrite_service_mode;
use super::{Actor, CounterHistory, Evidence, GateConfig, PromotionRecord, append_log, gate};
use crate::verdict::Mode;

/// The evidence store and the gate's settings.
pub struct Rollout {
    /// The gate.
    pub gate: GateConfig,
    history: CounterHistory,
    history_file: PathBuf,
    log_file: PathBuf,
    last_saved: SystemTime,
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
    /// Loads the counter history from `state_dir` (a missing file is an empty history).
    pub fn open(state_dir: &Path, gate: GateConfig) -> Self {
        let history_file = state_dir.join("counter-history.jsonl");
        let history = match CounterHistory::load(&history_file) {
            Ok(loaded) => {
                if loaded.skipped_lines > 0 {
                    warn!(skipped = loaded.skipped_lines, "unreadable lines in {}", history_file.display());
                }
                loaded.history
            }
            Err(e) => {
                warn!("counter history: {e}; starting a new one");
                CounterHistory::default()
            }
        };
        Self {
            gate,
            history,
            history_file,
            log_file: state_dir.join("promotions.jsonl"),
            last_saved: SystemTime::UNIX_EPOCH,
        }
    }

    /// Records a service's counters (called every second); writes new samples out every 10 s.
    pub fn record(&mut self, service: &str, now: SystemTime, allowed: u64, would_reject: u64) {
        self.history.record(service, now, allowed, would_reject);
    }

    /// Counts a would-reject destination (from the events).
    pub fn record_destination(&mut self, service: &str, now: SystemTime, destination: &str) {
        self.history.record_destination(service, now, destination, 1);
    }

    /// Writes new samples to the state directory if 10 s have passed (or `force`).
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
        if let Err(e) = result {
            warn!("saving counter history: {e}");
        }
    }

    /// The evidence for a service over the gate's window.
    pub fn evidence(&self, service: &str, now: SystemTime) -> Evidence {
        self.history.evidence(service, now, self.gate.window)
    }

    /// Runs the gate on the evidence now; returns the evidence it accepted.
    pub fn check(&mut self, service: &str, now: SystemTime) -> Result<Evidence, super::Refusal> {
        self.persist(now, true);
        let evidence = self.evidence(service, now);
        gate(&evidence, &self.gate).map(|()| evidence)
    }

    /// Changes a service's mode in the policy at `policy` (after the gate, for a promotion to
    /// enforce, unless forced) and logs it; `now` ends the evidence window. The caller reloads.
    pub fn change_mode(&mut self, policy: &Path, change: ModeRequest, now: SystemTime) -> Result<Outcome, String> {
        let ModeRequest { service, environment, mode, force, reason, who } = change;
        let (service, environment) = (service.as_str(), environment.as_str());
        if force && reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err("--force needs --reason: say why the evidence is overridden".into());
        }
        let (evidence, overridden) = if mode == Mode::Enforce {
            self.persist(now, true);
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
            if let Err(e) = append_log(&self.log_file, &record) {
                warn!("promotion log {}: {e}", self.log_file.display());
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
