//! Writes a synthetic policy directory for benchmarks and scale tests.
//!
//! ```text
//! cargo run --release -p depfence --example gen_policy -- \
//!     --services 10000 --entries 1000000 [--teams 100] [--seed 42] [--typo] --out DIR
//! ```
//!
//! `--typo` misspells one service reference, so the policy has exactly one error.

use std::path::PathBuf;
use std::process::ExitCode;

use depfence::synth::{SynthSpec, generate, inject_unknown_service, total_bytes};

const USAGE: &str = "usage: gen_policy --services N --entries N [--teams N] [--seed N] [--typo] --out DIR";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gen_policy: {message}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut spec = SynthSpec::default();
    let mut teams = None;
    let mut out = None;
    let mut typo = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let value = args.next().ok_or_else(|| format!("{name} needs a value"))?;
            value.replace('_', "").parse().map_err(|e| format!("{name} {value}: {e}"))
        };
        match arg.as_str() {
            "--services" => spec.services = number("--services")? as usize,
            "--entries" => spec.allow_entries = number("--entries")? as usize,
            "--teams" => teams = Some(number("--teams")? as usize),
            "--seed" => spec.seed = number("--seed")?,
            "--typo" => typo = true,
            "--out" => out = Some(PathBuf::from(args.next().ok_or("--out needs a directory")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let out = out.ok_or("--out is required")?;
    spec.teams = teams.unwrap_or_else(|| SynthSpec::new(spec.services, spec.allow_entries).teams);

    let started = std::time::Instant::now();
    let mut files = generate(&spec);
    if typo {
        let name = inject_unknown_service(&mut files).ok_or("the policy has no service reference")?;
        eprintln!("misspelled a reference as `{name}`");
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, text) in &files {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    eprintln!(
        "wrote {} files ({:.1} MiB) with {} services and {} allow entries to {} in {:.2?}",
        files.len(),
        total_bytes(&files) as f64 / (1024.0 * 1024.0),
        spec.services,
        spec.allow_entries,
        out.display(),
        started.elapsed()
    );
    Ok(())
}
