//! `policyctl bootstrap-order`: the order in which services can start after an outage.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use super::{compiled, invalid, judged_graph};
use crate::args::{ErrorFormat, Output};
use crate::error::CliError;

/// Prints the start order of the policy at `path` (in `environment`, or the one order every
/// environment shares): stages by layer, dependencies first.
pub fn run(path: &Path, format: ErrorFormat, output: Output, environment: Option<&str>) -> Result<ExitCode, CliError> {
    let Some(compiled) = compiled(path, format)? else { return Ok(invalid()) };
    let analysis = &compiled.analysis;
    let graph = judged_graph(analysis, environment)?;
    let layer_name = |layer: Option<usize>| layer.and_then(|l| analysis.layers.get(l)).cloned();
    let stage_members = |components: &[usize]| -> Vec<(Vec<String>, bool)> {
        components
            .iter()
            .filter_map(|&c| graph.components.get(c))
            .map(|c| (c.members.iter().map(|&m| analysis.name(m).to_owned()).collect(), c.intrinsic))
            .collect()
    };
    let mut out = std::io::stdout().lock();
    if output == Output::Json {
        let stages: Vec<_> = graph
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                serde_json::json!({
                    "stage": i + 1,
                    "layer": layer_name(stage.layer),
                    "groups": stage_members(&stage.components).into_iter().map(|(members, intrinsic)| serde_json::json!({
                        "services": members, "intrinsic_cycle": intrinsic,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &stages).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut current_layer = None;
    for (i, stage) in graph.stages.iter().enumerate() {
        let layer = layer_name(stage.layer).unwrap_or_else(|| "(no layer)".into());
        if current_layer.as_ref() != Some(&layer) {
            writeln!(out, "layer {layer}:")?;
            current_layer = Some(layer);
        }
        let groups: Vec<String> =
            stage_members(&stage.components)
                .into_iter()
                .map(|(members, intrinsic)| {
                    if intrinsic { format!("{{{}}} (intrinsic cycle)", members.join(", ")) } else { members.join(", ") }
                })
                .collect();
        writeln!(out, "  {:>3}. {}", i + 1, groups.join(", "))?;
    }
    Ok(ExitCode::SUCCESS)
}
