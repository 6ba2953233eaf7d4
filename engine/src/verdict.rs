//! The decision vocabulary every part of depfence shares: a service's [`Mode`], the
//! [`Verdict`] on a connection, a DNS question or an RPC, the one rule [`decide`] that turns
//! (mode, matched) into a verdict, and [`Counts`] per verdict.
//!
//! The rule itself is `depfence_bpf_common::verdict_of`, the `const fn` the eBPF program calls;
//! [`decide`] is that function in these types, so the kernel, `explain`, the DNS proxy and the
//! in-process guard cannot disagree. The kernel's numeric codes (`MODE_*`, `VERDICT_*`) convert
//! here and nowhere else; so do the names that metrics, events and JSON use.

use std::fmt;
use std::ops::{Index, IndexMut};

use depfence_bpf_common as abi;
use serde::{Deserialize, Serialize};

/// What is done with something the policy does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No evaluation: everything passes, nothing is counted.
    Off,
    /// Soft-apply: allow, but count and report every would-be rejection.
    Audit,
    /// Deny (the caller sees `EPERM`), count and report.
    Enforce,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::Off, Mode::Audit, Mode::Enforce];

    /// Parses `off`, `audit` or `enforce`.
    pub fn parse(text: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == text)
    }

    /// The keyword (also the metric label).
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Audit => "audit",
            Mode::Enforce => "enforce",
        }
    }

    /// The kernel's code (`CgroupState::mode`).
    pub const fn code(self) -> u32 {
        match self {
            Mode::Off => abi::MODE_OFF,
            Mode::Audit => abi::MODE_AUDIT,
            Mode::Enforce => abi::MODE_ENFORCE,
        }
    }

    /// The mode of a kernel code; None for a code this build does not know.
    pub const fn from_code(code: u32) -> Option<Mode> {
        match code {
            abi::MODE_OFF => Some(Mode::Off),
            abi::MODE_AUDIT => Some(Mode::Audit),
            abi::MODE_ENFORCE => Some(Mode::Enforce),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a connection, a DNS question or an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A rule allows it (or the mode is `off`).
    Allowed,
    /// No rule allows it; the service is in audit, so it passes and is counted.
    WouldReject,
    /// No rule allows it; the service enforces, so the caller is refused (`EPERM`).
    Rejected,
    /// The candidate policy, evaluated in shadow, would not allow it (the active one decides).
    CandidateWouldReject,
}

impl Verdict {
    /// Every verdict, in the order of the kernel's codes.
    pub const ALL: [Verdict; 4] =
        [Verdict::Allowed, Verdict::WouldReject, Verdict::Rejected, Verdict::CandidateWouldReject];

    /// The name in metrics labels, events and JSON: `allowed`, `would_reject`, `rejected`,
    /// `candidate_would_reject`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::WouldReject => "would_reject",
            Verdict::Rejected => "rejected",
            Verdict::CandidateWouldReject => "candidate_would_reject",
        }
    }

    /// The name for people, in reports and tables: `allowed`, `would-reject`, `rejected`,
    /// `candidate-would-reject`.
    pub const fn phrase(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::WouldReject => "would-reject",
            Verdict::Rejected => "rejected",
            Verdict::CandidateWouldReject => "candidate-would-reject",
        }
    }

    /// The kernel's code (`VERDICT_*`: counters and events).
    pub const fn code(self) -> u32 {
        match self {
            Verdict::Allowed => abi::VERDICT_ALLOWED,
            Verdict::WouldReject => abi::VERDICT_WOULD_REJECT,
            Verdict::Rejected => abi::VERDICT_REJECTED,
            Verdict::CandidateWouldReject => abi::VERDICT_CANDIDATE_WOULD_REJECT,
        }
    }

    /// The verdict of a kernel code; None for a code this build does not know.
    pub const fn from_code(code: u32) -> Option<Verdict> {
        match code {
            abi::VERDICT_ALLOWED => Some(Verdict::Allowed),
            abi::VERDICT_WOULD_REJECT => Some(Verdict::WouldReject),
            abi::VERDICT_REJECTED => Some(Verdict::Rejected),
            abi::VERDICT_CANDIDATE_WOULD_REJECT => Some(Verdict::CandidateWouldReject),
            _ => None,
        }
    }

    /// True for every verdict but [`Verdict::Allowed`]: something the policy does not allow.
    pub const fn is_refusal(self) -> bool {
        !matches!(self, Verdict::Allowed)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict on something that `matched` an allow rule (or did not) under `mode`: the
/// kernel's own `verdict_of`, so every decision in depfence follows one rule.
#[inline(always)]
pub const fn decide(mode: Mode, matched: bool) -> Verdict {
    match Verdict::from_code(abi::verdict_of(mode.code(), matched)) {
        Some(verdict) => verdict,
        // `verdict_of` returns only known codes; an unknown one would fail open, counted.
        None => Verdict::WouldReject,
    }
}

/// A count per verdict: a service's kernel counters, or a tally of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Allowed.
    pub allowed: u64,
    /// Would have been rejected (audit).
    pub would_reject: u64,
    /// Rejected (enforce).
    pub rejected: u64,
    /// The candidate policy would have rejected.
    pub candidate_would_reject: u64,
}

impl Counts {
    /// Every (verdict, count), in the order of [`Verdict::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (Verdict, u64)> + '_ {
        Verdict::ALL.into_iter().map(|v| (v, self[v]))
    }
}

impl Index<Verdict> for Counts {
    type Output = u64;

    fn index(&self, verdict: Verdict) -> &u64 {
        match verdict {
            Verdict::Allowed => &self.allowed,
            Verdict::WouldReject => &self.would_reject,
            Verdict::Rejected => &self.rejected,
            Verdict::CandidateWouldReject => &self.candidate_would_reject,
        }
    }
}

impl IndexMut<Verdict> for Counts {
    fn index_mut(&mut self, verdict: Verdict) -> &mut u64 {
        match verdict {
            Verdict::Allowed => &mut self.allowed,
            Verdict::WouldReject => &mut self.would_reject,
            Verdict::Rejected => &mut self.rejected,
            Verdict::CandidateWouldReject => &mut self.candidate_would_reject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule, written out: every mode with and without a matching rule.
    #[test]
    fn mode_and_match_give_the_verdict() {
        let table = [
            (Mode::Off, false, Verdict::Allowed),
            (Mode::Off, true, Verdict::Allowed),
            (Mode::Audit, false, Verdict::WouldReject),
            (Mode::Audit, true, Verdict::Allowed),
            (Mode::Enforce, false, Verdict::Rejected),
            (Mode::Enforce, true, Verdict::Allowed),
        ];
        for (mode, matched, verdict) in table {
            assert_eq!(decide(mode, matched), verdict, "{mode} matched={matched}");
        }
        // Only a rejection is refused in the kernel; an unknown mode fails open, counted.
        assert_eq!(abi::action_of(Verdict::Rejected.code()), abi::DENY);
        assert_eq!(abi::action_of(Verdict::WouldReject.code()), abi::ALLOW);
        assert_eq!(abi::verdict_of(99, false), Verdict::WouldReject.code());
    }

    #[test]
    fn codes_and_names_round_trip() {
        for verdict in Verdict::ALL {
            assert_eq!(Verdict::from_code(verdict.code()), Some(verdict));
            let json = serde_json::to_string(&verdict).unwrap();
            assert_eq!(json, format!("\"{}\"", verdict.as_str()));
            assert_eq!(serde_json::from_str::<Verdict>(&json).unwrap(), verdict);
        }
        assert_eq!(Verdict::from_code(abi::VERDICT_COUNT), None);
        for mode in Mode::ALL {
            assert_eq!(Mode::from_code(mode.code()), Some(mode));
            assert_eq!(Mode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(Mode::parse("Enforce"), None);
    }

    #[test]
    fn counts_index_by_verdict() {
        let mut counts = Counts::default();
        for verdict in Verdict::ALL {
            counts[verdict] = u64::from(verdict.code()) + 10;
        }
        assert_eq!(
            (counts.allowed, counts.would_reject, counts.rejected, counts.candidate_would_reject),
            (10, 11, 12, 13)
        );
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 46);
        let json = serde_json::to_value(counts).unwrap();
        assert_eq!(json["would_reject"], 11);
    }
}
