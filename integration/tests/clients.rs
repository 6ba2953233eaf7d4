//! Privileged tests with real clients: curl, TCP Fast Open, threads, grandchild processes, a
//! foreign cgroup program beside ours, and a loader process killed with SIGKILL.
//! Run as root: `cargo test -p depfence-integration --test clients`. Without root every test
//! prints why it skipped; under CI (`CI=true`) a skip is a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking"
)]

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, TcpListener},
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use depfence::cgroup::{cgroup_id, spawn_in};
use depfence::datapath::{Adopted, Datapath, DatapathError};
use depfence::lower::{Allow, compile};
use depfence_bpf_common::{
    AF_INET, AF_INET6, CgroupState, Event, FLAG_ACTIVE_HAS_CIDR, IPPROTO_TCP, MODE_AUDIT, MODE_ENFORCE,
    VERDICT_ALLOWED, VERDICT_REJECTED, VERDICT_WOULD_REJECT, prog_names, user::words_addr,
};
use depfence_integration::fixture::{
    Cgroup, EPERM, LO4, LO6, Pins, attached, crate_binary, enforce, http_server, probe, probe_line, probe_until, state,
    tcp_listener,
};

fn privileged(test: &str) -> bool {
    depfence_integration::require_privileges(test)
}

fn v4(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, d))
}

/// Runs real curl inside `cgroup` against `http://ip:port/`: (exit code, `%{http_code}`, stderr).
fn curl(cgroup: &Path, ip: IpAddr, port: u16) -> (i32, String, String) {
    let mut cmd = Command::new("curl");
    // -q first: ignore any ~/.curlrc; no proxy, whatever the environment says.
    cmd.args(["-q", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://{ip}:{port}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    let out = spawn_in(cgroup, &mut cmd).unwrap_or_else(|e| panic!("spawn curl: {e}")).wait_with_output().unwrap();
    let code = out.status.code().unwrap_or_else(|| panic!("curl killed: {:?}", out.status));
    (code, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).trim().to_owned())
}

/// curl against 127.0.0.2 (exact rule), 127.0.0.3 (a /32 block, any port) and 127.0.0.4 (no
/// rule): enforce refuses only .4 (curl exit 7, "couldn't connect"), audit lets all three
/// through and counts exactly one would-be rejection. The events name curl and 127.0.0.4.
#[test]
fn curl_reaches_only_allowed_loopback_addresses() {
    if !privileged("curl_reaches_only_allowed_loopback_addresses") {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let (a2, a3, a4) = (v4(2), v4(3), v4(4));
    let (p2, p3, p4) = (http_server(a2), http_server(a3), http_server(a4));
    let rs = compile(
        1,
        &[
            Allow::Host { addr: a2, proto: IPPROTO_TCP, port: p2, rule_id: 21 },
            Allow::Cidr { addr: a3, prefix: 32, proto: IPPROTO_TCP, ports: (0, 65535), rule_id: 22 },
        ],
    )
    .unwrap();
    dp.maps.install(&rs).unwrap();
    let slot = 5;
    let with_cidr = |mode| CgroupState { flags: FLAG_ACTIVE_HAS_CIDR, ..state(1, mode, slot) };
    dp.maps.set_cgroup(cg.id(), with_cidr(MODE_ENFORCE)).unwrap();
    let c = |dp: &Datapath, v| dp.maps.counter(slot, v).unwrap();

    // The test process itself is not in the cgroup: all three servers answer it.
    for (ip, port) in [(a2, p2), (a3, p3), (a4, p4)] {
        let mut s = std::net::TcpStream::connect((ip, port)).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 200 OK"), "{ip}:{port} answered {reply:?}");
    }

    // enforce
    let t = Instant::now();
    assert_eq!(curl(&cg.path, a2, p2), (0, "200".into(), String::new()), "exact rule 127.0.0.2:{p2}");
    assert_eq!(curl(&cg.path, a3, p3), (0, "200".into(), String::new()), "block 127.0.0.3/32, any port");
    let (code, http, err) = curl(&cg.path, a4, p4);
    eprintln!("curl to 127.0.0.4 in enforce: exit {code}, http_code {http}, stderr {err:?}");
    assert_eq!(code, 7, "CURLE_COULDNT_CONNECT: {err}");
    assert_eq!(http, "000");
    assert!(err.contains("127.0.0.4"), "{err}");
    assert_eq!((c(&dp, VERDICT_ALLOWED), c(&dp, VERDICT_REJECTED), c(&dp, VERDICT_WOULD_REJECT)), (2, 1, 0));
    let events = dp.maps.drain_events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!((e.comm_name().as_ref(), words_addr(e.addr), e.port), ("curl", a4, p4));
    assert_eq!((e.verdict, e.proto, e.family, e.cgroup_id), (VERDICT_REJECTED, IPPROTO_TCP, AF_INET, cg.id()));

    // audit: all three pass; exactly one would-be rejection.
    dp.maps.set_cgroup(cg.id(), with_cidr(MODE_AUDIT)).unwrap();
    for (ip, port) in [(a2, p2), (a3, p3), (a4, p4)] {
        assert_eq!(curl(&cg.path, ip, port), (0, "200".into(), String::new()), "audit lets {ip}:{port} through");
    }
    assert_eq!(c(&dp, VERDICT_WOULD_REJECT), 1);
    assert_eq!((c(&dp, VERDICT_ALLOWED), c(&dp, VERDICT_REJECTED)), (4, 1));
    let events = dp.maps.drain_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].comm_name().as_ref(), words_addr(events[0].addr), events[0].verdict),
        ("curl", a4, VERDICT_WOULD_REJECT)
    );
    eprintln!("6 curl runs in {:?}", t.elapsed());
}

/// TCP Fast Open: `sendto(MSG_FASTOPEN)` connects inside sendmsg (`tcp_sendmsg_fastopen` →
/// `__inet_stream_connect`), which runs the `pre_connect` hook = cgroup connect4/connect6, the
/// same as connect(). So TFO is policed: a denied destination gets EPERM before any SYN is
/// sent (the listener never sees a connection), an allowed one gets its data delivered.
#[test]
fn tcp_fast_open_goes_through_the_connect_hooks() {
    if !privileged("tcp_fast_open_goes_through_the_connect_hooks") {
        return;
    }
    let sysctl = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen").unwrap();
    let tfo: u32 = sysctl.trim().parse().unwrap();
    // Without the client bit (1) sendto(MSG_FASTOPEN) fails with EOPNOTSUPP before any hook.
    if tfo & 1 == 0 {
        let why = format!("net.ipv4.tcp_fastopen = {tfo}: the TCP Fast Open client is disabled");
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{why}");
        eprintln!("skipping tcp_fast_open_goes_through_the_connect_hooks: {why}");
        return;
    }

    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let listen = |ip: IpAddr| {
        let l = TcpListener::bind((ip, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    };
    let (ok4, ok4_port) = listen(LO4);
    let (no4, no4_port) = listen(LO4);
    let (ok6, ok6_port) = listen(LO6);
    let (no6, no6_port) = listen(LO6);
    let slot = 6;
    enforce(
        &mut dp,
        cg.id(),
        slot,
        &[
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: ok4_port, rule_id: 1 },
            Allow::Host { addr: LO6, proto: IPPROTO_TCP, port: ok6_port, rule_id: 2 },
        ],
    );

    assert_eq!(probe(&cg.path, "tfo", LO4, no4_port, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "tfo", LO6, no6_port, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "tfo", LO4, ok4_port, 1), Ok(1));
    assert_eq!(probe(&cg.path, "tfo", LO6, ok6_port, 1), Ok(1));
    for (l, what) in [(&no4, "denied v4"), (&no6, "denied v6")] {
        let r = l.accept();
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{what}: no handshake may happen: {r:?}"
        );
    }
    for (l, what) in [(&ok4, "allowed v4"), (&ok6, "allowed v6")] {
        let (mut s, _) = l.accept().unwrap_or_else(|e| panic!("{what}: {e}"));
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut data = Vec::new();
        s.read_to_end(&mut data).unwrap();
        assert_eq!(data, b"depfence", "{what}: the sendto data arrives");
    }
    assert_eq!(dp.maps.counter(slot, VERDICT_ALLOWED).unwrap(), 2);
    assert_eq!(dp.maps.counter(slot, VERDICT_REJECTED).unwrap(), 2);
    let events = dp.maps.drain_events();
    let seen: Vec<_> = events.iter().map(|e| (e.family, e.proto, e.port, e.verdict)).collect();
    assert_eq!(
        seen,
        [(AF_INET, IPPROTO_TCP, no4_port, VERDICT_REJECTED), (AF_INET6, IPPROTO_TCP, no6_port, VERDICT_REJECTED)]
    );

    // audit: TFO to the denied destination passes and is counted once.
    dp.maps.set_cgroup(cg.id(), state(1, MODE_AUDIT, slot)).unwrap();
    assert_eq!(probe(&cg.path, "tfo", LO4, no4_port, 1), Ok(1));
    assert_eq!(dp.maps.counter(slot, VERDICT_WOULD_REJECT).unwrap(), 1);
}

/// One process, 16 threads released together by a barrier, each connecting once: every
/// thread is policed (the hook runs in the calling thread's context; all threads of a process
/// share its cgroup). Exact counters, one event per thread, one tgid, 16 distinct thread ids.
#[test]
fn every_thread_of_a_process_is_policed() {
    if !privileged("every_thread_of_a_process_is_policed") {
        return;
    }
    const THREADS: u64 = 16;
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let allowed = tcp_listener(LO4);
    let denied = tcp_listener(LO4);
    let slot = 9;
    enforce(&mut dp, cg.id(), slot, &[Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: allowed, rule_id: 1 }]);
    let n = THREADS.to_string();

    // enforce: every thread gets EPERM, none succeeds.
    let line = probe_line(&cg.path, &["threads", "127.0.0.1", &denied.to_string(), &n]);
    assert_eq!(line, "err 1 0", "{THREADS} threads to a denied destination");
    assert_eq!(dp.maps.counter(slot, VERDICT_REJECTED).unwrap(), THREADS);
    let events = dp.maps.drain_events();
    assert_eq!(events.len() as u64, THREADS, "{events:?}");
    let tgids: BTreeSet<u32> = events.iter().map(Event::pid).collect();
    let tids: BTreeSet<u32> = events.iter().map(|e| e.pid_tgid as u32).collect();
    assert_eq!(tgids.len(), 1, "one process: {tgids:?}");
    assert_eq!(tids.len() as u64, THREADS, "each event from its own thread: {tids:?}");
    let pid = *tgids.first().unwrap();
    assert!(!tids.contains(&pid), "the main thread only waits; the workers connect");
    assert!(events.iter().all(|e| e.port == denied && e.verdict == VERDICT_REJECTED));

    // and every thread to the allowed destination succeeds.
    let line = probe_line(&cg.path, &["threads", "127.0.0.1", &allowed.to_string(), &n]);
    assert_eq!(line, format!("ok {THREADS}"));
    assert_eq!(dp.maps.counter(slot, VERDICT_ALLOWED).unwrap(), THREADS);
    assert_eq!(dp.maps.counter(slot, VERDICT_REJECTED).unwrap(), THREADS);
}

/// `sh -c 'sh -c "probe …; true"; true'` started in the cgroup: the probe is a grandchild of
/// the spawned process (the trailing `true`s keep either shell from exec'ing its last
/// command). It is refused, and the event carries its own pid and comm.
#[test]
fn grandchild_processes_are_policed_and_named_in_events() {
    if !privileged("grandchild_processes_are_policed_and_named_in_events") {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let allowed = tcp_listener(LO4);
    let denied = tcp_listener(LO4);
    let slot = 11;
    enforce(&mut dp, cg.id(), slot, &[Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: allowed, rule_id: 1 }]);

    let run = |port: u16| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"sh -c '"$PROBE" tcp 127.0.0.1 "$PORT" 1; true'; true"#])
            .env("PROBE", crate_binary("depfence-probe"))
            .env("PORT", port.to_string())
            .env("DEPFENCE_PROBE_PIDS", "1")
            .stdout(Stdio::piped());
        let child = spawn_in(&cg.path, &mut cmd).unwrap();
        let outer = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{:?}", out.status);
        let line = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        // `<result…> pid P ppid Q gppid G`
        let (result, pids) = line.split_once(" pid ").unwrap_or_else(|| panic!("probe said {line:?}"));
        let nums: Vec<u32> =
            pids.split_whitespace().filter(|w| !w.ends_with("pid")).map(|w| w.parse().unwrap()).collect();
        let [pid, ppid, gppid] = nums[..] else { panic!("probe said {line:?}") };
        assert_eq!(gppid, outer, "the probe's grandparent is the spawned shell: {line}");
        assert!(pid != outer && ppid != outer, "{line}");
        (result.to_owned(), pid)
    };

    let (result, pid) = run(denied);
    assert_eq!(result, "err 1 0");
    assert_eq!(dp.maps.counter(slot, VERDICT_REJECTED).unwrap(), 1);
    let events = dp.maps.drain_events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!((e.pid(), e.comm_name().as_ref()), (pid, "depfence-probe"), "the event names the grandchild");
    assert_eq!((e.cgroup_id, e.port, e.verdict), (cg.id(), denied, VERDICT_REJECTED));

    let (result, _) = run(allowed);
    assert_eq!(result, "ok 1");
    assert_eq!(dp.maps.counter(slot, VERDICT_ALLOWED).unwrap(), 1);
}

/// A cgroup/connect4 program that is not depfence's, loaded and attached with raw bpf(2) the
/// way systemd attaches its IP filters (`BPF_PROG_ATTACH`, not a bpf_link). It refuses one
/// destination port (EPERM) and allows everything else, so a test can see it run. Dropping it
/// detaches it (`BPF_PROG_DETACH`) and closes the program.
#[expect(unsafe_code, reason = "bpf(2) has no safe wrapper for loading raw instructions or for BPF_PROG_ATTACH")]
mod foreign {
    use std::{
        fs::File,
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        path::Path,
    };

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_DETACH: libc::c_long = 9;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    /// Attach flags: none = exclusive (nothing else here, nothing below).
    pub const EXCLUSIVE: u32 = 0;
    /// `BPF_F_ALLOW_OVERRIDE`: a descendant's program replaces this one for its subtree.
    pub const ALLOW_OVERRIDE: u32 = 1;
    /// `BPF_F_ALLOW_MULTI`: programs here and below all run (systemd's mode).
    pub const ALLOW_MULTI: u32 = 2;
    /// Its kernel name (`bpftool prog show name …`).
    pub const NAME: &str = "df_test_foreign";

    /// `struct bpf_insn`: opcode, dst_reg (low nibble) | src_reg (high nibble), offset, imm.
    #[repr(C)]
    struct Insn(u8, u8, i16, i32);

    /// The `BPF_PROG_LOAD` part of `union bpf_attr` (the kernel zero-extends shorter attrs).
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    /// The `BPF_PROG_ATTACH` / `BPF_PROG_DETACH` part of `union bpf_attr`.
    #[repr(C)]
    struct AttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, fully initialised #[repr(C)] prefix of `union bpf_attr` for
        // `cmd`, and its size is passed; the kernel reads (and for PROG_LOAD writes the log
        // buffer it points to) only within that.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
    }

    /// A loaded and attached foreign program; detached and closed on drop.
    pub struct Foreign {
        cgroup: File,
        prog: OwnedFd,
    }

    impl Foreign {
        /// Loads `if (ctx->user_port == htons(deny_port)) return 0; return 1;` and attaches it
        /// to the cgroup directory with `flags` (`EXCLUSIVE`, `ALLOW_OVERRIDE`, `ALLOW_MULTI`).
        pub fn attach(cgroup: &Path, deny_port: u16, flags: u32) -> io::Result<Self> {
            let insns = [
                Insn(0x61, 0x12, 24, 0),                           // r2 = *(u32 *)(r1 + 24): user_port
                Insn(0x15, 0x02, 2, i32::from(deny_port.to_be())), // if r2 == htons(port) goto +2
                Insn(0xb7, 0x00, 0, 1),                            // r0 = 1 (allow)
                Insn(0x95, 0x00, 0, 0),                            // exit
                Insn(0xb7, 0x00, 0, 0),                            // r0 = 0 (EPERM)
                Insn(0x95, 0x00, 0, 0),                            // exit
            ];
            let license = c"GPL";
            let mut log = vec![0u8; 4096];
            let mut prog_name = [0u8; 16];
            prog_name[..NAME.len()].copy_from_slice(NAME.as_bytes());
            let mut load = ProgLoadAttr {
                prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 1,
                log_size: log.len() as u32,
                log_buf: log.as_mut_ptr() as u64,
                prog_name,
                expected_attach_type: BPF_CGROUP_INET4_CONNECT,
                ..ProgLoadAttr::default()
            };
            let fd = bpf(BPF_PROG_LOAD, &mut load).map_err(|e| {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                io::Error::new(
                    e.kind(),
                    format!("BPF_PROG_LOAD: {e}; verifier: {}", String::from_utf8_lossy(&log[..end])),
                )
            })?;
            // SAFETY: the kernel returned a new program fd that nobody else owns.
            let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let cgroup = File::open(cgroup)?;
            let mut attach = AttachAttr {
                target_fd: cgroup.as_raw_fd() as u32,
                attach_bpf_fd: prog.as_raw_fd() as u32,
                attach_type: BPF_CGROUP_INET4_CONNECT,
                attach_flags: flags,
            };
            bpf(BPF_PROG_ATTACH, &mut attach).map_err(|e| io::Error::new(e.kind(), format!("BPF_PROG_ATTACH: {e}")))?;
            Ok(Self { cgroup, prog })
        }
    }

    impl Drop for Foreign {
        fn drop(&mut self) {
            let mut detach = AttachAttr {
                target_fd: self.cgroup.as_raw_fd() as u32,
                attach_bpf_fd: self.prog.as_raw_fd() as u32,
                attach_type: BPF_CGROUP_INET4_CONNECT,
                attach_flags: 0,
            };
            // Never panic in drop; the program fd closes after this either way.
            if let Err(e) = bpf(BPF_PROG_DETACH, &mut detach) {
                eprintln!("cleanup: BPF_PROG_DETACH of the foreign program: {e}");
            }
        }
    }
}

/// The cgroup's connect4 programs as bpftool lists them (for the test log only).
fn bpftool_cgroup(dir: &Path) -> String {
    Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(bpftool: {e})"))
}

/// A foreign connect4 program attached with BPF_F_ALLOW_MULTI (systemd's way) before depfence:
/// depfence's link attach succeeds and both run on every connect. depfence allows A and X and
/// refuses B; the foreign program refuses X. So A passes, B gets EPERM from depfence (counted
/// rejected), X gets EPERM from the foreign program (depfence counted it allowed). Removing
/// depfence's pins detaches only depfence; dropping the guard detaches the foreign program.
#[test]
fn coexists_with_a_foreign_multi_program_on_the_same_cgroup() {
    if !privileged("coexists_with_a_foreign_multi_program_on_the_same_cgroup") {
        return;
    }
    let cg = Cgroup::new();
    let (a, b, x) = (tcp_listener(LO4), tcp_listener(LO4), tcp_listener(LO4));
    let foreign = foreign::Foreign::attach(&cg.path, x, foreign::ALLOW_MULTI).unwrap();
    assert_eq!(probe(&cg.path, "tcp", LO4, x, 1), Err(EPERM), "the foreign program alone refuses X");
    assert_eq!(probe(&cg.path, "tcp", LO4, b, 1), Ok(1), "and nothing else");

    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    eprintln!("bpftool cgroup show:\n{}", bpftool_cgroup(&cg.path));
    let slot = 13;
    enforce(
        &mut dp,
        cg.id(),
        slot,
        &[
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: a, rule_id: 1 },
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: x, rule_id: 2 },
        ],
    );

    assert_eq!(probe(&cg.path, "tcp", LO4, a, 1), Ok(1), "both allow A");
    assert_eq!(probe(&cg.path, "tcp", LO4, b, 1), Err(EPERM), "depfence refuses B");
    assert_eq!(probe(&cg.path, "tcp", LO4, x, 1), Err(EPERM), "the foreign program refuses X");
    assert_eq!(dp.maps.counter(slot, VERDICT_ALLOWED).unwrap(), 2, "depfence ran for A and X");
    assert_eq!(dp.maps.counter(slot, VERDICT_REJECTED).unwrap(), 1, "and refused only B");
    let events: Vec<_> = dp.maps.drain_events().iter().map(|e| (e.port, e.verdict)).collect();
    assert_eq!(events, [(b, VERDICT_REJECTED)]);

    // depfence goes (its link pins removed): the foreign program stays.
    drop(dp);
    drop(pins);
    assert_eq!(probe_until(&cg.path, "tcp", LO4, b, Ok(1)), Ok(1), "depfence detached");
    assert_eq!(probe(&cg.path, "tcp", LO4, x, 1), Err(EPERM), "the foreign program is still attached");
    drop(foreign);
    assert_eq!(probe(&cg.path, "tcp", LO4, x, 1), Ok(1), "the foreign program detached");
}

/// The errno at the bottom of an error chain.
fn root_errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

/// An error and its sources, `: `-separated.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s = format!("{s}: {err}");
        cur = err.source();
    }
    s
}

/// A foreign connect4 program attached exclusively (flags 0, the legacy default) leaves no room:
/// the kernel refuses depfence's attach on that cgroup and on every cgroup below it with EPERM
/// (`__cgroup_bpf_attach`: a multi attach on a cgroup whose programs were attached without
/// BPF_F_ALLOW_MULTI; `hierarchy_allows_attach`: an ancestor holds a non-overridable program).
/// The first hook fails, so nothing of depfence is attached or pinned, and the foreign program
/// keeps working.
#[test]
fn exclusive_foreign_program_makes_attach_fail_with_eperm() {
    if !privileged("exclusive_foreign_program_makes_attach_fail_with_eperm") {
        return;
    }
    let mut cg = Cgroup::new();
    let below = cg.child("below");
    let (b, x) = (tcp_listener(LO4), tcp_listener(LO4));
    let foreign = foreign::Foreign::attach(&cg.path, x, foreign::EXCLUSIVE).unwrap();
    let pins = Pins::new();
    let mut dp = Datapath::load(&pins.layout).unwrap();
    for dir in [&cg.path, &below] {
        let e = dp.attach(dir, &prog_names::ALL).map(|_| ()).unwrap_err();
        let message = chain(&e);
        eprintln!("attach to {} with an exclusive foreign program: {message}", dir.display());
        assert!(matches!(e, DatapathError::AttachRefused { hook: prog_names::CONNECT4, .. }), "{e:?}");
        assert_eq!(root_errno(&e), Some(EPERM), "{message}");
        for part in ["df_connect4", "without BPF_F_ALLOW_MULTI", "bpf_link_create", "Operation not permitted"] {
            assert!(message.contains(part), "{message}");
        }
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
    }
    // All or nothing: connect6 attaches first, connect4 is refused, connect6 is taken back.
    let e = dp.attach(&below, &[prog_names::CONNECT6, prog_names::CONNECT4]).map(|_| ()).unwrap_err();
    assert!(matches!(e, DatapathError::AttachRefused { hook: prog_names::CONNECT4, .. }), "{e:?}");
    let links: Vec<_> = std::fs::read_dir(pins.layout.links_dir()).unwrap().collect();
    assert!(links.is_empty(), "nothing of depfence attached: {links:?}");
    assert_eq!(probe(&cg.path, "tcp", LO4, x, 1), Err(EPERM), "the foreign program still runs");
    assert_eq!(probe(&below, "tcp", LO4, x, 1), Err(EPERM), "below too");
    assert_eq!(probe(&below, "tcp", LO4, b, 1), Ok(1));
    drop(dp);
    drop(pins);
    drop(foreign);
}

/// A foreign program attached to an ancestor with BPF_F_ALLOW_OVERRIDE: depfence's attach below
/// succeeds, and from then on the kernel runs depfence *instead of* the foreign program for that
/// subtree (`compute_effective_progs` adds an ancestor's programs only if it is ALLOW_MULTI or
/// nothing nearer is attached). The ancestor itself keeps the foreign program.
#[test]
fn override_foreign_program_on_an_ancestor_is_replaced_below() {
    if !privileged("override_foreign_program_on_an_ancestor_is_replaced_below") {
        return;
    }
    let mut cg = Cgroup::new();
    let below = cg.child("below");
    let (a, x) = (tcp_listener(LO4), tcp_listener(LO4));
    let foreign = foreign::Foreign::attach(&cg.path, x, foreign::ALLOW_OVERRIDE).unwrap();
    assert_eq!(probe(&below, "tcp", LO4, x, 1), Err(EPERM), "inherited before depfence attaches");

    let pins = Pins::new();
    let mut dp = Datapath::load(&pins.layout).unwrap();
    dp.attach(&below, &prog_names::ALL).unwrap();
    let rs = compile(
        1,
        &[
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: a, rule_id: 1 },
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: x, rule_id: 2 },
        ],
    )
    .unwrap();
    dp.maps.install(&rs).unwrap();
    let slot = 14;
    dp.maps.set_cgroup(cgroup_id(&below).unwrap(), state(1, MODE_ENFORCE, slot)).unwrap();
    assert_eq!(probe(&below, "tcp", LO4, x, 1), Ok(1), "the ancestor's foreign program no longer runs below");
    assert_eq!(probe(&below, "tcp", LO4, a, 1), Ok(1));
    assert_eq!(dp.maps.counter(slot, VERDICT_ALLOWED).unwrap(), 2);
    assert_eq!(probe(&cg.path, "tcp", LO4, x, 1), Err(EPERM), "the ancestor itself keeps it");
    drop(dp);
    drop(pins);
    assert_eq!(probe_until(&below, "tcp", LO4, x, Err(EPERM)), Err(EPERM), "depfence gone: inherited again");
    drop(foreign);
}

/// Kills a child process on drop (if it still runs) and reaps it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real loader process (depfence-loader) loads, attaches, enforces one rule and is killed
/// with SIGKILL: no cleanup code runs. Enforcement does not lapse (pinned links keep the
/// programs attached, pinned maps keep the rules), and a new instance adopts the state with
/// the counters and the unread events from before and after the kill.
#[test]
fn enforcement_survives_kill_9_of_the_loader() {
    if !privileged("enforcement_survives_kill_9_of_the_loader") {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let allowed = tcp_listener(LO4);
    let denied = tcp_listener(LO4);
    let mut cmd = Command::new(crate_binary("depfence-loader"));
    cmd.arg(&cg.path).arg(pins.layout.root()).args(["127.0.0.1", &allowed.to_string()]);
    let mut loader =
        KillOnDrop(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap());
    let stdout = loader.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("loader not ready: {e}"));
    if line.trim() != "ready" {
        let mut err = String::new();
        let _ = loader.0.stderr.take().unwrap().read_to_string(&mut err);
        panic!("loader said {line:?}, stderr {err:?}, status {:?}", loader.0.try_wait());
    }
    let pid = loader.0.id();

    assert_eq!(probe(&cg.path, "tcp", LO4, denied, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "tcp", LO4, allowed, 1), Ok(1));

    loader.0.kill().unwrap();
    let status = loader.0.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "loader {pid} is gone");

    // No loader process: the kernel still enforces.
    assert_eq!(probe(&cg.path, "tcp", LO4, denied, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "tcp", LO4, denied, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "tcp", LO4, allowed, 1), Ok(1));

    let mut ad = Adopted::open(&pins.layout).unwrap_or_else(|e| panic!("adopt: {}", chain(&e)));
    assert_eq!(ad.links.len(), prog_names::ALL.len(), "every hook stayed attached");
    assert_eq!(ad.maps.counter(0, VERDICT_REJECTED).unwrap(), 3, "1 before + 2 after the kill");
    assert_eq!(ad.maps.counter(0, VERDICT_ALLOWED).unwrap(), 2, "1 before + 1 after the kill");
    let events: Vec<_> =
        ad.maps.drain_events().iter().map(|e| (e.port, e.verdict, e.comm_name().into_owned())).collect();
    assert_eq!(events, vec![(denied, VERDICT_REJECTED, "depfence-probe".to_owned()); 3], "events wait in the ring");
    drop(ad);
    drop(loader);
    drop(pins); // unpins the links: detached
    assert_eq!(probe_until(&cg.path, "tcp", LO4, denied, Ok(1)), Ok(1), "detached with the pins");
}
