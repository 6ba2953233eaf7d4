//! A local DNS server for the DNS tests: dnsmasq serving a hosts file on its own loopback
//! address, started by the test and killed when dropped.
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation,
    reason = "test fixtures fail the test by panicking, with the reason"
)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// dnsmasq from Debian's `dnsmasq-base`, or None (skipping `test`, failing under CI).
pub fn require_dnsmasq(test: &str) -> Option<std::path::PathBuf> {
    crate::require_tool(test, "dnsmasq", "dnsmasq-base")
}

/// A dnsmasq answering the names of a hosts file on `127.0.x.y:port`, authoritative for
/// `.internal`, `.evil` and `.example` (it never forwards anything).
pub struct Dnsmasq {
    /// Where it answers.
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

static NEXT_ADDR: AtomicU8 = AtomicU8::new(0);

impl Dnsmasq {
    /// Serves `hosts` (hosts-file lines) with TTL `ttl` and `extra` dnsmasq options.
    ///
    /// # Panics
    /// When dnsmasq does not start answering within 5 s (20 tries on fresh addresses).
    pub fn start(dnsmasq: &Path, hosts: &str, ttl: u32, extra: &[&str]) -> Dnsmasq {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("hosts");
        std::fs::write(&file, hosts).expect("write hosts");
        // dnsmasq may drop privileges before reading: let anyone read.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        for _ in 0..20 {
            // A loopback address per instance (tests run in parallel), a free port on it.
            let n = NEXT_ADDR.fetch_add(1, Ordering::Relaxed);
            let ip: IpAddr = format!("127.0.{}.{}", 100 + std::process::id() % 100, 1 + n % 250).parse().expect("ip");
            let port = UdpSocket::bind(SocketAddr::new(ip, 0)).and_then(|s| s.local_addr()).expect("free port").port();
            let mut child = Command::new(dnsmasq)
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--pid-file=",
                    "--log-facility=-",
                    "--local=/internal/",
                    "--local=/evil/",
                    "--local=/example/",
                ])
                .arg(format!("--addn-hosts={}", file.display()))
                .arg(format!("--listen-address={ip}"))
                .arg(format!("--port={port}"))
                .arg(format!("--local-ttl={ttl}"))
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start dnsmasq: {e}"));
            let addr = SocketAddr::new(ip, port);
            if wait_answering(addr, &mut child) {
                return Dnsmasq { addr, child, _dir: dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not start");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS query for the A record of `probe.internal` (id 1, recursion desired).
fn probe_query() -> Vec<u8> {
    let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "internal"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Polls `server` with a query until it answers (true) or the child exits or 5 s pass (false).
fn wait_answering(server: SocketAddr, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let Ok(socket) = UdpSocket::bind(SocketAddr::new(server.ip(), 0)) else { return false };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let query = probe_query();
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let _ = socket.send_to(&query, server);
        let mut buf = [0u8; 512];
        if socket.recv_from(&mut buf).is_ok() {
            return true;
        }
    }
    false
}
