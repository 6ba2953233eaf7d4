//! The counter history: each service's kernel counters sampled over time, corrected for resets,
//! bounded in memory, and kept across restarts in a JSON-lines file. From it,
//! [`CounterHistory::evidence`] gives the [`Evidence`] for a window.
//!
//! The history also records when evidence was lost ([`CounterHistory::mark_lost`]): a damaged
//! file, or kernel counters it cannot account for. A window that holds such a mark has no
//! trustworthy evidence ([`Evidence::lost`]).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::HOUR;
use super::gate::{Evidence, EvidenceLoss, TOP_DESTINATIONS};
use super::store::{StoreError, append_text, lines_text};
use crate::durable::{self, Access};
use crate::timefmt::unix_ms;

/// Bounds on a [`CounterHistory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Samples newer than this (relative to a series' newest sample) are all kept (default 1 h).
    pub fine: Duration,
    /// Older samples are thinned to the first one of each interval of this length (default 1 min).
    pub step: Duration,
    /// Samples older than this are dropped, keeping the last one before it, so windows up to this
    /// long can be answered (default 8 days).
    pub retain: Duration,
    /// Samples closer than this to the one before the newest replace the newest (default 1 s).
    pub min_interval: Duration,
    /// A longer gap between two samples does not count as observed (default 5 min).
    pub max_gap: Duration,
    /// The most destination entries kept per service (default 1024).
    pub destinations: usize,
    /// The most steps with hits kept per rule (default 1 500: a day of a rule used every
    /// minute); a rule's first and last hit are kept regardless.
    pub hit_steps: usize,
    /// The most lines [`CounterHistory::append`] holds back before it must rewrite the whole
    /// file instead (default 100 000).
    pub pending: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            fine: HOUR,
            step: Duration::from_secs(60),
            retain: 8 * 24 * HOUR,
            min_interval: Duration::from_secs(1),
            max_gap: Duration::from_secs(300),
            destinations: 1024,
            hit_steps: 1500,
            pending: 100_000,
        }
    }
}

/// One sample of a service's counters, corrected for resets: the counts since the history began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// When it was taken.
    pub time: SystemTime,
    /// Connections allowed.
    pub allowed: u64,
    /// Connections audit mode would have rejected.
    pub would_reject: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DestinationCount {
    /// The start of the step it falls in.
    time: SystemTime,
    destination: String,
    count: u64,
}

#[derive(Debug, Clone, Default)]
struct Series {
    /// Older samples, at most one per step.
    coarse: VecDeque<Sample>,
    /// Recent samples, all kept.
    fine: VecDeque<Sample>,
    /// The raw counters of the newest sample, to detect resets.
    raw: Option<(u64, u64)>,
    /// Would-reject destinations per step.
    destinations: VecDeque<DestinationCount>,
    /// Hits of each allow rule (by its description).
    hits: BTreeMap<String, RuleHits>,
}

/// The hits of one allow rule: when first and last hit, and the hits per step.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleHits {
    first: SystemTime,
    last: SystemTime,
    /// (step start, hits), oldest first, at most [`HistoryLimits::hit_steps`].
    steps: VecDeque<(SystemTime, u64)>,
}

impl RuleHits {
    fn add(&mut self, time: SystemTime, count: u64, limits: &HistoryLimits) {
        self.first = self.first.min(time);
        self.last = self.last.max(time);
        if count == 0 {
            return;
        }
        let step = step_start(time, limits);
        match self.steps.iter_mut().rev().find(|(t, _)| *t == step) {
            Some((_, n)) => *n = n.saturating_add(count),
            None => {
                let at = self.steps.iter().rposition(|(t, _)| *t < step).map_or(0, |i| i + 1);
                self.steps.insert(at, (step, count));
            }
        }
        while self.steps.len() > limits.hit_steps.max(1) {
            self.steps.pop_front();
        }
    }
}

impl Series {
    fn newest(&self) -> Option<&Sample> {
        self.fine.back().or_else(|| self.coarse.back())
    }

    fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.coarse.iter().chain(self.fine.iter())
    }

    /// Adds a sample (a time before the newest counts as the newest's), then thins old samples.
    fn push(&mut self, mut sample: Sample, limits: &HistoryLimits) {
        if let Some(newest) = self.newest() {
            sample.time = sample.time.max(newest.time);
        }
        let len = self.fine.len();
        let before_newest = len.checked_sub(2).and_then(|i| self.fine.get(i)).map(|s| s.time);
        let replace = match (self.fine.back(), before_newest) {
            (Some(newest), _) if newest.time == sample.time => true,
            (Some(_), Some(before)) => elapsed(before, sample.time) < limits.min_interval,
            _ => false,
        };
        if replace && let Some(newest) = self.fine.back_mut() {
            *newest = sample;
        } else {
            self.fine.push_back(sample);
        }
        while let Some(oldest) = self.fine.front().copied() {
            if elapsed(oldest.time, sample.time) <= limits.fine {
                break;
            }
            self.fine.pop_front();
            let same_step = self.coarse.back().is_some_and(|c| step_of(c.time, limits) == step_of(oldest.time, limits));
            if !same_step {
                self.coarse.push_back(oldest);
            }
        }
        // Keep the last sample before the retention cutoff: it is the base of the longest window.
        while self.coarse.get(1).is_some_and(|next| elapsed(next.time, sample.time) > limits.retain) {
            self.coarse.pop_front();
        }
    }

    fn add_destination(&mut self, time: SystemTime, destination: &str, count: u64, limits: &HistoryLimits) {
        let time = step_start(time, limits);
        let existing =
            self.destinations.iter_mut().rev().take_while(|d| d.time == time).find(|d| d.destination == destination);
        match existing {
            Some(entry) => entry.count = entry.count.saturating_add(count),
            None => self.destinations.push_back(DestinationCount { time, destination: destination.to_owned(), count }),
        }
        let newest = self.destinations.iter().map(|d| d.time).max().unwrap_or(time);
        while self.destinations.len() > limits.destinations
            || self.destinations.front().is_some_and(|d| elapsed(d.time, newest) > limits.retain)
        {
            self.destinations.pop_front();
        }
    }
}

/// `to - from`, zero when `to` is earlier.
fn elapsed(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}

fn step_of(time: SystemTime, limits: &HistoryLimits) -> u128 {
    let step = limits.step.as_millis().max(1);
    elapsed(UNIX_EPOCH, time).as_millis() / step
}

fn step_start(time: SystemTime, limits: &HistoryLimits) -> SystemTime {
    let step = limits.step.as_millis().max(1);
    let millis = step_of(time, limits).saturating_mul(step);
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// One line of the history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line {
    /// A sample, corrected for resets; `raw` holds the counters as read when they matter (for
    /// the newest sample), so a reset after a restart is still detected.
    Sample {
        service: String,
        #[serde(with = "unix_ms")]
        t_ms: SystemTime,
        allowed: u64,
        would_reject: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raw: Option<(u64, u64)>,
    },
    /// Would-rejects to one destination.
    Destination {
        service: String,
        #[serde(with = "unix_ms")]
        t_ms: SystemTime,
        destination: String,
        count: u64,
    },
    /// Hits of one allow rule in the step that starts at `t_ms` (more lines of one step add up).
    Hits {
        service: String,
        #[serde(with = "unix_ms")]
        t_ms: SystemTime,
        rule: String,
        count: u64,
    },
    /// Evidence of one service (or of every service, without `service`) was lost at `t_ms`.
    Lost {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        #[serde(with = "unix_ms")]
        t_ms: SystemTime,
        reason: String,
    },
}

/// How a reading of a service's counters follows the newest one ([`CounterHistory::record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The counters carried on from the newest reading.
    Continued,
    /// The history had no earlier reading of this service: counting starts here.
    First,
    /// A counter went down: the counters restarted from zero since the newest reading.
    Reset {
        /// The newest reading before: (allowed, would-reject).
        before: (u64, u64),
    },
}

/// A history read from a file, and the lines of it that were not understood (a line cut short
/// by a crash, a damaged block) and skipped.
#[derive(Debug)]
pub struct LoadedHistory {
    /// The history.
    pub history: CounterHistory,
    /// Lines skipped.
    pub skipped_lines: usize,
    /// The first line skipped, with its number and why.
    pub first_damaged: Option<StoreError>,
}

/// Counter samples per service: a bounded in-memory series of `(time, allowed, would_reject)`
/// for each, kept across restarts in a JSON-lines file.
///
/// The counters are monotonic; one that goes down means the counters were reset (an agent or
/// map restart), and counting restarts from 0 at that sample. The agent calls [`record`]
/// for every service at each sampling tick and [`append`] to persist the new lines; at start it
/// calls [`load`] and then [`save`] (which also rewrites the file compactly; call it again when
/// [`appended_since_save`] grows large). Counts between a sample that was persisted and a
/// restart that resets the counters are lost, so the agent should append often.
///
/// [`record`]: CounterHistory::record
/// [`append`]: CounterHistory::append
/// [`load`]: CounterHistory::load
/// [`save`]: CounterHistory::save
/// [`appended_since_save`]: CounterHistory::appended_since_save
#[derive(Debug, Clone, Default)]
pub struct CounterHistory {
    limits: HistoryLimits,
    series: BTreeMap<String, Series>,
    /// Lines not yet appended to the file.
    pending: Vec<Line>,
    /// True when `pending` overflowed: the next append rewrites the file.
    overflowed: bool,
    appended: usize,
    /// The newest loss of evidence of each service, and (key None) of every service.
    lost: BTreeMap<Option<String>, EvidenceLoss>,
}

impl CounterHistory {
    /// An empty history.
    pub fn new(limits: HistoryLimits) -> Self {
        CounterHistory { limits, ..CounterHistory::default() }
    }

    /// The limits.
    pub fn limits(&self) -> &HistoryLimits {
        &self.limits
    }

    /// Records a service's raw counters as read at `time`, and says how they follow the newest
    /// reading. Counts before a [`Continuity::First`] reading are not in the history; a
    /// [`Continuity::Reset`] loses what was counted between the newest reading and the reset.
    /// The caller decides whether that is a loss of evidence ([`CounterHistory::mark_lost`]).
    pub fn record(&mut self, service: &str, time: SystemTime, allowed: u64, would_reject: u64) -> Continuity {
        self.record_counts(service, time, allowed, would_reject, false)
    }

    /// Records a service's counters just after they were zeroed (a counter slot given to the
    /// service): everything they count is evidence, from a zero reading just before `time` on.
    pub fn record_zeroed(&mut self, service: &str, time: SystemTime, allowed: u64, would_reject: u64) {
        self.record_counts(service, time, allowed, would_reject, true);
    }

    fn record_counts(
        &mut self,
        service: &str,
        time: SystemTime,
        allowed: u64,
        would_reject: u64,
        zeroed: bool,
    ) -> Continuity {
        let limits = self.limits;
        let series = self.series.entry(service.to_owned()).or_default();
        if zeroed && series.newest().is_none() {
            let before = time.checked_sub(Duration::from_millis(1)).unwrap_or(time);
            series.push(Sample { time: before, allowed: 0, would_reject: 0 }, &limits);
        }
        let base = if zeroed { Some((0, 0)) } else { series.raw };
        let (continuity, (allowed_total, would_reject_total)) = match (base, series.newest()) {
            (Some((raw_allowed, raw_would_reject)), Some(newest)) => {
                let (continuity, (base_allowed, base_would_reject)) =
                    if allowed < raw_allowed || would_reject < raw_would_reject {
                        // A reset: the counters restarted from 0.
                        (Continuity::Reset { before: (raw_allowed, raw_would_reject) }, (0, 0))
                    } else {
                        (Continuity::Continued, (raw_allowed, raw_would_reject))
                    };
                (
                    continuity,
                    (
                        newest.allowed.saturating_add(allowed - base_allowed),
                        newest.would_reject.saturating_add(would_reject - base_would_reject),
                    ),
                )
            }
            _ => (Continuity::First, (allowed, would_reject)),
        };
        let sample = Sample { time, allowed: allowed_total, would_reject: would_reject_total };
        series.push(sample, &limits);
        series.raw = Some((allowed, would_reject));
        let stored = series.newest().copied().unwrap_or(sample);
        self.queue(Line::Sample {
            service: service.to_owned(),
            t_ms: stored.time,
            allowed: stored.allowed,
            would_reject: stored.would_reject,
            raw: Some((allowed, would_reject)),
        });
        continuity
    }

    /// Adds `count` would-rejects that the kernel's counters do not hold to a service's evidence
    /// at `time`: connections made before the policy in force that enforce would close (the
    /// agent's sweep finds them). Call it after [`CounterHistory::record`] of the same time: the
    /// count goes into a sample just after the newest (which stays the base of the windows that
    /// start there), and every later sample carries it on.
    pub fn record_would_reject(&mut self, service: &str, time: SystemTime, count: u64) {
        let limits = self.limits;
        let series = self.series.entry(service.to_owned()).or_default();
        let Some(newest) = series.newest().copied() else { return };
        let time = time.max(newest.time + Duration::from_millis(1));
        let sample = Sample { time, allowed: newest.allowed, would_reject: newest.would_reject.saturating_add(count) };
        series.push(sample, &limits);
        let stored = series.newest().copied().unwrap_or(sample);
        let raw = series.raw;
        self.queue(Line::Sample {
            service: service.to_owned(),
            t_ms: stored.time,
            allowed: stored.allowed,
            would_reject: stored.would_reject,
            raw,
        });
    }

    /// Records that evidence of `service` (of every service, with None) was lost at `time`:
    /// a window that holds `time` has no trustworthy evidence. A later mark replaces an earlier
    /// one.
    pub fn mark_lost(&mut self, service: Option<&str>, time: SystemTime, reason: &str) {
        self.note_lost(service.map(str::to_owned), time, reason.to_owned());
        self.queue(Line::Lost { service: service.map(str::to_owned), t_ms: time, reason: reason.to_owned() });
    }

    fn note_lost(&mut self, service: Option<String>, at: SystemTime, reason: String) {
        let newer = self.lost.get(&service).is_none_or(|known| known.at <= at);
        if newer {
            self.lost.insert(service, EvidenceLoss { at, reason });
        }
    }

    /// The newest loss of evidence of a service (its own, or every service's).
    pub fn last_loss(&self, service: &str) -> Option<&EvidenceLoss> {
        let own = self.lost.get(&Some(service.to_owned()));
        let all = self.lost.get(&None);
        [own, all].into_iter().flatten().max_by_key(|loss| loss.at)
    }

    /// Records `count` would-rejected connections of a service to a destination (from the
    /// datapath's events), for [`Evidence::top_destinations`].
    pub fn record_destination(&mut self, service: &str, time: SystemTime, destination: &str, count: u64) {
        let limits = self.limits;
        self.series.entry(service.to_owned()).or_default().add_destination(time, destination, count, &limits);
        self.queue(Line::Destination {
            service: service.to_owned(),
            t_ms: time,
            destination: destination.to_owned(),
            count,
        });
    }

    fn queue(&mut self, line: Line) {
        if self.overflowed {
            return;
        }
        if self.pending.len() >= self.limits.pending {
            self.pending.clear();
            self.overflowed = true;
        } else {
            self.pending.push(line);
        }
    }

    /// Applies a line read from a file.
    fn apply(&mut self, line: Line) {
        let limits = self.limits;
        match line {
            Line::Sample { service, t_ms, allowed, would_reject, raw } => {
                let series = self.series.entry(service).or_default();
                series.push(Sample { time: t_ms, allowed, would_reject }, &limits);
                series.raw = raw.or(Some((allowed, would_reject)));
            }
            Line::Destination { service, t_ms, destination, count } => {
                self.series.entry(service).or_default().add_destination(t_ms, &destination, count, &limits);
            }
            Line::Hits { service, t_ms, rule, count } => self.add_hits(&service, t_ms, &rule, count),
            Line::Lost { service, t_ms, reason } => self.note_lost(service, t_ms, reason),
        }
    }

    /// Records `count` hits of a service's allow rule (named by its description) at `time`.
    /// The agent records them once a step, so the file holds a line per rule and step at most.
    pub fn record_hits(&mut self, service: &str, time: SystemTime, rule: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.add_hits(service, time, rule, count);
        self.queue(Line::Hits { service: service.to_owned(), t_ms: time, rule: rule.to_owned(), count });
    }

    fn add_hits(&mut self, service: &str, time: SystemTime, rule: &str, count: u64) {
        let limits = self.limits;
        let series = self.series.entry(service.to_owned()).or_default();
        match series.hits.get_mut(rule) {
            Some(hits) => hits.add(time, count, &limits),
            None => {
                let mut hits = RuleHits { first: time, last: time, steps: VecDeque::new() };
                hits.add(time, count, &limits);
                series.hits.insert(rule.to_owned(), hits);
            }
        }
    }

    /// The allow rules of `service` hit in the window ending at `now`: (rule, hits counted in
    /// the window's steps, first hit, last hit), by rule. A rule is listed when its last hit
    /// falls in the window, even when its steps there were dropped by
    /// [`HistoryLimits::hit_steps`] (then its count is a lower bound).
    pub fn hits(&self, service: &str, now: SystemTime, window: Duration) -> Vec<(String, u64, SystemTime, SystemTime)> {
        let Some(series) = self.series.get(service) else { return Vec::new() };
        let start = now.checked_sub(window).unwrap_or(UNIX_EPOCH);
        let first_step = step_start(start, &self.limits);
        series
            .hits
            .iter()
            .filter(|(_, h)| h.last >= start && h.first <= now)
            .map(|(rule, h)| {
                let in_window: Vec<&(SystemTime, u64)> =
                    h.steps.iter().filter(|(t, _)| *t >= first_step && *t <= now).collect();
                let count = in_window.iter().map(|(_, n)| n).sum();
                let first_step_hit = in_window.first().map_or(start, |(t, _)| *t);
                (rule.clone(), count, h.first.max(start).max(first_step_hit), h.last.min(now))
            })
            .collect()
    }

    /// The newest sample of a service.
    pub fn latest(&self, service: &str) -> Option<Sample> {
        self.series.get(service).and_then(Series::newest).copied()
    }

    /// The services with samples, by name.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.series.keys().map(String::as_str)
    }

    /// Drops a service's history (it left the policy).
    pub fn forget(&mut self, service: &str) {
        self.series.remove(service);
    }

    /// Drops services whose newest sample is older than [`HistoryLimits::retain`] at `now`, and
    /// losses of evidence older than that.
    pub fn prune(&mut self, now: SystemTime) {
        let retain = self.limits.retain;
        self.series.retain(|_, s| s.newest().is_some_and(|n| elapsed(n.time, now) <= retain));
        self.lost.retain(|_, loss| elapsed(loss.at, now) <= retain);
    }

    /// How many samples are held for a service (for tests and metrics).
    pub fn sample_count(&self, service: &str) -> usize {
        self.series.get(service).map_or(0, |s| s.coarse.len() + s.fine.len())
    }

    /// The evidence for a service over the `window` that ends at `now`: the counter deltas from
    /// the last sample at or before the window's start (or, without one, the earliest sample in
    /// the window) to the newest sample at or before `now`. Samples after `now` are ignored. A
    /// loss of evidence after the window's start is [`Evidence::lost`].
    pub fn evidence(&self, service: &str, now: SystemTime, window: Duration) -> Evidence {
        let start = now.checked_sub(window).unwrap_or(UNIX_EPOCH);
        let mut evidence = Evidence {
            service: service.to_owned(),
            at: now,
            window,
            observed_for: Duration::ZERO,
            allowed: 0,
            would_reject: 0,
            last_would_reject: None,
            top_destinations: Vec::new(),
            lost: self.last_loss(service).filter(|loss| loss.at > start).cloned(),
        };
        let Some(series) = self.series.get(service) else { return evidence };
        let samples: Vec<&Sample> = series.samples().filter(|s| s.time <= now).collect();
        let base = samples.iter().rposition(|s| s.time <= start).unwrap_or(0);
        let used = samples.get(base..).unwrap_or_default();
        if let (Some(first), Some(last)) = (used.first(), used.last()) {
            evidence.allowed = last.allowed.saturating_sub(first.allowed);
            evidence.would_reject = last.would_reject.saturating_sub(first.would_reject);
        }
        for pair in used.windows(2) {
            let [a, b] = pair else { continue };
            if elapsed(a.time, b.time) <= self.limits.max_gap {
                evidence.observed_for += elapsed(a.time.max(start), b.time);
            }
            if b.would_reject > a.would_reject {
                evidence.last_would_reject = Some(b.time);
            }
        }
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        // A destination step that starts before the window may still end inside it.
        let first_step = step_start(start, &self.limits);
        for d in series.destinations.iter().filter(|d| d.time >= first_step && d.time <= now) {
            let entry = counts.entry(&d.destination).or_default();
            *entry = entry.saturating_add(d.count);
        }
        let mut top: Vec<(String, u64)> = counts.into_iter().map(|(d, n)| (d.to_owned(), n)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(TOP_DESTINATIONS);
        evidence.top_destinations = top;
        evidence
    }

    /// Every would-rejected destination of `service` in the window ending at `now`: (destination,
    /// count, first step seen, last step seen), by destination.
    pub fn destinations(
        &self,
        service: &str,
        now: SystemTime,
        window: Duration,
    ) -> Vec<(String, u64, SystemTime, SystemTime)> {
        let Some(series) = self.series.get(service) else { return Vec::new() };
        let first_step = step_start(now.checked_sub(window).unwrap_or(UNIX_EPOCH), &self.limits);
        let mut found: BTreeMap<&str, (u64, SystemTime, SystemTime)> = BTreeMap::new();
        for d in series.destinations.iter().filter(|d| d.time >= first_step && d.time <= now) {
            let entry = found.entry(&d.destination).or_insert((0, d.time, d.time));
            entry.0 = entry.0.saturating_add(d.count);
            entry.1 = entry.1.min(d.time);
            entry.2 = entry.2.max(d.time);
        }
        found.into_iter().map(|(d, (n, first, last))| (d.to_owned(), n, first, last)).collect()
    }

    /// Reads a history file written by [`append`](Self::append) and [`save`](Self::save), with
    /// the default limits. A missing file is an empty history. Lines that are not understood
    /// (not JSON, not UTF-8, cut short) are skipped and reported in the result.
    pub fn load(path: &Path) -> Result<LoadedHistory, StoreError> {
        Self::load_with_limits(path, HistoryLimits::default())
    }

    /// [`load`](Self::load) with other limits.
    pub fn load_with_limits(path: &Path, limits: HistoryLimits) -> Result<LoadedHistory, StoreError> {
        let mut history = CounterHistory::new(limits);
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LoadedHistory { history, skipped_lines: 0, first_damaged: None });
            }
            Err(source) => return Err(StoreError::Read { path: path.to_owned(), source }),
        };
        let (mut skipped_lines, mut first_damaged) = (0, None);
        for (index, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Line>(line) {
                Ok(line) => history.apply(line),
                Err(source) => {
                    skipped_lines += 1;
                    if first_damaged.is_none() {
                        first_damaged = Some(StoreError::Parse { path: path.to_owned(), line: index + 1, source });
                    }
                }
            }
        }
        Ok(LoadedHistory { history, skipped_lines, first_damaged })
    }

    /// Appends the lines recorded since the last append or save to the file (created with mode
    /// 0600), or rewrites it with [`save`](Self::save) when too many lines were held back.
    pub fn append(&mut self, path: &Path) -> Result<(), StoreError> {
        if self.overflowed {
            return self.save(path);
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let text = lines_text(&self.pending).map_err(|source| StoreError::Write { path: path.to_owned(), source })?;
        append_text(path, &text)?;
        self.appended += self.pending.len();
        self.pending.clear();
        Ok(())
    }

    /// Rewrites the file with the whole (compacted) history, atomically (mode 0600).
    pub fn save(&mut self, path: &Path) -> Result<(), StoreError> {
        let mut lines = Vec::new();
        for (service, series) in &self.series {
            let newest = series.newest().copied();
            for sample in series.samples() {
                lines.push(Line::Sample {
                    service: service.clone(),
                    t_ms: sample.time,
                    allowed: sample.allowed,
                    would_reject: sample.would_reject,
                    raw: if Some(*sample) == newest { series.raw } else { None },
                });
            }
            for d in &series.destinations {
                lines.push(Line::Destination {
                    service: service.clone(),
                    t_ms: d.time,
                    destination: d.destination.clone(),
                    count: d.count,
                });
            }
            for (rule, hits) in &series.hits {
                // The first and the last hit as lines of their own (a step's start may be before
                // the first), then every step kept.
                let steps = hits.steps.iter().map(|&(t, n)| (t.clamp(hits.first, hits.last), n));
                for (t_ms, count) in std::iter::once((hits.first, 0)).chain(steps) {
                    lines.push(Line::Hits { service: service.clone(), t_ms, rule: rule.clone(), count });
                }
                lines.push(Line::Hits { service: service.clone(), t_ms: hits.last, rule: rule.clone(), count: 0 });
            }
        }
        for (service, loss) in &self.lost {
            lines.push(Line::Lost { service: service.clone(), t_ms: loss.at, reason: loss.reason.clone() });
        }
        let write = |source| StoreError::Write { path: path.to_owned(), source };
        let text = lines_text(&lines).map_err(write)?;
        durable::replace(path, text.as_bytes(), Access::Private).map_err(write)?;
        self.pending.clear();
        self.overflowed = false;
        self.appended = 0;
        Ok(())
    }

    /// Lines appended since the file was last rewritten by [`save`](Self::save).
    pub fn appended_since_save(&self) -> usize {
        self.appended
    }

    /// Makes the next [`append`](Self::append) rewrite the whole file (the file was set aside).
    pub fn rewrite_on_next_append(&mut self) {
        self.pending.clear();
        self.overflowed = true;
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::promote::testing::*;

    /// Samples every `every` seconds from `from` to `to` (inclusive), counters from `counts`.
    fn fill(history: &mut CounterHistory, from: u64, to: u64, every: u64, counts: impl Fn(u64) -> (u64, u64)) {
        let mut t = from;
        while t <= to {
            let (a, w) = counts(t);
            history.record("web", at(t), a, w);
            t += every;
        }
    }

    #[test]
    fn evidence_is_the_delta_over_the_window() {
        let mut h = CounterHistory::default();
        fill(&mut h, 0, 7200, 10, |t| (t, 0)); // one allowed connection per second
        let e = h.evidence("web", at(7200), HOUR);
        assert_eq!((e.allowed, e.would_reject, e.observed_for), (3600, 0, HOUR));
        assert_eq!(e.last_would_reject, None);
        // A start between samples takes the last sample before it.
        let e = h.evidence("web", at(7200), Duration::from_secs(1805));
        assert_eq!((e.allowed, e.observed_for), (1810, Duration::from_secs(1805)));
        // Older than an hour, samples are one a minute (the first of each): the base is the
        // minute's first sample.
        let e = h.evidence("web", at(7200), Duration::from_secs(3605));
        assert_eq!((e.allowed, e.observed_for), (3660, Duration::from_secs(3605)));
        // `now` between samples: the newest sample before it ends the window.
        let e = h.evidence("web", at(7195), mins(30));
        assert_eq!((e.allowed, e.observed_for), (1800, Duration::from_secs(1795)));
        // Without a sample before the start, the earliest sample in the window is the base.
        let e = h.evidence("web", at(7200), 3 * HOUR);
        assert_eq!((e.allowed, e.observed_for), (7200, 2 * HOUR));
        // Before the first sample, or for an unknown service, there is nothing.
        assert_eq!(h.evidence("web", at(0), HOUR).allowed, 0);
        let e = h.evidence("db", at(7200), HOUR);
        assert_eq!((e.allowed, e.observed_for, e.service.as_str()), (0, Duration::ZERO, "db"));
    }

    #[test]
    fn would_rejects_are_counted_and_timed() {
        let mut h = CounterHistory::default();
        fill(&mut h, 0, 7200, 10, |t| (t, if t >= 1000 { 1 } else { 0 } + if t >= 5000 { 2 } else { 0 }));
        let e = h.evidence("web", at(7200), HOUR);
        assert_eq!(e.would_reject, 2);
        assert_eq!(e.last_would_reject, Some(at(5000)));
        let e = h.evidence("web", at(7200), Duration::from_secs(7000));
        assert_eq!(e.would_reject, 3);
        // A window that ends before the second increase sees only the first; it is older than
        // an hour, so it is timed by the first sample of the next minute.
        let e = h.evidence("web", at(4990), 2 * HOUR);
        assert_eq!((e.would_reject, e.last_would_reject), (1, Some(at(1020))));
        let e = h.evidence("web", at(7200), Duration::from_secs(2200));
        assert_eq!((e.would_reject, e.last_would_reject), (0, None));
    }

    #[test]
    fn would_rejects_the_kernel_did_not_count_ride_on_the_samples() {
        let mut h = CounterHistory::default();
        h.record("web", at(0), 100, 0);
        h.record_would_reject("web", at(0), 2); // a sample just after the newest carries it
        h.record("web", at(60), 150, 0);
        h.record("web", at(120), 170, 1);
        let e = h.evidence("web", at(120), Duration::from_secs(150));
        assert_eq!((e.allowed, e.would_reject), (70, 3));
        // A window that starts after it does not hold it; the kernel's counters go on as before.
        let e = h.evidence("web", at(120), Duration::from_secs(90));
        assert_eq!((e.allowed, e.would_reject), (70, 1));
        // Nothing to ride on before a service's first sample: nothing recorded.
        h.record_would_reject("db", at(0), 1);
        assert_eq!(h.evidence("db", at(0), HOUR).would_reject, 0);
    }

    #[test]
    fn rule_hits_are_kept_per_step_and_survive_a_rewrite() {
        let mut h = CounterHistory::default();
        h.record_hits("web", at(30), "db", 5);
        h.record_hits("web", at(3630), "db", 2);
        h.record_hits("web", at(3650), "db", 1);
        h.record_hits("web", at(3650), "cache", 0); // nothing hit: nothing kept
        h.record_hits("web", at(7000), "search", 4);
        // The last two hours: db (its last hit at 3650) and search.
        let hits = h.hits("web", at(7200), 2 * HOUR);
        assert_eq!(hits, vec![("db".into(), 8, at(30), at(3650)), ("search".into(), 4, at(7000), at(7000))]);
        // The last 50 minutes: only search; db's last hit is before them.
        assert_eq!(h.hits("web", at(7200), mins(50)), vec![("search".into(), 4, at(7000), at(7000))]);
        // A window ending before search was hit, starting after db's first step: first seen
        // to the minute.
        assert_eq!(h.hits("web", at(3700), Duration::from_secs(200)), vec![("db".into(), 3, at(3600), at(3650))]);
        // Rewritten and read back: the same.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        h.save(&path).unwrap();
        let loaded = CounterHistory::load(&path).unwrap();
        assert_eq!(loaded.skipped_lines, 0);
        assert_eq!(loaded.history.hits("web", at(7200), 2 * HOUR), hits);
        // And appended lines read back the same too.
        let path = dir.path().join("appended.jsonl");
        let mut h2 = CounterHistory::default();
        h2.record_hits("web", at(30), "db", 5);
        h2.record_hits("web", at(3650), "db", 3);
        h2.append(&path).unwrap();
        let loaded = CounterHistory::load(&path).unwrap().history;
        assert_eq!(loaded.hits("web", at(7200), 2 * HOUR), vec![("db".into(), 8, at(30), at(3650))]);
    }

    #[test]
    fn a_counter_reset_restarts_from_zero() {
        let mut h = CounterHistory::default();
        h.record("web", at(0), 100, 5);
        h.record("web", at(60), 150, 5);
        h.record("web", at(120), 20, 1); // restart: 20 and 1 since
        h.record("web", at(180), 50, 1);
        let e = h.evidence("web", at(180), HOUR);
        assert_eq!((e.allowed, e.would_reject), (50 + 20 + 30, 1));
        assert_eq!(e.last_would_reject, Some(at(120)));
        // Only one counter going down is a reset too: both restart.
        h.record("web", at(240), 60, 0);
        let e = h.evidence("web", at(240), HOUR);
        assert_eq!((e.allowed, e.would_reject), (50 + 20 + 30 + 60, 1));
        assert_eq!(h.latest("web").map(|s| (s.allowed, s.would_reject)), Some((100 + 50 + 20 + 30 + 60, 6)));
    }

    #[test]
    fn gaps_do_not_count_as_observed() {
        let mut h = CounterHistory::default();
        fill(&mut h, 0, 3600, 30, |t| (t, 0));
        fill(&mut h, 3 * 3600, 4 * 3600, 30, |t| (t, 0)); // the agent was down for two hours
        let e = h.evidence("web", at(4 * 3600), 4 * HOUR);
        assert_eq!(e.observed_for, 2 * HOUR);
        assert_eq!(e.allowed, 4 * 3600);
    }

    #[test]
    fn samples_closer_than_the_minimum_interval_replace_the_newest() {
        let mut h = CounterHistory::default();
        for i in 0..1000 {
            h.record("web", at(0) + Duration::from_millis(i), i, 0);
        }
        assert!(h.sample_count("web") <= 2, "{}", h.sample_count("web"));
        assert_eq!(h.latest("web").map(|s| s.allowed), Some(999));
        // A clock that goes back counts as the newest time.
        h.record("web", at(0) - HOUR, 1500, 0);
        assert_eq!(h.latest("web").map(|s| (s.time, s.allowed)), Some((at(0) + Duration::from_millis(999), 1500)));
    }

    /// A deterministic, uneven traffic pattern: cumulative counters at every 10 s step up to
    /// `end`.
    fn traffic(end: u64) -> Vec<(u64, u64)> {
        let (mut allowed, mut would_reject) = (0, 0);
        (0..=end / 10)
            .map(|i| {
                allowed += (i * 7919) % 13;
                would_reject += u64::from((i * 104_729) % 997 == 0);
                (allowed, would_reject)
            })
            .collect()
    }

    #[test]
    fn compaction_bounds_memory_and_keeps_the_answer() {
        let end = 30 * 3600;
        let table = traffic(end);
        let traffic = |t: u64| table[(t / 10) as usize];
        let mut full = CounterHistory::new(HistoryLimits { fine: Duration::MAX, ..HistoryLimits::default() });
        let mut compact = CounterHistory::default();
        fill(&mut full, 0, end, 10, traffic);
        fill(&mut compact, 0, end, 10, traffic);
        assert_eq!(full.sample_count("web"), (end / 10 + 1) as usize);
        // One hour of 10-second samples, then one per minute.
        assert!(compact.sample_count("web") <= 360 + 29 * 60 + 2, "{}", compact.sample_count("web"));
        for window_mins in [1, 30, 59, 60, 61, 90, 24 * 60, 29 * 60, 40 * 60] {
            // Windows that start on a whole minute: exactly the same answer.
            for now in [end, end - 600, end - 3600] {
                let a = full.evidence("web", at(now), mins(window_mins));
                let b = compact.evidence("web", at(now), mins(window_mins));
                assert_eq!((a.allowed, a.would_reject, a.observed_for), (b.allowed, b.would_reject, b.observed_for));
                let (la, lb) = (a.last_would_reject, b.last_would_reject);
                let close = match (la, lb) {
                    (Some(x), Some(y)) => elapsed(x, y) < mins(1),
                    (x, y) => x == y,
                };
                assert!(close, "{window_mins}m at {now}: {la:?} vs {lb:?}");
            }
        }
    }

    #[test]
    fn retention_drops_old_samples_but_keeps_a_base() {
        let limits = HistoryLimits { retain: 2 * HOUR, ..HistoryLimits::default() };
        let mut h = CounterHistory::new(limits);
        fill(&mut h, 0, 10 * 3600, 60, |t| (t, 0));
        assert!(h.sample_count("web") <= 2 * 60 + 2 + 60, "{}", h.sample_count("web"));
        let e = h.evidence("web", at(10 * 3600), 2 * HOUR);
        assert_eq!((e.allowed, e.observed_for), (2 * 3600, 2 * HOUR));
        h.prune(at(10 * 3600) + 3 * HOUR);
        assert_eq!(h.services().count(), 0);
    }

    #[test]
    fn destinations_are_ranked_within_the_window() {
        let mut h = CounterHistory::default();
        h.record_destination("web", at(0), "old:1/tcp", 50);
        for (d, n) in [("a:1/tcp", 1), ("b:2/tcp", 5), ("c:3/udp", 3), ("d:4/tcp", 2), ("e:5/tcp", 2), ("f:6/tcp", 1)] {
            h.record_destination("web", at(7200), d, n);
        }
        h.record_destination("web", at(7230), "a:1/tcp", 3);
        let e = h.evidence("web", at(7300), HOUR);
        let expected = [("a:1/tcp", 4), ("b:2/tcp", 5), ("c:3/udp", 3), ("d:4/tcp", 2), ("e:5/tcp", 2)];
        let mut expected: Vec<(String, u64)> = expected.iter().map(|(d, n)| ((*d).to_owned(), *n)).collect();
        expected.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        assert_eq!(e.top_destinations, expected);
        assert_eq!(h.evidence("web", at(7300), 3 * HOUR).top_destinations.first(), Some(&("old:1/tcp".to_owned(), 50)));
    }

    #[test]
    fn history_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/history.jsonl");
        let table = traffic(3 * 3600);
        let mut h = CounterHistory::default();
        fill(&mut h, 0, 3 * 3600, 10, |t| table[(t / 10) as usize]);
        h.record_destination("web", at(3 * 3600 - 100), "db:5432/tcp", 2);
        h.append(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let windows = [mins(5), HOUR, 2 * HOUR, 3 * HOUR];
        let now = at(3 * 3600);
        let loaded = CounterHistory::load(&path).unwrap();
        assert_eq!(loaded.skipped_lines, 0);
        let mut loaded = loaded.history;
        for w in windows {
            assert_eq!(loaded.evidence("web", now, w), h.evidence("web", now, w));
        }
        // Saving compacts the file; loading it gives the same answers.
        let before = fs::read_to_string(&path).unwrap().lines().count();
        loaded.save(&path).unwrap();
        let after = fs::read_to_string(&path).unwrap().lines().count();
        assert!(after < before, "{after} < {before}");
        assert_eq!(loaded.appended_since_save(), 0);
        let mut again = CounterHistory::load(&path).unwrap().history;
        for w in windows {
            assert_eq!(again.evidence("web", now, w), h.evidence("web", now, w));
        }
        // After a restart the kernel counters start from 0 again: a reset, not a loss.
        let latest = again.latest("web").unwrap();
        again.record("web", at(3 * 3600 + 10), 5, 1);
        assert_eq!(again.latest("web").map(|s| s.allowed), Some(latest.allowed + 5));
        assert_eq!(again.latest("web").map(|s| s.would_reject), Some(latest.would_reject + 1));
        // And without a reset the counters continue from their raw values.
        let (raw_allowed, raw_would_reject) = table[3 * 360];
        let mut continued = CounterHistory::load(&path).unwrap().history;
        continued.record("web", at(3 * 3600 + 10), raw_allowed + 7, raw_would_reject);
        assert_eq!(continued.latest("web").map(|s| s.allowed), Some(latest.allowed + 7));
        // Appending after the save adds only the new lines.
        again.append(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), after + 1);
        assert_eq!(again.appended_since_save(), 1);
    }

    #[test]
    fn a_torn_line_is_skipped_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let loaded = CounterHistory::load(&path).unwrap();
        assert_eq!((loaded.history.services().count(), loaded.skipped_lines), (0, 0));
        let mut h = CounterHistory::default();
        h.record("web", at(0), 1, 0);
        h.record("web", at(60), 2, 0);
        h.append(&path).unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"kind\":\"sample\",\"serv").unwrap();
        let loaded = CounterHistory::load(&path).unwrap();
        assert_eq!(loaded.skipped_lines, 1);
        assert_eq!(loaded.history.latest("web"), h.latest("web"));
        let damaged = loaded.first_damaged.unwrap().to_string();
        assert_eq!(damaged, format!("`{}` line 3 column 22: EOF while parsing a string", path.display()));
    }

    #[test]
    fn damaged_lines_are_reported_with_their_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let mut h = CounterHistory::default();
        h.record("web", at(0), 1, 0);
        h.record("web", at(60), 2, 0);
        h.append(&path).unwrap();
        // A block of the file overwritten (a bad restore): bytes that are not even UTF-8.
        let mut bytes = fs::read(&path).unwrap();
        bytes.splice(0..0, b"\xff\xfe\x00junk\n".iter().copied());
        bytes.extend_from_slice(b"{\"kind\":\"nonsense\"}\n");
        fs::write(&path, &bytes).unwrap();
        let loaded = CounterHistory::load(&path).unwrap();
        assert_eq!(loaded.skipped_lines, 2);
        assert_eq!(loaded.history.latest("web"), h.latest("web"), "the good lines are kept");
        let damaged = loaded.first_damaged.unwrap();
        assert!(matches!(damaged, StoreError::Parse { line: 1, .. }), "{damaged:?}");
        // An unreadable file is an error, not an empty history.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let error = CounterHistory::load(&path).unwrap_err().to_string();
        assert!(error.starts_with(&format!("cannot read `{}`", path.display())), "{error}");
    }

    #[test]
    fn each_reading_says_how_it_follows_the_last() {
        let mut h = CounterHistory::default();
        assert_eq!(h.record("web", at(0), 10, 1), Continuity::First);
        assert_eq!(h.record("web", at(60), 12, 1), Continuity::Continued);
        assert_eq!(h.record("web", at(120), 3, 0), Continuity::Reset { before: (12, 1) });
        assert_eq!(h.record("web", at(180), 3, 0), Continuity::Continued);
        // Counts before the first reading are not in the evidence.
        assert_eq!(h.evidence("web", at(180), HOUR).allowed, 2 + 3);
        // Counters just zeroed for the service count from zero, its first reading included.
        h.record_zeroed("db", at(0), 4, 1);
        h.record("db", at(60), 5, 1);
        let e = h.evidence("db", at(60), HOUR);
        assert_eq!((e.allowed, e.would_reject, e.last_would_reject), (5, 1, Some(at(0))));
        // And after a reading, zeroed counters are a reset that loses nothing of theirs.
        h.record_zeroed("web", at(240), 2, 1);
        let e = h.evidence("web", at(240), HOUR);
        assert_eq!((e.allowed, e.would_reject), (2 + 3 + 2, 1));
    }

    #[test]
    fn a_loss_of_evidence_is_kept_and_spoils_the_windows_that_hold_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let mut h = CounterHistory::default();
        fill(&mut h, 0, 3600, 10, |t| (t, 0));
        h.mark_lost(Some("web"), at(1000), "counted without a record");
        h.mark_lost(None, at(2000), "the state file was damaged");
        h.mark_lost(Some("db"), at(3000), "db only");
        let lost = |h: &CounterHistory, now: u64, window: Duration| h.evidence("web", at(now), window).lost;
        assert_eq!(
            lost(&h, 3600, HOUR).map(|l| (l.at, l.reason)),
            Some((at(2000), "the state file was damaged".into()))
        );
        assert_eq!(lost(&h, 3600, mins(25)), None, "a window that starts after the loss is whole");
        assert_eq!(lost(&h, 2000 + 600, mins(10)), None, "a window that starts at the loss is whole");
        assert_eq!(h.evidence("db", at(3600), mins(11)).lost.map(|l| l.reason), Some("db only".into()));
        // Appended, saved and loaded again: the same.
        h.append(&path).unwrap();
        let loaded = CounterHistory::load(&path).unwrap().history;
        assert_eq!(loaded.evidence("web", at(3600), HOUR), h.evidence("web", at(3600), HOUR));
        let mut loaded = loaded;
        loaded.save(&path).unwrap();
        let again = CounterHistory::load(&path).unwrap().history;
        assert_eq!(again.evidence("db", at(3600), HOUR), h.evidence("db", at(3600), HOUR));
        // Losses older than the retention go.
        let mut again = again;
        again.prune(at(2000) + 8 * 24 * HOUR + Duration::from_secs(500));
        assert_eq!(again.last_loss("db").map(|l| l.at), Some(at(3000)));
        assert_eq!(again.last_loss("web").map(|l| l.at), None);
        again.prune(at(3000) + 8 * 24 * HOUR + HOUR);
        assert_eq!(again.last_loss("db"), None);
    }

    #[test]
    fn too_many_pending_lines_turn_the_append_into_a_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let mut h = CounterHistory::new(HistoryLimits { pending: 10, ..HistoryLimits::default() });
        fill(&mut h, 0, 600, 10, |t| (t, 0));
        h.append(&path).unwrap();
        let loaded = CounterHistory::load(&path).unwrap().history;
        assert_eq!(loaded.evidence("web", at(600), HOUR), h.evidence("web", at(600), HOUR));
        assert_eq!(h.appended_since_save(), 0);
    }
}
