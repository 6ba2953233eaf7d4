//! `policyctl` as a user runs it: exit codes, output formats, every command on every example.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking, with the value in the message"
)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn policyctl() -> Command {
    Command::cargo_bin("policyctl").unwrap()
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples")
}

/// Every example policy: top-level `*.toml` files and directories (one policy each), with a flag
/// for the intentionally broken ones.
fn examples() -> Vec<(PathBuf, bool)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "broken" {
            for broken in std::fs::read_dir(&path).unwrap() {
                found.push((broken.unwrap().path(), true));
            }
        } else if path.is_dir() || path.extension().is_some_and(|e| e == "toml") {
            found.push((path, false));
        }
    }
    found.sort();
    assert!(found.len() >= 5, "expected the example corpus, found {found:?}");
    found
}

fn write_policy(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

const POLICY: &str = r#"
version = 1

[environments]
qa = { mode = "enforce" }
prod = { mode = "audit" }

[model]
layers = ["storage", "app"]

[services.db]
layer = "storage"
endpoints = [{ ip = "10.0.5.10", ports = [5432], proto = "tcp" }]

[services.api]
layer = "app"
cgroup = "system.slice/api.service"
allow = [
  { service = "db" },
  { cidr = "192.0.2.0/24", ports = "8000-8100" },
]
"#;

#[test]
fn check_reports_valid_policy_and_exit_zero() {
    let policy = write_policy(POLICY);
    let out = policyctl().args(["check", "-p"]).arg(policy.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("ok: 2 services, 1 dependencies, 2 address rules, 2 environments; sha256 "), "{stdout}");
}

#[test]
fn invalid_policy_exits_one_with_located_diagnostics() {
    let policy = write_policy(&POLICY.replace("{ service = \"db\" }", "{ service = \"dbb\" }"));
    let out = policyctl().args(["--error-format", "plain", "check", "-p"]).arg(policy.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let expected =
        format!("{}:19:15: error[depfence::unknown_reference]: unknown service `dbb`", policy.path().display());
    assert!(stderr.contains(&expected), "{stderr}");

    // The human format shows the source line and a caret under the name, and the help.
    let out = policyctl().args(["check", "-p"]).arg(policy.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(":19:15]"), "{stderr}");
    assert!(stderr.contains(r#"  { service = "dbb" },"#), "{stderr}");
    assert!(stderr.contains("did you mean `db`?"), "{stderr}");
    assert!(stderr.contains("policy is invalid: 1 error, 0 warnings"), "{stderr}");
}

#[test]
fn json_error_format_is_one_document() {
    let policy = write_policy(&POLICY.replace("version = 1", "version = 1\nbogus = 3"));
    let out = policyctl().args(["--error-format", "json", "check", "-p"]).arg(policy.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["errors"], 1);
    let d = &doc["diagnostics"][0];
    assert_eq!(d["code"], "depfence::unknown_key");
    assert_eq!(d["position"]["line"], 3);
    assert_eq!(d["position"]["column"], 1);
    assert_eq!(d["labels"][0]["snippet"], "bogus");
}

#[test]
fn usage_errors_exit_two() {
    let out = policyctl().args(["check", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = policyctl().args(["check", "-p", "/nonexistent/policy.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read `/nonexistent/policy.toml`"));
    let policy = write_policy(POLICY);
    let out = policyctl()
        .args(["explain", "--from", "api", "--to", "10.0.5.10"])
        .arg("-p")
        .arg(policy.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected ADDR:PORT[/PROTO]"));
}

#[test]
fn deny_warnings_turns_warnings_into_failure() {
    let text = POLICY.replace("[services.api]", "[services.cache]\n\n[services.api]");
    let policy = write_policy(&text);
    // `cache` has no layer: a warning.
    policyctl().args(["check", "-p"]).arg(policy.path()).assert().code(0);
    policyctl().args(["check", "--deny-warnings", "-p"]).arg(policy.path()).assert().code(1);
}

#[test]
fn explain_names_the_deciding_rule_and_verdict_per_environment() {
    let policy = write_policy(POLICY);
    let out = policyctl()
        .args(["explain", "--from", "api", "--to", "10.0.5.10:5432"])
        .arg("-p")
        .arg(policy.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("api -> 10.0.5.10:5432/tcp (an endpoint of `db`)"), "{stdout}");
    assert!(stdout.contains("allowed by 10.0.5.10/32 port 5432, tcp (service `db`)"), "{stdout}");
    assert!(stdout.contains(&format!("written at {}:19:3", policy.path().display())), "{stdout}");

    let out = policyctl()
        .args(["explain", "--from", "api", "--to", "10.0.5.10:22", "--output", "json"])
        .arg("-p")
        .arg(policy.path())
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Both environments have the same rules: one judgement, with a verdict in each.
    assert_eq!(doc["judgements"].as_array().unwrap().len(), 1, "{doc}");
    let judgement = &doc["judgements"][0];
    assert!(judgement["rule"].is_null());
    assert_eq!(judgement["near_misses"].as_array().unwrap().len(), 1);
    let verdicts: Vec<(String, String)> = judgement["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["environment"].as_str().unwrap().to_owned(), v["verdict"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(verdicts, [("prod".into(), "would_reject".into()), ("qa".into(), "rejected".into())]);
}

#[test]
fn compile_writes_a_verified_snapshot() {
    let policy = write_policy(POLICY);
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("policy.snap");
    policyctl().args(["compile", "-o"]).arg(&out_file).arg("-p").arg(policy.path()).assert().code(0);
    let snapshot = depfence::snapshot::Snapshot::from_bytes(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(snapshot.services().len(), 2);
    assert_eq!(snapshot.net_rule_count(0), 2);
}

#[test]
fn every_command_works_on_every_example() {
    for (path, broken) in examples() {
        let check = policyctl().args(["check", "-p"]).arg(&path).output().unwrap();
        assert_eq!(check.status.code(), Some(if broken { 1 } else { 0 }), "check {}", path.display());

        let environments = depfence::compile::check_path(&path).unwrap().analysis.unwrap().environments;
        for (format, env) in
            ["dot", "mermaid", "json"].into_iter().flat_map(|f| environments.iter().map(move |e| (f, e)))
        {
            let out = policyctl().args(["graph", "--format", format, "-e", env, "-p"]).arg(&path).output().unwrap();
            assert_eq!(out.status.code(), Some(0), "graph {format} {}", path.display());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(&format!("judged: environment {env}")), "{stderr}");
            let text = String::from_utf8(out.stdout).unwrap();
            if broken {
                // Violations are drawn in red (dot, mermaid) or listed (json).
                let highlighted = match format {
                    "dot" => text.contains("color=red"),
                    "mermaid" => text.contains("stroke:red"),
                    _ => serde_json::from_str::<serde_json::Value>(&text).unwrap()["violations"]
                        .as_array()
                        .is_some_and(|v| !v.is_empty()),
                };
                assert!(highlighted, "graph {format} of {} highlights nothing:\n{text}", path.display());
            }
        }

        for env in &environments {
            let order =
                policyctl().args(["bootstrap-order", "--output", "json", "-e", env, "-p"]).arg(&path).output().unwrap();
            assert_eq!(order.status.code(), Some(if broken { 1 } else { 0 }), "bootstrap-order {}", path.display());
            if !broken {
                let stages: serde_json::Value = serde_json::from_slice(&order.stdout).unwrap();
                assert!(!stages.as_array().unwrap().is_empty());
            }
        }
        if !broken {
            // Explain a connection from the first service to its first rule's address.
            let snapshot_file = tempfile::NamedTempFile::new().unwrap();
            policyctl().args(["compile", "-o"]).arg(snapshot_file.path()).arg("-p").arg(&path).assert().code(0);
            let snapshot =
                depfence::snapshot::Snapshot::from_bytes(&std::fs::read(snapshot_file.path()).unwrap()).unwrap();
            let (service, rule) = snapshot
                .services()
                .iter()
                .find_map(|s| s.rules(0).net_rules.first().map(|r| (s, r)))
                .expect("every example has a service with an address rule");
            let addr = rule.net.network();
            let port = if rule.ports.is_any() { 443 } else { rule.ports.first };
            let proto = if rule.proto == depfence::policy::Proto::Udp { "udp" } else { "tcp" };
            let to = match addr {
                std::net::IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
                std::net::IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
            };
            let out = policyctl()
                .args(["explain", "--output", "json", "--from", &service.name, "--to", &to, "-p"])
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "explain {} {to}", path.display());
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let environment = &snapshot.environments()[0].name;
            let judgement = doc["judgements"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["verdicts"].as_array().unwrap().iter().any(|v| v["environment"] == *environment))
                .unwrap();
            assert!(judgement["rule"]["position"].as_str().unwrap().contains(".toml:"), "{doc}");
        }
    }
}

#[test]
fn completions_are_generated() {
    let out = policyctl().args(["completions", "bash"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("bootstrap-order") && text.contains("complete -F"), "{text}");
}

fn rpc_guard_example() -> PathBuf {
    examples_dir().join("rpc-guard.toml")
}

/// `policyctl ARGS -p POLICY`, run to the end.
fn run_on(args: &[&str], policy: &Path) -> std::process::Output {
    policyctl().args(args).arg("-p").arg(policy).output().unwrap()
}

#[test]
fn check_and_compile_count_rpc_rules() {
    let path = rpc_guard_example();
    let out = run_on(&["check"], &path);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with(
            "ok: 3 services, 2 dependencies, 1 address rules, 3 rpc rules (1 service), 2 environments; sha256 "
        ),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("guard.snap");
    let out = policyctl().args(["compile", "-o"]).arg(&out_file).arg("-p").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let expected = format!("compiled 3 services, 1 address rules, 3 rpc rules (1 service) into {}", out_file.display());
    assert!(stderr.starts_with(&expected), "{stderr}");
    let snapshot = depfence::snapshot::Snapshot::from_bytes(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(snapshot.rpc_rule_count(), 3);

    // A policy without `rpc_allow` keeps the summaries it always had.
    let policy = write_policy(POLICY);
    let out = policyctl().args(["compile", "-o"]).arg(&out_file).arg("-p").arg(policy.path()).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("compiled 2 services, 2 address rules into "), "{stderr}");
}

#[test]
fn explain_lists_rpc_allow_per_backend_with_positions() {
    let path = rpc_guard_example();
    let out = run_on(&["explain", "--from", "checkout", "--to", "127.0.0.1:50051"], &path);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let file = path.display();
    let expected = format!(
        "  rpc_allow of `checkout` (the in-process guard judges each call by these):
    `billing` (this destination):
      /billing.Billing/Charge at {file}:34:34
      /billing.Billing/GetInvoice at {file}:34:61
    `catalog`:
      /catalog.Catalog/* at {file}:36:34
"
    );
    assert!(stdout.ends_with(&expected), "{stdout}");

    let out = run_on(&["explain", "--output", "json", "--from", "checkout", "--to", "127.0.0.1:50051"], &path);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let groups = doc["rpc_allow"].as_array().unwrap();
    let summary: Vec<(String, bool, Vec<String>)> = groups
        .iter()
        .map(|g| {
            let patterns = g["patterns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| format!("{} {}", p["rpc"].as_str().unwrap(), p["position"].as_str().unwrap()))
                .collect();
            (g["backend"].as_str().unwrap().to_owned(), g["destination"].as_bool().unwrap(), patterns)
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "billing".to_owned(),
                true,
                vec![
                    format!("/billing.Billing/Charge {file}:34:34"),
                    format!("/billing.Billing/GetInvoice {file}:34:61")
                ]
            ),
            ("catalog".to_owned(), false, vec![format!("/catalog.Catalog/* {file}:36:34")]),
        ]
    );

    // A service without `rpc_allow` does not use the guard: nothing about rpcs.
    let out = run_on(&["explain", "--output", "json", "--from", "billing", "--to", "127.0.0.1:50051"], &path);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["rpc_allow"], serde_json::json!([]));
}

#[test]
fn explain_says_when_the_destination_has_no_rpc_allow() {
    let policy = write_policy(
        r#"version = 1
[services.billing]
endpoints = [{ ip = "10.0.0.5", ports = [50051] }]
[services.ledger]
endpoints = [{ ip = "10.0.0.6", ports = [7000] }]
[services.checkout]
allow = [{ service = "billing" }, { service = "ledger" }]
rpc_allow = [{ service = "billing", rpcs = ["/billing.Billing/*"] }]
"#,
    );
    let out = policyctl()
        .args(["explain", "--from", "checkout", "--to", "10.0.0.6:7000", "-p"])
        .arg(policy.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let expected = format!(
        "    `ledger` (this destination): none (no rpc to it is allowed)\n    `billing`:\n      /billing.Billing/* at {}:8:45\n",
        policy.path().display()
    );
    assert!(stdout.contains("  default (audit): allowed\n  rpc_allow of `checkout`"), "{stdout}");
    assert!(stdout.ends_with(&expected), "{stdout}");

    // The plain example policy: no rpc lines at all.
    let policy = write_policy(POLICY);
    let out = policyctl()
        .args(["explain", "--from", "api", "--to", "10.0.5.10:5432", "-p"])
        .arg(policy.path())
        .output()
        .unwrap();
    assert!(!String::from_utf8(out.stdout).unwrap().contains("rpc_allow"));
}

/// Every policy command says which environment it judged; `graph` and `bootstrap-order` need
/// `--environment` when the environments' graphs differ; `check -e` judges one environment.
#[test]
fn commands_judge_an_environment_and_say_which() {
    let example = examples_dir().join("environments.toml");
    let out = policyctl().arg("check").arg(&example).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("judged: environments prod, qa"), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("dependencies prod 4, qa 5, address rules prod 5, qa 7, 2 environments"),
        "{out:?}"
    );

    let out = policyctl().args(["graph", "--format", "json"]).arg(&example).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("graphs differ (prod | qa); choose one with --environment"));
    let edges = |env: &str| {
        let out = policyctl().args(["graph", "--format", "json", "-e", env]).arg(&example).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("judged: environment {env}")));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["environments"], serde_json::json!([env]));
        doc["edges"].as_array().unwrap().iter().map(|e| format!("{} -> {}", e["from"], e["to"])).collect::<Vec<_>>()
    };
    let dashboards = "\"qa-dashboards\" -> \"orders-db\"".to_owned();
    assert!(!edges("prod").contains(&dashboards) && edges("qa").contains(&dashboards));
    let out = policyctl().args(["bootstrap-order", "-e", "prod"]).arg(&example).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = policyctl().args(["bootstrap-order", "-e", "staging"]).arg(&example).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown environment `staging` (the policy has: prod, qa)"));

    // A problem in qa only: `check -e prod` passes and says qa has errors, `check -e qa` fails.
    let text = std::fs::read_to_string(&example)
        .unwrap()
        .replace(", cross_environment = \"prod\", reason = \"read-only comparison with production data\"", "")
        .replace("{ service = \"orders-db\", env = \"qa\" },\n", "{ cidr = \"10.1.3.0/24\", env = \"qa\" },\n");
    let policy = write_policy(&text);
    let out = policyctl().args(["check", "-e", "prod"]).arg(policy.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("judged: environment prod") && stderr.contains("error(s) in other environments"),
        "{stderr}"
    );
    let out = policyctl().args(["check", "-e", "qa", "--error-format", "plain"]).arg(policy.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error[depfence::cross_environment]: in environment `qa`, `qa-dashboards` may reach `orders-db`'s endpoint in environment `prod` (10.1.3.0/24)"), "{stderr}");

    // explain without -e: a block per environment when they judge differently.
    let out =
        policyctl().args(["explain", "--from", "orders-api", "--to", "10.9.3.20:5432"]).arg(&example).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("  in prod:\n    no rule of `orders-api` allows it"), "{stdout}");
    assert!(
        stdout.contains("  in qa (an endpoint of `orders-db`):\n    allowed by 10.9.3.20/32 port 5432"),
        "{stdout}"
    );
}

/// `diff` on every example against itself: nothing changes, exit 0.
#[test]
fn diff_of_an_example_with_itself_is_empty() {
    for (path, broken) in examples() {
        let out = policyctl().args(["diff", "--output", "json"]).arg(&path).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(if broken { 1 } else { 0 }), "{} {out:?}", path.display());
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for env in doc["environments"].as_array().unwrap() {
            for key in ["modes", "rules", "verdicts", "edges_added", "edges_removed", "problems_new", "problems_fixed"]
            {
                assert_eq!(env[key], serde_json::json!([]), "{} {key}: {env}", path.display());
            }
        }
    }
}

/// A change that closes a cycle: the new problem, the new edge and the verdict that changes, in
/// Markdown for a pull request; the reverse change lists the problem as fixed.
#[test]
fn diff_shows_what_a_change_does_for_a_reviewer() {
    let old_text = std::fs::read_to_string(examples_dir().join("quickstart.toml")).unwrap();
    let cycle = old_text.replace(
        "mode = { prod = \"enforce\" }",
        "mode = { prod = \"enforce\" }\nallow = [{ service = \"storefront\" }]",
    );
    let (old, new) = (write_policy(&old_text), write_policy(&cycle));
    let out = policyctl().args(["diff", "--output", "markdown"]).arg(old.path()).arg(new.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "the new policy is invalid: {out:?}");
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(md.contains("**This change alters what is enforced.**"), "{md}");
    assert!(md.contains("**The new policy is invalid** (see its new problems)"), "{md}");
    assert!(md.contains("#### Environment `prod`: changes what is enforced"), "{md}");
    assert!(md.contains("**Dependencies added**\n\n- `orders-db` -> `storefront`\n"), "{md}");
    assert!(
        md.contains("**Verdicts that change**\n\n- `orders-db` -> 10.0.1.10:443/tcp: rejected -> allowed\n"),
        "{md}"
    );
    assert!(md.contains("**New problems**\n\n- error[depfence::cycle]: dependency cycle `"), "{md}");
    // The other way round, the cycle is fixed.
    let out = policyctl().args(["diff"]).arg(new.path()).arg(old.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("  problems fixed:\n    error[depfence::cycle]"), "{text}");
    assert!(text.contains("  dependencies removed:\n    `orders-db` -> `storefront`"), "{text}");

    // Widening orders-api: enforced in qa, audited in prod; exit 10.
    let wider = old_text.replace(
        "allow = [{ service = \"orders-db\" }]",
        "allow = [{ service = \"orders-db\" }, { cidr = \"10.0.9.0/24\", ports = [443], proto = \"tcp\" }]",
    );
    let wider = write_policy(&wider);
    let out = policyctl().args(["diff", "--output", "json"]).arg(old.path()).arg(wider.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let env =
        |name: &str| doc["environments"].as_array().unwrap().iter().find(|e| e["environment"] == name).unwrap().clone();
    let (prod, qa) = (env("prod"), env("qa"));
    assert_eq!((prod["enforcement_changes"].as_bool(), qa["enforcement_changes"].as_bool()), (Some(false), Some(true)));
    assert_eq!(
        qa["verdicts"],
        serde_json::json!([{ "service": "orders-api", "connection": "10.0.9.0:443/tcp", "from": "rejected", "to": "allowed" }])
    );
    assert_eq!(prod["verdicts"][0]["from"], "would_reject");
    assert!(qa["rules"][0]["added"][0].as_str().unwrap().starts_with("10.0.9.0/24 port 443, tcp at "), "{qa}");

    // A change only where services audit: exit 0.
    let audit_only = old_text.replace(
        "  { cidr = \"198.51.100.0/24\", ports = [443], proto = \"tcp\", reason = \"payment provider\" },",
        "  { cidr = \"198.51.100.0/24\", ports = [443], proto = \"tcp\", reason = \"payment provider\" },\n  { cidr = \"203.0.113.0/24\", ports = [443], env = \"prod\" },",
    );
    let audit_only = write_policy(&audit_only);
    let out = policyctl().args(["diff"]).arg(old.path()).arg(audit_only.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("environment prod: changes, none where a service enforces"), "{text}");
    assert!(text.contains("environment qa: no change"), "{text}");
}
