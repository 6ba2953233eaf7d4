//! What the connect and sendmsg hooks never see, closed for an unprivileged process: sockets of
//! other protocols (UDP-Lite, ICMP "ping" datagrams) and IPv6 routing headers, which send a
//! packet first to an address of the caller's choosing. The probes are Python sockets run as
//! uid 65534 inside the cgroup. Run as root: `cargo test -p depfence-integration --test unseen`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking"
)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::process::Stdio;

use depfence::cgroup::spawn_in;
use depfence::datapath::Datapath;
use depfence::lower::Allow;
use depfence_bpf_common::{
    EVENT_ROUTING_HEADER, EVENT_SOCKET, IPPROTO_ROUTING, IPPROTO_UDP, MODE_AUDIT, MODE_ENFORCE, VERDICT_ALLOWED,
    VERDICT_REJECTED, VERDICT_WOULD_REJECT, user::words_addr,
};
use depfence_integration::fixture::{
    Cgroup, LO6, PYTHON, Pins, Sysctl, attached, enforce, state, udp_receiver, unprivileged_python,
};
use depfence_integration::{require_privileges, require_tool};

const AF_INET: &str = "2";
const AF_INET6: &str = "10";

/// Creates one socket per argument `family:type:protocol`; prints `ok` or `err <errno>` for each.
const SOCKETS: &str = r#"
import socket, sys
for spec in sys.argv[1:]:
    family, kind, proto = (int(x) for x in spec.split(":"))
    try:
        socket.socket(family, kind, proto).close()
        print("ok")
    except OSError as e:
        print("err", e.errno)
"#;

/// `how port`: sets a segment-routing header (first hop ::1) on an IPv6 UDP socket, then (after
/// a line on stdin when `how` is `hold`) sends one datagram to [::1]:port; `pktoptions` sets the
/// RFC 2292 sticky options instead. One line per step: `ok` or `err <errno>`.
const ROUTING_HEADER: &str = r#"
import socket, struct, sys
how, port = sys.argv[1], int(sys.argv[2])
IPV6_RTHDR, IPV6_2292PKTOPTIONS = 57, 6
segments = [socket.inet_pton(socket.AF_INET6, a) for a in ("::", "::1")]
# Type 4 (segment routing): next header, length in 8-byte units, type, segments left, last
# entry, flags, tag; then the segments, the first hop last.
srh = struct.pack("BBBBBBH", 0, 2 * len(segments), 4, len(segments) - 1, len(segments) - 1, 0, 0) + b"".join(segments)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
def step(f):
    try:
        f()
        print("ok", flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
if how == "pktoptions":
    step(lambda: s.setsockopt(socket.IPPROTO_IPV6, IPV6_2292PKTOPTIONS, b""))
else:
    step(lambda: s.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, srh))
if how == "hold":
    sys.stdin.readline()
step(lambda: s.sendto(b"depfence", ("::1", port)))
"#;

fn eperm() -> String {
    format!("err {}", libc::EPERM)
}

fn counts(dp: &Datapath, slot: u32) -> (u64, u64, u64) {
    let c = |v| dp.maps.counter(slot, v).unwrap();
    (c(VERDICT_ALLOWED), c(VERDICT_WOULD_REJECT), c(VERDICT_REJECTED))
}

/// Runs `script args…` unprivileged in `cgroup` to the end; its output lines.
fn run(cgroup: &Path, script: &str, args: &[&str]) -> Vec<String> {
    let mut cmd = unprivileged_python(script, args);
    cmd.stdin(Stdio::null());
    let out = spawn_in(cgroup, &mut cmd).unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

fn skip_without_tools(test: &str) -> bool {
    !require_privileges(test)
        || require_tool(test, PYTHON, "python3").is_none()
        || require_tool(test, "setpriv", "util-linux").is_none()
}

#[test]
fn sockets_no_destination_hook_sees_are_refused_in_enforce_and_reported_in_audit() {
    let test = "sockets_no_destination_hook_sees_are_refused_in_enforce_and_reported_in_audit";
    if skip_without_tools(test) {
        return;
    }
    // Ping sockets for every group, as many systemd hosts configure it (restored afterwards).
    let _ping = Sysctl::set("net.ipv4.ping_group_range", "0 2147483647");
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let slot = 5;
    enforce(&mut dp, cg.id(), slot, &[]);

    let judged = [
        format!("{AF_INET}:1:0"),   // TCP
        format!("{AF_INET6}:1:6"),  // TCP
        format!("{AF_INET}:1:262"), // MPTCP
        format!("{AF_INET}:2:0"),   // UDP
        format!("{AF_INET6}:2:17"), // UDP
        "1:1:0".to_owned(),         // a Unix stream socket: no network destination
    ];
    let unseen = [
        format!("{AF_INET}:2:136"), // UDP-Lite
        format!("{AF_INET6}:2:136"),
        format!("{AF_INET}:2:1"), // ICMP echo ("ping") datagrams
        format!("{AF_INET6}:2:58"),
    ];
    let args: Vec<&str> = judged.iter().chain(&unseen).map(String::as_str).collect();

    // Enforce: every socket the hooks can judge is created, the others are refused.
    let lines = run(&cg.path, SOCKETS, &args);
    let expected: Vec<String> = judged.iter().map(|_| "ok".to_owned()).chain(unseen.iter().map(|_| eperm())).collect();
    assert_eq!(lines, expected, "{args:?}");
    assert_eq!(counts(&dp, slot), (0, 0, 4), "each refused socket counts as rejected");

    // Audit: created, and each counted as a would-reject and reported with what it was.
    dp.maps.set_cgroup(cg.id(), state(1, MODE_AUDIT, slot)).unwrap();
    dp.maps.drain_events();
    let lines = run(&cg.path, SOCKETS, &args);
    assert!(lines.iter().all(|l| l == "ok"), "{lines:?}");
    assert_eq!(counts(&dp, slot), (0, 4, 4));
    let events = dp.maps.drain_events();
    let mut seen: Vec<String> = events.iter().map(|e| e.destination()).collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "socket:inet/dgram/icmp",
            "socket:inet/dgram/udplite",
            "socket:inet6/dgram/ipv6-icmp",
            "socket:inet6/dgram/udplite"
        ]
    );
    for e in &events {
        assert_eq!((e.kind, e.verdict), (EVENT_SOCKET, VERDICT_WOULD_REJECT), "{e:?}");
        assert_ne!(e.pid_tgid >> 32, 0, "the creating process is named");
    }

    // Mode off: nothing judged, nothing counted.
    dp.maps.set_cgroup(cg.id(), state(1, depfence_bpf_common::MODE_OFF, slot)).unwrap();
    assert!(run(&cg.path, SOCKETS, &args).iter().all(|l| l == "ok"));
    assert_eq!(counts(&dp, slot), (0, 4, 4));
}

#[test]
fn routing_headers_are_refused_in_enforce_and_reported_in_audit() {
    let test = "routing_headers_are_refused_in_enforce_and_reported_in_audit";
    if skip_without_tools(test) {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let (_rx, port) = udp_receiver(LO6);
    let slot = 6;
    let allow = [Allow::Host { addr: LO6, proto: IPPROTO_UDP, port, rule_id: 1 }];
    enforce(&mut dp, cg.id(), slot, &allow);
    let port_arg = port.to_string();

    // Enforce: the socket options are refused; the send without them goes out (allowed).
    assert_eq!(run(&cg.path, ROUTING_HEADER, &["once", &port_arg]), [eperm(), "ok".to_owned()]);
    assert_eq!(run(&cg.path, ROUTING_HEADER, &["pktoptions", &port_arg]), [eperm(), "ok".to_owned()]);
    assert_eq!(counts(&dp, slot), (2, 0, 2));

    // Audit: the option is set and its packet sent; both are would-rejects, the packet's
    // reported with its first hop.
    dp.maps.set_cgroup(cg.id(), state(1, MODE_AUDIT, slot)).unwrap();
    dp.maps.drain_events();
    assert_eq!(run(&cg.path, ROUTING_HEADER, &["once", &port_arg]), ["ok", "ok"]);
    assert_eq!(counts(&dp, slot), (3, 2, 2));
    let events = dp.maps.drain_events();
    let described: Vec<(u32, u8, IpAddr)> = events.iter().map(|e| (e.kind, e.proto, words_addr(e.addr))).collect();
    assert_eq!(
        described,
        [
            (EVENT_ROUTING_HEADER, IPPROTO_ROUTING, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            (EVENT_ROUTING_HEADER, IPPROTO_ROUTING, LO6),
        ]
    );
    assert_eq!(events[1].destination(), "routing-header:::1");

    // A socket that got its routing header while the service was in audit keeps it; once the
    // service is enforced, its packets are refused where they leave.
    let mut cmd = unprivileged_python(ROUTING_HEADER, &["hold", &port_arg]);
    let mut child = spawn_in(&cg.path, &mut cmd).unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ok", "the option is set in audit");
    dp.maps.set_cgroup(cg.id(), state(1, MODE_ENFORCE, slot)).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), eperm(), "its packet is refused in enforce");
    assert!(child.wait().unwrap().success());
    // The sendmsg hook allowed the destination; the packet's routing header was refused.
    assert_eq!(counts(&dp, slot), (4, 3, 3));
}

/// `port…`: connects a TCP socket to each `tcp:port` and a UDP socket to each `udp:port` on
/// 127.0.0.1, listens on a TCP port of its own (printed: `listening <port>`) and accepts one
/// connection into it, then prints `ready`; after a line on stdin, prints each socket's pending
/// error (`SO_ERROR`, 0 when the connection is alive), the accepted one last.
const HOLDER: &str = r#"
import socket, sys
conns = []
for spec in sys.argv[1:]:
    proto, port = spec.split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", int(port)))
    conns.append(s)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print("listening", listener.getsockname()[1], flush=True)
accepted, _ = listener.accept()
conns.append(accepted)
print("ready", flush=True)
sys.stdin.readline()
print(" ".join(str(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)) for s in conns), flush=True)
"#;

#[test]
fn connections_the_policy_no_longer_allows_are_closed() {
    let test = "connections_the_policy_no_longer_allows_are_closed";
    if skip_without_tools(test) {
        return;
    }
    use depfence_bpf_common::IPPROTO_TCP;
    use depfence_integration::fixture::{LO4, tcp_listener};
    use std::collections::BTreeMap;

    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let kept = tcp_listener(LO4);
    let dropped = tcp_listener(LO4);
    let (_rx, dropped_udp) = udp_receiver(LO4);
    let slot = 7;
    let host = |proto, port, rule_id| Allow::Host { addr: LO4, proto, port, rule_id };
    // Generation 1 (audit) allows all three; generation 2 (enforce) only `kept`.
    let everything = [host(IPPROTO_TCP, kept, 1), host(IPPROTO_TCP, dropped, 2), host(IPPROTO_UDP, dropped_udp, 3)];
    enforce(&mut dp, cg.id(), slot, &everything);
    dp.maps.set_cgroup(cg.id(), state(1, MODE_AUDIT, slot)).unwrap();

    let specs = [format!("tcp:{kept}"), format!("tcp:{dropped}"), format!("udp:{dropped_udp}")];
    let args: Vec<&str> = specs.iter().map(String::as_str).collect();
    let mut cmd = unprivileged_python(HOLDER, &args);
    let mut child = spawn_in(&cg.path, &mut cmd).unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let listening: u16 = line.trim().strip_prefix("listening ").unwrap().parse().unwrap();
    // An inbound connection into the service: its peer is no destination the policy allows.
    let inbound = std::net::TcpStream::connect((LO4, listening)).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    // Nothing to close while the policy allows everything.
    let policy_of = BTreeMap::from([(cg.id(), cg.id())]);
    assert!(dp.close_disallowed(&policy_of).unwrap().is_empty());

    // The swap to generation 2, still in audit: the connections it refuses are found, and left
    // open (evidence: enforce would close them).
    let next = depfence::lower::compile(2, &everything[..1]).unwrap();
    dp.maps.hot_swap(&next, &[(cg.id(), state(2, MODE_AUDIT, slot))], None).unwrap();
    let found = dp.close_disallowed(&policy_of).unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().all(|c| !c.closed));

    // Enforced: only the connections it refuses are closed.
    dp.maps.set_cgroup(cg.id(), state(2, MODE_ENFORCE, slot)).unwrap();
    let closed = dp.close_disallowed(&policy_of).unwrap();
    assert!(closed.iter().all(|c| c.closed));
    let cookies = |list: &[depfence::datapath::sweep::ClosedSocket]| {
        let mut c: Vec<u64> = list.iter().map(|c| c.cookie).collect();
        c.sort_unstable();
        c
    };
    assert_eq!(cookies(&found), cookies(&closed), "the same two connections");
    let mut peers: Vec<(u8, u16)> = closed.iter().map(|c| (c.protocol, c.remote.port())).collect();
    peers.sort_unstable();
    let mut expected = vec![(IPPROTO_TCP, dropped), (IPPROTO_UDP, dropped_udp)];
    expected.sort_unstable();
    assert_eq!(peers, expected, "{closed:?}");
    assert!(closed.iter().all(|c| (c.cgroup_id, c.policy_cgroup_id, c.generation) == (cg.id(), cg.id(), 2)));

    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let aborted = libc::ECONNABORTED.to_string();
    assert_eq!(line.split_whitespace().collect::<Vec<_>>(), ["0", aborted.as_str(), aborted.as_str(), "0"]);
    assert!(child.wait().unwrap().success());
    // A second sweep finds nothing left to close: the service's end of the inbound connection
    // outlives the process (orphaned, waiting for this end's FIN) and its listener, but no
    // process holds it any more.
    let left = dp.close_disallowed(&policy_of).unwrap();
    assert!(left.is_empty(), "{left:?}");
    drop(inbound);
}
