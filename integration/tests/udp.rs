//! Connected UDP sockets that send with control messages (`IP_TOS`, `IPV6_TCLASS`,
//! `IP_PKTINFO`, `IPV6_PKTINFO`, as QUIC stacks do) and no address: the kernel runs the sendmsg
//! hook for such a send with a zeroed address, and the hook judges it by the socket's connected
//! destination. The clients are Python sockets run as an unprivileged user (uid 65534) inside the
//! cgroup. Run as root: `cargo test -p depfence-integration --test udp`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking"
)]

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use depfence::cgroup::spawn_in;
use depfence::datapath::Datapath;
use depfence::lower::Allow;
use depfence_bpf_common::{
    IPPROTO_UDP, MODE_AUDIT, MODE_ENFORCE, VERDICT_ALLOWED, VERDICT_REJECTED, VERDICT_WOULD_REJECT, user::words_addr,
};
use depfence_integration::fixture::{
    Cgroup, LO4, LO6, PYTHON, Pins, attached, enforce, state, udp_receiver, unprivileged_python,
};
use depfence_integration::{require_privileges, require_tool};

/// The client: `kind family ip port`. `tos` and `pktinfo` connect, then send one datagram with
/// that control message and no address; `plain` connects and sends without one; `unspec` sends
/// from an IPv4 socket to an `AF_UNSPEC` socket address that carries `ip:port`. Prints `ok` or
/// `err <errno>`. Family `mapped` is an IPv6 socket connected to an IPv4-mapped address.
const CLIENT: &str = r#"
import ctypes, socket, struct, sys
kind, family, ip, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
IP_TOS, IP_PKTINFO, IPV6_TCLASS, IPV6_PKTINFO = 1, 8, 67, 50
v6 = family in ("6", "mapped")
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
if family == "mapped":
    ip = "::ffff:" + ip
try:
    if kind == "unspec":
        libc = ctypes.CDLL(None, use_errno=True)
        addr = struct.pack("=H", 0) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)
        if libc.sendto(s.fileno(), b"depfence", 8, 0, addr, len(addr)) < 0:
            raise OSError(ctypes.get_errno(), "sendto")
    else:
        s.connect((ip, port))
        if kind == "tos" and not v6:
            cmsg = [(socket.IPPROTO_IP, IP_TOS, struct.pack("i", 0x10))]
        elif kind == "tos":
            cmsg = [(socket.IPPROTO_IPV6, IPV6_TCLASS, struct.pack("i", 0x10))]
        elif kind == "pktinfo" and not v6:
            cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("I4s4s", 0, bytes(4), bytes(4)))]
        elif kind == "pktinfo":
            cmsg = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("16sI", bytes(16), 0))]
        else:
            cmsg = []
        s.sendmsg([b"depfence"], cmsg)
    print("ok")
except OSError as e:
    print("err", e.errno)
"#;

/// Runs the client as uid/gid 65534 inside `cgroup`; its one line.
fn client(cgroup: &Path, kind: &str, family: &str, ip: IpAddr, port: u16) -> String {
    let ip = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.to_string(),
    };
    let port = port.to_string();
    let mut cmd = unprivileged_python(CLIENT, &[kind, family, &ip, &port]);
    cmd.stdin(Stdio::null());
    let out = spawn_in(cgroup, &mut cmd).unwrap().wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(line == "ok" || line.starts_with("err "), "client said {line:?}: {}", String::from_utf8_lossy(&out.stderr));
    line
}

/// How many datagrams `rx` has waiting.
fn received(rx: &UdpSocket) -> usize {
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 64];
    let mut n = 0;
    while rx.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

fn counts(dp: &Datapath, slot: u32) -> (u64, u64, u64) {
    let c = |v| dp.maps.counter(slot, v).unwrap();
    (c(VERDICT_ALLOWED), c(VERDICT_WOULD_REJECT), c(VERDICT_REJECTED))
}

#[test]
fn connected_udp_sends_with_control_messages_are_judged_by_their_destination() {
    let test = "connected_udp_sends_with_control_messages_are_judged_by_their_destination";
    if !require_privileges(test) || require_tool(test, PYTHON, "python3").is_none() {
        return;
    }
    if require_tool(test, "setpriv", "util-linux").is_none() {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let (rx4, allowed4) = udp_receiver(LO4);
    let (rx6, allowed6) = udp_receiver(LO6);
    let (denied_rx, denied) = udp_receiver(LO4);
    let slot = 9;
    let allows = [
        Allow::Host { addr: LO4, proto: IPPROTO_UDP, port: allowed4, rule_id: 1 },
        Allow::Host { addr: LO6, proto: IPPROTO_UDP, port: allowed6, rule_id: 2 },
    ];
    enforce(&mut dp, cg.id(), slot, &allows);

    // Enforce: every allowed send passes, whatever its control message and socket family.
    let sends = [
        ("tos", "4", LO4, allowed4),
        ("pktinfo", "4", LO4, allowed4),
        ("tos", "6", LO6, allowed6),
        ("pktinfo", "6", LO6, allowed6),
        ("tos", "mapped", LO4, allowed4),
        ("plain", "4", LO4, allowed4),
    ];
    for (kind, family, ip, port) in sends {
        assert_eq!(client(&cg.path, kind, family, ip, port), "ok", "{kind} over {family} to {ip}:{port} in enforce");
    }
    assert_eq!(received(&rx4), 4, "the IPv4 datagrams arrived");
    assert_eq!(received(&rx6), 2, "the IPv6 datagrams arrived");
    // Each client: its connect, and its send with a control message (the plain send runs no hook).
    assert_eq!(counts(&dp, slot), (11, 0, 0), "everything counted as allowed");

    // A denied destination stays denied: the connect is refused, and so is a send that names
    // it with an AF_UNSPEC address (judged by that address).
    let eperm = format!("err {}", libc::EPERM);
    assert_eq!(client(&cg.path, "tos", "4", LO4, denied), eperm);
    assert_eq!(client(&cg.path, "unspec", "4", LO4, denied), eperm);
    assert_eq!(client(&cg.path, "unspec", "4", LO4, allowed4), "ok");
    assert_eq!(received(&denied_rx), 0);
    assert_eq!(received(&rx4), 1);
    assert_eq!(counts(&dp, slot), (12, 0, 2));

    // Audit: the allowed sends count as allowed (no would-reject that would block a promotion);
    // sends on a socket connected to the denied destination are would-rejects of that
    // destination, never of `0.0.0.0:0`.
    dp.maps.set_cgroup(cg.id(), state(1, MODE_AUDIT, slot)).unwrap();
    dp.maps.drain_events();
    for (kind, family, ip, port) in sends {
        assert_eq!(client(&cg.path, kind, family, ip, port), "ok", "{kind} over {family} in audit");
    }
    assert_eq!(counts(&dp, slot), (23, 0, 2));
    assert_eq!(client(&cg.path, "tos", "4", LO4, denied), "ok", "audit lets it pass");
    assert_eq!(client(&cg.path, "pktinfo", "4", LO4, denied), "ok");
    assert_eq!(received(&denied_rx), 2);
    assert_eq!(counts(&dp, slot), (23, 4, 2), "each connect and each send is a would-reject");
    let events = dp.maps.drain_events();
    assert_eq!(events.len(), 4, "{events:?}");
    for e in &events {
        assert_eq!((words_addr(e.addr), e.port, e.verdict), (LO4, denied, VERDICT_WOULD_REJECT), "{e:?}");
    }
    assert_ne!(words_addr(events[0].addr), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    dp.maps.set_cgroup(cg.id(), state(1, MODE_ENFORCE, slot)).unwrap();
}
