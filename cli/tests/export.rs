//! `policyctl export --sqlite` and `policyctl dependents` as a user runs them: the export's
//! schema (a reviewed snapshot), its rows and views for a small policy, a file never replaced
//! without `--force`; the dependents of a service, direct and transitive, in text and JSON; and
//! an incident query in SQL over the export that gives what `dependents --transitive` gives.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking, with the value in the message"
)]

use std::path::Path;

use assert_cmd::Command;
use rusqlite::Connection;

mod support;
use support::rows;

fn policyctl() -> Command {
    Command::cargo_bin("policyctl").unwrap()
}

/// A small shop: `db` is critical to `billing` and `cache`; `search` reaches it through
/// `cache`; `web` reaches it through `billing` (and through `search`, whose edge is not
/// critical); `reports` uses it non-critically. Two environments with the same graph.
const POLICY: &str = r#"version = 1

[environments]
prod = "enforce"
qa = "audit"

[model]
layers = ["data", "apps", "edge"]

[services.db]
layer = "data"
tier = 1
owner = "storage"
description = "orders and payments"
endpoints = [{ ip = "10.0.0.1", ports = [5432], proto = "tcp" }]

[services.cache]
layer = "data"
endpoints = [{ ip = "10.0.0.2", ports = [6379], proto = "tcp" }]
allow = [{ service = "db" }]

[services.billing]
layer = "apps"
tier = 2
owner = "payments"
allow = [{ service = "db" }]

[services.search]
layer = "apps"
tier = 2
owner = "discovery"
allow = [{ service = "cache" }]

[services.reports]
layer = "apps"
tier = 3
owner = "finance"
allow = [{ service = "db", critical = false }]

[services.web]
layer = "edge"
tier = 1
owner = "frontend"
mode = { qa = "enforce" }
allow = [
  { service = "billing" },
  { service = "search", critical = false },
  { host = "*.payments.example", ports = [443], proto = "tcp" },
]
"#;

/// The policy in a fresh directory, as `shop.toml`.
fn shop() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("shop.toml");
    std::fs::write(&policy, POLICY).unwrap();
    (dir, policy)
}

fn export(policy: &Path, db: &Path, extra: &[&str]) -> std::process::Output {
    policyctl().arg("export").arg("--sqlite").arg(db).arg(policy).args(extra).output().unwrap()
}

#[test]
fn the_export_schema_is_the_reviewed_one() {
    let (dir, policy) = shop();
    let db = dir.path().join("shop.db");
    let out = export(&policy, &db, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let db = Connection::open(&db).unwrap();
    let schema = rows(
        &db,
        "SELECT type || ' ' || name || char(10) || sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name",
    );
    insta::assert_snapshot!("export_schema", schema.join("\n\n"));
    assert_eq!(rows(&db, "PRAGMA user_version"), vec!["2"]);
}

#[test]
fn the_export_holds_the_policy_and_its_graph() {
    let (dir, policy) = shop();
    let db_path = dir.path().join("shop.db");
    let out = export(&policy, &db_path, &["-e", "prod"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "wrote {}: 6 services, 6 graph edges, 5 rules, 0 requirements, 0 deployed versions, 0 observed \
             destinations in 1 environment(s)\n",
            db_path.display()
        )
    );
    let db = Connection::open(&db_path).unwrap();
    let meta = rows(&db, "SELECT key || '=' || value FROM meta WHERE key <> 'snapshot_hash' ORDER BY key");
    assert_eq!(
        meta,
        vec![
            "deployed_environments=",
            "dmd_organisation=shop",
            "dmd_platform=depfence",
            "environments=prod",
            "generator=depfence 0.1.0",
            "observed_source=none",
            "observed_window_secs=",
            "policy=shop",
            "schema_version=2",
        ]
    );
    assert_eq!(rows(&db, "SELECT * FROM environments"), vec!["prod|enforce"]);
    let file = policy.display().to_string();
    assert_eq!(
        rows(&db, "SELECT name, owner, tier, layer, grp, description, line, column FROM services ORDER BY name"),
        vec![
            "billing|payments|2|apps|NULL|NULL|22|11",
            "cache|NULL|NULL|data|NULL|NULL|17|11",
            "db|storage|1|data|NULL|orders and payments|10|11",
            "reports|finance|3|apps|NULL|NULL|34|11",
            "search|discovery|2|apps|NULL|NULL|28|11",
            "web|frontend|1|edge|NULL|NULL|40|11",
        ]
    );
    assert_eq!(rows(&db, "SELECT DISTINCT file FROM services"), vec![file.clone()]);
    assert_eq!(
        rows(&db, "SELECT service || '=' || mode FROM service_modes ORDER BY service"),
        vec!["billing=enforce", "cache=enforce", "db=enforce", "reports=enforce", "search=enforce", "web=enforce"]
    );
    assert_eq!(
        rows(&db, "SELECT from_service, to_service, critical, kind, line FROM service_edges ORDER BY 1, 2"),
        vec![
            "billing|db|1|declared|26",
            "cache|db|1|declared|20",
            "reports|db|0|declared|38",
            "search|cache|1|declared|32",
            "web|billing|1|declared|46",
            "web|search|0|declared|47",
        ]
    );
    assert_eq!(
        rows(
            &db,
            "SELECT from_service, to_service, destination, destination_kind, ports, protocol, critical, line \
             FROM dependencies ORDER BY from_service, destination"
        ),
        vec![
            "billing|db|10.0.0.1/32|address|5432|tcp|1|26",
            "cache|db|10.0.0.1/32|address|5432|tcp|1|20",
            "reports|db|10.0.0.1/32|address|5432|tcp|0|38",
            "search|cache|10.0.0.2/32|address|6379|tcp|1|32",
            "web|NULL|*.payments.example|host|443|tcp|1|48",
        ]
    );
    assert_eq!(rows(&db, "SELECT count(*) FROM observed_edges"), vec!["0"]);
}

#[test]
fn the_views_have_dependency_management_data_columns() {
    let (dir, policy) = shop();
    let db_path = dir.path().join("shop.db");
    assert!(export(&policy, &db_path, &[]).status.success());
    let db = Connection::open(&db_path).unwrap();
    let columns = |view: &str| rows(&db, &format!("SELECT name FROM pragma_table_info('{view}') ORDER BY cid"));
    assert_eq!(columns("owners"), vec!["platform", "organisation", "repo", "owner", "notes", "updated_at"]);
    assert_eq!(
        columns("repository_metadata"),
        vec![
            "platform",
            "organisation",
            "repo",
            "is_monorepo",
            "is_fork",
            "repository_type",
            "repository_usage",
            "visibility",
            "description",
            "additional_metadata",
        ]
    );
    assert_eq!(
        rows(&db, "SELECT * FROM owners ORDER BY repo"),
        vec![
            "depfence|shop|billing|payments|NULL|NULL",
            "depfence|shop|db|storage|NULL|NULL",
            "depfence|shop|reports|finance|NULL|NULL",
            "depfence|shop|search|discovery|NULL|NULL",
            "depfence|shop|web|frontend|NULL|NULL",
        ]
    );
    assert_eq!(
        rows(&db, "SELECT * FROM repository_metadata WHERE repo = 'db'"),
        vec![
            "depfence|shop|db|0|0|service|data|NULL|orders and payments|{\"tier\":1,\"layer\":\"data\",\"group\":null,\"owner\":\"storage\"}"
        ]
    );
    // The case study's query shape: owner and tier of each service, most critical first.
    assert_eq!(
        rows(
            &db,
            "SELECT m.repo, o.owner, json_extract(m.additional_metadata, '$.tier') AS tier \
             FROM repository_metadata m LEFT JOIN owners o USING (platform, organisation, repo) \
             WHERE tier IS NOT NULL ORDER BY tier, m.repo"
        ),
        vec!["db|storage|1", "web|frontend|1", "billing|payments|2", "search|discovery|2", "reports|finance|3"]
    );
}

#[test]
fn an_existing_file_is_replaced_only_with_force() {
    let (dir, policy) = shop();
    let db = dir.path().join("shop.db");
    std::fs::write(&db, "keep me").unwrap();
    let out = export(&policy, &db, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: `{}` exists; pass --force to replace it\n", db.display())
    );
    assert_eq!(std::fs::read_to_string(&db).unwrap(), "keep me");
    let out = export(&policy, &db, &["--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(&Connection::open(&db).unwrap(), "SELECT count(*) FROM services"), vec!["6"]);
    let out = export(&policy, &dir.path().join("other.db"), &["-e", "prd"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "error: unknown environment `prd` (the policy has: prod, qa)\n");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("other.db")), "nothing left behind: {names:?}");
}

fn dependents(policy: &Path, args: &[&str]) -> (String, String, Option<i32>) {
    let out = policyctl().arg("dependents").args(args).arg(policy).output().unwrap();
    (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap(), out.status.code())
}

#[test]
fn dependents_direct_most_critical_first() {
    let (_dir, policy) = shop();
    let (stdout, stderr, code) = dependents(&policy, &["db"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "judged: environments prod, qa\n");
    assert_eq!(
        stdout,
        "3 services depend on `db` (directly):\n\
         SERVICE  TIER  CRITICAL  DISTANCE  OWNER     LAYER  PATH\n\
         billing  2     yes       1         payments  apps   billing -> db\n\
         reports  3     no        1         finance   apps   reports -> db\n\
         cache    -     yes       1         -         data   cache -> db\n"
    );
}

#[test]
fn dependents_transitive_prefers_critical_paths() {
    let (_dir, policy) = shop();
    let (stdout, stderr, code) = dependents(&policy, &["db", "--transitive", "-e", "qa"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "judged: environment qa (the same graph in prod, qa)\n");
    assert_eq!(
        stdout,
        "5 services depend on `db` (directly or through others):\n\
         SERVICE  TIER  CRITICAL  DISTANCE  OWNER      LAYER  PATH\n\
         web      1     yes       2         frontend   edge   web -> billing -> db\n\
         billing  2     yes       1         payments   apps   billing -> db\n\
         search   2     yes       2         discovery  apps   search -> cache -> db\n\
         reports  3     no        1         finance    apps   reports -> db\n\
         cache    -     yes       1         -          data   cache -> db\n"
    );
    // Only a non-critical edge leads from `web` to `search`.
    let (stdout, _, _) = dependents(&policy, &["search", "--transitive"]);
    assert!(stdout.contains("web      1     no        1         frontend  edge   web -> search"), "{stdout}");
    let (stdout, _, _) = dependents(&policy, &["web", "--transitive"]);
    assert_eq!(stdout, "no service depends on `web` (directly or through others)\n");
}

#[test]
fn dependents_json_and_unknown_services() {
    let (_dir, policy) = shop();
    let (stdout, _, code) = dependents(&policy, &["db", "--transitive", "-o", "json"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((json["service"].as_str(), json["transitive"].as_bool()), (Some("db"), Some(true)));
    assert_eq!(json["environments"], serde_json::json!(["prod", "qa"]));
    let order: Vec<(&str, Option<u64>, bool, u64)> = json["dependents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["service"].as_str().unwrap(),
                d["tier"].as_u64(),
                d["critical"].as_bool().unwrap(),
                d["distance"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            ("web", Some(1), true, 2),
            ("billing", Some(2), true, 1),
            ("search", Some(2), true, 2),
            ("reports", Some(3), false, 1),
            ("cache", None, true, 1),
        ]
    );
    assert_eq!(json["dependents"][0]["path"], serde_json::json!(["web", "billing", "db"]));
    assert_eq!(json["dependents"][0]["owner"], "frontend");
    assert_eq!(json["dependents"][0]["layer"], "edge");

    let (stdout, stderr, code) = dependents(&policy, &["biling"]);
    assert_eq!((stdout.as_str(), code), ("", Some(2)));
    assert!(stderr.ends_with("error: unknown service `biling` (did you mean `billing`?)\n"), "{stderr}");
}

/// Services affected if `db` breaks in prod, with owners and tiers, most critical first: the
/// same question `dependents --transitive` answers, in SQL over the export.
const INCIDENT_QUERY: &str = "\
WITH RECURSIVE affected(service) AS (
  SELECT from_service FROM service_edges WHERE environment = 'prod' AND to_service = 'db'
  UNION
  SELECT e.from_service FROM service_edges e JOIN affected a ON e.to_service = a.service
  WHERE e.environment = 'prod'
)
SELECT s.name, coalesce(s.owner, '-'), coalesce(s.tier, '-')
FROM affected a JOIN services s ON s.name = a.service
WHERE s.name <> 'db'
ORDER BY s.tier IS NULL, s.tier, s.name;
";

/// `dependents --transitive`'s answer as (name, owner, tier) rows ordered like the query.
fn affected_per_dependents(policy: &Path) -> Vec<String> {
    let (stdout, _, code) = dependents(policy, &["db", "--transitive", "-e", "prod", "-o", "json"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mut rows: Vec<(Option<u64>, String, String)> = json["dependents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let name = d["service"].as_str().unwrap().to_owned();
            let owner = d["owner"].as_str().unwrap_or("-").to_owned();
            (d["tier"].as_u64(), name, owner)
        })
        .collect();
    rows.sort_by_key(|(tier, name, _)| (tier.is_none(), *tier, name.clone()));
    rows.into_iter()
        .map(|(tier, name, owner)| format!("{name}|{owner}|{}", tier.map_or("-".to_owned(), |t| t.to_string())))
        .collect()
}

#[test]
fn an_incident_query_over_the_export_agrees_with_dependents() {
    let (dir, policy) = shop();
    let db_path = dir.path().join("shop.db");
    assert!(export(&policy, &db_path, &[]).status.success());
    let db = Connection::open(&db_path).unwrap();
    let in_sql = rows(&db, INCIDENT_QUERY);
    assert_eq!(
        in_sql,
        vec!["web|frontend|1", "billing|payments|2", "search|discovery|2", "reports|finance|3", "cache|-|-"]
    );
    assert_eq!(in_sql, affected_per_dependents(&policy));
}

#[test]
fn the_incident_query_through_the_sqlite3_shell() {
    // Under CI a missing shell is a failure, not a skip.
    let Some(sqlite3) =
        depfence_integration::require_tool("the_incident_query_through_the_sqlite3_shell", "sqlite3", "sqlite3")
    else {
        return;
    };
    let (dir, policy) = shop();
    let db_path = dir.path().join("shop.db");
    assert!(export(&policy, &db_path, &[]).status.success());
    let out = std::process::Command::new(sqlite3).arg(&db_path).arg(INCIDENT_QUERY).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(lines, affected_per_dependents(&policy));
}
