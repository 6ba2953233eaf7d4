//! The parsed policy: what the files say, with locations, before names are resolved.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::diag::{Loc, Located, Sources};

pub use crate::verdict::Mode;

/// Transport protocol of a rule or a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// Either.
    Any,
}

impl Proto {
    /// Parses `tcp`, `udp` or `any`.
    pub fn parse(text: &str) -> Option<Proto> {
        match text {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "any" => Some(Proto::Any),
            _ => None,
        }
    }

    /// True when a rule with this protocol covers a connection with protocol `other`.
    pub fn covers(self, other: Proto) -> bool {
        self == Proto::Any || self == other
    }

    /// The protocols both allow, if any.
    pub fn intersect(self, other: Proto) -> Option<Proto> {
        match (self, other) {
            (Proto::Any, p) | (p, Proto::Any) => Some(p),
            (a, b) if a == b => Some(a),
            _ => None,
        }
    }

    /// The keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Any => "any",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range; `0..=65535` means any port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: PortRange = PortRange { first: 0, last: u16::MAX };

    /// One port.
    pub fn single(port: u16) -> Self {
        PortRange { first: port, last: port }
    }

    /// True when `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    /// The ports in both ranges, if any.
    pub fn intersect(self, other: PortRange) -> Option<PortRange> {
        let first = self.first.max(other.first);
        let last = self.last.min(other.last);
        (first <= last).then_some(PortRange { first, last })
    }

    /// True for the range of every port.
    pub fn is_any(self) -> bool {
        self == PortRange::ANY
    }

    /// Number of ports covered (a range read from damaged data, last before first, counts as
    /// one port).
    pub fn len(self) -> u32 {
        u32::from(self.last).saturating_sub(u32::from(self.first)) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("any")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A host name, exact (`api.example.com`) or a wildcard for every name below a domain
/// (`*.example.com`). Stored lowercase; matched on label boundaries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostPattern {
    /// The name, or for a wildcard the domain after `*.`, lowercase, without a final dot.
    pub domain: String,
    /// True for `*.domain`.
    pub wildcard: bool,
}

impl HostPattern {
    /// Parses and validates a host name or `*.` wildcard.
    pub fn parse(text: &str) -> Result<HostPattern, &'static str> {
        let lower = text.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, domain) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower),
        };
        if domain.is_empty() {
            return Err("the name is empty");
        }
        if domain.len() > 253 {
            return Err("a name has at most 253 characters");
        }
        for label in domain.split('.') {
            if label == "*" {
                return Err("`*` may only stand as the first label, as in `*.example.com`");
            }
            if label.is_empty() {
                return Err("a label is empty");
            }
            if label.len() > 63 {
                return Err("a label has at most 63 characters");
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err("a label uses only letters, digits, `-` and `_`");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err("a label cannot start or end with `-`");
            }
        }
        Ok(HostPattern { domain, wildcard })
    }

    /// True when `name` matches: equal for an exact name; for `*.d`, a name that ends in `.d`
    /// on a label boundary (so `evild` and `d.evil` do not match). Case insensitive.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        if self.wildcard {
            name.len() > self.domain.len() + 1
                && name
                    .get(name.len() - self.domain.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(&self.domain))
                && name.as_bytes().get(name.len() - self.domain.len() - 1) == Some(&b'.')
        } else {
            name.eq_ignore_ascii_case(&self.domain)
        }
    }
}

impl HostPattern {
    /// True when some name matches both patterns.
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        let below = |name: &str, domain: &str| {
            name.strip_suffix(domain).is_some_and(|head| head.len() > 1 && head.ends_with('.'))
        };
        match (self.wildcard, other.wildcard) {
            (false, false) => self.domain == other.domain,
            (true, false) => self.matches(&other.domain),
            (false, true) => other.matches(&self.domain),
            (true, true) => {
                self.domain == other.domain || below(&self.domain, &other.domain) || below(&other.domain, &self.domain)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard { write!(f, "*.{}", self.domain) } else { f.write_str(&self.domain) }
    }
}

/// How a service's processes are found: by cgroup path relative to the cgroup2 mount, or by a
/// regex over such paths.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selector {
    /// An exact cgroup path, e.g. `system.slice/mysql-deploy.service`.
    Path(String),
    /// A regex matched against whole cgroup paths.
    Regex(String),
}

/// Where traffic goes: an address block or a host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// An IP address (as a /32 or /128) or a CIDR block.
    Net(IpNet),
    /// A host name or wildcard.
    Host(HostPattern),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Net(net) if net.prefix_len() == net.max_prefix_len() => write!(f, "{}", net.addr()),
            Destination::Net(net) => write!(f, "{net}"),
            Destination::Host(host) => write!(f, "{host}"),
        }
    }
}

/// What an allow entry permits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Another service, through its declared endpoints.
    Service(String),
    /// A raw address, block or host name.
    Destination(Destination),
}

/// The environment-dependent mode of a service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ModeSpec {
    /// Use each environment's default.
    #[default]
    Inherit,
    /// One mode in every environment.
    All(Located<Mode>),
    /// Per environment; environments not listed use their default.
    PerEnvironment(Vec<(Located<String>, Located<Mode>)>),
}

/// One `[environments.NAME]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// Its name.
    pub name: Located<String>,
    /// Default mode of services in this environment.
    pub mode: Located<Mode>,
}

/// The environment a policy without `[environments]` has.
pub const DEFAULT_ENVIRONMENT: &str = "default";
/// Its mode: soft-apply, the safe start.
pub const DEFAULT_MODE: Mode = Mode::Audit;

/// An environment and its default mode, as the policy declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentEntry {
    /// Name.
    pub name: String,
    /// Default mode.
    pub mode: Mode,
}

/// The environments an endpoint or an allow entry applies in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EnvScope {
    /// Every environment (nothing said).
    #[default]
    All,
    /// Only these (`env = "qa"`, `env = ["qa", "staging"]`, or the list under
    /// `endpoints.qa`).
    Only(Vec<Located<String>>),
    /// Every environment but these: the `default` list of an `endpoints` table, for the
    /// environments the table does not name.
    Except(Vec<Located<String>>),
}

impl EnvScope {
    /// True when the entry applies in environment `env`.
    pub fn includes(&self, env: &str) -> bool {
        match self {
            EnvScope::All => true,
            EnvScope::Only(envs) => envs.iter().any(|e| e.value == env),
            EnvScope::Except(envs) => !envs.iter().any(|e| e.value == env),
        }
    }

    /// The environment names it mentions, for validation.
    pub fn names(&self) -> &[Located<String>] {
        match self {
            EnvScope::All => &[],
            EnvScope::Only(envs) | EnvScope::Except(envs) => envs,
        }
    }
}

/// A declared endpoint of a service: where others reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address, block or host.
    pub destination: Located<Destination>,
    /// Port ranges; empty means any port.
    pub ports: Vec<PortRange>,
    /// Protocol.
    pub proto: Proto,
    /// The environments where the service has this endpoint.
    pub env: EnvScope,
    /// The whole entry.
    pub loc: Loc,
}

/// One entry of a service's `allow` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    /// What it allows.
    pub target: Located<Target>,
    /// Port ranges; `None` means any port (or, for a service, its endpoints' ports).
    pub ports: Option<Vec<PortRange>>,
    /// Protocol; `None` means any (or, for a service, its endpoints' protocols).
    pub proto: Option<Proto>,
    /// False when the service starts and degrades gracefully without this dependency: still
    /// enforced, but no bootstrap ordering, may close a cycle, not part of criticality checks.
    pub critical: bool,
    /// The environments of the calling service where the entry applies.
    pub env: EnvScope,
    /// Other environments the entry may reach on purpose (`cross_environment = "prod"`, with a
    /// `reason`): a service reference then means the service's endpoints there, and an address
    /// may cover their endpoints. Empty: the caller's own environment only.
    pub cross_environment: Vec<Located<String>>,
    /// Why the entry exists (`reason`); required with `cross_environment`.
    pub reason: Option<String>,
    /// The whole entry.
    pub loc: Loc,
}

/// An RPC name pattern of an `rpc_allow` entry: `/package.Service/Method` (one method),
/// `/package.Service/*` (every method of a service) or `/*` (every call). Names are gRPC paths,
/// matched case-sensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcPattern {
    /// `/*`: every call to the backend.
    Any,
    /// `/package.Service/*`: every method of one service (the fully qualified service name).
    Service(String),
    /// `/package.Service/Method`: one method.
    Method {
        /// Fully qualified service name, e.g. `billing.Billing`.
        service: String,
        /// Method name, e.g. `Charge`.
        method: String,
    },
}

impl RpcPattern {
    /// Parses and validates a pattern; the error says what is wrong.
    pub fn parse(text: &str) -> Result<RpcPattern, &'static str> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err("an rpc name starts with `/`, as in `/billing.Billing/Charge`");
        };
        if rest == "*" {
            return Ok(RpcPattern::Any);
        }
        let Some((service, method)) = rest.split_once('/') else {
            return Err("expected `/package.Service/Method`, `/package.Service/*` or `/*`");
        };
        if method.contains('/') {
            return Err("an rpc name has two parts, `/package.Service/Method`");
        }
        if service.contains('*') || (method.contains('*') && method != "*") {
            return Err("`*` stands only for a whole method (`/package.Service/*`) or for every call (`/*`)");
        }
        if service.is_empty() || !service.split('.').all(is_identifier) {
            return Err(
                "the service is dot-separated identifiers of letters, digits and `_`, as in `billing.v1.Billing`",
            );
        }
        if method == "*" {
            return Ok(RpcPattern::Service(service.to_owned()));
        }
        if !is_identifier(method) {
            return Err("the method is one identifier of letters, digits and `_`, as in `Charge`");
        }
        Ok(RpcPattern::Method { service: service.to_owned(), method: method.to_owned() })
    }

    /// True when the RPC name (a request path such as `/billing.Billing/Charge`) matches.
    pub fn matches(&self, rpc: &str) -> bool {
        let Some((service, method)) = rpc.strip_prefix('/').and_then(|r| r.rsplit_once('/')) else {
            return *self == RpcPattern::Any && rpc.starts_with('/');
        };
        match self {
            RpcPattern::Any => true,
            RpcPattern::Service(s) => s == service && !method.is_empty(),
            RpcPattern::Method { service: s, method: m } => s == service && m == method,
        }
    }
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for RpcPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcPattern::Any => f.write_str("/*"),
            RpcPattern::Service(service) => write!(f, "/{service}/*"),
            RpcPattern::Method { service, method } => write!(f, "/{service}/{method}"),
        }
    }
}

/// One entry of a service's `rpc_allow` list: the RPCs it may call on one backend service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcAllowEntry {
    /// The backend service.
    pub service: Located<String>,
    /// The calls it may make, each where it was written.
    pub rpcs: Vec<Located<RpcPattern>>,
    /// The whole entry.
    pub loc: Loc,
}

/// A semver requirement as written in a `requires` entry (`">=2.14"`, `">=2.14, <3"`): the
/// parsed requirement and its text, which messages quote. Equal when the texts are.
#[derive(Debug, Clone)]
pub struct VersionConstraint {
    /// The requirement, with Cargo's semantics (the `semver` crate).
    pub req: semver::VersionReq,
    /// The text as written, trimmed.
    pub text: String,
}

impl VersionConstraint {
    /// True when the target version `version` satisfies the requirement, under the `semver`
    /// crate's rules: a pre-release such as `2.14.0-rc.1` satisfies only a requirement that
    /// names a pre-release of the same `major.minor.patch` (so not `>=2.14`).
    pub fn admits(&self, version: &semver::Version) -> bool {
        self.req.matches(version)
    }

    /// True when a consumer running `version` is one the requirement's `when` selects. A
    /// pre-release or build of a release counts as that release: `3.1.0-canary.1` needs what
    /// `3.1.0` needs.
    pub fn selects(&self, version: &semver::Version) -> bool {
        let release = semver::Version::new(version.major, version.minor, version.patch);
        self.req.matches(&release)
    }
}

impl PartialEq for VersionConstraint {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for VersionConstraint {}

impl fmt::Display for VersionConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One entry of a service's `requires` list: the versions of another service it needs,
/// `{ service = "payments", version = ">=2.14", when = ">=3.1", reason = "…" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The service whose versions are constrained (the target).
    pub service: Located<String>,
    /// What every running version of the target must satisfy.
    pub version: Located<VersionConstraint>,
    /// The versions of the consumer that need it; `None`: every version.
    pub when: Option<Located<VersionConstraint>>,
    /// Why.
    pub reason: Option<String>,
    /// The environments where the requirement holds.
    pub env: EnvScope,
    /// The whole entry.
    pub loc: Loc,
}

impl Requirement {
    /// True when a consumer running `version` needs this requirement (see
    /// [`VersionConstraint::selects`]).
    pub fn applies_to(&self, version: &semver::Version) -> bool {
        self.when.as_ref().is_none_or(|when| when.value.selects(version))
    }
}

/// One `[services.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its name.
    pub name: Located<String>,
    /// How its processes are found.
    pub selector: Option<Located<Selector>>,
    /// Its layer in the bootstrap model.
    pub layer: Option<Located<String>>,
    /// Its group, for isolation.
    pub group: Option<Located<String>>,
    /// Owning team.
    pub owner: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Criticality, 1 = most critical.
    pub tier: Option<Located<u8>>,
    /// Mode per environment.
    pub mode: ModeSpec,
    /// Where others reach it.
    pub endpoints: Vec<Endpoint>,
    /// What it may contact.
    pub allow: Vec<AllowEntry>,
    /// Which RPCs it may call on which backend services (the in-process guard).
    pub rpc_allow: Vec<RpcAllowEntry>,
    /// The versions of other services it needs (`requires`), checked by `check-deploy`.
    pub requires: Vec<Requirement>,
}

/// A cycle the team accepts, with a reason; it becomes one supernode in the bootstrap order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntrinsicCycle {
    /// Its services.
    pub services: Vec<Located<String>>,
    /// Why it is acceptable.
    pub reason: String,
    /// The whole declaration.
    pub loc: Loc,
}

/// A set of groups that must never reach each other, even transitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationSet {
    /// The groups.
    pub groups: Vec<Located<String>>,
    /// The whole set.
    pub loc: Loc,
}

/// A whole policy, possibly merged from several files.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// The files it was read from.
    pub sources: Sources,
    /// Environments and their default modes.
    pub environments: Vec<Environment>,
    /// Layers, bottom to top.
    pub layers: Vec<Located<String>>,
    /// Isolated group sets.
    pub isolated: Vec<IsolationSet>,
    /// Services, in the order read.
    pub services: Vec<Service>,
    /// Accepted cycles.
    pub intrinsic_cycles: Vec<IntrinsicCycle>,
}

impl Service {
    /// True when one of its endpoints or allow entries is limited to some environments or
    /// reaches another on purpose.
    pub fn depends_on_environment(&self) -> bool {
        self.endpoints.iter().any(|e| e.env != EnvScope::All)
            || self.allow.iter().any(|a| a.env != EnvScope::All || !a.cross_environment.is_empty())
    }
}

impl PolicySet {
    /// True when an endpoint or an allow entry is limited to some environments or reaches
    /// another on purpose: then each environment's rules are resolved on their own.
    pub fn depends_on_environment(&self) -> bool {
        self.services.iter().any(Service::depends_on_environment)
    }

    /// The policy as seen from one environment: that environment alone (with its default
    /// mode), each service's mode there, and only the endpoints and allow entries that apply
    /// there, no longer scoped. Compiling a policy judges each environment like compiling its
    /// projection (a cross-environment entry aside: the projection keeps it, and it names an
    /// environment the projection no longer has).
    pub fn project(&self, env: &str) -> PolicySet {
        let environments = self.environments.iter().filter(|e| e.name.value == env).take(1).cloned().collect();
        let services = self
            .services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.endpoints.retain(|e| e.env.includes(env));
                s.endpoints.iter_mut().for_each(|e| e.env = EnvScope::All);
                s.allow.retain(|a| a.env.includes(env));
                s.allow.iter_mut().for_each(|a| a.env = EnvScope::All);
                s.requires.retain(|r| r.env.includes(env));
                s.requires.iter_mut().for_each(|r| r.env = EnvScope::All);
                if let ModeSpec::PerEnvironment(list) = &mut s.mode {
                    list.retain(|(name, _)| name.value == env);
                }
                s
            })
            .collect();
        PolicySet { environments, services, ..self.clone() }
    }

    /// The environments in declaration order, the first definition of each (a duplicate is a
    /// diagnostic of its own); a policy without `[environments]` has [`DEFAULT_ENVIRONMENT`] in
    /// [`DEFAULT_MODE`].
    pub fn declared_environments(&self) -> Vec<EnvironmentEntry> {
        let mut entries: Vec<EnvironmentEntry> = Vec::new();
        for env in &self.environments {
            if !entries.iter().any(|e| e.name == env.name.value) {
                entries.push(EnvironmentEntry { name: env.name.value.clone(), mode: env.mode.value });
            }
        }
        if entries.is_empty() {
            entries.push(EnvironmentEntry { name: DEFAULT_ENVIRONMENT.to_owned(), mode: DEFAULT_MODE });
        }
        entries
    }
}

/// An IP address as a host network (/32 or /128).
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}
