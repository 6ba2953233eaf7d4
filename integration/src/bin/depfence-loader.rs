//! Test helper: a real loader process that a test can kill with SIGKILL.
//!
//! usage: depfence-loader <cgroup dir> <pin root> <allowed ip> <allowed tcp port>
//!
//! Loads the datapath with its maps pinned under `<pin root>`, attaches every hook to the cgroup
//! (links pinned there too), installs ruleset 1 = one exact allow rule (`ip`, TCP, `port`),
//! puts the cgroup in enforce with counter slot 0, prints `ready` and sleeps until killed.
//! Everything it leaves in the kernel is reachable from the pins; removing them detaches.
use std::{io::Write as _, net::IpAddr, path::Path, process::ExitCode};

use depfence::cgroup::cgroup_id;
use depfence::datapath::{Datapath, pins::PinLayout};
use depfence::lower::{Allow, compile};
use depfence_bpf_common::{CgroupState, IPPROTO_TCP, MODE_ENFORCE, prog_names};

/// The ruleset id this loader installs.
const RULESET: u32 = 1;
/// The counter slot of the cgroup.
const SLOT: u32 = 0;

fn run(cgroup: &Path, pins: &Path, ip: IpAddr, port: u16) -> Result<(), String> {
    let layout = PinLayout::new(pins);
    let mut dp = Datapath::load(&layout).map_err(|e| format!("load: {}", chain(&e)))?;
    dp.attach(cgroup, &prog_names::ALL).map_err(|e| format!("attach: {}", chain(&e)))?;
    let rules = compile(RULESET, &[Allow::Host { addr: ip, proto: IPPROTO_TCP, port, rule_id: 1 }])
        .map_err(|e| format!("compile: {e}"))?;
    dp.maps.install(&rules).map_err(|e| format!("install: {}", chain(&e)))?;
    let id = cgroup_id(cgroup).map_err(|e| format!("cgroup id: {e}"))?;
    let state = CgroupState {
        ruleset_id: RULESET,
        mode: MODE_ENFORCE,
        candidate_ruleset: 0,
        flags: 0,
        counter_slot: SLOT,
        generation: RULESET,
    };
    dp.maps.set_cgroup(id, state).map_err(|e| format!("set cgroup: {}", chain(&e)))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").and_then(|()| out.flush()).map_err(|e| format!("stdout: {e}"))?;
    drop(out);
    // Hold the loaded object (fds) until killed: the test kills this process mid-life.
    loop {
        std::thread::park();
    }
}

/// An error and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cgroup), Some(pins), Some(ip), Some(port)) = (args.get(1), args.get(2), args.get(3), args.get(4)) else {
        eprintln!("usage: depfence-loader <cgroup dir> <pin root> <allowed ip> <allowed tcp port>");
        return ExitCode::from(2);
    };
    let (Ok(ip), Ok(port)) = (ip.parse::<IpAddr>(), port.parse::<u16>()) else {
        eprintln!("depfence-loader: bad address `{ip}` or port `{port}`");
        return ExitCode::from(2);
    };
    match run(Path::new(cgroup), Path::new(pins), ip, port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("depfence-loader: {e}");
            ExitCode::FAILURE
        }
    }
}
