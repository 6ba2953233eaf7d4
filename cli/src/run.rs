//! `policyctl run`: run a command (and everything it starts) in a fresh child cgroup under one
//! service's policy, enforced or audited by the kernel, and report what it tried that the policy
//! does not allow.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::process::{Command, ExitCode};
use std::time::Duration;

use depfence::cgroup::{Cgroup2, ChildCgroup};
use depfence::datapath::abi::{
    CgroupState, Config, FLAG_ACTIVE_HAS_CIDR, MODE_AUDIT, MODE_ENFORCE, VERDICT_ALLOWED, VERDICT_REJECTED,
    VERDICT_WOULD_REJECT, prog_names,
};
use depfence::datapath::pins::{PinLayout, ensure_bpffs};
use depfence::datapath::rules::{allows_from_snapshot, compile};
use depfence::datapath::{Datapath, DatapathError};
use depfence::snapshot::Snapshot;

use crate::output::CliError;

/// The counter slot and ruleset id of the one service `run` loads.
const SLOT: u32 = 0;
const RULESET: u32 = 1;

/// What the kernel saw, per destination.
#[derive(Debug, Default)]
struct Seen {
    verdict: u32,
    processes: BTreeMap<u32, String>,
}

fn datapath_error(error: DatapathError) -> CliError {
    CliError::Usage(format!("kernel datapath: {error}"))
}

/// Runs `command` under `service`'s rules in `enforce` or audit mode; returns its exit code.
pub fn run(snapshot: &Snapshot, service: &str, enforce: bool, command: &[OsString]) -> Result<ExitCode, CliError> {
    let Some((_, ruleset)) = snapshot.service(service) else {
        return Err(CliError::Usage(format!("unknown service `{service}`")));
    };
    let Some((program, args)) = command.split_first() else {
        return Err(CliError::Usage("no command to run (give it after `--`)".into()));
    };
    let compiled = compile(RULESET, &allows_from_snapshot(&ruleset.net_rules))
        .map_err(|e| CliError::Usage(format!("service `{service}` does not fit the kernel layout: {e}")))?;

    let cgroup2 = Cgroup2::discover().map_err(|e| CliError::Usage(e.to_string()))?;
    let name = format!("depfence-run-{}", std::process::id());
    let cgroup = ChildCgroup::create(cgroup2.mount(), &name).map_err(|e| CliError::Usage(e.to_string()))?;
    let (bpffs, _) = ensure_bpffs().map_err(|e| CliError::Usage(format!("bpffs: {e}")))?;
    let pins = PinLayout::new(bpffs.join(&name));
    let result = supervise(&pins, &cgroup, &compiled, enforce, program, args);
    // Unpinning the links detaches the programs; the cgroup goes when `cgroup` drops.
    if let Err(e) = pins.remove_all() {
        eprintln!("policyctl: removing pins under {}: {e}", pins.root().display());
    }
    result
}

fn supervise(
    pins: &PinLayout,
    cgroup: &ChildCgroup,
    compiled: &depfence::datapath::rules::CompiledRuleset,
    enforce: bool,
    program: &OsString,
    args: &[OsString],
) -> Result<ExitCode, CliError> {
    // Room for this one ruleset, not for the agent's million rules.
    let capacity = u32::try_from(compiled.exact.len()).unwrap_or(u32::MAX).max(512);
    let mut datapath = Datapath::load_with_rule_capacity(pins, capacity).map_err(datapath_error)?;
    datapath.attach(cgroup.dir(), &prog_names::ALL).map_err(datapath_error)?;
    datapath.maps.install(compiled).map_err(datapath_error)?;
    // One event per (destination, verdict) per second is plenty for a report.
    datapath.maps.set_config(Config { dedup_window_ns: 1_000_000_000, ..Config::default() }).map_err(datapath_error)?;
    let flags = if compiled.cidrs.is_empty() { 0 } else { FLAG_ACTIVE_HAS_CIDR };
    let mode = if enforce { MODE_ENFORCE } else { MODE_AUDIT };
    let state =
        CgroupState { ruleset_id: RULESET, mode, flags, counter_slot: SLOT, generation: 1, ..Default::default() };
    datapath.maps.set_cgroup(cgroup.id(), state).map_err(datapath_error)?;

    let mut child = cgroup
        .spawn(Command::new(program).args(args))
        .map_err(|e| CliError::Usage(format!("cannot run `{}`: {e}", program.to_string_lossy())))?;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let status = loop {
        collect(&mut datapath, &mut seen);
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(CliError::Io { context: "waiting for the command".into(), source: e }),
        }
    };
    // The policy covers the command's whole process tree; whatever it left running would
    // leave the policy with the cgroup, so it ends with the command (as in a systemd scope).
    match cgroup.kill_all() {
        Ok(0) => {}
        Ok(n) => eprintln!("policyctl run: killed {n} process(es) the command left running in its cgroup"),
        Err(e) => eprintln!("policyctl run: could not end processes left in {}: {e}", cgroup.dir().display()),
    }
    collect(&mut datapath, &mut seen);
    report(&datapath, &seen, enforce);
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt as _;
        128 + status.signal().unwrap_or(0)
    });
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn collect(datapath: &mut Datapath, seen: &mut BTreeMap<String, Seen>) {
    for event in datapath.maps.drain_events() {
        if event.verdict == VERDICT_ALLOWED {
            continue;
        }
        let entry = seen.entry(event.destination()).or_default();
        entry.verdict = event.verdict;
        entry.processes.insert(event.pid(), event.comm_name().into_owned());
    }
}

fn report(datapath: &Datapath, seen: &BTreeMap<String, Seen>, enforce: bool) {
    let count = |verdict| datapath.maps.counter(SLOT, verdict).unwrap_or(0);
    let (allowed, would, rejected) = (count(VERDICT_ALLOWED), count(VERDICT_WOULD_REJECT), count(VERDICT_REJECTED));
    let mode = if enforce { "enforce" } else { "audit" };
    eprintln!("policyctl run ({mode}): {allowed} allowed, {would} would-reject, {rejected} rejected");
    for (destination, s) in seen {
        let verdict = if s.verdict == VERDICT_REJECTED { "rejected" } else { "would-reject" };
        let who: Vec<String> = s.processes.iter().map(|(pid, comm)| format!("{comm} (pid {pid})")).collect();
        eprintln!("  {verdict:<12} {destination:<28} by {}", who.join(", "));
    }
}
