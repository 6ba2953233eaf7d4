//! `policyctl graph`: the dependency graph as Graphviz dot, Mermaid or JSON: layers as ranks
//! (bottom layer at the bottom), accepted intrinsic cycles as boxes, violations in red. A broken
//! policy is drawn too, with its violations highlighted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use depfence::compile::{Analysis, EdgeKind, Graph, Violation};

use super::{Show, checked, invalid, judged_graph};
use crate::args::{ErrorFormat, GraphFormat};
use crate::error::CliError;

/// Draws the policy at `path` in `language`: the graph of `environment`, or the one graph every
/// environment shares.
pub fn run(
    path: &Path,
    format: ErrorFormat,
    language: GraphFormat,
    environment: Option<&str>,
) -> Result<ExitCode, CliError> {
    let Some(analysis) = checked(path, format, Show::SyntaxOnly)?.and_then(|c| c.analysis) else {
        return Ok(invalid());
    };
    let graph = judged_graph(&analysis, environment)?;
    std::io::stdout().write_all(render(&analysis, graph, language).as_bytes())?;
    if analysis.diagnostics.has_errors() {
        eprintln!(
            "note: the policy has {} error(s), highlighted in the graph; run `policyctl check` for details",
            analysis.diagnostics.errors().count()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Renders one graph of the analysis in `format`.
fn render(analysis: &Analysis, graph: &Graph, format: GraphFormat) -> String {
    let flagged = violations_by_edge(graph);
    match format {
        GraphFormat::Dot => dot(analysis, graph, &flagged),
        GraphFormat::Mermaid => mermaid(analysis, graph, &flagged),
        GraphFormat::Json => json(analysis, graph, &flagged),
    }
}

/// Violation kinds per edge (from, to).
fn violations_by_edge(graph: &Graph) -> BTreeMap<(usize, usize), Vec<&'static str>> {
    let mut flagged: BTreeMap<(usize, usize), Vec<&'static str>> = BTreeMap::new();
    let mut flag_path = |path: &[usize], kind| {
        for pair in path.windows(2) {
            if let [a, b] = pair {
                flagged.entry((*a, *b)).or_default().push(kind);
            }
        }
    };
    for violation in &graph.violations {
        match violation {
            Violation::Cycle(path) => flag_path(path, "cycle"),
            Violation::Isolation(path) => flag_path(path, "isolation"),
            Violation::Layer(index) => {
                if let Some(edge) = graph.edges.get(*index) {
                    flag_path(&[edge.from, edge.to], "layer");
                }
            }
        }
    }
    for kinds in flagged.values_mut() {
        kinds.sort_unstable();
        kinds.dedup();
    }
    flagged
}

/// Nodes grouped by layer index (None last), in node order.
fn by_layer(analysis: &Analysis) -> BTreeMap<Option<usize>, Vec<usize>> {
    let mut groups: BTreeMap<Option<usize>, Vec<usize>> = BTreeMap::new();
    for (i, node) in analysis.nodes.iter().enumerate() {
        groups.entry(node.layer).or_default().push(i);
    }
    groups
}

fn node_label(analysis: &Analysis, node: usize) -> String {
    let Some(n) = analysis.nodes.get(node) else { return String::new() };
    let mut details = Vec::new();
    if let Some(group) = &n.group {
        details.push(format!("group {group}"));
    }
    if let Some(tier) = n.tier {
        details.push(format!("tier {tier}"));
    }
    if details.is_empty() { n.name.clone() } else { format!("{}\\n{}", n.name, details.join(", ")) }
}

fn dot(analysis: &Analysis, graph: &Graph, flagged: &BTreeMap<(usize, usize), Vec<&'static str>>) -> String {
    let mut out =
        String::from("digraph depfence {\n  rankdir=BT;\n  newrank=true;\n  node [shape=box, style=rounded];\n");
    for (layer, nodes) in by_layer(analysis) {
        let name = layer.and_then(|l| analysis.layers.get(l));
        let _ = writeln!(out, "  // layer {}", name.map_or("(none)", String::as_str));
        let _ = writeln!(out, "  {{ rank=same;");
        for n in nodes {
            let _ = writeln!(out, "    n{n} [label=\"{}\"];", node_label(analysis, n));
        }
        let _ = writeln!(out, "  }}");
    }
    for (i, component) in graph.components.iter().enumerate().filter(|(_, c)| c.intrinsic) {
        let _ = writeln!(out, "  subgraph cluster_cycle_{i} {{ label=\"intrinsic cycle\"; style=dashed; color=blue;");
        for m in &component.members {
            let _ = writeln!(out, "    n{m};");
        }
        let _ = writeln!(out, "  }}");
    }
    for edge in &graph.edges {
        let mut attrs = Vec::new();
        if !edge.critical {
            attrs.push("style=dashed".to_owned());
        }
        if edge.kind == EdgeKind::Inferred {
            attrs.push("arrowhead=empty".to_owned());
        }
        if let Some(kinds) = flagged.get(&(edge.from, edge.to)) {
            attrs.push("color=red, penwidth=2".to_owned());
            attrs.push(format!("label=\"{}\"", kinds.join(", ")));
        }
        let attrs = if attrs.is_empty() { String::new() } else { format!(" [{}]", attrs.join(", ")) };
        let _ = writeln!(out, "  n{} -> n{}{attrs};", edge.from, edge.to);
    }
    out.push_str("}\n");
    out
}

fn mermaid(analysis: &Analysis, graph: &Graph, flagged: &BTreeMap<(usize, usize), Vec<&'static str>>) -> String {
    let mut out = String::from("flowchart BT\n");
    for (layer, nodes) in by_layer(analysis) {
        let name = layer.and_then(|l| analysis.layers.get(l)).map_or("no layer", String::as_str);
        let _ =
            writeln!(out, "  subgraph layer_{} [\"layer {name}\"]", layer.map_or("none".to_owned(), |l| l.to_string()));
        for n in nodes {
            let _ = writeln!(out, "    n{n}[\"{}\"]", node_label(analysis, n).replace("\\n", "<br>"));
        }
        let _ = writeln!(out, "  end");
    }
    let mut red = Vec::new();
    for (i, edge) in graph.edges.iter().enumerate() {
        let arrow = if edge.critical { "-->" } else { "-.->" };
        match flagged.get(&(edge.from, edge.to)) {
            Some(kinds) => {
                let _ = writeln!(out, "  n{} {arrow}|{}| n{}", edge.from, kinds.join(", "), edge.to);
                red.push(i.to_string());
            }
            None if edge.kind == EdgeKind::Inferred => {
                let _ = writeln!(out, "  n{} {arrow}|inferred| n{}", edge.from, edge.to);
            }
            None => {
                let _ = writeln!(out, "  n{} {arrow} n{}", edge.from, edge.to);
            }
        }
    }
    if !red.is_empty() {
        let _ = writeln!(out, "  linkStyle {} stroke:red,stroke-width:3px", red.join(","));
    }
    let intrinsic: Vec<String> = graph
        .components
        .iter()
        .filter(|c| c.intrinsic)
        .flat_map(|c| c.members.iter().map(|m| format!("n{m}")))
        .collect();
    if !intrinsic.is_empty() {
        let _ = writeln!(out, "  classDef intrinsic stroke:blue,stroke-dasharray:5 5");
        let _ = writeln!(out, "  class {} intrinsic", intrinsic.join(","));
    }
    out
}

fn json(analysis: &Analysis, graph: &Graph, flagged: &BTreeMap<(usize, usize), Vec<&'static str>>) -> String {
    let name = |n: usize| analysis.name(n).to_owned();
    let path = |p: &[usize]| p.iter().map(|&n| name(n)).collect::<Vec<_>>();
    let document = serde_json::json!({
        "environments": graph.environments,
        "layers": analysis.layers,
        "nodes": analysis.nodes.iter().map(|n| serde_json::json!({
            "name": n.name,
            "layer": n.layer.and_then(|l| analysis.layers.get(l)),
            "group": n.group,
            "tier": n.tier,
        })).collect::<Vec<_>>(),
        "edges": graph.edges.iter().map(|e| serde_json::json!({
            "from": name(e.from),
            "to": name(e.to),
            "critical": e.critical,
            "kind": e.kind,
            "violations": flagged.get(&(e.from, e.to)).cloned().unwrap_or_default(),
        })).collect::<Vec<_>>(),
        "intrinsic_cycles": graph.components.iter().filter(|c| c.intrinsic).map(|c| path(&c.members)).collect::<Vec<_>>(),
        "violations": graph.violations.iter().map(|v| match v {
            Violation::Cycle(p) => serde_json::json!({ "kind": "cycle", "path": path(p) }),
            Violation::Isolation(p) => serde_json::json!({ "kind": "isolation", "path": path(p) }),
            Violation::Layer(i) => {
                let edge = graph.edges.get(*i);
                serde_json::json!({ "kind": "layer", "path": edge.map(|e| path(&[e.from, e.to])) })
            }
        }).collect::<Vec<_>>(),
        "errors": analysis.diagnostics.errors().count(),
    });
    let mut text = serde_json::to_string_pretty(&document).unwrap_or_default();
    text.push('\n');
    text
}
