//! Every kind of problem depfence reports about a policy, with its message, stable code and help.
//!
//! Messages follow one style: lowercase, no final period, user values in backticks, advice in
//! [`Problem::help`].

use thiserror::Error;

const MODE_HELP: &str = "a mode is one of `off`, `audit` or `enforce`";
const PORTS_HELP: &str =
    "ports are a number (`443`), a range (`\"8000-8100\"`) or a list of them (`[443, \"8000-8100\"]`)";
const RPC_HELP: &str = "an rpc name is `/package.Service/Method`, `/package.Service/*` for every method of a service, or `/*` for every call";
const VERSION_REQ_HELP: &str = "a version requirement is one or more comparators separated by commas, each with an operator, as in `>=2.14`, `>=2.14, <3` or `^2.14`";
const CYCLE_HELP: &str = "break the cycle, mark one of its dependencies `critical = false` if the service starts without it, or declare it in `[[intrinsic_cycles]]` with a reason";

/// What is wrong with a policy.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The file is not valid TOML.
    #[error("invalid toml: {message}")]
    Syntax {
        /// The TOML parser's message.
        message: String,
    },
    /// A key that the policy language does not have.
    #[error("unknown key `{key}` in {context}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// Where it was found, e.g. "a service".
        context: &'static str,
        /// The closest known key, if close enough.
        suggestion: Option<String>,
    },
    /// A required key is absent.
    #[error("missing key `{key}` in {context}")]
    MissingKey {
        /// The key.
        key: &'static str,
        /// Where it is required.
        context: &'static str,
    },
    /// A value of the wrong TOML type.
    #[error("`{key}` must be {expected}, found {found}")]
    WrongType {
        /// The key or element being read.
        key: String,
        /// What the language expects.
        expected: &'static str,
        /// The TOML type found.
        found: &'static str,
    },
    /// The policy language version is not one this build knows.
    #[error("unsupported policy version `{found}`")]
    UnsupportedVersion {
        /// The version written.
        found: String,
    },
    /// A mode name that does not exist.
    #[error("unknown mode `{value}`")]
    InvalidMode {
        /// The value as written.
        value: String,
    },
    /// A protocol name that does not exist.
    #[error("unknown protocol `{value}`")]
    InvalidProto {
        /// The value as written.
        value: String,
    },
    /// A port or port range that is not valid.
    #[error("invalid port `{value}`: {reason}")]
    InvalidPort {
        /// The value as written.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// An IP address or CIDR that does not parse.
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidAddress {
        /// "address" or "cidr".
        what: &'static str,
        /// The value as written.
        value: String,
        /// Why.
        reason: String,
        /// The value that was probably meant (the block, for a CIDR with host bits set).
        suggestion: Option<String>,
    },
    /// A host name or wildcard that is not valid.
    #[error("invalid host name `{value}`: {reason}")]
    InvalidHost {
        /// The value as written.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// A cgroup selector regex that does not compile.
    #[error("invalid cgroup regex: {reason}")]
    InvalidRegex {
        /// The regex engine's message.
        reason: String,
    },
    /// A name that is not a valid identifier.
    #[error("invalid name `{value}`")]
    InvalidName {
        /// The value as written.
        value: String,
    },
    /// A tier outside 1..=9.
    #[error("invalid tier `{value}`")]
    InvalidTier {
        /// The value as written.
        value: i64,
    },
    /// Two keys that exclude each other in one table.
    #[error("`{first}` and `{second}` cannot be used together")]
    ConflictingKeys {
        /// The first key.
        first: String,
        /// The second key.
        second: String,
    },
    /// An allow entry or endpoint with no destination.
    #[error("{context} names no destination")]
    MissingDestination {
        /// "an allow entry" or "an endpoint".
        context: &'static str,
    },
    /// Something defined twice, possibly in two files.
    #[error("{kind} `{name}` is defined more than once")]
    Duplicate {
        /// "service", "environment", …
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A reference to something not defined.
    #[error("unknown {kind} `{name}`")]
    Unknown {
        /// "service", "layer", "environment" or "group".
        kind: &'static str,
        /// The name as written.
        name: String,
        /// The closest defined name, if close enough.
        suggestion: Option<String>,
    },
    /// A dependency on a higher layer.
    #[error("`{from}` (layer `{from_layer}`) depends on `{to}` in the higher layer `{to_layer}`")]
    LayerViolation {
        /// The dependent service.
        from: String,
        /// Its layer.
        from_layer: String,
        /// The dependency.
        to: String,
        /// Its layer.
        to_layer: String,
    },
    /// A path between two isolated groups.
    #[error("isolated group `{from_group}` reaches group `{to_group}` via {path}")]
    IsolationViolation {
        /// The group the path starts in.
        from_group: String,
        /// The group the path reaches.
        to_group: String,
        /// The path, `a -> b -> c`.
        path: String,
    },
    /// A dependency cycle that was not declared intrinsic.
    #[error("dependency cycle {path}")]
    Cycle {
        /// The cycle, `a -> b -> a`.
        path: String,
    },
    /// A critical service depending on a less critical one.
    #[error("tier {from_tier} service `{from}` depends on tier {to_tier} service `{to}`")]
    CriticalityInversion {
        /// The dependent service.
        from: String,
        /// Its tier.
        from_tier: u8,
        /// The dependency.
        to: String,
        /// Its tier.
        to_tier: u8,
    },
    /// An allowed service that declares no endpoints, so the allow permits no traffic.
    #[error("`{service}` declares no endpoints, so allowing it permits no traffic")]
    NoEndpoints {
        /// The allowed service.
        service: String,
    },
    /// Narrowing a service reference by ports or protocol leaves nothing.
    #[error("no endpoint of `{service}` matches these ports and protocol")]
    EmptyNarrowing {
        /// The allowed service.
        service: String,
    },
    /// A service with no layer while the model has layers.
    #[error("service `{service}` has no layer, so layer checks skip it")]
    NoLayer {
        /// The service.
        service: String,
    },
    /// An RPC name pattern that is not valid.
    #[error("invalid rpc name `{value}`: {reason}")]
    InvalidRpcPattern {
        /// The value as written.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// An `rpc_allow` entry whose `rpcs` list is empty.
    #[error("`rpcs` is empty, so the entry allows no call")]
    EmptyRpcList,
    /// An `rpc_allow` entry for a service the network policy does not let the caller reach.
    #[error("`{service}` may call rpcs of `{target}` but has no network allow for it")]
    RpcWithoutAllow {
        /// The calling service.
        service: String,
        /// The backend service.
        target: String,
    },
    /// An `endpoints.default` list in a table that names every environment.
    #[error("`endpoints.default` of `{service}` applies in no environment: the table names every one")]
    UnusedDefaultEndpoints {
        /// The service.
        service: String,
    },
    /// `env = []` or `cross_environment = []`.
    #[error("`{key}` lists no environment")]
    EmptyEnvironmentList {
        /// The key.
        key: String,
    },
    /// A rule of a service in one environment that reaches another environment's endpoint.
    #[error(
        "in environment `{env}`, `{service}` may reach `{target}`'s endpoint in environment `{other}` ({destination})"
    )]
    CrossEnvironment {
        /// The calling service.
        service: String,
        /// The environment of the rule.
        env: String,
        /// The service whose endpoint it reaches.
        target: String,
        /// The environment that endpoint belongs to.
        other: String,
        /// The destination of the rule that reaches it.
        destination: String,
    },
    /// A version requirement (`version` or `when` of a `requires` entry) that does not parse.
    #[error("invalid version requirement `{value}` in `{key}`: {reason}")]
    InvalidVersionRequirement {
        /// `version` or `when`.
        key: String,
        /// The value as written.
        value: String,
        /// The `semver` crate's message.
        reason: String,
    },
    /// A version requirement with a comparator that has no operator (`"2.14"`).
    #[error("version requirement `{value}` in `{key}` has no operator")]
    BareVersionRequirement {
        /// `version` or `when`.
        key: String,
        /// The value as written.
        value: String,
    },
    /// A `requires` entry on a service that none of the consumer's allow rules reach.
    #[error("`{service}` requires versions of `{target}` but no allow rule of `{service}` reaches it")]
    RequirementWithoutAllow {
        /// The consumer.
        service: String,
        /// The service it requires.
        target: String,
    },
    /// A version in a deployed-versions manifest that is not a semantic version.
    #[error("invalid version `{value}`: {reason}")]
    InvalidVersion {
        /// The value as written.
        value: String,
        /// The `semver` crate's message.
        reason: String,
    },
    /// A deployment state in which a consumer runs a version that needs versions of a target
    /// the target does not run (`policyctl check-deploy`).
    #[error("{state}, `{consumer}` {consumer_versions} requires `{target}` {requirement}, but {found}")]
    UnmetRequirement {
        /// The state: `during the rollout`, `after the rollout`, `now`.
        state: String,
        /// The consumer.
        consumer: String,
        /// The consumer's running versions the requirement applies to, comma separated.
        consumer_versions: String,
        /// The target.
        target: String,
        /// The requirement as written.
        requirement: String,
        /// What runs instead: `` `payments` 2.13.1 runs `` or `` `payments` is not deployed ``.
        found: String,
        /// What to deploy first.
        advice: String,
    },
    /// Planned changes that no rollout order can deploy one at a time with every requirement met
    /// at every step (`policyctl deploy-order`).
    #[error("no deploy order keeps every step safe: {conflict}")]
    NoDeployOrder {
        /// Which services need which first: `` `a` before `b`, `b` before `a` ``.
        conflict: String,
    },
    /// A declared intrinsic cycle whose services do not form one cycle.
    #[error("declared intrinsic cycle {services} is not a dependency cycle")]
    StaleIntrinsicCycle {
        /// The declared services, comma separated.
        services: String,
    },
}

impl Problem {
    /// A stable, documented code for this kind of problem.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::Syntax { .. } => "depfence::syntax",
            Problem::UnknownKey { .. } => "depfence::unknown_key",
            Problem::MissingKey { .. } => "depfence::missing_key",
            Problem::EmptyEnvironmentList { .. } => "depfence::empty_environment_list",
            Problem::UnusedDefaultEndpoints { .. } => "depfence::unused_default_endpoints",
            Problem::CrossEnvironment { .. } => "depfence::cross_environment",
            Problem::WrongType { .. } => "depfence::wrong_type",
            Problem::UnsupportedVersion { .. } => "depfence::version",
            Problem::InvalidMode { .. } => "depfence::invalid_mode",
            Problem::InvalidProto { .. } => "depfence::invalid_proto",
            Problem::InvalidPort { .. } => "depfence::invalid_port",
            Problem::InvalidAddress { .. } => "depfence::invalid_address",
            Problem::InvalidHost { .. } => "depfence::invalid_host",
            Problem::InvalidRegex { .. } => "depfence::invalid_regex",
            Problem::InvalidName { .. } => "depfence::invalid_name",
            Problem::InvalidTier { .. } => "depfence::invalid_tier",
            Problem::ConflictingKeys { .. } => "depfence::conflicting_keys",
            Problem::MissingDestination { .. } => "depfence::missing_destination",
            Problem::Duplicate { .. } => "depfence::duplicate",
            Problem::Unknown { .. } => "depfence::unknown_reference",
            Problem::LayerViolation { .. } => "depfence::layer_violation",
            Problem::IsolationViolation { .. } => "depfence::isolation_violation",
            Problem::Cycle { .. } => "depfence::cycle",
            Problem::CriticalityInversion { .. } => "depfence::criticality_inversion",
            Problem::NoEndpoints { .. } => "depfence::no_endpoints",
            Problem::EmptyNarrowing { .. } => "depfence::empty_narrowing",
            Problem::NoLayer { .. } => "depfence::no_layer",
            Problem::StaleIntrinsicCycle { .. } => "depfence::stale_intrinsic_cycle",
            Problem::InvalidRpcPattern { .. } => "depfence::invalid_rpc",
            Problem::EmptyRpcList => "depfence::empty_rpcs",
            Problem::RpcWithoutAllow { .. } => "depfence::rpc_without_allow",
            Problem::InvalidVersionRequirement { .. } => "depfence::invalid_version_requirement",
            Problem::BareVersionRequirement { .. } => "depfence::bare_version_requirement",
            Problem::RequirementWithoutAllow { .. } => "depfence::requirement_without_allow",
            Problem::InvalidVersion { .. } => "depfence::invalid_version",
            Problem::UnmetRequirement { .. } => "depfence::unmet_requirement",
            Problem::NoDeployOrder { .. } => "depfence::no_deploy_order",
        }
    }

    /// Advice for fixing the problem, if there is any.
    pub fn help(&self) -> Option<String> {
        match self {
            Problem::UnknownKey { suggestion: Some(s), .. }
            | Problem::Unknown { suggestion: Some(s), .. }
            | Problem::InvalidAddress { suggestion: Some(s), .. } => Some(format!("did you mean `{s}`?")),
            Problem::UnsupportedVersion { .. } => Some("this build of depfence reads `version = 1`".into()),
            Problem::InvalidMode { .. } => Some(MODE_HELP.into()),
            Problem::InvalidProto { .. } => Some("a protocol is `tcp`, `udp` or `any`".into()),
            Problem::InvalidPort { .. } => Some(PORTS_HELP.into()),
            Problem::InvalidHost { .. } => Some(
                "use a name such as `api.example.com`, or `*.example.com` for every name below it".into(),
            ),
            Problem::InvalidName { .. } => Some(
                "names start with a letter and use lowercase letters, digits, `-`, `_` and `.`".into(),
            ),
            Problem::InvalidTier { .. } => Some("tiers run from 1 (most critical) to 9".into()),
            Problem::MissingDestination { .. } => {
                Some("add one of `service`, `ip`, `cidr` or `host`".into())
            }
            Problem::Duplicate { .. } => Some("rename or remove one of the definitions".into()),
            Problem::LayerViolation { .. } => Some(
                "a service may depend only on its own layer or lower ones, so the system can bootstrap bottom-up; mark the dependency `critical = false` if the service starts without it".into(),
            ),
            Problem::IsolationViolation { .. } => {
                Some("remove one dependency on the path; isolated groups must not reach each other, even transitively".into())
            }
            Problem::Cycle { .. } => Some(CYCLE_HELP.into()),
            Problem::CriticalityInversion { .. } => Some(
                "no service is more reliable than its critical dependencies: raise the dependency's tier or mark the dependency `critical = false`".into(),
            ),
            Problem::NoEndpoints { .. } => {
                Some("declare `endpoints` on that service, or allow its addresses directly".into())
            }
            Problem::NoLayer { .. } => Some("add `layer = \"…\"` to the service".into()),
            Problem::UnusedDefaultEndpoints { .. } => Some(
                "`default` holds the endpoints of the environments the table does not name; for endpoints of every environment, list them under each environment or use the list form without `env`".into(),
            ),
            Problem::EmptyEnvironmentList { .. } => {
                Some("name at least one environment, or leave the key out for every environment".into())
            }
            Problem::CrossEnvironment { other, .. } => Some(format!(
                "environments are isolated: narrow the rule so it covers no endpoint of `{other}`, limit the entry to the environments it belongs to (`env = \"…\"`), or, if this environment must reach `{other}` on purpose, say so: `cross_environment = \"{other}\", reason = \"…\"`"
            )),
            Problem::StaleIntrinsicCycle { .. } => {
                Some("remove the declaration, or list exactly the services of the cycle".into())
            }
            Problem::InvalidRpcPattern { .. } => Some(RPC_HELP.into()),
            Problem::EmptyRpcList => Some(format!("list the calls the service may make; {RPC_HELP}")),
            Problem::RpcWithoutAllow { target, .. } => Some(format!(
                "add `{{ service = \"{target}\" }}` to `allow`: the kernel must let the connection through before the guard judges its calls, and the dependency graph checks see it"
            )),
            Problem::InvalidVersionRequirement { .. } => Some(VERSION_REQ_HELP.into()),
            Problem::BareVersionRequirement { value, .. } => Some(format!(
                "Cargo reads a bare `{value}` as `^{value}` (at least `{value}`, below the next major version); write `>={value}` or `^{value}` explicitly"
            )),
            Problem::RequirementWithoutAllow { target, .. } => Some(format!(
                "add `{{ service = \"{target}\" }}` to `allow` if the service calls it, or remove the requirement"
            )),
            Problem::InvalidVersion { .. } => {
                Some("a version is a semantic version `MAJOR.MINOR.PATCH`, as in `2.14.0` or `3.1.0-canary.1`".into())
            }
            Problem::UnmetRequirement { advice, .. } => Some(advice.clone()),
            Problem::NoDeployOrder { .. } => Some(
                "each step must meet every requirement: release a version of one of these services that works with both versions of the other (or widen a `version` or `when`), deploy it first, then the rest".into(),
            ),
            _ => None,
        }
    }
}

/// The closest candidate to `word` within a small edit distance, for "did you mean" help.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let max = match word.chars().count() {
        0..=3 => 1,
        4..=7 => 2,
        _ => 3,
    };
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|&(d, _)| d <= max)
        .min_by_key(|&(d, c)| (d, c.to_owned()))
        .map(|(_, c)| c.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_near_names_only() {
        assert_eq!(closest("alow", ["allow", "layer"]), Some("allow".into()));
        assert_eq!(closest("tier", ["allow", "layer"]), None);
        assert_eq!(closest("artifact-mirorr", ["artifact-mirror"]), Some("artifact-mirror".into()));
    }

    #[test]
    fn help_carries_suggestion() {
        let p = Problem::UnknownKey { key: "alow".into(), context: "a service", suggestion: Some("allow".into()) };
        assert_eq!(p.to_string(), "unknown key `alow` in a service");
        assert_eq!(p.help().as_deref(), Some("did you mean `allow`?"));
    }
}
