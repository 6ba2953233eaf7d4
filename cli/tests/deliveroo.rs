//! The Deliveroo Kafka-sidecar incident, asked of depfence's export: which services run a
//! sidecar older than 0.3.0, who owns them, how critical they are and who depends on them, in
//! ONE SQL query (`docs/queries/affected-by-sidecar.sql`, the text the docs show) over
//! `policyctl export --sqlite --deployed prod=MANIFEST` of the example platform
//! (`policy-examples/food-delivery.toml`, `deploy/examples/food-delivery-prod.toml`). Run through
//! rusqlite and the `sqlite3` shell; the dependents it lists agree with `policyctl dependents`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking, with the value in the message"
)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use rusqlite::Connection;

mod support;
use support::rows;

/// The query, exactly as docs/export-schema.md and the README show it.
const AFFECTED_BY_SIDECAR: &str = include_str!("../../docs/queries/affected-by-sidecar.sql");

/// What the query answers for the example platform: tier order, then name; `restaurants` runs
/// 0.10.0 and is not affected, `payments` runs 0.3.0.
const EXPECTED: &[&str] = &[
    "orders|0.2.1|orders|1|consumer-web (web, tier 1), rider-dispatch (logistics, tier 1), \
     notifications (comms, tier 2), analytics (data, tier 3)",
    "grocery|0.1.0|grocery|2|consumer-web (web, tier 1), menu-search (discovery, tier 3)",
];

fn policyctl() -> Command {
    Command::cargo_bin("policyctl").unwrap()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn policy() -> PathBuf {
    repo("policy-examples/food-delivery.toml")
}

/// The export of the example platform with the prod manifest, in a fresh directory.
fn exported() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("platform.db");
    let manifest = repo("deploy/examples/food-delivery-prod.toml");
    let out = policyctl()
        .arg("export")
        .arg("--sqlite")
        .arg(&db)
        .arg(policy())
        .arg(format!("--deployed=prod={}", manifest.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "wrote {}: 9 services, 20 graph edges, 20 rules, 4 requirements, 14 deployed versions, 0 observed \
             destinations in 2 environment(s)\n",
            db.display()
        )
    );
    (dir, db)
}

#[test]
fn one_query_names_the_affected_services_their_owners_tiers_and_dependents() {
    let (_dir, db_path) = exported();
    let db = Connection::open(&db_path).unwrap();
    assert_eq!(rows(&db, AFFECTED_BY_SIDECAR), EXPECTED);

    // The contrast the integer columns avoid: as text, 0.10.0 sorts below '0.3', so the
    // case study's lexicographic query would wrongly call `restaurants` affected.
    assert_eq!(
        rows(
            &db,
            "SELECT service, version FROM deployed_versions \
             WHERE component = 'kafka-sidecar' AND version < '0.3' ORDER BY service"
        ),
        vec!["grocery|0.1.0", "orders|0.2.1", "restaurants|0.10.0"]
    );
    assert_eq!(
        rows(
            &db,
            "SELECT service, version FROM deployed_versions \
             WHERE component = 'kafka-sidecar' AND (major, minor, patch) < (0, 3, 0) ORDER BY service"
        ),
        vec!["grocery|0.1.0", "orders|0.2.1"]
    );
    // The service's own versions are there too (component ''), and the requirements hold in
    // SQL: every prod requirement with a simple lower bound is met by what runs.
    assert_eq!(
        rows(
            &db,
            "SELECT version FROM deployed_versions WHERE service = 'rider-dispatch' ORDER BY major, minor, patch"
        ),
        vec!["3.0.1", "3.1.0"]
    );
    assert_eq!(
        rows(
            &db,
            "SELECT r.consumer, r.target, r.version, coalesce(r.applies_when, '-'), d.version, \
             (d.major, d.minor, d.patch) >= (r.min_major, r.min_minor, r.min_patch) \
             FROM requirements r JOIN deployed_versions d \
               ON d.environment = r.environment AND d.service = r.target AND d.component = '' \
             WHERE r.environment = 'prod' ORDER BY r.consumer"
        ),
        vec!["orders|payments|>=2.4|-|2.5.0|1", "rider-dispatch|orders|>=5.0|>=3|5.1.2|1"]
    );
}

#[test]
fn the_query_through_the_sqlite3_shell() {
    // Under CI a missing shell is a failure, not a skip.
    let Some(sqlite3) = depfence_integration::require_tool("the_query_through_the_sqlite3_shell", "sqlite3", "sqlite3")
    else {
        return;
    };
    let (_dir, db_path) = exported();
    // As the README runs it: `sqlite3 FILE < docs/queries/affected-by-sidecar.sql`.
    let mut shell = std::process::Command::new(sqlite3)
        .arg(&db_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut shell.stdin.take().unwrap(), AFFECTED_BY_SIDECAR.as_bytes()).unwrap();
    let out = shell.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(lines, EXPECTED);
}

/// The names `dependents SERVICE --transitive -e prod -o json` lists, in its order.
fn dependents_per_cli(service: &str) -> Vec<String> {
    let out = policyctl()
        .args(["dependents", service, "--transitive", "-e", "prod", "-o", "json"])
        .arg(policy())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["dependents"].as_array().unwrap().iter().map(|d| d["service"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn the_dependents_the_query_lists_are_those_of_policyctl_dependents() {
    let (_dir, db_path) = exported();
    let db = Connection::open(&db_path).unwrap();
    for row in rows(&db, AFFECTED_BY_SIDECAR) {
        let fields: Vec<&str> = row.split('|').collect();
        let in_sql: Vec<String> = fields[4].split("), ").map(|d| d.split_once(" (").unwrap().0.to_owned()).collect();
        assert_eq!(in_sql, dependents_per_cli(fields[0]), "dependents of `{}`", fields[0]);
    }
    assert_eq!(dependents_per_cli("orders"), ["consumer-web", "rider-dispatch", "notifications", "analytics"]);
}

/// An agent's control socket that answers `status`, `observed` and `usage` as an agent in prod
/// would, without root: a thread serving three connections.
fn fake_agent(dir: &Path, usage: depfence::usage::Usage) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead as _, Write as _};

    use depfence::agent::control::Request;
    use depfence::control_protocol::Response;

    let socket = dir.join("control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let mut asked = Vec::new();
        for _ in 0..3 {
            let (stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            std::io::BufReader::new(&stream).read_until(b'\n', &mut line).unwrap();
            let request = Request::from_line(&line).unwrap();
            let body = match &request {
                Request::Status => serde_json::json!({
                    "ready": true, "environment": "prod", "policy": "/etc/depfence/policy", "generation": 1,
                    "policy_hash": null, "last_reload": null, "candidate": null, "services": [],
                    "services_without_cgroups": 0, "events_dropped": 0
                }),
                Request::Observed { .. } => serde_json::json!([]),
                Request::Usage { window_secs } => {
                    assert_eq!(*window_secs, 3600);
                    serde_json::to_value(&usage).unwrap()
                }
                other => panic!("unexpected request {other:?}"),
            };
            asked.push(format!("{request:?}"));
            (&stream).write_all(&Response::ok(body).to_line().unwrap()).unwrap();
        }
        asked
    });
    (socket, server)
}

#[test]
fn with_an_agent_the_used_dependencies_are_allowed_observed_edges() {
    use std::time::{Duration, UNIX_EPOCH};

    let compiled = depfence::compile::compile_path(&policy()).unwrap();
    let env = compiled.snapshot.environment_index("prod").unwrap();
    // The agent's answer is the declared dependencies with the rule hits of its history.
    let mut usage = depfence::usage::declared(&compiled.snapshot, env, "prod", Duration::from_secs(3600));
    let rule_of = |usage: &depfence::usage::Usage, service: &str, backend: &str| {
        let s = usage.services.iter().find(|s| s.service == service).unwrap();
        s.backends.iter().find(|b| b.backend == backend).unwrap().rules[0].rule.clone()
    };
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs);
    let rule = rule_of(&usage, "consumer-web", "orders");
    usage.add_rule_hits("consumer-web", &rule, 40, at(0), at(600));
    let rule = rule_of(&usage, "rider-dispatch", "orders");
    usage.add_rule_hits("rider-dispatch", &rule, 7, at(60), at(120));

    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = fake_agent(dir.path(), usage);
    let db_path = dir.path().join("platform.db");
    let out = policyctl()
        .arg("export")
        .arg("--sqlite")
        .arg(&db_path)
        .arg(policy())
        .args(["-e", "prod", "--window", "1h"])
        .arg(format!("--agent={}", socket.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.join().unwrap(), ["Status", "Observed { window_secs: 3600 }", "Usage { window_secs: 3600 }"]);
    let db = Connection::open(&db_path).unwrap();
    assert_eq!(
        rows(&db, "SELECT * FROM observed_edges ORDER BY from_service"),
        vec![
            "consumer-web|prod|orders|service|orders|NULL|NULL|allowed|40|2023-11-14T22:13:20Z|2023-11-14T22:23:20Z|[]|[]|agent",
            "rider-dispatch|prod|orders|service|orders|NULL|NULL|allowed|7|2023-11-14T22:14:20Z|2023-11-14T22:15:20Z|[]|[]|agent",
        ]
    );
    // Declared but unused in the window: no allowed row (what `policyctl unused` lists).
    assert_eq!(
        rows(
            &db,
            "SELECT count(*) FROM service_edges e WHERE e.environment = 'prod' AND NOT EXISTS \
             (SELECT 1 FROM observed_edges o WHERE o.verdict = 'allowed' AND o.from_service = e.from_service \
              AND o.destination_service = e.to_service)"
        ),
        vec!["8"]
    );
}

#[test]
fn deployed_needs_an_environment_an_exported_one_and_a_valid_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = repo("deploy/examples/food-delivery-prod.toml");
    let run = |extra: &[&str]| {
        let out = policyctl()
            .arg("export")
            .arg("--sqlite")
            .arg(dir.path().join("x.db"))
            .arg(policy())
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let bare = format!("--deployed={}", manifest.display());
    let (code, stderr) = run(&[&bare]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("names no environment; pass `--deployed ENV="), "{stderr}");
    let staging = format!("--deployed=staging={}", manifest.display());
    let (code, stderr) = run(&["-e", "prod", &staging]);
    assert_eq!(
        (code, stderr.as_str()),
        (Some(2), "error: a deployed-versions manifest for environment `staging`, which is not exported\n")
    );
    // A bare FILE is the manifest of the one exported environment.
    let (code, stderr) = run(&["-e", "prod", &bare]);
    assert_eq!(code, Some(0), "{stderr}");
    let db = Connection::open(dir.path().join("x.db")).unwrap();
    assert_eq!(rows(&db, "SELECT DISTINCT environment FROM deployed_versions"), vec!["prod"]);
    std::fs::remove_file(dir.path().join("x.db")).unwrap();
    // An invalid manifest is reported as check-deploy reports it (exit 1), and nothing is written.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[services.orders]\nversions = \"5.1\"\n").unwrap();
    let (code, stderr) = run(&["--error-format", "plain", &format!("--deployed=prod={}", broken.display())]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("invalid version `5.1`"), "{stderr}");
    assert!(!dir.path().join("x.db").exists());
}
