//! Policy compile at scale, on generated policies ([`depfence::synth`]).
//!
//! ```text
//! cargo bench -p depfence --bench compile            # everything, a few minutes
//! cargo bench -p depfence --bench compile -- 1k_100k # the small size only
//! ```
//!
//! Groups, each at 1,000 services / 100,000 allow entries and 10,000 services / 1,000,000:
//!
//! * `toml_raw`: the baseline, `toml::de::DeTable::parse` of every file (the spanned TOML parser
//!   the policy front end is built on), without reading the tree;
//! * `parse`: [`depfence::policy::parse_sources`]: TOML with spans, every key and value checked,
//!   the AST built;
//! * `compile`: [`depfence::compile::compile`] of an already parsed policy: names, rules, graph
//!   checks, bootstrap order, the snapshot and its hash;
//! * `end_to_end`: parse, compile and [`depfence::snapshot::Snapshot::to_bytes`];
//! * `error_path`: the same policy with one misspelled service reference: parse and
//!   [`depfence::compile::analyze`], which must report it (checked before timing);
//! * `incremental`: a one-file edit recompiled by a warm [`IncrementalCompiler`]: each iteration
//!   compiles the files with one allow entry added to the middle file, or without it again (so
//!   every iteration is a one-file edit of the last), comparing the unchanged files' texts with
//!   its cache (the agent skips those by their stamps).
//!
//! Inputs are in memory (no file reading); outputs are dropped outside the timing.

#![allow(clippy::panic, clippy::expect_used, reason = "a benchmark with invalid inputs must stop")]

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use depfence::compile::{IncrementalCompiler, analyze, compile};
use depfence::policy::parse_sources;
use depfence::synth::{SynthSpec, generate, inject_unknown_service, total_bytes};

type Files = Vec<(String, String)>;

struct Size {
    label: &'static str,
    spec: SynthSpec,
    measurement: Duration,
}

const SIZES: [(&str, usize, usize, u64); 2] = [("1k_100k", 1_000, 100_000, 8), ("10k_1m", 10_000, 1_000_000, 30)];

fn sizes() -> Vec<Size> {
    SIZES
        .iter()
        .map(|&(label, services, entries, secs)| Size {
            label,
            spec: SynthSpec::new(services, entries),
            measurement: Duration::from_secs(secs),
        })
        .collect()
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, size: &Size) {
    // Every iteration takes milliseconds to seconds: ten equal samples are enough.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(size.measurement);
}

fn toml_raw(files: &Files) -> usize {
    files.iter().map(|(_, text)| toml::de::DeTable::parse(text).map_or(0, |table| table.get_ref().len())).sum()
}

fn bench_size(c: &mut Criterion, size: &Size) {
    let files = generate(&size.spec);
    let bytes = total_bytes(&files) as u64;
    let entries = size.spec.allow_entries as u64;

    // Check the inputs once, outside the timing: the policy is valid, the typo is the one error.
    let parsed = parse_sources(files.clone());
    assert!(parsed.syntax_ok && !parsed.diagnostics.has_errors(), "generated policy does not parse");
    let rules = match compile(&parsed.policy) {
        Ok(compiled) => compiled.snapshot.net_rule_count(0),
        Err(e) => panic!("generated policy does not compile: {e}"),
    };
    let mut broken = files.clone();
    let typo = inject_unknown_service(&mut broken).expect("the policy has a service reference");
    let errors = analyze(&parse_sources(broken.clone()).policy).diagnostics.errors().count();
    assert_eq!(errors, 1, "the misspelled `{typo}` must be the only error");
    eprintln!(
        "{}: {} files, {:.1} MiB, {} services, {entries} allow entries, {rules} net rules",
        size.label,
        files.len(),
        bytes as f64 / (1024.0 * 1024.0),
        size.spec.services
    );

    let mut group = c.benchmark_group("toml_raw");
    configure(&mut group, size);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(size.label, |b| b.iter(|| toml_raw(black_box(&files))));
    group.finish();

    let mut group = c.benchmark_group("parse");
    configure(&mut group, size);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(size.label, |b| {
        b.iter_batched(|| files.clone(), |files| parse_sources(black_box(files)), BatchSize::PerIteration)
    });
    group.finish();

    let mut group = c.benchmark_group("compile");
    configure(&mut group, size);
    group.throughput(Throughput::Elements(entries));
    group.bench_function(size.label, |b| {
        b.iter_batched(|| (), |()| compile(black_box(&parsed.policy)), BatchSize::PerIteration)
    });
    group.finish();

    let mut group = c.benchmark_group("end_to_end");
    configure(&mut group, size);
    group.throughput(Throughput::Elements(entries));
    group.bench_function(size.label, |b| {
        b.iter_batched(
            || files.clone(),
            |files| {
                let parsed = parse_sources(black_box(files));
                let compiled = compile(&parsed.policy).map_err(|e| e.to_string());
                let bytes = compiled.as_ref().ok().and_then(|c| c.snapshot.to_bytes().ok());
                (parsed, compiled, bytes)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("error_path");
    configure(&mut group, size);
    group.throughput(Throughput::Elements(entries));
    group.bench_function(size.label, |b| {
        b.iter_batched(
            || broken.clone(),
            |files| {
                let parsed = parse_sources(black_box(files));
                let analysis = analyze(&parsed.policy);
                (parsed, analysis.diagnostics)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    let mut edited = files.clone();
    let middle = edited.len() / 2;
    let (_, text) = edited.get_mut(middle).expect("a middle file");
    let at = text.find("allow = [").expect("an allow list") + "allow = [".len();
    text.insert_str(at, "{ ip = \"198.18.7.7\", ports = [443] }, ");
    let versions = [files.clone(), edited];
    let mut compiler = IncrementalCompiler::new();
    for version in &versions {
        assert!(compiler.compile_sources(version.clone()).is_ok(), "the edited policy does not compile");
    }
    let mut next = 0;
    let mut group = c.benchmark_group("incremental");
    configure(&mut group, size);
    group.bench_function(size.label, |b| {
        b.iter_batched(
            || {
                next = 1 - next;
                versions.get(next).cloned().unwrap_or_default()
            },
            |files| compiler.compile_sources(black_box(files)).map(|c| c.snapshot.hash()).map_err(|e| e.to_string()),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    // A filter that names sizes (`-- 1k_100k`) skips generating the others' inputs.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let names_size = |f: &String| SIZES.iter().any(|(label, ..)| f.contains(label));
    for size in sizes() {
        let excluded =
            !filters.is_empty() && filters.iter().all(names_size) && !filters.iter().any(|f| f.contains(size.label));
        if !excluded {
            bench_size(c, &size);
        }
    }
}

criterion_group!(compile_benches, benches);
criterion_main!(compile_benches);
