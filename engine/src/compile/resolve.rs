//! Name resolution and rule expansion: policy AST → graph nodes, edges and per-service rulesets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::ops::Range;

use super::endpoints::EndpointIndex;
use super::{Edge, EdgeKind, Node};
use crate::diag::{Diagnostic, Diagnostics, Loc, Located, Sources};
use crate::policy::{AllowEntry, Destination, Mode, ModeSpec, PolicySet, PortRange, Proto, Service, Target};
use crate::problem::{Problem, closest};
use crate::snapshot::{
    DebugInfo, EnvironmentEntry, HostRule, NetRule, Origin, ServiceId, ServiceRuleset, SnapshotContent,
};

/// The environment a policy without `[environments]` has.
pub const DEFAULT_ENVIRONMENT: &str = "default";
/// Its mode: soft-apply, the safe start.
pub const DEFAULT_MODE: Mode = Mode::Audit;

pub(super) struct Resolved {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub content: SnapshotContent,
    pub debug: DebugInfo,
    pub intrinsic: Vec<(BTreeSet<usize>, Loc)>,
}

/// Looks names up and reports unknown ones with a "did you mean".
struct Names<'p> {
    kind: &'static str,
    index: HashMap<&'p str, usize>,
}

impl<'p> Names<'p> {
    fn new(kind: &'static str, names: impl IntoIterator<Item = &'p str>) -> Self {
        let mut index = HashMap::new();
        for name in names {
            let next = index.len();
            index.entry(name).or_insert(next);
        }
        Names { kind, index }
    }

    fn get(&self, name: &Located<String>, diags: &mut Diagnostics) -> Option<usize> {
        self.get_at(&name.value, name.loc, diags)
    }

    fn get_at(&self, name: &str, loc: Loc, diags: &mut Diagnostics) -> Option<usize> {
        let found = self.index.get(name).copied();
        if found.is_none() {
            // The closest name does not depend on the iteration order (ties go to the smallest).
            let suggestion = closest(name, self.index.keys().copied());
            diags.push(Diagnostic::error(
                Problem::Unknown { kind: self.kind, name: name.to_owned(), suggestion },
                loc,
                format!("no such {}", self.kind),
            ));
        }
        found
    }
}

/// What the per-service pass reads.
struct Context<'a, 'p> {
    policy: &'p PolicySet,
    services: &'a [&'p Service],
    service_names: &'a Names<'p>,
    layers: &'a Names<'p>,
    environments: &'a [EnvironmentEntry],
    env_names: &'a Names<'a>,
    index: &'a EndpointIndex,
}

/// The per-service results for a range of services.
#[derive(Default)]
struct Part {
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    origins: Vec<Origin>,
    rulesets: Vec<ServiceRuleset>,
    diags: Diagnostics,
}

/// Below this many allow entries, services are resolved on the calling thread.
const PARALLEL_MIN_ENTRIES: usize = 50_000;

/// Resolves every service: on all available cores for large policies, each thread taking a
/// contiguous range of services, then concatenated in order, so the result (including origin
/// ids and the order of diagnostics) is the same as one pass over all services.
fn resolve_all(ctx: &Context<'_, '_>, threads: Option<usize>) -> Vec<Part> {
    let weights: Vec<usize> = ctx.services.iter().map(|s| s.allow.len() + 1).collect();
    let total: usize = weights.iter().sum();
    let threads = threads
        .unwrap_or_else(|| {
            if total < PARALLEL_MIN_ENTRIES {
                1
            } else {
                std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
            }
        })
        .min(ctx.services.len());
    if threads < 2 {
        return vec![resolve_services(ctx, 0..ctx.services.len(), 0)];
    }
    // Cut into ranges of about equal weight; each starts at the origin id after the previous.
    let mut ranges = Vec::with_capacity(threads);
    let (mut start, mut weight, mut origin, mut first_origin) = (0, 0, 0, 0);
    for (i, (w, service)) in weights.iter().zip(ctx.services).enumerate() {
        weight += w;
        origin += service.allow.len();
        if weight * threads >= total * (ranges.len() + 1) || i + 1 == ctx.services.len() {
            ranges.push((start..i + 1, first_origin));
            (start, first_origin) = (i + 1, origin);
        }
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = ranges
            .into_iter()
            .map(|(range, first)| scope.spawn(move || resolve_services(ctx, range, first as u32)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|payload| std::panic::resume_unwind(payload))).collect()
    })
}

pub(super) fn resolve(policy: &PolicySet, diags: &mut Diagnostics) -> Resolved {
    resolve_on(None, policy, diags)
}

/// [`resolve`] on `threads` threads (by default: all cores for large policies, else one).
fn resolve_on(threads: Option<usize>, policy: &PolicySet, diags: &mut Diagnostics) -> Resolved {
    // Services sorted by name; the first definition wins (duplicates are already reported).
    let mut by_name: BTreeMap<&str, &Service> = BTreeMap::new();
    for s in &policy.services {
        by_name.entry(&s.name.value).or_insert(s);
    }
    let services: Vec<&Service> = by_name.into_values().collect();
    let service_names = Names::new("service", services.iter().map(|s| s.name.value.as_str()));
    let layers = Names::new("layer", policy.layers.iter().map(|l| l.value.as_str()));
    let groups = Names::new("group", services.iter().filter_map(|s| s.group.as_ref()).map(|g| g.value.as_str()));

    let mut environments: BTreeMap<&str, Mode> = BTreeMap::new();
    for env in &policy.environments {
        environments.entry(&env.name.value).or_insert(env.mode.value);
    }
    if environments.is_empty() {
        environments.insert(DEFAULT_ENVIRONMENT, DEFAULT_MODE);
    }
    let env_names = Names::new("environment", environments.keys().copied());
    let environments: Vec<EnvironmentEntry> =
        environments.into_iter().map(|(name, mode)| EnvironmentEntry { name: name.to_owned(), mode }).collect();

    for set in &policy.isolated {
        for group in &set.groups {
            groups.get(group, diags);
        }
    }

    let index = EndpointIndex::new(&services);
    let mut debug =
        DebugInfo { files: policy.sources.files().iter().map(|f| f.name().to_owned()).collect(), origins: Vec::new() };
    let ctx = Context {
        policy,
        services: &services,
        service_names: &service_names,
        layers: &layers,
        environments: &environments,
        env_names: &env_names,
        index: &index,
    };
    let parts = resolve_all(&ctx, threads);
    let mut nodes = Vec::with_capacity(services.len());
    let mut edges = Vec::with_capacity(parts.iter().map(|p| p.edges.len()).sum());
    let mut rulesets = Vec::with_capacity(services.len());
    debug.origins.reserve_exact(parts.iter().map(|p| p.origins.len()).sum());
    for part in parts {
        nodes.extend(part.nodes);
        edges.extend(part.edges);
        debug.origins.extend(part.origins);
        rulesets.extend(part.rulesets);
        diags.extend(part.diags);
    }

    let intrinsic = policy
        .intrinsic_cycles
        .iter()
        .map(|c| (c.services.iter().filter_map(|s| service_names.get(s, diags)).collect(), c.loc))
        .collect();

    Resolved {
        nodes,
        edges,
        content: SnapshotContent { format: 0, environments, services: rulesets, bootstrap: Vec::new() },
        debug,
        intrinsic,
    }
}

/// Resolves the services in `range`; the first of their allow entries gets origin id
/// `first_origin`.
fn resolve_services(ctx: &Context<'_, '_>, range: Range<usize>, first_origin: u32) -> Part {
    let Context { policy, services, service_names, layers, environments, env_names, index } = *ctx;
    let mut part = Part::default();
    let diags = &mut part.diags;
    let (nodes, rulesets) = (&mut part.nodes, &mut part.rulesets);
    let mut debug = DebugInfo { files: Vec::new(), origins: Vec::new() };
    let mut edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
    let mut reached = Vec::new();

    for (id, service) in services.iter().enumerate().skip(range.start).take(range.len()) {
        let layer = service.layer.as_ref().and_then(|l| layers.get(l, diags));
        if service.layer.is_none() && !policy.layers.is_empty() {
            diags.push(Diagnostic::warning(
                Problem::NoLayer { service: service.name.value.clone() },
                service.name.loc,
                "no layer",
            ));
        }
        nodes.push(Node {
            name: service.name.value.clone(),
            layer,
            group: service.group.as_ref().map(|g| g.value.clone()),
            tier: service.tier.map(|t| t.value),
        });
        let modes = resolve_modes(&service.mode, environments, env_names, diags);

        let mut net_rules = Vec::new();
        let mut host_rules = Vec::new();
        // Origin ids number the entries in a canonical order, not in the order written, so
        // reordering an allow list changes neither the snapshot content nor its hash.
        let mut order: Vec<usize> = (0..service.allow.len()).collect();
        order.sort_by(|&a, &b| match (service.allow.get(a), service.allow.get(b)) {
            (Some(a), Some(b)) => canonical_order(a, b),
            _ => a.cmp(&b),
        });
        let mut origins = vec![0u32; service.allow.len()];
        for &i in &order {
            if let (Some(slot), Some(entry)) = (origins.get_mut(i), service.allow.get(i)) {
                *slot = first_origin + debug.origins.len() as u32;
                debug.origins.push(origin_of(&policy.sources, entry.loc, id as ServiceId));
            }
        }
        for (entry, &origin) in service.allow.iter().zip(&origins) {
            let mut add_edge = |to: usize, kind: EdgeKind| {
                let edge = edges.entry((id, to)).or_insert(Edge {
                    from: id,
                    to,
                    critical: entry.critical,
                    kind,
                    loc: entry.loc,
                });
                if entry.critical && !edge.critical {
                    edge.critical = true;
                    edge.loc = entry.loc;
                }
                edge.kind = edge.kind.min(kind);
            };
            match &entry.target.value {
                Target::Service(name) => {
                    let Some(to) = service_names.get_at(name, entry.target.loc, diags) else {
                        continue;
                    };
                    add_edge(to, EdgeKind::Declared);
                    if let Some(target) = services.get(to) {
                        expand_service(entry, target, to, origin, &mut net_rules, &mut host_rules, diags);
                    }
                }
                Target::Destination(destination) => {
                    reached.clear();
                    index.reached_by(destination, entry.ports.as_deref(), entry.proto, &mut reached);
                    reached.sort_unstable();
                    reached.dedup();
                    for &to in &reached {
                        add_edge(to, EdgeKind::Inferred);
                    }
                    let target = match reached.as_slice() {
                        [only] => Some(*only as ServiceId),
                        _ => None,
                    };
                    let ports = entry.ports.as_deref().unwrap_or(&[PortRange::ANY]);
                    let proto = entry.proto.unwrap_or(Proto::Any);
                    push_rules(destination, ports, proto, origin, target, &mut net_rules, &mut host_rules);
                }
            }
        }
        net_rules.sort_unstable();
        net_rules.dedup_by(|b, a| (a.net, a.proto, a.ports, a.target) == (b.net, b.proto, b.ports, b.target));
        host_rules.sort_unstable();
        host_rules.dedup_by(|b, a| (&a.host, a.proto, a.ports, a.target) == (&b.host, b.proto, b.ports, b.target));
        rulesets.push(ServiceRuleset {
            name: service.name.value.clone(),
            selector: service.selector.as_ref().map(|s| s.value.clone()),
            layer: service.layer.as_ref().map(|l| l.value.clone()),
            group: service.group.as_ref().map(|g| g.value.clone()),
            owner: service.owner.clone(),
            tier: service.tier.map(|t| t.value),
            modes,
            net_rules,
            host_rules,
        });
    }
    part.edges = edges.into_values().collect();
    part.origins = debug.origins;
    part
}

/// A total order of allow entries by what they mean (target, ports, protocol, criticality).
fn canonical_order(a: &AllowEntry, b: &AllowEntry) -> std::cmp::Ordering {
    fn rank(target: &Target) -> u8 {
        match target {
            Target::Service(_) => 0,
            Target::Destination(Destination::Net(_)) => 1,
            Target::Destination(Destination::Host(_)) => 2,
        }
    }
    let target = match (&a.target.value, &b.target.value) {
        (Target::Service(x), Target::Service(y)) => x.cmp(y),
        (Target::Destination(Destination::Net(x)), Target::Destination(Destination::Net(y))) => x.cmp(y),
        (Target::Destination(Destination::Host(x)), Target::Destination(Destination::Host(y))) => x.cmp(y),
        (x, y) => rank(x).cmp(&rank(y)),
    };
    target.then_with(|| (&a.ports, a.proto, a.critical).cmp(&(&b.ports, b.proto, b.critical)))
}

fn origin_of(sources: &Sources, loc: Loc, service: ServiceId) -> Origin {
    let (line, column) = sources.file(loc.file).map_or((0, 0), |f| f.line_col(loc.start));
    Origin { file: loc.file, line, column, service }
}

/// The mode in every environment (indexed like `environments`).
fn resolve_modes(
    spec: &ModeSpec,
    environments: &[EnvironmentEntry],
    env_names: &Names<'_>,
    diags: &mut Diagnostics,
) -> Vec<Mode> {
    let mut modes: Vec<Mode> = environments.iter().map(|e| e.mode).collect();
    match spec {
        ModeSpec::Inherit => {}
        ModeSpec::All(mode) => modes.iter_mut().for_each(|m| *m = mode.value),
        ModeSpec::PerEnvironment(list) => {
            for (env, mode) in list {
                if let Some(slot) = env_names.get(env, diags).and_then(|i| modes.get_mut(i)) {
                    *slot = mode.value;
                }
            }
        }
    }
    modes
}

/// Rules for an allow entry that names a service: its endpoints, narrowed by the entry's ports
/// and protocol.
fn expand_service(
    entry: &AllowEntry,
    target: &Service,
    target_id: usize,
    origin: u32,
    net_rules: &mut Vec<NetRule>,
    host_rules: &mut Vec<HostRule>,
    diags: &mut Diagnostics,
) {
    if target.endpoints.is_empty() {
        diags.push(Diagnostic::warning(
            Problem::NoEndpoints { service: target.name.value.clone() },
            entry.target.loc,
            "permits nothing",
        ));
        return;
    }
    let before = net_rules.len() + host_rules.len();
    for endpoint in &target.endpoints {
        let Some(proto) = entry.proto.unwrap_or(Proto::Any).intersect(endpoint.proto) else { continue };
        let endpoint_ports: &[PortRange] = if endpoint.ports.is_empty() { &[PortRange::ANY] } else { &endpoint.ports };
        let narrowed: Vec<PortRange>;
        let ports = match &entry.ports {
            None => endpoint_ports,
            Some(wanted) => {
                narrowed = wanted.iter().flat_map(|w| endpoint_ports.iter().filter_map(|e| w.intersect(*e))).collect();
                &narrowed
            }
        };
        let target = Some(target_id as ServiceId);
        push_rules(&endpoint.destination.value, ports, proto, origin, target, net_rules, host_rules);
    }
    if net_rules.len() + host_rules.len() == before {
        diags.push(Diagnostic::error(
            Problem::EmptyNarrowing { service: target.name.value.clone() },
            entry.loc,
            "allows nothing",
        ));
    }
}

fn push_rules(
    destination: &Destination,
    ports: &[PortRange],
    proto: Proto,
    origin: u32,
    target: Option<ServiceId>,
    net_rules: &mut Vec<NetRule>,
    host_rules: &mut Vec<HostRule>,
) {
    for &ports in ports {
        match destination {
            Destination::Net(net) => net_rules.push(NetRule { net: *net, proto, ports, origin, target }),
            Destination::Host(host) => host_rules.push(HostRule { host: host.clone(), proto, ports, origin, target }),
        }
    }
}

#[cfg(test)]
mod parallel_tests {
    use super::*;
    use crate::policy::parse_sources;
    use crate::synth::{SynthSpec, generate};

    fn resolve_text(threads: usize, policy: &PolicySet) -> String {
        let mut diags = Diagnostics::default();
        let r = resolve_on(Some(threads), policy, &mut diags);
        format!("{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{diags:?}", r.nodes, r.edges, r.content, r.debug, r.intrinsic)
    }

    #[test]
    fn parallel_resolution_gives_the_sequential_result() {
        let mut files = generate(&SynthSpec::new(120, 3_000));
        // Problems in several ranges, so diagnostics must come out in order.
        for (_, text) in files.iter_mut().skip(1) {
            *text = text.replacen("{ service = \"", "{ service = \"x", 1).replacen(
                "layer = \"data\"",
                "layer = \"dta\"",
                1,
            );
        }
        let policy = parse_sources(files).policy;
        let sequential = resolve_text(1, &policy);
        assert!(sequential.contains("Unknown"), "the test needs diagnostics");
        for threads in [2, 3, 7] {
            assert!(resolve_text(threads, &policy) == sequential, "{threads} threads differ");
        }
    }
}
