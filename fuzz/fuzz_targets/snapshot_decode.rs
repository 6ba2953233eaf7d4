//! Any bytes read as a snapshot file must decode (and verify) or be refused, without a panic and
//! without a large allocation from a length field (run with `-malloc_limit_mb`). The same bytes
//! are also read as a file's content with its hash put right (what a tool that knows the format
//! could write), to get past the hash check. A decoded snapshot re-encodes to bytes that decode
//! to it again, and what loads snapshot files (the in-process guard, the DNS proxy's policy, the
//! owner index) takes it without a panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use depfence::dns::DnsPolicy;
use depfence::guard::Guard;
use depfence::policy::Proto;
use depfence::snapshot::{
    ContentHash, DebugInfo, SNAPSHOT_FORMAT, SNAPSHOT_MAGIC, Snapshot, SnapshotContent, SnapshotError,
};
use libfuzzer_sys::fuzz_target;

/// How many environments, services and rules each check visits (the work stays small).
const VISIT: usize = 8;

fn exercise(snapshot: &Snapshot) {
    let bytes = snapshot.to_bytes().unwrap_or_else(|e| panic!("a decoded snapshot does not encode: {e}"));
    let again = Snapshot::from_bytes(&bytes).unwrap_or_else(|e| panic!("an encoded snapshot does not decode: {e}"));
    assert_eq!(&again, snapshot);
    assert_eq!(again.to_bytes().unwrap(), bytes, "the encoding is not a fixed point");

    for (index, environment) in snapshot.environments().iter().enumerate().take(VISIT) {
        let _ = DnsPolicy::from_snapshot(snapshot, index);
        let Ok(guard) = Guard::from_snapshot(snapshot.clone(), &environment.name) else { continue };
        for caller in snapshot.services().iter().take(VISIT) {
            for backend in snapshot.services().iter().take(VISIT) {
                let _ = guard.check(&caller.name, "/pkg.Service/Method", &format!("{}:443", backend.name));
            }
            let _ = guard.check(&caller.name, "/pkg.Service/Method", "10.0.0.1:8080");
        }
    }
    // Every environment's rules and owners, and one past the last (an environment the snapshot
    // does not have).
    for env in 0..=snapshot.environments().len().min(VISIT) {
        for (id, service) in (0u32..).zip(snapshot.services().iter().take(VISIT)) {
            let _ = snapshot.service(&service.name);
            for rule in service.rules(env).net_rules.iter().take(VISIT) {
                let _ = snapshot.describe_rule(rule);
                let _ = snapshot.rule_position(id, rule);
                let _ = snapshot.owners(env).owner_of(rule.net.addr(), Some(rule.ports.first), rule.proto);
                let _ = snapshot.owners(env).owners_of(rule.net.addr(), rule.ports.last, rule.proto);
            }
        }
        let _ = snapshot.bootstrap(env);
    }
    for service in 0..snapshot.services().len().min(VISIT) {
        let _ = snapshot.service_position(u32::try_from(service).unwrap());
    }
    let _ = snapshot.owners(0).owner_of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), None, Proto::Any);
}

fuzz_target!(|data: &[u8]| {
    // As a file.
    if let Ok(snapshot) = Snapshot::from_bytes(data) {
        exercise(&snapshot);
    }
    // As a file's content, with the format and hash put right.
    let body = data.strip_prefix(SNAPSHOT_MAGIC.as_slice()).unwrap_or(data);
    let Ok((mut content, rest)) = postcard::take_from_bytes::<SnapshotContent>(body) else { return };
    content.format = SNAPSHOT_FORMAT;
    let debug = postcard::take_from_bytes::<(ContentHash, DebugInfo)>(rest).map(|((_, d), _)| d).unwrap_or_default();
    // Content whose per-environment lists do not match its environments is refused (that check
    // is what keeps a lookup from using another environment's rules); anything else must freeze.
    let snapshot = match Snapshot::new(content, debug) {
        Ok(snapshot) => snapshot,
        Err(SnapshotError::Shape) => return,
        Err(e) => panic!("decoded content does not hash: {e}"),
    };
    exercise(&snapshot);
});
