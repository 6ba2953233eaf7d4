//! The evidence gate for `policyctl promote`: may a service in `audit` move to `enforce`?
//!
//! The agent samples each service's kernel counters (connections allowed, and would-rejected
//! in audit mode) into a [`CounterHistory`], which it keeps across restarts in a JSON-lines file.
//! From the history, [`CounterHistory::evidence`] gives the [`Evidence`] for a window (by default
//! the last 24 hours), and [`gate`] refuses a promotion while the service had would-rejected
//! connections in the window, saw too little traffic, or was watched too briefly. Every promotion
//! or demotion is logged as a [`PromotionRecord`] with [`append_log`]. [`Rollout`] puts these
//! together for the agent, and [`rewrite::rewrite_service_mode`] makes the change in the policy
//! source, validated by the compiler.
//!
//! Files: `gate` (evidence and the gate), `history` (the counter history and its file), `store`
//! (the files' error and durable lines), `log` (the promotion log), `rollout` (what the agent
//! calls), `rewrite` (the validating policy rewrite). Everything but `rollout` is pure or plain
//! file I/O: the agent and the CLI own the clocks and sockets.

pub mod fleet;
mod gate;
mod history;
mod log;
#[cfg(feature = "fleet")]
pub mod prometheus;
pub mod rewrite;
mod rollout;
mod store;

use std::time::Duration;

pub use gate::{Evidence, EvidenceLoss, GateConfig, Refusal, TOP_DESTINATIONS, gate};
pub use history::{Continuity, CounterHistory, HistoryLimits, LoadedHistory, Sample};
pub use log::{Actor, PromotionRecord, append_log, read_log};
pub use rollout::{DamagedFile, HISTORY_FILE, ModeRequest, Outcome, PROMOTION_LOG_FILE, Rollout, user_name};
pub use store::StoreError;

/// One hour: the gate's and the history's unit of time.
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// What the tests of the submodules share.
#[cfg(test)]
mod testing {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::Evidence;
    pub(crate) use super::HOUR;

    pub(crate) const T0: u64 = 1_750_000_000;

    pub(crate) fn at(secs: u64) -> SystemTime {
        // Minute-aligned origin, so compaction steps fall on whole minutes of the test clock.
        UNIX_EPOCH + Duration::from_secs(T0 - T0 % 60 + secs)
    }

    pub(crate) fn mins(n: u64) -> Duration {
        Duration::from_secs(60 * n)
    }

    pub(crate) fn evidence(allowed: u64, would_reject: u64) -> Evidence {
        Evidence {
            service: "web".into(),
            at: at(100_000),
            window: 24 * HOUR,
            observed_for: 24 * HOUR,
            allowed,
            would_reject,
            last_would_reject: None,
            top_destinations: Vec::new(),
            lost: None,
        }
    }
}
