//! The compiled snapshot: deterministic, content-hashed (formatting is not content, meaning
//! is), round-trips through its encoding with damage detected, and decides connections per
//! environment mode with the most specific rule.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers outside #[test] functions: a failing test should say where"
)]

use std::path::Path;

use depfence::compile::{Compiled, compile, compile_str};
use depfence::policy::{Mode, PortRange, Proto, load, parse_sources};
use depfence::snapshot::{Connection, SNAPSHOT_MAGIC, Snapshot, SnapshotError};
use depfence::verdict::Verdict;

fn compiled(text: &str) -> Compiled {
    match compile_str("policy.toml", text) {
        Ok(compiled) => compiled,
        Err((sources, diags)) => {
            panic!("{}", diags.iter().map(|d| d.to_plain(&sources)).collect::<Vec<_>>().join("\n"))
        }
    }
}

fn snapshot(text: &str) -> Snapshot {
    compiled(text).snapshot
}

const POLICY: &str = r#"version = 1

[environments]
qa = { mode = "enforce" }
prod = { mode = "audit" }

[model]
layers = ["data", "apps"]

[services.web]
layer = "apps"
cgroup = "system.slice/web.service"
tier = 2
endpoints = [{ ip = "10.0.1.10", ports = [443], proto = "tcp" }]
allow = [
  { service = "db" },
  { cidr = "198.51.100.0/24", ports = ["8000-8100"], proto = "tcp" },
  { host = "*.example.com", ports = [443] },
]

[services.db]
layer = "data"
cgroup = { regex = '^system\.slice/postgresql.*\.service$' }
tier = 1
mode = { prod = "enforce" }
endpoints = [{ ip = "10.0.2.20", ports = [5432], proto = "tcp" }]
allow = [{ service = "db", reason = "replication" }]
"#;

/// The same policy: different whitespace, comments, key order within tables, table order,
/// and order of keys inside inline tables.
const REFORMATTED: &str = r#"# Reformatted: nothing here changes what the policy means.
version = 1

[model]
layers = [ "data",   "apps" ]   # bottom to top

[services.db]
allow = [ { reason = "replication", service = "db" } ]
endpoints = [
    { proto = "tcp", ports = [5432], ip = "10.0.2.20" },
]
mode = { prod = "enforce" }
tier = 1
cgroup = { regex = '^system\.slice/postgresql.*\.service$' }
layer = "data"

[environments]
prod = { mode = "audit" }
qa   = "enforce"


[services.web]
allow = [
    # the database
    { service = "db" },
    { proto = "tcp", ports = ["8000-8100"], cidr = "198.51.100.0/24" },
    { ports = [443], host = "*.example.com" },
]
endpoints = [{ proto = "tcp", ip = "10.0.1.10", ports = [443] }]
tier = 2
cgroup = "system.slice/web.service"
layer = "apps"
"#;

#[test]
fn compile_is_deterministic() {
    let first = snapshot(POLICY);
    for _ in 0..5 {
        let again = snapshot(POLICY);
        assert_eq!(again.to_bytes().unwrap(), first.to_bytes().unwrap());
        assert_eq!(again.hash(), first.hash());
    }
    // Also for a directory policy read from disk.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples/layered-bootstrap");
    let read = || compile(&load(&dir).unwrap().policy).unwrap().snapshot;
    assert_eq!(read().to_bytes().unwrap(), read().to_bytes().unwrap());
}

#[test]
fn reformatting_keeps_the_hash_but_moves_debug_positions() {
    let original = snapshot(POLICY);
    let reformatted = snapshot(REFORMATTED);
    assert_eq!(reformatted.content(), original.content());
    assert_eq!(reformatted.hash(), original.hash());
    assert_eq!(reformatted.hash().to_string(), original.hash().to_string());
    // Debug positions follow the text: `explain` points at the right line in either file.
    assert_ne!(reformatted.debug_info(), original.debug_info());
    let positions = |s: &Snapshot| {
        s.debug_info().origins.iter().flat_map(|o| o.iter().map(|o| (o.line, o.column))).collect::<Vec<_>>()
    };
    // Origins are listed service by service (sorted by name): db's entry, then web's three.
    assert_eq!(positions(&original), [(27, 10), (16, 3), (17, 3), (18, 3)]);
    assert_eq!(positions(&reformatted), [(8, 11), (25, 5), (26, 5), (27, 5)]);
    assert_ne!(reformatted.to_bytes().unwrap(), original.to_bytes().unwrap());
}

#[test]
fn splitting_into_files_keeps_the_hash() {
    let (head, services) = POLICY.split_at(POLICY.find("[services.web]").unwrap());
    let (web, db) = services.split_at(services.find("[services.db]").unwrap());
    let parsed = parse_sources([
        ("00-base.toml".to_owned(), head.to_owned()),
        ("10-web.toml".to_owned(), format!("version = 1\n{web}")),
        ("20-db.toml".to_owned(), format!("version = 1\n{db}")),
    ]);
    assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
    let split = compile(&parsed.policy).unwrap().snapshot;
    let single = snapshot(POLICY);
    assert_eq!(split.hash(), single.hash());
    assert_eq!(split.debug_info().files, ["00-base.toml", "10-web.toml", "20-db.toml"]);
    assert_eq!(split.debug_info().origins[0][0].file, 2, "db's entry is in 20-db.toml");
}

#[test]
fn reordering_an_allow_list_keeps_the_hash() {
    // The order of allow entries does not change what is allowed.
    let reordered = POLICY.replace(
        r#"  { service = "db" },
  { cidr = "198.51.100.0/24", ports = ["8000-8100"], proto = "tcp" },
  { host = "*.example.com", ports = [443] },"#,
        r#"  { host = "*.example.com", ports = [443] },
  { service = "db" },
  { cidr = "198.51.100.0/24", ports = ["8000-8100"], proto = "tcp" },"#,
    );
    assert_ne!(reordered, POLICY);
    let (a, b) = (snapshot(POLICY), snapshot(&reordered));
    assert_eq!(b.hash(), a.hash());
    // Each rule still points at the entry it came from.
    for s in [&a, &b] {
        let (web_id, web) = s.service("web").unwrap();
        for rule in &web.rules(0).net_rules {
            let origin = s.origin(web_id, rule.origin).unwrap();
            let line = match rule.net.to_string().as_str() {
                "10.0.2.20/32" => "{ service = \"db\" }",
                "198.51.100.0/24" => "{ cidr = \"198.51.100.0/24\"",
                other => panic!("unexpected rule {other}"),
            };
            let text = if std::ptr::eq(s, &a) { POLICY } else { reordered.as_str() };
            let source_line = text.lines().nth(origin.line as usize - 1).unwrap();
            assert!(source_line.contains(line), "{source_line} vs {line}");
        }
    }
}

#[test]
fn semantic_changes_change_the_hash() {
    let base = snapshot(POLICY).hash();
    let changes = [
        ("\"*.example.com\", ports = [443]", "\"*.example.com\", ports = [444]"),
        ("ports = [5432]", "ports = [5433]"),
        ("\"8000-8100\"", "\"8000-8101\""),
        ("prod = { mode = \"audit\" }", "prod = { mode = \"enforce\" }"),
        ("mode = { prod = \"enforce\" }", "mode = { prod = \"off\" }"),
        ("tier = 2", "tier = 3"),
        ("\"system.slice/web.service\"", "\"system.slice/web2.service\""),
        ("{ host = \"*.example.com\", ports = [443] }", "{ host = \"*.example.org\", ports = [443] }"),
        ("proto = \"tcp\" },\n  { host", "proto = \"udp\" },\n  { host"),
    ];
    for (from, to) in changes {
        assert_eq!(POLICY.matches(from).count(), 1, "`{from}` must occur once");
        let changed = snapshot(&POLICY.replace(from, to));
        assert_ne!(changed.hash(), base, "{from} -> {to} must change the hash");
    }
}

#[test]
fn bytes_round_trip() {
    for text in [POLICY, REFORMATTED] {
        let s = snapshot(text);
        let bytes = s.to_bytes().unwrap();
        assert!(bytes.starts_with(SNAPSHOT_MAGIC));
        let back = Snapshot::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.hash(), s.hash());
        assert_eq!(back.debug_info(), s.debug_info());
        assert_eq!(back.to_bytes().unwrap(), bytes);
    }
}

#[test]
fn damaged_bytes_are_refused() {
    let s = snapshot(POLICY);
    let bytes = s.to_bytes().unwrap();
    // The hashed part: the content, then the 32-byte hash (debug info follows, unhashed).
    let content_len = postcard::to_stdvec(s.content()).unwrap().len();
    let hashed = SNAPSHOT_MAGIC.len()..SNAPSHOT_MAGIC.len() + content_len + 32;
    assert!(hashed.end < bytes.len());
    for i in hashed {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut damaged = bytes.clone();
            damaged[i] ^= mask;
            match Snapshot::from_bytes(&damaged) {
                Err(SnapshotError::HashMismatch | SnapshotError::Encoding(_) | SnapshotError::Format { .. }) => {}
                Err(other) => panic!("byte {i} ^ {mask:#x}: unexpected {other}"),
                Ok(_) => panic!("byte {i} ^ {mask:#x}: damage not detected"),
            }
        }
    }
    // Specifically: a changed rule port is a hash mismatch, not a silently different policy.
    let tampered = s.clone_content_with_port(444);
    assert!(matches!(Snapshot::from_bytes(&tampered), Err(SnapshotError::HashMismatch)));

    // Truncated files and trailing garbage.
    assert!(Snapshot::from_bytes(&bytes[..bytes.len() / 2]).is_err());
    assert!(matches!(Snapshot::from_bytes(&bytes[..SNAPSHOT_MAGIC.len()]), Err(SnapshotError::Encoding(_))));
}

/// Re-encodes a snapshot with the hash of the original but one rule's port changed, as an
/// attacker or a bad disk would.
trait Tamper {
    fn clone_content_with_port(&self, port: u16) -> Vec<u8>;
}

impl Tamper for Snapshot {
    fn clone_content_with_port(&self, port: u16) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Raw<'a> {
            content: &'a depfence::snapshot::SnapshotContent,
            hash: &'a depfence::snapshot::ContentHash,
            debug: &'a depfence::snapshot::DebugInfo,
        }
        let mut content = self.content().clone();
        content.services[0].rules[0].net_rules[0].ports = PortRange::single(port);
        let hash = self.hash();
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bytes.extend(postcard::to_stdvec(&Raw { content: &content, hash: &hash, debug: self.debug_info() }).unwrap());
        bytes
    }
}

#[test]
fn bad_magic_is_refused() {
    let bytes = snapshot(POLICY).to_bytes().unwrap();
    let mut wrong = bytes.clone();
    wrong[0] = b'X';
    assert!(matches!(Snapshot::from_bytes(&wrong), Err(SnapshotError::BadMagic)));
    assert!(matches!(Snapshot::from_bytes(&[]), Err(SnapshotError::BadMagic)));
    assert!(matches!(Snapshot::from_bytes(b"DEPFNCE"), Err(SnapshotError::BadMagic)));
    assert!(matches!(Snapshot::from_bytes(&bytes[1..]), Err(SnapshotError::BadMagic)));
    let message = Snapshot::from_bytes(&wrong).unwrap_err().to_string();
    assert_eq!(message, "not a depfence snapshot (bad magic bytes)");
}

// ---------------------------------------------------------------------------------------------
// Decisions

fn conn(addr: &str, port: u16, proto: Proto) -> Connection {
    Connection { addr: addr.parse().unwrap(), port, proto }
}

const MODES: &str = r#"version = 1
[environments]
lab = "enforce"
prod = "audit"
dev = "off"

[services.inherits]
allow = [{ cidr = "10.0.0.0/8", ports = [443], proto = "tcp" }]

[services.always-enforces]
mode = "enforce"
allow = [{ cidr = "10.0.0.0/8", ports = [443], proto = "tcp" }]

[services.per-environment]
mode = { prod = "enforce", lab = "off" }
allow = [{ cidr = "10.0.0.0/8", ports = [443], proto = "tcp" }]
"#;

#[test]
fn verdict_per_environment_mode() {
    let s = snapshot(MODES);
    let names: Vec<_> = s.environments().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["dev", "lab", "prod"], "environments are sorted by name");
    let allowed = conn("10.1.2.3", 443, Proto::Tcp);
    let denied = conn("192.0.2.1", 443, Proto::Tcp);
    let cases = [
        ("inherits", "prod", Mode::Audit, Verdict::WouldReject),
        ("inherits", "lab", Mode::Enforce, Verdict::Rejected),
        ("inherits", "dev", Mode::Off, Verdict::Allowed),
        ("always-enforces", "prod", Mode::Enforce, Verdict::Rejected),
        ("always-enforces", "dev", Mode::Enforce, Verdict::Rejected),
        ("per-environment", "prod", Mode::Enforce, Verdict::Rejected),
        ("per-environment", "lab", Mode::Off, Verdict::Allowed),
        ("per-environment", "dev", Mode::Off, Verdict::Allowed),
    ];
    for (service, env, mode, verdict) in cases {
        let (_, ruleset) = s.service(service).unwrap();
        let env = s.environment_index(env).unwrap();
        let d = ruleset.decide(env, &denied);
        assert_eq!((d.mode, d.verdict), (mode, verdict), "{service} in {}", s.environments()[env].name);
        assert!(d.rule.is_none());
        let d = ruleset.decide(env, &allowed);
        assert_eq!(d.verdict, Verdict::Allowed, "{service}: an allowed connection passes in every mode");
        assert_eq!(d.rule.unwrap().net.to_string(), "10.0.0.0/8");
    }
    // An unknown environment index is treated as `off`.
    let (_, ruleset) = s.service("inherits").unwrap();
    assert_eq!(ruleset.decide(99, &denied).verdict, Verdict::Allowed);
}

#[test]
fn policy_without_environments_audits() {
    let s = snapshot("version = 1\n[services.web]\nallow = [{ ip = \"10.0.0.1\" }]\n");
    assert_eq!(s.environments().len(), 1);
    assert_eq!(s.environments()[0].name, depfence::policy::DEFAULT_ENVIRONMENT);
    assert_eq!(s.environments()[0].mode, Mode::Audit);
    let (_, web) = s.service("web").unwrap();
    assert_eq!(web.decide(0, &conn("10.0.0.2", 80, Proto::Tcp)).verdict, Verdict::WouldReject);
    assert_eq!(web.decide(0, &conn("10.0.0.1", 80, Proto::Udp)).verdict, Verdict::Allowed);
}

const SPECIFIC: &str = r#"version = 1
[environments]
qa = "enforce"

[services.client]
allow = [
  { cidr = "10.0.0.0/8" },
  { cidr = "10.1.0.0/16", ports = [443], proto = "tcp" },
  { cidr = "10.1.2.0/24", ports = ["400-500"], proto = "tcp" },
  { cidr = "10.5.0.0/16", ports = ["8000-8100"], proto = "tcp" },
  { cidr = "10.5.0.0/16", ports = [8080], proto = "tcp" },
  { cidr = "10.6.0.0/16", ports = [53], proto = "any" },
  { cidr = "10.6.0.0/16", ports = [53], proto = "udp" },
  { cidr = "::ffff:172.16.0.0/108", ports = [5432], proto = "tcp" },
  { cidr = "2001:db8::/32", ports = ["1000-2000"], proto = "tcp" },
  { ip = "2001:db8:0:1::5", ports = [1500], proto = "tcp" },
]
"#;

/// The rule that decides `conn` for `client` in `qa`, as `(block, ports, proto)`.
fn deciding_rule(s: &Snapshot, c: &Connection) -> Option<(String, PortRange, Proto)> {
    let (_, client) = s.service("client").unwrap();
    let decision = client.decide(0, c);
    assert_eq!(decision.verdict == Verdict::Allowed, decision.rule.is_some());
    decision.rule.map(|r| (r.net.to_string(), r.ports, r.proto))
}

fn rule(net: &str, ports: PortRange, proto: Proto) -> Option<(String, PortRange, Proto)> {
    Some((net.to_owned(), ports, proto))
}

#[test]
fn most_specific_rule_decides() {
    let s = snapshot(SPECIFIC);
    let tcp = Proto::Tcp;
    // Longest prefix first.
    assert_eq!(
        deciding_rule(&s, &conn("10.1.2.3", 443, tcp)),
        rule("10.1.2.0/24", PortRange { first: 400, last: 500 }, tcp)
    );
    assert_eq!(deciding_rule(&s, &conn("10.1.3.3", 443, tcp)), rule("10.1.0.0/16", PortRange::single(443), tcp));
    assert_eq!(deciding_rule(&s, &conn("10.1.2.3", 22, tcp)), rule("10.0.0.0/8", PortRange::ANY, Proto::Any));
    assert_eq!(deciding_rule(&s, &conn("10.9.9.9", 22, Proto::Udp)), rule("10.0.0.0/8", PortRange::ANY, Proto::Any));
    // Same prefix: the narrower port range.
    assert_eq!(deciding_rule(&s, &conn("10.5.0.1", 8080, tcp)), rule("10.5.0.0/16", PortRange::single(8080), tcp));
    assert_eq!(
        deciding_rule(&s, &conn("10.5.0.1", 8081, tcp)),
        rule("10.5.0.0/16", PortRange { first: 8000, last: 8100 }, tcp)
    );
    // Same prefix and ports: the exact protocol over `any`.
    assert_eq!(
        deciding_rule(&s, &conn("10.6.0.1", 53, Proto::Udp)),
        rule("10.6.0.0/16", PortRange::single(53), Proto::Udp)
    );
    assert_eq!(deciding_rule(&s, &conn("10.6.0.1", 53, tcp)), rule("10.6.0.0/16", PortRange::single(53), Proto::Any));
    // IPv6: a host rule inside a block.
    assert_eq!(
        deciding_rule(&s, &conn("2001:db8:0:1::5", 1500, tcp)),
        rule("2001:db8:0:1::5/128", PortRange::single(1500), tcp)
    );
    assert_eq!(
        deciding_rule(&s, &conn("2001:db8:0:1::6", 1500, tcp)),
        rule("2001:db8::/32", PortRange { first: 1000, last: 2000 }, tcp)
    );
}

#[test]
fn ipv4_mapped_ipv6_is_ipv4() {
    let s = snapshot(SPECIFIC);
    let tcp = Proto::Tcp;
    // A mapped destination is judged as the IPv4 address.
    assert_eq!(deciding_rule(&s, &conn("::ffff:10.1.2.3", 443, tcp)), deciding_rule(&s, &conn("10.1.2.3", 443, tcp)));
    assert!(deciding_rule(&s, &conn("::ffff:10.1.2.3", 443, tcp)).is_some());
    // A mapped block in the policy is stored as the IPv4 block.
    assert_eq!(deciding_rule(&s, &conn("172.16.3.4", 5432, tcp)), rule("172.16.0.0/12", PortRange::single(5432), tcp));
    assert_eq!(
        deciding_rule(&s, &conn("::ffff:172.16.3.4", 5432, tcp)),
        rule("172.16.0.0/12", PortRange::single(5432), tcp)
    );
    // IPv6 addresses that are not mapped do not match IPv4 rules, and the other way round.
    assert_eq!(deciding_rule(&s, &conn("::a01:203", 443, tcp)), None);
    assert_eq!(deciding_rule(&s, &conn("64:ff9b::a01:203", 443, tcp)), None);
    assert_eq!(deciding_rule(&s, &conn("32.1.13.184", 1500, tcp)), None);
    // And the verdict says so.
    let (_, client) = s.service("client").unwrap();
    assert_eq!(client.decide(0, &conn("::ffff:192.0.2.1", 443, tcp)).verdict, Verdict::Rejected);
}

#[test]
fn port_range_bounds_are_inclusive() {
    let s = snapshot(SPECIFIC);
    let at = |port| deciding_rule(&s, &conn("10.5.0.1", port, Proto::Tcp)).map(|r| r.0);
    assert_eq!(at(7999), Some("10.0.0.0/8".to_owned()), "outside the range: only the /8 any-port rule");
    assert_eq!(at(8000), Some("10.5.0.0/16".to_owned()));
    assert_eq!(at(8100), Some("10.5.0.0/16".to_owned()));
    assert_eq!(at(8101), Some("10.0.0.0/8".to_owned()));
    let v6 = |port| deciding_rule(&s, &conn("2001:db8::9", port, Proto::Tcp)).is_some();
    assert_eq!([v6(999), v6(1000), v6(2000), v6(2001)], [false, true, true, false]);
}

#[test]
fn protocol_any_versus_tcp_and_udp() {
    let s = snapshot(SPECIFIC);
    // `tcp` rules do not allow UDP.
    assert_eq!(deciding_rule(&s, &conn("2001:db8::9", 1500, Proto::Udp)), None);
    assert_eq!(deciding_rule(&s, &conn("10.1.3.3", 443, Proto::Udp)).map(|r| r.0), Some("10.0.0.0/8".to_owned()));
    // `any` (the default) allows both.
    for proto in [Proto::Tcp, Proto::Udp] {
        assert!(deciding_rule(&s, &conn("10.200.0.1", 9, proto)).is_some());
    }
    // A service reference takes the endpoint's protocol, narrowed by the entry's.
    let s = snapshot(
        r#"version = 1
[services.dns]
endpoints = [{ ip = "10.0.0.53", ports = [53], proto = "any" }]
[services.client]
allow = [{ service = "dns", proto = "udp" }]
"#,
    );
    let (_, client) = s.service("client").unwrap();
    assert_eq!(client.decide(0, &conn("10.0.0.53", 53, Proto::Udp)).verdict, Verdict::Allowed);
    assert_eq!(client.decide(0, &conn("10.0.0.53", 53, Proto::Tcp)).verdict, Verdict::WouldReject);
}
