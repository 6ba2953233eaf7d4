//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Check, compile, draw and explain depfence dependency policies.
#[derive(Debug, Parser)]
#[command(name = "policyctl", version, about, propagate_version = true)]
pub struct Cli {
    /// How to print policy problems.
    #[arg(long, global = true, value_enum, default_value_t = ErrorFormat::Human)]
    pub error_format: ErrorFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Rendering of diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ErrorFormat {
    /// Source line with a caret, labels and help.
    Human,
    /// One `file:line:col: severity[code]: message` line each.
    Plain,
    /// A JSON document on standard output.
    Json,
}

/// Output for results a program may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For programs.
    Json,
}

/// The policy to read: `PATH`, `--policy PATH` or `$DEPFENCE_POLICY`.
#[derive(Debug, Args)]
pub struct PolicyArg {
    /// Policy file, or a directory whose `*.toml` files form one policy.
    #[arg(value_name = "PATH", required_unless_present = "policy", conflicts_with = "policy")]
    path: Option<PathBuf>,
    /// The same, as an option.
    #[arg(short, long, env = "DEPFENCE_POLICY", value_name = "PATH", hide_env_values = true)]
    policy: Option<PathBuf>,
}

impl PolicyArg {
    /// The policy path, however it was given.
    pub fn path(&self) -> &std::path::Path {
        self.path.as_deref().or(self.policy.as_deref()).unwrap_or(std::path::Path::new("."))
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a policy: syntax, names, layers, isolation, cycles, criticality.
    Check {
        #[command(flatten)]
        policy: PolicyArg,
        /// Fail (exit 1) on warnings too.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Compile a policy into a snapshot file.
    Compile {
        #[command(flatten)]
        policy: PolicyArg,
        /// Where to write the snapshot.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Snapshot encoding.
        #[arg(long, value_enum, default_value_t = SnapshotFormat::Binary)]
        format: SnapshotFormat,
    },
    /// Draw the dependency graph: layers as ranks, cycles and violations highlighted.
    Graph {
        #[command(flatten)]
        policy: PolicyArg,
        /// Graph language.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Explain the verdict for a connection from a service to a destination.
    Explain {
        #[command(flatten)]
        policy: PolicyArg,
        /// The service that connects.
        #[arg(long, value_name = "SERVICE")]
        from: String,
        /// Destination as `ADDR:PORT[/PROTO]` (`[v6]:PORT` for IPv6; protocol defaults to tcp).
        #[arg(long, value_name = "ADDR:PORT[/PROTO]")]
        to: String,
        /// Environment to judge in (default: every environment).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the order in which services can start: lower layers and dependencies first.
    BootstrapOrder {
        #[command(flatten)]
        policy: PolicyArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Run a command and everything it starts in a fresh cgroup under one service's policy,
    /// enforced by the kernel; report what it tried that the policy does not allow.
    Run {
        #[command(flatten)]
        policy: PolicyArg,
        /// The service whose allow list applies.
        #[arg(long, value_name = "SERVICE")]
        service: String,
        /// `audit`: allow, but count and report; `enforce`: refuse with EPERM.
        #[arg(long, value_enum, default_value_t = RunMode::Audit)]
        mode: RunMode,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Show what depfence has loaded, attached and pinned in the kernel: maps with fill levels,
    /// links with their programs and cgroups, registered cgroups with their counters (root).
    Status {
        /// One pin root (a `depfence*` directory on bpffs) instead of every one found.
        #[arg(long, value_name = "DIR")]
        pins: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Modes of `policyctl run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunMode {
    /// Soft-apply: allow, count and report.
    Audit,
    /// Refuse (EPERM), count and report.
    Enforce,
}

/// Snapshot encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotFormat {
    /// Compact, verified on load (magic, format version, content hash).
    Binary,
    /// Readable JSON, for review and diffing.
    Json,
}

/// Graph languages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// Graphviz.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
    /// Nodes, edges, components and violations as JSON.
    Json,
}
