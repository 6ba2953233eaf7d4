//! Fixtures shared by the privileged tests: child cgroups and bpffs pins that clean up after
//! themselves (even when the test fails), loopback servers, and the probe process that makes
//! real socket calls from inside a cgroup.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test fixtures fail the test by panicking, with the reason"
)]

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use depfence::cgroup::{Cgroup2, ChildCgroup, spawn_in};
use depfence::datapath::{
    Datapath,
    pins::{PinLayout, ensure_bpffs, random_suffix},
};
use depfence_bpf_common::{CgroupState, prog_names};

/// IPv4 loopback.
pub const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// IPv6 loopback.
pub const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// errno of an enforce rejection.
pub const EPERM: i32 = libc::EPERM;
/// errno of a connect that the hook allowed but nobody listens to.
pub const ECONNREFUSED: i32 = libc::ECONNREFUSED;

/// The cgroup2 mount point.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    Cgroup2::discover().map(|c| c.mount().to_owned()).map_err(io::Error::other)
}

/// A child cgroup `depfence-test-<rand>` of the cgroup2 root, with nested children; all are
/// removed on drop (children first), and a failed removal fails the test. Never the root itself.
pub struct Cgroup {
    /// Its directory.
    pub path: PathBuf,
    children: Vec<ChildCgroup>,
    top: ChildCgroup,
}

impl Cgroup {
    /// Creates a fresh top-level test cgroup.
    pub fn new() -> Self {
        let root = cgroup2_root().unwrap_or_else(|e| panic!("cgroup2 mount: {e}"));
        let top = ChildCgroup::create(&root, &format!("depfence-test-{}", random_suffix()))
            .unwrap_or_else(|e| panic!("create cgroup: {e}"));
        Self { path: top.dir().to_owned(), children: Vec::new(), top }
    }
    /// Creates `name` (a relative path like `a/b`, whose parent exists) below this cgroup.
    pub fn child(&mut self, name: &str) -> PathBuf {
        let (parent, leaf) = match name.rsplit_once('/') {
            Some((parent, leaf)) => (self.path.join(parent), leaf),
            None => (self.path.clone(), name),
        };
        let child = ChildCgroup::create(&parent, leaf).unwrap_or_else(|e| panic!("create cgroup {name}: {e}"));
        let dir = child.dir().to_owned();
        self.children.push(child);
        dir
    }
    /// Its cgroup id.
    pub fn id(&self) -> u64 {
        self.top.id()
    }
    /// Its path relative to the cgroup2 mount (as a policy's `cgroup = …` names it).
    pub fn relative(&self) -> String {
        self.path.file_name().unwrap().to_string_lossy().into_owned()
    }
    /// Removes the child created last (it must hold no process).
    pub fn remove_last_child(&mut self) {
        self.children.pop().unwrap().remove().unwrap();
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Deepest first; `top` goes after this, when its field drops. Leftover processes are
        // killed so that the directories can go.
        let _ = self.top.kill_all();
        while let Some(child) = self.children.pop() {
            if let Err(e) = child.remove() {
                if std::thread::panicking() {
                    eprintln!("cleanup: {e}");
                } else {
                    panic!("cleanup: {e}");
                }
            }
        }
    }
}

/// A pin root `<bpffs>/depfence-test-<rand>`; everything under it is unpinned on drop.
pub struct Pins {
    /// The layout under the root.
    pub layout: PinLayout,
}

impl Pins {
    /// A fresh pin root (bpffs is mounted if missing).
    pub fn new() -> Self {
        let (bpffs, mounted) = ensure_bpffs().unwrap_or_else(|e| panic!("bpffs: {e}"));
        if mounted {
            eprintln!("note: mounted bpffs at {}", bpffs.display());
        }
        Self { layout: PinLayout::new(bpffs.join(format!("depfence-test-{}", random_suffix()))) }
    }
}

impl Default for Pins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let r = self.layout.remove_all();
        let gone = !self.layout.root().exists();
        match (r, gone) {
            (Ok(()), true) => {}
            (r, _) if std::thread::panicking() => {
                eprintln!("cleanup: pins {}: {r:?}", self.layout.root().display());
            }
            (r, gone) => panic!("cleanup: pins {}: {r:?} gone={gone}", self.layout.root().display()),
        }
    }
}

/// A fresh datapath pinned under `pins`, with every hook attached to `cg`.
pub fn attached(cg: &Cgroup, pins: &Pins) -> Datapath {
    let mut dp = Datapath::load(&pins.layout).unwrap_or_else(|e| panic!("load: {e:?}"));
    dp.attach(&cg.path, &prog_names::ALL).unwrap_or_else(|e| panic!("attach: {e:?}"));
    dp
}

/// Installs `allows` as ruleset 1 and puts the cgroup `cgroup_id` in enforce on it, counting
/// in `slot`.
pub fn enforce(dp: &mut Datapath, cgroup_id: u64, slot: u32, allows: &[depfence::lower::Allow]) {
    let ruleset = depfence::lower::compile(1, allows).unwrap();
    dp.maps.install(&ruleset).unwrap();
    dp.maps.set_cgroup(cgroup_id, state(1, depfence_bpf_common::MODE_ENFORCE, slot)).unwrap();
}

/// A cgroup state: `ruleset` active in `mode`, counted in `slot`, generation = ruleset.
pub fn state(ruleset: u32, mode: u32, slot: u32) -> CgroupState {
    CgroupState { ruleset_id: ruleset, mode, candidate_ruleset: 0, flags: 0, counter_slot: slot, generation: ruleset }
}

/// A binary of this crate (`depfence-probe`, `depfence-loader`): beside the running executable
/// (another binary of the crate) or one directory up (a test executable in `deps/`).
pub fn crate_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let path = [dir, dir.parent().unwrap()].iter().map(|d| d.join(name)).find(|p| p.exists());
    path.unwrap_or_else(|| panic!("{name} is not built next to {}", exe.display()))
}

/// The probe binary with `args`.
pub fn probe_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(crate_binary("depfence-probe"));
    cmd.args(args);
    cmd
}

/// Runs the probe inside `cgroup` and returns its one output line (see depfence-probe's usage).
pub fn probe_line(cgroup: &Path, args: &[&str]) -> String {
    let out = spawn_in(cgroup, probe_command(args).stdout(std::process::Stdio::piped()))
        .unwrap_or_else(|e| panic!("spawn probe: {e}"))
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait probe: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `depfence-probe kind ip port count` inside `cgroup`: Ok(calls made) or Err(errno).
pub fn probe(cgroup: &Path, kind: &str, ip: IpAddr, port: u16, count: u64) -> Result<u64, i32> {
    let line = probe_line(cgroup, &[kind, &ip.to_string(), &port.to_string(), &count.to_string()]);
    let mut f = line.split_whitespace();
    match (f.next(), f.next()) {
        (Some("ok"), Some(n)) => Ok(n.parse().unwrap()),
        (Some("err"), Some(e)) => Err(e.parse().unwrap()),
        _ => panic!("probe said {line:?}"),
    }
}

/// Retries `probe` for up to two seconds until it gives `expected`, and returns what it gave
/// last. For what the kernel does asynchronously: a link whose last reference went away (its
/// pin removed, the last fd closed) is released from a workqueue, a little after the unpin.
pub fn probe_until(cgroup: &Path, kind: &str, ip: IpAddr, port: u16, expected: Result<u64, i32>) -> Result<u64, i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let got = probe(cgroup, kind, ip, port, 1);
        if got == expected || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP listener on `ip` that accepts and drops forever (its thread lives until the test
/// process exits). Returns the port.
pub fn tcp_listener(ip: IpAddr) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    port
}

/// A UDP socket bound on `ip` and its port.
pub fn udp_receiver(ip: IpAddr) -> (UdpSocket, u16) {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// A tiny HTTP server on `ip` (thread lives until the test process exits): reads the request
/// head, answers `HTTP/1.0 200 OK`, closes. Returns the port.
pub fn http_server(ip: IpAddr) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
                }
            }
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
        }
    });
    port
}

/// A sysctl set for the length of a test: the old value is written back on drop.
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    /// Sets `/proc/sys/<name>` (dots or slashes) to `value`.
    pub fn set(name: &str, value: &str) -> Self {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let old = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { path, old: old.trim_end().to_owned() }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!("cleanup: restoring {} to {:?}: {e}", self.path.display(), self.old);
        }
    }
}

/// The system's Python: one any user can run (a pyenv under /root is not).
pub const PYTHON: &str = "/usr/bin/python3";

/// `python3 -c script args…` as uid/gid 65534 with no supplementary groups (an unprivileged
/// process), output piped; spawn it with [`spawn_in`] to put it in a cgroup.
pub fn unprivileged_python(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-c", script])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}
