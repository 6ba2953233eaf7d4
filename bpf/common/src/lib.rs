//! Types and constants shared by the depfence eBPF programs (`bpf/programs`) and the loader.
//!
//! Every key/value/event is `#[repr(C)]`, padding-free (explicit `_pad` fields that writers
//! must zero), and size-asserted at compile time. Addresses are always 16 bytes: IPv4 is
//! stored IPv4-mapped (`::ffff:a.b.c.d`), so an IPv4 destination and an IPv4-mapped IPv6
//! destination hit the same key. Address words are `[u32; 4]` holding the bytes in network
//! order *in memory* (exactly what the kernel context gives in `user_ip6[i]` / `user_ip4`).
#![no_std]

pub mod lookup;
#[cfg(feature = "aya")]
mod pod;
#[cfg(feature = "std")]
pub mod user;

/// Version of the map layout below. A loader refuses pinned maps whose `DF_META` differs.
pub const ABI_VERSION: u32 = 5;

/// Map names (ELF symbol names, also the kernel object names: at most 15 bytes).
pub mod map_names {
    /// Per-cgroup state (`CgroupState`), keyed by cgroup id.
    pub const CGROUPS: &str = "DF_CGROUPS";
    /// Exact-destination rules (`RuleKey` → `RuleValue`).
    pub const RULES: &str = "DF_RULES";
    /// Address-block rules (LPM trie of `CidrKeyData` → `CidrValue`).
    pub const CIDRS: &str = "DF_CIDRS";
    /// Per-CPU counters, cgroup slot × verdict.
    pub const COUNTERS: &str = "DF_COUNTERS";
    /// Per-CPU global counters (`GLOBAL_*`).
    pub const GLOBALS: &str = "DF_GLOBALS";
    /// Ring buffer of `Event`s.
    pub const EVENTS: &str = "DF_EVENTS";
    /// Layout metadata (`Meta`: the ABI version).
    pub const META: &str = "DF_META";
    /// Runtime settings (`Config`).
    pub const CONFIG: &str = "DF_CONFIG";
    /// Event de-duplication window (LRU of `DedupKey` → last emit time).
    pub const DEDUP: &str = "DF_DEDUP";
    /// Addresses a service may reach because the DNS proxy resolved an allowed name for it
    /// (`NameKey` → `CidrValue`).
    pub const NAMES: &str = "DF_NAMES";
    /// DNS redirect slots: who asked which server, per `127.53.x.y` address (`DnsSlot`).
    pub const DNS_SLOTS: &str = "DF_DNS_SLOTS";
    /// The next DNS slot to hand out (one `u64`, incremented atomically).
    pub const DNS_NEXT: &str = "DF_DNS_NEXT";
    /// DNS over IPv6 sockets: who asked which server, per asking socket (LRU of socket cookie →
    /// `DnsSlot`).
    pub const DNS_SOCKS: &str = "DF_DNS_SOCKS";
    /// Per-CPU hits of each allow rule (`RuleHitKey` → `u64`): which rules connections used.
    pub const RULE_HITS: &str = "DF_RULE_HITS";
    /// Every name above.
    pub const ALL: [&str; 14] = [
        CGROUPS, RULES, CIDRS, COUNTERS, GLOBALS, EVENTS, META, CONFIG, DEDUP, NAMES, DNS_SLOTS, DNS_NEXT, DNS_SOCKS,
        RULE_HITS,
    ];
}

/// Program names (ELF symbols) and their attach types.
pub mod prog_names {
    /// cgroup/connect4.
    pub const CONNECT4: &str = "df_connect4";
    /// cgroup/connect6.
    pub const CONNECT6: &str = "df_connect6";
    /// cgroup/sendmsg4 (unconnected UDP over IPv4).
    pub const SENDMSG4: &str = "df_sendmsg4";
    /// cgroup/sendmsg6 (unconnected UDP over IPv6).
    pub const SENDMSG6: &str = "df_sendmsg6";
    /// cgroup/recvmsg4: a redirected DNS answer's source becomes the server the client asked.
    pub const RECVMSG4: &str = "df_recvmsg4";
    /// cgroup/recvmsg6: the same for IPv6 sockets.
    pub const RECVMSG6: &str = "df_recvmsg6";
    /// cgroup/getpeername4: a redirected DNS socket's peer is the server the client asked.
    pub const GETPEERNAME4: &str = "df_getpeername4";
    /// cgroup/getpeername6: the same for IPv6 sockets.
    pub const GETPEERNAME6: &str = "df_getpeername6";
    /// cgroup/sock_create: admits only the sockets whose destinations the hooks above see
    /// ([`crate::socket_admitted`]).
    pub const SOCK_CREATE: &str = "df_sock_create";
    /// cgroup/setsockopt: judges IPv6 routing headers set as socket options
    /// ([`crate::sets_routing_header`]).
    pub const SETSOCKOPT: &str = "df_setsockopt";
    /// cgroup_skb/egress: judges IPv6 packets that carry a routing header (set per message).
    pub const EGRESS: &str = "df_egress";
    /// The `cgroup/sock_addr` programs (connect, sendmsg, recvmsg, getpeername).
    pub const SOCK_ADDR: [&str; 8] =
        [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, RECVMSG4, RECVMSG6, GETPEERNAME4, GETPEERNAME6];
    /// Every hook a service cgroup gets.
    pub const ALL: [&str; 11] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
        SOCK_CREATE,
        SETSOCKOPT,
        EGRESS,
    ];
    /// Benchmark baseline: one exact hash lookup + one per-CPU counter (the minimum hook).
    pub const BASELINE4: &str = "df_baseline4";
    /// Benchmark: cgroup hash lookup + rule lookup + counter.
    pub const BENCH_2LOOKUPS: &str = "df_bench_2lookups";
    /// Benchmark: legacy cgroup storage + array + rule lookup + counter.
    pub const BENCH_STORAGE: &str = "df_bench_storage";
    /// Benchmark: `bpf_get_current_cgroup_id` + counter.
    pub const BENCH_CGID: &str = "df_bench_cgid";
    /// Benchmark: cgroup id hash lookup + counter.
    pub const BENCH_CGHASH: &str = "df_bench_cghash";
    /// Benchmark: an empty program.
    pub const BENCH_EMPTY: &str = "df_bench_empty";
    /// Benchmark: cgroup state lookup + counter.
    pub const BENCH_CGSTATE: &str = "df_bench_cgstate";
    /// Every benchmark program.
    pub const BENCH: [&str; 7] =
        [BASELINE4, BENCH_2LOOKUPS, BENCH_STORAGE, BENCH_CGID, BENCH_CGHASH, BENCH_EMPTY, BENCH_CGSTATE];
}

/// Map sizes (max_entries; the loader may override them): registered cgroups.
pub const MAX_CGROUPS: u32 = 16_384;
/// Exact rules: room for two generations of a 1 Mi-entry ruleset, the old and the new side by
/// side during a hot swap. Allocated as used (`BPF_F_NO_PREALLOC`), so the capacity costs
/// nothing until it is filled.
pub const MAX_RULES: u32 = 1 << 21;
/// `BPF_F_NO_PREALLOC`: hash map elements are allocated on insert instead of at creation.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// Address-block prefixes.
pub const MAX_CIDRS: u32 = 65_536;
/// Counter slots; each cgroup entry names its slot (`CgroupState::counter_slot`).
pub const MAX_COUNTER_SLOTS: u32 = 4_096;
/// Ring buffer size in bytes.
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Event de-duplication LRU entries.
pub const MAX_DEDUP: u32 = 8_192;
/// Rules with hits counted (`DF_RULE_HITS`, preallocated: an update never allocates in a hook).
/// A hit on a rule beyond it is counted in `GLOBAL_RULE_HITS_DROPPED`, never lost silently.
pub const MAX_RULE_HITS: u32 = 65_536;
/// Addresses admitted by the DNS proxy (all services, per protocol).
pub const MAX_NAMES: u32 = 262_144;
/// DNS redirect slots: `127.53.0.1` … `127.53.255.254`. Slot `i` is address `127.53.0.0 + i`;
/// slots 0 and 65535 are never handed out.
pub const DNS_SLOTS: u32 = 65_536;
/// IPv6 sockets whose DNS is redirected at once (`DF_DNS_SOCKS`).
pub const MAX_DNS_SOCKS: u32 = 16_384;
/// The port DNS is redirected from.
pub const DNS_PORT: u16 = 53;
/// First two octets of the DNS slot addresses.
pub const DNS_SLOT_NET: [u8; 2] = [127, 53];

/// `::1` as address words.
pub const IP6_LOOPBACK: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Whether `d` is the DNS proxy on `proxy_port` (0: no proxy), where the connect hook sends a
/// policed process's DNS: `[::1]:port` for IPv6 sockets, a slot address `127.53.x.y:port` for
/// IPv4 ones. A socket connected there was judged when it connected.
#[inline(always)]
pub fn is_dns_proxy(d: &lookup::Destination, proxy_port: u32) -> bool {
    if proxy_port == 0 || u32::from(d.port) != proxy_port {
        return false;
    }
    if d.family == AF_INET6 {
        d.addr == IP6_LOOPBACK
    } else {
        let [a, b, _, _] = d.addr[3].to_ne_bytes();
        [a, b] == DNS_SLOT_NET
    }
}

/// Nearest-registered-ancestor walk bound: levels `MAX_CGROUP_DEPTH-1 ..= 1` are tried
/// (level 0, the root, is never registered).
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Port ranges stored inline in one CIDR value.
pub const MAX_CIDR_PORT_RANGES: usize = 8;

/// Program return values for cgroup/sock_addr hooks.
pub const ALLOW: i32 = 1;
/// The caller's connect()/sendmsg() fails with EPERM.
pub const DENY: i32 = 0;

/// Cgroup mode (`CgroupState::mode`): no evaluation.
pub const MODE_OFF: u32 = 0;
/// Soft-apply: allow, count and report misses.
pub const MODE_AUDIT: u32 = 1;
/// Deny misses (EPERM), count and report.
pub const MODE_ENFORCE: u32 = 2;

/// `CgroupState::flags`: the active ruleset has address-block rules.
pub const FLAG_ACTIVE_HAS_CIDR: u32 = 1 << 0;
/// The candidate ruleset has address-block rules.
pub const FLAG_CANDIDATE_HAS_CIDR: u32 = 1 << 1;
/// Emit a ring-buffer event for allowed destinations too (learning).
pub const FLAG_EVENT_ALLOWED: u32 = 1 << 2;
/// Emit every event (no de-duplication window) — for tests and debugging.
pub const FLAG_EVENT_NO_DEDUP: u32 = 1 << 3;
/// The service is under the DNS proxy: its port-53 traffic is redirected to the proxy, and the
/// addresses the proxy admitted for it (`DF_NAMES`, keyed by its counter slot) are allowed.
pub const FLAG_DNS: u32 = 1 << 4;

/// Verdict: a rule matched (or mode off). Counters are indexed
/// `counter_slot * VERDICT_COUNT + verdict`.
pub const VERDICT_ALLOWED: u32 = 0;
/// No rule matched; audit let it pass.
pub const VERDICT_WOULD_REJECT: u32 = 1;
/// No rule matched; enforce refused it.
pub const VERDICT_REJECTED: u32 = 2;
/// The candidate ruleset would have refused it.
pub const VERDICT_CANDIDATE_WOULD_REJECT: u32 = 3;
/// Number of verdicts (counters per slot).
pub const VERDICT_COUNT: u32 = 4;

/// The one rule every depfence decision follows (kernel connect and sendmsg, DNS proxy, RPC
/// guard, `explain`): the `VERDICT_*` for something that `matched` an allow rule, or did not,
/// under `mode` (`MODE_*`).
///
/// * `off`, or a match: allowed;
/// * no match in `enforce`: rejected;
/// * no match in `audit`: would-reject (allowed, counted and reported). A mode this build does
///   not know fails open the same way, so it shows up in the counters.
#[inline(always)]
pub const fn verdict_of(mode: u32, matched: bool) -> u32 {
    if matched || mode == MODE_OFF {
        VERDICT_ALLOWED
    } else if mode == MODE_ENFORCE {
        VERDICT_REJECTED
    } else {
        VERDICT_WOULD_REJECT
    }
}

/// What a connect or sendmsg hook returns for a verdict: only a rejection is refused.
#[inline(always)]
pub const fn action_of(verdict: u32) -> i32 {
    if verdict == VERDICT_REJECTED { DENY } else { ALLOW }
}

/// Whether a socket of `family`, `sock_type` and `protocol` may be created where the policy is
/// enforced: one the connect and sendmsg hooks see every destination of (TCP and MPTCP streams,
/// UDP datagrams over IPv4 or IPv6), or one that is not an internet socket at all (Unix,
/// netlink: no network destination). Everything else (UDP-Lite, ICMP "ping" datagrams, SCTP,
/// raw sockets) reaches addresses no hook judges, so it is refused in enforce and reported in
/// audit.
#[inline(always)]
pub const fn socket_admitted(family: u32, sock_type: u32, protocol: u32) -> bool {
    if family != AF_INET as u32 && family != AF_INET6 as u32 {
        return true;
    }
    (sock_type == SOCK_STREAM && (protocol == IPPROTO_TCP as u32 || protocol == IPPROTO_MPTCP))
        || (sock_type == SOCK_DGRAM && protocol == IPPROTO_UDP as u32)
}

/// Whether a `setsockopt(level, optname)` puts an IPv6 routing header on a socket's packets:
/// the packets then go first to an address of the caller's choosing, not to the destination
/// the hooks judge. Unprivileged on Linux, so judged like a destination no rule allows.
#[inline(always)]
pub const fn sets_routing_header(level: i32, optname: i32) -> bool {
    level == SOL_IPV6 && (optname == IPV6_RTHDR || optname == IPV6_2292RTHDR || optname == IPV6_2292PKTOPTIONS)
}

/// `Event::kind`: a connect or send, judged by its destination.
pub const EVENT_DESTINATION: u32 = 0;
/// A socket the policy cannot judge ([`socket_admitted`]): `proto` holds its protocol, `port` its
/// type, `family` its family, the address is zero.
pub const EVENT_SOCKET: u32 = 1;
/// An IPv6 routing header: set as a socket option (address zero), or on a packet (`addr` is the
/// packet's first hop).
pub const EVENT_ROUTING_HEADER: u32 = 2;

/// `DF_GLOBALS` slot (per-CPU u64): events suppressed by the de-duplication window (not lost: counted).
pub const GLOBAL_EVENTS_DEDUPED: u32 = 3;
/// Events lost because the ring buffer was full.
pub const GLOBAL_EVENTS_DROPPED: u32 = 0;
/// Hook ran for a process with no registered cgroup ancestor (allowed).
pub const GLOBAL_UNREGISTERED: u32 = 1;
/// `counter_slot` out of range (bug in the loader).
pub const GLOBAL_BAD_SLOT: u32 = 2;
/// Allowed connections whose rule could not be counted in `DF_RULE_HITS` (the map was full).
pub const GLOBAL_RULE_HITS_DROPPED: u32 = 4;
/// Number of global counters.
pub const GLOBAL_COUNT: u32 = 5;

/// TCP protocol number.
pub const IPPROTO_TCP: u8 = 6;
/// UDP protocol number.
pub const IPPROTO_UDP: u8 = 17;
/// The IPv6 routing header's protocol number (a next-header value).
pub const IPPROTO_ROUTING: u8 = 43;
/// Multipath TCP's protocol number (a socket's, never on the wire).
pub const IPPROTO_MPTCP: u32 = 262;
/// Stream socket type.
pub const SOCK_STREAM: u32 = 1;
/// Datagram socket type.
pub const SOCK_DGRAM: u32 = 2;
/// The IPv6 socket-option level.
pub const SOL_IPV6: i32 = 41;
/// IPv6 socket option: a routing header on every packet of the socket.
pub const IPV6_RTHDR: i32 = 57;
/// The RFC 2292 spelling of `IPV6_RTHDR`.
pub const IPV6_2292RTHDR: i32 = 5;
/// RFC 2292 socket option: sticky options given as control messages, a routing header among them.
pub const IPV6_2292PKTOPTIONS: i32 = 6;
/// IPv4 address family.
pub const AF_INET: u8 = 2;
/// IPv6 address family.
pub const AF_INET6: u8 = 10;

/// `DF_CGROUPS` value, keyed by cgroup id (u64 = inode of the cgroup2 directory).
/// One update of this value flips mode / ruleset / candidate atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CgroupState {
    /// Active ruleset; 0 = none (every destination is a miss).
    pub ruleset_id: u32,
    /// `MODE_*`.
    pub mode: u32,
    /// Shadow ruleset evaluated beside the active one; 0 = none.
    pub candidate_ruleset: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// Row in `DF_COUNTERS` (`< MAX_COUNTER_SLOTS`).
    pub counter_slot: u32,
    /// Policy generation, copied into events.
    pub generation: u32,
}

/// `DF_RULES` key: exact destination. `port == 0` in a rule means any port (the hook does a
/// second lookup with port 0). No wildcard protocol: the compiler writes one key per proto.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuleKey {
    /// Ruleset id.
    pub ruleset: u32,
    /// `IPPROTO_TCP` / `IPPROTO_UDP`.
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
    /// Host byte order.
    pub port: u16,
    /// IPv6 or IPv4-mapped address, network-order bytes in memory.
    pub addr: [u32; 4],
}

/// `DF_RULES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleValue {
    /// Rule id (for events and explain).
    pub rule_id: u32,
}

/// The rule id of an address the DNS proxy admitted (`DF_NAMES` ranges): a hit through a host
/// rule. Events and explain name the host rule by service and name, not by this id.
pub const NAME_RULE_ID: u32 = u32::MAX;

/// `DF_RULE_HITS` key: one rule of one ruleset. Keyed by the ruleset id (never reused) rather
/// than the service's counter slot, so a hit is always the hit of the rule that decided it,
/// across hot swaps that renumber a service's rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct RuleHitKey {
    /// Ruleset id.
    pub ruleset: u32,
    /// Rule id, as `RuleValue::rule_id` and `PortRange::rule_id` give it.
    pub rule_id: u32,
}

/// `DF_CIDRS` LPM key data (the `Key<CidrKeyData>` adds a leading `prefix_len: u32`).
/// The prefix is `32 + addr_prefix` for IPv6, `32 + 96 + v4_prefix` for IPv4: the ruleset
/// id is always matched fully, so rulesets never see each other's prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CidrKeyData {
    /// Ruleset id, **big-endian** (LPM matches bytes most-significant first).
    pub ruleset_be: u32,
    /// IPv6 or IPv4-mapped address, network-order bytes in memory.
    pub addr: [u32; 4],
}

/// One allowed (proto, port range) of a CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRange {
    /// 0 = any protocol.
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
    /// First port, host order; `0..=65535` = any port.
    pub port_lo: u16,
    /// Last port, inclusive, host order.
    pub port_hi: u16,
    /// Zero.
    pub _pad2: u16,
    /// Rule id.
    pub rule_id: u32,
}

/// `DF_CIDRS` value. LPM returns only the longest matching prefix, so the compiler must copy
/// the ranges of every covering (shorter) prefix of the same ruleset into each longer prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CidrValue {
    /// Ranges in use.
    pub count: u32,
    /// The ranges; only the first `count` are valid.
    pub ranges: [PortRange; MAX_CIDR_PORT_RANGES],
}

/// `DF_CONFIG` slot 0: runtime settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Deepest cgroup level (root = 0) of any registered cgroup; the ancestor walk starts
    /// there. 0 = unknown: walk from `MAX_CGROUP_DEPTH - 1`.
    pub max_level: u32,
    /// The DNS proxy's port on loopback (host order); 0 = no DNS redirect.
    pub dns_proxy_port: u32,
    /// At most one event per (cgroup, destination, verdict) per window; 0 = no de-dup.
    pub dedup_window_ns: u64,
    /// The DNS proxy's own cgroup: never redirected, so its upstream queries leave.
    pub dns_exempt_cgroup: u64,
}

/// `DF_NAMES` key: an address the DNS proxy admitted for a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct NameKey {
    /// The service's counter slot (stable across policy reloads, unlike ruleset ids).
    pub counter_slot: u32,
    /// `IPPROTO_TCP` / `IPPROTO_UDP`.
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
    /// IPv6 or IPv4-mapped address, network-order bytes in memory.
    pub addr: [u32; 4],
}

/// `DF_DNS_SLOTS` and `DF_DNS_SOCKS` value: one redirected DNS exchange (a UDP datagram or
/// socket, or a TCP connection), written by the connect/sendmsg hook before the query leaves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsSlot {
    /// Cookie of the asking socket: the reply-source rewrite only touches this socket.
    pub socket_cookie: u64,
    /// The asker's own cgroup.
    pub cgroup_id: u64,
    /// Thread group id (high 32 bits) and thread id (low 32 bits).
    pub pid_tgid: u64,
    /// Command name, NUL-padded.
    pub comm: [u8; 16],
    /// The server the client addressed (IPv4-mapped for IPv4).
    pub server_addr: [u32; 4],
    /// Its port, host order.
    pub server_port: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `AF_INET` / `AF_INET6` (as the caller used it).
    pub family: u8,
    /// Counter slot of the service whose policy applied.
    pub counter_slot: u32,
}
/// `DF_DEDUP` key (LRU hash, value = last emit time in ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DedupKey {
    /// The process cgroup.
    pub cgroup_id: u64,
    /// Destination address.
    pub addr: [u32; 4],
    /// Destination port, host order.
    pub port: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// Zero.
    pub _pad: u32,
}

/// `DF_META` slot 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// `ABI_VERSION` of the loader that created the maps.
    pub abi_version: u32,
    /// Zero.
    pub _reserved: u32,
}

/// Ring-buffer event (best effort; counters are the exact record).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// `bpf_ktime_get_ns` at the hook.
    pub ts_ns: u64,
    /// The process's own cgroup.
    pub cgroup_id: u64,
    /// The registered cgroup whose state applied (== cgroup_id or an ancestor).
    pub policy_cgroup_id: u64,
    /// Thread group id (high 32 bits) and thread id (low 32 bits).
    pub pid_tgid: u64,
    /// Command name, NUL-padded.
    pub comm: [u8; 16],
    /// Destination address (IPv4-mapped for IPv4).
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `AF_INET` / `AF_INET6` (as the caller used it).
    pub family: u8,
    /// `VERDICT_*`.
    pub verdict: u32,
    /// Active ruleset id.
    pub ruleset_id: u32,
    /// Policy generation.
    pub generation: u32,
    /// `EVENT_*`: what was judged.
    pub kind: u32,
    /// Zero.
    pub _reserved: u32,
}

const _: () = assert!(size_of::<CgroupState>() == 24);
const _: () = assert!(align_of::<CgroupState>() == 4);
const _: () = assert!(size_of::<RuleKey>() == 24);
const _: () = assert!(align_of::<RuleKey>() == 4);
const _: () = assert!(size_of::<RuleValue>() == 4);
const _: () = assert!(size_of::<RuleHitKey>() == 8);
const _: () = assert!(size_of::<CidrKeyData>() == 20);
const _: () = assert!(size_of::<PortRange>() == 12);
const _: () = assert!(size_of::<CidrValue>() == 4 + 12 * MAX_CIDR_PORT_RANGES);
const _: () = assert!(size_of::<Meta>() == 8);
const _: () = assert!(size_of::<Config>() == 24);
const _: () = assert!(size_of::<NameKey>() == 24);
const _: () = assert!(size_of::<DnsSlot>() == 64);
const _: () = assert!(align_of::<DnsSlot>() == 8);
const _: () = assert!(size_of::<DedupKey>() == 32);
const _: () = assert!(size_of::<Event>() == 88);
const _: () = assert!(align_of::<Event>() == 8);
