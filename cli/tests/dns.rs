//! Host-name rules end to end (root): a real `policyctl agent` with its DNS proxy, a dnsmasq the
//! test starts, and real clients (curl, Python's getaddrinfo, dig, getent) in a policed cgroup
//! whose port-53 traffic the kernel redirects to the proxy.
//!
//! Each client runs in its own mount namespace where /etc/resolv.conf names a loopback server
//! (`127.0.0.1` or `::1`) that nothing answers on: only the redirect can make a name resolve,
//! and no query ever leaves the machine. Skips with a reason elsewhere; under CI a skip is a
//! failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use depfence::agent::control::{AgentStatus, ServiceStatus};
use depfence::agent::telemetry::EventRecord;
use depfence::cgroup::spawn_in;
use depfence::verdict::Verdict;
use depfence_integration::agent::Agent;
use depfence_integration::dns::{Dnsmasq, require_dnsmasq};
use depfence_integration::fixture::{Cgroup, http_server};
use depfence_integration::{require_privileges, require_tool};

/// The mirror the service may reach by name, and two look-alikes it may not.
const MIRROR: Ipv4Addr = Ipv4Addr::new(127, 0, 57, 1);
const EVIL_PREFIX: Ipv4Addr = Ipv4Addr::new(127, 0, 57, 2);
const EVIL_SUFFIX: Ipv4Addr = Ipv4Addr::new(127, 0, 57, 3);

struct Tools {
    curl: PathBuf,
    python: PathBuf,
    dig: PathBuf,
    dnsmasq: PathBuf,
}

fn tools(test: &str) -> Option<Tools> {
    if !require_privileges(test) {
        return None;
    }
    Some(Tools {
        curl: require_tool(test, "curl", "curl")?,
        python: require_tool(test, "python3", "python3")?,
        dig: require_tool(test, "dig", "bind9-dnsutils")?,
        dnsmasq: require_dnsmasq(test)?,
    })
}

/// A cgroup for the service, a mirror and two look-alikes serving HTTP on one port, dnsmasq
/// answering their names, and the agent in `mode` with the proxy forwarding to dnsmasq.
struct Setup {
    _cgroups: Cgroup,
    app: PathBuf,
    port: u16,
    dns: Dnsmasq,
    dir: tempfile::TempDir,
    agent: Agent,
}

impl Setup {
    /// `agent_args`: more options for the agent.
    fn new(tools: &Tools, mode: &str, agent_args: &[&str]) -> Setup {
        let mut cgroups = Cgroup::new();
        let app = cgroups.child("app");
        // One port for all three, so only the name decides.
        let port = http_server(IpAddr::V4(MIRROR));
        for ip in [EVIL_PREFIX, EVIL_SUFFIX] {
            serve_on(ip, port);
        }
        // `shared.evil` is a denied name on the mirror's address.
        let hosts = format!(
            "{MIRROR} a.mirror.internal\n{EVIL_PREFIX} evilmirror.internal\n{EVIL_SUFFIX} mirror.internal.evil\n\
             {MIRROR} shared.evil\n"
        );
        let dns = Dnsmasq::start(&tools.dnsmasq, &hosts, 30, &[]);
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                r#"version = 1
[environments]
prod = "{mode}"

[services.app]
cgroup = "{}/app"
allow = [{{ host = "*.mirror.internal", ports = [{port}], proto = "tcp" }}]
"#,
                cgroups.relative()
            ),
        )
        .unwrap();
        for (name, server) in [("resolv.conf", "127.0.0.1"), ("resolv6.conf", "::1")] {
            std::fs::write(dir.path().join(name), format!("nameserver {server}\noptions timeout:1 attempts:1\n"))
                .unwrap();
        }
        let upstream = dns.addr.to_string();
        let args: Vec<&str> =
            ["--dns-upstream", upstream.as_str()].into_iter().chain(agent_args.iter().copied()).collect();
        let agent = Agent::start_with(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod", &args);
        agent.wait_status("app registered", |s| service(s, "app").is_some_and(|a| !a.cgroups.is_empty()));
        Setup { _cgroups: cgroups, app, port, dns, dir, agent }
    }

    /// Starts `program args…` in the service's cgroup, with /etc/resolv.conf replaced by
    /// `resolv` (a file of the test dir) in a private mount namespace; stdout and stderr piped.
    fn spawn(&self, resolv: &str, program: &Path, args: &[&str]) -> std::process::Child {
        let mut command = Command::new("unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#,
            ])
            .arg(self.dir.path().join(resolv))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        spawn_in(&self.app, &mut command).unwrap()
    }

    /// [`Setup::spawn`], and wait for it.
    fn run(&self, resolv: &str, program: &Path, args: &[&str]) -> Output {
        self.spawn(resolv, program, args).wait_with_output().unwrap()
    }

    /// curl's HTTP status for `host` (or its exit code when it got none).
    fn curl(&self, tools: &Tools, host: &str) -> Result<String, i32> {
        let url = format!("http://{host}:{}/", self.port);
        let out = self.run("resolv.conf", &tools.curl, &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(out.status.code().unwrap_or(-1))
        }
    }

    /// The addresses Python's getaddrinfo finds for `name`, or its error, asking the server
    /// of `resolv` (glibc's stub resolver, over UDP).
    fn getaddrinfo(&self, tools: &Tools, resolv: &str, name: &str) -> String {
        let script = "import socket, sys\n\
                      try:\n    print(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 80, proto=socket.IPPROTO_TCP)}))\n\
                      except socket.gaierror as e:\n    print('error', e.errno)";
        let out = self.run(resolv, &tools.python, &["-c", script, name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The agent's event log.
    fn events(&self) -> Vec<EventRecord> {
        let out = Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
            .args(["events", "--json", "--recent", "1000", "--socket"])
            .arg(&self.agent.socket)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// Another HTTP server on `ip:port` (the fixture picks its own port).
fn serve_on(ip: Ipv4Addr, port: u16) {
    let listener = std::net::TcpListener::bind((ip, port)).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::{Read as _, Write as _};
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
        }
    });
}

fn service<'a>(status: &'a AgentStatus, name: &str) -> Option<&'a ServiceStatus> {
    status.services.iter().find(|s| s.name == name)
}

/// The issue's acceptance test: allowed `*.mirror.internal`, the service reaches
/// `a.mirror.internal` by name and is refused `evilmirror.internal` and `mirror.internal.evil`
/// in enforce, over UDP and TCP, from IPv4 and IPv6 sockets.
#[test]
fn enforce_resolves_allowed_names_and_refuses_look_alikes() {
    let test = "enforce_resolves_allowed_names_and_refuses_look_alikes";
    let Some(tools) = tools(test) else { return };
    // Answers stay allowed for at most 2 s (dnsmasq says 30).
    let setup = Setup::new(&tools, "enforce", &["--dns-ttl-floor", "1s", "--dns-ttl-cap", "2s"]);

    // By name: resolved through the redirect and the proxy, the answer admitted, connected.
    assert_eq!(setup.curl(&tools, "a.mirror.internal"), Ok("200".to_owned()));
    // The look-alikes do not resolve (curl: 6, could not resolve host)…
    assert_eq!(setup.curl(&tools, "evilmirror.internal"), Err(6));
    assert_eq!(setup.curl(&tools, "mirror.internal.evil"), Err(6));
    // … and their address is refused by the kernel (curl: 7), as no allowed name led there.
    assert_eq!(setup.curl(&tools, &EVIL_PREFIX.to_string()), Err(7));

    // glibc from Python, to an IPv4 and to an IPv6 server (a dual-stack socket connected to
    // the proxy's IPv4-mapped slot address; the reply's source is rewritten back to ::1).
    assert_eq!(setup.getaddrinfo(&tools, "resolv.conf", "a.mirror.internal"), format!("['{MIRROR}']"));
    assert_eq!(setup.getaddrinfo(&tools, "resolv6.conf", "a.mirror.internal"), format!("['{MIRROR}']"));
    assert_eq!(setup.getaddrinfo(&tools, "resolv6.conf", "evilmirror.internal"), "error -3");

    // dig over UDP and TCP: the answer, and REFUSED for a look-alike.
    let dig = |args: &[&str]| String::from_utf8_lossy(&setup.run("resolv.conf", &tools.dig, args).stdout).into_owned();
    assert_eq!(dig(&["+short", "a.mirror.internal"]).trim(), MIRROR.to_string());
    assert_eq!(dig(&["+tcp", "+short", "a.mirror.internal"]).trim(), MIRROR.to_string());
    assert!(dig(&["+tcp", "mirror.internal.evil"]).contains("status: REFUSED"));
    // dig's IPv6 sockets are IPV6_V6ONLY: they go to the proxy on [::1], found by sock_diag.
    assert_eq!(dig(&["@::1", "+short", "a.mirror.internal"]).trim(), MIRROR.to_string());
    assert_eq!(dig(&["@::1", "+tcp", "+short", "a.mirror.internal"]).trim(), MIRROR.to_string());
    let refused = dig(&["@::1", "evilmirror.internal"]);
    assert!(refused.contains("status: REFUSED") && refused.contains("SERVER: ::1#53"), "{refused}");

    // Reported with the asking process.
    let events = setup.events();
    let refused = events
        .iter()
        .find(|e| e.destination == "evilmirror.internal" && e.comm == "curl")
        .unwrap_or_else(|| panic!("no event for curl's evilmirror.internal: {events:#?}"));
    assert_eq!((refused.verdict.as_str(), refused.service.as_deref()), ("rejected", Some("app")));
    // curl (glibc) asks for A and AAAA at once: both are refused and reported.
    let asked: std::collections::BTreeSet<_> = events
        .iter()
        .filter(|e| e.destination == "evilmirror.internal" && e.comm == "curl")
        .filter_map(|e| e.query.as_deref())
        .collect();
    assert_eq!(asked, std::collections::BTreeSet::from(["A", "AAAA"]));
    assert!(refused.pid > 0 && refused.cgroup.as_deref().is_some_and(|c| c.ends_with("/app")), "{refused:?}");
    assert!(events.iter().any(|e| e.destination == "mirror.internal.evil" && e.verdict == Verdict::Rejected));
    let rejected = setup.agent.sample("depfence_dns_queries_total{service=\"app\",verdict=\"rejected\"}");
    assert!(rejected.is_some_and(|n| n >= 4.0), "{rejected:?}");
    let allowed = setup.agent.sample("depfence_dns_queries_total{service=\"app\",verdict=\"allowed\"}");
    assert!(allowed.is_some_and(|n| n >= 4.0), "{allowed:?}");
    // One refused connect (the look-alike's address); nothing else was refused.
    let status = setup.agent.status();
    let dns = status.dns.as_ref().unwrap();
    assert_eq!(dns.upstreams, [setup.dns.addr]);
    assert!(dns.port != 0 && dns.admitted >= 1, "{dns:?}");
    let app = service(&status, "app").unwrap();
    assert_eq!(app.counts.rejected, 1, "{app:?}");

    // The answer's address is allowed for the (capped) TTL, then no more: connecting by
    // address works right after the lookup and is refused once the entry expired.
    let by_address = MIRROR.to_string();
    assert_eq!(setup.getaddrinfo(&tools, "resolv.conf", "a.mirror.internal"), format!("['{MIRROR}']"));
    assert_eq!(setup.curl(&tools, &by_address), Ok("200".to_owned()));
    let resolved = std::time::Instant::now();
    let refused = loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if setup.curl(&tools, &by_address) == Err(7) {
            break resolved.elapsed();
        }
        assert!(resolved.elapsed() < std::time::Duration::from_secs(6), "still allowed after 6 s");
    };
    assert!(refused >= std::time::Duration::from_millis(1500), "expired after {refused:?}, before the 2 s cap");
    assert_eq!(service(&setup.agent.status(), "app").unwrap().counts.rejected, 2);
}

/// In audit the look-alikes are answered (nothing breaks) and counted as would-rejects with
/// the asking process, and the connections to their addresses are would-rejects too.
#[test]
fn audit_answers_look_alikes_and_reports_who_asked() {
    let test = "audit_answers_look_alikes_and_reports_who_asked";
    let Some(tools) = tools(test) else { return };
    let setup = Setup::new(&tools, "audit", &[]);

    assert_eq!(setup.curl(&tools, "a.mirror.internal"), Ok("200".to_owned()));
    assert_eq!(setup.curl(&tools, "evilmirror.internal"), Ok("200".to_owned()));
    assert_eq!(setup.getaddrinfo(&tools, "resolv.conf", "mirror.internal.evil"), format!("['{EVIL_SUFFIX}']"));

    let events = setup.events();
    let curl = events
        .iter()
        .find(|e| e.destination == "evilmirror.internal" && e.query.is_some())
        .unwrap_or_else(|| panic!("no dns event for evilmirror.internal: {events:#?}"));
    assert_eq!((curl.verdict.as_str(), curl.comm.as_str()), ("would_reject", "curl"));
    let python = events.iter().find(|e| e.destination == "mirror.internal.evil").unwrap();
    assert_eq!((python.verdict.as_str(), python.comm.as_str()), ("would_reject", "python3"));
    // The connection to the look-alike's address: allowed in audit, counted.
    assert!(
        events
            .iter()
            .any(|e| e.destination == format!("{EVIL_PREFIX}:{}/tcp", setup.port) && e.verdict == Verdict::WouldReject),
        "{events:#?}"
    );
    // `learn` proposes a host entry for each denied name, with the process that asked.
    let out = Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
        .args(["learn", "--policy"])
        .arg(setup.dir.path().join("policy.toml"))
        .arg("--socket")
        .arg(&setup.agent.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(10), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for (name, comm) in [("evilmirror.internal", "curl"), ("mirror.internal.evil", "python3")] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("propose for `app`: {{ host = \"{name}\", reason = \"learned: ")));
        assert!(line.is_some_and(|l| l.contains(&format!(" by {comm}\" }}"))), "{name}: {stdout}");
    }

    // A denied name answered with an address an allowed name has: reported.
    assert_eq!(setup.getaddrinfo(&tools, "resolv.conf", "shared.evil"), format!("['{MIRROR}']"));
    let shared = setup.agent.sample("depfence_dns_shared_addresses_total{service=\"app\"}");
    assert!(shared.is_some_and(|n| n >= 1.0), "{shared:?}");
    assert!(setup.agent.log_text().contains("an allowed and a denied name share an address"));

    // Exact attribution under concurrency: 24 processes ask at once, each its own name; each
    // question is reported with the pid of the process that asked it.
    let script = "import os, socket, sys\n\
                  try:\n    socket.getaddrinfo(sys.argv[1], 80, proto=socket.IPPROTO_TCP)\n\
                  except socket.gaierror:\n    pass\n\
                  print(os.getpid())";
    let children: Vec<_> = (0..24)
        .map(|i| {
            let name = format!("asker-{i}.evil");
            (name.clone(), setup.spawn("resolv.conf", &tools.python, &["-c", script, &name]))
        })
        .collect();
    let askers: Vec<(String, u32)> = children
        .into_iter()
        .map(|(name, child)| {
            let out = child.wait_with_output().unwrap();
            (name, String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
        })
        .collect();
    let events = setup.events();
    for (name, pid) in &askers {
        let asked: Vec<u32> = events.iter().filter(|e| &e.destination == name).map(|e| e.pid).collect();
        assert!(
            !asked.is_empty() && asked.iter().all(|p| p == pid),
            "{name}: asked by {pid}, reported {asked:?}; events: {:?}; log: {}",
            events.iter().map(|e| (&e.destination, e.pid)).collect::<Vec<_>>(),
            setup.agent.log_text()
        );
    }

    let status = setup
        .agent
        .wait_status("would-reject counted", |s| service(s, "app").is_some_and(|a| a.counts.would_reject >= 1));
    let app = service(&status, "app").unwrap();
    assert_eq!((app.counts.would_reject, app.counts.rejected), (1, 0), "{app:?}");
    assert!(app.counts.allowed >= 1, "a.mirror.internal was allowed by its name: {app:?}");

    // A clean stop turns the redirect off (nothing would answer on the proxy's port); the
    // policy itself stays in force.
    let mut agent = setup.agent;
    let config = |agent: &Agent| {
        let maps = depfence::datapath::Maps::from_pins(agent.pins()).unwrap();
        maps.config.get(&0, 0).unwrap()
    };
    assert_ne!(config(&agent).dns_proxy_port, 0);
    assert!(agent.stop().success(), "{}", agent.log_text());
    let after = config(&agent);
    assert_eq!((after.dns_proxy_port, after.dns_exempt_cgroup), (0, 0));
    assert!(depfence::datapath::Maps::from_pins(agent.pins()).unwrap().cgroup_states().iter().any(|(id, _)| *id != 0));
}
