//! Name resolution and rule expansion: policy AST → graph nodes, edges and per-service rulesets.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rayon::prelude::*;

use super::{Edge, EdgeKind, Node};
use crate::diag::{Diagnostic, Diagnostics, Loc, Located, Sources};
use crate::policy::EnvironmentEntry;
use crate::policy::{
    AllowEntry, Destination, Mode, ModeSpec, PolicySet, PortRange, Proto, RpcPattern, Service, Target,
};
use crate::problem::{Problem, closest};
use crate::snapshot::{
    DebugInfo, EndpointRule, HostRule, NetRule, Origin, Owners, RpcRule, ServiceId, ServiceRuleset, SnapshotContent,
};

pub(super) struct Resolved {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub content: SnapshotContent,
    pub debug: DebugInfo,
    pub owners: Owners,
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
    owners: &'a Owners,
    endpoints: &'a [Vec<EndpointRule>],
}

/// What resolving one service gives.
struct ServicePart {
    node: Node,
    edges: Vec<Edge>,
    origins: Vec<Origin>,
    ruleset: ServiceRuleset,
    diags: Diagnostics,
}

/// Resolves every service (in parallel: each service only reads shared, immutable indexes) and
/// concatenates the results in service order, so the outcome does not depend on scheduling.
pub(super) fn resolve(policy: &PolicySet, diags: &mut Diagnostics) -> Resolved {
    // Services sorted by name; the first definition wins (duplicates are already reported).
    let mut by_name: BTreeMap<&str, &Service> = BTreeMap::new();
    for s in &policy.services {
        by_name.entry(&s.name.value).or_insert(s);
    }
    let services: Vec<&Service> = by_name.into_values().collect();
    let service_names = Names::new("service", services.iter().map(|s| s.name.value.as_str()));
    let layers = Names::new("layer", policy.layers.iter().map(|l| l.value.as_str()));
    let groups = Names::new("group", services.iter().filter_map(|s| s.group.as_ref()).map(|g| g.value.as_str()));

    // Sorted by name: the snapshot's order.
    let mut environments = policy.declared_environments();
    environments.sort_by(|a, b| a.name.cmp(&b.name));
    let env_names = Names::new("environment", environments.iter().map(|e| e.name.as_str()));

    for set in &policy.isolated {
        for group in &set.groups {
            groups.get(group, diags);
        }
    }

    let endpoints: Vec<Vec<EndpointRule>> = services.iter().map(|s| endpoint_rules(s)).collect();
    let owners = Owners::new(endpoints.iter().map(Vec::as_slice));
    let mut debug = DebugInfo {
        files: policy.sources.files().iter().map(|f| f.name().to_owned()).collect(),
        origins: Vec::new(),
        services: services
            .iter()
            .enumerate()
            .map(|(id, s)| origin_of(&policy.sources, s.name.loc, id as ServiceId))
            .collect(),
    };
    let ctx = Context {
        policy,
        services: &services,
        service_names: &service_names,
        layers: &layers,
        environments: &environments,
        env_names: &env_names,
        owners: &owners,
        endpoints: &endpoints,
    };
    // Each service's allow entries and rpc_allow patterns get the origin ids after those of the
    // services before it.
    let first_origins: Vec<u32> = services
        .iter()
        .scan(0u32, |next, s| {
            let first = *next;
            *next += (s.allow.len() + rpc_pattern_count(s)) as u32;
            Some(first)
        })
        .collect();
    let parts: Vec<ServicePart> = services
        .par_iter()
        .zip(first_origins)
        .enumerate()
        .map(|(id, (service, first_origin))| resolve_service(&ctx, id, service, first_origin))
        .collect();
    let mut nodes = Vec::with_capacity(services.len());
    let mut edges = Vec::with_capacity(parts.iter().map(|p| p.edges.len()).sum());
    let mut rulesets = Vec::with_capacity(services.len());
    debug.origins.reserve_exact(parts.iter().map(|p| p.origins.len()).sum());
    for part in parts {
        nodes.push(part.node);
        edges.extend(part.edges);
        debug.origins.extend(part.origins);
        rulesets.push(part.ruleset);
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
        owners,
        intrinsic,
    }
}

/// Resolves one service; its allow entries get origin ids from `first_origin` on.
fn resolve_service(ctx: &Context<'_, '_>, id: usize, service: &Service, first_origin: u32) -> ServicePart {
    let Context { policy, services, service_names, layers, environments, env_names, owners, endpoints } = *ctx;
    let mut diags = Diagnostics::default();
    let diags = &mut diags;
    let mut debug = DebugInfo::default();
    let mut edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
    let mut reached = Vec::new();

    let layer = service.layer.as_ref().and_then(|l| layers.get(l, diags));
    if service.layer.is_none() && !policy.layers.is_empty() {
        diags.push(Diagnostic::warning(
            Problem::NoLayer { service: service.name.value.clone() },
            service.name.loc,
            "no layer",
        ));
    }
    let node = Node {
        name: service.name.value.clone(),
        layer,
        group: service.group.as_ref().map(|g| g.value.clone()),
        tier: service.tier.map(|t| t.value),
    };
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
            let edge =
                edges.entry((id, to)).or_insert(Edge { from: id, to, critical: entry.critical, kind, loc: entry.loc });
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
                owners.reached_by(destination, entry.ports.as_deref(), entry.proto, &mut reached);
                reached.sort_unstable();
                reached.dedup();
                for &to in &reached {
                    add_edge(to as usize, EdgeKind::Inferred);
                }
                let target = match reached.as_slice() {
                    [only] => Some(*only),
                    _ => None,
                };
                let ports = entry.ports.as_deref().unwrap_or(&[PortRange::ANY]);
                let proto = entry.proto.unwrap_or(Proto::Any);
                push_rules(destination, ports, proto, origin, target, &mut net_rules, &mut host_rules);
            }
        }
    }
    let rpc_rules = resolve_rpc_rules(ctx, id, service, first_origin + debug.origins.len() as u32, &edges, diags);
    debug.origins.extend(rpc_origins(&policy.sources, service, id as ServiceId));
    net_rules.sort_unstable();
    net_rules.dedup_by(|b, a| (a.net, a.proto, a.ports, a.target) == (b.net, b.proto, b.ports, b.target));
    host_rules.sort_unstable();
    host_rules.dedup_by(|b, a| (&a.host, a.proto, a.ports, a.target) == (&b.host, b.proto, b.ports, b.target));
    let ruleset = ServiceRuleset {
        name: service.name.value.clone(),
        selector: service.selector.as_ref().map(|s| s.value.clone()),
        layer: service.layer.as_ref().map(|l| l.value.clone()),
        group: service.group.as_ref().map(|g| g.value.clone()),
        owner: service.owner.clone(),
        tier: service.tier.map(|t| t.value),
        modes,
        net_rules,
        host_rules,
        endpoints: endpoints.get(id).cloned().unwrap_or_default(),
        rpc_rules,
    };
    ServicePart {
        node,
        edges: edges.into_values().collect(),
        origins: debug.origins,
        ruleset,
        diags: std::mem::take(diags),
    }
}

fn rpc_pattern_count(service: &Service) -> usize {
    service.rpc_allow.iter().map(|e| e.rpcs.len()).sum()
}

/// The `rpc_allow` patterns of a service in canonical order (backend name, then pattern), so
/// reordering them changes neither the snapshot content nor its hash. Origin ids follow this
/// order.
fn rpc_patterns_in_order(service: &Service) -> Vec<(&Located<String>, &Located<RpcPattern>)> {
    let mut patterns: Vec<_> =
        service.rpc_allow.iter().flat_map(|e| e.rpcs.iter().map(move |p| (&e.service, p))).collect();
    patterns.sort_by(|(a, p), (b, q)| (&a.value, &p.value).cmp(&(&b.value, &q.value)));
    patterns
}

fn rpc_origins(sources: &Sources, service: &Service, id: ServiceId) -> Vec<Origin> {
    rpc_patterns_in_order(service).into_iter().map(|(_, p)| origin_of(sources, p.loc, id)).collect()
}

/// The RPC rules of a service; its patterns get origin ids from `first_origin` on. An
/// `rpc_allow` entry needs a dependency edge (declared or inferred) to its backend, so no RPC
/// dependency escapes the graph checks and the kernel lets the connection through.
fn resolve_rpc_rules(
    ctx: &Context<'_, '_>,
    id: usize,
    service: &Service,
    first_origin: u32,
    edges: &BTreeMap<(usize, usize), Edge>,
    diags: &mut Diagnostics,
) -> Vec<RpcRule> {
    let mut checked: BTreeSet<&str> = BTreeSet::new();
    let mut rules = Vec::new();
    for entry in &service.rpc_allow {
        let Some(to) = ctx.service_names.get(&entry.service, diags) else { continue };
        if !edges.contains_key(&(id, to)) && checked.insert(entry.service.value.as_str()) {
            diags.push(Diagnostic::error(
                Problem::RpcWithoutAllow { service: service.name.value.clone(), target: entry.service.value.clone() },
                entry.loc,
                format!("no network allow for `{}`", entry.service.value),
            ));
        }
    }
    for (origin, (target, pattern)) in (first_origin..).zip(rpc_patterns_in_order(service)) {
        if let Some(&to) = ctx.service_names.index.get(target.value.as_str()) {
            rules.push(RpcRule { target: to as ServiceId, pattern: pattern.value.clone(), origin });
        }
    }
    rules.sort_unstable();
    rules.dedup_by(|b, a| (a.target, &a.pattern) == (b.target, &b.pattern));
    rules
}

/// A service's declared endpoints, one per port range.
fn endpoint_rules(service: &Service) -> Vec<EndpointRule> {
    let mut rules = Vec::new();
    for endpoint in &service.endpoints {
        let ports: &[PortRange] = if endpoint.ports.is_empty() { &[PortRange::ANY] } else { &endpoint.ports };
        for &ports in ports {
            rules.push(EndpointRule { destination: endpoint.destination.value.clone(), proto: endpoint.proto, ports });
        }
    }
    rules
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
