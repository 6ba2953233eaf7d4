//! `policyctl`: check, compile, draw and explain depfence dependency policies, run the agent
//! that enforces them, and talk to it.
//!
//! A thin front end over the engine: `args` parses the command line, `commands` has one module
//! per subcommand, `output` prints diagnostics, and `error` holds the failures and the one table
//! of exit codes (0 ok, 1 invalid policy or a refused request, 2 usage, 3 kernel, 4 agent,
//! 5 I/O, 64 agent configuration).

mod args;
mod commands;
mod error;
mod output;

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
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
