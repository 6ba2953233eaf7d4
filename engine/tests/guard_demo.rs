//! The README's guard walk-through, run as a user runs it: the `guard_demo` example's server and
//! client as two processes on loopback, the client in audit, then the snapshot file replaced by
//! an enforce one while the client runs. The server's log proves what left the client.

#![cfg(feature = "guard")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers: a failing test should say where"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use depfence::compile::compile_str;

/// The example binary, which `cargo test` builds next to the test binaries
/// (`target/debug/examples/`).
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join("examples/guard_demo");
    assert!(path.exists(), "{} is missing: build it with `cargo build --example guard_demo`", path.display());
    path
}

/// A child process killed (by its PID) when the test ends, even on failure.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the example with `args`; its stdout lines arrive on the receiver.
fn start(args: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut child = Command::new(example()).args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    (Running(child), receive)
}

/// Waits for a line that contains `text`; every line read on the way is kept in `seen`.
fn wait_for(lines: &mpsc::Receiver<String>, text: &str, seen: &mut Vec<String>) {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let found = line.contains(text);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(e) => panic!("no line with `{text}` ({e}); output so far:\n{}", seen.join("\n")),
        }
    }
}

fn install(path: &Path, policy: &str) {
    let snapshot = compile_str("rpc-guard.toml", policy).unwrap_or_else(|_| panic!("the example compiles")).snapshot;
    depfence::snapshot::write_file(path, &snapshot.to_bytes().unwrap()).unwrap();
}

#[test]
fn the_readme_demo_switches_from_audit_to_enforce_while_the_client_runs() {
    let example_policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples/rpc-guard.toml");
    let audit = std::fs::read_to_string(example_policy).unwrap();
    let audit_line = "mode = { prod = \"audit\" }";
    assert!(audit.contains(audit_line), "the example's checkout audits in prod");
    // The server on a free loopback port (it says which), in place of the example's 50051
    // (billing's endpoint): bound before the policy names it, so no other process can take it.
    let (_server, server_lines) = start(&["server", "127.0.0.1:0"]);
    let mut server_log = Vec::new();
    wait_for(&server_lines, "listening", &mut server_log);
    let addr = server_log.last().and_then(|l| l.strip_prefix("server: listening on ")).unwrap().to_owned();
    let port = addr.rsplit(':').next().unwrap();
    assert_eq!(audit.matches("50051").count(), 1, "billing's one endpoint port");
    let audit = audit.replace("50051", port);
    let enforce = audit.replace(audit_line, "mode = { prod = \"enforce\" }");
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("guard.snap");
    install(&snapshot, &audit);

    let (client, client_lines) = start(&["client", snapshot.to_str().unwrap(), "prod", &addr, "5"]);
    let mut client_log = Vec::new();
    wait_for(&client_lines, "round 2 /billing.Billing/Refund", &mut client_log);
    install(&snapshot, &enforce);
    // Read to the end: the client exits after its rounds.
    client_log.extend(client_lines.iter());
    let status = { client }.0.wait().unwrap();
    assert!(status.success(), "client failed:\n{}", client_log.join("\n"));
    let client_text = client_log.join("\n");

    // The client's own lines, `client: round N RPC grpc-status S`, not the guard's log.
    let calls = |rpc: &str| {
        let ours = |l: &&String| l.starts_with("client: round ") && l.contains(rpc);
        client_log.iter().filter(ours).map(String::as_str).collect::<Vec<_>>()
    };
    let refunds = calls("/billing.Billing/Refund");
    assert_eq!(refunds.len(), 5, "{client_text}");
    assert!(refunds[0].ends_with("grpc-status 0"), "audit passes the call through: {client_text}");
    assert!(
        refunds[4].contains("grpc-status 7 (depfence rejected rpc `/billing.Billing/Refund` from `checkout`"),
        "{client_text}"
    );
    let charges = calls("/billing.Billing/Charge");
    assert!(charges.len() == 5 && charges.iter().all(|l| l.ends_with("grpc-status 0")), "{client_text}");

    // The counters after the last round, and the server's log, agree on the switch: every
    // Refund the guard passed as a would-reject reached the server, and no rejected one did.
    let last_counter = |verdict: &str| -> u64 {
        let label = format!("verdict=\"{verdict}\"}} ");
        let line = client_log.iter().rev().find(|l| l.contains("depfence_rpc_calls_total") && l.contains(&label));
        line.and_then(|l| l.rsplit(' ').next()).map_or(0, |n| n.parse().unwrap())
    };
    let (would_reject, rejected) = (last_counter("would_reject"), last_counter("rejected"));
    assert_eq!(last_counter("allowed"), 5, "{client_text}");
    assert_eq!(would_reject + rejected, 5, "{client_text}");
    assert!(would_reject >= 2 && rejected >= 1, "{client_text}");

    // The server has answered every call by now; drain what it printed.
    std::thread::sleep(Duration::from_millis(200));
    server_log.extend(server_lines.try_iter());
    let served = |rpc: &str| server_log.iter().filter(|l| l.ends_with(rpc)).count() as u64;
    assert_eq!(served("/billing.Billing/Charge"), 5, "{}", server_log.join("\n"));
    assert_eq!(served("/billing.Billing/Refund"), would_reject, "{}", server_log.join("\n"));
}
