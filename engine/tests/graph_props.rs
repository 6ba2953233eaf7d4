//! Property tests for `depfence::graph` against brute-force oracles on small random graphs.

#![allow(clippy::indexing_slicing, reason = "test oracles index small matrices; a panic is a test failure")]

use depfence::graph::{
    component_index, condensation_levels, cycle_through, reachable_from, shortest_path, strongly_connected_components,
};
use proptest::prelude::*;

/// "No path" in the distance matrices.
const INF: usize = usize::MAX / 4;

/// Random graph: `n` in `0..=12`, edges drawn with replacement (so duplicates and self-edges
/// occur), as adjacency lists.
fn arb_graph() -> impl Strategy<Value = Vec<Vec<usize>>> {
    (0usize..=12).prop_flat_map(|n| {
        let edges =
            if n == 0 { Just(Vec::new()).boxed() } else { prop::collection::vec((0..n, 0..n), 0..=3 * n).boxed() };
        edges.prop_map(move |edges| build(n, &edges))
    })
}

/// Random graph together with random source and target subsets (as membership masks).
fn arb_graph_with_sets() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>, Vec<usize>)> {
    arb_graph().prop_flat_map(|adj| {
        let n = adj.len();
        (Just(adj), prop::collection::vec(any::<bool>(), n), prop::collection::vec(any::<bool>(), n))
            .prop_map(|(adj, src, tgt)| (adj, mask_to_set(&src), mask_to_set(&tgt)))
    })
}

fn build(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut adj = vec![Vec::new(); n];
    for &(u, v) in edges {
        adj[u].push(v);
    }
    adj
}

fn mask_to_set(mask: &[bool]) -> Vec<usize> {
    (0..mask.len()).filter(|&i| mask[i]).collect()
}

fn has_edge(adj: &[Vec<usize>], u: usize, v: usize) -> bool {
    adj[u].contains(&v)
}

/// Floyd–Warshall over walks of at least one edge, restricted to nodes where `keep` holds,
/// optionally ignoring self-edges. `dist[u][v]` is the fewest edges of a walk u -> v (`INF` if
/// none); `dist[u][u]` is thus the shortest cycle through `u`.
fn distances(adj: &[Vec<usize>], keep: &[bool], self_edges: bool) -> Vec<Vec<usize>> {
    let n = adj.len();
    let mut dist = vec![vec![INF; n]; n];
    for u in 0..n {
        for &v in &adj[u] {
            if keep[u] && keep[v] && (self_edges || u != v) {
                dist[u][v] = 1;
            }
        }
    }
    for k in 0..n {
        for i in 0..n {
            for j in 0..n {
                let via = dist[i][k] + dist[k][j];
                if via < dist[i][j] {
                    dist[i][j] = via;
                }
            }
        }
    }
    dist
}

/// Transitive closure (one or more edges) as a boolean matrix.
fn closure(adj: &[Vec<usize>]) -> Vec<Vec<bool>> {
    let n = adj.len();
    let mut reach = vec![vec![false; n]; n];
    for u in 0..n {
        for &v in &adj[u] {
            reach[u][v] = true;
        }
    }
    for k in 0..n {
        let via_k = reach[k].clone();
        for row in &mut reach {
            if row[k] {
                for (cell, &k_reaches) in row.iter_mut().zip(&via_k) {
                    *cell |= k_reaches;
                }
            }
        }
    }
    reach
}

/// Every consecutive pair of `path` is an edge of `adj`.
fn is_walk(adj: &[Vec<usize>], path: &[usize]) -> bool {
    path.windows(2).all(|w| has_edge(adj, w[0], w[1]))
}

/// Cross-component edges `(comp u, comp v)`.
fn cross_edges(adj: &[Vec<usize>], comp_of: &[usize]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for u in 0..adj.len() {
        for &v in &adj[u] {
            if comp_of[u] != comp_of[v] {
                out.push((comp_of[u], comp_of[v]));
            }
        }
    }
    out
}

proptest! {
    #[test]
    fn scc_matches_mutual_reachability(adj in arb_graph()) {
        let n = adj.len();
        let reach = closure(&adj);
        let comps = strongly_connected_components(&adj);

        // Partition of 0..n, each component sorted and non-empty.
        let mut all: Vec<usize> = comps.iter().flatten().copied().collect();
        all.sort_unstable();
        prop_assert_eq!(all, (0..n).collect::<Vec<_>>());
        for c in &comps {
            prop_assert!(!c.is_empty());
            prop_assert!(c.windows(2).all(|w| w[0] < w[1]));
        }

        let comp_of = component_index(n, &comps);
        for u in 0..n {
            prop_assert!(comps[comp_of[u]].binary_search(&u).is_ok());
            for v in 0..n {
                let same = u == v || (reach[u][v] && reach[v][u]);
                prop_assert_eq!(comp_of[u] == comp_of[v], same, "nodes {} and {}", u, v);
            }
        }

        // Determinism.
        prop_assert_eq!(strongly_connected_components(&adj), comps);
    }

    #[test]
    fn scc_order_is_dependencies_first(adj in arb_graph()) {
        let comps = strongly_connected_components(&adj);
        let comp_of = component_index(adj.len(), &comps);
        for (cu, cv) in cross_edges(&adj, &comp_of) {
            prop_assert!(cv < cu, "edge from component {} to later component {}", cu, cv);
        }
    }

    #[test]
    fn cycles_match_oracle(adj in arb_graph()) {
        let n = adj.len();
        let comps = strongly_connected_components(&adj);

        // A cycle with >= 2 distinct nodes exists iff some SCC has >= 2 nodes.
        let no_self = distances(&adj, &vec![true; n], false);
        let has_long_cycle = (0..n).any(|u| no_self[u][u] < INF);
        prop_assert_eq!(comps.iter().any(|c| c.len() >= 2), has_long_cycle);

        for members in comps.iter().filter(|c| c.len() >= 2) {
            let mut keep = vec![false; n];
            for &m in members {
                keep[m] = true;
            }
            let dist = distances(&adj, &keep, false);
            for &start in members {
                let cycle = cycle_through(&adj, members, start);
                prop_assert!(cycle.is_some(), "no cycle through {}", start);
                let cycle = cycle.unwrap();
                prop_assert!(cycle.len() >= 3);
                prop_assert_eq!(cycle[0], start);
                prop_assert_eq!(*cycle.last().unwrap(), start);
                prop_assert!(is_walk(&adj, &cycle));
                prop_assert!(cycle.iter().all(|v| members.binary_search(v).is_ok()));
                let mut inner = cycle[..cycle.len() - 1].to_vec();
                inner.sort_unstable();
                inner.dedup();
                prop_assert_eq!(inner.len(), cycle.len() - 1, "repeated node in {:?}", cycle);
                prop_assert_eq!(cycle.len() - 1, dist[start][start]);
            }
        }

        // Singleton components never yield a cycle (self-edges are ignored).
        for c in comps.iter().filter(|c| c.len() == 1) {
            prop_assert_eq!(cycle_through(&adj, c, c[0]), None);
        }
    }

    #[test]
    fn shortest_path_matches_oracle((adj, sources, targets) in arb_graph_with_sets()) {
        let n = adj.len();
        let dist = distances(&adj, &vec![true; n], true);
        let best = sources
            .iter()
            .flat_map(|&s| targets.iter().map(move |&t| (s, t)))
            .map(|(s, t)| dist[s][t])
            .min()
            .filter(|&d| d < INF);

        let path = shortest_path(&adj, &sources, &targets);
        prop_assert_eq!(path.is_some(), best.is_some());
        if let Some(path) = path {
            prop_assert!(path.len() >= 2);
            prop_assert!(is_walk(&adj, &path));
            prop_assert!(sources.contains(&path[0]));
            prop_assert!(targets.contains(path.last().unwrap()));
            prop_assert_eq!(Some(path.len() - 1), best);
            prop_assert_eq!(shortest_path(&adj, &sources, &targets), Some(path));
        }
    }

    #[test]
    fn reachable_matches_closure(adj in arb_graph()) {
        let reach = closure(&adj);
        for (u, row) in reach.iter().enumerate() {
            prop_assert_eq!(&reachable_from(&adj, u), row, "row {}", u);
        }
    }

    #[test]
    fn levels_are_consistent(adj in arb_graph()) {
        let comps = strongly_connected_components(&adj);
        let comp_of = component_index(adj.len(), &comps);
        let levels = condensation_levels(&adj, &comps);
        prop_assert_eq!(levels.len(), comps.len());

        let cross = cross_edges(&adj, &comp_of);
        for &(cu, cv) in &cross {
            prop_assert!(levels[cu] > levels[cv]);
        }
        for (c, &level) in levels.iter().enumerate() {
            if level > 0 {
                prop_assert!(
                    cross.iter().any(|&(cu, cv)| cu == c && levels[cv] == level - 1),
                    "component {} at level {} has no edge to level {}", c, level, level - 1
                );
            } else {
                prop_assert!(cross.iter().all(|&(cu, _)| cu != c));
            }
        }
    }
}
