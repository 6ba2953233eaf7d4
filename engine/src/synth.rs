//! Synthetic policies of any size, for benchmarks and scale tests.
//!
//! [`generate`] writes realistic, valid policy text the way an organisation would keep it: one
//! global file (`00-global.toml`: environments, the layer model, an isolation set and a declared
//! intrinsic cycle) and one file per team holding that team's services. The output is a pure
//! function of the [`SynthSpec`]: the same spec always gives byte-identical files.
//!
//! The shape of the generated policy:
//!
//! * Services are numbered `0..services`; service `i` is in layer `i * 4 / services` of the four
//!   [`LAYERS`], has tier `layer + 1`, and is owned by team `i % teams`.
//! * Service `i` owns the address slot `10.x.y.0/24` (`x.y` = `i` in base 256); its endpoints lie
//!   in that slot (plus, for some services, an IPv6 endpoint in `fd00::/16` and a `/26` pool).
//! * Critical dependencies (service references and raw addresses that hit another service's
//!   endpoint, which the compiler turns into inferred edges) only ever point to services with a
//!   lower number, so the critical graph is acyclic and never points to a higher layer. The one
//!   exception is a pair of services in the lowest layer that depend on each other; that cycle is
//!   declared in `[[intrinsic_cycles]]`.
//! * Allow entries mix, per hundred: about 20 service references, 10 raw addresses of other
//!   services' endpoints, 30 CIDR blocks (mostly in `172.16.0.0/12` and `100.64.0.0/10`, which no
//!   endpoint uses; some cover exactly one lower service's slot), 28 single external addresses,
//!   2 host names and 10 IPv6 addresses or blocks; ports are written as a number, a list or a
//!   range, with protocol `tcp`, `udp`, `any` or none. A few entries are `critical = false`.
//! * Every 50th service is in group `sandbox`, which no other service may reach and which reaches
//!   no service; group `pci` is isolated from it, so the isolation check runs over the whole graph.

use std::fmt::Write as _;

/// The layers of the generated model, bottom to top.
pub const LAYERS: [&str; 4] = ["platform", "data", "backend", "edge"];

/// The name of the file holding environments and the model.
pub const GLOBAL_FILE: &str = "00-global.toml";

const TEAM_WORDS: &[&str] = &[
    "payments",
    "identity",
    "search",
    "storage",
    "billing",
    "catalog",
    "checkout",
    "messaging",
    "media",
    "ads",
    "analytics",
    "infra",
    "fraud",
    "shipping",
    "pricing",
    "reviews",
    "notify",
    "growth",
    "maps",
    "ledger",
];

const SERVICE_WORDS: &[&str] = &[
    "api",
    "worker",
    "gateway",
    "db",
    "cache",
    "indexer",
    "scheduler",
    "router",
    "store",
    "queue",
    "auth",
    "ingest",
    "exporter",
    "proxy",
    "batch",
    "stream",
    "web",
    "sync",
    "cron",
    "resolver",
];

const SERVICE_PORTS: &[u16] = &[8080, 8443, 443, 5432, 6379, 9092, 3306, 50051, 7000, 11211];

const EXTERNAL_PORTS: &[u16] = &[443, 80, 53, 123, 587, 5432, 6379, 8443, 9200, 25];

const EXTERNAL_HOSTS: &[&str] = &[
    "api.stripe.com",
    "*.amazonaws.com",
    "hooks.slack.com",
    "*.googleapis.com",
    "smtp.sendgrid.net",
    "registry.npmjs.org",
    "*.datadoghq.com",
    "github.com",
];

const REASONS: &[&str] = &[
    "degrades gracefully: serves stale data",
    "best-effort telemetry",
    "optional enrichment, skipped when down",
    "warm-up only",
];

/// How big a policy to generate, and from which seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSpec {
    /// Number of services.
    pub services: usize,
    /// Total number of allow entries, over all services (exact).
    pub allow_entries: usize,
    /// Number of teams, i.e. of team files (at least one is used).
    pub teams: usize,
    /// Seed of the pseudo-random choices.
    pub seed: u64,
}

impl SynthSpec {
    /// `services` services with `allow_entries` entries in all, one team per 100 services, and a
    /// fixed seed.
    pub fn new(services: usize, allow_entries: usize) -> Self {
        SynthSpec { services, allow_entries, teams: services.div_ceil(100).max(1), seed: 0x5eed_d3f3_2c3a_0001 }
    }
}

impl Default for SynthSpec {
    /// 1,000 services with 100,000 allow entries.
    fn default() -> Self {
        SynthSpec::new(1_000, 100_000)
    }
}

/// A small, fast, deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    /// A generator for one purpose of one item, independent of every other.
    fn derive(seed: u64, purpose: u64, item: u64) -> Self {
        let mut rng = Rng(seed ^ purpose.wrapping_mul(0xa076_1d64_78bd_642f));
        rng.0 ^= rng.next().wrapping_add(item);
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    fn percent(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        let i = self.below(items.len());
        items.get(i)
    }

    fn pick_str(&mut self, items: &[&'static str]) -> &'static str {
        self.pick(items).copied().unwrap_or("x")
    }

    fn pick_port(&mut self, items: &[u16]) -> u16 {
        self.pick(items).copied().unwrap_or(443)
    }
}

const PURPOSE_SERVICE: u64 = 1;
const PURPOSE_COUNTS: u64 = 2;
const PURPOSE_ENTRIES: u64 = 3;

/// The facts about one service that other services' entries depend on.
#[derive(Debug, Clone)]
struct ServiceInfo {
    port: u16,
    metrics: bool,
    ipv6: bool,
    pool: bool,
}

impl ServiceInfo {
    fn of(spec: &SynthSpec, i: usize) -> Self {
        let mut rng = Rng::derive(spec.seed, PURPOSE_SERVICE, i as u64);
        ServiceInfo {
            port: rng.pick_port(SERVICE_PORTS),
            metrics: rng.percent(30),
            ipv6: rng.percent(10),
            pool: rng.percent(5),
        }
    }
}

/// The layer index of service `i`.
fn layer_of(spec: &SynthSpec, i: usize) -> usize {
    (i * LAYERS.len()).checked_div(spec.services).unwrap_or(0).min(LAYERS.len() - 1)
}

fn is_sandbox(i: usize) -> bool {
    i % 50 == 49
}

fn is_pci(i: usize) -> bool {
    i % 50 == 10
}

fn team_count(spec: &SynthSpec) -> usize {
    spec.teams.clamp(1, spec.services.max(1))
}

fn team_name(t: usize) -> String {
    let word = TEAM_WORDS.get(t % TEAM_WORDS.len()).copied().unwrap_or("team");
    format!("{word}-{:02}", t / TEAM_WORDS.len())
}

/// The name of service `i` of a spec, e.g. `payments-00-ledger-00042`.
pub fn service_name(spec: &SynthSpec, i: usize) -> String {
    let team = team_name(i % team_count(spec));
    let word = SERVICE_WORDS.get((i / team_count(spec) + i * 7) % SERVICE_WORDS.len()).copied().unwrap_or("svc");
    format!("{team}-{word}-{i:05}")
}

/// The `10.x.y.0/24` slot of service `i`, as its first three octets.
fn slot(i: usize) -> [u32; 3] {
    let n = i as u32;
    [10 + (n >> 16), (n >> 8) & 0xff, n & 0xff]
}

/// Number of allow entries of every service: the total split evenly, then shifted between
/// neighbours so sizes vary (by up to half) while the sum stays exact.
fn entry_counts(spec: &SynthSpec) -> Vec<usize> {
    let n = spec.services;
    let Some(base) = spec.allow_entries.checked_div(n) else { return Vec::new() };
    let extra = spec.allow_entries % n;
    let mut counts: Vec<usize> = (0..n).map(|i| base + usize::from(i < extra)).collect();
    let mut rng = Rng::derive(spec.seed, PURPOSE_COUNTS, 0);
    for pair in counts.chunks_exact_mut(2) {
        if let [a, b] = pair {
            let shift = rng.below((*a).min(*b) / 2 + 1);
            *a += shift;
            *b -= shift;
        }
    }
    counts
}

/// Generates a policy: `(file name, TOML text)` pairs, the global file first, then one file per
/// team in team order. Always valid: it compiles without errors (and without warnings).
pub fn generate(spec: &SynthSpec) -> Vec<(String, String)> {
    let teams = team_count(spec);
    let counts = entry_counts(spec);
    let cycle = has_intrinsic_cycle(spec, &counts);
    let mut files = Vec::with_capacity(teams + 1);
    files.push((GLOBAL_FILE.to_owned(), global_file(spec, cycle)));
    let per_team = spec.services.div_ceil(teams);
    let bytes_per_team = spec.allow_entries.checked_div(teams).unwrap_or(0) * 64 + per_team * 400;
    for t in 0..teams {
        let mut text = String::with_capacity(bytes_per_team);
        text.push_str("version = 1\n");
        for i in (t..spec.services).step_by(teams) {
            let count = counts.get(i).copied().unwrap_or(0);
            // Writing into a `String` cannot fail.
            let _ = write_service(&mut text, spec, i, count, cycle);
        }
        files.push((format!("team-{t:03}-{}.toml", team_name(t)), text));
    }
    files
}

/// The environments, the layer model, the isolation set and the accepted cycle.
fn global_file(spec: &SynthSpec, cycle: bool) -> String {
    let mut out = String::new();
    out.push_str("# Generated by depfence::synth: organisation-wide settings.\nversion = 1\n\n");
    out.push_str("[environments]\ndev = \"off\"\nstaging = \"audit\"\nprod = { mode = \"enforce\" }\n\n");
    out.push_str("[model]\nlayers = [");
    for (k, layer) in LAYERS.iter().enumerate() {
        let sep = if k == 0 { "" } else { ", " };
        out.push_str(&format!("{sep}\"{layer}\""));
    }
    out.push_str("]\n");
    if spec.services >= 50 {
        out.push_str("isolated = [[\"pci\", \"sandbox\"]]\n");
    }
    if cycle {
        out.push_str(&format!(
            "\n[[intrinsic_cycles]]\nservices = [\"{}\", \"{}\"]\nreason = \"replicated peers: each syncs from the other\"\n",
            service_name(spec, 1),
            service_name(spec, 2)
        ));
    }
    out
}

/// Services 1 and 2 (both in the lowest layer once there are 12 services) depend on each other,
/// when both have an allow entry.
fn has_intrinsic_cycle(spec: &SynthSpec, counts: &[usize]) -> bool {
    spec.services >= 12 && counts.get(1).is_some_and(|&c| c > 0) && counts.get(2).is_some_and(|&c| c > 0)
}

fn write_service(out: &mut String, spec: &SynthSpec, i: usize, count: usize, cycle: bool) -> std::fmt::Result {
    let name = service_name(spec, i);
    let info = ServiceInfo::of(spec, i);
    let layer = layer_of(spec, i);
    let [a, b, c] = slot(i);
    let mut rng = Rng::derive(spec.seed, PURPOSE_ENTRIES, i as u64);

    writeln!(out, "\n[services.{name}]")?;
    if rng.percent(3) {
        writeln!(out, "cgroup = {{ regex = '^kubepods\\.slice/.*{name}-[0-9a-f]+\\.scope$' }}")?;
    } else {
        writeln!(out, "cgroup = \"system.slice/{name}.service\"")?;
    }
    writeln!(out, "layer = \"{}\"", LAYERS.get(layer).copied().unwrap_or("edge"))?;
    if is_sandbox(i) {
        writeln!(out, "group = \"sandbox\"")?;
    } else if is_pci(i) {
        writeln!(out, "group = \"pci\"")?;
    }
    writeln!(out, "owner = \"team-{}\"", team_name(i % team_count(spec)))?;
    writeln!(out, "tier = {}", layer + 1)?;
    if rng.percent(20) {
        writeln!(out, "description = \"synthetic service {i} in layer {layer}\"")?;
    }
    match rng.below(20) {
        0 => writeln!(out, "mode = \"enforce\"")?,
        1 => writeln!(out, "mode = {{ prod = \"audit\" }}")?,
        _ => {}
    }

    out.push_str("endpoints = [\n");
    let proto = if info.port == 11211 { "any" } else { "tcp" };
    writeln!(out, "  {{ ip = \"{a}.{b}.{c}.10\", ports = [{}], proto = \"{proto}\" }},", info.port)?;
    if info.metrics {
        writeln!(out, "  {{ ip = \"{a}.{b}.{c}.10\", ports = 9100, proto = \"tcp\" }},")?;
    }
    if info.ipv6 {
        writeln!(out, "  {{ ip = \"fd00::{a:x}:{b:x}:{c:x}:10\", ports = [{}] }},", info.port)?;
    }
    if info.pool {
        writeln!(out, "  {{ cidr = \"{a}.{b}.{c}.64/26\", ports = \"7000-7010\", proto = \"udp\" }},")?;
    }
    out.push_str("]\n");

    if count == 0 {
        return Ok(());
    }
    out.push_str("allow = [\n");
    for k in 0..count {
        out.push_str("  { ");
        if k == 0 && cycle && (i == 1 || i == 2) {
            // The declared intrinsic cycle: 1 -> 2 and 2 -> 1.
            write!(out, "service = \"{}\"", service_name(spec, 3 - i))?;
        } else {
            write_entry(out, spec, i, &mut rng)?;
        }
        out.push_str(" },\n");
    }
    out.push_str("]\n");
    Ok(())
}

/// A lower-numbered service outside the sandbox, if there is one.
fn lower_service(rng: &mut Rng, i: usize) -> Option<usize> {
    // Prefer recent services (same or nearby layer) half of the time, as real graphs do.
    let j = if rng.percent(50) { i.checked_sub(1 + rng.below(i.min(200)))? } else { rng.below(i) };
    let j = if is_sandbox(j) { j.checked_sub(1)? } else { j };
    (j < i).then_some(j)
}

fn write_entry(out: &mut String, spec: &SynthSpec, i: usize, rng: &mut Rng) -> std::fmt::Result {
    let roll = rng.below(100);
    // The sandbox neither reaches nor is reached by other services.
    let roll = if is_sandbox(i) && roll < 30 { 60 + roll } else { roll };
    match roll {
        0..20 => match lower_service(rng, i) {
            Some(_) if rng.percent(1) => {
                // Not critical: may point anywhere outside the sandbox, even upward.
                let j = rng.below(spec.services);
                let j = if is_sandbox(j) || j == i { lower_service(rng, i).unwrap_or(j) } else { j };
                if is_sandbox(j) || j == i {
                    return write_external_ip(out, rng);
                }
                let reason = rng.pick_str(REASONS);
                write!(out, "service = \"{}\", critical = false, reason = \"{reason}\"", service_name(spec, j))
            }
            Some(j) => {
                write!(out, "service = \"{}\"", service_name(spec, j))?;
                // Narrow to the target's main port now and then (always a port it serves).
                let target = ServiceInfo::of(spec, j);
                if rng.percent(25) {
                    write!(out, ", ports = {}", target.port)?;
                    if target.port != 11211 && rng.percent(50) {
                        out.push_str(", proto = \"tcp\"");
                    }
                }
                Ok(())
            }
            None => write_external_ip(out, rng),
        },
        20..30 => match lower_service(rng, i) {
            Some(j) => {
                // A raw address of another service: the compiler infers the edge.
                let [a, b, c] = slot(j);
                let target = ServiceInfo::of(spec, j);
                write!(out, "ip = \"{a}.{b}.{c}.10\"")?;
                if rng.percent(70) {
                    write!(out, ", ports = {}", target.port)?;
                } else {
                    write_ports(out, rng)?;
                }
                write_proto(out, rng)
            }
            None => write_external_ip(out, rng),
        },
        30..60 => {
            let covering = !is_sandbox(i) && rng.percent(10);
            if let Some(j) = lower_service(rng, i).filter(|_| covering) {
                // A block that covers exactly one lower service's slot.
                let [a, b, c] = slot(j);
                write!(out, "cidr = \"{a}.{b}.{c}.0/24\"")?;
            } else {
                let (base, base_len) = if rng.percent(50) { (0xac10_0000_u32, 12_u32) } else { (0x6440_0000_u32, 10) };
                let len = base_len + 4 + rng.below(13) as u32; // /16 ../28 (/14 ../26)
                let host_mask = u32::MAX.checked_shr(len).unwrap_or(0);
                let inner = u32::MAX.checked_shr(base_len).unwrap_or(0);
                let addr = (base | (rng.next() as u32 & inner)) & !host_mask;
                let [o1, o2, o3, o4] = addr.to_be_bytes();
                write!(out, "cidr = \"{o1}.{o2}.{o3}.{o4}/{len}\"")?;
            }
            write_ports(out, rng)?;
            write_proto(out, rng)
        }
        60..88 => write_external_ip(out, rng),
        88..90 => {
            write!(out, "host = \"{}\"", rng.pick_str(EXTERNAL_HOSTS))?;
            write_ports(out, rng)?;
            write_proto(out, rng)
        }
        _ => {
            let (g1, g2) = (rng.below(0x10000), rng.below(0x10000));
            if rng.percent(50) {
                write!(out, "ip = \"2001:db8:{g1:x}:{g2:x}::{:x}\"", 1 + rng.below(0xffff))?;
            } else if rng.percent(50) {
                write!(out, "cidr = \"2001:db8:{g1:x}::/48\"")?;
            } else {
                write!(out, "cidr = \"2001:db8:{g1:x}:{g2:x}::/64\"")?;
            }
            write_ports(out, rng)?;
            write_proto(out, rng)
        }
    }
}

/// A single address outside every endpoint slot.
fn write_external_ip(out: &mut String, rng: &mut Rng) -> std::fmt::Result {
    const FIRST_OCTETS: &[u32] = &[34, 35, 52, 54, 104, 151, 185, 192, 198, 203];
    let first = FIRST_OCTETS.get(rng.below(FIRST_OCTETS.len())).copied().unwrap_or(52);
    let second = match first {
        192 => 168,
        198 => 18 + rng.below(2) as u32,
        203 => 0,
        _ => rng.below(256) as u32,
    };
    let third = if first == 203 { 113 } else { rng.below(256) as u32 };
    write!(out, "ip = \"{first}.{second}.{third}.{}\"", 1 + rng.below(254))?;
    write_ports(out, rng)?;
    write_proto(out, rng)
}

/// `ports` as a number, a list, a range, a list with a range, or absent.
fn write_ports(out: &mut String, rng: &mut Rng) -> std::fmt::Result {
    match rng.below(10) {
        0..4 => write!(out, ", ports = {}", rng.pick_port(EXTERNAL_PORTS)),
        4..6 => {
            let (p, q) = (rng.pick_port(EXTERNAL_PORTS), rng.pick_port(EXTERNAL_PORTS));
            write!(out, ", ports = [{p}, {q}]")
        }
        6..8 => {
            let first = 1024 + rng.below(60_000);
            write!(out, ", ports = \"{first}-{}\"", first + rng.below(100))
        }
        8 => {
            let first = 30_000 + rng.below(1000);
            write!(out, ", ports = [{}, \"{first}-{}\"]", rng.pick_port(EXTERNAL_PORTS), first + 50)
        }
        _ => Ok(()),
    }
}

/// `proto` as `tcp`, `udp`, `any`, or absent.
fn write_proto(out: &mut String, rng: &mut Rng) -> std::fmt::Result {
    match rng.below(20) {
        0..10 => out.push_str(", proto = \"tcp\""),
        10..13 => out.push_str(", proto = \"udp\""),
        13..15 => out.push_str(", proto = \"any\""),
        _ => {}
    }
    if rng.percent(3) {
        let reason = rng.pick_str(REASONS);
        write!(out, ", critical = false, reason = \"{reason}\"")?;
    }
    Ok(())
}

/// Misspells one service reference (the first one in the last file) so that the policy has
/// exactly one error: an unknown service with a "did you mean" suggestion. Returns the
/// misspelled name, or `None` when the policy has no service reference.
pub fn inject_unknown_service(files: &mut [(String, String)]) -> Option<String> {
    const NEEDLE: &str = "{ service = \"";
    let (_, text) = files.iter_mut().rev().find(|(_, text)| text.contains(NEEDLE))?;
    let start = text.find(NEEDLE)? + NEEDLE.len();
    let len = text.get(start..)?.find('"')?;
    let name = text.get(start..start + len)?.to_owned();
    // Drop the second character: `payments-00-api-00042` -> `pyments-00-api-00042`.
    let mut chars = name.chars();
    let typo: String = chars.next().into_iter().chain(chars.skip(1)).collect();
    text.replace_range(start..start + len, &typo);
    Some(typo)
}

/// Total size in bytes of generated files.
pub fn total_bytes(files: &[(String, String)]) -> usize {
    files.iter().map(|(_, text)| text.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{CompileError, compile};
    use crate::policy::parse_sources;
    use crate::problem::Problem;

    #[test]
    fn small_policy_compiles_cleanly_with_the_requested_sizes() {
        let spec = SynthSpec { services: 50, allow_entries: 500, teams: 5, seed: 7 };
        let files = generate(&spec);
        assert_eq!(files.len(), 6);
        let parsed = parse_sources(files);
        assert!(parsed.syntax_ok);
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let policy = &parsed.policy;
        assert_eq!(policy.services.len(), 50);
        assert_eq!(policy.services.iter().map(|s| s.allow.len()).sum::<usize>(), 500);
        assert_eq!(policy.layers.len(), LAYERS.len());
        assert_eq!(policy.environments.len(), 3);
        assert_eq!(policy.intrinsic_cycles.len(), 1);

        let compiled = compile(policy).unwrap_or_else(|e| match e {
            CompileError::Invalid { diagnostics: d, .. } => panic!("{:?}", d.errors().collect::<Vec<_>>()),
            e => panic!("{e}"),
        });
        assert!(compiled.analysis.diagnostics.is_empty(), "{:?}", compiled.analysis.diagnostics);
        assert_eq!(compiled.snapshot.services().len(), 50);
        assert_eq!(compiled.snapshot.debug_info().origins.iter().map(|o| o.len()).sum::<usize>(), 500);
        assert!(compiled.snapshot.net_rule_count(0) >= 400);
        // Inferred and declared edges, and the declared cycle as one component.
        let edges = &compiled.analysis.graphs[0].edges;
        assert!(edges.iter().any(|e| e.kind == crate::compile::EdgeKind::Inferred));
        assert!(edges.iter().any(|e| e.kind == crate::compile::EdgeKind::Declared));
        assert!(compiled.analysis.graphs[0].components.iter().any(|c| c.intrinsic && c.members.len() == 2));
        assert!(!compiled.analysis.graphs[0].stages.is_empty());
    }

    #[test]
    fn generation_is_deterministic_and_exact() {
        let spec = SynthSpec::new(333, 4_321);
        let files = generate(&spec);
        assert_eq!(files, generate(&spec));
        assert_eq!(files.len(), 1 + 4);
        let parsed = parse_sources(files);
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        assert_eq!(parsed.policy.services.iter().map(|s| s.allow.len()).sum::<usize>(), 4_321);
        let compiled = compile(&parsed.policy).map_err(|e| e.to_string()).unwrap();
        assert!(compiled.analysis.diagnostics.is_empty());
        let other = generate(&SynthSpec { seed: 1, ..spec });
        assert_ne!(other, generate(&spec));
    }

    #[test]
    fn tiny_and_degenerate_specs_are_valid() {
        for (services, entries, teams) in [(1, 0, 1), (1, 10, 3), (3, 7, 0), (9, 100, 2), (120, 119, 7)] {
            let spec = SynthSpec { services, allow_entries: entries, teams, seed: 3 };
            let parsed = parse_sources(generate(&spec));
            assert!(parsed.diagnostics.is_empty(), "{services}/{entries}: {:?}", parsed.diagnostics);
            assert_eq!(parsed.policy.services.len(), services);
            assert_eq!(parsed.policy.services.iter().map(|s| s.allow.len()).sum::<usize>(), entries);
            let compiled = compile(&parsed.policy).map_err(|e| e.to_string()).unwrap();
            assert!(compiled.analysis.diagnostics.is_empty(), "{:?}", compiled.analysis.diagnostics);
        }
    }

    #[test]
    fn an_injected_typo_is_the_only_error() {
        let spec = SynthSpec::new(200, 2_000);
        let mut files = generate(&spec);
        let typo = inject_unknown_service(&mut files).unwrap();
        let parsed = parse_sources(files);
        assert!(parsed.diagnostics.is_empty());
        let analysis = crate::compile::analyze(&parsed.policy);
        let errors: Vec<_> = analysis.diagnostics.errors().collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let problem = errors.first().unwrap().problem();
        assert!(
            matches!(problem, Problem::Unknown { kind: "service", name, suggestion: Some(_) } if *name == typo),
            "{problem:?}"
        );
    }
}
