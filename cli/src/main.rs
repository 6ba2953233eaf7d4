//! `policyctl`: check, compile, draw and explain depfence dependency policies.
//!
//! Exit codes: 0 ok, 1 invalid policy (or warnings with `--deny-warnings`), 2 usage error
//! (including a policy path that cannot be read).

mod agent;
mod args;
mod commands;
mod graph;
mod output;
mod run;
mod status;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: compiling a large policy allocates and frees millions of small values; this
/// allocator cuts that time by about 15 % (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(error) if output::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(output::EXIT_USAGE)
        }
    }
}
