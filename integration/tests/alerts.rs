//! The shipped monitoring and deployment files (`deploy/`): the Prometheus alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`); a real Prometheus server
//! scrapes a fake agent and raises the audit alert; the systemd unit and the Kubernetes
//! manifest carry the agent's command line, privileges and mounts.
//!
//! `cargo test -p depfence-integration --test alerts`. No root needed. Without `promtool` or
//! `prometheus` (Debian package `prometheus`, installed by scripts/setup) those tests print why
//! they skip; under CI (`CI=true`) a skip is a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking"
)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use depfence_integration::prometheus::{Prometheus, alert_rule_tests, alert_rules, find_tool, repo_root, require_tool};

const WAIT: Duration = Duration::from_secs(60);

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn deploy(file: &str) -> PathBuf {
    repo_root().join("deploy").join(file)
}

/// Runs a tool, prints its output, and fails the test unless it succeeds.
fn run_and_print(tool: &Path, args: &[&str]) -> String {
    let output = Command::new(tool).args(args).current_dir(repo_root()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("$ {} {}\n{stdout}{stderr}", tool.display(), args.join(" "));
    assert!(output.status.success(), "{} {args:?} failed ({}):\n{stdout}{stderr}", tool.display(), output.status);
    format!("{stdout}{stderr}")
}

/// The alert names defined in the rules file, in order.
fn alert_names() -> Vec<String> {
    read(&alert_rules())
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:").map(|name| name.trim().to_owned()))
        .collect()
}

#[test]
fn promtool_checks_the_alert_rules() {
    let Some(promtool) = require_tool("promtool_checks_the_alert_rules", "promtool") else { return };
    let rules = alert_rules();
    let output = run_and_print(&promtool, &["check", "rules", &rules.display().to_string()]);
    assert!(output.contains(&format!("SUCCESS: {} rules found", alert_names().len())), "{output}");
}

#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    let Some(promtool) = require_tool("promtool_unit_tests_of_the_alert_rules_pass", "promtool") else { return };
    let output = run_and_print(&promtool, &["test", "rules", &alert_rule_tests().display().to_string()]);
    assert!(output.contains("SUCCESS"), "{output}");
}

/// Every alert has a promtool case where it fires and one where it must stay silent.
#[test]
fn every_alert_has_a_firing_and_a_silent_test_case() {
    let names = alert_names();
    assert_eq!(names.len(), 9, "{names:?}");
    let tests = read(&alert_rule_tests());
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for name in &names {
        let next_lines: Vec<&str> =
            lines.windows(2).filter(|pair| pair[0] == format!("alertname: {name}")).map(|pair| pair[1]).collect();
        assert!(next_lines.contains(&"exp_alerts:"), "{name}: no test case where it fires");
        assert!(next_lines.contains(&"exp_alerts: []"), "{name}: no test case where it stays silent");
    }
}

/// The rules use only metrics of the agent's contract, and deploy/README.md documents each.
#[test]
fn alert_rules_use_only_documented_metrics() {
    let contract = [
        "depfence_connections_total",
        "depfence_candidate_would_reject_total",
        "depfence_destination_events_total",
        "depfence_policy_generation",
        "depfence_policy_info",
        "depfence_policy_reloads_total",
        "depfence_policy_last_reload_successful",
        "depfence_policy_last_reload_success_timestamp_seconds",
        "depfence_events_dropped_total",
        "depfence_map_entries",
        "depfence_map_capacity",
        "depfence_service_mode",
        "depfence_service_mode_changed_timestamp_seconds",
        "depfence_service_cgroups",
        "depfence_state_file_errors_total",
        "depfence_evidence_lost_total",
        "depfence_connections_closed_total",
        "depfence_socket_sweep_failures_total",
    ];
    let readme = read(&deploy("README.md"));
    for metric in contract {
        assert!(readme.contains(&format!("`{metric}")), "deploy/README.md does not document {metric}");
    }
    let rules = read(&alert_rules());
    let used: std::collections::BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("depfence_"))
        .collect();
    assert!(!used.is_empty());
    for metric in &used {
        assert!(contract.contains(metric), "the alert rules use {metric}, which the agent does not export");
    }
    println!("metrics used by the alert rules: {used:?}");
}

/// A fake agent: serves `/metrics` with a would-reject counter that grows by 5 on every scrape,
/// and `web` in audit mode.
struct FakeAgent {
    addr: SocketAddr,
    scrapes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn start() -> FakeAgent {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (scrapes, stop) = (Arc::clone(&scrapes), Arc::clone(&stop));
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = serve(stream, &scrapes);
                    }
                }
            })
        };
        FakeAgent { addr, scrapes, stop, thread: Some(thread) }
    }

    fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::SeqCst)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, scrapes: &AtomicU64) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&request);
    let response = if request.starts_with("GET /metrics ") {
        let n = scrapes.fetch_add(1, Ordering::SeqCst) + 1;
        let body = format!(
            "# HELP depfence_connections_total Connections by verdict.\n\
             # TYPE depfence_connections_total counter\n\
             depfence_connections_total{{service=\"web\",verdict=\"allowed\"}} {}\n\
             depfence_connections_total{{service=\"web\",verdict=\"would_reject\"}} {}\n\
             depfence_connections_total{{service=\"web\",verdict=\"rejected\"}} 0\n\
             # HELP depfence_service_mode The service's current mode (1) and the others (0).\n\
             # TYPE depfence_service_mode gauge\n\
             depfence_service_mode{{service=\"web\",mode=\"off\"}} 0\n\
             depfence_service_mode{{service=\"web\",mode=\"audit\"}} 1\n\
             depfence_service_mode{{service=\"web\",mode=\"enforce\"}} 0\n",
            n * 100,
            n * 5
        );
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    };
    stream.write_all(response.as_bytes())
}

#[test]
fn prometheus_scrapes_a_fake_agent_and_raises_the_audit_alert() {
    let test = "prometheus_scrapes_a_fake_agent_and_raises_the_audit_alert";
    if require_tool(test, "prometheus").is_none() {
        return;
    }
    let agent = FakeAgent::start();
    let prometheus = Prometheus::start(&[agent.addr]).unwrap();
    println!("prometheus (pid {}) on {} scrapes {}", prometheus.pid(), prometheus.addr(), agent.addr);

    let up = prometheus
        .wait_for(r#"up{job="depfence"}"#, |s| s.len() == 1 && s[0].1 == 1.0, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up[0].0.get("instance").map(String::as_str), Some(agent.addr.to_string().as_str()));
    println!("up: {up:?}");

    // The counter grows by 5 a scrape: increase and rate see it once there are two samples.
    let would_reject = r#"depfence_connections_total{job="depfence",service="web",verdict="would_reject"}"#;
    let increase = prometheus
        .wait_for(&format!("increase({would_reject}[1m])"), |s| s.len() == 1 && s[0].1 > 0.0, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    println!("increase: {increase:?}");
    let rate = prometheus.query(&format!("rate({would_reject}[1m])")).unwrap();
    assert!(rate.len() == 1 && rate[0].1 > 0.0, "{rate:?}");
    assert!(agent.scrapes() >= 2, "{} scrapes", agent.scrapes());
    // A scalar comes back as one sample without labels.
    let scalar = prometheus.query("scalar(vector(42))").unwrap();
    assert_eq!(scalar, vec![(BTreeMap::new(), 42.0)]);

    // web is in audit and its would-reject counter grows: the shipped rule becomes pending (it
    // fires after its `for: 5m`).
    let alert = prometheus.wait_for_alert("DepfenceWouldRejectInAudit", WAIT).unwrap_or_else(|e| panic!("{e}"));
    println!("alert: {alert:?}");
    assert!(alert.state == "pending" || alert.state == "firing", "{alert:?}");
    assert_eq!(alert.label("service"), "web");
    assert_eq!(alert.label("severity"), "warning");
    assert!(alert.value > 0.0, "{alert:?}");
    let summary = alert.annotations.get("summary").cloned().unwrap_or_default();
    assert!(summary.contains("web") && summary.contains("not safe to promote"), "{summary}");
    // The ALERTS series carries the same alert.
    let series = prometheus.query(r#"ALERTS{alertname="DepfenceWouldRejectInAudit",service="web"}"#).unwrap();
    assert_eq!(series.len(), 1, "{series:?}");

    // Nothing else fires: no rejections, the agent is up, nothing is absent.
    let others = prometheus.other_alerts("DepfenceWouldRejectInAudit").unwrap();
    assert!(others.is_empty(), "{others:?}");
}

#[test]
fn prometheus_reports_an_agent_that_does_not_answer() {
    let test = "prometheus_reports_an_agent_that_does_not_answer";
    if require_tool(test, "prometheus").is_none() {
        return;
    }
    // A socket that is bound and listening but never accepts: scrapes time out. Keeping it
    // bound also keeps anything else from taking the port during the test.
    let hung = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let dead = hung.local_addr().unwrap();
    let prometheus = Prometheus::start(&[dead]).unwrap();
    let up = prometheus
        .wait_for(r#"up{job="depfence"}"#, |s| s.len() == 1 && s[0].1 == 0.0, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    println!("up: {up:?}");
    let alert = prometheus.wait_for_alert("DepfenceAgentDown", WAIT).unwrap_or_else(|e| panic!("{e}"));
    println!("alert: {alert:?}");
    // `for: 5m`: pending within the test's time.
    assert_eq!(alert.state, "pending");
    assert_eq!(alert.label("instance"), dead.to_string());
    assert_eq!(alert.label("severity"), "critical");
    // A query error comes back as an error, with Prometheus's message.
    let error = prometheus.query("rate(up[").unwrap_err().to_string();
    assert!(error.contains("parse error"), "{error}");
    drop(hung);
}

/// `key=value` lines of a unit file, values of repeated keys in order.
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with('[')) {
        if let Some((key, value)) = line.split_once('=') {
            settings.entry(key.trim().to_owned()).or_default().push(value.trim().to_owned());
        }
    }
    settings
}

#[test]
fn systemd_unit_runs_the_agent_with_its_privileges_and_paths() {
    let path = deploy("systemd/depfence-agent.service");
    let text = read(&path);
    let settings = unit_settings(&text);
    let one = |key: &str| -> &str {
        let values = settings.get(key).unwrap_or_else(|| panic!("{key}= is not set"));
        assert_eq!(values.len(), 1, "{key}= is set more than once");
        &values[0]
    };
    assert_eq!(one("Type"), "simple");
    assert_eq!(one("ExecStart"), "/usr/local/bin/policyctl agent --policy /etc/depfence/policy --environment prod");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("Restart"), "always");
    let caps: Vec<&str> = one("CapabilityBoundingSet").split_whitespace().collect();
    for cap in ["CAP_BPF", "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_PERFMON"] {
        assert!(caps.contains(&cap), "CapabilityBoundingSet lacks {cap}");
    }
    assert_eq!(caps.len(), 4, "{caps:?}");
    assert_eq!(one("ProtectSystem"), "strict");
    let writable: Vec<&str> = one("ReadWritePaths").split_whitespace().collect();
    assert_eq!(writable, ["/sys/fs/bpf", "/sys/fs/cgroup"]);
    assert_eq!(one("StateDirectory"), "depfence");
    assert_eq!(one("RuntimeDirectory"), "depfence");
    // Settings that would make bpffs or the cgroup tree read-only must stay off.
    for key in ["ProtectControlGroups", "ProtectKernelTunables", "PrivateNetwork", "PrivateUsers"] {
        assert!(!settings.contains_key(key), "{key}= conflicts with writing /sys/fs/bpf and /sys/fs/cgroup");
    }
    assert_eq!(one("WantedBy"), "multi-user.target");

    // systemd-analyze verify, on a copy whose ExecStart names a binary that exists here (verify
    // insists on it). It reports unknown keys and bad values as warnings: there must be none.
    let Some(analyze) = find_tool("systemd-analyze") else {
        println!("systemd-analyze is not installed: the unit was checked by the assertions above only");
        return;
    };
    let dir = std::env::temp_dir().join(depfence_integration::unique_name("depfence-unit"));
    std::fs::create_dir(&dir).unwrap();
    let copy = dir.join("depfence-agent.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/policyctl", "/bin/true")).unwrap();
    let output = Command::new(&analyze).arg("verify").arg(&copy).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("$ systemd-analyze verify depfence-agent.service\n{report}");
    assert!(output.status.success(), "{report}");
    assert!(!report.contains("depfence-agent.service"), "systemd-analyze verify warns:\n{report}");
}

/// The lines of a YAML block scalar `key: |`, de-indented (enough YAML for the ConfigMap).
fn block_scalar(text: &str, key: &str) -> String {
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().unwrap_or_else(|| panic!("no `{key}: |` block"));
    let key_indent = header.len() - header.trim_start().len();
    let block: Vec<&str> =
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent).collect();
    let indent = block.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap();
    let mut out: String =
        block.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n").trim_end().to_owned();
    out.push('\n');
    out
}

/// The ConfigMap's sample policy compiles without errors or warnings and defines the
/// environment the DaemonSet runs with.
fn check_sample_policy(policy: &str) {
    let compiled = depfence::compile::compile_str("policy.toml", policy)
        .unwrap_or_else(|(_, diagnostics)| panic!("the ConfigMap's policy does not compile: {diagnostics:?}"));
    assert!(compiled.analysis.diagnostics.is_empty(), "warnings: {:?}", compiled.analysis.diagnostics);
    let parsed = depfence::policy::parse_str("policy.toml", policy);
    let environments: Vec<&str> = parsed.policy.environments.iter().map(|e| e.name.value.as_str()).collect();
    assert!(environments.contains(&"prod"), "{environments:?}");
}

#[test]
fn kubernetes_daemonset_runs_the_agent_with_its_mounts() {
    let text = read(&deploy("kubernetes/depfence-agent.yaml"));
    for kind in ["kind: Namespace", "kind: ConfigMap", "kind: DaemonSet"] {
        assert!(text.contains(kind), "no {kind}");
    }
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    // The command line, in order.
    let args: Vec<&str> =
        lines.iter().skip_while(|l| **l != "args:").skip(1).map_while(|l| l.strip_prefix("- ")).collect();
    assert_eq!(
        args,
        [
            "agent",
            "--policy",
            "/etc/depfence/policy",
            "--environment",
            "$(DEPFENCE_ENVIRONMENT)",
            "--metrics-listen",
            "0.0.0.0:9477"
        ]
    );
    assert!(lines.windows(2).any(|w| w == ["- name: DEPFENCE_ENVIRONMENT", "value: prod"]));
    // Mounts, each from the host path of the same name; bpffs with bidirectional propagation.
    for (mount, host) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        ("/run/depfence", "/run/depfence"),
        ("/var/lib/depfence", "/var/lib/depfence"),
    ] {
        assert!(lines.contains(&format!("mountPath: {mount}").as_str()), "no mount at {mount}");
        assert!(lines.contains(&format!("path: {host}").as_str()), "no hostPath {host}");
    }
    assert!(lines.windows(2).any(|w| w == ["mountPath: /sys/fs/bpf", "mountPropagation: Bidirectional"]));
    assert!(lines.windows(2).any(|w| w == ["mountPath: /etc/depfence/policy", "readOnly: true"]));
    assert!(lines.windows(2).any(|w| w == ["configMap:", "name: depfence-policy"]));
    assert!(lines.contains(&"privileged: true"));
    // The metrics port, its probes and scrape annotations; every node.
    assert!(lines.windows(2).any(|w| w == ["- name: metrics", "containerPort: 9477"]));
    assert_eq!(lines.iter().filter(|l| **l == "path: /metrics").count(), 2, "liveness and readiness probes");
    assert!(lines.contains(&"prometheus.io/scrape: \"true\"") && lines.contains(&"prometheus.io/port: \"9477\""));
    assert!(lines.contains(&"- operator: Exists"));

    let policy = block_scalar(&text, "policy.toml");
    check_sample_policy(&policy);

    let monitor = read(&deploy("kubernetes/depfence-podmonitor.yaml"));
    assert!(monitor.contains("kind: PodMonitor") && monitor.contains("replacement: depfence"));

    // A real YAML parse where PyYAML is available (it is not part of the build's tools).
    let Some(python) = find_tool("python3") else {
        println!("python3 is not installed: the manifest was checked as text only");
        return;
    };
    let script = r#"
import json, sys
try:
    import yaml
except ImportError:
    print("NO-YAML"); sys.exit(0)
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
ds = next(d for d in docs if d["kind"] == "DaemonSet")
pod = ds["spec"]["template"]["spec"]
c = pod["containers"][0]
vols = {v["name"]: v for v in pod["volumes"]}
def source(vol):
    if "configMap" in vol:
        return "configMap:" + vol["configMap"]["name"]
    return vol.get("hostPath", {}).get("path", "")
mounts = {m["mountPath"]: source(vols[m["name"]]) for m in c["volumeMounts"]}
propagation = {m["mountPath"]: m.get("mountPropagation", "") for m in c["volumeMounts"]}
cm = next(d for d in docs if d["kind"] == "ConfigMap")
print(json.dumps({"kinds": [d["kind"] for d in docs], "args": c["args"], "mounts": mounts,
    "propagation": propagation, "ports": c["ports"], "policy": cm["data"]["policy.toml"],
    "selector": ds["spec"]["selector"]["matchLabels"] == ds["spec"]["template"]["metadata"]["labels"]}))
"#;
    let output =
        Command::new(python).arg("-c").arg(script).arg(deploy("kubernetes/depfence-agent.yaml")).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    if stdout.trim() == "NO-YAML" {
        println!("PyYAML is not installed: the manifest was checked as text only");
        return;
    }
    let parsed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(parsed["kinds"], serde_json::json!(["Namespace", "ConfigMap", "DaemonSet"]));
    assert_eq!(parsed["args"], serde_json::json!(args));
    let mounts = &parsed["mounts"];
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/depfence", "/var/lib/depfence"] {
        assert_eq!(mounts[path], path, "{path} is not the host's {path}");
    }
    assert_eq!(mounts["/etc/depfence/policy"], "configMap:depfence-policy");
    assert_eq!(parsed["propagation"]["/sys/fs/bpf"], "Bidirectional");
    assert_eq!(parsed["selector"], true);
    // The text extraction above read the same policy as the YAML parser.
    assert_eq!(parsed["policy"], policy.as_str());
    println!("parsed with PyYAML: Namespace, ConfigMap, DaemonSet; the policy is {} bytes", policy.len());
}
