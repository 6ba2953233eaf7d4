//! Environments in the dependency model: per-environment endpoints and allow entries, isolation
//! between environments (`depfence::cross_environment`), declared exceptions, graph checks per
//! environment, and the property that compiling a policy judges each environment exactly like
//! compiling that environment's projection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::path::Path;

use depfence::compile::{Compiled, compile, compile_path, compile_str};
use depfence::diag::{Diagnostics, Sources};
use depfence::explain::{Environments, explain};
use depfence::policy::parse_sources;
use depfence::snapshot::Snapshot;
use depfence::verdict::Verdict;
use proptest::prelude::*;

fn example() -> Compiled {
    compile_path(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples/environments.toml")).unwrap()
}

fn errors(text: &str) -> (Sources, Diagnostics) {
    match compile_str("policy.toml", text) {
        Ok(_) => panic!("compiled:\n{text}"),
        Err(found) => found,
    }
}

fn plain(sources: &Sources, diagnostics: &Diagnostics) -> Vec<String> {
    diagnostics.iter().map(|d| d.to_plain(sources)).collect()
}

/// The verdict for `from -> to` in `env`, offline.
fn verdict(compiled: &Compiled, from: &str, to: &str, env: &str) -> Verdict {
    let e = explain(&compiled.snapshot, Some(&compiled.analysis), from, to.parse().unwrap(), Environments::Named(env))
        .unwrap();
    e.verdicts()[0].verdict
}

#[test]
fn a_production_caller_reaches_its_production_backend_and_not_the_qa_one() {
    let compiled = example();
    // orders-api -> orders-db: prod at 10.1.3.20, qa at 10.9.3.20. prod audits, qa enforces.
    assert_eq!(verdict(&compiled, "orders-api", "10.1.3.20:5432", "prod"), Verdict::Allowed);
    assert_eq!(verdict(&compiled, "orders-api", "10.9.3.20:5432", "prod"), Verdict::WouldReject);
    assert_eq!(verdict(&compiled, "orders-api", "10.9.3.20:5432", "qa"), Verdict::Allowed);
    assert_eq!(verdict(&compiled, "orders-api", "10.1.3.20:5432", "qa"), Verdict::Rejected);
    // A shared endpoint (one metrics store) is reachable from both.
    assert_eq!(verdict(&compiled, "orders-api", "10.5.0.9:9090", "prod"), Verdict::Allowed);
    assert_eq!(verdict(&compiled, "orders-api", "10.5.0.9:9090", "qa"), Verdict::Allowed);
    // An entry limited to one environment: the live payment provider from prod only.
    assert_eq!(verdict(&compiled, "storefront", "198.51.100.7:443", "prod"), Verdict::Allowed);
    assert_eq!(verdict(&compiled, "storefront", "198.51.100.7:443", "qa"), Verdict::Rejected);

    // Without an environment, explain judges each, and says which rule decides where.
    let e = explain(
        &compiled.snapshot,
        Some(&compiled.analysis),
        "orders-api",
        "10.9.3.20:5432".parse().unwrap(),
        Environments::All,
    )
    .unwrap();
    assert_eq!(e.judgements.len(), 2, "{e:?}");
    let qa = e.judgement("qa").unwrap();
    assert_eq!(qa.destination_services, ["orders-db"]);
    assert!(qa.rule.as_ref().unwrap().rule.contains("10.9.3.20/32 port 5432"), "{qa:?}");
    let prod = e.judgement("prod").unwrap();
    assert!(prod.rule.is_none() && prod.destination_services.is_empty(), "not an endpoint in prod: {prod:?}");
    let text = e.to_string();
    assert!(text.contains("in prod:") && text.contains("in qa (an endpoint of `orders-db`):"), "{text}");

    // The snapshot holds each environment's rules; the shared ones once.
    let (_, api) = compiled.snapshot.service("orders-api").unwrap();
    let prod_index = compiled.snapshot.environment_index("prod").unwrap();
    let qa_index = compiled.snapshot.environment_index("qa").unwrap();
    let nets = |env: usize| api.rules(env).net_rules.iter().map(|r| r.net.to_string()).collect::<Vec<_>>();
    assert_eq!(nets(prod_index), ["10.1.3.20/32", "10.5.0.9/32"]);
    assert_eq!(nets(qa_index), ["10.5.0.9/32", "10.9.3.20/32"]);
    let (_, metrics) = compiled.snapshot.service("metrics").unwrap();
    assert_eq!(metrics.rules.len(), 1, "a service whose rules are the same everywhere stores them once");
}

#[test]
fn a_declared_cross_environment_entry_compiles_and_reaches_the_other_environment() {
    let compiled = example();
    // qa-dashboards in qa reads production's database, on purpose, with a reason.
    assert_eq!(verdict(&compiled, "qa-dashboards", "10.1.3.20:5432", "qa"), Verdict::Allowed);
    assert_eq!(verdict(&compiled, "qa-dashboards", "10.9.3.20:5432", "qa"), Verdict::Allowed);
    // Its entries are limited to qa: in prod it may reach nothing.
    assert_eq!(verdict(&compiled, "qa-dashboards", "10.1.3.20:5432", "prod"), Verdict::Rejected);
    assert!(compiled.analysis.diagnostics.is_empty(), "{:?}", compiled.warning_lines());
}

const TWO_ENVIRONMENTS: &str = r#"version = 1
[environments]
prod = "audit"
qa = "enforce"

[services.db]
endpoints.prod = [{ ip = "10.1.0.5", ports = [5432], proto = "tcp" }]
endpoints.qa = [{ ip = "10.9.0.5", ports = [5432], proto = "tcp" }]
"#;

#[test]
fn a_rule_that_reaches_another_environment_is_a_located_error() {
    // A raw block from a production caller that covers QA's database.
    let text = format!("{TWO_ENVIRONMENTS}\n[services.app]\nallow = [{{ cidr = \"10.0.0.0/8\", ports = [5432] }}]\n");
    let (sources, diagnostics) = errors(&text);
    let lines = plain(&sources, &diagnostics);
    assert_eq!(diagnostics.errors().count(), 2, "{lines:#?}");
    let prod = diagnostics
        .iter()
        .find(|d| d.message().contains("in environment `prod`"))
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(prod.problem().code(), "depfence::cross_environment");
    assert_eq!(
        prod.message(),
        "in environment `prod`, `app` may reach `db`'s endpoint in environment `qa` (10.0.0.0/8) (environment `prod`)"
    );
    // Both positions: the rule, and the other environment's endpoint.
    assert_eq!(sources.position(prod.primary().loc).to_string(), "policy.toml:11:10");
    assert_eq!(sources.position(prod.secondary()[0].loc).to_string(), "policy.toml:8:17");
    assert!(prod.problem().help().unwrap().contains("cross_environment = \"qa\""));

    // Limited to the environment it belongs to, and narrowed, the same intent compiles.
    let text = format!(
        "{TWO_ENVIRONMENTS}\n[services.app]\nallow = [{{ cidr = \"10.1.0.0/16\", ports = [5432], env = \"prod\" }}]\n"
    );
    compile_str("policy.toml", &text).unwrap();

    // An endpoint of every environment is not another environment's: reaching it is not crossing.
    let text = format!(
        "{TWO_ENVIRONMENTS}[services.metrics]\nendpoints = [{{ ip = \"10.5.0.9\", ports = [9090] }}]\n\
         [services.app]\nallow = [{{ service = \"db\" }}, {{ cidr = \"10.5.0.0/16\", ports = [9090] }}]\n"
    );
    compile_str("policy.toml", &text).unwrap();
}

#[test]
fn the_default_endpoints_are_those_of_the_environments_a_table_does_not_name() {
    let text = r#"version = 1
[environments]
prod = "audit"
qa = "enforce"
staging = "enforce"
[services.db]
endpoints.prod = [{ ip = "10.1.0.5", ports = [5432] }]
endpoints.default = [{ ip = "10.8.0.5", ports = [5432] }]
"#;
    let compiled = compile_str("policy.toml", text).unwrap();
    let snapshot = &compiled.snapshot;
    let (_, db) = snapshot.service("db").unwrap();
    let endpoint = |env: &str| {
        let rules = &db.rules(snapshot.environment_index(env).unwrap()).endpoints;
        rules.iter().map(|e| e.destination.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(
        (endpoint("prod"), endpoint("qa"), endpoint("staging")),
        (vec!["10.1.0.5".to_owned()], vec!["10.8.0.5".to_owned()], vec!["10.8.0.5".to_owned()])
    );
    assert!(compiled.analysis.diagnostics.is_empty());

    // A `default` list in a table that names every environment applies nowhere: a warning.
    let text = text
        .replace("staging = \"enforce\"\n", "")
        .replace("endpoints.default", "endpoints.qa = []\nendpoints.default");
    let compiled = compile_str("policy.toml", &text).unwrap();
    let lines = compiled.warning_lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].starts_with("policy.toml:8:22: warning[depfence::unused_default_endpoints]"), "{lines:#?}");
}

#[test]
fn a_cross_environment_entry_needs_a_reason_and_known_environments() {
    let text = format!(
        "{TWO_ENVIRONMENTS}\n[services.app]\nallow = [{{ service = \"db\", env = \"qa\", cross_environment = \"prod\" }}]\n"
    );
    let (sources, diagnostics) = errors(&text);
    let lines = plain(&sources, &diagnostics);
    assert!(
        lines.iter().any(|l| l.starts_with("policy.toml:11:10: error[depfence::missing_key]") && l.contains("reason")),
        "{lines:#?}"
    );

    let text = format!("{TWO_ENVIRONMENTS}\n[services.app]\nallow = [{{ service = \"db\", env = \"pord\" }}]\n");
    let (sources, diagnostics) = errors(&text);
    let lines = plain(&sources, &diagnostics);
    assert!(lines.iter().any(|l| l.contains("unknown environment `pord`")), "{lines:#?}");
    assert_eq!(diagnostics.iter().next().unwrap().problem().help().as_deref(), Some("did you mean `prod`?"));

    // `env` inside an `endpoints.ENV` list contradicts the list.
    let text = TWO_ENVIRONMENTS
        .replace("ports = [5432], proto = \"tcp\" }]\nendpoints.qa", "ports = [5432], env = \"qa\" }]\nendpoints.qa");
    let (sources, diagnostics) = errors(&text);
    let lines = plain(&sources, &diagnostics);
    assert!(lines.iter().any(|l| l.contains("`endpoints.prod` and `env` cannot be used together")), "{lines:#?}");
}

#[test]
fn graph_checks_run_per_environment_and_name_it() {
    // In qa only, `api` depends on the higher-layer `web`: a layer violation in qa.
    let text = r#"version = 1
[environments]
prod = "audit"
qa = "enforce"
[model]
layers = ["data", "apps", "edge"]
[services.web]
layer = "edge"
endpoints = [{ ip = "10.0.6.10", ports = [443] }]
[services.api]
layer = "apps"
allow = [{ service = "web", env = "qa" }]
"#;
    let (sources, diagnostics) = errors(text);
    let lines = plain(&sources, &diagnostics);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("error[depfence::layer_violation]") && lines[0].ends_with("(environment `qa`)"),
        "{lines:#?}"
    );

    // The same edge in every environment: reported once, without environment names.
    let (sources, diagnostics) = errors(&text.replace(", env = \"qa\"", ""));
    let lines = plain(&sources, &diagnostics);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(!lines[0].contains("environment"), "{lines:#?}");
}

#[test]
fn the_examples_graphs_and_bootstrap_orders_are_per_environment() {
    let compiled = example();
    let analysis = &compiled.analysis;
    assert_eq!(analysis.environments, ["prod", "qa"]);
    // qa-dashboards depends on orders-db in qa only: two graphs.
    assert_eq!(analysis.graphs.len(), 2);
    let (dash, db) = (analysis.node("qa-dashboards").unwrap(), analysis.node("orders-db").unwrap());
    let edge = |env: usize| analysis.graph(env).unwrap().edges.iter().any(|e| (e.from, e.to) == (dash, db));
    assert!(!edge(0) && edge(1));
    let snapshot: &Snapshot = &compiled.snapshot;
    assert!(!snapshot.bootstrap(0).is_empty() && !snapshot.bootstrap(1).is_empty());
}

/// A random two-environment policy without cross-environment entries: services `s0..sN`, each
/// with endpoints in prod (10.1.i.0/24), in qa (10.9.i.0/24) or in both (10.5.i.0/24), and allow
/// entries naming lower-numbered services (so no cycle) or raw blocks in an environment's own
/// space, each in every environment or in one.
fn arb_policy() -> impl Strategy<Value = String> {
    let scope = prop_oneof![Just(""), Just(", env = \"prod\""), Just(", env = \"qa\"")];
    let endpoint = (0u8..3, 1u16..4);
    let entry = (any::<bool>(), 0usize..8, scope, 0u8..3);
    (1usize..7)
        .prop_flat_map(move |n| {
            (
                prop::collection::vec(prop::collection::vec(endpoint.clone(), 0..3), n),
                prop::collection::vec(prop::collection::vec(entry.clone(), 0..4), n),
            )
        })
        .prop_map(|(endpoints, allows)| {
            let mut text = String::from("version = 1\n[environments]\nprod = \"audit\"\nqa = \"enforce\"\n");
            for (i, (endpoints, allows)) in endpoints.iter().zip(&allows).enumerate() {
                text.push_str(&format!("[services.s{i}]\n"));
                let mut shared = Vec::new();
                let mut prod = Vec::new();
                let mut qa = Vec::new();
                for &(kind, port) in endpoints {
                    match kind {
                        0 => prod.push(format!("{{ cidr = \"10.1.{i}.0/24\", ports = [{port}] }}")),
                        1 => qa.push(format!("{{ cidr = \"10.9.{i}.0/24\", ports = [{port}] }}")),
                        _ => shared.push(format!("{{ cidr = \"10.5.{i}.0/24\", ports = [{port}] }}")),
                    }
                }
                for (key, list) in [("default", shared), ("prod", prod), ("qa", qa)] {
                    if !list.is_empty() {
                        text.push_str(&format!("endpoints.{key} = [{}]\n", list.join(", ")));
                    }
                }
                let mut entries = Vec::new();
                for &(by_name, target, scope, space) in allows {
                    if by_name && target < i {
                        entries.push(format!("{{ service = \"s{target}\"{scope} }}"));
                    } else {
                        // A raw block in the entry's own environment's space (or the shared one).
                        let net = match (scope, space) {
                            (", env = \"prod\"", 0) => "10.1.200.0/24",
                            (", env = \"qa\"", 0) => "10.9.200.0/24",
                            (_, 1) => "10.5.200.0/24",
                            _ => "192.0.2.0/24",
                        };
                        entries.push(format!("{{ cidr = \"{net}\", ports = [{}]{scope} }}", target + 1));
                    }
                }
                text.push_str(&format!("allow = [{}]\n", entries.join(", ")));
            }
            text
        })
}

/// What a ruleset allows in one environment, with where each rule was written.
fn rules_of(snapshot: &Snapshot, env: usize) -> Vec<(String, Vec<String>, Vec<String>)> {
    snapshot
        .services()
        .iter()
        .enumerate()
        .map(|(id, s)| {
            let rules = s.rules(env);
            let nets = rules
                .net_rules
                .iter()
                .map(|r| {
                    let at = snapshot.rule_position(id as u32, r);
                    format!("{} {} {} {:?} at {at}", r.net, r.proto, r.ports, r.target)
                })
                .collect();
            let endpoints =
                rules.endpoints.iter().map(|e| format!("{} {} {}", e.destination, e.proto, e.ports)).collect();
            (format!("{} {:?}", s.name, s.mode(env)), nets, endpoints)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Compiling a policy judges each environment as compiling its projection does: the same
    /// modes, rules (with their positions), endpoints and bootstrap order.
    #[test]
    fn per_environment_compile_equals_the_projection(text in arb_policy()) {
        let parsed = parse_sources([("policy.toml".to_owned(), text.clone())]);
        prop_assert!(parsed.diagnostics.is_empty(), "{text}\n{:?}", parsed.diagnostics);
        let whole = compile(&parsed.policy).map_err(|e| TestCaseError::fail(format!("{text}\n{:?}", e.lines())))?;
        for (env, name) in ["prod", "qa"].into_iter().enumerate() {
            let projection = compile(&parsed.policy.project(name))
                .map_err(|e| TestCaseError::fail(format!("{name}:\n{text}\n{:?}", e.lines())))?;
            prop_assert_eq!(projection.snapshot.environments().len(), 1);
            prop_assert_eq!(rules_of(&whole.snapshot, env), rules_of(&projection.snapshot, 0), "{}\n{}", name, text);
            prop_assert_eq!(whole.snapshot.bootstrap(env), projection.snapshot.bootstrap(0));
            prop_assert_eq!(&whole.analysis.graph(env).unwrap().edges, &projection.analysis.graphs[0].edges);
        }
    }
}

/// The in-process guard resolves a backend by its endpoints in the guard's environment: in
/// prod, QA's billing address is no backend of checkout's (an unknown backend, refused).
#[test]
fn the_guard_resolves_backends_in_its_environment() {
    let text = r#"version = 1
[environments]
prod = "enforce"
qa = "enforce"
[services.billing]
endpoints.prod = [{ ip = "127.0.10.1", proto = "tcp" }]
endpoints.qa = [{ ip = "127.0.20.1", proto = "tcp" }]
[services.checkout]
allow = [{ service = "billing" }]
rpc_allow = [{ service = "billing", rpcs = ["/billing.Billing/Charge"] }]
"#;
    let snapshot = compile_str("guard.toml", text).unwrap().snapshot;
    for (env, own, other) in
        [("prod", "127.0.10.1:50051", "127.0.20.1:50051"), ("qa", "127.0.20.1:50051", "127.0.10.1:50051")]
    {
        let guard = depfence::guard::Guard::from_snapshot(snapshot.clone(), env).unwrap();
        let d = guard.check("checkout", "/billing.Billing/Charge", own);
        assert_eq!((d.verdict, d.backend()), (Verdict::Allowed, Some("billing")), "{env}");
        let d = guard.check("checkout", "/billing.Billing/Charge", other);
        assert_eq!((d.verdict, d.backend()), (Verdict::Rejected, None), "{env}: the other environment's billing");
    }
}

/// The DNS proxy's host rules are those of its environment.
#[test]
fn host_rules_are_per_environment() {
    let text = r#"version = 1
[environments]
prod = "enforce"
qa = "enforce"
[services.app]
allow = [
  { host = "api.payments.example", ports = [443], env = "prod" },
  { host = "sandbox.payments.example", ports = [443], env = "qa" },
]
"#;
    let snapshot = compile_str("dns.toml", text).unwrap().snapshot;
    let granted = |env: &str, name: &str| {
        let policy =
            depfence::dns::names::DnsPolicy::from_snapshot(&snapshot, snapshot.environment_index(env).unwrap());
        policy.service("app").unwrap().names.matches(name)
    };
    assert!(granted("prod", "api.payments.example") && !granted("prod", "sandbox.payments.example"));
    assert!(granted("qa", "sandbox.payments.example") && !granted("qa", "api.payments.example"));
}
