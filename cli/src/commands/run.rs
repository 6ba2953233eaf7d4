//! `policyctl run`: run a command (and everything it starts) in a fresh child cgroup under one
//! service's policy, enforced or audited by the kernel (`depfence::datapath::confine`), and
//! report what it tried that the policy does not allow.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use depfence::datapath::confine::{ConfineError, Confinement};
use depfence::verdict::{Mode, Verdict};

use super::{compiled, environment_index, invalid};
use crate::args::{ErrorFormat, RunMode};
use crate::error::CliError;

/// What the kernel refused (or would have), per destination.
#[derive(Debug)]
struct Seen {
    verdict: Verdict,
    processes: BTreeMap<u32, String>,
}

/// Runs `command` under `service`'s rules of the policy at `path`; returns its exit code.
pub fn run(
    path: &Path,
    format: ErrorFormat,
    service: &str,
    environment: Option<&str>,
    mode: RunMode,
    pass_fds: &[i32],
    command: &[OsString],
) -> Result<ExitCode, CliError> {
    let Some(compiled) = compiled(path, format)? else { return Ok(invalid()) };
    let Some((program, args)) = command.split_first() else {
        return Err(CliError::Usage("no command to run (give it after `--`)".into()));
    };
    let mode = match mode {
        RunMode::Audit => Mode::Audit,
        RunMode::Enforce => Mode::Enforce,
    };
    let name = depfence::datapath::pins::run_root_name(std::process::id());
    let names: Vec<String> = compiled.snapshot.environments().iter().map(|e| e.name.clone()).collect();
    let env = environment_index(&names, environment)?;
    let mut confined = Confinement::new(&compiled.snapshot, env, service, mode, &name)?;
    let mut child = confined.spawn(Command::new(program).args(args), pass_fds).map_err(|e| match e {
        ConfineError::NotOpen(_) => CliError::Confine(e),
        e => CliError::Usage(format!("cannot run `{}`: {e}", program.to_string_lossy())),
    })?;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let status = loop {
        collect(&mut confined, &mut seen);
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(CliError::Io { context: "waiting for the command".into(), source: e }),
        }
    };
    // The policy covers the command's whole process tree; whatever it left running would
    // leave the policy with the cgroup, so it ends with the command (as in a systemd scope).
    match confined.kill_all() {
        Ok(0) => {}
        Ok(n) => eprintln!("policyctl run: killed {n} process(es) the command left running in its cgroup"),
        Err(e) => {
            eprintln!("policyctl run: could not end processes left in {}: {e}", confined.cgroup().dir().display())
        }
    }
    collect(&mut confined, &mut seen);
    report(&confined, &seen, mode);
    let root = confined.pin_root().to_owned();
    if let Err(e) = confined.close() {
        eprintln!("policyctl: removing pins under {}: {e}", root.display());
    }
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt as _;
        128 + status.signal().unwrap_or(0)
    });
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn collect(confined: &mut Confinement, seen: &mut BTreeMap<String, Seen>) {
    for (verdict, event) in confined.refusals() {
        let entry = seen.entry(event.destination()).or_insert_with(|| Seen { verdict, processes: BTreeMap::new() });
        entry.verdict = verdict;
        entry.processes.insert(event.pid(), event.comm_name().into_owned());
    }
}

fn report(confined: &Confinement, seen: &BTreeMap<String, Seen>, mode: Mode) {
    let counts = confined.counts();
    eprintln!(
        "policyctl run ({mode}): {} allowed, {} would-reject, {} rejected",
        counts.allowed, counts.would_reject, counts.rejected
    );
    for (destination, s) in seen {
        let who: Vec<String> = s.processes.iter().map(|(pid, comm)| format!("{comm} (pid {pid})")).collect();
        eprintln!("  {:<12} {destination:<28} by {}", s.verdict.phrase(), who.join(", "));
    }
}
