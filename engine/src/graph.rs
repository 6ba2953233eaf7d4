//! Policy-agnostic directed-graph algorithms.
//!
//! Nodes are plain `usize` indices in `0..n`, and a graph is given as adjacency lists
//! `adj: &[Vec<usize>]` with `n == adj.len()`: `adj[u]` lists the successors of `u`, and an
//! edge `u -> v` means "u depends on v". Duplicated edges and self-edges are allowed.
//! Successor indices `>= n` (and out-of-range indices in any other argument) are silently
//! ignored.
//!
//! Every algorithm here is iterative (explicit stacks/queues, no recursion), so graphs with
//! hundreds of thousands of nodes and millions of edges are fine, and every result is
//! deterministic for a given input.

use std::collections::VecDeque;

/// Sentinel for "no value yet" in per-node bookkeeping vectors.
const NONE: usize = usize::MAX;

/// Reads `v[i]`, or `default` when `i` is out of range.
fn read<T: Copy>(v: &[T], i: usize, default: T) -> T {
    v.get(i).copied().unwrap_or(default)
}

/// Writes `v[i] = value`; does nothing when `i` is out of range.
fn write<T>(v: &mut [T], i: usize, value: T) {
    if let Some(slot) = v.get_mut(i) {
        *slot = value;
    }
}

/// Fills `buf` with the successors of `u` that are `< n`, sorted ascending and deduplicated.
fn sorted_successors(adj: &[Vec<usize>], u: usize, n: usize, buf: &mut Vec<usize>) {
    buf.clear();
    buf.extend(adj.get(u).into_iter().flatten().copied().filter(|&v| v < n));
    buf.sort_unstable();
    buf.dedup();
}

/// Strongly connected components, computed with an iterative Tarjan algorithm in `O(n + m)`.
///
/// Order ("dependencies first"): if there is an edge `u -> v` and `u`, `v` lie in different
/// components, the component of `v` is listed **before** the component of `u` (reverse
/// topological order of the condensation). Every node `0..n` appears in exactly one component,
/// and each component's node list is sorted ascending. Roots are tried in ascending node order
/// and successors in the order given in `adj`, so the result is deterministic.
pub fn strongly_connected_components(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = adj.len();
    let mut index = vec![NONE; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    // Simulated call stack: (node, position of the next successor to look at).
    let mut call: Vec<(usize, usize)> = Vec::new();
    let mut next_index = 0usize;
    let mut components = Vec::new();

    for root in 0..n {
        if read(&index, root, NONE) != NONE {
            continue;
        }
        write(&mut index, root, next_index);
        write(&mut low, root, next_index);
        next_index += 1;
        stack.push(root);
        write(&mut on_stack, root, true);
        call.push((root, 0));

        while let Some(frame) = call.last_mut() {
            let v = frame.0;
            let successor = adj.get(v).and_then(|succ| succ.get(frame.1)).copied();
            if let Some(w) = successor {
                frame.1 += 1;
                if w >= n {
                    continue;
                }
                let w_index = read(&index, w, NONE);
                if w_index == NONE {
                    // "Recurse" into w.
                    write(&mut index, w, next_index);
                    write(&mut low, w, next_index);
                    next_index += 1;
                    stack.push(w);
                    write(&mut on_stack, w, true);
                    call.push((w, 0));
                } else if read(&on_stack, w, false) {
                    let v_low = read(&low, v, 0);
                    write(&mut low, v, v_low.min(w_index));
                }
            } else {
                // All successors of v done: "return" from v.
                call.pop();
                let v_low = read(&low, v, 0);
                if v_low == read(&index, v, NONE) {
                    let mut component = Vec::new();
                    while let Some(w) = stack.pop() {
                        write(&mut on_stack, w, false);
                        component.push(w);
                        if w == v {
                            break;
                        }
                    }
                    component.sort_unstable();
                    components.push(component);
                }
                if let Some(&(parent, _)) = call.last() {
                    let parent_low = read(&low, parent, 0);
                    write(&mut low, parent, parent_low.min(v_low));
                }
            }
        }
    }
    components
}

/// Maps every node `0..n` to the index of its component in `components`.
///
/// Nodes that appear in no component map to `usize::MAX`; node indices `>= n` inside
/// `components` are ignored. If a node appears in several components, the last one wins.
pub fn component_index(n: usize, components: &[Vec<usize>]) -> Vec<usize> {
    let mut comp_of = vec![NONE; n];
    for (ci, component) in components.iter().enumerate() {
        for &v in component {
            write(&mut comp_of, v, ci);
        }
    }
    comp_of
}

/// A shortest simple cycle through `start` that only visits nodes of `members`.
///
/// `members` must be sorted ascending (typically one strongly connected component of size
/// `>= 2`) and contain `start`. The cycle is found by BFS, so it has the fewest possible edges.
/// Self-edges are ignored: the returned cycle always has at least two distinct nodes, so a
/// lone node with only a self-edge yields `None`.
///
/// Returns the node sequence starting and ending at `start` (e.g. `[a, b, c, a]`) in which no
/// other node repeats, or `None` if no such cycle exists (or `start` is not a member). Ties are
/// broken deterministically by visiting successors in ascending order. Uses `O(|members|)`
/// memory, independent of `n`.
pub fn cycle_through(adj: &[Vec<usize>], members: &[usize], start: usize) -> Option<Vec<usize>> {
    let n = adj.len();
    let local = |v: usize| members.binary_search(&v).ok();
    let start_local = local(start)?;
    let k = members.len();
    // Parent (as a node id) of each member in the BFS tree rooted at `start`.
    let mut parent = vec![NONE; k];
    let mut visited = vec![false; k];
    write(&mut visited, start_local, true);

    let mut queue = VecDeque::from([start]);
    let mut buf = Vec::new();
    while let Some(u) = queue.pop_front() {
        sorted_successors(adj, u, n, &mut buf);
        for &w in &buf {
            if w == start {
                if u == start {
                    continue; // self-edge
                }
                // Closing edge u -> start: u is at minimal BFS depth among such nodes.
                let mut path = vec![start, u];
                let mut cur = u;
                while let Some(p) = local(cur).map(|i| read(&parent, i, NONE)) {
                    if p == NONE || p == start {
                        break;
                    }
                    path.push(p);
                    cur = p;
                }
                path.push(start);
                path.reverse();
                return Some(path);
            }
            let Some(wi) = local(w) else { continue };
            if read(&visited, wi, true) {
                continue;
            }
            write(&mut visited, wi, true);
            write(&mut parent, wi, u);
            queue.push_back(w);
        }
    }
    None
}

/// Shortest path (fewest edges, BFS) from any node of `sources` to any node of `targets`.
///
/// The path has at least one edge: a node that is both a source and a target is not a
/// zero-length path (but a self-edge `s -> s` on such a node is a one-edge path `[s, s]`).
/// Returns the full node sequence, first node in `sources`, last node in `targets`, or `None`
/// if no target is reachable.
///
/// Deterministic tie-breaking: sources are expanded in ascending order and each node's
/// successors in ascending order (a sorted, deduplicated copy), so among shortest paths lower
/// node indices are preferred.
pub fn shortest_path(adj: &[Vec<usize>], sources: &[usize], targets: &[usize]) -> Option<Vec<usize>> {
    let n = adj.len();
    let mut is_target = vec![false; n];
    for &t in targets {
        write(&mut is_target, t, true);
    }
    let mut starts: Vec<usize> = sources.iter().copied().filter(|&s| s < n).collect();
    starts.sort_unstable();
    starts.dedup();

    // `visited` means "reached by at least one edge"; sources start unvisited.
    let mut visited = vec![false; n];
    let mut parent = vec![NONE; n];
    let mut queue: VecDeque<(usize, usize)> = starts.iter().map(|&s| (s, 0)).collect();
    let mut buf = Vec::new();
    while let Some((u, depth)) = queue.pop_front() {
        sorted_successors(adj, u, n, &mut buf);
        for &w in &buf {
            if read(&visited, w, true) {
                continue;
            }
            write(&mut visited, w, true);
            write(&mut parent, w, u);
            if read(&is_target, w, false) {
                // Walk exactly `depth + 1` edges back: the chain ends at the source that was
                // expanded at depth 0.
                let mut path = Vec::with_capacity(depth + 2);
                path.push(w);
                let mut cur = w;
                for _ in 0..=depth {
                    cur = read(&parent, cur, NONE);
                    path.push(cur);
                }
                path.reverse();
                return Some(path);
            }
            queue.push_back((w, depth + 1));
        }
    }
    None
}

/// Nodes reachable from `start` by one or more edges, as a `bool` vector of length `n`.
///
/// `start` itself is `true` only if it lies on a cycle (including a self-edge). An
/// out-of-range `start` yields all `false`.
pub fn reachable_from(adj: &[Vec<usize>], start: usize) -> Vec<bool> {
    let n = adj.len();
    let mut seen = vec![false; n];
    let mut stack: Vec<usize> = adj.get(start).into_iter().flatten().copied().collect();
    while let Some(v) = stack.pop() {
        match seen.get_mut(v) {
            Some(flag) if !*flag => *flag = true,
            _ => continue,
        }
        stack.extend(adj.get(v).into_iter().flatten().copied());
    }
    seen
}

/// A breadth-first search tree from `start`: for every node reachable from `start` by one or
/// more edges, its parent on a shortest path (fewest edges) from `start`; `None` for the rest.
///
/// `start` itself has no parent (even on a cycle), so walking parents from any reached node ends
/// at `start`. Ties are broken deterministically: each node's successors are visited in
/// ascending order (a sorted, deduplicated copy), so among shortest paths the one through lower
/// node indices wins. An out-of-range `start` yields all `None`.
pub fn shortest_path_tree(adj: &[Vec<usize>], start: usize) -> Vec<Option<usize>> {
    let n = adj.len();
    let mut parent: Vec<Option<usize>> = vec![None; n];
    if start >= n {
        return parent;
    }
    let mut seen = vec![false; n];
    write(&mut seen, start, true);
    let mut queue = VecDeque::from([start]);
    let mut buf = Vec::new();
    while let Some(u) = queue.pop_front() {
        sorted_successors(adj, u, n, &mut buf);
        for &w in &buf {
            if read(&seen, w, true) {
                continue;
            }
            write(&mut seen, w, true);
            write(&mut parent, w, Some(u));
            queue.push_back(w);
        }
    }
    parent
}

/// The path from the root of a [`shortest_path_tree`] to `node`, root first; `None` when `node`
/// is not in the tree (or the parents do not lead back to a root within `parent.len()` steps).
pub fn tree_path(parent: &[Option<usize>], node: usize) -> Option<Vec<usize>> {
    let mut path = vec![node];
    let mut current = parent.get(node).copied().flatten()?;
    for _ in 0..parent.len() {
        path.push(current);
        match parent.get(current).copied().flatten() {
            Some(next) => current = next,
            None => {
                path.reverse();
                return Some(path);
            }
        }
    }
    None
}

/// Bootstrap levels of the condensation DAG, one per component, indexed like `components`.
///
/// `components` is normally the output of [`strongly_connected_components`] (any order is
/// accepted). `level(c) = 0` if component `c` has no edges to other components, otherwise
/// `1 +` the maximum level of the components it has edges to. Self-edges, intra-component
/// edges and edges touching nodes that are in no component are ignored. Components can thus
/// be started level by level, lowest first. Runs in `O(n + m)` (Kahn's algorithm from the
/// sinks). If `components` is not a valid condensation (its inter-component edges form a
/// cycle), the components on or above such a cycle keep a partial (lower-bound) level.
pub fn condensation_levels(adj: &[Vec<usize>], components: &[Vec<usize>]) -> Vec<usize> {
    let n = adj.len();
    let k = components.len();
    let comp_of = component_index(n, components);

    // Count inter-component edges per source component and record them reversed.
    let mut out_degree = vec![0usize; k];
    let mut reverse: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (u, succ) in adj.iter().enumerate() {
        let cu = read(&comp_of, u, NONE);
        if cu == NONE {
            continue;
        }
        for &v in succ {
            let cv = read(&comp_of, v, NONE);
            if cv == NONE || cv == cu {
                continue;
            }
            if let Some(d) = out_degree.get_mut(cu) {
                *d += 1;
            }
            if let Some(r) = reverse.get_mut(cv) {
                r.push(cu);
            }
        }
    }

    let mut level = vec![0usize; k];
    let mut queue: VecDeque<usize> = (0..k).filter(|&c| read(&out_degree, c, 0) == 0).collect();
    while let Some(d) = queue.pop_front() {
        let next = read(&level, d, 0) + 1;
        for &c in reverse.get(d).into_iter().flatten() {
            if let Some(l) = level.get_mut(c) {
                *l = (*l).max(next);
            }
            if let Some(deg) = out_degree.get_mut(c) {
                *deg -= 1;
                if *deg == 0 {
                    queue.push_back(c);
                }
            }
        }
    }
    level
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
        let mut adj = vec![Vec::new(); n];
        for &(u, v) in edges {
            adj[u].push(v);
        }
        adj
    }

    #[test]
    fn empty_graph() {
        let adj: Vec<Vec<usize>> = Vec::new();
        assert!(strongly_connected_components(&adj).is_empty());
        assert!(component_index(0, &[]).is_empty());
        assert_eq!(shortest_path(&adj, &[0], &[0]), None);
        assert!(reachable_from(&adj, 0).is_empty());
        assert!(condensation_levels(&adj, &[]).is_empty());
        assert_eq!(cycle_through(&adj, &[], 0), None);
    }

    #[test]
    fn self_edge() {
        let adj = graph(2, &[(0, 0), (0, 1)]);
        let comps = strongly_connected_components(&adj);
        assert_eq!(comps, vec![vec![1], vec![0]]);
        assert_eq!(cycle_through(&adj, &[0], 0), None);
        assert_eq!(reachable_from(&adj, 0), vec![true, true]);
        assert_eq!(reachable_from(&adj, 1), vec![false, false]);
        assert_eq!(shortest_path(&adj, &[0], &[0]), Some(vec![0, 0]));
        assert_eq!(shortest_path(&adj, &[1], &[1]), None);
        assert_eq!(condensation_levels(&adj, &comps), vec![0, 1]);
    }

    #[test]
    fn two_cycle() {
        let adj = graph(3, &[(0, 1), (1, 0), (2, 0)]);
        let comps = strongly_connected_components(&adj);
        assert_eq!(comps, vec![vec![0, 1], vec![2]]);
        assert_eq!(component_index(3, &comps), vec![0, 0, 1]);
        assert_eq!(cycle_through(&adj, &[0, 1], 0), Some(vec![0, 1, 0]));
        assert_eq!(cycle_through(&adj, &[0, 1], 1), Some(vec![1, 0, 1]));
        assert_eq!(cycle_through(&adj, &[0, 1], 2), None);
        assert_eq!(reachable_from(&adj, 0), vec![true, true, false]);
        assert_eq!(shortest_path(&adj, &[0], &[0]), Some(vec![0, 1, 0]));
        assert_eq!(condensation_levels(&adj, &comps), vec![0, 1]);
    }

    #[test]
    fn diamond() {
        // 0 -> {1, 2} -> 3
        let adj = graph(4, &[(0, 2), (0, 1), (1, 3), (2, 3)]);
        let comps = strongly_connected_components(&adj);
        assert_eq!(comps.len(), 4);
        assert_eq!(comps[0], vec![3]);
        assert_eq!(comps[3], vec![0]);
        let idx = component_index(4, &comps);
        let levels = condensation_levels(&adj, &comps);
        assert_eq!((0..4).map(|v| levels[idx[v]]).collect::<Vec<_>>(), vec![2, 1, 1, 0]);
        // Lower indices preferred among equal-length paths.
        assert_eq!(shortest_path(&adj, &[0], &[3]), Some(vec![0, 1, 3]));
        assert_eq!(shortest_path(&adj, &[3], &[0]), None);
        assert_eq!(reachable_from(&adj, 0), vec![false, true, true, true]);
    }

    #[test]
    fn shortest_path_tree_prefers_fewest_edges_then_lower_indices() {
        // 0 -> {2, 1} -> 3 -> 4, and a long way 0 -> 5 -> 6 -> 4; 3 -> 0 closes a cycle.
        let adj = graph(8, &[(0, 2), (0, 1), (1, 3), (2, 3), (3, 4), (0, 5), (5, 6), (6, 4), (3, 0), (7, 0)]);
        let tree = shortest_path_tree(&adj, 0);
        assert_eq!(tree[0], None, "the root has no parent, even on a cycle");
        assert_eq!(tree[3], Some(1), "the lower index among equal paths");
        assert_eq!(tree[7], None, "not reachable");
        assert_eq!(tree_path(&tree, 4), Some(vec![0, 1, 3, 4]));
        assert_eq!(tree_path(&tree, 6), Some(vec![0, 5, 6]));
        assert_eq!(tree_path(&tree, 0), None);
        assert_eq!(tree_path(&tree, 7), None);
        assert_eq!(tree_path(&tree, 99), None);
        assert_eq!(shortest_path_tree(&adj, 99), vec![None; 8]);
        // Agrees with shortest_path on every reachable node.
        for node in 1..8 {
            assert_eq!(tree_path(&tree, node), shortest_path(&adj, &[0], &[node]), "node {node}");
        }
    }

    #[test]
    fn disconnected() {
        let adj = graph(5, &[(0, 1), (1, 0), (3, 4), (4, 3)]);
        let comps = strongly_connected_components(&adj);
        assert_eq!(comps, vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert_eq!(condensation_levels(&adj, &comps), vec![0, 0, 0]);
        assert_eq!(shortest_path(&adj, &[0, 2], &[3, 4]), None);
        assert_eq!(shortest_path(&adj, &[2, 4], &[3]), Some(vec![4, 3]));
        assert_eq!(cycle_through(&adj, &[0, 1], 0), Some(vec![0, 1, 0]));
        assert_eq!(reachable_from(&adj, 2), vec![false; 5]);
    }

    #[test]
    fn duplicates_and_out_of_range() {
        let adj = graph(3, &[(0, 1), (0, 1), (1, 2), (1, 2), (2, 0), (2, 0), (2, 99)]);
        let comps = strongly_connected_components(&adj);
        assert_eq!(comps, vec![vec![0, 1, 2]]);
        assert_eq!(condensation_levels(&adj, &comps), vec![0]);
        assert_eq!(cycle_through(&adj, &[0, 1, 2], 1), Some(vec![1, 2, 0, 1]));
        assert_eq!(shortest_path(&adj, &[0, 0, 7], &[2, 8]), Some(vec![0, 1, 2]));
        assert_eq!(reachable_from(&adj, 0), vec![true; 3]);
        assert_eq!(reachable_from(&adj, 42), vec![false; 3]);
    }

    #[test]
    fn cycle_through_is_shortest() {
        // Long cycle 0->1->2->3->4->0 plus a shortcut 2->0 and a detour inside.
        let adj = graph(5, &[(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (2, 0), (3, 1)]);
        let members = [0, 1, 2, 3, 4];
        assert_eq!(cycle_through(&adj, &members, 0), Some(vec![0, 1, 2, 0]));
        assert_eq!(cycle_through(&adj, &members, 1), Some(vec![1, 2, 0, 1]));
        assert_eq!(cycle_through(&adj, &members, 3), Some(vec![3, 1, 2, 3]));
        assert_eq!(cycle_through(&adj, &members, 4), Some(vec![4, 0, 1, 2, 3, 4]));
        // Restricting members removes cycles that leave the set.
        assert_eq!(cycle_through(&adj, &[0, 1, 2], 0), Some(vec![0, 1, 2, 0]));
        assert_eq!(cycle_through(&adj, &[0, 1], 0), None);
    }

    #[test]
    fn source_that_is_also_target() {
        // 0 is a source and target but only counts when reached by an edge.
        let adj = graph(3, &[(0, 1), (1, 2), (2, 0)]);
        assert_eq!(shortest_path(&adj, &[0], &[0]), Some(vec![0, 1, 2, 0]));
        assert_eq!(shortest_path(&adj, &[0, 1], &[0, 1]), Some(vec![0, 1]));
        assert_eq!(shortest_path(&adj, &[1, 2], &[0, 1]), Some(vec![2, 0]));
    }

    #[test]
    fn large_graphs_do_not_overflow_the_stack() {
        let n = 200_000;
        // A long chain 0 -> 1 -> ... -> n-1.
        let chain: Vec<Vec<usize>> = (0..n).map(|u| if u + 1 < n { vec![u + 1] } else { Vec::new() }).collect();
        let comps = strongly_connected_components(&chain);
        assert_eq!(comps.len(), n);
        assert_eq!(comps[0], vec![n - 1]);
        let levels = condensation_levels(&chain, &comps);
        assert_eq!(levels[n - 1], n - 1);
        assert_eq!(shortest_path(&chain, &[0], &[n - 1]).map(|p| p.len()), Some(n));
        assert!(reachable_from(&chain, 0).iter().skip(1).all(|&b| b));

        // One big cycle.
        let ring: Vec<Vec<usize>> = (0..n).map(|u| vec![(u + 1) % n]).collect();
        let comps = strongly_connected_components(&ring);
        assert_eq!(comps.len(), 1);
        let cycle = cycle_through(&ring, &comps[0], 5).unwrap();
        assert_eq!(cycle.len(), n + 1);
        assert_eq!(condensation_levels(&ring, &comps), vec![0]);
    }
}
