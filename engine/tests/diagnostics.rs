//! What the user sees when a policy is wrong: the message, the help line, the `file:line:col`
//! of the primary label and the source text it underlines (never byte offsets), for parse
//! errors, name-resolution errors and dependency-graph findings.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers outside #[test] functions: a failing test should say where"
)]

use depfence::compile::{EdgeKind, analyze, compile_str};
use depfence::diag::{Diagnostic, Label, Severity, Sources};
use depfence::policy::parse_sources;
use depfence::problem::Problem;

/// Every diagnostic of one run over some named policy texts, as `policyctl check` would report
/// them: parse problems, then (when the TOML is valid) resolution and graph problems.
struct Run {
    sources: Sources,
    diagnostics: Vec<Diagnostic>,
    syntax_ok: bool,
}

fn check_files(files: &[(&str, &str)]) -> Run {
    let parsed = parse_sources(files.iter().map(|(name, text)| ((*name).to_owned(), (*text).to_owned())));
    let mut diagnostics: Vec<Diagnostic> = parsed.diagnostics.iter().cloned().collect();
    if parsed.syntax_ok {
        diagnostics.extend(analyze(&parsed.policy).diagnostics);
    }
    Run { sources: parsed.policy.sources, diagnostics, syntax_ok: parsed.syntax_ok }
}

fn check(text: &str) -> Run {
    check_files(&[("policy.toml", text)])
}

impl Run {
    fn rendered(&self) -> String {
        self.diagnostics.iter().map(|d| d.to_plain(&self.sources)).collect::<Vec<_>>().join("\n")
    }

    fn errors(&self) -> Vec<&Diagnostic> {
        self.diagnostics.iter().filter(|d| d.severity() == Severity::Error).collect()
    }

    /// The one and only diagnostic.
    fn only(&self) -> Shown<'_> {
        assert_eq!(self.diagnostics.len(), 1, "expected exactly one diagnostic, got:\n{}", self.rendered());
        self.shown(&self.diagnostics[0])
    }

    /// The one diagnostic with this message.
    fn with_message(&self, message: &str) -> Shown<'_> {
        let found: Vec<_> = self.diagnostics.iter().filter(|d| d.problem().to_string() == message).collect();
        assert_eq!(found.len(), 1, "expected one `{message}`, got:\n{}", self.rendered());
        self.shown(found[0])
    }

    fn shown<'r>(&'r self, diagnostic: &'r Diagnostic) -> Shown<'r> {
        Shown { sources: &self.sources, diagnostic }
    }

    fn is_clean(&self) {
        assert!(self.syntax_ok && self.diagnostics.is_empty(), "expected no diagnostics, got:\n{}", self.rendered());
    }
}

/// One diagnostic, with assertions on what is shown to the user (cedar's
/// `ExpectedErrorMessageBuilder` in spirit).
struct Shown<'r> {
    sources: &'r Sources,
    diagnostic: &'r Diagnostic,
}

impl Shown<'_> {
    fn plain(&self) -> String {
        self.diagnostic.to_plain(self.sources)
    }

    fn error(self) -> Self {
        assert_eq!(self.diagnostic.severity(), Severity::Error, "{}", self.plain());
        self
    }

    fn warning(self) -> Self {
        assert_eq!(self.diagnostic.severity(), Severity::Warning, "{}", self.plain());
        self
    }

    fn code(self, code: &str) -> Self {
        assert_eq!(self.diagnostic.problem().code(), code, "{}", self.plain());
        self
    }

    fn message(self, message: &str) -> Self {
        assert_eq!(self.diagnostic.problem().to_string(), message);
        self
    }

    fn help(self, help: &str) -> Self {
        assert_eq!(self.diagnostic.problem().help().as_deref(), Some(help), "{}", self.plain());
        self
    }

    fn help_contains(self, part: &str) -> Self {
        let help = self.diagnostic.problem().help().unwrap_or_default();
        assert!(help.contains(part), "help `{help}` lacks `{part}`");
        self
    }

    fn no_help(self) -> Self {
        assert_eq!(self.diagnostic.problem().help(), None, "{}", self.plain());
        self
    }

    /// The primary label is at `file:line:column`.
    fn at(self, file: &str, line: u32, column: u32) -> Self {
        let p = self.sources.position(self.diagnostic.primary().loc);
        assert_eq!((p.file.as_str(), p.line, p.column), (file, line, column), "{}", self.plain());
        self
    }

    /// The primary label underlines exactly this text.
    fn underlines(self, snippet: &str) -> Self {
        assert_eq!(self.sources.snippet(self.diagnostic.primary().loc), snippet, "{}", self.plain());
        self
    }

    fn label(self, text: &str) -> Self {
        assert_eq!(self.diagnostic.primary().text, text);
        self
    }

    /// The secondary labels, as `(file:line:column, underlined text, label)`.
    fn notes(self, expected: &[(&str, &str, &str)]) -> Self {
        let seen: Vec<(String, String, String)> = self
            .diagnostic
            .secondary()
            .iter()
            .map(|l: &Label| {
                (self.sources.position(l.loc).to_string(), self.sources.snippet(l.loc).to_owned(), l.text.clone())
            })
            .collect();
        let expected: Vec<(String, String, String)> =
            expected.iter().map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned())).collect();
        assert_eq!(seen, expected, "{}", self.plain());
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, types and values

#[test]
fn unknown_key_suggests_the_closest_one() {
    let run = check(
        r#"version = 1
[services.web]
alow = [{ cidr = "10.0.0.0/8" }]
"#,
    );
    run.only()
        .error()
        .code("depfence::unknown_key")
        .message("unknown key `alow` in a service")
        .help("did you mean `allow`?")
        .at("policy.toml", 3, 1)
        .underlines("alow")
        .label("unknown key");

    // The context names where the key was found; no suggestion when nothing is close.
    let run = check(
        r#"version = 1
servces = {}
[services.web]
colour = "blue"
"#,
    );
    run.with_message("unknown key `servces` in the policy").help("did you mean `services`?").at("policy.toml", 2, 1);
    run.with_message("unknown key `colour` in a service").no_help().at("policy.toml", 4, 1).underlines("colour");
    assert_eq!(run.diagnostics.len(), 2, "{}", run.rendered());
}

#[test]
fn unknown_key_in_nested_tables() {
    let run = check(
        r#"version = 1
[services.web]
endpoints = [{ ip = "10.0.0.1", prot = "tcp" }]
allow = [{ cidr = "10.0.0.0/8", port = 443 }]
"#,
    );
    run.with_message("unknown key `prot` in an endpoint").help("did you mean `proto`?").at("policy.toml", 3, 33);
    run.with_message("unknown key `port` in an allow entry")
        .help("did you mean `ports`?")
        .at("policy.toml", 4, 33)
        .underlines("port");
}

#[test]
fn unknown_service_reference_suggests_a_defined_one() {
    let run = check(
        r#"version = 1
[services.mysql-deploy]
allow = [{ service = "artifact-mirorr" }]

[services.artifact-mirror]
endpoints = [{ ip = "10.20.8.10", ports = [443] }]
"#,
    );
    run.only()
        .error()
        .code("depfence::unknown_reference")
        .message("unknown service `artifact-mirorr`")
        .help("did you mean `artifact-mirror`?")
        .at("policy.toml", 3, 22)
        .underlines(r#""artifact-mirorr""#)
        .label("no such service");
}

#[test]
fn wrong_types_name_the_key_and_both_types() {
    let run = check(
        r#"version = 1
[services.web]
tier = "1"
allow = { service = "db" }
owner = 7
"#,
    );
    run.with_message("`tier` must be an integer, found string").no_help().at("policy.toml", 3, 8).underlines(r#""1""#);
    run.with_message("`allow` must be an array, found table")
        .at("policy.toml", 4, 9)
        .underlines(r#"{ service = "db" }"#);
    run.with_message("`owner` must be a string, found integer").at("policy.toml", 5, 9).underlines("7");
    assert_eq!(run.diagnostics.len(), 3, "{}", run.rendered());
}

#[test]
fn invalid_ports_are_each_reported() {
    let run = check(
        r#"version = 1
[services.api]
endpoints = [{ ip = "10.0.0.1", ports = ["8100-8000", 0, 70000, -1, "http"] }]
"#,
    );
    const PORTS_HELP: &str =
        "ports are a number (`443`), a range (`\"8000-8100\"`) or a list of them (`[443, \"8000-8100\"]`)";
    run.with_message("invalid port `8100-8000`: the range runs backwards")
        .error()
        .code("depfence::invalid_port")
        .help(PORTS_HELP)
        .at("policy.toml", 3, 42)
        .underlines(r#""8100-8000""#);
    run.with_message("invalid port `0`: port 0 is not a port; omit `ports` for any port")
        .help(PORTS_HELP)
        .at("policy.toml", 3, 55)
        .underlines("0");
    run.with_message("invalid port `70000`: ports run from 1 to 65535").at("policy.toml", 3, 58).underlines("70000");
    run.with_message("invalid port `-1`: ports run from 1 to 65535").at("policy.toml", 3, 65).underlines("-1");
    run.with_message("invalid port `http`: not a number").at("policy.toml", 3, 69).underlines(r#""http""#);
    assert_eq!(run.diagnostics.len(), 5, "{}", run.rendered());

    let run = check(
        r#"version = 1
[services.api]
allow = [{ cidr = "10.0.0.0/8", ports = [] }]
"#,
    );
    run.only().message("invalid port `[]`: the list is empty; omit `ports` for any port").underlines("[]");
}

#[test]
fn cidr_with_host_bits_suggests_the_block() {
    let run = check(
        r#"version = 1
[services.api]
allow = [
  { cidr = "10.1.2.3/16", ports = [443] },
  { cidr = "2001:db8::1/32" },
]
"#,
    );
    run.with_message("invalid cidr `10.1.2.3/16`: host bits are set")
        .error()
        .code("depfence::invalid_address")
        .help("did you mean `10.1.0.0/16`?")
        .at("policy.toml", 4, 12)
        .underlines(r#""10.1.2.3/16""#)
        .label("host bits set");
    run.with_message("invalid cidr `2001:db8::1/32`: host bits are set").help("did you mean `2001:db8::/32`?");
    assert_eq!(run.diagnostics.len(), 2, "{}", run.rendered());
}

#[test]
fn other_invalid_addresses() {
    let run = check(
        r#"version = 1
[services.api]
allow = [{ ip = "10.0.0.0/8" }, { cidr = "10.0.0.300/8" }, { ip = "db.internal" }]
"#,
    );
    run.with_message("invalid address `10.0.0.0/8`: write a block as `cidr = \"…\"`").underlines(r#""10.0.0.0/8""#);
    run.with_message("invalid cidr `10.0.0.300/8`: expected `ADDRESS/PREFIX`, e.g. `10.0.0.0/8`");
    run.with_message("invalid address `db.internal`: not an IPv4 or IPv6 address");
    assert_eq!(run.diagnostics.len(), 3, "{}", run.rendered());
}

#[test]
fn host_wildcard_only_as_first_label() {
    let run = check(
        r#"version = 1
[services.api]
allow = [{ host = "a.*.com" }, { host = "*.example.com" }, { host = "API.Example.COM." }]
"#,
    );
    run.only()
        .error()
        .code("depfence::invalid_host")
        .message("invalid host name `a.*.com`: `*` may only stand as the first label, as in `*.example.com`")
        .help("use a name such as `api.example.com`, or `*.example.com` for every name below it")
        .at("policy.toml", 3, 19)
        .underlines(r#""a.*.com""#);
}

#[test]
fn invalid_mode_in_a_service_and_an_environment() {
    let run = check(
        r#"version = 1
[environments]
qa = "strict"
prod = { mode = "audit" }
[services.web]
mode = "enforcing"
"#,
    );
    const MODE_HELP: &str = "a mode is one of `off`, `audit` or `enforce`";
    run.with_message("unknown mode `strict`").help(MODE_HELP).at("policy.toml", 3, 6).underlines(r#""strict""#);
    run.with_message("unknown mode `enforcing`")
        .error()
        .code("depfence::invalid_mode")
        .help(MODE_HELP)
        .at("policy.toml", 6, 8)
        .underlines(r#""enforcing""#)
        .label("unknown mode");
    assert_eq!(run.diagnostics.len(), 2, "{}", run.rendered());
}

#[test]
fn missing_version_points_at_the_file_start() {
    let run = check(
        r#"# a policy without a version
[services.web]
"#,
    );
    run.only()
        .error()
        .code("depfence::missing_key")
        .message("missing key `version` in the policy file")
        .at("policy.toml", 1, 1)
        .label("add `version = 1`");

    // Every file of a directory policy needs it; the error names the file that lacks it.
    let run = check_files(&[("a.toml", "version = 1\n[services.web]\n"), ("b.toml", "[services.db]\n")]);
    run.only().message("missing key `version` in the policy file").at("b.toml", 1, 1);

    let run = check("version = 2\n");
    run.only()
        .message("unsupported policy version `2`")
        .help("this build of depfence reads `version = 1`")
        .at("policy.toml", 1, 11)
        .underlines("2");
}

#[test]
fn invalid_tier_and_name() {
    let run = check(
        r#"version = 1
[services.web]
tier = 0
[services."2fast"]
"#,
    );
    run.with_message("invalid tier `0`").help("tiers run from 1 (most critical) to 9").underlines("0");
    run.with_message("invalid name `2fast`").at("policy.toml", 4, 11).underlines(r#""2fast""#);
    assert_eq!(run.diagnostics.len(), 2, "{}", run.rendered());
}

#[test]
fn destination_keys_conflict_or_are_missing() {
    let run = check(
        r#"version = 1
[services.web]
allow = [{ ip = "10.0.0.1", host = "db.internal" }, { ports = [443] }]
"#,
    );
    run.with_message("`ip` and `host` cannot be used together").at("policy.toml", 3, 29).underlines("host");
    run.with_message("an allow entry names no destination")
        .help("add one of `service`, `ip`, `cidr` or `host`")
        .underlines("{ ports = [443] }");
    assert_eq!(run.diagnostics.len(), 2, "{}", run.rendered());
}

// ---------------------------------------------------------------------------------------------
// Several files

#[test]
fn duplicate_service_across_two_files_points_at_both() {
    let run = check_files(&[
        ("storage.toml", "version = 1\n\n[services.blob-store]\nowner = \"team-storage\"\n"),
        ("platform.toml", "version = 1\n[services.scheduler]\n[services.blob-store]\nowner = \"team-platform\"\n"),
    ]);
    run.only()
        .error()
        .code("depfence::duplicate")
        .message("service `blob-store` is defined more than once")
        .help("rename or remove one of the definitions")
        .at("platform.toml", 3, 11)
        .underlines("blob-store")
        .label("defined again here")
        .notes(&[("storage.toml:3:11", "blob-store", "first defined here")]);
}

#[test]
fn model_in_two_files() {
    let run = check_files(&[
        ("base.toml", "version = 1\n[model]\nlayers = [\"base\", \"apps\"]\n"),
        ("apps.toml", "version = 1\n\n[model]\nlayers = [\"apps\"]\n"),
    ]);
    run.only()
        .error()
        .message("table `model` is defined more than once")
        .at("apps.toml", 3, 2)
        .underlines("model")
        .notes(&[("base.toml:2:2", "model", "first defined here")]);
}

#[test]
fn syntax_error_in_one_file_of_two() {
    let run = check_files(&[
        ("a.toml", "version = 1\n[services.web]\n"),
        ("b.toml", "version = 1\n[services.db\nlayer = 1\n"),
    ]);
    assert!(!run.syntax_ok);
    run.only()
        .error()
        .code("depfence::syntax")
        .message("invalid toml: unclosed table, expected `]`")
        .at("b.toml", 2, 13);
}

// ---------------------------------------------------------------------------------------------
// Name resolution

#[test]
fn unknown_environment_in_a_per_environment_mode() {
    let run = check(
        r#"version = 1
[environments]
qa = "enforce"
prod = "audit"
[services.web]
mode = { qa = "enforce", prd = "enforce" }
"#,
    );
    run.only()
        .error()
        .code("depfence::unknown_reference")
        .message("unknown environment `prd`")
        .help("did you mean `prod`?")
        .at("policy.toml", 6, 26)
        .underlines("prd")
        .label("no such environment");
}

#[test]
fn unknown_layer() {
    let run = check(
        r#"version = 1
[model]
layers = ["base", "storage", "apps"]
[services.db]
layer = "strorage"
"#,
    );
    run.only()
        .error()
        .message("unknown layer `strorage`")
        .help("did you mean `storage`?")
        .at("policy.toml", 5, 9)
        .underlines(r#""strorage""#)
        .label("no such layer");
}

#[test]
fn unknown_group_in_isolated() {
    let run = check(
        r#"version = 1
[model]
isolated = [["region-eu", "region-uss"]]
[services.eu-api]
group = "region-eu"
[services.us-api]
group = "region-us"
"#,
    );
    run.only()
        .error()
        .message("unknown group `region-uss`")
        .help("did you mean `region-us`?")
        .at("policy.toml", 3, 27)
        .underlines(r#""region-uss""#)
        .label("no such group");
}

#[test]
fn toml_syntax_error_is_located_and_stops_later_stages() {
    let run = check(
        r#"version = 1
[services.web]
allow = [{ service = "db" }
[services.db]
"#,
    );
    assert!(!run.syntax_ok);
    let first = &run.diagnostics[0];
    assert_eq!(first.problem().code(), "depfence::syntax");
    assert!(first.problem().to_string().starts_with("invalid toml: "), "{}", run.rendered());
    let p = run.sources.position(first.primary().loc);
    assert_eq!((p.file.as_str(), p.line), ("policy.toml", 4), "{}", run.rendered());
    // No resolution errors (e.g. "unknown service `db`") follow from the broken syntax.
    assert!(run.diagnostics.iter().all(|d| d.problem().code() == "depfence::syntax"), "{}", run.rendered());

    // A duplicated key is a TOML error too, located at the second one.
    let run = check("version = 1\n[services.web]\nlayer = \"a\"\nlayer = \"b\"\n");
    run.only().message("invalid toml: duplicate key").at("policy.toml", 4, 1).underlines("layer");
}

#[test]
fn several_independent_errors_in_one_file_are_all_reported() {
    let text = r#"version = 1

[environments]
qa = "enforce"

[model]
layers = ["base", "apps"]

[services.web]
layer = "app"
tier = 12
mode = { qa = "on" }
alow = []
endpoints = [{ ip = "10.0.0.1", ports = [70000] }]
allow = [
  { service = "dbb" },
  { cidr = "10.0.0.1/8" },
  { host = "a.*.example.com" },
]

[services.db]
layer = "base"
endpoints = [{ ip = "10.0.0.2", ports = [5432], proto = "sctp" }]
"#;
    let run = check(text);
    let expected = [
        ("unknown mode `on`", 12, 15),
        ("invalid tier `12`", 11, 8),
        ("unknown key `alow` in a service", 13, 1),
        ("invalid port `70000`: ports run from 1 to 65535", 14, 42),
        ("invalid cidr `10.0.0.1/8`: host bits are set", 17, 12),
        ("invalid host name `a.*.example.com`: `*` may only stand as the first label, as in `*.example.com`", 18, 12),
        ("unknown protocol `sctp`", 23, 57),
        ("unknown layer `app`", 10, 9),
        ("unknown service `dbb`", 16, 15),
    ];
    let mut seen: Vec<(String, u32, u32)> = run
        .diagnostics
        .iter()
        .map(|d| {
            let p = run.sources.position(d.primary().loc);
            (d.problem().to_string(), p.line, p.column)
        })
        .collect();
    let mut want: Vec<(String, u32, u32)> = expected.iter().map(|(m, l, c)| ((*m).to_owned(), *l, *c)).collect();
    seen.sort();
    want.sort();
    assert_eq!(seen, want, "\n{}", run.rendered());
    assert!(run.diagnostics.iter().all(|d| d.severity() == Severity::Error));
    run.with_message("unknown service `dbb`").help("did you mean `db`?");
    run.with_message("unknown layer `app`").help("did you mean `apps`?");

    // `compile_str` (what `policyctl check` runs) reports the same set in one go.
    let (sources, diagnostics) = compile_str("policy.toml", text).expect_err("invalid");
    assert_eq!(diagnostics.len(), expected.len());
    assert_eq!(sources.files().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Dependency graph

#[test]
fn isolation_violation_over_a_transitive_path() {
    let run = check(
        r#"version = 1
[model]
isolated = [["region-eu", "region-us"]]

[services.eu-svc]
group = "region-eu"
allow = [{ service = "shared" }]

[services.shared]
endpoints = [{ ip = "10.0.0.1", ports = [443] }]
allow = [{ service = "us-svc" }]

[services.us-svc]
group = "region-us"
endpoints = [{ ip = "10.0.0.2", ports = [443] }]
"#,
    );
    run.only()
        .error()
        .code("depfence::isolation_violation")
        .message("isolated group `region-eu` reaches group `region-us` via `eu-svc` -> `shared` -> `us-svc`")
        .help_contains("even transitively")
        .at("policy.toml", 7, 10)
        .underlines(r#"{ service = "shared" }"#)
        .label("`eu-svc` -> `shared`")
        .notes(&[
            ("policy.toml:11:10", r#"{ service = "us-svc" }"#, "`shared` -> `us-svc`"),
            ("policy.toml:3:13", r#"["region-eu", "region-us"]"#, "isolation declared here"),
        ]);
}

#[test]
fn isolation_counts_non_critical_dependencies_too() {
    // Isolation is about reachability, not bootstrap: a non-critical path still connects.
    let run = check(
        r#"version = 1
[model]
isolated = [["eu", "us"]]
[services.a]
group = "eu"
allow = [{ service = "b", critical = false }]
[services.b]
group = "us"
endpoints = [{ ip = "10.0.0.2" }]
"#,
    );
    run.only().message("isolated group `eu` reaches group `us` via `a` -> `b`");
}

#[test]
fn allowed_raw_ip_inside_an_endpoint_is_an_inferred_edge() {
    // `b` allows a raw block that contains `a`'s endpoint: that is a dependency on `a`, and it
    // closes the cycle a -> b -> a.
    let text = r#"version = 1
[services.a]
endpoints = [{ ip = "10.0.0.1", ports = [80] }]
allow = [{ service = "b" }]

[services.b]
endpoints = [{ ip = "10.0.0.2" }]
allow = [{ cidr = "10.0.0.0/31", ports = [80] }]
"#;
    let run = check(text);
    run.only()
        .error()
        .code("depfence::cycle")
        .message("dependency cycle `a` -> `b` -> `a`")
        .at("policy.toml", 4, 10)
        .underlines(r#"{ service = "b" }"#)
        .notes(&[("policy.toml:8:10", r#"{ cidr = "10.0.0.0/31", ports = [80] }"#, "`b` -> `a`")]);
    let parsed = depfence::policy::parse_str("policy.toml", text);
    let analysis = analyze(&parsed.policy);
    let (a, b) = (analysis.node("a").unwrap(), analysis.node("b").unwrap());
    let inferred = analysis.graphs[0].edges.iter().find(|e| e.from == b && e.to == a).unwrap();
    assert_eq!(inferred.kind, EdgeKind::Inferred);

    // No edge when the ports do not overlap the endpoint's.
    check(&text.replace("0/31\", ports = [80]", "0/31\", ports = [443]")).is_clean();
}

#[test]
fn inferred_edge_violates_a_layer() {
    // A block that covers a higher-layer service's endpoint (not just one inside it).
    let run = check(
        r#"version = 1
[model]
layers = ["base", "apps"]
[services.dns]
layer = "base"
allow = [{ cidr = "10.4.0.0/16", ports = [443], proto = "tcp" }]
[services.portal]
layer = "apps"
endpoints = [{ ip = "10.4.2.1", ports = ["443-444"], proto = "tcp" }]
"#,
    );
    run.only()
        .error()
        .code("depfence::layer_violation")
        .message("`dns` (layer `base`) depends on `portal` in the higher layer `apps`")
        .help_contains("critical = false")
        .at("policy.toml", 6, 10)
        .underlines(r#"{ cidr = "10.4.0.0/16", ports = [443], proto = "tcp" }"#)
        .label("dependency on a higher layer");
}

#[test]
fn non_critical_edge_may_close_a_cycle() {
    let text = r#"version = 1
[model]
layers = ["storage", "platform"]
[services.lock-service]
layer = "storage"
endpoints = [{ ip = "10.1.0.1", ports = [4000] }]
allow = [{ service = "monitoring", critical = false, reason = "buffers metrics" }]
[services.monitoring]
layer = "platform"
endpoints = [{ ip = "10.2.0.1", ports = [9090] }]
allow = [{ service = "lock-service" }]
"#;
    check(text).is_clean();
    let compiled = compile_str("policy.toml", text).unwrap();
    let a = &compiled.analysis;
    let (lock, mon) = (a.node("lock-service").unwrap(), a.node("monitoring").unwrap());
    let e = a.graphs[0].edges.iter().find(|e| e.from == lock && e.to == mon).unwrap();
    assert!(!e.critical);
    assert!(a.graphs[0].components.iter().all(|c| c.members.len() == 1));
    // Still a rule in the kernel, and the bootstrap starts the lock service first.
    let (_, ruleset) = compiled.snapshot.service("lock-service").unwrap();
    assert_eq!(ruleset.rules(0).net_rules.len(), 1);
    assert_eq!(compiled.snapshot.bootstrap(0), [vec![vec![lock as u32]], vec![vec![mon as u32]]]);

    // The same edge marked critical (the default) is a cycle and a layer violation.
    let run = check(&text.replace(", critical = false", ""));
    assert_eq!(run.errors().len(), 2, "{}", run.rendered());
    run.with_message("dependency cycle `lock-service` -> `monitoring` -> `lock-service`");
    run.with_message("`lock-service` (layer `storage`) depends on `monitoring` in the higher layer `platform`");
}

#[test]
fn criticality_inversion_is_a_warning() {
    let text = r#"version = 1
[services.checkout]
tier = 1
allow = [{ service = "recommendations" }]
[services.recommendations]
tier = 3
endpoints = [{ ip = "10.0.0.9", ports = [8080] }]
"#;
    let run = check(text);
    run.only()
        .warning()
        .code("depfence::criticality_inversion")
        .message("tier 1 service `checkout` depends on tier 3 service `recommendations`")
        .help_contains("no service is more reliable than its critical dependencies")
        .at("policy.toml", 4, 10)
        .underlines(r#"{ service = "recommendations" }"#);
    // A warning does not stop the compile.
    let compiled = compile_str("policy.toml", text).expect("warnings only");
    assert_eq!(compiled.analysis.diagnostics.warnings().count(), 1);
    assert!(!compiled.analysis.diagnostics.has_errors());
    // Non-critical: no warning.
    check(&text.replace(r#"{ service = "recommendations" }"#, r#"{ service = "recommendations", critical = false }"#))
        .is_clean();
}

#[test]
fn self_edge_is_allowed() {
    let text = r#"version = 1
[model]
layers = ["data"]
[services.mysql]
layer = "data"
endpoints = [{ cidr = "10.20.0.0/24", ports = [3306] }]
allow = [{ service = "mysql", reason = "replication" }]
"#;
    check(text).is_clean();
    let compiled = compile_str("policy.toml", text).unwrap();
    let a = &compiled.analysis;
    assert_eq!(a.graphs[0].edges.len(), 1);
    assert_eq!((a.graphs[0].edges[0].from, a.graphs[0].edges[0].to), (0, 0));
    assert_eq!(compiled.snapshot.bootstrap(0), [vec![vec![0]]]);
}

const TWO_CYCLE: &str = r#"version = 1
[services.controller]
endpoints = [{ ip = "10.2.1.10", ports = [7100] }]
allow = [{ service = "worker" }]

[services.worker]
endpoints = [{ cidr = "10.2.2.0/24", ports = [7200] }]
allow = [{ service = "controller" }]

[services.client]
allow = [{ service = "controller" }]
"#;

#[test]
fn declared_intrinsic_cycle_is_one_bootstrap_component() {
    let text = format!(
        "{TWO_CYCLE}\n[[intrinsic_cycles]]\nservices = [\"controller\", \"worker\"]\nreason = \"workers-controller pipeline\"\n"
    );
    check(&text).is_clean();
    let compiled = compile_str("policy.toml", &text).unwrap();
    let a = &compiled.analysis;
    let (client, controller, worker) =
        (a.node("client").unwrap(), a.node("controller").unwrap(), a.node("worker").unwrap());
    let cycle: Vec<_> = a.graphs[0].components.iter().filter(|c| c.members.len() > 1).collect();
    assert_eq!(cycle.len(), 1);
    assert_eq!(cycle[0].members, [controller, worker]);
    assert!(cycle[0].intrinsic);
    // The pair starts as one unit, before its client.
    assert_eq!(
        compiled.snapshot.bootstrap(0),
        [vec![vec![controller as u32, worker as u32]], vec![vec![client as u32]]]
    );
}

#[test]
fn undeclared_cycle_reports_the_full_path() {
    let run = check(TWO_CYCLE);
    run.only()
        .error()
        .code("depfence::cycle")
        .message("dependency cycle `controller` -> `worker` -> `controller`")
        .help_contains("[[intrinsic_cycles]]")
        .at("policy.toml", 4, 10)
        .underlines(r#"{ service = "worker" }"#)
        .label("`controller` -> `worker`")
        .notes(&[("policy.toml:8:10", r#"{ service = "controller" }"#, "`worker` -> `controller`")]);
    let (_, diagnostics) = compile_str("policy.toml", TWO_CYCLE).expect_err("a cycle is an error");
    assert!(matches!(diagnostics.errors().next().unwrap().problem(), Problem::Cycle { .. }));

    // A longer cycle: every edge is shown.
    let run = check(
        r#"version = 1
[services.a]
endpoints = [{ ip = "10.0.0.1" }]
allow = [{ service = "b" }]
[services.b]
endpoints = [{ ip = "10.0.0.2" }]
allow = [{ service = "c" }]
[services.c]
endpoints = [{ ip = "10.0.0.3" }]
allow = [{ service = "a" }]
"#,
    );
    run.only().message("dependency cycle `a` -> `b` -> `c` -> `a`").notes(&[
        ("policy.toml:7:10", r#"{ service = "c" }"#, "`b` -> `c`"),
        ("policy.toml:10:10", r#"{ service = "a" }"#, "`c` -> `a`"),
    ]);
}

#[test]
fn cycle_larger_than_the_declared_one_names_the_undeclared_service() {
    // controller <-> worker is declared, but `reporter` joined the cycle: the report must show a
    // cycle through `reporter`, not the accepted pair.
    let text = r#"version = 1
[services.controller]
endpoints = [{ ip = "10.2.1.10" }]
allow = [{ service = "worker" }]
[services.worker]
endpoints = [{ ip = "10.2.2.10" }]
allow = [{ service = "controller" }, { service = "reporter" }]
[services.reporter]
endpoints = [{ ip = "10.2.3.10" }]
allow = [{ service = "controller" }]
[[intrinsic_cycles]]
services = ["controller", "worker"]
reason = "workers-controller pipeline"
"#;
    let run = check(text);
    run.only().error().message("dependency cycle `reporter` -> `controller` -> `worker` -> `reporter`");
}

#[test]
fn stale_intrinsic_cycle_is_a_warning() {
    let run = check(
        r#"version = 1
[services.a]
endpoints = [{ ip = "10.0.0.1" }]
[services.b]
allow = [{ service = "a" }]
[[intrinsic_cycles]]
services = ["a", "b"]
reason = "used to be a cycle"
"#,
    );
    run.only().warning().message("declared intrinsic cycle `a`, `b` is not a dependency cycle").at("policy.toml", 6, 1);
}
