//! The gate: may a service in `audit` move to `enforce`, on the evidence of its counters?

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::timefmt::{Human, rfc3339, rfc3339_option, rfc3339_seconds, secs};

/// How many destinations [`Evidence::top_destinations`] lists.
pub const TOP_DESTINATIONS: usize = 5;

/// What the counters say about a service over a window ending at `at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The service.
    pub service: String,
    /// The end of the window (when the evidence was taken).
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// The window's length.
    #[serde(rename = "window_secs", with = "secs")]
    pub window: Duration,
    /// How much of the window the samples cover (gaps longer than
    /// [`super::HistoryLimits::max_gap`], such as an agent that was down, do not count).
    #[serde(rename = "observed_secs", with = "secs")]
    pub observed_for: Duration,
    /// Connections allowed in the window.
    pub allowed: u64,
    /// Connections that audit mode would have rejected in the window.
    pub would_reject: u64,
    /// When the last would-reject was seen (the sample that counted it), if any in the window.
    #[serde(with = "rfc3339_option", default)]
    pub last_would_reject: Option<SystemTime>,
    /// The destinations of would-rejects in the window (`host:port/proto` or the like, as the
    /// agent reported them) with their event counts, most frequent first. Events are
    /// de-duplicated by the datapath, so these counts rank destinations; they need not add up
    /// to `would_reject`.
    pub top_destinations: Vec<(String, u64)>,
    /// Set when evidence was lost inside the window (a damaged or missing state file, counters
    /// the history cannot account for): the counts cannot be trusted until a whole window has
    /// passed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<EvidenceLoss>,
}

/// When and why evidence was lost: from then on, counting starts afresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceLoss {
    /// When the loss was detected.
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// What was lost, and why.
    pub reason: String,
}

impl Evidence {
    /// Connections seen in the window, allowed or not.
    pub fn connections(&self) -> u64 {
        self.allowed.saturating_add(self.would_reject)
    }
}

/// What the gate asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateConfig {
    /// The window the evidence must cover (default 24 h).
    #[serde(rename = "window_secs", with = "secs")]
    pub window: Duration,
    /// The fewest connections that count as evidence (default 100).
    pub min_connections: u64,
    /// The least time the samples must cover within the window (default 1 h).
    #[serde(rename = "min_observed_secs", with = "secs")]
    pub min_observed: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig { window: 24 * super::HOUR, min_connections: 100, min_observed: super::HOUR }
    }
}

/// Why the gate refuses a promotion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Evidence was lost inside the window: what the counters say cannot be trusted.
    #[error(
        "the evidence for {service} was lost {} ago ({reason}); a promotion needs {} of complete \
         evidence after that, from {}",
        Human(*ago),
        Human(*window),
        rfc3339_seconds(*complete_at)
    )]
    EvidenceLost {
        /// The service.
        service: String,
        /// How long before the end of the window the loss was detected.
        ago: Duration,
        /// What was lost, and why.
        reason: String,
        /// The window.
        window: Duration,
        /// When a whole window of evidence will exist again.
        complete_at: SystemTime,
    },
    /// The agent cannot write its state directory, so the evidence (and the promotion's record)
    /// cannot be kept.
    #[error("the state directory is not writable: {error}; evidence cannot be recorded")]
    StateNotWritable {
        /// The failed write.
        error: String,
    },
    /// The service had would-rejected connections in the window.
    #[error(
        "{service} had {count} would-rejected connection{} in the last {}{}{}; \
         fix the policy or pass --force with --reason",
        plural(*count),
        Human(*window),
        last_ago.map(|ago| format!(", the last {} ago", Human(ago))).unwrap_or_default(),
        destinations(*count, top)
    )]
    WouldReject {
        /// The service.
        service: String,
        /// How many.
        count: u64,
        /// The window.
        window: Duration,
        /// How long before the end of the window the last one was seen.
        last_ago: Option<Duration>,
        /// The most frequent destinations.
        top: Vec<(String, u64)>,
    },
    /// The evidence covers a shorter window than the gate asks for.
    #[error("the evidence for {service} covers the last {}, the gate needs {}", Human(*window), Human(*required))]
    ShortWindow {
        /// The service.
        service: String,
        /// The evidence's window.
        window: Duration,
        /// The configured window.
        required: Duration,
    },
    /// The samples cover too little of the window.
    #[error("observed for {} of the {} window (minimum {})", Human(*observed), Human(*window), Human(*minimum))]
    ObservedTooBriefly {
        /// The service.
        service: String,
        /// How long it was observed.
        observed: Duration,
        /// The window.
        window: Duration,
        /// The configured minimum.
        minimum: Duration,
    },
    /// Too few connections in the window to trust the silence.
    #[error("only {connections} connection{} observed in the last {} (minimum {minimum})", plural(*connections), Human(*window))]
    TooLittleTraffic {
        /// The service.
        service: String,
        /// Connections seen.
        connections: u64,
        /// The window.
        window: Duration,
        /// The configured minimum.
        minimum: u64,
    },
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn destinations(count: u64, top: &[(String, u64)]) -> String {
    if top.is_empty() {
        return String::new();
    }
    let mut parts: Vec<String> = top.iter().map(|(d, n)| format!("{d} ({n})")).collect();
    let listed = top.iter().fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
    if listed < count {
        parts.push(format!("others ({})", count - listed));
    }
    format!(", to {}", parts.join(", "))
}

/// Decides whether the evidence allows a promotion to `enforce`: no evidence lost in the
/// window, no would-rejected connection in it, samples covering at least `min_observed` of it, and at least
/// `min_connections` connections. The first failing check is the refusal.
pub fn gate(evidence: &Evidence, config: &GateConfig) -> Result<(), Refusal> {
    let service = evidence.service.clone();
    if let Some(lost) = &evidence.lost {
        return Err(Refusal::EvidenceLost {
            service,
            ago: evidence.at.duration_since(lost.at).unwrap_or_default(),
            reason: lost.reason.clone(),
            window: config.window,
            complete_at: lost.at.checked_add(config.window).unwrap_or(lost.at),
        });
    }
    if evidence.would_reject > 0 {
        return Err(Refusal::WouldReject {
            service,
            count: evidence.would_reject,
            window: evidence.window,
            last_ago: evidence.last_would_reject.map(|t| evidence.at.duration_since(t).unwrap_or_default()),
            top: evidence.top_destinations.clone(),
        });
    }
    if evidence.window < config.window {
        return Err(Refusal::ShortWindow { service, window: evidence.window, required: config.window });
    }
    if evidence.observed_for < config.min_observed {
        return Err(Refusal::ObservedTooBriefly {
            service,
            observed: evidence.observed_for,
            window: evidence.window,
            minimum: config.min_observed,
        });
    }
    if evidence.connections() < config.min_connections {
        return Err(Refusal::TooLittleTraffic {
            service,
            connections: evidence.connections(),
            window: evidence.window,
            minimum: config.min_connections,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promote::testing::*;

    #[test]
    fn the_gate_explains_would_rejects() {
        let mut e = evidence(500, 3);
        e.last_would_reject = Some(at(100_000 - 7200));
        e.top_destinations = vec![("db:5432/tcp".into(), 2), ("10.0.0.1:443/tcp".into(), 1)];
        let refusal = gate(&e, &GateConfig::default()).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "web had 3 would-rejected connections in the last 24h, the last 2h ago, to db:5432/tcp (2), \
             10.0.0.1:443/tcp (1); fix the policy or pass --force with --reason"
        );
        let mut e = evidence(500, 1);
        e.top_destinations = vec![];
        assert_eq!(
            gate(&e, &GateConfig::default()).unwrap_err().to_string(),
            "web had 1 would-rejected connection in the last 24h; fix the policy or pass --force with --reason"
        );
        let mut e = evidence(500, 10);
        e.last_would_reject = Some(at(100_000 - 90));
        e.top_destinations = vec![("api.example.com:443/tcp".into(), 4)];
        assert_eq!(
            gate(&e, &GateConfig::default()).unwrap_err().to_string(),
            "web had 10 would-rejected connections in the last 24h, the last 1m30s ago, to \
             api.example.com:443/tcp (4), others (6); fix the policy or pass --force with --reason"
        );
        // Would-rejects are the first reason, even with too little traffic.
        let mut e = evidence(1, 1);
        e.observed_for = mins(1);
        assert!(matches!(gate(&e, &GateConfig::default()), Err(Refusal::WouldReject { count: 1, .. })));
    }

    #[test]
    fn the_gate_wants_enough_traffic_and_time() {
        let config = GateConfig::default();
        assert_eq!(
            gate(&evidence(12, 0), &config).unwrap_err().to_string(),
            "only 12 connections observed in the last 24h (minimum 100)"
        );
        assert_eq!(
            gate(&evidence(1, 0), &config).unwrap_err().to_string(),
            "only 1 connection observed in the last 24h (minimum 100)"
        );
        let mut e = evidence(5000, 0);
        e.observed_for = mins(10);
        assert_eq!(gate(&e, &config).unwrap_err().to_string(), "observed for 10m of the 24h window (minimum 1h)");
        e.observed_for = HOUR;
        assert_eq!(gate(&e, &config), Ok(()));
        assert_eq!(gate(&evidence(100, 0), &config), Ok(()));
        let mut e = evidence(5000, 0);
        e.window = HOUR;
        assert_eq!(
            gate(&e, &config).unwrap_err().to_string(),
            "the evidence for web covers the last 1h, the gate needs 24h"
        );
    }

    #[test]
    fn lost_evidence_is_refused_before_anything_else() {
        let mut e = evidence(5000, 0);
        e.lost = Some(EvidenceLoss { at: at(100_000 - 7), reason: "the state file was damaged".into() });
        let refusal = gate(&e, &GateConfig::default()).unwrap_err();
        assert!(matches!(refusal, Refusal::EvidenceLost { .. }), "{refusal:?}");
        let complete = rfc3339_seconds(at(100_000 - 7) + 24 * HOUR);
        assert_eq!(
            refusal.to_string(),
            format!(
                "the evidence for web was lost 7s ago (the state file was damaged); a promotion needs 24h of \
                 complete evidence after that, from {complete}"
            )
        );
        // Even with would-rejects in the window: what the counters say cannot be trusted.
        e.would_reject = 3;
        assert!(matches!(gate(&e, &GateConfig::default()), Err(Refusal::EvidenceLost { .. })));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["lost"]["reason"], "the state file was damaged");
        assert_eq!(serde_json::from_value::<Evidence>(json).unwrap(), e);
    }

    #[test]
    fn evidence_serializes_readably() {
        let mut e = evidence(10, 2);
        e.last_would_reject = Some(at(60));
        e.top_destinations = vec![("db:5432/tcp".into(), 2)];
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["window_secs"], 86_400);
        assert_eq!(json["top_destinations"][0][0], "db:5432/tcp");
        assert!(json["last_would_reject"].as_str().unwrap().ends_with('Z'));
        assert!(json.get("lost").is_none(), "no loss, no field");
        assert_eq!(serde_json::from_value::<Evidence>(json).unwrap(), e);
        let config: GateConfig =
            serde_json::from_str(r#"{"window_secs":3600,"min_connections":5,"min_observed_secs":60}"#).unwrap();
        assert_eq!(config, GateConfig { window: HOUR, min_connections: 5, min_observed: mins(1) });
    }
}
