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

/// Output of `diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    /// For people, in a terminal.
    Text,
    /// For a pull-request comment.
    Markdown,
    /// For programs.
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
    #[arg(value_name = "PATH", conflicts_with = "policy")]
    path: Option<PathBuf>,
    /// The same, as an option.
    #[arg(short, long, env = "DEPFENCE_POLICY", value_name = "PATH", hide_env_values = true)]
    policy: Option<PathBuf>,
}

impl PolicyArg {
    /// The policy path, however it was given.
    pub fn path(&self) -> Result<&std::path::Path, crate::error::CliError> {
        self.path.as_deref().or(self.policy.as_deref()).ok_or_else(|| {
            crate::error::CliError::Usage("no policy given: pass PATH, --policy PATH or set DEPFENCE_POLICY".into())
        })
    }
}

/// What `check-deploy` and `deploy-order` read.
#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub policy: PolicyArg,
    /// The deployed-versions manifest of the environment (TOML, written by the CD system).
    #[arg(long, value_name = "FILE")]
    pub deployed: PathBuf,
    /// The environment the manifest describes.
    #[arg(short, long, value_name = "NAME")]
    pub environment: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Where the running agent listens.
#[derive(Debug, Args)]
pub struct SocketArg {
    /// The agent's control socket.
    #[arg(long, env = "DEPFENCE_SOCKET", value_name = "PATH", default_value = depfence::agent::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `promote --prometheus`: the fleet's evidence, read from Prometheus, instead of one agent's.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Decide on the whole fleet's evidence from this Prometheus (or Thanos, Mimir,
    /// VictoriaMetrics) and rewrite the policy in the checkout (`--policy`); no agent needed.
    /// Exit 0 promoted, 1 refused, 75 inconclusive.
    #[arg(long, value_name = "URL", requires = "policy", conflicts_with = "force")]
    pub prometheus: Option<String>,
    /// The policy checkout the agents run (with `--prometheus`).
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,
    /// The window the evidence must cover.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub window: std::time::Duration,
    /// The fewest connections the fleet must have seen in the window.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub min_connections: u64,
    /// The fewest connections each host must have seen in the window.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub min_per_host: u64,
    /// The Prometheus job the agents are scraped as.
    #[arg(long, value_name = "NAME", default_value = "depfence")]
    pub job: String,
    /// A file holding a bearer token (or `$DEPFENCE_PROMETHEUS_TOKEN`).
    #[arg(long, value_name = "FILE")]
    pub bearer_token_file: Option<PathBuf>,
    /// Basic authentication user; the password from `--basic-password-file` or
    /// `$DEPFENCE_PROMETHEUS_PASSWORD`.
    #[arg(long, value_name = "USER")]
    pub basic_user: Option<String>,
    /// A file holding the basic authentication password.
    #[arg(long, value_name = "FILE", requires = "basic_user")]
    pub basic_password_file: Option<PathBuf>,
    /// Give up on a request to Prometheus after this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Append the decision, its queries and answers to this file (default:
    /// `depfence-promotions.jsonl` beside the policy).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The agent's DNS proxy, for services with host rules.
#[derive(Debug, Args)]
pub struct DnsArgs {
    /// Run no DNS proxy (host rules then allow nothing).
    #[arg(long)]
    pub no_dns: bool,
    /// The proxy's port on loopback (0: any free one; the kernel redirect follows it).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub dns_port: u16,
    /// Upstream DNS server `ADDR:PORT` (repeat for more; default: /etc/resolv.conf's).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// The answer to a name a service may not resolve, in enforce.
    #[arg(long, value_enum, default_value_t = DnsDeny::Refused)]
    pub dns_deny: DnsDeny,
    /// Shortest time an answered address stays allowed, whatever its TTL.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub dns_ttl_floor: std::time::Duration,
    /// Longest time (answers' TTLs are lowered to it).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub dns_ttl_cap: std::time::Duration,
}

/// `--dns-deny`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DnsDeny {
    /// REFUSED.
    Refused,
    /// NXDOMAIN.
    Nxdomain,
}

impl DnsArgs {
    /// The agent's settings (None with `--no-dns`).
    pub fn settings(&self) -> Option<depfence::agent::DnsSettings> {
        (!self.no_dns).then(|| depfence::agent::DnsSettings {
            port: self.dns_port,
            upstreams: self.dns_upstream.clone(),
            deny: match self.dns_deny {
                DnsDeny::Refused => depfence::dns::DenyResponse::Refused,
                DnsDeny::Nxdomain => depfence::dns::DenyResponse::NxDomain,
            },
            ttl: depfence::dns::TtlBounds { floor: self.dns_ttl_floor, cap: self.dns_ttl_cap },
        })
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
        /// Judge one environment (default: every environment).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
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
        /// The environment whose graph to draw (needed when the environments' graphs differ).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
    },
    /// Explain the verdict for a connection from a service to a destination.
    Explain {
        #[command(flatten)]
        policy: PolicyArg,
        /// Ask the running agent, against the policy in force, instead of reading a policy.
        #[arg(long, conflicts_with_all = ["path", "policy", "environment"])]
        live: bool,
        #[command(flatten)]
        socket: SocketArg,
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
        /// The environment whose order to print (needed when the environments' graphs differ).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
    },
    /// Check a planned deploy against the policy's version requirements (`requires`): during the
    /// rollout (old and new versions side by side) and after it. Exit 0 safe, 12 unsafe.
    CheckDeploy {
        #[command(flatten)]
        deploy: DeployArgs,
        /// The planned change, `SERVICE=VERSION` (repeat for more); none: check what runs now.
        #[arg(long = "set", value_name = "SERVICE=VERSION")]
        sets: Vec<String>,
    },
    /// The order in which to roll out planned changes, one service at a time, so that every
    /// step meets the version requirements. Exit 0 with an order, 12 when none works.
    DeployOrder {
        #[command(flatten)]
        deploy: DeployArgs,
        /// The planned change, `SERVICE=VERSION` (repeat for more).
        #[arg(long = "set", value_name = "SERVICE=VERSION", required = true)]
        sets: Vec<String>,
    },
    /// Run a command and everything it starts in a fresh cgroup under one service's policy,
    /// enforced by the kernel; report what it tried that the policy does not allow.
    ///
    /// The command starts with only its standard streams (stdin, stdout, stderr) and the
    /// descriptors named by `--pass-fd`: a socket keeps the cgroup it was created in, so one
    /// opened outside would connect past the policy. It runs with `no_new_privs`: setuid and
    /// file-capability programs gain no privileges in it.
    Run {
        #[command(flatten)]
        policy: PolicyArg,
        /// The service whose allow list applies.
        #[arg(long, value_name = "SERVICE")]
        service: String,
        /// The environment whose rules apply (needed when the policy has several).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
        /// `audit`: allow, but count and report; `enforce`: refuse with EPERM.
        #[arg(long, value_enum, default_value_t = RunMode::Audit)]
        mode: RunMode,
        /// Also pass this open descriptor on to the command (repeat for more). A socket passed
        /// on keeps the policy, or the lack of one, of the cgroup it was created in.
        #[arg(long = "pass-fd", value_name = "FD")]
        pass_fds: Vec<i32>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Show the running agent's services (mode, generation, counters, last would-reject); with
    /// `--kernel` or when no agent runs, what is loaded, attached and pinned in the kernel (root).
    Status {
        /// Show the kernel's pinned state instead of asking the agent.
        #[arg(long)]
        kernel: bool,
        /// One pin root (a `depfence*` directory on bpffs) instead of every one found (implies --kernel).
        #[arg(long, value_name = "DIR")]
        pins: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Run the agent: apply the policy to this machine's cgroups in the kernel, follow its
    /// changes, export Prometheus metrics, answer policyctl on the control socket (root).
    Agent(AgentArgs),
    /// Move a service to enforce once the evidence says it is safe: no would-rejects within the
    /// window and enough observed traffic (or `--force --reason`). Rewrites the mode in the
    /// policy file (comments and layout kept); the running agent applies it at once.
    Promote {
        /// The service.
        service: String,
        /// Promote to enforce (the only target).
        #[arg(long, required = true)]
        enforce: bool,
        /// The environment (default: the agent's).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
        /// Promote even though the evidence does not allow it.
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why (logged with who and when; required with --force).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Only check the evidence (exit 0 if a promotion would be accepted, 1 if not); change
        /// nothing. For policies kept elsewhere (a ConfigMap, a repository).
        #[arg(long, conflicts_with_all = ["force", "reason"])]
        dry_run: bool,
        #[command(flatten)]
        socket: SocketArg,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Move a service back to audit (no evidence needed); logged like a promotion.
    Demote {
        /// The service.
        service: String,
        /// The environment (default: the agent's).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
        /// Why (logged with who and when).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Make the running agent re-read its policy now (as SIGHUP does).
    Reload {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Print the running agent's recent events: would-rejects and rejections with the process.
    Events {
        /// Keep printing new events as they come.
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// How many recent events to print first.
        #[arg(long, default_value_t = 20)]
        recent: usize,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Load a candidate policy, evaluated in the kernel beside the active one (`status` and the
    /// metrics show what it would reject); `--activate` makes it the policy, `--drop` stops it.
    Apply {
        /// The candidate policy file or directory.
        #[arg(long, value_name = "PATH", required_unless_present_any = ["drop", "activate"])]
        candidate: Option<PathBuf>,
        /// Stop evaluating the candidate.
        #[arg(long, conflicts_with_all = ["candidate", "activate"])]
        drop: bool,
        /// Make the candidate the active policy: its files replace the policy's, and the agent
        /// applies them at once.
        #[arg(long, conflicts_with = "candidate")]
        activate: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Compare two policies (files or directories): per environment, what changes for
    /// enforcement (modes, rules, verdicts) and for the dependency graph (edges, problems).
    ///
    /// Exit code 0: nothing changes where a service enforces; 10: something does; 1: the new
    /// policy is invalid (its new problems are listed).
    Diff {
        /// The policy before the change.
        #[arg(value_name = "OLD")]
        old: PathBuf,
        /// The policy after the change.
        #[arg(value_name = "NEW")]
        new: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
        output: DiffFormat,
    },
    /// Propose the policy change the audit evidence asks for: allow entries for the destinations
    /// services were would-rejected to, checked against the dependency model.
    ///
    /// Exit code 0: nothing to propose; 10: proposals made (a diff, or written with --write);
    /// 11: some would-rejects need a decision (the model refuses the entry they ask for).
    Learn {
        /// Only these services (default: every service with evidence).
        #[arg(value_name = "SERVICE")]
        services: Vec<String>,
        /// The policy checkout to change.
        #[arg(long, value_name = "PATH")]
        policy: PathBuf,
        /// The window of evidence.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
        /// The environment (default: the agent's; with --prometheus, the policy's only one).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
        /// Write the change into the policy files (to the file that defines each service) instead
        /// of printing it as a diff.
        #[arg(long)]
        write: bool,
        /// Read the whole fleet's evidence from this Prometheus instead of the local agent (a
        /// bearer token from `$DEPFENCE_PROMETHEUS_TOKEN`).
        #[arg(long, value_name = "URL", conflicts_with = "agent")]
        prometheus: Option<String>,
        /// Read the evidence from the local agent (the default), at this control socket.
        #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = depfence::agent::DEFAULT_SOCKET)]
        agent: Option<PathBuf>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// The declared dependencies and allow rules nothing used in a window ("rules with no hits"),
    /// from the local agent (every rule) or the fleet's Prometheus (every declared backend).
    /// Exit 10 when something was unused.
    Unused {
        /// The window.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
        /// Read the whole fleet's hits from this Prometheus (needs --policy; a bearer token from
        /// `$DEPFENCE_PROMETHEUS_TOKEN`).
        #[arg(long, value_name = "URL", conflicts_with = "agent", requires = "policy")]
        prometheus: Option<String>,
        /// The policy whose declared dependencies are judged (with --prometheus).
        #[arg(long, value_name = "PATH")]
        policy: Option<PathBuf>,
        /// The environment (with --prometheus; default: the policy's only one).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
        /// Read the hits from the local agent (the default), at this control socket.
        #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = depfence::agent::DEFAULT_SOCKET)]
        agent: Option<PathBuf>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Who depends on a service: the services with an edge to it in the environment's
    /// dependency graph (allow entries naming it, and edges inferred from addresses), with
    /// `--transitive` also those that reach it through others; most critical first.
    Dependents {
        /// The service.
        #[arg(value_name = "SERVICE")]
        service: String,
        #[command(flatten)]
        policy: PolicyArg,
        /// Also the services that depend on it through others.
        #[arg(long)]
        transitive: bool,
        /// The environment whose graph to walk (needed when the environments' graphs differ).
        #[arg(short, long, value_name = "NAME")]
        environment: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Export the policy, its dependency graph and (with `--agent` or `--prometheus`) the
    /// traffic the agents saw, as a SQLite database for SQL queries (schema:
    /// docs/export-schema.md). The file is written whole, and never over an existing one unless
    /// `--force`.
    Export {
        #[command(flatten)]
        policy: PolicyArg,
        /// The database file to write.
        #[arg(long, value_name = "FILE")]
        sqlite: PathBuf,
        /// Export only this environment (repeat for more; default: every environment).
        #[arg(short, long = "environment", value_name = "NAME")]
        environments: Vec<String>,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
        /// Add the deployed-versions manifest of an environment (`ENV=FILE`, repeat for more; a
        /// bare `FILE` when exactly one environment is exported): the `deployed_versions` table.
        #[arg(long, value_name = "ENV=FILE")]
        deployed: Vec<String>,
        /// Add the local agent's observed traffic (would-rejects and the hits of the declared
        /// dependencies), from this control socket (`--agent=SOCKET`; `--agent` alone: the
        /// default socket).
        #[arg(long, value_name = "SOCKET", num_args = 0..=1, require_equals = true,
              default_missing_value = depfence::agent::DEFAULT_SOCKET, conflicts_with = "prometheus")]
        agent: Option<PathBuf>,
        /// Add the whole fleet's observed traffic (would-rejects and the hits of the declared
        /// dependencies) from this Prometheus (two queries per exported environment).
        #[arg(long, value_name = "URL")]
        prometheus: Option<String>,
        /// The window of observed traffic.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
    },
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `policyctl agent`'s options.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub policy: PolicyArg,
    /// The environment this machine is in (selects each service's mode).
    #[arg(short, long, env = "DEPFENCE_ENVIRONMENT", value_name = "NAME")]
    pub environment: String,
    /// Prometheus listen address, or `none`.
    #[arg(long, value_name = "ADDR", default_value = depfence::agent::DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: String,
    /// bpffs directory for maps and links.
    #[arg(long, value_name = "DIR", default_value = depfence::agent::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// State directory (counter slots, evidence, promotion log).
    #[arg(long, value_name = "DIR", default_value = depfence::agent::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub socket: SocketArg,
    /// Log lines as text or JSON.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub log_format: Output,
    /// `promote --enforce` refuses if the service had would-rejects within this window.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub promote_window: std::time::Duration,
    /// ... or fewer connections than this in the window.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub promote_min_connections: u64,
    /// ... or was observed for less than this part of the window.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub promote_min_observed: std::time::Duration,
    /// How long to wait for another agent that holds the pin root or the state directory to
    /// exit (a restart that overlaps the old process), or to stop after --takeover.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lock_wait: std::time::Duration,
    /// Stop (SIGTERM) the agent that holds the pin root or the state directory and take over
    /// once it exited, instead of only waiting for it.
    #[arg(long)]
    pub takeover: bool,
    /// After a change to the policy's files, wait until they stay unchanged this long before
    /// applying them (a burst of writes is applied once). The compile starts at the change and
    /// is used unless the files changed again after it started.
    #[arg(long, value_name = "DURATION", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub reload_settle: std::time::Duration,
    /// Police only this subtree of the cgroup2 mount (relative to it); the policy's cgroup paths
    /// are then relative to the subtree (as inside a container's cgroup namespace).
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    #[command(flatten)]
    pub dns: DnsArgs,
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
