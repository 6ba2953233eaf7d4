//! What can go wrong in `policyctl`, and the one table of exit codes (documented in the
//! README's "Exit codes").

use depfence::agent::AgentError;
use depfence::agent::control::ClientError;
use depfence::agent::lock::LockError;
use depfence::compile::CompileError;
use depfence::datapath::confine::ConfineError;
use depfence::datapath::status::StatusError;

/// Exit code: the policy is invalid (or has warnings, with `--deny-warnings`), or the agent
/// refused the request (a promotion against the evidence, an invalid policy to reload).
pub const EXIT_INVALID: u8 = 1;
/// Exit code: a usage error: a bad argument or option, a name the policy does not have, or a
/// path that cannot be read (clap uses 2 too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the kernel side failed: loading, attaching or reading the eBPF programs and
/// maps, bpffs or cgroups (most of it needs root).
pub const EXIT_KERNEL: u8 = 3;
/// Exit code: no agent answers on the control socket, or its answer is not understood.
pub const EXIT_AGENT: u8 = 4;
/// Exit code: reading or writing a file or a stream failed.
pub const EXIT_IO: u8 = 5;
/// Exit code: `policyctl diff` found a change to what a service enforces (in an environment
/// where it enforces before or after the change).
pub const EXIT_ENFORCEMENT_CHANGES: u8 = 10;
/// Exit code: `policyctl learn` proposed entries.
pub const EXIT_PROPOSALS: u8 = 10;
/// Exit code: `policyctl learn` found would-rejects whose entry the model refuses.
pub const EXIT_NEEDS_DECISION: u8 = 11;
/// Exit code: `policyctl unused` found a declared dependency or rule with no hit in the window.
pub const EXIT_UNUSED: u8 = 10;
/// Exit code: `policyctl check-deploy` found a version requirement the planned deploy breaks,
/// or `policyctl deploy-order` found no order that keeps every step safe.
pub const EXIT_UNSAFE_DEPLOY: u8 = 12;
/// Exit code: `policyctl promote --prometheus` could not decide (EX_TEMPFAIL): Prometheus down
/// or erroring, warnings, missing or stale hosts, a host on another policy, retention or samples
/// shorter than the window. Never a success.
pub const EXIT_INCONCLUSIVE: u8 = 75;
/// Exit code: `policyctl agent` cannot start with its configuration (EX_USAGE): an environment
/// the policy does not declare, or a pin root or state directory another agent holds.
pub const EXIT_AGENT_CONFIG: u8 = 64;

/// A failure of a command that is not a verdict on the policy (those are exit codes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// An argument is not valid.
    #[error("{0}")]
    Usage(String),
    /// The policy could not be read (a path that does not exist, say).
    #[error(transparent)]
    Load(#[from] depfence::policy::LoadError),
    /// A deployed-versions manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] depfence::deploy::ManifestError),
    /// Compiling failed for a reason other than the policy's own problems.
    #[error(transparent)]
    Compile(CompileError),
    /// Running a command under a service's policy failed.
    #[error(transparent)]
    Confine(#[from] ConfineError),
    /// Reading the kernel's pinned state failed.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// Talking to the agent failed.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The agent could not start, or stopped with an error.
    #[error("agent: {0}")]
    AgentRun(#[from] AgentError),
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl From<std::io::Error> for CliError {
    fn from(source: std::io::Error) -> Self {
        CliError::Io { context: "writing output".into(), source }
    }
}

impl CliError {
    /// The exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Load(_) | CliError::Manifest(_) => EXIT_USAGE,
            CliError::Compile(CompileError::Load(_)) => EXIT_USAGE,
            CliError::Compile(_) | CliError::Io { .. } => EXIT_IO,
            CliError::Confine(
                ConfineError::UnknownService(_) | ConfineError::Layout { .. } | ConfineError::NotOpen(_),
            ) => EXIT_USAGE,
            CliError::Confine(_) => EXIT_KERNEL,
            CliError::Status(StatusError::NotFound(_) | StatusError::NotPinRoot(_)) => EXIT_USAGE,
            CliError::Status(_) => EXIT_KERNEL,
            CliError::Agent(ClientError::Refused(_)) => EXIT_INVALID,
            CliError::Agent(_) => EXIT_AGENT,
            CliError::AgentRun(AgentError::UnknownEnvironment { .. } | AgentError::Locked(LockError::Held { .. })) => {
                EXIT_AGENT_CONFIG
            }
            CliError::AgentRun(AgentError::Kernel(_) | AgentError::Cgroup(_)) => EXIT_KERNEL,
            CliError::AgentRun(_) => EXIT_IO,
        }
    }

    /// A closed pipe (`policyctl graph | head`) is not an error.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }
}
