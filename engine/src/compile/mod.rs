//! Policy → [`Snapshot`]: name resolution, rule expansion, dependency-graph checks.
//!
//! The pipeline is load → analyze → freeze, and [`compile_path`] (a policy file or directory)
//! and [`compile_sources`] (texts) run all of it: every caller that needs a compiled policy
//! (the CLI, the agent, the policy rewriter of `promote`) goes through them. [`check_path`] and
//! [`check_sources`] stop after the analysis, which always runs to the end and collects every
//! problem, so `check` reports warnings and `graph` can draw a broken policy with its violations
//! highlighted; [`Checked::freeze`] then makes a snapshot only when there is no error.

mod resolve;

use std::collections::{BTreeMap, BTreeSet};

use std::path::Path;

use crate::diag::{Diagnostic, Diagnostics, Loc, Sources};
use crate::graph;
use crate::policy::{LoadError, ParseCache, Parsed, PolicySet, Requirement, load, parse_sources};
use crate::problem::{Problem, closest};
use crate::snapshot::{Keep, SNAPSHOT_FORMAT, Snapshot, SnapshotContent, SnapshotError};

/// A service as the graph sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Service name.
    pub name: String,
    /// Index into [`Analysis::layers`].
    pub layer: Option<usize>,
    /// Isolation group.
    pub group: Option<String>,
    /// Criticality tier.
    pub tier: Option<u8>,
    /// Owning team.
    pub owner: Option<String>,
}

/// Why an edge exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    /// An allow entry names the service.
    Declared,
    /// An allowed address, block or host overlaps the service's endpoints.
    Inferred,
}

/// A dependency: `from` may contact `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// Dependent service (node index).
    pub from: usize,
    /// Dependency (node index).
    pub to: usize,
    /// False when every allow entry behind it is `critical = false`.
    pub critical: bool,
    /// Declared when any entry behind it names the service.
    pub kind: EdgeKind,
    /// The first allow entry behind it (a critical one when there is one).
    pub loc: Loc,
}

/// What a graph check found wrong, for highlighting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A critical edge to a higher layer (edge index).
    Layer(usize),
    /// A path between isolated groups (node sequence).
    Isolation(Vec<usize>),
    /// An undeclared cycle (node sequence, first = last).
    Cycle(Vec<usize>),
}

/// A strongly connected component of the critical-dependency graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Member nodes, ascending.
    pub members: Vec<usize>,
    /// True for a cycle declared in `[[intrinsic_cycles]]`: one supernode in the bootstrap.
    pub intrinsic: bool,
}

/// One step of the bootstrap order: components that can start together once earlier stages run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Layer index (the highest layer among what it depends on, for services without a layer).
    pub layer: Option<usize>,
    /// Components (indices into [`Graph::components`]) in this stage.
    pub components: Vec<usize>,
}

/// The dependency graph of one or more environments (those with the same dependencies), and
/// what the graph checks found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// The environments it is the graph of, by name.
    pub environments: Vec<String>,
    /// Dependencies, sorted by (from, to), one per pair.
    pub edges: Vec<Edge>,
    /// Components of the critical graph, dependencies first.
    pub components: Vec<Component>,
    /// Graph-check findings.
    pub violations: Vec<Violation>,
    /// Bootstrap order; empty when the critical graph has an undeclared cycle.
    pub stages: Vec<Stage>,
}

/// A `requires` entry and the service that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRequirement {
    /// The service that needs the versions (the consumer).
    pub consumer: String,
    /// The entry.
    pub requirement: Requirement,
}

/// Everything the compiler learned about a policy.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Layer names, bottom to top.
    pub layers: Vec<String>,
    /// Services, sorted by name; indices are node ids.
    pub nodes: Vec<Node>,
    /// Environment names, sorted (the snapshot's order).
    pub environments: Vec<String>,
    /// The graphs: one for every environment when their dependencies are the same (always, in
    /// a policy without environment-scoped entries), else one per group of environments with
    /// the same dependencies.
    pub graphs: Vec<Graph>,
    /// Per environment, the index of its graph in `graphs`.
    graph_of_env: Vec<usize>,
    /// Every problem found.
    pub diagnostics: Diagnostics,
    /// The `requires` entries whose target is a known service, sorted by consumer (in the
    /// order written): what `check-deploy` checks. The snapshot does not hold them.
    pub requirements: Vec<VersionRequirement>,
    content: SnapshotContent,
    debug: crate::snapshot::DebugInfo,
    owners: Vec<std::sync::Arc<crate::snapshot::Owners>>,
    /// Whether the freeze keeps the services' encodings (for the next incremental compile).
    keep: Keep,
}

impl Analysis {
    /// Node index of a service.
    pub fn node(&self, name: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.name.as_str().cmp(name)).ok()
    }

    /// Name of a node.
    pub fn name(&self, node: usize) -> &str {
        name(&self.nodes, node)
    }

    /// `a -> b -> c` for a node path.
    pub fn path_text(&self, path: &[usize]) -> String {
        path_text(&self.nodes, path)
    }

    /// Index of an environment by name.
    pub fn environment_index(&self, name: &str) -> Option<usize> {
        self.environments.iter().position(|e| e == name)
    }

    /// The snapshot the policy's rules make, valid or not: for comparing policies
    /// ([`crate::diff`]). Only [`Analysis::freeze`] makes the snapshot of a policy to enforce.
    pub fn snapshot(&self) -> Result<Snapshot, SnapshotError> {
        let content = SnapshotContent { format: SNAPSHOT_FORMAT, ..self.content.clone() };
        Snapshot::with_owners(content, self.debug.clone(), self.owners.clone(), Keep::Nothing)
    }

    /// The graph of environment `env` (an index into `environments`).
    pub fn graph(&self, env: usize) -> Option<&Graph> {
        self.graph_of_env.get(env).and_then(|&g| self.graphs.get(g))
    }
}

fn name(nodes: &[Node], node: usize) -> &str {
    nodes.get(node).map_or("?", |n| n.name.as_str())
}

fn path_text(nodes: &[Node], path: &[usize]) -> String {
    path.iter().map(|&n| format!("`{}`", name(nodes, n))).collect::<Vec<_>>().join(" -> ")
}

/// A successful compile: the snapshot, the analysis behind it (with any warnings) and the
/// sources the warnings point into.
#[derive(Debug)]
pub struct Compiled {
    /// The frozen policy.
    pub snapshot: Snapshot,
    /// The analysis behind it.
    pub analysis: Analysis,
    /// The policy's files.
    pub sources: Sources,
}

impl Compiled {
    /// The warnings, one `file:line:col: …` line each.
    pub fn warning_lines(&self) -> Vec<String> {
        self.analysis.diagnostics.warnings().map(|d| d.to_plain(&self.sources)).collect()
    }
}

/// Compiling failed; nothing was frozen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// The policy could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The policy is invalid: every error (and warning), with the sources they point into.
    #[error("the policy has {} error(s)", diagnostics.errors().count())]
    Invalid {
        /// The policy's files.
        sources: Sources,
        /// Every problem found.
        diagnostics: Diagnostics,
    },
    /// The snapshot could not be encoded.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl CompileError {
    /// Why, one line each: the errors and warnings as `file:line:col: …`, or the one message.
    pub fn lines(&self) -> Vec<String> {
        match self {
            CompileError::Invalid { sources, diagnostics } => diagnostics.iter().map(|d| d.to_plain(sources)).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// A policy read and analyzed, as far as its syntax allowed.
#[derive(Debug)]
pub struct Checked {
    /// What was read: the policy with its sources, and the parse diagnostics.
    pub parsed: Parsed,
    /// The analysis; None when a file is not valid TOML (`parsed.diagnostics` say where).
    pub analysis: Option<Analysis>,
}

impl Checked {
    /// The policy's files.
    pub fn sources(&self) -> &Sources {
        &self.parsed.policy.sources
    }

    /// Every problem found, in source order: the analysis's (which include the parse's), or
    /// the syntax errors that stopped it.
    pub fn diagnostics(&self) -> &Diagnostics {
        self.analysis.as_ref().map_or(&self.parsed.diagnostics, |a| &a.diagnostics)
    }

    /// Freezes a policy without errors into a snapshot; otherwise returns every problem.
    pub fn freeze(self) -> Result<Compiled, CompileError> {
        let sources = self.parsed.policy.sources;
        match self.analysis {
            Some(analysis) => analysis.freeze(sources),
            None => Err(CompileError::Invalid { sources, diagnostics: self.parsed.diagnostics }),
        }
    }
}

/// Reads and analyzes the policy at `path` (a file, or a directory of `*.toml` files).
pub fn check_path(path: &Path) -> Result<Checked, LoadError> {
    Ok(check_parsed(load(path)?))
}

/// Analyzes named texts as the files of one policy.
pub fn check_sources(files: impl IntoIterator<Item = (String, String)>) -> Checked {
    check_parsed(parse_sources(files))
}

fn check_parsed(parsed: Parsed) -> Checked {
    let analysis = analyze_parsed(&parsed, None);
    Checked { parsed, analysis }
}

/// The compile entry point: the policy at `path` (a file, or a directory of `*.toml` files)
/// compiled, or every reason it was not.
pub fn compile_path(path: &Path) -> Result<Compiled, CompileError> {
    check_path(path)?.freeze()
}

/// [`compile_path`] for named texts (a policy held in memory, or files being edited).
pub fn compile_sources(files: impl IntoIterator<Item = (String, String)>) -> Result<Compiled, CompileError> {
    check_sources(files).freeze()
}

/// The compile entry point for a policy compiled again and again as its files change (the
/// agent's reloads): [`compile_path`] with a [`ParseCache`], so a compile after a one-file edit
/// re-parses that file only (and reads only the files whose stamps changed, see
/// [`ParseCache::load`]), and with the services resolved last time, so only the services of
/// the edited files are resolved again while no name, endpoint, layer or environment changed
/// (`resolve::ResolveCache`); the graph checks are skipped when the graph is the same as last
/// time and they found nothing ([`GraphCache`]), and the freeze hashes the kept encodings of
/// unchanged services. The result is the same, to the byte, as [`compile_path`]'s: the same
/// snapshot (bytes and hash) and the same diagnostics (BENCHMARKS.md, "Incremental compile",
/// measures each part).
#[derive(Debug, Default)]
pub struct IncrementalCompiler {
    cache: ParseCache,
    analysis: AnalysisCache,
}

/// What an [`IncrementalCompiler`] keeps of its last analysis.
#[derive(Debug, Default)]
struct AnalysisCache {
    resolved: resolve::ResolveCache,
    graphs: GraphCache,
}

/// The graph checks of the last analysis, for the graphs where they found nothing, reused when
/// a graph is the same by value. What the checks compute (components, bootstrap stages) depends
/// only on what [`GraphKey`] holds; only a finding points at a source position, and a graph
/// with a finding is checked again.
#[derive(Debug, Default)]
struct GraphCache {
    clean: Vec<(GraphKey, Vec<Component>, Vec<Stage>)>,
}

/// Everything the graph checks read, positions left out (compared by [`GraphKey::matches`]).
#[derive(Debug)]
struct GraphKey {
    nodes: Vec<Node>,
    /// (from, to, critical) of every edge, in order.
    edges: Vec<(usize, usize, bool)>,
    layers: Vec<String>,
    isolated: Vec<Vec<String>>,
    intrinsic: Vec<BTreeSet<usize>>,
}

/// What the graph checks read besides the graph.
struct GraphInputs<'a> {
    policy: &'a PolicySet,
    intrinsic: &'a [(BTreeSet<usize>, Loc)],
    layers: &'a [String],
    nodes: &'a [Node],
}

impl GraphKey {
    fn of(inputs: &GraphInputs<'_>, edges: &[Edge]) -> Self {
        GraphKey {
            nodes: inputs.nodes.to_vec(),
            edges: edges.iter().map(|e| (e.from, e.to, e.critical)).collect(),
            layers: inputs.layers.to_vec(),
            isolated: inputs
                .policy
                .isolated
                .iter()
                .map(|set| set.groups.iter().map(|g| g.value.clone()).collect())
                .collect(),
            intrinsic: inputs.intrinsic.iter().map(|(set, _)| set.clone()).collect(),
        }
    }

    /// Whether this is the key [`GraphKey::of`] would make of `inputs` and `edges`, without
    /// making it (an edit that leaves the graph as it was costs no copy of it).
    fn matches(&self, inputs: &GraphInputs<'_>, edges: &[Edge]) -> bool {
        let isolated = &inputs.policy.isolated;
        self.nodes == inputs.nodes
            && self.edges.len() == edges.len()
            && self.edges.iter().zip(edges).all(|(&key, e)| key == (e.from, e.to, e.critical))
            && self.layers == inputs.layers
            && self.isolated.len() == isolated.len()
            && self.isolated.iter().zip(isolated).all(|(key, set)| {
                key.len() == set.groups.len() && key.iter().zip(&set.groups).all(|(k, g)| *k == g.value)
            })
            && self.intrinsic.len() == inputs.intrinsic.len()
            && self.intrinsic.iter().zip(inputs.intrinsic).all(|(key, (set, _))| key == set)
    }
}

impl GraphCache {
    /// Runs the graph checks on `graph`, or takes their results from the last analysis when
    /// the graph is the same and they found nothing then (each result is taken once); `kept`
    /// collects this analysis's clean results (what the next one may reuse).
    fn check(
        &mut self,
        kept: &mut Vec<(GraphKey, Vec<Component>, Vec<Stage>)>,
        inputs: &GraphInputs<'_>,
        graph: &mut Graph,
        diags: &mut Diagnostics,
    ) {
        if let Some(index) = self.clean.iter().position(|(key, _, _)| key.matches(inputs, &graph.edges)) {
            let (key, components, stages) = self.clean.swap_remove(index);
            graph.components = components.clone();
            graph.stages = stages.clone();
            kept.push((key, components, stages));
            return;
        }
        let key = GraphKey::of(inputs, &graph.edges);
        check_graph(inputs.policy, inputs.intrinsic, inputs.layers, inputs.nodes, graph, diags);
        if diags.is_empty() && graph.violations.is_empty() {
            kept.push((key, graph.components.clone(), graph.stages.clone()));
        }
    }
}

impl IncrementalCompiler {
    /// A compiler with an empty cache: its first compile parses every file.
    pub fn new() -> Self {
        IncrementalCompiler::default()
    }

    /// [`compile_path`], re-parsing only the files that changed since the last call.
    pub fn compile_path(&mut self, path: &Path) -> Result<Compiled, CompileError> {
        freeze_parsed(self.cache.load(path)?, Some(&mut self.analysis))
    }

    /// [`compile_sources`], re-parsing only the files that changed since the last call.
    pub fn compile_sources(
        &mut self,
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Compiled, CompileError> {
        freeze_parsed(self.cache.parse_sources(files), Some(&mut self.analysis))
    }

    /// How many files the last compile parsed anew.
    pub fn reparsed(&self) -> usize {
        self.cache.reparsed()
    }

    /// Makes the next compile read every file: [`ParseCache::forget_stamps`].
    pub fn forget_stamps(&mut self) {
        self.cache.forget_stamps();
    }

    /// How many files the last [`IncrementalCompiler::compile_path`] did not even read (their
    /// stamps were those of the cached texts).
    pub fn unread(&self) -> usize {
        self.cache.unread()
    }
}

/// Analyzes and freezes a parsed policy that stays where it is (in a [`ParseCache`]).
fn freeze_parsed(parsed: &Parsed, cache: Option<&mut AnalysisCache>) -> Result<Compiled, CompileError> {
    let sources = parsed.policy.sources.clone();
    match analyze_parsed(parsed, cache) {
        Some(analysis) => analysis.freeze(sources),
        None => Err(CompileError::Invalid { sources, diagnostics: parsed.diagnostics.clone() }),
    }
}

/// Analyzes a parsed policy: resolves names, expands rules, runs every graph check in each
/// environment.
pub fn analyze(policy: &PolicySet) -> Analysis {
    analyze_with(policy, None)
}

/// [`analyze`], reusing what the last analysis of the same policy kept in `cache` where
/// nothing it was made from changed: resolved services ([`resolve::ResolveCache`]) and clean
/// graph checks ([`GraphCache`]).
fn analyze_with(policy: &PolicySet, mut cache: Option<&mut AnalysisCache>) -> Analysis {
    let keep = if cache.is_some() { Keep::Encodings } else { Keep::Nothing };
    let mut diagnostics = Diagnostics::default();
    let resolved = resolve::resolve(policy, &mut diagnostics, cache.as_deref_mut().map(|c| &mut c.resolved));
    let mut clean_graphs = Vec::new();
    let mut content = resolved.content;
    let environments: Vec<String> = content.environments.iter().map(|e| e.name.clone()).collect();
    let layers: Vec<String> = policy.layers.iter().map(|l| l.value.clone()).collect();
    let nodes = resolved.nodes;

    // Environments with the same dependencies share one graph (and one run of the checks).
    let mut graphs: Vec<Graph> = Vec::new();
    let mut graph_of_env = vec![0usize; environments.len()];
    // What each graph's checks found (with the environments that share the graph), and what
    // resolving each view found.
    let mut graph_found: Vec<(Vec<usize>, Diagnostics)> = Vec::new();
    let mut found: Vec<(Vec<usize>, Diagnostics)> = Vec::new();
    for view in resolved.views {
        let names = view.envs.iter().filter_map(|&e| environments.get(e).cloned());
        let index = match graphs.iter().position(|g| g.edges == view.edges) {
            Some(index) => {
                if let Some(graph) = graphs.get_mut(index) {
                    graph.environments.extend(names);
                }
                index
            }
            None => {
                let mut graph = Graph {
                    environments: names.collect(),
                    edges: view.edges,
                    components: Vec::new(),
                    violations: Vec::new(),
                    stages: Vec::new(),
                };
                let mut graph_diags = Diagnostics::default();
                match cache.as_deref_mut() {
                    Some(cache) => {
                        let inputs =
                            GraphInputs { policy, intrinsic: &resolved.intrinsic, layers: &layers, nodes: &nodes };
                        cache.graphs.check(&mut clean_graphs, &inputs, &mut graph, &mut graph_diags);
                    }
                    None => check_graph(policy, &resolved.intrinsic, &layers, &nodes, &mut graph, &mut graph_diags),
                }
                graphs.push(graph);
                graph_found.push((Vec::new(), graph_diags));
                graphs.len() - 1
            }
        };
        for &env in &view.envs {
            if let Some(slot) = graph_of_env.get_mut(env) {
                *slot = index;
            }
        }
        if let Some((envs, _)) = graph_found.get_mut(index) {
            envs.extend(view.envs.iter().copied());
        }
        found.push((view.envs, view.diags));
    }
    if let Some(cache) = cache {
        cache.graphs.clean = clean_graphs;
    }
    found.extend(graph_found);
    diagnostics.extend(merge_by_environment(found, &environments));
    let requirements = check_requirements(policy, &nodes, &graphs, &graph_of_env, &environments, &mut diagnostics);
    content.bootstrap =
        graph_of_env.iter().map(|&g| graphs.get(g).map(bootstrap_content).unwrap_or_default()).collect();
    diagnostics.sort();
    Analysis {
        layers,
        nodes,
        environments,
        graphs,
        graph_of_env,
        diagnostics,
        requirements,
        content,
        debug: resolved.debug,
        owners: resolved.owners,
        keep,
    }
}

/// The `requires` entries whose target exists; an unknown target is an error (with a "did you
/// mean"), and a target no allow rule of the consumer reaches (declared or inferred, in an
/// environment where the requirement holds) a warning.
fn check_requirements(
    policy: &PolicySet,
    nodes: &[Node],
    graphs: &[Graph],
    graph_of_env: &[usize],
    environments: &[String],
    diags: &mut Diagnostics,
) -> Vec<VersionRequirement> {
    let node = |name: &str| nodes.binary_search_by(|n| n.name.as_str().cmp(name)).ok();
    let mut services: Vec<&crate::policy::Service> = policy.services.iter().collect();
    services.sort_by(|a, b| a.name.value.cmp(&b.name.value));
    let mut kept = Vec::new();
    for service in services {
        let consumer = node(&service.name.value);
        for requirement in &service.requires {
            let target_name = &requirement.service.value;
            let Some(target) = node(target_name) else {
                let suggestion = closest(target_name, nodes.iter().map(|n| n.name.as_str()));
                diags.push(Diagnostic::error(
                    Problem::Unknown { kind: "service", name: target_name.clone(), suggestion },
                    requirement.service.loc,
                    "no such service",
                ));
                continue;
            };
            let unreached: Vec<String> = environments
                .iter()
                .enumerate()
                .filter(|(_, env)| requirement.env.includes(env))
                .filter(|&(e, _)| {
                    let graph = graph_of_env.get(e).and_then(|&g| graphs.get(g));
                    !graph.is_some_and(|g| g.edges.iter().any(|edge| Some(edge.from) == consumer && edge.to == target))
                })
                .map(|(_, env)| env.clone())
                .collect();
            if !unreached.is_empty() {
                let warning = Diagnostic::warning(
                    Problem::RequirementWithoutAllow {
                        service: service.name.value.clone(),
                        target: target_name.clone(),
                    },
                    requirement.service.loc,
                    "not allowed",
                );
                let in_all = environments.iter().filter(|env| requirement.env.includes(env)).count() == unreached.len()
                    && requirement.env == crate::policy::EnvScope::All;
                diags.push(if in_all { warning } else { warning.in_environments(unreached) });
            }
            kept.push(VersionRequirement { consumer: service.name.value.clone(), requirement: requirement.clone() });
        }
    }
    kept
}

/// The bootstrap order of a graph as the snapshot keeps it: service ids per group per stage.
fn bootstrap_content(graph: &Graph) -> Vec<Vec<Vec<u32>>> {
    graph
        .stages
        .iter()
        .map(|s| {
            s.components
                .iter()
                .filter_map(|&c| graph.components.get(c))
                .map(|c| c.members.iter().map(|&m| m as u32).collect())
                .collect()
        })
        .collect()
}

/// One list of the problems found per environment: a problem found in several environments is
/// reported once, naming them, and without names when it holds in every environment.
fn merge_by_environment(found: Vec<(Vec<usize>, Diagnostics)>, environments: &[String]) -> Diagnostics {
    let mut merged: Vec<(String, Diagnostic, BTreeSet<usize>)> = Vec::new();
    for (envs, diags) in found {
        for diag in diags {
            let key = format!("{:?}|{:?}|{:?}|{:?}", diag.severity(), diag.problem(), diag.primary(), diag.secondary());
            match merged.iter_mut().find(|(k, _, _)| *k == key) {
                Some((_, _, seen)) => seen.extend(envs.iter().copied()),
                None => merged.push((key, diag, envs.iter().copied().collect())),
            }
        }
    }
    let mut out = Diagnostics::default();
    for (_, diag, envs) in merged {
        if envs.len() >= environments.len() {
            out.push(diag);
        } else {
            out.push(diag.in_environments(envs.iter().filter_map(|&e| environments.get(e).cloned()).collect()));
        }
    }
    out
}

/// Analyzes what [`crate::policy::load`] or [`crate::policy::parse_sources`] read. Returns None
/// when a file is not valid TOML (the syntax errors are in `parsed.diagnostics`); otherwise the
/// analysis's diagnostics hold the parse diagnostics too, in source order.
fn analyze_parsed(parsed: &Parsed, cache: Option<&mut AnalysisCache>) -> Option<Analysis> {
    if !parsed.syntax_ok {
        return None;
    }
    let mut analysis = analyze_with(&parsed.policy, cache);
    let mut all = parsed.diagnostics.clone();
    all.extend(std::mem::take(&mut analysis.diagnostics));
    all.sort();
    analysis.diagnostics = all;
    Some(analysis)
}

impl Analysis {
    /// Freezes a policy without errors into a snapshot; otherwise returns every error (and
    /// warning). `sources` are the policy's files, which the diagnostics point into.
    pub fn freeze(mut self, sources: Sources) -> Result<Compiled, CompileError> {
        if self.diagnostics.has_errors() {
            return Err(CompileError::Invalid { sources, diagnostics: self.diagnostics });
        }
        // The rules move into the snapshot (nothing reads them from the analysis afterwards):
        // copying them would cost time and memory in proportion to the policy.
        let empty =
            SnapshotContent { format: 0, environments: Vec::new(), services: Vec::new(), bootstrap: Vec::new() };
        let mut content = std::mem::replace(&mut self.content, empty);
        content.format = SNAPSHOT_FORMAT;
        let snapshot = Snapshot::with_owners(
            content,
            std::mem::take(&mut self.debug),
            std::mem::take(&mut self.owners),
            self.keep,
        )?;
        Ok(Compiled { snapshot, analysis: self, sources })
    }
}

/// Compiles a parsed policy into a snapshot, or returns every error (and warning).
pub fn compile(policy: &PolicySet) -> Result<Compiled, CompileError> {
    analyze(policy).freeze(policy.sources.clone())
}

/// Compiles one policy text (tests, fuzzing, embedding). On failure returns the sources with
/// the diagnostics, so they can be rendered.
pub fn compile_str(name: &str, text: &str) -> Result<Compiled, (Sources, Diagnostics)> {
    compile_sources([(name.to_owned(), text.to_owned())]).map_err(|error| match error {
        CompileError::Invalid { sources, diagnostics } => (sources, diagnostics),
        other => {
            let mut diagnostics = Diagnostics::default();
            diagnostics.push(Diagnostic::error(Problem::Syntax { message: other.to_string() }, Loc::default(), ""));
            (Sources::default(), diagnostics)
        }
    })
}

/// Adjacency lists of the edges accepted by `keep`, successors ascending.
fn adjacency(n: usize, edges: &[Edge], keep: impl Fn(&Edge) -> bool) -> Vec<Vec<usize>> {
    let mut adj = vec![Vec::new(); n];
    for edge in edges.iter().filter(|e| keep(e)) {
        if let Some(list) = adj.get_mut(edge.from) {
            list.push(edge.to);
        }
    }
    adj
}

fn edge_loc(edges: &[Edge], from: usize, to: usize) -> Option<Loc> {
    edges.binary_search_by(|e| (e.from, e.to).cmp(&(from, to))).ok().and_then(|i| edges.get(i)).map(|e| e.loc)
}

/// A diagnostic at the first edge of `path`, with a note at every further edge.
fn path_diagnostic(problem: Problem, nodes: &[Node], edges: &[Edge], path: &[usize]) -> Diagnostic {
    let mut locs = path.windows(2).filter_map(|w| match w {
        [a, b] => edge_loc(edges, *a, *b).map(|loc| (loc, *a, *b)),
        _ => None,
    });
    let Some((first, a, b)) = locs.next() else {
        return Diagnostic::error(problem, Loc::default(), "");
    };
    let mut diag = Diagnostic::error(problem, first, format!("`{}` -> `{}`", name(nodes, a), name(nodes, b)));
    for (loc, a, b) in locs {
        diag = diag.with_note(loc, format!("`{}` -> `{}`", name(nodes, a), name(nodes, b)));
    }
    diag
}

/// Runs the graph checks (cycles, layers, criticality, isolation) on one graph and orders its
/// bootstrap.
fn check_graph(
    policy: &PolicySet,
    intrinsic: &[(BTreeSet<usize>, Loc)],
    layers: &[String],
    nodes: &[Node],
    analysis: &mut Graph,
    diags: &mut Diagnostics,
) {
    let n = nodes.len();
    let critical = adjacency(n, &analysis.edges, |e| e.critical && e.from != e.to);
    let all = adjacency(n, &analysis.edges, |_| true);

    // Cycles over critical dependencies; declared intrinsic cycles become supernodes.
    let components = graph::strongly_connected_components(&critical);
    let mut has_cycle = false;
    for members in &components {
        if members.len() < 2 {
            analysis.components.push(Component { members: members.clone(), intrinsic: false });
            continue;
        }
        let set: BTreeSet<usize> = members.iter().copied().collect();
        let accepted = intrinsic.iter().any(|(declared, _)| set.is_subset(declared));
        if !accepted {
            has_cycle = true;
            if let Some(path) = undeclared_cycle(&critical, members, intrinsic) {
                let problem = Problem::Cycle { path: path_text(nodes, &path) };
                diags.push(path_diagnostic(problem, nodes, &analysis.edges, &path));
                analysis.violations.push(Violation::Cycle(path));
            }
        }
        analysis.components.push(Component { members: members.clone(), intrinsic: accepted });
    }
    for (declared, loc) in intrinsic {
        let forms_cycle = analysis
            .components
            .iter()
            .any(|c| c.members.len() > 1 && declared.iter().all(|d| c.members.binary_search(d).is_ok()));
        if !forms_cycle {
            let services = declared.iter().map(|&d| format!("`{}`", name(nodes, d))).collect::<Vec<_>>().join(", ");
            diags.push(Diagnostic::warning(Problem::StaleIntrinsicCycle { services }, *loc, "declared here"));
        }
    }

    // Layers: a critical dependency may point only to the same layer or a lower one.
    for (index, edge) in analysis.edges.iter().enumerate() {
        let (Some(from), Some(to)) = (nodes.get(edge.from), nodes.get(edge.to)) else { continue };
        if let (Some(fl), Some(tl)) = (from.layer, to.layer)
            && edge.critical
            && tl > fl
        {
            let layer = |i: usize| layers.get(i).cloned().unwrap_or_default();
            diags.push(Diagnostic::error(
                Problem::LayerViolation {
                    from: from.name.clone(),
                    from_layer: layer(fl),
                    to: to.name.clone(),
                    to_layer: layer(tl),
                },
                edge.loc,
                "dependency on a higher layer",
            ));
            analysis.violations.push(Violation::Layer(index));
        }
        if let (Some(ft), Some(tt)) = (from.tier, to.tier)
            && edge.critical
            && edge.from != edge.to
            && tt > ft
        {
            diags.push(Diagnostic::warning(
                Problem::CriticalityInversion {
                    from: from.name.clone(),
                    from_tier: ft,
                    to: to.name.clone(),
                    to_tier: tt,
                },
                edge.loc,
                "critical dependency on a less critical service",
            ));
        }
    }

    // Isolation: no path of any dependencies from one isolated group to another.
    let mut group_members: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        if let Some(group) = &node.group {
            group_members.entry(group.as_str()).or_default().push(i);
        }
    }
    for set in &policy.isolated {
        for a in &set.groups {
            for b in set.groups.iter().filter(|b| b.value != a.value) {
                let (Some(sources), Some(targets)) =
                    (group_members.get(a.value.as_str()), group_members.get(b.value.as_str()))
                else {
                    continue;
                };
                if let Some(path) = graph::shortest_path(&all, sources, targets) {
                    let problem = Problem::IsolationViolation {
                        from_group: a.value.clone(),
                        to_group: b.value.clone(),
                        path: path_text(nodes, &path),
                    };
                    let diag = path_diagnostic(problem, nodes, &analysis.edges, &path);
                    diags.push(diag.with_note(set.loc, "isolation declared here"));
                    analysis.violations.push(Violation::Isolation(path));
                }
            }
        }
    }

    if !has_cycle {
        analysis.stages = bootstrap_stages(nodes, analysis, &critical);
    }
}

/// A cycle in the strongly connected component `members` to report: one that is not inside a
/// single declared intrinsic cycle (when a declared pair is part of a bigger component, the
/// accepted pair itself is not the problem). Tries members outside every declaration first, so
/// usually one search suffices; gives up after a few searches (bounding the cost on huge
/// components) and then reports the first cycle found.
fn undeclared_cycle(
    critical: &[Vec<usize>],
    members: &[usize],
    intrinsic: &[(BTreeSet<usize>, Loc)],
) -> Option<Vec<usize>> {
    let declared = |m: &usize| intrinsic.iter().any(|(set, _)| set.contains(m));
    let starts = members.iter().filter(|m| !declared(m)).chain(members.iter().filter(|m| declared(m)));
    let mut first = None;
    for &start in starts.take(16) {
        let Some(path) = graph::cycle_through(critical, members, start) else { continue };
        if !intrinsic.iter().any(|(set, _)| path.iter().all(|n| set.contains(n))) {
            return Some(path);
        }
        first.get_or_insert(path);
    }
    first
}

/// Orders components into stages by (effective layer, level). A service's effective layer is
/// its own, raised to the highest effective layer of what it depends on (which only matters for
/// services without a layer, or in a policy that already has layer errors); levels count the
/// longest chain of dependencies below a component. Sorting by both is a valid start order.
fn bootstrap_stages(nodes: &[Node], analysis: &Graph, critical: &[Vec<usize>]) -> Vec<Stage> {
    let comps: Vec<Vec<usize>> = analysis.components.iter().map(|c| c.members.clone()).collect();
    let levels = graph::condensation_levels(critical, &comps);
    let comp_of = graph::component_index(nodes.len(), &comps);
    // Components come dependencies first, so one pass settles effective layers.
    let mut effective: Vec<Option<usize>> = Vec::with_capacity(comps.len());
    for members in &comps {
        let own = members.iter().filter_map(|&m| nodes.get(m).and_then(|n| n.layer)).max();
        let below = members
            .iter()
            .flat_map(|&m| critical.get(m).into_iter().flatten())
            .filter_map(|&dep| comp_of.get(dep))
            .filter_map(|&c| effective.get(c).copied().flatten())
            .max();
        effective.push(own.max(below));
    }
    let mut order: BTreeMap<(Option<usize>, usize), Vec<usize>> = BTreeMap::new();
    for (c, level) in levels.iter().enumerate() {
        order.entry((effective.get(c).copied().flatten(), *level)).or_default().push(c);
    }
    order.into_iter().map(|((layer, _), components)| Stage { layer, components }).collect()
}
