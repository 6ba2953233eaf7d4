//! `policyctl check-deploy` and `policyctl deploy-order` as a CD system runs them: the real
//! binary on a policy with `requires` and a deployed-versions manifest.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking, with the value in the message"
)]

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

const POLICY: &str = r#"version = 1

[environments]
prod = "audit"

[services.ledger]
endpoints = [{ ip = "10.0.1.10", ports = [5432] }]
allow = [{ service = "payments", critical = false }]
requires = [{ service = "payments", version = ">=3", when = ">=2" }]

[services.payments]
endpoints = [{ ip = "10.0.2.10", ports = [8443] }]
allow = [{ service = "ledger" }]
requires = [{ service = "ledger", version = ">=2", when = ">=3" }]

[services.checkout]
endpoints = [{ ip = "10.0.3.10", ports = [443] }]
allow = [{ service = "payments" }]
requires = [
  { service = "payments", version = ">=2.14", when = ">=3.1", reason = "3.1 calls the refunds API" },
]
"#;

/// A temporary directory with `policy.toml` and the manifest `prod.toml`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(policy: &str, manifest: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
        std::fs::write(dir.path().join("prod.toml"), manifest).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, command: &str, args: &[&str]) -> Output {
        Command::cargo_bin("policyctl")
            .unwrap()
            .current_dir(self.dir.path())
            .args([command, "policy.toml", "--deployed", "prod.toml", "-e", "prod"])
            .args(args)
            .output()
            .unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

const BEFORE: &str = "[services.payments]\nversions = \"2.13.1\"\n[services.checkout]\nversions = \"3.0.2\"\n";

#[test]
fn a_safe_upgrade_passes() {
    let f = Fixture::new(POLICY, BEFORE);
    let out = f.run("check-deploy", &["--set", "payments=2.14.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "safe: environment prod: payments 2.13.1 -> 2.14.0; during the rollout: ok, after the rollout: ok\n"
    );
    let out = f.run("check-deploy", &["--set", "payments=2.14.0", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["ok"], true);
}

#[test]
fn a_consumer_upgrade_before_its_target_fails_at_the_requirement() {
    let f = Fixture::new(POLICY, BEFORE);
    let out = f.run("check-deploy", &["--set", "checkout=3.1.0"]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    // The `requires` entry of checkout is on line 20, column 3.
    assert!(stderr.contains("policy.toml:20:3"), "{stderr}");
    assert!(stderr.contains("`checkout` 3.1.0 requires `payments` >=2.14, but `payments` 2.13.1 runs"), "{stderr}");
    assert!(stderr.contains("help: deploy `payments` >=2.14 before `checkout` 3.1.0"), "{stderr}");
    assert!(
        text(&out.stdout).starts_with("unsafe: environment prod: checkout 3.0.2 -> 3.1.0"),
        "{}",
        text(&out.stdout)
    );

    let out = f.run("check-deploy", &["--set", "checkout=3.1.0", "-o", "json"]);
    assert_eq!(out.status.code(), Some(12));
    let doc = json(&out);
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["environment"], "prod");
    assert_eq!(doc["states"][0]["state"], "during");
    assert_eq!(doc["states"][1]["state"], "after");
    let v = &doc["violations"][0];
    assert_eq!(v["consumer"], "checkout");
    assert_eq!(v["consumer_versions"], serde_json::json!(["3.1.0"]));
    assert_eq!(v["target"], "payments");
    assert_eq!(v["target_versions"], serde_json::json!(["2.13.1"]));
    assert_eq!(v["requirement"], ">=2.14");
    assert_eq!(v["when"], ">=3.1");
    assert_eq!(v["reason"], "3.1 calls the refunds API");
    assert_eq!((v["line"].as_u64(), v["column"].as_u64()), (Some(20), Some(3)));
    assert!(v["file"].as_str().unwrap().ends_with("policy.toml"));
    assert_eq!(v["help"], "deploy `payments` >=2.14 before `checkout` 3.1.0");
}

#[test]
fn a_target_downgrade_fails() {
    let f =
        Fixture::new(POLICY, "[services.payments]\nversions = \"2.14.0\"\n[services.checkout]\nversions = \"3.1.0\"\n");
    let out = f.run("check-deploy", &["--set", "payments=2.13.1"]);
    assert_eq!(out.status.code(), Some(12));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("help: roll back `checkout` below 3.1 first, then deploy `payments` 2.13.1"), "{stderr}");
}

#[test]
fn mid_rollout_fails_until_the_old_target_is_gone() {
    let during = "[services.payments]\nversions = [\"2.14.0\", \"2.13.1\"]\n[services.checkout]\nversions = [\"3.0.2\", \"3.1.0\"]\n";
    let f = Fixture::new(POLICY, during);
    let out = f.run("check-deploy", &["-o", "json"]);
    assert_eq!(out.status.code(), Some(12));
    let doc = json(&out);
    assert_eq!(doc["states"][0]["state"], "now");
    assert_eq!(doc["violations"][0]["consumer_versions"], serde_json::json!(["3.1.0"]));
    assert_eq!(doc["violations"][0]["unsatisfying_versions"], serde_json::json!(["2.13.1"]));

    let after =
        "[services.payments]\nversions = [\"2.14.0\"]\n[services.checkout]\nversions = [\"3.0.2\", \"3.1.0\"]\n";
    let f = Fixture::new(POLICY, after);
    assert_eq!(f.run("check-deploy", &[]).status.code(), Some(0));
}

#[test]
fn pre_releases_compare_conservatively() {
    // A canary of checkout 3.1 needs what 3.1 needs.
    let f = Fixture::new(POLICY, BEFORE);
    assert_eq!(f.run("check-deploy", &["--set", "checkout=3.1.0-canary.1"]).status.code(), Some(12));
    // A release candidate of payments 2.14 does not satisfy `>=2.14`.
    let f = Fixture::new(
        POLICY,
        "[services.payments]\nversions = \"2.14.0-rc.1\"\n[services.checkout]\nversions = \"3.0.2\"\n",
    );
    assert_eq!(f.run("check-deploy", &["--set", "checkout=3.1.0"]).status.code(), Some(12));
    let f =
        Fixture::new(POLICY, "[services.payments]\nversions = \"2.14.0\"\n[services.checkout]\nversions = \"3.0.2\"\n");
    assert_eq!(f.run("check-deploy", &["--set", "checkout=3.1.0-canary.1"]).status.code(), Some(0));
}

fn check(policy: &str) -> (Option<i32>, String) {
    let f = Fixture::new(policy, BEFORE);
    let out = Command::cargo_bin("policyctl")
        .unwrap()
        .current_dir(f.path(""))
        .args(["--error-format", "plain", "check", "policy.toml"])
        .output()
        .unwrap();
    (out.status.code(), text(&out.stderr))
}

#[test]
fn policy_problems_with_requires_are_located() {
    let bare = POLICY.replace("version = \">=2.14\"", "version = \"2.14\"");
    let (code, stderr) = check(&bare);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("policy.toml:20:37: error[depfence::bare_version_requirement]"), "{stderr}");

    let unknown = POLICY
        .replace("{ service = \"payments\", version = \">=2.14\"", "{ service = \"paymnts\", version = \">=2.14\"");
    let (code, stderr) = check(&unknown);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("policy.toml:20:15: error[depfence::unknown_reference]: unknown service `paymnts`"),
        "{stderr}"
    );
    let out = Command::cargo_bin("policyctl").unwrap().arg("check").arg(write(&unknown).path()).output().unwrap();
    assert!(text(&out.stderr).contains("help: did you mean `payments`?"), "{}", text(&out.stderr));

    let unreached = POLICY.replace("allow = [{ service = \"payments\" }]\nrequires", "requires");
    let (code, stderr) = check(&unreached);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("policy.toml:19:15: warning[depfence::requirement_without_allow]: `checkout` requires versions of `payments` but no allow rule of `checkout` reaches it"),
        "{stderr}"
    );
}

fn write(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn manifest_problems_are_located() {
    let f =
        Fixture::new(POLICY, "[services.payments]\nversions = [\"2.14\"]\n[services.chekout]\nversions = \"3.0.2\"\n");
    let out = f.run("check-deploy", &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("prod.toml:2:13") && stderr.contains("invalid version `2.14`"), "{stderr}");
    let f = Fixture::new(
        POLICY,
        "[services.payments]\nversions = [\"2.14.0\"]\n[services.chekout]\nversions = \"3.0.2\"\n",
    );
    let out = f.run("check-deploy", &[]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown service `chekout`") && stderr.contains("did you mean `checkout`?"), "{stderr}");
    // Bad input outside the files is a usage error.
    assert_eq!(f.run("check-deploy", &["--set", "checkout"]).status.code(), Some(2));
    assert_eq!(f.run("check-deploy", &["--set", "chekout=3.1.0"]).status.code(), Some(2));
    let missing = Command::cargo_bin("policyctl")
        .unwrap()
        .current_dir(f.path(""))
        .args(["check-deploy", "policy.toml", "--deployed", "nowhere.toml", "-e", "prod"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn deploy_order_upgrades_targets_first_and_rolls_back_consumers_first() {
    let f = Fixture::new(POLICY, BEFORE);
    let out = f.run("deploy-order", &["--set", "checkout=3.1.0", "--set", "payments=2.14.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "deploy order (environment prod):\n  1. payments 2.13.1 -> 2.14.0\n  2. checkout 3.0.2 -> 3.1.0\n"
    );
    let f =
        Fixture::new(POLICY, "[services.payments]\nversions = \"2.14.0\"\n[services.checkout]\nversions = \"3.1.0\"\n");
    let out = f.run("deploy-order", &["--set", "checkout=3.0.2", "--set", "payments=2.13.1", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc = json(&out);
    let steps: Vec<&str> = doc["steps"].as_array().unwrap().iter().map(|s| s["service"].as_str().unwrap()).collect();
    assert_eq!(steps, ["checkout", "payments"]);
}

#[test]
fn deploy_order_reports_an_impossible_order() {
    let f =
        Fixture::new(POLICY, "[services.payments]\nversions = \"2.14.0\"\n[services.ledger]\nversions = \"1.0.0\"\n");
    let out = f.run("deploy-order", &["--set", "payments=3.0.0", "--set", "ledger=2.0.0"]);
    assert_eq!(out.status.code(), Some(12));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("depfence::no_deploy_order"), "{stderr}");
    assert!(stderr.contains("`payments` before `ledger`") && stderr.contains("`ledger` before `payments`"), "{stderr}");
    let out = f.run("deploy-order", &["--set", "payments=3.0.0", "--set", "ledger=2.0.0", "-o", "json"]);
    assert_eq!(json(&out)["error"], "conflict");
}

#[test]
fn the_example_manifest_fits_the_example_policy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::cargo_bin("policyctl")
        .unwrap()
        .current_dir(&root)
        .args([
            "check-deploy",
            "policy-examples/versions.toml",
            "--deployed",
            "deploy/examples/prod.toml",
            "-e",
            "prod",
        ])
        .args(["--set", "payments=2.14.0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
