//! Every policy under `policy-examples/` is parsed and compiled here.
//!
//! Each `*.toml` file directly under `policy-examples/` is one policy, and so is each
//! subdirectory (all its `*.toml` files merged, as `policyctl check DIR` does), except
//! `broken/`: every file there must fail exactly as its entry in [`broken_expectation`] says.
//! The walk is over the file system, so a new example is tested as soon as it exists; a file
//! that fits none of these shapes fails [`every_example_file_is_classified`].

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers outside #[test] functions: a failing test should say where"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use depfence::compile::{Analysis, Compiled, EdgeKind, compile, compile_str};
use depfence::diag::{Diagnostic, Severity, Sources};
use depfence::policy::{Mode, PortRange, Proto, load};
use depfence::problem::Problem;
use depfence::snapshot::{Connection, Snapshot};
use depfence::verdict::Verdict;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples")
}

const BROKEN: &str = "broken";

/// What a path under `policy-examples/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A policy file directly under `policy-examples/`.
    GoodFile,
    /// A `*.toml` file inside a good directory policy (the directory is the policy).
    GoodDirectoryMember(PathBuf),
    /// A file under `broken/`.
    Broken,
    /// Documentation, not a policy.
    Documentation,
    /// Anything else: a test failure.
    Unclassified(&'static str),
}

fn classify(root: &Path, file: &Path) -> Kind {
    let relative = file.strip_prefix(root).expect("under the examples directory");
    let components: Vec<&str> = relative.iter().map(|c| c.to_str().expect("UTF-8 path")).collect();
    let name = components.last().copied().unwrap_or_default();
    let is_toml = file.extension().is_some_and(|e| e == "toml");
    if name.ends_with(".md") {
        return Kind::Documentation;
    }
    if components.iter().any(|c| c.starts_with('.')) {
        // `policy::load` skips hidden entries, so such a file would silently not be part of
        // any policy.
        return Kind::Unclassified("hidden files are not read by `policy::load`");
    }
    if !is_toml {
        return Kind::Unclassified("not a `*.toml` policy file (`policy::load` would ignore it)");
    }
    match components.as_slice() {
        [_] => Kind::GoodFile,
        [first, ..] if *first == BROKEN => Kind::Broken,
        [first, ..] => Kind::GoodDirectoryMember(root.join(first)),
        [] => Kind::Unclassified("empty path"),
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn all_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    walk(&examples_dir(), &mut files);
    files
}

/// The good policies: top-level files and top-level directories other than `broken/`.
fn good_examples() -> Vec<PathBuf> {
    let root = examples_dir();
    let mut policies = BTreeSet::new();
    for file in all_files() {
        match classify(&root, &file) {
            Kind::GoodFile => {
                policies.insert(file);
            }
            Kind::GoodDirectoryMember(dir) => {
                policies.insert(dir);
            }
            _ => {}
        }
    }
    policies.into_iter().collect()
}

fn broken_examples() -> Vec<PathBuf> {
    let root = examples_dir();
    all_files().into_iter().filter(|f| classify(&root, f) == Kind::Broken).collect()
}

fn rendered(sources: &Sources, diagnostics: impl IntoIterator<Item = Diagnostic>) -> String {
    diagnostics.into_iter().map(|d| d.to_plain(sources)).collect::<Vec<_>>().join("\n")
}

/// Loads a good example (file or directory) and compiles it; fails with the rendered
/// diagnostics when anything at all is reported, warnings included: the examples are what
/// teams copy, so they are kept clean.
fn compile_example(path: &Path) -> (Sources, Compiled) {
    let parsed = load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sources = parsed.policy.sources.clone();
    assert!(parsed.syntax_ok, "{}: invalid TOML:\n{}", path.display(), rendered(&sources, parsed.diagnostics));
    assert!(
        parsed.diagnostics.is_empty(),
        "{}: parse diagnostics:\n{}",
        path.display(),
        rendered(&sources, parsed.diagnostics)
    );
    let compiled = match compile(&parsed.policy) {
        Ok(compiled) => compiled,
        Err(depfence::compile::CompileError::Invalid { diagnostics: diags, .. }) => {
            panic!("{}: invalid:\n{}", path.display(), rendered(&sources, diags))
        }
        Err(other) => panic!("{}: {other}", path.display()),
    };
    assert!(
        compiled.analysis.diagnostics.is_empty(),
        "{}: warnings:\n{}",
        path.display(),
        rendered(&sources, compiled.analysis.diagnostics.clone())
    );
    (sources, compiled)
}

fn example(name: &str) -> (Sources, Compiled) {
    compile_example(&examples_dir().join(name))
}

fn edge(analysis: &Analysis, from: &str, to: &str) -> Option<depfence::compile::Edge> {
    let (from, to) = (analysis.node(from)?, analysis.node(to)?);
    analysis.graphs[0].edges.iter().find(|e| e.from == from && e.to == to).cloned()
}

/// Services reachable from `from` over every dependency (critical or not).
fn reachable(analysis: &Analysis, from: &str) -> BTreeSet<String> {
    let mut adj = vec![Vec::new(); analysis.nodes.len()];
    for e in &analysis.graphs[0].edges {
        adj[e.from].push(e.to);
    }
    let start = analysis.node(from).expect("service exists");
    depfence::graph::reachable_from(&adj, start)
        .iter()
        .enumerate()
        .filter(|&(_, &r)| r)
        .map(|(i, _)| analysis.name(i).to_owned())
        .collect()
}

/// Stage index of every service in the bootstrap order.
fn stage_of(analysis: &Analysis, service: &str) -> usize {
    let node = analysis.node(service).expect("service exists");
    analysis.graphs[0]
        .stages
        .iter()
        .position(|s| s.components.iter().any(|&c| analysis.graphs[0].components[c].members.contains(&node)))
        .unwrap_or_else(|| panic!("`{service}` is in no bootstrap stage"))
}

fn conn(addr: &str, port: u16, proto: Proto) -> Connection {
    Connection { addr: addr.parse().unwrap(), port, proto }
}

fn verdict(snapshot: &Snapshot, service: &str, env: &str, c: &Connection) -> Verdict {
    let (_, ruleset) = snapshot.service(service).expect("service exists");
    ruleset.decide(snapshot.environment_index(env).expect("environment exists"), c).verdict
}

// ---------------------------------------------------------------------------------------------
// The walk itself

#[test]
fn every_example_file_is_classified() {
    let root = examples_dir();
    let files = all_files();
    assert!(!files.is_empty(), "no files under {}", root.display());
    let mut problems = Vec::new();
    for file in &files {
        match classify(&root, file) {
            Kind::Unclassified(why) => problems.push(format!("{}: {why}", file.display())),
            Kind::Broken if broken_expectation(file).is_none() => problems.push(format!(
                "{}: a broken example without an expectation; add it to `broken_expectation`",
                file.display()
            )),
            _ => {}
        }
    }
    assert!(problems.is_empty(), "example files that are neither good nor broken:\n{}", problems.join("\n"));
}

#[test]
fn the_walk_finds_the_documented_examples() {
    let root = examples_dir();
    let good: BTreeSet<String> =
        good_examples().iter().map(|p| p.strip_prefix(&root).unwrap().display().to_string()).collect();
    for name in ["quickstart.toml", "github-deploy.toml", "layered-bootstrap", "isolated-regions.toml"] {
        assert!(good.contains(name), "`{name}` not found among {good:?}");
    }
    assert!(!good.contains(BROKEN), "broken/ must not be compiled as a good policy");
    let broken: Vec<_> = broken_examples().iter().map(|p| p.strip_prefix(&root).unwrap().to_owned()).collect();
    assert!(broken.contains(&PathBuf::from("broken/cycle-and-layer.toml")), "{broken:?}");
}

#[test]
fn every_good_example_compiles_cleanly() {
    let good = good_examples();
    assert!(good.len() >= 4, "{good:?}");
    for path in good {
        let (_, compiled) = compile_example(&path);
        let snapshot = &compiled.snapshot;
        assert!(!snapshot.services().is_empty(), "{}: no services", path.display());
        // Clean policies bootstrap: every service has a stage.
        let staged: usize = snapshot.bootstrap(0).iter().flatten().map(Vec::len).sum();
        assert_eq!(staged, snapshot.services().len(), "{}: bootstrap {:?}", path.display(), snapshot.bootstrap(0));
        // What the agent would load is what the compiler produced.
        let bytes = snapshot.to_bytes().unwrap();
        assert_eq!(&Snapshot::from_bytes(&bytes).unwrap(), snapshot, "{}", path.display());
    }
}

#[test]
fn every_broken_example_fails_as_documented() {
    let broken = broken_examples();
    assert!(!broken.is_empty());
    for path in broken {
        let check = broken_expectation(&path).unwrap_or_else(|| panic!("{}: no expectation", path.display()));
        let parsed = load(&path).unwrap();
        let sources = parsed.policy.sources.clone();
        assert!(parsed.syntax_ok, "{}", path.display());
        let mut diagnostics: Vec<Diagnostic> = parsed.diagnostics.into_iter().collect();
        let analysis = depfence::compile::analyze(&parsed.policy);
        diagnostics.extend(analysis.diagnostics.clone());
        assert!(compile(&parsed.policy).is_err(), "{}: compiled although broken", path.display());
        check(&sources, &diagnostics);
    }
}

// ---------------------------------------------------------------------------------------------
// broken/

type Expectation = fn(&Sources, &[Diagnostic]);

/// The expected failure of each file under `broken/`, by file name.
fn broken_expectation(path: &Path) -> Option<Expectation> {
    match path.file_name()?.to_str()? {
        "cycle-and-layer.toml" => Some(expect_cycle_and_layer),
        _ => None,
    }
}

/// A label as the user sees it: `line:column`, the underlined text, the label text.
fn seen(sources: &Sources, label: &depfence::diag::Label) -> (u32, u32, String, String) {
    let position = sources.position(label.loc);
    (position.line, position.column, sources.snippet(label.loc).to_owned(), label.text.clone())
}

fn expect_cycle_and_layer(sources: &Sources, diagnostics: &[Diagnostic]) {
    let all = rendered(sources, diagnostics.iter().cloned());
    assert_eq!(diagnostics.len(), 2, "exactly two problems expected:\n{all}");
    assert!(diagnostics.iter().all(|d| d.severity() == Severity::Error), "{all}");

    let cycle = diagnostics
        .iter()
        .find(|d| matches!(d.problem(), Problem::Cycle { .. }))
        .unwrap_or_else(|| panic!("no cycle error:\n{all}"));
    let layer = diagnostics
        .iter()
        .find(|d| matches!(d.problem(), Problem::LayerViolation { .. }))
        .unwrap_or_else(|| panic!("no layer violation:\n{all}"));

    // Both point into the broken file.
    for d in [cycle, layer] {
        let position = sources.position(d.primary().loc);
        assert!(Path::new(&position.file).ends_with("broken/cycle-and-layer.toml"), "{position}");
    }

    // The cycle: the whole path in the message, the first edge underlined, a note on the other.
    assert_eq!(cycle.problem().to_string(), "dependency cycle `job-queue` -> `scheduler` -> `job-queue`");
    assert_eq!(cycle.problem().code(), "depfence::cycle");
    assert!(cycle.problem().help().unwrap().contains("[[intrinsic_cycles]]"));
    assert_eq!(
        seen(sources, cycle.primary()),
        (19, 3, r#"{ service = "scheduler" }"#.to_owned(), "`job-queue` -> `scheduler`".to_owned())
    );
    let notes: Vec<_> = cycle.secondary().iter().map(|l| seen(sources, l)).collect();
    assert_eq!(notes, [(26, 3, r#"{ service = "job-queue" }"#.to_owned(), "`scheduler` -> `job-queue`".to_owned())]);

    // The layer violation: the allow entry of the lower service.
    assert_eq!(
        layer.problem().to_string(),
        "`log-shipper` (layer `infra`) depends on `dashboard` in the higher layer `apps`"
    );
    assert!(layer.problem().help().unwrap().contains("critical = false"));
    assert_eq!(
        seen(sources, layer.primary()),
        (33, 3, r#"{ service = "dashboard", ports = [443] }"#.to_owned(), "dependency on a higher layer".to_owned())
    );
    assert!(layer.secondary().is_empty());

    // The one-line rendering the CLI prints.
    let cycle_line = cycle.to_plain(sources);
    assert!(
        cycle_line.contains("broken/cycle-and-layer.toml:19:3: error[depfence::cycle]: dependency cycle"),
        "{cycle_line}"
    );
    assert!(cycle_line.ends_with("broken/cycle-and-layer.toml:26:3: `scheduler` -> `job-queue`)"), "{cycle_line}");
}

// ---------------------------------------------------------------------------------------------
// quickstart.toml

#[test]
fn quickstart_rules_and_modes() {
    let (_, compiled) = example("quickstart.toml");
    let snapshot = &compiled.snapshot;
    let envs: Vec<_> = snapshot.environments().iter().map(|e| (e.name.as_str(), e.mode)).collect();
    assert_eq!(envs, [("prod", Mode::Audit), ("qa", Mode::Enforce)]);

    let names: Vec<_> = snapshot.services().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["orders-api", "orders-db", "storefront"]);
    let (api_id, _) = snapshot.service("orders-api").unwrap();

    // storefront: the orders API through its endpoint (a /28 with a port range), and the
    // payment provider's block on 443.
    let (_, storefront) = snapshot.service("storefront").unwrap();
    let rules: Vec<_> =
        storefront.rules(0).net_rules.iter().map(|r| (r.net.to_string(), r.proto, r.ports, r.target)).collect();
    assert_eq!(
        rules,
        [
            ("10.0.2.0/28".to_owned(), Proto::Tcp, PortRange { first: 8000, last: 8100 }, Some(api_id)),
            ("198.51.100.0/24".to_owned(), Proto::Tcp, PortRange::single(443), None),
        ]
    );
    assert!(storefront.rules(0).host_rules.is_empty());
    assert_eq!(storefront.modes, [Mode::Audit, Mode::Enforce]);
    assert_eq!(storefront.owner.as_deref(), Some("team-web"));

    // orders-db allows nothing and was promoted to enforce in prod.
    let (_, db) = snapshot.service("orders-db").unwrap();
    assert!(db.rules(0).net_rules.is_empty() && db.rules(0).host_rules.is_empty());
    assert_eq!(db.modes, [Mode::Enforce, Mode::Enforce]);

    // What the kernel would do.
    let inside = conn("10.0.2.5", 8100, Proto::Tcp);
    let wrong_port = conn("10.0.2.5", 8101, Proto::Tcp);
    assert_eq!(verdict(snapshot, "storefront", "prod", &inside), Verdict::Allowed);
    assert_eq!(verdict(snapshot, "storefront", "qa", &inside), Verdict::Allowed);
    assert_eq!(verdict(snapshot, "storefront", "prod", &wrong_port), Verdict::WouldReject);
    assert_eq!(verdict(snapshot, "storefront", "qa", &wrong_port), Verdict::Rejected);
    assert_eq!(verdict(snapshot, "orders-db", "prod", &conn("198.51.100.1", 443, Proto::Tcp)), Verdict::Rejected);

    // Dependencies: storefront -> orders-api -> orders-db, started bottom-up.
    let a = &compiled.analysis;
    assert!(edge(a, "storefront", "orders-api").is_some());
    assert!(edge(a, "orders-api", "orders-db").is_some());
    assert!(stage_of(a, "orders-db") < stage_of(a, "orders-api"));
    assert!(stage_of(a, "orders-api") < stage_of(a, "storefront"));
}

// ---------------------------------------------------------------------------------------------
// github-deploy.toml

#[test]
fn github_deploy_tooling_does_not_depend_on_the_frontend() {
    let (_, compiled) = example("github-deploy.toml");
    let a = &compiled.analysis;

    // The deploy script reaches the database and the mirror, and nothing that needs the
    // database: no edge, declared or inferred, and no path to the frontend.
    assert!(edge(a, "mysql-deploy", "mysql").is_some());
    assert!(edge(a, "mysql-deploy", "artifact-mirror").is_some());
    assert!(edge(a, "mysql-deploy", "github-web").is_none());
    let reach = reachable(a, "mysql-deploy");
    assert!(!reach.contains("github-web"), "{reach:?}");
    assert_eq!(reach, BTreeSet::from(["artifact-mirror".to_owned(), "mysql".to_owned()]));
    assert!(edge(a, "github-web", "mysql").is_some());

    // The layer model orders the recovery: data, then the deploy tooling, then the frontend.
    assert_eq!(a.layers, ["data", "deploy-tooling", "product"]);
    assert!(stage_of(a, "mysql") < stage_of(a, "mysql-deploy"));
    assert!(stage_of(a, "artifact-mirror") < stage_of(a, "mysql-deploy"));
    assert!(stage_of(a, "mysql-deploy") < stage_of(a, "github-web"));

    // In the kernel: the deploy script's cgroup, enforced even in production, refuses the
    // frontend and allows the mirror.
    let snapshot = &compiled.snapshot;
    let (web_id, _) = snapshot.service("github-web").unwrap();
    let (_, deploy) = snapshot.service("mysql-deploy").unwrap();
    assert_eq!(deploy.selector, Some(depfence::policy::Selector::Path("system.slice/mysql-deploy.service".to_owned())));
    assert!(deploy.rules(0).net_rules.iter().all(|r| r.target != Some(web_id)));
    assert!(deploy.rules(0).host_rules.iter().all(|r| r.target != Some(web_id)));
    assert_eq!(
        verdict(snapshot, "mysql-deploy", "production", &conn("192.0.2.10", 443, Proto::Tcp)),
        Verdict::Rejected
    );
    assert_eq!(verdict(snapshot, "mysql-deploy", "production", &conn("10.20.8.10", 443, Proto::Tcp)), Verdict::Allowed);
    assert_eq!(verdict(snapshot, "mysql-deploy", "production", &conn("10.20.0.7", 3306, Proto::Tcp)), Verdict::Allowed);
    // The frontend itself is only audited in production.
    assert_eq!(
        verdict(snapshot, "github-web", "production", &conn("10.20.8.10", 22, Proto::Tcp)),
        Verdict::WouldReject
    );
}

/// The text of github-deploy.toml with one more entry in mysql-deploy's allow list.
fn github_deploy_with(extra_allow: &str) -> String {
    let text = std::fs::read_to_string(examples_dir().join("github-deploy.toml")).unwrap();
    let anchor = "  { service = \"artifact-mirror\" },\n";
    assert_eq!(text.matches(anchor).count(), 1, "anchor must be unique");
    text.replace(anchor, &format!("{anchor}  {extra_allow},\n"))
}

#[test]
fn github_deploy_adding_the_frontend_is_rejected() {
    // As the comment in the example says: naming the frontend is a layer violation ...
    let (sources, diags) = compile_str("github-deploy.toml", &github_deploy_with(r#"{ service = "github-web" }"#))
        .expect_err("must not compile");
    let errors: Vec<_> = diags.errors().collect();
    assert_eq!(errors.len(), 1, "{}", rendered(&sources, diags.clone()));
    assert_eq!(
        errors[0].problem().to_string(),
        "`mysql-deploy` (layer `deploy-tooling`) depends on `github-web` in the higher layer `product`"
    );
    assert_eq!(sources.snippet(errors[0].primary().loc), r#"{ service = "github-web" }"#);

    // ... and so is hiding it behind its address block: the edge is inferred.
    for raw in [r#"{ cidr = "192.0.2.0/24", ports = [443] }"#, r#"{ cidr = "0.0.0.0/0" }"#, r#"{ ip = "192.0.2.77" }"#]
    {
        let text = github_deploy_with(raw);
        let parsed = depfence::policy::parse_str("github-deploy.toml", &text);
        let analysis = depfence::compile::analyze(&parsed.policy);
        let e = edge(&analysis, "mysql-deploy", "github-web").unwrap_or_else(|| panic!("{raw}: no inferred edge"));
        assert_eq!(e.kind, EdgeKind::Inferred);
        let errors: Vec<_> = analysis.diagnostics.errors().collect();
        assert_eq!(errors.len(), 1, "{raw}: {}", rendered(&parsed.policy.sources, analysis.diagnostics.clone()));
        assert!(matches!(errors[0].problem(), Problem::LayerViolation { to, .. } if to == "github-web"));
        assert_eq!(parsed.policy.sources.snippet(errors[0].primary().loc), raw);
    }
}

// ---------------------------------------------------------------------------------------------
// layered-bootstrap/

const LAYERED_FILES: [&str; 4] = ["base.toml", "edge.toml", "platform.toml", "storage.toml"];

#[test]
fn layered_bootstrap_reads_every_team_file() {
    let (sources, compiled) = example("layered-bootstrap");
    let names: Vec<String> =
        sources.files().iter().map(|f| Path::new(f.name()).file_name().unwrap().to_str().unwrap().to_owned()).collect();
    assert_eq!(names, LAYERED_FILES, "files are read in path order");
    for file in sources.files() {
        assert!(Path::new(file.name()).starts_with(examples_dir().join("layered-bootstrap")), "{}", file.name());
        let on_disk = std::fs::read_to_string(file.name()).unwrap();
        assert_eq!(file.text(), on_disk);
    }
    // Explain can point into each file.
    let debug = compiled.snapshot.debug_info();
    assert_eq!(debug.files.len(), 4);
    let used: BTreeSet<u32> = debug.origins.iter().flat_map(|o| o.iter().map(|o| o.file)).collect();
    assert_eq!(used, BTreeSet::from([0, 1, 2, 3]));
}

#[test]
fn layered_bootstrap_starts_bottom_up() {
    let (sources, compiled) = example("layered-bootstrap");
    let a = &compiled.analysis;
    assert_eq!(a.layers, ["base", "storage", "platform", "edge"]);

    // Each team's file holds one layer; every stage of one file comes before every stage of
    // the next layer's file.
    let parsed = load(&examples_dir().join("layered-bootstrap")).unwrap();
    let file_of = |service: &str| {
        let s = parsed.policy.services.iter().find(|s| s.name.value == service).unwrap();
        let name = sources.position(s.name.loc).file;
        Path::new(&name).file_name().unwrap().to_str().unwrap().to_owned()
    };
    let stages_of_file = |file: &str| -> Vec<usize> {
        a.nodes.iter().filter(|n| file_of(&n.name) == file).map(|n| stage_of(a, &n.name)).collect()
    };
    let order = ["base.toml", "storage.toml", "platform.toml", "edge.toml"];
    for pair in order.windows(2) {
        let lower = stages_of_file(pair[0]);
        let upper = stages_of_file(pair[1]);
        assert!(!lower.is_empty() && !upper.is_empty());
        assert!(
            lower.iter().max() < upper.iter().min(),
            "{} stages {lower:?} must all come before {} stages {upper:?}",
            pair[0],
            pair[1]
        );
    }
    // Stages carry their layer, and a service's stage has its layer.
    for node in &a.nodes {
        assert_eq!(a.graphs[0].stages[stage_of(a, &node.name)].layer, node.layer, "{}", node.name);
    }
    // Within a layer, dependencies first.
    assert!(stage_of(a, "ntp") < stage_of(a, "config-store"));
    assert!(stage_of(a, "config-store") < stage_of(a, "dns"));
    assert!(stage_of(a, "lock-service") < stage_of(a, "blob-store"));
    assert!(stage_of(a, "frontend") < stage_of(a, "load-balancer"));
}

#[test]
fn layered_bootstrap_intrinsic_cycle_is_one_supernode() {
    let (_, compiled) = example("layered-bootstrap");
    let a = &compiled.analysis;
    let controller = a.node("batch-controller").unwrap();
    let worker = a.node("batch-worker").unwrap();

    let cycles: Vec<_> = a.graphs[0].components.iter().filter(|c| c.members.len() > 1).collect();
    assert_eq!(cycles.len(), 1, "{:?}", a.graphs[0].components);
    assert_eq!(cycles[0].members, [controller, worker]);
    assert!(cycles[0].intrinsic);
    assert!(a.graphs[0].components.iter().filter(|c| c.members.len() == 1).all(|c| !c.intrinsic));

    // Both start in the same stage, as one component.
    let stage = stage_of(a, "batch-controller");
    assert_eq!(stage, stage_of(a, "batch-worker"));
    let in_stage: Vec<_> =
        a.graphs[0].stages[stage].components.iter().map(|&c| a.graphs[0].components[c].members.clone()).collect();
    assert!(in_stage.contains(&vec![controller, worker]), "{in_stage:?}");
    // And the snapshot's bootstrap lists them as one group.
    let groups: Vec<&Vec<u32>> = compiled.snapshot.bootstrap(0).iter().flatten().collect();
    assert!(groups.contains(&&vec![controller as u32, worker as u32]), "{groups:?}");
    assert_eq!(groups.iter().filter(|g| g.len() > 1).count(), 1);
    assert!(a.graphs[0].violations.is_empty());
}

#[test]
fn layered_bootstrap_non_critical_dependencies() {
    let (_, compiled) = example("layered-bootstrap");
    let a = &compiled.analysis;
    // storage -> platform and platform -> edge: upward, so only acceptable because non-critical.
    for (from, to) in [("lock-service", "monitoring"), ("monitoring", "frontend"), ("frontend", "batch-controller")] {
        let e = edge(a, from, to).unwrap_or_else(|| panic!("{from} -> {to}"));
        assert!(!e.critical, "{from} -> {to} must be non-critical");
    }
    let layer = |s: &str| a.nodes[a.node(s).unwrap()].layer;
    assert!(layer("monitoring") > layer("lock-service"));
    assert!(layer("frontend") > layer("monitoring"));
    // Without critical = false, monitoring would have to start before the lock service it
    // depends on: a cycle through the layers. With it, the order is lock service first.
    assert!(reachable(a, "monitoring").contains("lock-service"));
    assert!(stage_of(a, "lock-service") < stage_of(a, "monitoring"));

    // Still enforced in the kernel: the lock service may push to monitoring.
    let snapshot = &compiled.snapshot;
    let (monitoring_id, _) = snapshot.service("monitoring").unwrap();
    let (_, lock) = snapshot.service("lock-service").unwrap();
    let to_monitoring: Vec<_> = lock
        .rules(0)
        .net_rules
        .iter()
        .filter(|r| r.target == Some(monitoring_id))
        .map(|r| (r.net.to_string(), r.ports))
        .collect();
    assert_eq!(
        to_monitoring,
        [("10.2.3.10/32".to_owned(), PortRange::single(9090)), ("10.2.3.10/32".to_owned(), PortRange::single(9091))]
    );
    for env in ["staging", "dr-drill"] {
        assert_eq!(verdict(snapshot, "lock-service", env, &conn("10.2.3.10", 9091, Proto::Tcp)), Verdict::Allowed);
        assert_eq!(verdict(snapshot, "lock-service", env, &conn("10.2.3.10", 9092, Proto::Tcp)), Verdict::Rejected);
    }
    // Tiers are consistent: no critical dependency on a less critical service.
    for e in a.graphs[0].edges.iter().filter(|e| e.critical && e.from != e.to) {
        let (from, to) = (&a.nodes[e.from], &a.nodes[e.to]);
        assert!(to.tier <= from.tier, "{} (tier {:?}) -> {} (tier {:?})", from.name, from.tier, to.name, to.tier);
    }
}

// ---------------------------------------------------------------------------------------------
// isolated-regions.toml

#[test]
fn isolated_regions_never_reach_each_other() {
    let (_, compiled) = example("isolated-regions.toml");
    let a = &compiled.analysis;
    let group = |g: &str| -> BTreeSet<String> {
        a.nodes.iter().filter(|n| n.group.as_deref() == Some(g)).map(|n| n.name.clone()).collect()
    };
    let (eu, us) = (group("region-eu"), group("region-us"));
    assert_eq!(eu, BTreeSet::from(["eu-api".to_owned(), "eu-db".to_owned()]));
    assert_eq!(us, BTreeSet::from(["us-api".to_owned(), "us-db".to_owned()]));
    for (from, to) in [(&eu, &us), (&us, &eu)] {
        for service in from {
            let reach = reachable(a, service);
            assert!(reach.is_disjoint(to), "{service} reaches {:?}", reach.intersection(to).collect::<Vec<_>>());
        }
    }
    // Global services are used by both regions and depend on neither.
    for global in ["global-dns", "global-time"] {
        let reach = reachable(a, global);
        assert!(reach.is_disjoint(&eu) && reach.is_disjoint(&us), "{global} reaches {reach:?}");
        assert!(edge(a, "eu-api", global).is_some() && edge(a, "us-api", global).is_some());
    }
    // The raw IPv6 block in eu-api's allow list is an (inferred) edge to eu-db.
    assert_eq!(edge(a, "eu-api", "eu-db").map(|e| e.kind), Some(EdgeKind::Inferred));
}

#[test]
fn isolated_regions_ipv6_rules() {
    let (_, compiled) = example("isolated-regions.toml");
    let snapshot = &compiled.snapshot;
    let eu_db = conn("2001:db8:e1:5::10", 5432, Proto::Tcp);
    let us_db = conn("2001:db8:a1:5::10", 5432, Proto::Tcp);
    let dns6 = conn("2001:db8:53::53", 53, Proto::Udp);
    assert_eq!(verdict(snapshot, "eu-api", "staging", &eu_db), Verdict::Allowed);
    assert_eq!(verdict(snapshot, "eu-api", "staging", &dns6), Verdict::Allowed);
    assert_eq!(verdict(snapshot, "eu-api", "staging", &us_db), Verdict::Rejected);
    assert_eq!(verdict(snapshot, "eu-api", "prod", &us_db), Verdict::WouldReject);
    assert_eq!(verdict(snapshot, "us-api", "staging", &us_db), Verdict::Allowed);
    assert_eq!(verdict(snapshot, "us-api", "staging", &conn("10.50.5.10", 5432, Proto::Tcp)), Verdict::Allowed);
    assert_eq!(verdict(snapshot, "us-api", "staging", &eu_db), Verdict::Rejected);
    // IPv4-mapped IPv6 destinations are judged as IPv4.
    assert_eq!(verdict(snapshot, "us-api", "staging", &conn("::ffff:10.50.5.10", 5432, Proto::Tcp)), Verdict::Allowed);
    let (eu_db_id, _) = snapshot.service("eu-db").unwrap();
    let (_, eu_api) = snapshot.service("eu-api").unwrap();
    let rule = eu_api.decide(snapshot.environment_index("staging").unwrap(), &eu_db).rule.unwrap();
    assert_eq!(rule.net.to_string(), "2001:db8:e1::/48");
    assert_eq!(rule.target, Some(eu_db_id), "the raw block reaches exactly eu-db");
}

#[test]
fn isolated_regions_a_global_service_must_not_bridge_regions() {
    // If the global DNS came to depend on a US service, the EU would reach the US through it.
    let text = std::fs::read_to_string(examples_dir().join("isolated-regions.toml")).unwrap();
    let anchor = "allow = [{ service = \"global-time\" }]\n";
    assert_eq!(text.matches(anchor).count(), 1);
    let bridged = text.replace(anchor, "allow = [{ service = \"global-time\" }, { service = \"us-db\" }]\n");
    let (sources, diags) = compile_str("isolated-regions.toml", &bridged).expect_err("must not compile");
    let errors: Vec<_> = diags.errors().collect();
    let all = rendered(&sources, diags.clone());
    // global-dns (layer global) -> us-db (layer regional) is also a layer violation.
    assert!(errors.iter().any(|d| matches!(d.problem(), Problem::LayerViolation { .. })), "{all}");
    let isolation: Vec<_> =
        errors.iter().filter(|d| matches!(d.problem(), Problem::IsolationViolation { .. })).collect();
    assert_eq!(isolation.len(), 1, "{all}");
    assert_eq!(
        isolation[0].problem().to_string(),
        "isolated group `region-eu` reaches group `region-us` via `eu-api` -> `global-dns` -> `us-db`"
    );
}

/// Each broken example's diagnostics as `policyctl check` prints them in plain form, with the
/// help lines, reviewed as insta snapshots (`tests/snapshots/examples__broken-NAME.snap`; a new
/// broken example fails until its snapshot is reviewed with `cargo insta review`).
#[test]
fn broken_examples_render_as_reviewed() {
    let root = format!("{}/", examples_dir().display());
    for path in broken_examples() {
        let parsed = load(&path).unwrap();
        let sources = parsed.policy.sources.clone();
        let mut diagnostics: Vec<Diagnostic> = parsed.diagnostics.into_iter().collect();
        diagnostics.extend(depfence::compile::analyze(&parsed.policy).diagnostics);
        let mut text = String::new();
        for d in &diagnostics {
            text.push_str(&d.to_plain(&sources));
            text.push('\n');
            if let Some(help) = d.problem().help() {
                text.push_str(&format!("  help: {help}\n"));
            }
        }
        // Paths relative to the repository, wherever it is checked out.
        let text = text.replace(&root, "policy-examples/");
        let name = path.file_stem().unwrap().to_str().unwrap();
        insta::assert_snapshot!(format!("broken-{name}"), text);
    }
}
