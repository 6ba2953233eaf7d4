//! Loads, compiles and encodes a policy in one process, timing every stage: the end-to-end scale
//! measurement behind BENCHMARKS.md. Run it under `/usr/bin/time -v` for the peak RSS.
//!
//! ```text
//! cargo run --release -p depfence --example compile_policy -- DIR [--toml-baseline | --edit]
//! ```
//!
//! `--toml-baseline` only reads the files and parses each with the raw TOML parser
//! (`toml::de::DeTable::parse`, the parser the policy front end is built on), for comparison.
//!
//! `--edit` measures the incremental compile: an [`IncrementalCompiler`] compiles the directory,
//! then one allow entry is added to one file (in memory) and the policy is compiled again,
//! stage by stage, and checked against a full compile of the edited files (same hash, same
//! bytes). Then the agent's path: a copy of the directory in a temporary directory, compiled
//! from the files, then one file rewritten on disk and compiled again (reading only that file),
//! 21 times: the first such compile, and the median and the slowest of the others.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use depfence::compile::{CompileError, Compiled, IncrementalCompiler, analyze, compile, compile_sources};
use depfence::policy::{ParseCache, load};

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: compile_policy DIR|FILE [--toml-baseline]");
        return ExitCode::FAILURE;
    };
    match std::env::args().nth(2).as_deref() {
        Some("--toml-baseline") => return toml_baseline(&path),
        Some("--edit") => return edit(&path),
        _ => {}
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

    // The peak resident memory so far: the load, the parse and the compile (Linux).
    let peak = |what: &str| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
            let kib: f64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            println!("peak RSS {what}  {:.1} MiB", kib / 1024.0);
        }
    };
    peak("after the compile");

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

    peak("after the encoding");
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

/// The `*.toml` files of `dir`, sorted.
fn toml_files(dir: &std::path::Path) -> Option<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            eprintln!("compile_policy: {}: {e}", dir.display());
            return None;
        }
    };
    paths.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    paths.sort();
    Some(paths)
}

fn secs(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

/// The incremental compile after a one-file edit, stage by stage.
fn edit(dir: &std::path::Path) -> ExitCode {
    let Some(paths) = toml_files(dir) else { return ExitCode::FAILURE };
    let started = Instant::now();
    let mut texts = Vec::new();
    for path in &paths {
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("compile_policy: cannot read {}", path.display());
            return ExitCode::FAILURE;
        };
        texts.push((path.display().to_string(), text));
    }
    println!("read          {:>9.3} s   {} files", secs(started), texts.len());

    // Warm: the compiler and a bare parse cache hold the unedited policy.
    let mut compiler = IncrementalCompiler::new();
    let mut cache = ParseCache::new();
    let started = Instant::now();
    if let Err(e) = compiler.compile_sources(texts.clone()) {
        eprintln!("compile_policy: {e}");
        return ExitCode::FAILURE;
    }
    println!("first compile {:>9.3} s   (IncrementalCompiler, empty cache)", secs(started));
    cache.parse_sources(texts.clone());
    // The cache's own cost: the same files again (compared, kept, merged; nothing parsed).
    let same = texts.clone();
    let started = Instant::now();
    cache.parse_sources(same);
    println!("unchanged     {:>9.3} s   parse with {} file(s) re-parsed", secs(started), cache.reparsed());

    // The edit: one more allow entry in the middle file's first allow list.
    let mut edited = texts.clone();
    let index = edited.len() / 2;
    let Some((name, text)) = edited.get_mut(index) else { return ExitCode::FAILURE };
    let Some(at) = text.find("allow = [").map(|at| at + "allow = [".len()) else {
        eprintln!("compile_policy: no allow list in {name}");
        return ExitCode::FAILURE;
    };
    text.insert_str(at, "{ ip = \"198.18.7.7\", ports = [443] }, ");
    println!("edit          one allow entry added in {name}");

    // Stage by stage, on the bare cache.
    let started = Instant::now();
    cache.parse_sources(edited.clone());
    println!("  parse       {:>9.3} s   {} file(s) re-parsed, merged", secs(started), cache.reparsed());
    let Some(parsed) = cache.parsed() else { return ExitCode::FAILURE };
    let started = Instant::now();
    let analysis = analyze(&parsed.policy);
    println!("  analyze     {:>9.3} s   names, rules, inferred edges, graph checks, bootstrap", secs(started));
    let started = Instant::now();
    let compiled = match analysis.freeze(parsed.policy.sources.clone()) {
        Ok(compiled) => compiled,
        Err(e) => {
            eprintln!("compile_policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("  freeze      {:>9.3} s   snapshot + SHA-256", secs(started));
    let started = Instant::now();
    let bytes = compiled.snapshot.to_bytes().unwrap_or_default();
    println!("  encode      {:>9.3} s", secs(started));
    // What reusing resolved services from a cache would cost at least: copying them out.
    let started = Instant::now();
    let copy = compiled.snapshot.content().services.clone();
    println!("  (copy of every service's rules {:.3} s, not in the compile)", secs(started));
    drop(copy);
    drop(compiled);

    // The real path, against a full compile of the same files.
    let input = edited.clone();
    let started = Instant::now();
    let incremental = match compiler.compile_sources(input) {
        Ok(compiled) => compiled,
        Err(e) => {
            eprintln!("compile_policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "incremental   {:>9.3} s   {} file(s) re-parsed, hash {}",
        secs(started),
        compiler.reparsed(),
        incremental.snapshot.hash()
    );
    let edited_text = edited.get(index).map(|(_, text)| text.clone()).unwrap_or_default();
    let started = Instant::now();
    let full = match compile_sources(edited) {
        Ok(compiled) => compiled,
        Err(e) => {
            eprintln!("compile_policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("full          {:>9.3} s   hash {}", secs(started), full.snapshot.hash());
    let same = full.snapshot.to_bytes().ok() == Some(bytes.clone())
        && incremental.snapshot.to_bytes().ok() == Some(bytes)
        && full.warning_lines() == incremental.warning_lines();
    println!("same bytes, hash and warnings: {same}");
    if !same {
        return ExitCode::FAILURE;
    }
    match on_disk(&texts, index, &edited_text, &full) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compile_policy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Edits compiled from files after the first, in `on_disk`.
const ON_DISK_EDITS: usize = 20;

/// The agent's path: `texts` written to a temporary directory and compiled from there, then
/// file `index` rewritten ([`ON_DISK_EDITS`] + 1 times, ending as `edited`) and compiled again
/// each time; the last compile checked against `expected`.
fn on_disk(texts: &[(String, String)], index: usize, edited: &str, expected: &Compiled) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let files: Vec<(PathBuf, &str)> = texts
        .iter()
        .map(|(name, text)| {
            (dir.path().join(std::path::Path::new(name).file_name().unwrap_or_default()), text.as_str())
        })
        .collect();
    for (path, text) in &files {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // A file's stamp is trusted once the file was unchanged for 2 s before it was read.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut compiler = IncrementalCompiler::new();
    compiler.compile_path(dir.path()).map_err(|e| e.to_string())?;
    // Edits one after the other, as an agent sees them: the edit, then the same text with one
    // more trailing newline (parsed again, same content), and so on, ending with the edit.
    let (path, _) = files.get(index).ok_or("no such file")?;
    let mut times = Vec::new();
    let mut compiled = None;
    for round in 0..=ON_DISK_EDITS {
        let text = if round % 2 == 0 { edited.to_owned() } else { format!("{edited}\n") };
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        let started = Instant::now();
        compiled = Some(compiler.compile_path(dir.path()).map_err(|e| e.to_string())?);
        times.push(secs(started));
        if compiler.reparsed() != 1 || compiler.unread() != files.len() - 1 {
            return Err(format!("read {} file(s) anew, not one", files.len() - compiler.unread()));
        }
    }
    let first = times.remove(0);
    times.sort_by(f64::total_cmp);
    let (median, last) = (times.get(times.len() / 2).copied(), times.last().copied());
    println!(
        "from files    {first:>9.3} s   the first edit after the full compile; the next {}: median {:.3} s, \
         at most {:.3} s (one file read and parsed anew, {} not read: the agent's reload)",
        times.len(),
        median.unwrap_or_default(),
        last.unwrap_or_default(),
        files.len() - 1
    );
    let compiled = compiled.ok_or("no edit compiled")?;
    // The files are in another directory, so the sources (and the hash) differ: compare content.
    let same = compiled.snapshot.content() == expected.snapshot.content();
    println!("same rules, graph and bootstrap as the full compile: {same}");
    if same { Ok(()) } else { Err("the compile from files differs".into()) }
}

/// Reads every `*.toml` file in `dir` and parses it with the raw TOML parser only.
fn toml_baseline(dir: &std::path::Path) -> ExitCode {
    let Some(paths) = toml_files(dir) else { return ExitCode::FAILURE };
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
