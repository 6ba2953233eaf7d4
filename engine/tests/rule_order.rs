//! The kernel and `explain` name the same rule: for random policies and connections, the rule
//! `explain` gives ([`ServiceRuleset::matching_rule`], the documented order) equals the rule the
//! kernel's own lookup (`depfence_bpf_common::lookup`, the code the eBPF program runs) finds in
//! the map entries the loader writes ([`lower`]), and so do the verdicts. Runs without
//! privileges: the lookup runs in user space over the same entries.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail by panicking, with the case that failed"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use depfence::compile::compile_str;
use depfence::lower::{LoweredRules, allows_from_snapshot, compile, rule_of};
use depfence::policy::Proto;
use depfence::snapshot::{Connection, ServiceRuleset, Snapshot};
use depfence::verdict::decide;
use proptest::prelude::*;

const RULESET: u32 = 7;

fn snapshot(text: &str) -> Snapshot {
    compile_str("p.toml", text).unwrap_or_else(|(_, d)| panic!("{d:?}\n{text}")).snapshot
}

/// The kernel's entries for a service, run through the kernel's lookup. None when the service
/// does not fit the kernel layout (too many port ranges on one prefix).
fn lowered(service: &ServiceRuleset) -> Option<LoweredRules> {
    let compiled = compile(RULESET, &allows_from_snapshot(&service.rules(0).net_rules)).ok()?;
    let mut maps = LoweredRules::new();
    maps.install(&compiled);
    Some(maps)
}

fn conn(text: &str) -> Connection {
    text.parse().unwrap()
}

/// Asserts that explain and the kernel agree on `conn`, and returns the deciding rule in words.
fn agree(snapshot: &Snapshot, service: &str, conn: &Connection) -> Option<String> {
    let (_, s) = snapshot.service(service).unwrap();
    let maps = lowered(s).expect("fits the kernel layout");
    let kernel = rule_of(&s.rules(0).net_rules, maps.first_match(RULESET, conn));
    let explained = s.matching_rule(0, conn);
    assert_eq!(kernel, explained, "{conn}: the kernel and explain name different rules");
    explained.map(|r| snapshot.describe_rule(r))
}

/// The documented order, case by case: the most specific rule decides. Each pair of rules
/// differs in one criterion, or pits two against each other.
#[test]
fn the_most_specific_rule_decides_in_the_kernel_and_in_explain() {
    let s = snapshot(
        r#"version = 1
[services.app]
allow = [
  { ip = "10.0.0.5" },
  { ip = "10.0.0.5", ports = ["8000-8100"] },
  { ip = "10.0.0.5", ports = ["9000-9100"], proto = "tcp" },
  { ip = "10.0.0.5", ports = [9050] },
  { cidr = "10.0.0.0/24", ports = [7000] },
  { cidr = "10.0.0.0/8", ports = [7000] },
  { cidr = "10.0.0.0/24", ports = [8050] },
  { cidr = "10.0.0.0/8", ports = [443], proto = "tcp" },
  { cidr = "10.0.0.0/8", ports = [443] },
  { cidr = "::/0", ports = [22] },
]
"#,
    );
    let rule = |c: &str| agree(&s, "app", &conn(c));
    // Fewer ports: an any-port rule and a port range on one address, for a port in the range
    // (the issue's case; the kernel used to find the any-port key first).
    assert_eq!(rule("10.0.0.5:8050").as_deref(), Some("10.0.0.5/32 port 8000-8100, any protocol"));
    assert_eq!(rule("10.0.0.5:8200").as_deref(), Some("10.0.0.5/32 any port, any protocol"));
    // The longest prefix: two blocks with the same port.
    assert_eq!(rule("10.0.0.6:7000").as_deref(), Some("10.0.0.0/24 port 7000, any protocol"));
    assert_eq!(rule("10.1.0.6:7000").as_deref(), Some("10.0.0.0/8 port 7000, any protocol"));
    // The longest prefix before fewer ports: a host on any port over a block on one port.
    assert_eq!(rule("10.0.0.5:7000").as_deref(), Some("10.0.0.5/32 any port, any protocol"));
    // One protocol before any: the same block and port.
    assert_eq!(rule("10.1.2.3:443").as_deref(), Some("10.0.0.0/8 port 443, tcp"));
    assert_eq!(rule("10.1.2.3:443/udp").as_deref(), Some("10.0.0.0/8 port 443, any protocol"));
    // Fewer ports before one protocol.
    assert_eq!(rule("10.0.0.5:9050").as_deref(), Some("10.0.0.5/32 port 9050, any protocol"));
    assert_eq!(rule("10.0.0.5:9051").as_deref(), Some("10.0.0.5/32 port 9000-9100, tcp"));
    // An IPv6 block never holds an IPv4 address, in the kernel either (IPv4 is IPv4-mapped
    // there); an IPv4-mapped IPv6 address is the IPv4 address.
    assert_eq!(rule("[2001:db8::1]:22").as_deref(), Some("::/0 port 22, any protocol"));
    assert_eq!(rule("192.0.2.1:22"), None);
    assert_eq!(rule("[::ffff:192.0.2.1]:22"), None);
    assert_eq!(rule("[::ffff:10.0.0.5]:8050").as_deref(), Some("10.0.0.5/32 port 8000-8100, any protocol"));
}

/// Random allow lists over a small address space, so rules overlap: blocks of every size
/// around a few hosts, IPv4 and IPv6 (with blocks that cover the IPv4-mapped space), ports and
/// port ranges that nest and cross, both protocols and any.
fn allow_entry() -> impl Strategy<Value = String> {
    let v4 = prop_oneof![
        (0u8..4, 0u8..4).prop_map(|(c, d)| format!("ip = \"10.0.{c}.{d}\"")),
        prop_oneof![Just(8u8), Just(16), Just(24), Just(30), Just(31)].prop_map(|p| format!("cidr = \"10.0.0.0/{p}\"")),
        Just("cidr = \"0.0.0.0/0\"".to_owned()),
        (0u8..4).prop_map(|c| format!("cidr = \"10.0.{c}.0/24\"")),
    ];
    let v6 = prop_oneof![
        (0u8..3).prop_map(|d| format!("ip = \"2001:db8::{d}\"")),
        prop_oneof![Just("::/0"), Just("::/64"), Just("2001:db8::/32"), Just("2001:db8::/126")]
            .prop_map(|c| format!("cidr = \"{c}\"")),
    ];
    let target = prop_oneof![4 => v4, 1 => v6];
    let ports = prop_oneof![
        Just(String::new()),
        prop_oneof![Just(22u16), Just(53), Just(443), Just(8050)].prop_map(|p| format!(", ports = [{p}]")),
        prop_oneof![Just("8000-8100"), Just("8050-8200"), Just("1-1024"), Just("443-443")]
            .prop_map(|r| format!(", ports = [\"{r}\"]")),
        Just(", ports = [53, 443]".to_owned()),
    ];
    let proto =
        prop_oneof![Just(String::new()), Just(", proto = \"tcp\"".to_owned()), Just(", proto = \"udp\"".to_owned())];
    (target, ports, proto).prop_map(|(t, p, r)| format!("{{ {t}{p}{r} }}"))
}

fn destination() -> impl Strategy<Value = Connection> {
    let addr = prop_oneof![
        4 => (0u8..5, 0u8..5).prop_map(|(c, d)| IpAddr::V4(Ipv4Addr::new(10, 0, c, d))),
        1 => (0u8..2, 0u8..255).prop_map(|(b, d)| IpAddr::V4(Ipv4Addr::new(10, b, 7, d))),
        1 => Just(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
        1 => (0u8..5, 0u8..5).prop_map(|(c, d)| IpAddr::V6(Ipv4Addr::new(10, 0, c, d).to_ipv6_mapped())),
        2 => (0u16..4).prop_map(|d| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, d))),
        1 => Just(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1))),
    ];
    let port = prop_oneof![
        Just(0u16),
        Just(22),
        Just(53),
        Just(443),
        Just(1024),
        Just(8000),
        Just(8050),
        Just(8100),
        Just(8101),
        Just(8200),
        Just(65535),
        any::<u16>()
    ];
    let proto = prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)];
    (addr, port, proto).prop_map(|(addr, port, proto)| Connection { addr, port, proto })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn explain_agrees_with_the_lowered_kernel_lookup(
        entries in proptest::collection::vec(allow_entry(), 1..12),
        conns in proptest::collection::vec(destination(), 32),
        modes in (0usize..3, 0usize..3),
    ) {
        let mode = |i: usize| ["off", "audit", "enforce"][i];
        let text = format!(
            "version = 1\n[environments]\na = \"{}\"\nb = \"{}\"\n[services.app]\nallow = [\n  {}\n]\n",
            mode(modes.0),
            mode(modes.1),
            entries.join(",\n  ")
        );
        let s = snapshot(&text);
        let (_, app) = s.service("app").unwrap();
        // A ruleset with more ranges on one prefix than a kernel value holds is refused whole
        // (the agent keeps the last good policy); nothing to compare.
        let Some(maps) = lowered(app) else { return Ok(()) };
        for conn in &conns {
            let hit = maps.first_match(RULESET, conn);
            let kernel = rule_of(&app.rules(0).net_rules, hit);
            prop_assert!(hit == 0 || kernel.is_some(), "rule id {hit} names no rule");
            let explained = app.matching_rule(0, conn);
            prop_assert_eq!(kernel, explained, "{}\n{}", conn, text);
            for env in 0..s.environments().len() {
                let decision = app.decide(env, conn);
                prop_assert_eq!(decision.verdict, decide(app.mode(env), hit != 0), "{} in {}", conn, env);
            }
        }
    }
}
