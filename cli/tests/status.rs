//! `policyctl status` on a real kernel (root, cgroup v2, BPF): run inside a `policyctl run`, it
//! shows that run's pin root, its links (one per hook) into the run's cgroup, the exact fill of the rule
//! maps and the registered cgroup with its mode and counters. Skips with a reason elsewhere;
//! under CI a skip is a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking, with the value in the message"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use depfence::cgroup::Cgroup2;
use depfence::datapath::abi::{ABI_VERSION, map_names};
use depfence::lower::{CompiledRuleset, allows_from_snapshot, compile};
use serde_json::Value;

fn policyctl() -> PathBuf {
    assert_cmd::cargo::cargo_bin("policyctl")
}

fn http_server() -> u16 {
    depfence_integration::fixture::http_server(depfence_integration::fixture::LO4)
}

/// `deploy` may reach `web` (two IPv4 ports and one IPv6 address: exact rules) and one block
/// (an address-block rule).
fn policy(web_port: u16) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let text = format!(
        "version = 1\n\
         [services.web]\n\
         endpoints = [{{ ip = \"127.0.0.1\", ports = [{web_port}, 18443], proto = \"tcp\" }}, \
                      {{ ip = \"::1\", ports = [443], proto = \"tcp\" }}]\n\
         [services.deploy]\n\
         allow = [{{ service = \"web\" }}, {{ cidr = \"10.77.0.0/16\", ports = [5432], proto = \"tcp\" }}]\n"
    );
    std::fs::write(file.path(), text).unwrap();
    file
}

/// The kernel entries `policyctl run` writes for `deploy`, compiled the same way.
fn kernel_rules(policy: &Path) -> CompiledRuleset {
    let compiled = depfence::compile::compile_path(policy).unwrap();
    let (_, deploy) = compiled.snapshot.service("deploy").unwrap();
    compile(1, &allows_from_snapshot(&deploy.rules(0).net_rules)).unwrap()
}

fn bpffs() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    depfence::cgroup::mount_points(&mounts, "bpf").into_iter().next().expect("a bpffs is mounted")
}

/// Starts `policyctl run POLICY --service deploy --mode enforce -- INNER…` and returns the
/// run's pid (which names its cgroup and pin root) and its output.
fn run_enforced(policy: &Path, inner: &[&str]) -> (u32, Output) {
    let child = Command::new(policyctl())
        .args(["run", "--service", "deploy", "--mode", "enforce"])
        .arg(policy)
        .arg("--")
        .args(inner)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

/// No cgroup and no pins of run `pid` are left.
fn assert_cleaned_up(pid: u32) {
    let name = format!("depfence-run-{pid}");
    let cgroup = Cgroup2::discover().unwrap().mount().join(&name);
    assert!(!cgroup.exists(), "{} is left behind", cgroup.display());
    let pins = bpffs().join(&name);
    assert!(!pins.exists(), "{} is left behind", pins.display());
}

fn map<'a>(root: &'a Value, name: &str) -> &'a Value {
    root["maps"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("no {name}: {root}"))
}

#[test]
fn status_json_inside_a_run_shows_its_maps_links_and_cgroup() {
    if !depfence_integration::require_privileges("status_json_inside_a_run_shows_its_maps_links_and_cgroup") {
        return;
    }
    let policy = policy(18080);
    let rules = kernel_rules(policy.path());
    assert!(rules.exact.len() >= 3 && !rules.cidrs.is_empty(), "{rules:?}");

    let binary = policyctl();
    let (pid, out) = run_enforced(policy.path(), &[binary.to_str().unwrap(), "status", "--kernel", "--output", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));

    let name = format!("depfence-run-{pid}");
    let cgroup = Cgroup2::discover().unwrap().mount().join(&name);
    let root_path = bpffs().join(&name);
    let roots = status["roots"].as_array().unwrap();
    let root = roots
        .iter()
        .find(|r| r["root"] == root_path.to_str().unwrap())
        .unwrap_or_else(|| panic!("{} is not listed: {status:#}", root_path.display()));
    assert_eq!(root["abi_version"], ABI_VERSION);
    assert_eq!(root["abi_supported"], true);
    assert_eq!(root["warnings"], serde_json::json!([]), "{root:#}");

    // One link per hook, all into the run's cgroup.
    let links = root["links"].as_array().unwrap();
    let hooks: BTreeSet<&str> = links.iter().map(|l| l["attach_type"].as_str().unwrap()).collect();
    let all = [
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
        "sock_create",
        "setsockopt",
        "egress",
    ];
    assert_eq!((links.len(), hooks), (all.len(), BTreeSet::from(all)), "{root:#}");
    for link in links {
        assert_eq!(link["cgroup_path"], cgroup.to_str().unwrap(), "{link:#}");
        assert_eq!(link["cgroup_exists"], true);
        assert_eq!(link["attached"], true);
        assert_eq!(link["link_type"], "cgroup");
        let program = link["program"]["name"].as_str().unwrap();
        assert_eq!(program, format!("df_{}", link["attach_type"].as_str().unwrap()), "{link:#}");
        assert!(link["program"]["id"].as_u64().unwrap() > 0);
    }
    let cgroup_id = links[0]["cgroup_id"].as_u64().unwrap();
    assert!(links.iter().all(|l| l["cgroup_id"] == cgroup_id));

    // The rule maps hold exactly what the policy produced; one cgroup and one counter slot.
    let rules_map = map(root, "DF_RULES");
    assert_eq!(rules_map["map_type"], "hash");
    assert_eq!(rules_map["entries"], rules.exact.len() as u64, "{rules_map:#}");
    let fill = rules_map["fill"].as_f64().unwrap();
    let max = rules_map["max_entries"].as_f64().unwrap();
    assert!((fill - rules.exact.len() as f64 / max).abs() < 1e-12, "{rules_map:#}");
    assert!(rules_map["memlock_bytes"].as_u64().unwrap() > 0, "{rules_map:#}");
    assert_eq!(map(root, "DF_CIDRS")["entries"], rules.cidrs.len() as u64);
    assert_eq!(map(root, "DF_CIDRS")["map_type"], "lpm_trie");
    assert_eq!(map(root, "DF_CGROUPS")["entries"], 1);
    assert_eq!(map(root, "DF_COUNTERS")["entries"], 1);
    assert_eq!(map(root, "DF_EVENTS")["map_type"], "ringbuf");
    assert_eq!(root["maps"].as_array().unwrap().len(), map_names::ALL.len());

    // The run's cgroup is registered in enforce, with nothing counted (status connects nowhere).
    let cgroups = root["cgroups"].as_array().unwrap();
    assert_eq!(cgroups.len(), 1, "{root:#}");
    let registered = &cgroups[0];
    assert_eq!(registered["id"], cgroup_id);
    assert_eq!(registered["path"], cgroup.to_str().unwrap());
    assert_eq!(registered["exists"], true);
    assert_eq!(registered["mode"], "enforce");
    assert_eq!(registered["ruleset"], 1);
    assert_eq!(registered["candidate_ruleset"], Value::Null);
    assert_eq!(registered["generation"], 1);
    let zero = serde_json::json!({ "allowed": 0, "would_reject": 0, "rejected": 0, "candidate_would_reject": 0 });
    assert_eq!(registered["counters"], zero);
    assert_eq!(root["globals"]["events_dropped"], 0);
    assert_eq!(root["config"]["dedup_window_ns"], 1_000_000_000u64);

    // Afterwards the run's pins and cgroup are gone, and status says the root does not exist.
    assert_cleaned_up(pid);
    let after = Command::new(policyctl()).args(["status", "--pins"]).arg(&root_path).output().unwrap();
    assert_eq!(after.status.code(), Some(2));
    let message = String::from_utf8_lossy(&after.stderr);
    assert!(message.contains(&format!("`{}` does not exist", root_path.display())), "{message}");
}

#[test]
fn status_text_shows_the_counters_of_a_run() {
    if !depfence_integration::require_privileges("status_text_shows_the_counters_of_a_run") {
        return;
    }
    let (web, other) = (http_server(), http_server());
    let policy = policy(web);
    let rules = kernel_rules(policy.path());
    let bpffs = bpffs();
    // One allowed and one refused connection, then status of this run's root only ($PPID of the
    // shell is `policyctl run`).
    let curl = |port: u16| format!("curl -sS -o /dev/null http://127.0.0.1:{port}/");
    let script = format!(
        "{}; {}; exec {} status --pins {}/depfence-run-$PPID",
        curl(web),
        curl(other),
        policyctl().display(),
        bpffs.display()
    );
    let (pid, out) = run_enforced(policy.path(), &["sh", "-c", &script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    let name = format!("depfence-run-{pid}");
    let cgroup = Cgroup2::discover().unwrap().mount().join(&name);
    let lines: Vec<&str> = stdout.lines().collect();
    let header = format!("{}  ABI {ABI_VERSION}  memlock ", bpffs.join(&name).display());
    assert!(lines[0].starts_with(&header), "{stdout}");
    assert_eq!(lines.iter().filter(|l| !l.starts_with(' ')).count(), 1, "one root only: {stdout}");
    let has =
        |prefix: &str| lines.iter().any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ").starts_with(prefix));
    assert!(has(&format!("DF_RULES hash {} / ", rules.exact.len())), "{stdout}");
    assert!(has(&format!("DF_CIDRS lpm_trie {} / ", rules.cidrs.len())), "{stdout}");
    assert!(has("DF_CGROUPS hash 1 / "), "{stdout}");
    for hook in ["connect4", "connect6", "sendmsg4", "sendmsg6"] {
        let line = lines
            .iter()
            .find(|l| {
                l.trim_start()
                    .strip_prefix(hook)
                    .is_some_and(|rest| rest.trim_start().starts_with(&format!("→ {} (cgroup ", cgroup.display())))
            })
            .unwrap_or_else(|| panic!("no {hook} link line: {stdout}"));
        assert!(line.contains(&format!("df_{hook}")), "{line}");
    }
    let registered = lines
        .iter()
        .position(|l| l.trim_start().starts_with(&format!("{} (cgroup ", cgroup.display())))
        .unwrap_or_else(|| panic!("no cgroup line: {stdout}"));
    assert!(lines[registered].contains("  enforce  ruleset 1  generation 1  slot 0"), "{stdout}");
    assert_eq!(
        lines[registered + 1],
        "      allowed 1  would-reject 0  rejected 1  candidate-would-reject 0",
        "{stdout}"
    );
    assert!(stdout.contains("  events: 0 dropped (ring buffer full), "), "{stdout}");
    assert!(!stdout.contains("warning:"), "{stdout}");
    assert!(stderr.contains("policyctl run (enforce): 1 allowed, 0 would-reject, 1 rejected"), "{stderr}");
    assert_cleaned_up(pid);
}

#[test]
fn status_refuses_a_directory_that_is_not_a_pin_root() {
    let out = Command::new(policyctl()).args(["status", "--pins", "/nonexistent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "error: `/nonexistent` does not exist\n");
    assert!(out.stdout.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let out =
        Command::new(policyctl()).args(["status", "--output", "json", "--pins"]).arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        message
            .contains(&format!("`{}` is not a depfence pin root: it has no `maps/DF_META` pin", dir.path().display())),
        "{message}"
    );
    assert!(out.stdout.is_empty());
}
