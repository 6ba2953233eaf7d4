//! The agent's logic on an in-memory dataplane (`fake`), without privileges: reloads,
//! promotions on evidence, candidates, and cgroups that come and go. The privileged tests
//! (cli/tests/agent.rs) prove the same against the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, reason = "tests")]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::config::AgentConfig;
use super::control::{AgentStatus, ModeChanged, Request, Response};
use super::fake::FakeDataplane;
use super::kernel::Kernel;
use super::state::State;
use crate::cgroup::FoundCgroup;
use crate::datapath::abi;
use crate::promote::{GateConfig, read_log};
use crate::snapshot::Connection;
use crate::verdict::{Mode, Verdict};

const APP: u64 = 101;
const WEB: u64 = 102;
const DB: &str = "10.0.0.5:5432";
const OTHER: &str = "10.0.0.6:80";

/// A policy: `app` may reach `db`'s endpoint; `web` has no rule; every service in `mode` in
/// `prod`; `extra` goes into `app`'s allow list.
fn policy(mode: &str, extra: &str) -> String {
    format!(
        r#"version = 1
[environments]
prod = "{mode}"
[services.db]
endpoints = [{{ ip = "10.0.0.5", ports = [5432], proto = "tcp" }}]
[services.app]
cgroup = "app.service"
allow = [{{ service = "db" }}{extra}]
[services.web]
cgroup = "web.service"
"#
    )
}

struct Setup {
    dir: tempfile::TempDir,
    state: State<FakeDataplane>,
}

impl Setup {
    fn new(text: &str, gate: GateConfig) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.toml"), text).unwrap();
        let mut config = AgentConfig::new(dir.path().join("policy.toml"), "prod".into());
        config.state_dir = dir.path().join("state");
        config.gate = gate;
        config.dns = None;
        config.metrics_listen = None;
        let kernel =
            Kernel::with_dataplane(FakeDataplane::default(), &config.state_dir, Path::new("/cgroup2")).unwrap();
        let mut state = State::new(config, kernel, None);
        state.set_found(cgroups(&[(APP, "app.service"), (WEB, "web.service")]));
        Setup { dir, state }
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    fn write_policy(&self, text: &str) {
        std::fs::write(self.policy_path(), text).unwrap();
    }

    fn connect(&mut self, cgroup: u64, to: &str) -> Option<Verdict> {
        let conn: Connection = to.parse().unwrap();
        self.state.kernel_mut().dataplane_mut().connect(cgroup, &conn)
    }

    fn kernel_state(&mut self, cgroup: u64) -> Option<abi::CgroupState> {
        self.state.kernel_mut().dataplane_mut().cgroup(cgroup)
    }

    fn status(&self) -> AgentStatus {
        self.state.status()
    }

    fn ask(&mut self, request: Request, now: SystemTime) -> Response {
        self.state.handle(request, Some(0), now)
    }
}

fn cgroups(list: &[(u64, &str)]) -> Vec<FoundCgroup> {
    list.iter().map(|&(id, path)| FoundCgroup { relative: path.to_owned(), id }).collect()
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000 + secs)
}

#[test]
fn an_invalid_reload_keeps_the_last_good_policy() {
    let mut s = Setup::new(&policy("enforce", ""), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Rejected));
    let before = s.status();

    // A typo: the policy is refused, with its position, and nothing in the kernel changes.
    s.write_policy(&policy("enforce", r#", { service = "dbb" }"#));
    assert!(!s.state.reload("policy file changed", at(1)));
    let after = s.status();
    let reload = after.last_reload.as_ref().unwrap();
    assert!(!reload.ok);
    assert!(reload.errors.iter().any(|e| e.contains("policy.toml:8:") && e.contains("`dbb`")), "{:?}", reload.errors);
    assert_eq!((after.policy_hash.as_ref(), after.generation), (before.policy_hash.as_ref(), before.generation));
    assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Rejected));
    // `policyctl reload` says so too, and the last good policy still answers `explain`.
    let answer = s.ask(Request::Reload, at(2));
    assert!(!answer.ok && answer.error.unwrap().contains("the last good one stays in force"));
    let answer = s.ask(Request::Explain { from: "app".into(), to: DB.into() }, at(2));
    assert!(answer.ok, "{answer:?}");

    // A valid change is applied: a new generation, and the new rule is in force.
    s.write_policy(&policy("enforce", r#", { ip = "10.0.0.6", ports = [80] }"#));
    assert!(s.state.reload("policy file changed", at(3)));
    assert_eq!(s.status().generation, before.generation + 1);
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
}

#[test]
fn a_promotion_is_refused_on_evidence_and_accepted_on_clean_evidence() {
    let gate =
        GateConfig { window: Duration::from_secs(60), min_connections: 5, min_observed: Duration::from_secs(30) };
    let mut s = Setup::new(&policy("audit", ""), gate);
    assert!(s.state.reload("start", at(0)));
    let promote = Request::Promote {
        service: "app".into(),
        environment: None,
        mode: Mode::Enforce,
        force: false,
        reason: None,
        dry_run: false,
    };
    // A minute of traffic, one connection of it to an undeclared destination.
    for i in 0..=6 {
        s.connect(APP, DB);
        s.connect(APP, DB);
        if i == 2 {
            assert_eq!(s.connect(APP, OTHER), Some(Verdict::WouldReject), "audit lets it pass");
        }
        s.state.drain_events(at(10 * i));
        s.state.sample(at(10 * i));
    }
    let answer = s.ask(promote.clone(), at(60));
    let error = answer.error.unwrap_or_default();
    assert!(error.contains("app had 1 would-rejected connection in the last 1m"), "{error}");
    assert!(error.contains("10.0.0.6:80/tcp (1)"), "the destination is named: {error}");
    assert_eq!(s.kernel_state(APP).unwrap().mode, abi::MODE_AUDIT, "nothing changed");

    // Two more minutes, all of it declared: the window no longer holds the would-reject.
    for i in 7..=20 {
        s.connect(APP, DB);
        s.state.drain_events(at(10 * i));
        s.state.sample(at(10 * i));
    }
    let answer = s.ask(promote, at(200));
    assert!(answer.ok, "{answer:?}");
    let changed: ModeChanged = serde_json::from_value(answer.body).unwrap();
    assert!(changed.outcome.changed && changed.outcome.evidence.is_some());
    assert!(std::fs::read_to_string(s.policy_path()).unwrap().contains(r#"mode = { prod = "enforce" }"#));
    assert_eq!(s.kernel_state(APP).unwrap().mode, abi::MODE_ENFORCE, "applied at once");
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Rejected));
    let log = read_log(&s.dir.path().join("state/promotions.jsonl")).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].service.as_str(), log[0].from, log[0].to, log[0].forced),
        ("app", Mode::Audit, Mode::Enforce, false)
    );
}

#[test]
fn a_candidate_is_applied_dropped_and_activated() {
    let mut s = Setup::new(&policy("enforce", ""), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    // The candidate drops `db` and allows OTHER instead.
    let candidate = s.dir.path().join("candidate.toml");
    let candidate_text = policy("enforce", "")
        .replace(r#"allow = [{ service = "db" }]"#, r#"allow = [{ ip = "10.0.0.6", ports = [80] }]"#);
    std::fs::write(&candidate, &candidate_text).unwrap();

    let answer = s.ask(Request::ApplyCandidate { path: candidate.clone() }, at(1));
    assert!(answer.ok, "{answer:?}");
    assert_ne!(s.kernel_state(APP).unwrap().candidate_ruleset, 0);
    // The active policy decides; the candidate's would-rejects are counted beside it.
    assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Rejected));
    let status = s.status();
    assert_eq!(status.candidate.as_ref().map(|c| c.path.clone()), Some(candidate.clone()));
    let app = status.services.iter().find(|a| a.name == "app").unwrap();
    assert_eq!((app.counts.allowed, app.counts.rejected, app.counts.candidate_would_reject), (1, 1, 1));

    let answer = s.ask(Request::DropCandidate, at(2));
    assert!(answer.ok && s.status().candidate.is_none());
    assert_eq!(s.kernel_state(APP).unwrap().candidate_ruleset, 0);
    s.connect(APP, DB);
    let app = s.status().services.into_iter().find(|a| a.name == "app").unwrap();
    assert_eq!(app.counts.candidate_would_reject, 1, "no longer evaluated");

    assert!(s.ask(Request::ApplyCandidate { path: candidate }, at(3)).ok);
    let answer = s.ask(Request::ActivateCandidate, at(4));
    assert!(answer.ok, "{answer:?}");
    assert_eq!(std::fs::read_to_string(s.policy_path()).unwrap(), candidate_text);
    assert!(s.status().candidate.is_none());
    assert_eq!(s.kernel_state(APP).unwrap().candidate_ruleset, 0);
    assert_eq!(s.connect(APP, DB), Some(Verdict::Rejected));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
}

#[test]
fn a_vanished_cgroup_is_removed() {
    let mut s = Setup::new(&policy("enforce", ""), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    assert!(s.kernel_state(APP).is_some() && s.kernel_state(WEB).is_some());
    assert_eq!(s.state.kernel_mut().dataplane_mut().attached_ids(), [APP, WEB]);
    assert_eq!(s.connect(WEB, DB), Some(Verdict::Rejected), "web has no rule");

    // web's cgroup is gone: its entry and its attachment go with it; app stays as it was.
    s.state.set_found(cgroups(&[(APP, "app.service")]));
    assert!(s.kernel_state(WEB).is_none());
    assert_eq!(s.state.kernel_mut().dataplane_mut().attached_ids(), [APP]);
    assert_eq!(s.connect(WEB, DB), None, "no policy applies to it any more");
    assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
    let status = s.status();
    assert_eq!(status.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["app"]);
    assert_eq!(status.services_without_cgroups, 2);

    // It comes back (a restarted unit): registered again.
    s.state.set_found(cgroups(&[(APP, "app.service"), (WEB + 1, "web.service")]));
    assert!(s.kernel_state(WEB + 1).is_some());
}

#[test]
fn connections_the_policy_in_force_refuses_are_closed_and_reported() {
    let mut s = Setup::new(&policy("audit", r#", { ip = "10.0.0.6", ports = [80] }"#), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    // Made in audit: one allowed by a rule, one a would-reject, one to a rule about to go.
    assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
    assert_eq!(s.connect(APP, "10.0.0.7:443"), Some(Verdict::WouldReject));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
    s.state.drain_events(at(1));

    // Enforced, with the rule for OTHER gone: both connections it refuses are closed.
    s.write_policy(&policy("enforce", ""));
    assert!(s.state.reload("policy file changed", at(2)));
    s.state.drain_events(at(3));
    let closed: Vec<_> = s
        .state
        .subscribe(100)
        .0
        .into_iter()
        .filter(|e| e.kind == super::telemetry::EventKind::ClosedSocket)
        .map(|e| (e.service.unwrap(), e.destination, e.verdict))
        .collect();
    let expected = [("app", "10.0.0.7:443/tcp"), ("app", "10.0.0.6:80/tcp")]
        .map(|(service, to)| (service.to_owned(), to.to_owned(), Verdict::Rejected));
    assert_eq!(closed, expected);
    // The allowed connection stays; nothing is closed twice.
    assert!(s.state.reload("again", at(4)));
    s.state.drain_events(at(5));
    let count = s.state.subscribe(100).0.iter().filter(|e| e.kind == super::telemetry::EventKind::ClosedSocket).count();
    assert_eq!(count, 2);
}
