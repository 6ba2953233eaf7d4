//! Who depends on a service: the services with an edge to it in an environment's dependency
//! graph (allow entries naming it, and inferred edges, as the analysis builds them), directly or
//! through others, most critical first. `policyctl dependents` prints it; the SQLite export's
//! `service_edges` table answers the same question in SQL.
//!
//! For each dependent the answer gives one path to the service: the shortest path on which every
//! edge is critical when there is one (the dependent cannot work without the service), else the
//! shortest path. Its distance is the number of edges of that path.

use serde::Serialize;

use crate::compile::{Analysis, Graph};
use crate::graph;
use crate::problem::closest;

/// One service that depends on the asked one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dependent {
    /// The dependent service.
    pub service: String,
    /// Its owning team.
    pub owner: Option<String>,
    /// Its criticality tier (1 = most critical).
    pub tier: Option<u8>,
    /// Its layer.
    pub layer: Option<String>,
    /// Edges on `path`: 1 for a direct dependent.
    pub distance: usize,
    /// True when every edge on `path` is critical: the dependent breaks when the service does.
    pub critical: bool,
    /// The dependent first, the asked service last.
    pub path: Vec<String>,
}

/// The dependents of one service in one dependency graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dependents {
    /// The service asked about.
    pub service: String,
    /// The environments whose graph was walked.
    pub environments: Vec<String>,
    /// True when dependents through others are included.
    pub transitive: bool,
    /// Most critical first: tier 1 first and services without a tier last, then critical paths
    /// before non-critical ones, then distance, then name.
    pub dependents: Vec<Dependent>,
}

/// Why the dependents could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DependentsError {
    /// The policy has no such service.
    #[error("unknown service `{name}`{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownService {
        /// The name asked for.
        name: String,
        /// The closest service name, if one is close.
        suggestion: Option<String>,
    },
}

/// The services that depend on `service` in `graph` (one of `analysis`'s graphs): those with an
/// edge to it, and with `transitive` also those that reach it through others.
pub fn dependents(
    analysis: &Analysis,
    graph: &Graph,
    service: &str,
    transitive: bool,
) -> Result<Dependents, DependentsError> {
    let target = analysis.node(service).ok_or_else(|| DependentsError::UnknownService {
        name: service.to_owned(),
        suggestion: closest(service, analysis.nodes.iter().map(|n| n.name.as_str())),
    })?;
    let n = analysis.nodes.len();
    // Reversed edges: `v -> u` for a dependency `u -> v`, so a search from the target finds
    // its dependents. Self-edges never make a service its own dependent.
    let reversed = |critical_only: bool| {
        let mut adj = vec![Vec::new(); n];
        for edge in graph.edges.iter().filter(|e| e.from != e.to && (e.critical || !critical_only)) {
            if let Some(list) = adj.get_mut(edge.to) {
                list.push(edge.from);
            }
        }
        adj
    };
    let (critical_tree, any_tree) = if transitive {
        (graph::shortest_path_tree(&reversed(true), target), graph::shortest_path_tree(&reversed(false), target))
    } else {
        (Vec::new(), Vec::new())
    };

    let mut found = Vec::new();
    if transitive {
        for node in (0..n).filter(|&v| v != target) {
            // Tree paths run from the target; a dependent's path runs the other way.
            let (critical, mut path) = match graph::tree_path(&critical_tree, node) {
                Some(path) => (true, path),
                None => match graph::tree_path(&any_tree, node) {
                    Some(path) => (false, path),
                    None => continue,
                },
            };
            path.reverse();
            found.push(dependent(analysis, node, critical, &path));
        }
    } else {
        // Edges are one per (from, to) pair.
        for edge in graph.edges.iter().filter(|e| e.to == target && e.from != target) {
            found.push(dependent(analysis, edge.from, edge.critical, &[edge.from, target]));
        }
    }
    found.sort_by(|a, b| {
        let key = |d: &Dependent| (d.tier.is_none(), d.tier, !d.critical, d.distance);
        key(a).cmp(&key(b)).then_with(|| a.service.cmp(&b.service))
    });
    Ok(Dependents {
        service: service.to_owned(),
        environments: graph.environments.clone(),
        transitive,
        dependents: found,
    })
}

fn dependent(analysis: &Analysis, node: usize, critical: bool, path: &[usize]) -> Dependent {
    let info = analysis.nodes.get(node);
    Dependent {
        service: analysis.name(node).to_owned(),
        owner: info.and_then(|n| n.owner.clone()),
        tier: info.and_then(|n| n.tier),
        layer: info.and_then(|n| n.layer).and_then(|l| analysis.layers.get(l)).cloned(),
        distance: path.len().saturating_sub(1),
        critical,
        path: path.iter().map(|&v| analysis.name(v).to_owned()).collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use crate::compile::check_sources;

    const POLICY: &str = r#"
version = 1
[model]
layers = ["data", "apps", "edge"]

[services.db]
layer = "data"
tier = 1
owner = "storage"
endpoints = [{ ip = "10.0.0.1", ports = [5432], proto = "tcp" }]

[services.cache]
layer = "data"
endpoints = [{ ip = "10.0.0.2", ports = [6379], proto = "tcp" }]
allow = [{ service = "db" }]

[services.billing]
layer = "apps"
tier = 2
owner = "payments"
allow = [{ service = "db" }]

[services.search]
layer = "apps"
tier = 2
owner = "discovery"
allow = [{ service = "cache" }]

[services.reports]
layer = "apps"
tier = 3
allow = [{ service = "db", critical = false }]

[services.web]
layer = "edge"
tier = 1
owner = "frontend"
allow = [{ service = "billing" }, { service = "search", critical = false }, { ip = "10.0.0.2" }]
"#;

    fn analysis() -> Analysis {
        let checked = check_sources([("policy.toml".to_owned(), POLICY.to_owned())]);
        let analysis = checked.analysis.unwrap();
        assert!(!analysis.diagnostics.has_errors(), "{:?}", analysis.diagnostics);
        analysis
    }

    fn rows(d: &Dependents) -> Vec<(String, Option<u8>, bool, usize, String)> {
        d.dependents.iter().map(|d| (d.service.clone(), d.tier, d.critical, d.distance, d.path.join(" -> "))).collect()
    }

    fn row(
        service: &str,
        tier: Option<u8>,
        critical: bool,
        distance: usize,
        path: &str,
    ) -> (String, Option<u8>, bool, usize, String) {
        (service.to_owned(), tier, critical, distance, path.to_owned())
    }

    #[test]
    fn direct_dependents_most_critical_first() {
        let analysis = analysis();
        let graph = &analysis.graphs[0];
        let d = dependents(&analysis, graph, "db", false).unwrap();
        assert_eq!(
            rows(&d),
            vec![
                row("billing", Some(2), true, 1, "billing -> db"),
                row("reports", Some(3), false, 1, "reports -> db"),
                row("cache", None, true, 1, "cache -> db"),
            ]
        );
        let billing = &d.dependents[0];
        assert_eq!((billing.owner.as_deref(), billing.layer.as_deref()), (Some("payments"), Some("apps")));
        assert!(!d.transitive);
    }

    #[test]
    fn transitive_dependents_prefer_a_critical_path() {
        let analysis = analysis();
        let d = dependents(&analysis, &analysis.graphs[0], "db", true).unwrap();
        assert_eq!(
            rows(&d),
            vec![
                // web -> search is not critical, but web -> cache (inferred from its address
                // entry) is: the critical path wins over none.
                row("web", Some(1), true, 2, "web -> billing -> db"),
                row("billing", Some(2), true, 1, "billing -> db"),
                row("search", Some(2), true, 2, "search -> cache -> db"),
                row("reports", Some(3), false, 1, "reports -> db"),
                row("cache", None, true, 1, "cache -> db"),
            ]
        );
    }

    #[test]
    fn a_path_through_a_non_critical_edge_is_not_critical() {
        let analysis = analysis();
        let d = dependents(&analysis, &analysis.graphs[0], "search", true).unwrap();
        assert_eq!(rows(&d), vec![row("web", Some(1), false, 1, "web -> search")]);
        let none = dependents(&analysis, &analysis.graphs[0], "web", true).unwrap();
        assert!(none.dependents.is_empty());
    }

    #[test]
    fn an_unknown_service_gets_a_suggestion() {
        let analysis = analysis();
        let error = dependents(&analysis, &analysis.graphs[0], "biling", false).unwrap_err();
        assert_eq!(error.to_string(), "unknown service `biling` (did you mean `billing`?)");
        let error = dependents(&analysis, &analysis.graphs[0], "zzzzzzzz", false).unwrap_err();
        assert_eq!(error.to_string(), "unknown service `zzzzzzzz`");
    }

    #[test]
    fn a_cycle_does_not_make_a_service_its_own_dependent() {
        let text = "version = 1\n[services.a]\nallow = [{ service = \"b\" }]\n[services.b]\nallow = [{ service = \"a\", critical = false }]\n";
        let checked = check_sources([("p.toml".to_owned(), text.to_owned())]);
        let analysis = checked.analysis.unwrap();
        let d = dependents(&analysis, &analysis.graphs[0], "a", true).unwrap();
        assert_eq!(rows(&d), vec![row("b", None, false, 1, "b -> a")]);
    }
}
