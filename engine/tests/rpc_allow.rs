//! `rpc_allow`: the policy syntax, its diagnostics (message, help, `file:line:col` and the
//! underlined text), what the compiler puts in the snapshot, and the `rpc-guard.toml` example.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers: a failing test should say where"
)]

use std::path::Path;

use depfence::compile::{analyze, compile, compile_str};
use depfence::diag::{Diagnostic, Severity, Sources};
use depfence::policy::{RpcPattern, load, parse_sources};

/// Every diagnostic of `policyctl check` over one text.
fn check(text: &str) -> (Sources, Vec<Diagnostic>) {
    let parsed = parse_sources([("policy.toml".to_owned(), text.to_owned())]);
    let mut diagnostics: Vec<Diagnostic> = parsed.diagnostics.iter().cloned().collect();
    assert!(parsed.syntax_ok);
    diagnostics.extend(analyze(&parsed.policy).diagnostics);
    (parsed.policy.sources, diagnostics)
}

/// (message, code, help, line, column, underlined text) of the only diagnostic.
fn only(text: &str) -> (String, &'static str, Option<String>, u32, u32, String) {
    let (sources, diagnostics) = check(text);
    let all: Vec<_> = diagnostics.iter().map(|d| d.to_plain(&sources)).collect();
    assert_eq!(diagnostics.len(), 1, "{all:#?}");
    let d = &diagnostics[0];
    assert_eq!(d.severity(), Severity::Error, "{all:#?}");
    let position = sources.position(d.primary().loc);
    assert_eq!(position.file, "policy.toml");
    (
        d.problem().to_string(),
        d.problem().code(),
        d.problem().help(),
        position.line,
        position.column,
        sources.snippet(d.primary().loc).to_owned(),
    )
}

fn policy(rpc_allow: &str) -> String {
    format!(
        r#"version = 1
[services.billing]
endpoints = [{{ ip = "10.0.0.5", ports = [50051] }}]
[services.checkout]
allow = [{{ service = "billing" }}]
rpc_allow = [{rpc_allow}]
"#
    )
}

const RPC_HELP: &str = "an rpc name is `/package.Service/Method`, `/package.Service/*` for every method of a service, or `/*` for every call";

#[test]
fn patterns_parse_and_match() {
    let ok = [
        ("/*", RpcPattern::Any),
        ("/billing.Billing/*", RpcPattern::Service("billing.Billing".into())),
        ("/Billing/Charge", RpcPattern::Method { service: "Billing".into(), method: "Charge".into() }),
        ("/a.v1_beta.B/_m2", RpcPattern::Method { service: "a.v1_beta.B".into(), method: "_m2".into() }),
    ];
    for (text, expected) in ok {
        let pattern = RpcPattern::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(pattern, expected);
        assert_eq!(pattern.to_string(), text, "display round-trips");
    }
    for bad in [
        "",
        "billing.Billing/Charge",
        "/",
        "/billing.Billing",
        "/billing.Billing/",
        "/a/b/c",
        "/billing.*/Charge",
        "/billing.Billing/Get*",
        "/*/*",
        "/billing..Billing/X",
        "/.Billing/X",
        "/1billing.B/X",
        "/b.B/1x",
        "/b-c.B/X",
        "/b.B/X Y",
    ] {
        assert!(RpcPattern::parse(bad).is_err(), "`{bad}` must be refused");
    }
    let charge = RpcPattern::parse("/billing.Billing/Charge").unwrap();
    assert!(charge.matches("/billing.Billing/Charge"));
    assert!(!charge.matches("/billing.Billing/ChargeAll"));
    assert!(!charge.matches("/billing.billing/Charge"), "case-sensitive, as gRPC is");
    let service = RpcPattern::parse("/billing.Billing/*").unwrap();
    assert!(service.matches("/billing.Billing/Refund"));
    assert!(!service.matches("/billing.Billing/"));
    assert!(!service.matches("/billing.BillingAdmin/Refund"));
    assert!(!service.matches("/other/billing.Billing/Refund"));
    assert!(RpcPattern::Any.matches("/anything/at/all"));
    assert!(!RpcPattern::Any.matches("relative"));
}

#[test]
fn a_valid_rpc_allow_compiles_into_sorted_rules_with_positions() {
    let text = policy(
        r#"{ service = "billing", rpcs = ["/billing.Billing/Refund", "/billing.Billing/Charge", "/billing.Billing/Charge"] }"#,
    );
    let compiled = compile_str("policy.toml", &text)
        .unwrap_or_else(|(s, d)| panic!("{:?}", d.iter().map(|d| d.to_plain(&s)).collect::<Vec<_>>()));
    let snapshot = &compiled.snapshot;
    let (billing, _) = snapshot.service("billing").unwrap();
    let (checkout_id, checkout) = snapshot.service("checkout").unwrap();
    let rules: Vec<_> = checkout.rpc_rules.iter().map(|r| (r.target, r.pattern.to_string())).collect();
    assert_eq!(
        rules,
        [(billing, "/billing.Billing/Charge".to_owned()), (billing, "/billing.Billing/Refund".to_owned())],
        "sorted, duplicates merged"
    );
    // Each pattern's origin is where it was written.
    let col = |needle: &str| text.lines().nth(5).unwrap().find(needle).unwrap() as u32 + 1;
    assert_eq!(
        snapshot.origin_position(checkout_id, checkout.rpc_rules[0].origin),
        format!("policy.toml:6:{}", col("\"/billing.Billing/Charge\""))
    );
    assert_eq!(
        snapshot.origin_position(checkout_id, checkout.rpc_rules[1].origin),
        format!("policy.toml:6:{}", col("\"/billing.Billing/Refund\""))
    );
    assert_eq!(snapshot.service_position(billing), "policy.toml:2:11");
    // The endpoints ride along for the guard's backend resolution.
    assert_eq!(snapshot.service("billing").unwrap().1.rules(0).endpoints.len(), 1);
    // Reordering the patterns changes neither content nor hash.
    let reordered = policy(
        r#"{ service = "billing", rpcs = ["/billing.Billing/Charge", "/billing.Billing/Refund", "/billing.Billing/Charge"] }"#,
    );
    let again = compile_str("policy.toml", &reordered).unwrap_or_else(|_| panic!("compiles"));
    assert_eq!(again.snapshot.hash(), snapshot.hash());
    // ... while another pattern changes the hash.
    let other = policy(r#"{ service = "billing", rpcs = ["/billing.Billing/*"] }"#);
    assert_ne!(
        compile_str("policy.toml", &other).unwrap_or_else(|_| panic!("compiles")).snapshot.hash(),
        snapshot.hash()
    );
}

#[test]
fn an_invalid_rpc_name_is_located() {
    let text = policy(r#"{ service = "billing", rpcs = ["/billing.Billing/Charge", "billing.Billing/Refund"] }"#);
    let (message, code, help, line, column, snippet) = only(&text);
    assert_eq!(
        message,
        "invalid rpc name `billing.Billing/Refund`: an rpc name starts with `/`, as in `/billing.Billing/Charge`"
    );
    assert_eq!(code, "depfence::invalid_rpc");
    assert_eq!(help.as_deref(), Some(RPC_HELP));
    let expected_column = text.lines().nth(5).unwrap().find(r#""billing.Billing/Refund""#).unwrap() as u32 + 1;
    assert_eq!((line, column), (6, expected_column));
    assert_eq!(expected_column, 72);
    assert_eq!(snippet, r#""billing.Billing/Refund""#);

    let (message, _, _, _, _, snippet) = only(&policy(r#"{ service = "billing", rpcs = ["/billing.Billing/Get*"] }"#));
    assert_eq!(
        message,
        "invalid rpc name `/billing.Billing/Get*`: `*` stands only for a whole method (`/package.Service/*`) or for every call (`/*`)"
    );
    assert_eq!(snippet, r#""/billing.Billing/Get*""#);
}

#[test]
fn every_bad_pattern_of_a_list_is_reported() {
    let (_, diagnostics) = check(&policy(r#"{ service = "billing", rpcs = ["/a/b/c", "/ok.S/M", "/x..y/Z"] }"#));
    let messages: Vec<_> = diagnostics.iter().map(|d| d.problem().to_string()).collect();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert!(messages[0].starts_with("invalid rpc name `/a/b/c`: an rpc name has two parts"), "{messages:#?}");
    assert!(
        messages[1].starts_with("invalid rpc name `/x..y/Z`: the service is dot-separated identifiers"),
        "{messages:#?}"
    );
}

#[test]
fn an_empty_rpcs_list_is_an_error() {
    let (message, code, help, line, column, snippet) = only(&policy(r#"{ service = "billing", rpcs = [] }"#));
    assert_eq!(message, "`rpcs` is empty, so the entry allows no call");
    assert_eq!(code, "depfence::empty_rpcs");
    assert_eq!(help, Some(format!("list the calls the service may make; {RPC_HELP}")));
    assert_eq!((line, column, snippet.as_str()), (6, 44, "[]"));
}

#[test]
fn missing_and_unknown_keys_are_reported() {
    let (message, code, _, line, column, snippet) = only(&policy(r#"{ service = "billing" }"#));
    assert_eq!(message, "missing key `rpcs` in an rpc_allow entry");
    assert_eq!(code, "depfence::missing_key");
    assert_eq!((line, column, snippet.as_str()), (6, 14, r#"{ service = "billing" }"#));

    let (message, _, help, line, column, snippet) =
        only(&policy(r#"{ service = "billing", rpc = ["/a.B/C"], rpcs = ["/a.B/C"] }"#));
    assert_eq!(message, "unknown key `rpc` in an rpc_allow entry");
    assert_eq!(help.as_deref(), Some("did you mean `rpcs`?"));
    assert_eq!((line, column, snippet.as_str()), (6, 37, "rpc"));

    let (message, _, _, _, _, snippet) = only(&policy(r#"{ service = "billing", rpcs = "/a.B/C" }"#));
    assert_eq!(message, "`rpcs` must be an array of rpc names, found string");
    assert_eq!(snippet, r#""/a.B/C""#);

    // A misspelt service key of the service table.
    let text = policy(r#"{ service = "billing", rpcs = ["/a.B/C"] }"#).replace("rpc_allow", "rpc_alow");
    let (message, _, help, ..) = only(&text);
    assert_eq!(message, "unknown key `rpc_alow` in a service");
    assert_eq!(help.as_deref(), Some("did you mean `rpc_allow`?"));
}

#[test]
fn an_unknown_backend_service_gets_a_suggestion() {
    let (message, code, help, line, column, snippet) = only(&policy(r#"{ service = "biling", rpcs = ["/a.B/C"] }"#));
    assert_eq!(message, "unknown service `biling`");
    assert_eq!(code, "depfence::unknown_reference");
    assert_eq!(help.as_deref(), Some("did you mean `billing`?"));
    assert_eq!((line, column, snippet.as_str()), (6, 26, r#""biling""#));
}

#[test]
fn rpc_allow_requires_a_network_allow() {
    let text = r#"version = 1
[services.billing]
endpoints = [{ ip = "10.0.0.5", ports = [50051] }]
[services.ledger]
endpoints = [{ ip = "10.0.0.6", ports = [7000] }]
[services.checkout]
allow = [{ service = "billing" }]
rpc_allow = [
  { service = "billing", rpcs = ["/billing.Billing/Charge"] },
  { service = "ledger", rpcs = ["/ledger.Ledger/Post"] },
]
"#;
    let (message, code, help, line, column, snippet) = only(text);
    assert_eq!(message, "`checkout` may call rpcs of `ledger` but has no network allow for it");
    assert_eq!(code, "depfence::rpc_without_allow");
    assert_eq!(
        help.as_deref(),
        Some(
            "add `{ service = \"ledger\" }` to `allow`: the kernel must let the connection through before the guard judges its calls, and the dependency graph checks see it"
        )
    );
    assert_eq!((line, column), (10, 3));
    assert_eq!(snippet, r#"{ service = "ledger", rpcs = ["/ledger.Ledger/Post"] }"#);

    // An inferred edge (a raw block over ledger's endpoint) is a network allow too.
    let inferred = text.replace(
        r#"allow = [{ service = "billing" }]"#,
        r#"allow = [{ service = "billing" }, { cidr = "10.0.0.0/24" }]"#,
    );
    assert!(check(&inferred).1.is_empty());
}

#[test]
fn rpc_dependencies_are_in_the_graph_checks() {
    // The network allow an rpc_allow needs is an ordinary dependency: here a layer violation.
    let text = r#"version = 1
[model]
layers = ["data", "apps"]
[services.billing]
layer = "apps"
endpoints = [{ ip = "10.0.0.5", ports = [50051] }]
[services.ledger]
layer = "data"
allow = [{ service = "billing" }]
rpc_allow = [{ service = "billing", rpcs = ["/*"] }]
"#;
    let (message, code, ..) = only(text);
    assert_eq!(message, "`ledger` (layer `data`) depends on `billing` in the higher layer `apps`");
    assert_eq!(code, "depfence::layer_violation");
}

#[test]
fn the_rpc_guard_example() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples/rpc-guard.toml");
    let parsed = load(&path).unwrap();
    assert!(parsed.diagnostics.is_empty());
    let compiled = compile(&parsed.policy).unwrap();
    assert!(compiled.analysis.diagnostics.is_empty());
    let snapshot = &compiled.snapshot;
    let (_, checkout) = snapshot.service("checkout").unwrap();
    let names = |target: &str| -> Vec<String> {
        let (id, _) = snapshot.service(target).unwrap();
        checkout.rpc_rules.iter().filter(|r| r.target == id).map(|r| r.pattern.to_string()).collect()
    };
    assert_eq!(names("billing"), ["/billing.Billing/Charge", "/billing.Billing/GetInvoice"]);
    assert_eq!(names("catalog"), ["/catalog.Catalog/*"]);
    let allowed = |target: &str, rpc: &str| {
        let (id, _) = snapshot.service(target).unwrap();
        checkout.rpc_rules.iter().any(|r| r.target == id && r.pattern.matches(rpc))
    };
    assert!(allowed("billing", "/billing.Billing/Charge"));
    assert!(!allowed("billing", "/billing.Billing/Refund"));
    assert!(allowed("catalog", "/catalog.Catalog/Search"));
    assert!(!allowed("catalog", "/billing.Billing/Charge"));
    let prod = snapshot.environment_index("prod").unwrap();
    let staging = snapshot.environment_index("staging").unwrap();
    assert_eq!(checkout.modes[prod], depfence::policy::Mode::Audit);
    assert_eq!(checkout.modes[staging], depfence::policy::Mode::Enforce);
}
