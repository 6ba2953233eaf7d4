//! Loads, compiles and encodes a policy in one process, timing every stage: the end-to-end scale
//! measurement behind BENCHMARKS.md. Run it under `/usr/bin/time -v` for the peak RSS.
//!
//! ```text
//! cargo run --release -p depfence --example compile_policy -- DIR [--toml-baseline]
//! ```
//!
//! `--toml-baseline` only reads the files and parses each with the raw TOML parser
//! (`toml::de::DeTable::parse`, the parser the policy front end is built on), for comparison.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use depfence::compile::{CompileError, compile};
use depfence::policy::load;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: compile_policy DIR|FILE [--toml-baseline]");
        return ExitCode::FAILURE;
    };
    if std::env::args().nth(2).as_deref() == Some("--toml-baseline") {
        return toml_baseline(&path);
    }
    let total = Instant::now();

    let started = Instant::now();
    let parsed = match load(&path) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("compile_policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parse_time = started.elapsed();
    let files = parsed.policy.sources.files();
    let bytes: usize = files.iter().map(|f| f.text().len()).sum();
    let services = parsed.policy.services.len();
    let entries: usize = parsed.policy.services.iter().map(|s| s.allow.len()).sum();
    println!(
        "load+parse    {:>9.3} s   {} files, {:.1} MiB, {services} services, {entries} allow entries",
        parse_time.as_secs_f64(),
        files.len(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    if !parsed.syntax_ok || parsed.diagnostics.has_errors() {
        eprintln!("compile_policy: the policy has {} parse error(s)", parsed.diagnostics.errors().count());
        for d in parsed.diagnostics.errors().take(5) {
            eprintln!("  {}", d.to_plain(&parsed.policy.sources));
        }
        return ExitCode::FAILURE;
    }

    let started = Instant::now();
    let compiled = match compile(&parsed.policy) {
        Ok(compiled) => compiled,
        Err(CompileError::Invalid { diagnostics, .. }) => {
            println!("compile       {:>9.3} s", started.elapsed().as_secs_f64());
            eprintln!("compile_policy: the policy has {} error(s)", diagnostics.errors().count());
            for d in diagnostics.errors().take(5) {
                eprintln!("  {}", d.to_plain(&parsed.policy.sources));
            }
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("compile_policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let compile_time = started.elapsed();
    let snapshot = &compiled.snapshot;
    let net_rules = snapshot.net_rule_count(0);
    let host_rules: usize = snapshot.services().iter().map(|s| s.rules(0).host_rules.len()).sum();
    // The first environment's graph (the synthetic policies have one graph for all).
    let graph = compiled.analysis.graph(0);
    println!(
        "compile       {:>9.3} s   {} services, {} edges, {} stages, {net_rules} net rules, {host_rules} host rules, {} warnings",
        compile_time.as_secs_f64(),
        snapshot.services().len(),
        graph.map_or(0, |g| g.edges.len()),
        graph.map_or(0, |g| g.stages.len()),
        compiled.analysis.diagnostics.warnings().count()
    );

    let started = Instant::now();
    let bytes = match snapshot.to_bytes() {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("compile_policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let encode_time = started.elapsed();
    println!(
        "encode        {:>9.3} s   {:.1} MiB snapshot, hash {}",
        encode_time.as_secs_f64(),
        bytes.len() as f64 / (1024.0 * 1024.0),
        snapshot.hash()
    );

    let total = total.elapsed();
    let rules = net_rules + host_rules;
    println!(
        "total         {:>9.3} s   {:.0} rules/s, {:.0} allow entries/s",
        total.as_secs_f64(),
        rules as f64 / total.as_secs_f64(),
        entries as f64 / total.as_secs_f64()
    );

    // Freeing everything is part of the process's wall time, not of the compile.
    let started = Instant::now();
    drop(bytes);
    drop(compiled);
    drop(parsed);
    println!("(free memory  {:>9.3} s, not in the total)", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

/// Reads every `*.toml` file in `dir` and parses it with the raw TOML parser only.
fn toml_baseline(dir: &std::path::Path) -> ExitCode {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            eprintln!("compile_policy: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    paths.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    paths.sort();
    let started = Instant::now();
    let mut bytes = 0;
    let mut tables = 0;
    for path in &paths {
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("compile_policy: cannot read {}", path.display());
            return ExitCode::FAILURE;
        };
        bytes += text.len();
        match toml::de::DeTable::parse(&text) {
            Ok(table) => tables += table.get_ref().len(),
            Err(e) => {
                eprintln!("compile_policy: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "read+toml     {:>9.3} s   {} files, {:.1} MiB, {tables} top-level keys",
        started.elapsed().as_secs_f64(),
        paths.len(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    ExitCode::SUCCESS
}
