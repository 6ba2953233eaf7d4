//! Name resolution and rule expansion: policy AST → graph nodes, edges and per-service rulesets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use foldhash::HashMap;
use rayon::prelude::*;

use super::{Edge, EdgeKind, Node};
use crate::diag::{Diagnostic, Diagnostics, Loc, Located, Sources};
use crate::policy::EnvironmentEntry;
use crate::policy::{
    AllowEntry, Destination, EnvScope, Mode, ModeSpec, PolicySet, PortRange, Proto, RpcPattern, Service, Target,
};
use crate::problem::{Problem, closest};
use crate::snapshot::{
    DebugInfo, EndpointRule, HostRule, NetRule, Origin, Owners, RpcRule, Rules, ServiceId, ServiceRuleset,
    SharedRuleset, SnapshotContent,
};

pub(super) struct Resolved {
    pub nodes: Vec<Node>,
    /// Each environment's index of endpoints (shared when nothing depends on the environment).
    pub owners: Vec<Arc<Owners>>,
    /// The dependency graphs: one per view (see [`views`]).
    pub views: Vec<View>,
    pub content: SnapshotContent,
    pub debug: DebugInfo,
    pub intrinsic: Vec<(BTreeSet<usize>, Loc)>,
}

/// Environments resolved together, and the dependencies that hold in them.
pub(super) struct View {
    /// Indices into the snapshot's (sorted) environments.
    pub envs: Vec<usize>,
    /// Dependencies, sorted by (from, to), one per pair.
    pub edges: Vec<Edge>,
    /// What resolving found in these environments.
    pub diags: Diagnostics,
}

/// The environments resolved together: all of them at once when nothing in the policy depends
/// on the environment (so a policy without environment-scoped entries costs what it did), else
/// each on its own.
fn views(depends_on_environment: bool, environments: usize) -> Vec<Vec<usize>> {
    if depends_on_environment {
        (0..environments).map(|e| vec![e]).collect()
    } else {
        vec![(0..environments).collect()]
    }
}

/// Looks names up and reports unknown ones with a "did you mean".
struct Names<'p> {
    kind: &'static str,
    index: HashMap<&'p str, usize>,
}

impl<'p> Names<'p> {
    fn new(kind: &'static str, names: impl IntoIterator<Item = &'p str>) -> Self {
        let mut index = HashMap::default();
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

/// Every service's endpoints in one environment, with where each was declared, and their index.
struct EnvEndpoints {
    rules: Vec<Vec<EndpointRule>>,
    locs: Vec<Vec<Loc>>,
    owners: Arc<Owners>,
}

impl EnvEndpoints {
    /// The endpoints of `services` that `keep` accepts.
    fn new(services: &[&Service], keep: impl Fn(&crate::policy::Endpoint) -> bool) -> Self {
        Self::with_owners(services, keep, None)
    }

    /// [`EnvEndpoints::new`] with their index already built, if `owners` is it.
    fn with_owners(
        services: &[&Service],
        keep: impl Fn(&crate::policy::Endpoint) -> bool,
        owners: Option<Arc<Owners>>,
    ) -> Self {
        let (rules, locs): (Vec<_>, Vec<_>) = services
            .iter()
            .map(|s| {
                let mut rules = Vec::new();
                let mut locs = Vec::new();
                for endpoint in s.endpoints.iter().filter(|e| keep(e)) {
                    for rule in endpoint_rules(endpoint) {
                        rules.push(rule);
                        locs.push(endpoint.loc);
                    }
                }
                (rules, locs)
            })
            .unzip();
        let owners = owners.unwrap_or_else(|| Arc::new(Owners::new(rules.iter().map(Vec::as_slice))));
        EnvEndpoints { rules, locs, owners }
    }
}

/// One view's indexes: the endpoints of its environment, and for each other environment the
/// endpoints that exist only there (which a rule of this view must not reach unless it says
/// so). Without environment-scoped entries, every environment has every endpoint: no index of
/// foreign endpoints is built.
struct ViewIndex {
    envs: Vec<usize>,
    /// The environment whose names the view's entries are judged by (its first).
    env_name: String,
    /// Its endpoints: an index into [`Context::by_env`].
    own: usize,
    /// (environment index, its endpoints that this view's environment does not have).
    foreign: Vec<(usize, EnvEndpoints)>,
}

/// What the per-service pass reads.
struct Context<'a, 'p> {
    policy: &'p PolicySet,
    services: &'a [&'p Service],
    service_names: &'a Names<'p>,
    layers: &'a Names<'p>,
    environments: &'a [EnvironmentEntry],
    env_names: &'a Names<'a>,
    /// Every environment's endpoints, indexed like `environments`; one shared entry when
    /// nothing depends on the environment.
    by_env: &'a [EnvEndpoints],
    views: &'a [ViewIndex],
}

impl Context<'_, '_> {
    /// The endpoints of environment `env`.
    fn endpoints_in(&self, env: usize) -> Option<&EnvEndpoints> {
        if self.by_env.len() == 1 { self.by_env.first() } else { self.by_env.get(env) }
    }

    /// The endpoints of a view's environment (`view.own` always indexes `by_env`).
    fn own(&self, view: &ViewIndex) -> &EnvEndpoints {
        static NONE: std::sync::LazyLock<EnvEndpoints> = std::sync::LazyLock::new(|| EnvEndpoints::new(&[], |_| true));
        self.by_env.get(view.own).unwrap_or(&NONE)
    }
}

/// What resolving one service gives; shared, not copied, when the part is reused
/// ([`ResolveCache`]).
struct ServicePart {
    node: Node,
    /// Per view.
    edges: Vec<Vec<Edge>>,
    origins: Arc<[Origin]>,
    ruleset: SharedRuleset,
    diags: Diagnostics,
    /// Per view.
    view_diags: Vec<Diagnostics>,
}

/// Resolves every service (in parallel: each service only reads shared, immutable indexes) and
/// concatenates the results in service order, so the outcome does not depend on scheduling.
pub(super) fn resolve(policy: &PolicySet, diags: &mut Diagnostics, cache: Option<&mut ResolveCache>) -> Resolved {
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

    // What the services are resolved from, and the endpoint indexes of the last compile when
    // it was the same.
    let context = cache.as_ref().map(|c| ContextKey::of(policy, &environments, c.context.as_ref()));
    let depends_on_environment = match &context {
        Some(context) => context.files.iter().any(|f| f.depends_on_environment),
        None => policy.depends_on_environment(),
    };
    let view_envs = views(depends_on_environment, environments.len());
    let scoped = view_envs.len() > 1;
    let kept_owners = match (&cache, &context) {
        (Some(cache), Some(context)) if cache.context.as_ref() == Some(context) => cache.owners.clone(),
        _ => Vec::new(),
    };
    let owners_of = |i: usize| kept_owners.get(i).cloned();
    let by_env: Vec<EnvEndpoints> = if scoped {
        (environments.par_iter().enumerate())
            .map(|(i, env)| EnvEndpoints::with_owners(&services, |e| e.env.includes(&env.name), owners_of(i)))
            .collect()
    } else {
        vec![EnvEndpoints::with_owners(&services, |_| true, owners_of(0))]
    };
    let view_index: Vec<ViewIndex> = view_envs
        .into_iter()
        .map(|envs| {
            let first = envs.first().copied().unwrap_or(0);
            let env_name = environments.get(first).map(|e| e.name.clone()).unwrap_or_default();
            let own = if scoped { first } else { 0 };
            let foreign = if scoped {
                environments
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| !envs.contains(other))
                    .map(|(other, o)| {
                        let only_there =
                            |e: &crate::policy::Endpoint| e.env.includes(&o.name) && !e.env.includes(&env_name);
                        (other, EnvEndpoints::new(&services, only_there))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            ViewIndex { envs, env_name, own, foreign }
        })
        .collect();

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
        by_env: &by_env,
        views: &view_index,
    };
    let parts: Vec<Arc<ServicePart>> = match cache {
        None => {
            services.par_iter().enumerate().map(|(id, service)| Arc::new(resolve_service(&ctx, id, service))).collect()
        }
        Some(cache) => {
            cache.owners = by_env.iter().map(|e| Arc::clone(&e.owners)).collect();
            cache.resolve(&ctx, context)
        }
    };
    let mut nodes = Vec::with_capacity(services.len());
    let mut views: Vec<View> = view_index
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let edges = parts.iter().map(|p| p.edges.get(i).map_or(0, Vec::len)).sum();
            View { envs: v.envs.clone(), edges: Vec::with_capacity(edges), diags: Diagnostics::default() }
        })
        .collect();
    let mut rulesets = Vec::with_capacity(services.len());
    debug.origins.reserve_exact(parts.len());
    for part in &parts {
        nodes.push(part.node.clone());
        for ((view, edges), view_diags) in views.iter_mut().zip(&part.edges).zip(&part.view_diags) {
            view.edges.extend_from_slice(edges);
            view.diags.extend(view_diags.clone());
        }
        debug.origins.push(Arc::clone(&part.origins));
        rulesets.push(part.ruleset.clone());
        diags.extend(part.diags.clone());
    }
    drop(parts);

    let intrinsic = policy
        .intrinsic_cycles
        .iter()
        .map(|c| (c.services.iter().filter_map(|s| service_names.get(s, diags)).collect(), c.loc))
        .collect();
    let indexes: Vec<Arc<Owners>> = by_env.into_iter().map(|e| e.owners).collect();
    let owners = (0..environments.len())
        .filter_map(|env| indexes.get(env).or_else(|| indexes.first()).map(Arc::clone))
        .collect();

    Resolved {
        nodes,
        owners,
        views,
        content: SnapshotContent { format: 0, environments, services: rulesets, bootstrap: Vec::new() },
        debug,
        intrinsic,
    }
}

/// Each service's resolved part from the last compile of the same policy, reused when nothing
/// it was resolved from changed (`compile::IncrementalCompiler` keeps one).
///
/// A service's part depends on its own definition and on its context: every service's name
/// (the ids), every service's endpoints (the rules a service reference expands to, the owners
/// that infer edges), the layers, the environments and the views. So a part is reused when
/// - the context, compared by value (locations left out), is the last compile's;
/// - the service's file is the very text the part was resolved from (the incremental parse
///   keeps an unchanged file's text, so its definition and locations are the same);
/// - the part has no diagnostics (an error's note may point at another service's endpoint,
///   whose location can move while its value does not);
///
/// and its ruleset and origins are then shared with the new snapshot, not copied (its origin
/// ids count from 0 in the service, so an edit elsewhere does not change them). The result is
/// the same, to the byte, as resolving anew (`engine/tests/incremental.rs`).
#[derive(Default)]
pub(crate) struct ResolveCache {
    context: Option<ContextKey>,
    /// By service id: within one context the services, sorted by name, are the same.
    parts: Vec<Option<CachedPart>>,
    /// The index of each environment's endpoints (one when nothing depends on the environment),
    /// a function of the context.
    owners: Vec<Arc<Owners>>,
}

impl std::fmt::Debug for ResolveCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.parts.iter().flatten().count();
        f.debug_struct("ResolveCache").field("services", &kept).finish_non_exhaustive()
    }
}

/// An endpoint by value: what it is, not where it was written.
type EndpointValue = (Destination, Vec<PortRange>, Proto, EnvScope);

/// What a service's part was resolved from, compared by value: every file's services' names
/// and endpoints (in file order, which decides which definition of a duplicated name counts),
/// whether any entry depends on the environment (which decides the views), the layers and the
/// environments.
struct ContextKey {
    files: Vec<Arc<FileContext>>,
    layers: Vec<String>,
    environments: Vec<EnvironmentEntry>,
}

/// What [`ContextKey`] holds of one file, and the text it was parsed from.
struct FileContext {
    text: Arc<str>,
    services: Vec<(String, Vec<EndpointValue>)>,
    /// [`PolicySet::depends_on_environment`] for the file's services.
    depends_on_environment: bool,
}

impl PartialEq for ContextKey {
    fn eq(&self, other: &ContextKey) -> bool {
        // A file context taken over from the last key is equal without a look at its values.
        let same_file = |(a, b): (&Arc<FileContext>, &Arc<FileContext>)| {
            Arc::ptr_eq(a, b) || (&a.services, a.depends_on_environment) == (&b.services, b.depends_on_environment)
        };
        self.files.len() == other.files.len()
            && self.files.iter().zip(&other.files).all(same_file)
            && (&self.layers, &self.environments) == (&other.layers, &other.environments)
    }
}

impl ContextKey {
    /// The key of `policy`, taking over from `last` the context of every file whose text is
    /// the one it was made from (the same text parses to the same services).
    fn of(policy: &PolicySet, environments: &[EnvironmentEntry], last: Option<&ContextKey>) -> ContextKey {
        let mut by_file: Vec<Vec<&Service>> = vec![Vec::new(); policy.sources.files().len()];
        for service in &policy.services {
            if let Some(list) = by_file.get_mut(service.name.loc.file as usize) {
                list.push(service);
            }
        }
        let files = (policy.sources.files().iter().zip(by_file).enumerate())
            .map(|(index, (file, services))| {
                let kept = last.and_then(|l| l.files.get(index)).filter(|c| file.is_text(&c.text));
                match kept {
                    Some(kept) => Arc::clone(kept),
                    None => Arc::new(FileContext {
                        text: file.shared_text(),
                        services: services
                            .iter()
                            .map(|s| {
                                let endpoints = s.endpoints.iter();
                                let values = endpoints
                                    .map(|e| (e.destination.value.clone(), e.ports.clone(), e.proto, e.env.clone()));
                                (s.name.value.clone(), values.collect())
                            })
                            .collect(),
                        depends_on_environment: services.iter().any(|s| s.depends_on_environment()),
                    }),
                }
            })
            .collect();
        ContextKey {
            files,
            layers: policy.layers.iter().map(|l| l.value.clone()).collect(),
            environments: environments.to_vec(),
        }
    }
}

/// One service's part, with what it was resolved from.
struct CachedPart {
    /// Its file's text (compared by identity).
    text: Arc<str>,
    file: crate::diag::FileId,
    part: Arc<ServicePart>,
}

impl ResolveCache {
    /// Every service's part: the cached one when it may be reused, else resolved anew; the
    /// cache keeps each diagnostic-free part for the next compile.
    fn resolve(&mut self, ctx: &Context<'_, '_>, context: Option<ContextKey>) -> Vec<Arc<ServicePart>> {
        let same_context = self.context.is_some() && self.context == context;
        let mut cached = std::mem::take(&mut self.parts);
        if !same_context {
            cached.clear();
        }
        cached.resize_with(ctx.services.len(), || None);
        let results: Vec<(Arc<ServicePart>, Option<CachedPart>)> = ctx
            .services
            .par_iter()
            .zip(cached)
            .enumerate()
            .map(|(id, (service, cached))| {
                let file = service.name.loc.file;
                let text = ctx.policy.sources.file(file).map(crate::diag::SourceFile::shared_text);
                let reusable = cached
                    .filter(|c| c.file == file && ctx.policy.sources.file(file).is_some_and(|f| f.is_text(&c.text)));
                let part = match reusable {
                    Some(cached) => return (Arc::clone(&cached.part), Some(cached)),
                    None => Arc::new(resolve_service(ctx, id, service)),
                };
                let keep = part.diags.is_empty() && part.view_diags.iter().all(Diagnostics::is_empty);
                let cached = match (keep, text) {
                    (true, Some(text)) => Some(CachedPart { text, file, part: Arc::clone(&part) }),
                    _ => None,
                };
                (part, cached)
            })
            .collect();
        let (parts, cached): (Vec<_>, Vec<_>) = results.into_iter().unzip();
        self.parts = cached;
        self.context = context;
        parts
    }
}

/// Resolves one service; its allow entries get origin ids from 0 on, then its `rpc_allow`
/// patterns.
fn resolve_service(ctx: &Context<'_, '_>, id: usize, service: &Service) -> ServicePart {
    let Context { policy, layers, environments, env_names, .. } = *ctx;
    let mut diags = Diagnostics::default();
    let diags = &mut diags;
    // Where each allow entry, then each rpc_allow pattern, was written: indexed by origin id.
    let mut positions: Vec<Origin> = Vec::with_capacity(service.allow.len() + rpc_pattern_count(service));

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
        owner: service.owner.clone(),
    };
    let modes = resolve_modes(&service.mode, environments, env_names, diags);
    for endpoint in &service.endpoints {
        if let EnvScope::Except(_) = endpoint.env
            && !environments.iter().any(|e| endpoint.env.includes(&e.name))
        {
            diags.push(Diagnostic::warning(
                Problem::UnusedDefaultEndpoints { service: service.name.value.clone() },
                endpoint.loc,
                "in no environment",
            ));
        }
    }
    // Every environment an endpoint or an allow entry names exists.
    let scopes = service.endpoints.iter().flat_map(|e| e.env.names());
    let requires = service.requires.iter().flat_map(|r| r.env.names());
    for env in scopes
        .chain(service.allow.iter().flat_map(|a| a.env.names().iter().chain(&a.cross_environment)))
        .chain(requires)
    {
        env_names.get(env, diags);
    }

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
            *slot = positions.len() as u32;
            positions.push(origin_of(&policy.sources, entry.loc, id as ServiceId));
        }
    }

    let mut edges_per_view = Vec::with_capacity(ctx.views.len());
    let mut view_diags = Vec::with_capacity(ctx.views.len());
    let mut rules: Vec<Rules> = Vec::new();
    let mut rules_of_env = vec![0u32; environments.len()];
    // The dependencies of every environment, for the `rpc_allow` check.
    let mut all_edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
    for view in ctx.views {
        let mut view_diag = Diagnostics::default();
        let (edges, view_rules) = resolve_view(ctx, view, id, service, &origins, &mut view_diag);
        let index = match rules.iter().position(|r| *r == view_rules) {
            Some(index) => index,
            None => {
                rules.push(view_rules);
                rules.len() - 1
            }
        };
        for &env in &view.envs {
            if let Some(slot) = rules_of_env.get_mut(env) {
                *slot = index as u32;
            }
        }
        if !service.rpc_allow.is_empty() {
            for edge in edges.values() {
                all_edges.entry((edge.from, edge.to)).or_insert_with(|| edge.clone());
            }
        }
        edges_per_view.push(edges.into_values().collect());
        view_diags.push(view_diag);
    }
    let rpc_rules = resolve_rpc_rules(ctx, id, service, positions.len() as u32, &all_edges, diags);
    positions.extend(rpc_origins(&policy.sources, service, id as ServiceId));
    let ruleset = ServiceRuleset {
        name: service.name.value.clone(),
        selector: service.selector.as_ref().map(|s| s.value.clone()),
        layer: service.layer.as_ref().map(|l| l.value.clone()),
        group: service.group.as_ref().map(|g| g.value.clone()),
        owner: service.owner.clone(),
        tier: service.tier.map(|t| t.value),
        modes,
        rules,
        rules_of_env,
        rpc_rules,
    };
    ServicePart {
        node,
        edges: edges_per_view,
        origins: positions.into(),
        ruleset: ruleset.into(),
        diags: std::mem::take(diags),
        view_diags,
    }
}

/// A service's dependencies and rules in one view's environments.
fn resolve_view(
    ctx: &Context<'_, '_>,
    view: &ViewIndex,
    id: usize,
    service: &Service,
    origins: &[u32],
    diags: &mut Diagnostics,
) -> (BTreeMap<(usize, usize), Edge>, Rules) {
    let mut edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
    let mut reached = Vec::new();
    let mut net_rules = Vec::new();
    let mut host_rules = Vec::new();
    for (entry, &origin) in service.allow.iter().zip(origins) {
        if !entry.env.includes(&view.env_name) {
            continue;
        }
        // The environments the entry reaches: its own, or those it names on purpose.
        let reach: Vec<usize> = if entry.cross_environment.is_empty() {
            view.envs.first().copied().into_iter().collect()
        } else {
            entry.cross_environment.iter().filter_map(|e| ctx.env_names.index.get(e.value.as_str()).copied()).collect()
        };
        let mut add_edge = |to: usize, kind: EdgeKind| {
            let edge =
                edges.entry((id, to)).or_insert(Edge { from: id, to, critical: entry.critical, kind, loc: entry.loc });
            if entry.critical && !edge.critical {
                edge.critical = true;
                edge.loc = entry.loc;
            }
            edge.kind = edge.kind.min(kind);
        };
        let first_rule = (net_rules.len(), host_rules.len());
        match &entry.target.value {
            Target::Service(name) => {
                let Some(to) = ctx.service_names.get_at(name, entry.target.loc, diags) else {
                    continue;
                };
                add_edge(to, EdgeKind::Declared);
                let endpoints: std::borrow::Cow<'_, [EndpointRule]> = if entry.cross_environment.is_empty() {
                    ctx.own(view).rules.get(to).map_or(std::borrow::Cow::Borrowed(&[]), |r| r.as_slice().into())
                } else {
                    reach
                        .iter()
                        .filter_map(|&e| ctx.endpoints_in(e)?.rules.get(to))
                        .flat_map(|rules| rules.iter().cloned())
                        .collect()
                };
                let name = ctx.services.get(to).map_or(name.as_str(), |s| s.name.value.as_str());
                expand_service(entry, (to, name), &endpoints, origin, &mut net_rules, &mut host_rules, diags);
            }
            Target::Destination(destination) => {
                reached.clear();
                ctx.own(view).owners.reached_by(destination, entry.ports.as_deref(), entry.proto, &mut reached);
                for env in reach.iter().filter(|&e| !view.envs.contains(e)).filter_map(|&e| ctx.endpoints_in(e)) {
                    env.owners.reached_by(destination, entry.ports.as_deref(), entry.proto, &mut reached);
                }
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
        let added = net_rules
            .get(first_rule.0..)
            .unwrap_or_default()
            .iter()
            .map(|r| (Destination::Net(r.net), r.ports, r.proto))
            .chain(
                host_rules
                    .get(first_rule.1..)
                    .unwrap_or_default()
                    .iter()
                    .map(|r| (Destination::Host(r.host.clone()), r.ports, r.proto)),
            );
        check_foreign(ctx, view, service, entry, &reach, added, diags);
    }
    net_rules.sort_unstable();
    net_rules.dedup_by(|b, a| (a.net, a.proto, a.ports, a.target) == (b.net, b.proto, b.ports, b.target));
    host_rules.sort_unstable();
    host_rules.dedup_by(|b, a| (&a.host, a.proto, a.ports, a.target) == (&b.host, b.proto, b.ports, b.target));
    let endpoints = ctx.own(view).rules.get(id).cloned().unwrap_or_default();
    (edges, Rules { net_rules, host_rules, endpoints })
}

/// Environments are isolated: an error for the first endpoint of another environment that a
/// rule of `entry` reaches (one per environment), unless the entry names that environment in
/// `cross_environment`.
fn check_foreign(
    ctx: &Context<'_, '_>,
    view: &ViewIndex,
    service: &Service,
    entry: &AllowEntry,
    reach: &[usize],
    rules: impl Iterator<Item = (Destination, PortRange, Proto)>,
    diags: &mut Diagnostics,
) {
    if view.foreign.is_empty() {
        return;
    }
    let rules: Vec<_> = rules.collect();
    let mut out = Vec::new();
    for (other, foreign) in view.foreign.iter().filter(|(other, _)| !reach.contains(other)) {
        let hit = rules.iter().find_map(|(destination, ports, proto)| {
            out.clear();
            foreign.owners.reached_by(destination, Some(std::slice::from_ref(ports)), Some(*proto), &mut out);
            let target = out.iter().copied().min()? as usize;
            // The endpoint of `target` it reaches, for the note.
            let rules = foreign.rules.get(target)?;
            let at = rules.iter().position(|rule| {
                let mut one = Vec::new();
                Owners::new([std::slice::from_ref(rule)]).reached_by(
                    destination,
                    Some(std::slice::from_ref(ports)),
                    Some(*proto),
                    &mut one,
                );
                !one.is_empty()
            })?;
            Some((target, destination.clone(), foreign.locs.get(target)?.get(at).copied()?))
        });
        let Some((target, destination, endpoint_loc)) = hit else { continue };
        let target_name = ctx.services.get(target).map_or("?", |s| s.name.value.as_str());
        let other_name = ctx.environments.get(*other).map_or("?", |e| e.name.as_str());
        diags.push(
            Diagnostic::error(
                Problem::CrossEnvironment {
                    service: service.name.value.clone(),
                    env: view.env_name.clone(),
                    target: target_name.to_owned(),
                    other: other_name.to_owned(),
                    destination: destination.to_string(),
                },
                entry.loc,
                format!("reaches `{other_name}`"),
            )
            .with_note(endpoint_loc, format!("`{target_name}`'s endpoint in `{other_name}`")),
        );
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

/// A declared endpoint, one rule per port range.
fn endpoint_rules(endpoint: &crate::policy::Endpoint) -> impl Iterator<Item = EndpointRule> + '_ {
    let ports: &[PortRange] = if endpoint.ports.is_empty() { &[PortRange::ANY] } else { &endpoint.ports };
    ports.iter().map(|&ports| EndpointRule {
        destination: endpoint.destination.value.clone(),
        proto: endpoint.proto,
        ports,
    })
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

/// Rules for an allow entry that names a service: the service's endpoints (in the
/// environment judged), narrowed by the entry's ports and protocol.
fn expand_service(
    entry: &AllowEntry,
    (target_id, target_name): (usize, &str),
    endpoints: &[EndpointRule],
    origin: u32,
    net_rules: &mut Vec<NetRule>,
    host_rules: &mut Vec<HostRule>,
    diags: &mut Diagnostics,
) {
    if endpoints.is_empty() {
        diags.push(Diagnostic::warning(
            Problem::NoEndpoints { service: target_name.to_owned() },
            entry.target.loc,
            "permits nothing",
        ));
        return;
    }
    let before = net_rules.len() + host_rules.len();
    for endpoint in endpoints {
        let Some(proto) = entry.proto.unwrap_or(Proto::Any).intersect(endpoint.proto) else { continue };
        let narrowed: Vec<PortRange>;
        let ports = match &entry.ports {
            None => std::slice::from_ref(&endpoint.ports),
            Some(wanted) => {
                narrowed = wanted.iter().filter_map(|w| w.intersect(endpoint.ports)).collect();
                &narrowed
            }
        };
        let target = Some(target_id as ServiceId);
        push_rules(&endpoint.destination, ports, proto, origin, target, net_rules, host_rules);
    }
    if net_rules.len() + host_rules.len() == before {
        diags.push(Diagnostic::error(
            Problem::EmptyNarrowing { service: target_name.to_owned() },
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
