//! The agent's logic on an in-memory dataplane (`fake`), without privileges: reloads,
//! promotions on evidence, candidates, and cgroups that come and go. The privileged tests
//! (cli/tests/agent.rs) prove the same against the real kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, reason = "tests")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
        let state = Self::start(dir.path(), FakeDataplane::default(), gate, at(0));
        Setup { dir, state }
    }

    /// An agent on `dataplane` with the policy and state directory in `dir`, started at `now`.
    fn start(dir: &Path, dataplane: FakeDataplane, gate: GateConfig, now: SystemTime) -> State<FakeDataplane> {
        let mut config = AgentConfig::new(dir.join("policy.toml"), "prod".into());
        config.state_dir = dir.join("state");
        config.gate = gate;
        config.dns = None;
        config.metrics_listen = None;
        let kernel = Kernel::with_dataplane(dataplane, &config.state_dir, Path::new("/cgroup2")).unwrap();
        let mut state = State::new(config, kernel, None, now);
        state.set_found(cgroups(&[(APP, "app.service"), (WEB, "web.service")]));
        state
    }

    /// Stops the agent, lets `between` do what happened meanwhile to the state directory and
    /// to the (pinned) maps, and starts a new agent at `now` that applies the policy.
    fn restart(self, now: SystemTime, between: impl FnOnce(&Path, &mut FakeDataplane)) -> Setup {
        let Setup { dir, state } = self;
        let gate = state.config().gate;
        let mut dataplane = state.into_kernel().into_dataplane();
        between(&dir.path().join("state"), &mut dataplane);
        let mut state = Self::start(dir.path(), dataplane, gate, now);
        assert!(state.reload("start", now));
        Setup { dir, state }
    }

    /// Audit traffic of `app` every `every` seconds from `from` to `to`, sampled: allowed, and
    /// one would-reject at `reject_at`.
    fn traffic(&mut self, from: u64, to: u64, every: u64, reject_at: Option<u64>) {
        let mut t = from;
        while t <= to {
            self.connect(APP, DB);
            if reject_at == Some(t) {
                assert_eq!(self.connect(APP, OTHER), Some(Verdict::WouldReject));
            }
            self.state.drain_events(at(t));
            self.state.sample(at(t));
            t += every;
        }
    }

    fn promote(&mut self, service: &str, now: SystemTime) -> Response {
        let request = Request::Promote {
            service: service.into(),
            environment: None,
            mode: Mode::Enforce,
            force: false,
            reason: None,
            dry_run: false,
        };
        self.ask(request, now)
    }

    fn service(&self, name: &str) -> super::control::ServiceStatus {
        self.status().services.into_iter().find(|s| s.name == name).unwrap()
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
fn a_reload_reparses_only_changed_files() {
    let mut s = Setup::new(&policy("enforce", ""), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    assert_eq!(s.state.policy_files_reparsed(), 1);
    // Nothing changed: nothing is parsed again, and the same policy stays in force.
    let hash = s.status().policy_hash;
    assert!(s.state.reload("SIGHUP", at(1)));
    assert_eq!(s.state.policy_files_reparsed(), 0);
    assert_eq!(s.status().policy_hash, hash);
    // An edit: the file is parsed again, and the new rule is in force.
    s.write_policy(&policy("enforce", r#", { ip = "10.0.0.6", ports = [80] }"#));
    assert!(s.state.reload("policy file changed", at(2)));
    assert_eq!(s.state.policy_files_reparsed(), 1);
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
}

#[test]
fn a_compile_started_at_a_change_is_applied_unless_the_files_changed_after_it() {
    let mut s = Setup::new(&policy("enforce", ""), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    let with_other = policy("enforce", r#", { ip = "10.0.0.6", ports = [80] }"#);
    // A change: the compile starts at once, and the reload at the end of the settle applies it.
    // The watcher may report one write more than once: a report of a change seen before the
    // compile started leaves its result good.
    s.write_policy(&with_other);
    let seen = Instant::now();
    s.state.policy_changed(seen);
    s.state.finish_early_compile();
    s.state.policy_changed(seen);
    assert!(s.state.reload_settled(at(1)));
    assert!(s.state.compiled_early());
    assert_eq!(s.state.policy_files_reparsed(), 1);
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
    let with_other_hash = s.status().policy_hash;

    // Another change after that compile had read the files: its result is stale, and the
    // reload compiles the files as they are now.
    s.write_policy(&policy("enforce", ""));
    s.state.policy_changed(Instant::now());
    s.state.finish_early_compile();
    s.write_policy(&with_other);
    s.state.policy_changed(Instant::now());
    assert!(s.state.reload_settled(at(2)));
    assert!(!s.state.compiled_early());
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
    assert_eq!(s.status().policy_hash, with_other_hash);

    // A reload other than at the end of a settle (here after a write the watcher has not
    // reported yet, as the agent's own `promote` makes) compiles the files as they are now.
    s.write_policy(&policy("enforce", ""));
    s.state.policy_changed(Instant::now());
    s.state.finish_early_compile();
    s.write_policy(&with_other);
    assert!(s.state.reload("mode changed by policyctl", at(2)));
    assert!(!s.state.compiled_early());
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
    assert_eq!(s.status().policy_hash, with_other_hash);

    // An invalid file read early is refused like any other; the next change is applied.
    s.write_policy(&policy("enforce", r#", { service = "dbb" }"#));
    s.state.policy_changed(Instant::now());
    assert!(!s.state.reload_settled(at(3)));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
    s.write_policy(&policy("enforce", ""));
    s.state.policy_changed(Instant::now());
    assert!(s.state.reload_settled(at(4)));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Rejected));
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

/// A connection made while the policy allowed it, that the policy now in force would refuse,
/// stays open in audit, but it is evidence: enforce would close it. It is reported once however
/// many sweeps find it, and it refuses the promotion like a would-reject the hook counted.
#[test]
fn an_open_connection_enforce_would_close_is_evidence_in_audit() {
    let gate =
        GateConfig { window: Duration::from_secs(60), min_connections: 5, min_observed: Duration::from_secs(30) };
    let mut s = Setup::new(&policy("audit", r#", { ip = "10.0.0.6", ports = [80] }"#), gate);
    assert!(s.state.reload("start", at(0)));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed), "a long-lived connection, allowed then");
    s.state.drain_events(at(0));
    s.state.sample(at(0));

    // The rule goes; the service stays in audit. Two applies, one connection.
    s.write_policy(&policy("audit", ""));
    assert!(s.state.reload("policy file changed", at(1)));
    assert!(s.state.reload("again", at(2)));
    let promote = Request::Promote {
        service: "app".into(),
        environment: None,
        mode: Mode::Enforce,
        force: false,
        reason: None,
        dry_run: false,
    };
    for i in 0..=5 {
        s.connect(APP, DB);
        s.state.drain_events(at(10 * i + 3));
        s.state.sample(at(10 * i + 3));
    }
    let found: Vec<_> = s
        .state
        .subscribe(100)
        .0
        .into_iter()
        .filter(|e| e.kind == super::telemetry::EventKind::ClosedSocket)
        .map(|e| (e.destination, e.verdict))
        .collect();
    assert_eq!(found, [(OTHER.to_owned() + "/tcp", Verdict::WouldReject)], "reported once, and left open");
    let answer = s.ask(promote, at(55));
    let error = answer.error.unwrap_or_default();
    assert!(error.contains("app had 1 would-rejected connection"), "{error}");
    assert!(error.contains("10.0.0.6:80/tcp (1)"), "the destination is named: {error}");
}

/// The issue's scenario: an agent in audit saw a would-reject; its counter history was then
/// truncated and its kernel state file corrupted, and it was restarted on the same (pinned)
/// maps. The promotion is refused, saying the evidence was lost, until a full window of new
/// evidence exists; the service keeps its counter slot, its counters and its mode (since an
/// unknown time), and the damaged file is kept.
#[test]
fn lost_evidence_never_grants_a_promotion() {
    let gate = GateConfig { window: Duration::from_secs(60), min_connections: 5, min_observed: Duration::from_secs(5) };
    let mut s = Setup::new(&policy("audit", ""), gate);
    assert!(s.state.reload("start", at(0)));
    s.traffic(0, 60, 10, Some(30));
    s.state.persist(at(60));
    let slot = s.kernel_state(APP).unwrap().counter_slot;
    let web_slot = s.kernel_state(WEB).unwrap().counter_slot;
    assert_ne!(s.service("app").mode_since, "unknown");

    // A crash, a full disk, a bad restore: the history is cut short, the state file is junk.
    let mut s = s.restart(at(61), |state_dir, _| {
        std::fs::write(state_dir.join("counter-history.jsonl"), "").unwrap();
        std::fs::write(state_dir.join("kernel-state.json"), "{\"slots\": {\"app\": 0, \"web\"").unwrap();
    });
    assert_eq!(s.kernel_state(APP).unwrap().counter_slot, slot, "app keeps its counter slot");
    assert_eq!(s.kernel_state(WEB).unwrap().counter_slot, web_slot, "and so does web");
    let app = s.service("app");
    assert_eq!((app.counts.would_reject, app.mode.as_str()), (1, "audit"), "and its counters and mode");
    assert_eq!(app.mode_since, "unknown", "since when is not known any more");
    let state_dir = s.dir.path().join("state");
    assert!(std::fs::read_to_string(state_dir.join("kernel-state.json.damaged")).unwrap().starts_with("{\"slots\""));

    s.traffic(61, 68, 1, None);
    let answer = s.promote("app", at(68));
    let error = answer.error.unwrap_or_default();
    assert!(!answer.ok && error.contains("the evidence for app was lost 7s ago"), "{error}");
    assert!(error.contains("kernel-state.json` is damaged at line 1 column 26"), "{error}");
    assert_eq!(s.kernel_state(APP).unwrap().mode, abi::MODE_AUDIT, "nothing changed");

    // The loss is in the history: another restart does not forget it.
    let mut s = s.restart(at(70), |_, _| {});
    let error = s.promote("app", at(70)).error.unwrap_or_default();
    assert!(error.contains("the evidence for app was lost 9s ago"), "{error}");

    // A full window of new evidence later, the gate judges it again.
    s.traffic(70, 120, 1, None);
    let answer = s.promote("app", at(120));
    assert!(answer.error.as_deref().unwrap_or_default().contains("was lost 59s ago"), "{answer:?}");
    s.traffic(121, 131, 1, None);
    let answer = s.promote("app", at(131));
    assert!(answer.ok, "{answer:?}");
}

/// Counters that the counter history cannot account for: counts it has no record of (the
/// history lost them), or counters that went back behind the agent's back (new maps after a
/// reboot). Either marks the service's evidence lost; a plain restart does not.
#[test]
fn counters_the_history_cannot_account_for_mark_the_evidence_lost() {
    let gate = GateConfig { window: Duration::from_secs(60), min_connections: 5, min_observed: Duration::from_secs(5) };
    let mut s = Setup::new(&policy("audit", ""), gate);
    assert!(s.state.reload("start", at(0)));
    s.traffic(0, 60, 10, None);

    // A plain restart on the same maps: the evidence carries on.
    let mut s = s.restart(at(61), |_, _| {});
    s.traffic(61, 65, 1, None);
    let answer = s.promote("app", at(65));
    assert!(answer.ok, "{answer:?}");
    s.write_policy(&policy("audit", ""));
    assert!(s.state.reload("demoted", at(66)));

    // The history alone is lost (the state file is fine): the kernel counted connections of
    // app that the history has no record of.
    s.state.persist(at(66));
    let mut s = s.restart(at(67), |state_dir, _| {
        std::fs::write(state_dir.join("counter-history.jsonl"), "").unwrap();
    });
    s.traffic(67, 75, 1, None);
    let error = s.promote("app", at(75)).error.unwrap_or_default();
    assert!(
        error.contains(
            "the evidence for app was lost 8s ago (the kernel counted 13 allowed and 0 would-rejected \
             connections of `app` that the counter history has no record of)"
        ),
        "{error}"
    );
    // web counted nothing: nothing of it is lost.
    let error = s.promote("web", at(75)).error.unwrap_or_default();
    assert!(error.contains("only 0 connections"), "{error}");

    // New maps (a reboot) under the same state directory: the counters went back.
    s.traffic(76, 140, 1, None);
    s.state.persist(at(140));
    let mut s = s.restart(at(141), |_, dataplane| *dataplane = FakeDataplane::default());
    s.traffic(141, 150, 1, None);
    let error = s.promote("app", at(150)).error.unwrap_or_default();
    assert!(error.contains("the kernel's counters of `app` went back from"), "{error}");
}

/// A service's first would-reject counts even when it comes before the first sample: its
/// counter slot was zeroed for it, so everything in it is evidence.
#[test]
fn counts_before_the_first_sample_are_evidence() {
    let gate = GateConfig { window: Duration::from_secs(60), min_connections: 1, min_observed: Duration::from_secs(5) };
    let mut s = Setup::new(&policy("audit", ""), gate);
    assert!(s.state.reload("start", at(0)));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::WouldReject));
    s.traffic(0, 20, 1, None);
    let error = s.promote("app", at(20)).error.unwrap_or_default();
    assert!(error.contains("app had 1 would-rejected connection"), "{error}");
}

/// What the state-file and evidence metrics counted while `run` ran: `name{labels}` → total.
fn counted<T>(run: impl FnOnce() -> T) -> (T, BTreeMap<String, u64>) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let result = metrics::with_local_recorder(&recorder, run);
    let mut totals = BTreeMap::new();
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        let name = key.key().name();
        if !["depfence_state_file_errors_total", "depfence_evidence_lost_total"].contains(&name) {
            continue;
        }
        let labels: Vec<String> = key.key().labels().map(|l| format!("{}=\"{}\"", l.key(), l.value())).collect();
        if let metrics_util::debugging::DebugValue::Counter(n) = value {
            *totals.entry(format!("{name}{{{}}}", labels.join(","))).or_default() += n;
        }
    }
    (result, totals)
}

/// Puts a non-empty directory where each file of the state directory is, so that every write
/// of them fails (as on a read-only or full file system, but without privileges); returns a
/// function that undoes it.
fn block_state_files(state_dir: &Path) -> impl FnOnce() + use<> {
    let files = ["kernel-state.json", "counter-history.jsonl", "promotions.jsonl", "snapshot.bin"];
    let mut kept = Vec::new();
    for name in files {
        let path = state_dir.join(name);
        let bytes = std::fs::read(&path).ok();
        let _ = std::fs::remove_file(&path);
        std::fs::create_dir_all(path.join("blocked")).unwrap();
        kept.push((path, bytes));
    }
    move || {
        for (path, bytes) in kept {
            std::fs::remove_dir_all(&path).unwrap();
            if let Some(bytes) = bytes {
                std::fs::write(&path, bytes).unwrap();
            }
        }
    }
}

/// A state directory that cannot be written: enforcement and metrics go on (an apply whose
/// kernel part succeeded is in force and reported so; the failed writes are logged and
/// counted), promotions to enforce are refused with the reason, forced or not; once the
/// directory can be written again, they are judged on the evidence again.
#[test]
fn an_unwritable_state_directory_keeps_enforcing_and_refuses_promotions() {
    let gate = GateConfig { window: Duration::from_secs(60), min_connections: 5, min_observed: Duration::from_secs(5) };
    let mut s = Setup::new(&policy("audit", ""), gate);
    assert!(s.state.reload("start", at(0)));
    s.traffic(0, 60, 10, None);
    let generation = s.status().generation;
    let unblock = block_state_files(&s.dir.path().join("state"));

    // A policy change: applied, in force, and reported as in force.
    s.write_policy(&policy("audit", r#", { ip = "10.0.0.6", ports = [80] }"#));
    let (applied, metrics) = counted(|| s.state.reload("policy file changed", at(61)));
    assert!(applied, "{:?}", s.status().last_reload);
    let status = s.status();
    assert_eq!((status.generation, status.last_reload.unwrap().ok), (generation + 1, true));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed), "the new rule is in the kernel");
    assert_eq!(metrics.get(r#"depfence_state_file_errors_total{file="kernel-state.json",kind="write"}"#), Some(&1));
    assert_eq!(metrics.get(r#"depfence_state_file_errors_total{file="snapshot.bin",kind="write"}"#), Some(&1));

    // Sampling goes on; the history's writes fail and are counted.
    let (_, metrics) = counted(|| s.traffic(61, 80, 1, None));
    assert!(metrics.get(r#"depfence_state_file_errors_total{file="counter-history.jsonl",kind="write"}"#) >= Some(&2));
    assert_eq!(s.service("app").counts.allowed, 7 + 20 + 1);

    // Promotions to enforce are refused, forced or not, and change nothing.
    let before = std::fs::read_to_string(s.policy_path()).unwrap();
    for (force, reason) in [(false, None), (true, Some("INC-1".to_owned()))] {
        let request = Request::Promote {
            service: "app".into(),
            environment: None,
            mode: Mode::Enforce,
            force,
            reason,
            dry_run: false,
        };
        let error = s.ask(request, at(80)).error.unwrap_or_default();
        assert!(error.starts_with("promotion refused: the state directory is not writable: "), "{error}");
        assert!(error.ends_with("; evidence cannot be recorded"), "{error}");
    }
    let dry_run = Request::Promote {
        service: "app".into(),
        environment: None,
        mode: Mode::Enforce,
        force: false,
        reason: None,
        dry_run: true,
    };
    let error = s.ask(dry_run, at(80)).error.unwrap_or_default();
    assert!(error.contains("the state directory is not writable"), "{error}");
    assert_eq!(std::fs::read_to_string(s.policy_path()).unwrap(), before);
    assert_eq!(s.kernel_state(APP).unwrap().mode, abi::MODE_AUDIT);

    // Writable again: the next promotion writes what was held back, and is judged on evidence.
    unblock();
    let answer = s.promote("app", at(81));
    assert!(answer.ok, "{answer:?}");
    assert_eq!(s.kernel_state(APP).unwrap().mode, abi::MODE_ENFORCE);
    let history = crate::promote::CounterHistory::load(&s.dir.path().join("state/counter-history.jsonl")).unwrap();
    assert_eq!(history.history.latest("app").map(|l| l.time), Some(at(80)), "nothing of the history is lost");
    assert_eq!(history.history.sample_count("app"), 7 + 20);
}

/// Damaged files of the state directory are reported (naming the file and line), counted,
/// never a panic, and never trusted: a damaged history is set aside and the evidence counts
/// as lost; a damaged promotion log keeps its damage and gets whole records after it; a damaged
/// published snapshot is replaced by the next apply. A kernel state file that is missing while
/// the maps hold a previous agent's cgroups, or cannot be read, is rebuilt from the kernel and
/// the evidence counts as lost.
#[test]
fn damaged_state_files_are_reported_counted_and_never_trusted() {
    let gate = GateConfig { window: Duration::from_secs(60), min_connections: 5, min_observed: Duration::from_secs(5) };
    let mut s = Setup::new(&policy("audit", ""), gate);
    assert!(s.state.reload("start", at(0)));
    s.traffic(0, 60, 10, None);
    let forced = Request::Promote {
        service: "web".into(),
        environment: None,
        mode: Mode::Enforce,
        force: true,
        reason: Some("drill".into()),
        dry_run: false,
    };
    assert!(s.ask(forced, at(60)).ok);
    s.state.persist(at(60));

    let state_dir = s.dir.path().join("state");
    let (mut s, metrics) = counted(|| {
        s.restart(at(61), |state_dir, _| {
            let history = state_dir.join("counter-history.jsonl");
            let mut lines: Vec<String> =
                std::fs::read_to_string(&history).unwrap().lines().map(str::to_owned).collect();
            lines.insert(3, "{\"kind\":\"sample\",\"service\":\"app\",\"t_ms\":".into());
            std::fs::write(&history, lines.join("\n") + "\n").unwrap();
            let log = state_dir.join("promotions.jsonl");
            let text = std::fs::read_to_string(&log).unwrap();
            std::fs::write(&log, &text[..text.len() / 2]).unwrap();
            let snapshot = state_dir.join("snapshot.bin");
            let bytes = std::fs::read(&snapshot).unwrap();
            std::fs::write(&snapshot, &bytes[..bytes.len() - 9]).unwrap();
        })
    });
    for series in [
        r#"depfence_state_file_errors_total{file="counter-history.jsonl",kind="corrupt"}"#,
        r#"depfence_state_file_errors_total{file="promotions.jsonl",kind="corrupt"}"#,
        r#"depfence_state_file_errors_total{file="snapshot.bin",kind="corrupt"}"#,
        r#"depfence_evidence_lost_total{service="_all"}"#,
    ] {
        assert_eq!(metrics.get(series), Some(&1), "{series}: {metrics:?}");
    }
    // The history: set aside, its good lines kept, the loss recorded; the file is whole again.
    assert!(state_dir.join("counter-history.jsonl.damaged").exists());
    s.traffic(61, 66, 1, None);
    let error = s.promote("app", at(66)).error.unwrap_or_default();
    let history = state_dir.join("counter-history.jsonl");
    assert!(
        error.contains(&format!(
            "the evidence for app was lost 5s ago (`{}` line 4 column 40: EOF while parsing a value)",
            history.display()
        )),
        "{error}"
    );
    let reloaded = crate::promote::CounterHistory::load(&history).unwrap();
    assert!(reloaded.first_damaged.is_none());
    assert_eq!(reloaded.history.sample_count("app"), 7 + 6, "the readable samples are kept");
    // The promotion log: the damage stays, the next record is whole.
    let demote = Request::Promote {
        service: "web".into(),
        environment: None,
        mode: Mode::Audit,
        force: false,
        reason: None,
        dry_run: false,
    };
    assert!(s.ask(demote, at(66)).ok);
    let log = std::fs::read_to_string(state_dir.join("promotions.jsonl")).unwrap();
    let error = read_log(&state_dir.join("promotions.jsonl")).unwrap_err().to_string();
    assert!(error.contains("promotions.jsonl` line 1 column "), "{error}");
    let last: crate::promote::PromotionRecord = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!((last.service.as_str(), last.to), ("web", Mode::Audit));
    // The published snapshot was replaced by the apply.
    let snapshot = std::fs::read(state_dir.join("snapshot.bin")).unwrap();
    assert!(crate::snapshot::Snapshot::from_bytes(&snapshot).is_ok());

    // The kernel state file is missing, the maps hold the cgroups: rebuilt, reported, lost.
    let (mut s, metrics) = counted(|| {
        s.restart(at(70), |state_dir, _| std::fs::remove_file(state_dir.join("kernel-state.json")).unwrap())
    });
    assert_eq!(metrics.get(r#"depfence_state_file_errors_total{file="kernel-state.json",kind="missing"}"#), Some(&1));
    let error = s.promote("app", at(71)).error.unwrap_or_default();
    assert!(error.contains("kernel-state.json` is missing, but the pinned maps hold 2 cgroup entries"), "{error}");
    // ... or cannot be read.
    let (mut s, metrics) = counted(|| {
        s.restart(at(72), |state_dir, _| {
            let file = state_dir.join("kernel-state.json");
            std::fs::remove_file(&file).unwrap();
            std::fs::create_dir(&file).unwrap();
        })
    });
    assert_eq!(metrics.get(r#"depfence_state_file_errors_total{file="kernel-state.json",kind="read"}"#), Some(&1));
    assert_eq!(s.kernel_state(APP).unwrap().mode, abi::MODE_AUDIT, "enforcement goes on");
    std::fs::remove_dir(state_dir.join("kernel-state.json")).unwrap();
    let error = s.promote("app", at(73)).error.unwrap_or_default();
    assert!(error.contains("the evidence for app was lost 1s ago (cannot read `"), "{error}");
}

/// A lost kernel state file never makes the agent hand out what the kernel still uses: a
/// service keeps the counter slot its registered cgroups count into, whatever order services
/// come back in, and new rulesets get ids no cgroup points at (so a rule the new policy
/// dropped is not left behind in a ruleset that cgroups use).
#[test]
fn a_lost_state_file_never_reuses_what_the_kernel_holds() {
    let mut s = Setup::new(&policy("enforce", r#", { ip = "10.0.0.6", ports = [80] }"#), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Allowed));
    assert_eq!(s.connect(WEB, DB), Some(Verdict::Rejected));
    let web_slot = s.kernel_state(WEB).unwrap().counter_slot;
    let Setup { dir, state } = s;
    let dataplane = state.into_kernel().into_dataplane();
    std::fs::write(dir.path().join("state/kernel-state.json"), "not json").unwrap();
    // The new policy drops the rule for OTHER; only web's cgroup is there at first.
    std::fs::write(dir.path().join("policy.toml"), policy("enforce", "")).unwrap();
    let mut state = Setup::start(dir.path(), dataplane, GateConfig::default(), at(1));
    state.set_found(cgroups(&[(WEB, "web.service")]));
    assert!(state.reload("start", at(1)));
    let mut s = Setup { dir, state };
    assert_eq!(s.kernel_state(WEB).unwrap().counter_slot, web_slot, "web keeps its slot");
    assert_eq!(s.service("web").counts.rejected, 1, "and its counters");
    s.state.set_found(cgroups(&[(APP, "app.service"), (WEB, "web.service")]));
    assert_ne!(s.kernel_state(APP).unwrap().counter_slot, web_slot);
    assert_eq!(s.service("web").counts.rejected, 1, "app's new slot is not web's");
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::Rejected), "the dropped rule is gone");
    assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
}

/// A service whose slot was just zeroed and whose cgroup went away before its first sample
/// keeps its slot: when it comes back, what its slot counted since the zeroing is evidence,
/// not counts of unknown origin.
#[test]
fn a_service_gone_before_its_first_sample_keeps_its_evidence() {
    let gate = GateConfig { window: Duration::from_secs(60), min_connections: 1, min_observed: Duration::from_secs(5) };
    let mut s = Setup::new(&policy("audit", ""), gate);
    assert!(s.state.reload("start", at(0)));
    assert_eq!(s.connect(WEB, DB), Some(Verdict::WouldReject));
    s.state.set_found(cgroups(&[(APP, "app.service")]));
    s.state.sample(at(0));
    s.state.set_found(cgroups(&[(APP, "app.service"), (WEB, "web.service")]));
    for t in 1..=10 {
        s.state.sample(at(t));
    }
    let error = s.promote("web", at(10)).error.unwrap_or_default();
    assert!(error.contains("web had 1 would-rejected connection"), "{error}");
}

/// Rule hits are attributed to the rule that decided them across a reload that renumbers the
/// rules (a new rule sorts before the old one), kept in the status since the agent started, and
/// the usage over a window names exactly the rules and dependencies nothing used.
#[test]
fn rule_hits_follow_their_rule_across_reloads_and_unused_lists_the_rest() {
    let extra = r#", { ip = "10.0.0.7", ports = [443] }"#;
    let mut s = Setup::new(&policy("audit", extra), GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    for _ in 0..3 {
        assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
    }
    s.state.sample(at(1));
    // A new rule that sorts first: db's rule gets another kernel rule id.
    s.write_policy(&policy("audit", &format!(r#", {{ ip = "10.0.0.2", ports = [22] }}{extra}"#)));
    assert!(s.state.reload("edit", at(2)));
    for _ in 0..2 {
        assert_eq!(s.connect(APP, DB), Some(Verdict::Allowed));
    }
    assert_eq!(s.connect(APP, "10.0.0.2:22"), Some(Verdict::Allowed));
    assert_eq!(s.connect(APP, OTHER), Some(Verdict::WouldReject)); // no rule: no hit
    for t in 3..=120 {
        s.state.sample(at(t));
    }
    let app = s.service("app");
    let hits: BTreeMap<String, u64> = app.rules.iter().map(|r| (r.rule.clone(), r.hits)).collect();
    assert_eq!(
        hits,
        BTreeMap::from([
            ("10.0.0.2/32 port 22, any protocol".to_owned(), 1),
            ("10.0.0.5/32 port 5432, tcp (service `db`)".to_owned(), 5),
            ("10.0.0.7/32 port 443, any protocol".to_owned(), 0),
        ])
    );
    let usage = s.ask(Request::Usage { window_secs: 3600 }, at(120));
    assert!(usage.ok, "{usage:?}");
    let usage: crate::usage::Usage = serde_json::from_value(usage.body).unwrap();
    let unused = usage.unused();
    assert_eq!(unused.dependencies, vec![("app".to_owned(), "10.0.0.7/32".to_owned())]);
    assert!(unused.rules.is_empty(), "{unused:?}");
    // Observed for two minutes of the hour (from the first sample, at 1 s): said so.
    assert_eq!(unused.partial, vec![("app".to_owned(), Duration::from_secs(119))]);
    let db = usage.services[0].backends.iter().find(|b| b.backend == "db").unwrap();
    assert_eq!((db.hits, db.rules.len()), (5, 1));
}

/// A delta apply: an edit to one service's rules writes that service's ruleset alone and
/// repoints only its cgroups; the other keeps its ruleset, its state and its generation. A mode
/// change alone keeps the ruleset and rewrites the state. After every step the kernel judges
/// like a fresh agent that applied the same policy in full.
#[test]
fn an_edit_rewrites_only_the_rulesets_and_states_that_change() {
    let two = |app_extra: &str, web_allow: &str, app_mode: &str| {
        format!(
            r#"version = 1
[environments]
prod = "enforce"
[services.db]
endpoints = [{{ ip = "10.0.0.5", ports = [5432], proto = "tcp" }}]
[services.app]
cgroup = "app.service"
mode = {{ prod = "{app_mode}" }}
allow = [{{ service = "db" }}{app_extra}]
[services.web]
cgroup = "web.service"
allow = [{web_allow}]
"#
        )
    };
    let steps = [
        two("", r#"{ ip = "10.0.0.6", ports = [80] }"#, "enforce"),
        two("", r#"{ ip = "10.0.0.6", ports = [80, 443] }"#, "enforce"), // web's rules change
        two("", r#"{ ip = "10.0.0.6", ports = [80, 443] }"#, "audit"),   // app's mode changes
        two(r#", { ip = "10.0.0.7" }"#, r#"{ ip = "10.0.0.6", ports = [80, 443] }"#, "audit"), // app's rules
        two(r#", { ip = "10.0.0.7" }"#, "", "audit"),                    // web allows nothing
    ];
    let mut s = Setup::new(&steps[0], GateConfig::default());
    assert!(s.state.reload("start", at(0)));
    let destinations = ["10.0.0.5:5432", "10.0.0.6:80", "10.0.0.6:443", "10.0.0.7:22", "10.0.0.8:1"];
    for (i, text) in steps.iter().enumerate().skip(1) {
        let (app_before, web_before) = (s.kernel_state(APP).unwrap(), s.kernel_state(WEB).unwrap());
        s.write_policy(text);
        assert!(s.state.reload("edit", at(i as u64)));
        let (app, web) = (s.kernel_state(APP).unwrap(), s.kernel_state(WEB).unwrap());
        let changed = |before: abi::CgroupState, after: abi::CgroupState| {
            (before.ruleset_id != after.ruleset_id, before != after)
        };
        let expected = match i {
            1 => [(false, false), (true, true)],
            2 => [(false, true), (false, false)],
            3 => [(true, true), (false, false)],
            _ => [(false, false), (true, true)],
        };
        assert_eq!([changed(app_before, app), changed(web_before, web)], expected, "step {i}");
        if !expected[0].1 {
            assert_eq!(app.generation, app_before.generation, "step {i}: app keeps its generation");
        }
        // The kernel judges like a fresh agent with the same policy.
        let mut fresh = Setup::new(text, GateConfig::default());
        assert!(fresh.state.reload("start", at(0)));
        for cgroup in [APP, WEB] {
            for d in destinations {
                assert_eq!(s.connect(cgroup, d), fresh.connect(cgroup, d), "step {i}: {cgroup} -> {d}");
            }
        }
    }
    // Only live rulesets have entries left in the kernel (web's allows nothing: it has none).
    let live: std::collections::BTreeSet<u32> =
        [APP, WEB].iter().map(|c| s.kernel_state(*c).unwrap().ruleset_id).collect();
    let in_kernel = super::dataplane::Dataplane::ruleset_ids(s.state.kernel_mut().dataplane_mut());
    assert!(!in_kernel.is_empty() && in_kernel.is_subset(&live), "{in_kernel:?} {live:?}");
}
