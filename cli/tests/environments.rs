//! One policy, two environments with their own addresses, enforced in the kernel: an agent in
//! `prod` lets a production caller reach the production database and refuses the QA one, and
//! loads only production's rules; an agent in `qa` the other way round. `policyctl run` takes
//! `--environment` the same way. Real agents, cgroups and clients. Run as root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use depfence::datapath::Maps;
use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, EPERM, probe, tcp_listener};

/// Production's and QA's database addresses: both loopback.
const PROD_DB: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 10, 1));
const QA_DB: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 20, 1));

fn write_policy(path: &Path, top: &str, prod_port: u16, qa_port: u16) {
    let text = format!(
        r#"version = 1
[environments]
prod = "enforce"
qa = "enforce"

[services.db]
endpoints.prod = [{{ ip = "{PROD_DB}", ports = [{prod_port}], proto = "tcp" }}]
endpoints.qa = [{{ ip = "{QA_DB}", ports = [{qa_port}], proto = "tcp" }}]

[services.app]
cgroup = "{top}/app"
allow = [{{ service = "db" }}]
"#
    );
    std::fs::write(path, text).unwrap();
}

/// The DF_RULES entries of the agent's pins, as (address, port).
fn kernel_rules(agent: &Agent) -> BTreeSet<(IpAddr, u16)> {
    let maps = Maps::from_pins(agent.pins()).unwrap();
    maps.rules
        .keys()
        .map(|key| {
            let key = key.unwrap();
            (depfence_bpf_common::user::words_addr(key.addr), key.port)
        })
        .collect()
}

#[test]
fn each_environment_enforces_its_own_addresses() {
    if !depfence_integration::require_privileges("each_environment_enforces_its_own_addresses") {
        return;
    }
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let (prod_port, qa_port) = (tcp_listener(PROD_DB), tcp_listener(QA_DB));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_policy(&policy, &cgroups.relative(), prod_port, qa_port);
    let policyctl = assert_cmd::cargo::cargo_bin("policyctl");

    for (env, allowed, refused) in
        [("prod", (PROD_DB, prod_port), (QA_DB, qa_port)), ("qa", (QA_DB, qa_port), (PROD_DB, prod_port))]
    {
        let agent = Agent::start(&policyctl, &policy, env);
        agent.wait_status("app registered", |s| s.services.iter().any(|s| s.name == "app" && !s.cgroups.is_empty()));
        assert_eq!(probe(&app, "tcp", allowed.0, allowed.1, 1), Ok(1), "{env}: its own database");
        assert_eq!(probe(&app, "tcp", refused.0, refused.1, 1), Err(EPERM), "{env}: the other environment's database");
        // Only this environment's rules are in the kernel.
        assert_eq!(kernel_rules(&agent), BTreeSet::from([allowed]), "{env}");
        drop(agent);
    }

    // `policyctl run` judges in the environment it is given, and needs one with two.
    let run = |env: Option<&str>, ip: IpAddr, port: u16| {
        let mut cmd = std::process::Command::new(&policyctl);
        cmd.args(["run", "-p"]).arg(&policy).args(["--service", "app", "--mode", "enforce"]);
        if let Some(env) = env {
            cmd.args(["--environment", env]);
        }
        let probe = depfence_integration::fixture::crate_binary("depfence-probe");
        cmd.arg("--").arg(probe).args(["tcp", &ip.to_string(), &port.to_string(), "1"]);
        cmd.output().unwrap()
    };
    let out = run(Some("qa"), QA_DB, qa_port);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 1", "{out:?}");
    let out = run(Some("qa"), PROD_DB, prod_port);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("err {EPERM} ")), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected     127.0.10.1:"), "{out:?}");
    let out = run(None, QA_DB, qa_port);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("choose one with --environment"), "{out:?}");
}
