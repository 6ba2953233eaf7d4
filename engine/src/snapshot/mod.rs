//! The compiled, immutable policy every consumer reads: kernel datapath, in-process guard, CLI.
//!
//! A [`Snapshot`] holds, per service, its mode in every environment and its allow rules already
//! in the shape the kernel maps use: one rule per (address block, protocol, port range). Service
//! references are expanded into the target's endpoints. It also holds each service's declared
//! endpoints and its RPC rules (`rpc_allow`), which the in-process guard reads. Its content hash covers everything that
//! changes behaviour; source positions (for `explain`) ride beside it in [`DebugInfo`] and are not
//! hashed, so reformatting a policy never changes the hash.

use std::cmp::Reverse;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::{Destination, EnvironmentEntry, HostPattern, Mode, PortRange, Proto, RpcPattern, Selector};
use crate::verdict::Verdict;

mod owners;
pub use owners::Owners;

/// Version of the snapshot encoding; a loader refuses another.
/// Format 2 added each service's endpoints and RPC rules, and service positions; format 3 made
/// address rules, host rules, endpoints and the bootstrap order per environment; format 4
/// numbers each service's origins from 0 (an edit of one service no longer renumbers the rules
/// of the services after it) and hashes each service on its own (see `hash_content`).
pub const SNAPSHOT_FORMAT: u32 = 4;

/// First bytes of an encoded snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"DEPFNCE\0";

/// Index of a service in [`Snapshot::services`].
pub type ServiceId = u32;

/// Index of an allow entry's (or `rpc_allow` pattern's) origin among its service's origins,
/// [`DebugInfo::origins`]`[service]`: numbered from 0 in each service.
pub type OriginId = u32;

/// One rule for addresses: a block, a protocol and a port range. Ordered by what it allows, then
/// by origin, so sorting puts equal rules side by side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetRule {
    /// Destination block (IPv4-mapped IPv6 already folded into IPv4).
    pub net: IpNet,
    /// Protocol.
    pub proto: Proto,
    /// Port range ([`PortRange::ANY`] for any port).
    pub ports: PortRange,
    /// The service this rule reaches, when known (explicitly or inferred from its endpoints).
    pub target: Option<ServiceId>,
    /// The allow entry this rule came from.
    pub origin: OriginId,
}

/// One rule for host names (enforced through DNS; see the DNS-aware backends).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostRule {
    /// Name or wildcard.
    pub host: HostPattern,
    /// Protocol.
    pub proto: Proto,
    /// Port range.
    pub ports: PortRange,
    /// The service this rule reaches, when known.
    pub target: Option<ServiceId>,
    /// The allow entry this rule came from.
    pub origin: OriginId,
}

/// A declared endpoint of a service (where others reach it), one per port range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointRule {
    /// Address, block or host name.
    pub destination: Destination,
    /// Protocol.
    pub proto: Proto,
    /// Port range ([`PortRange::ANY`] when the endpoint lists no ports).
    pub ports: PortRange,
}

/// One RPC rule: the service may call RPCs matching `pattern` on the backend service `target`.
/// Ordered by target, then pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RpcRule {
    /// The backend service.
    pub target: ServiceId,
    /// The calls it allows.
    pub pattern: RpcPattern,
    /// Where the pattern was written (an index into the service's [`DebugInfo::origins`]).
    pub origin: OriginId,
}

/// What a service allows and where others reach it, in one environment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rules {
    /// Address rules, sorted.
    pub net_rules: Vec<NetRule>,
    /// Host-name rules, sorted.
    pub host_rules: Vec<HostRule>,
    /// Declared endpoints, in the order written.
    pub endpoints: Vec<EndpointRule>,
}

/// The rules of an environment the snapshot does not have: nothing.
static NO_RULES: Rules = Rules { net_rules: Vec::new(), host_rules: Vec::new(), endpoints: Vec::new() };

/// A service's compiled policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRuleset {
    /// Name.
    pub name: String,
    /// How its processes are found.
    pub selector: Option<Selector>,
    /// Layer name.
    pub layer: Option<String>,
    /// Isolation group.
    pub group: Option<String>,
    /// Owning team.
    pub owner: Option<String>,
    /// Criticality tier.
    pub tier: Option<u8>,
    /// Mode per environment, indexed like [`Snapshot::environments`].
    pub modes: Vec<Mode>,
    /// The distinct rules of its environments (one when they are the same everywhere).
    pub rules: Vec<Rules>,
    /// Per environment (indexed like [`Snapshot::environments`]), the index of its rules in
    /// `rules`.
    pub rules_of_env: Vec<u32>,
    /// RPC rules (`rpc_allow`), sorted, one per (target, pattern).
    pub rpc_rules: Vec<RpcRule>,
}

/// How specific an (address block, port range, protocol) is; the smaller, the more specific:
/// a longer prefix first, then fewer ports, then one protocol rather than any. The order in which
/// address rules decide, and endpoints own, an address.
pub(crate) fn specificity(prefix_len: u8, ports: PortRange, proto: Proto) -> (Reverse<u8>, u32, bool) {
    (Reverse(prefix_len), ports.len(), proto == Proto::Any)
}

impl NetRule {
    /// Whether the rule allows `conn`. An IPv4-mapped IPv6 address is the IPv4 address, and an
    /// IPv6 block never holds an IPv4 address.
    pub fn allows(&self, conn: &Connection) -> bool {
        self.net.contains(&conn.addr.to_canonical()) && self.ports.contains(conn.port) && self.proto.covers(conn.proto)
    }

    /// The rule's place in the order rules decide in, the smaller first: the most specific
    /// (its specificity: the longest prefix, then the narrowest port range, then one protocol
    /// rather than any), then the rule's own order (block, protocol, ports, target, origin).
    /// `explain` names the first rule in this order that allows a connection, and the kernel
    /// maps are laid out so that the kernel finds the same one (`crate::lower`).
    pub fn precedence(&self) -> impl Ord + '_ {
        (specificity(self.net.prefix_len(), self.ports, self.proto), self)
    }
}

impl ServiceRuleset {
    /// Its rules in environment `env` (an index into [`Snapshot::environments`]); none for an
    /// environment the snapshot does not have.
    pub fn rules(&self, env: usize) -> &Rules {
        self.rules_of_env.get(env).and_then(|&i| self.rules.get(i as usize)).unwrap_or(&NO_RULES)
    }

    /// The rule that decides `conn` in environment `env`: the first in
    /// [`NetRule::precedence`] order that allows it.
    pub fn matching_rule(&self, env: usize, conn: &Connection) -> Option<&NetRule> {
        self.rules(env).net_rules.iter().filter(|r| r.allows(conn)).min_by_key(|r| r.precedence())
    }

    /// Judges `conn` from this service in environment `env` (an index into
    /// [`Snapshot::environments`]).
    pub fn decide(&self, env: usize, conn: &Connection) -> Decision<'_> {
        let mode = self.mode(env);
        let rule = self.matching_rule(env, conn);
        Decision { verdict: crate::verdict::decide(mode, rule.is_some()), mode, rule }
    }

    /// The service's mode in environment `env` (an index into [`Snapshot::environments`]);
    /// `off` for an environment the snapshot does not have.
    pub fn mode(&self, env: usize) -> Mode {
        self.modes.get(env).copied().unwrap_or(Mode::Off)
    }
}

/// A service's ruleset as a snapshot holds it: shared, not copied, between the snapshots of
/// successive compiles while the service is unchanged (`compile::IncrementalCompiler`), with
/// the digest of its encoding (its part of the content hash) and, for an incremental compile,
/// the encoding itself made once and kept, so the next snapshot's hash and bytes reuse them.
/// Encoded as the ruleset itself. Changing it through `DerefMut` copies it first if it is
/// shared, and forgets the kept encoding and digest.
#[derive(Clone)]
pub struct SharedRuleset(Arc<SharedInner>);

#[derive(Clone)]
struct SharedInner {
    ruleset: ServiceRuleset,
    encoded: OnceLock<Vec<u8>>,
    /// SHA-256 of the encoding: the ruleset's part of the content hash.
    digest: OnceLock<[u8; 32]>,
}

impl SharedRuleset {
    /// Shares `ruleset`.
    pub fn new(ruleset: ServiceRuleset) -> Self {
        SharedRuleset(Arc::new(SharedInner { ruleset, encoded: OnceLock::new(), digest: OnceLock::new() }))
    }

    /// SHA-256 of the ruleset's encoding, made on first use and kept (32 bytes; the encoding
    /// is kept only when `keep` says so).
    fn digest(&self, keep: Keep) -> Result<[u8; 32], SnapshotError> {
        if let Some(digest) = self.0.digest.get() {
            return Ok(*digest);
        }
        let digest: [u8; 32] = Sha256::digest(&*self.encoded(keep)?).into();
        Ok(*self.0.digest.get_or_init(|| digest))
    }

    /// The ruleset's postcard encoding: the kept one, else made now (and kept when `keep`).
    fn encoded(&self, keep: Keep) -> Result<std::borrow::Cow<'_, [u8]>, SnapshotError> {
        if let Some(bytes) = self.0.encoded.get() {
            return Ok(bytes.as_slice().into());
        }
        let bytes = postcard::to_stdvec(&self.0.ruleset)?;
        Ok(match keep {
            Keep::Encodings => self.0.encoded.get_or_init(|| bytes).as_slice().into(),
            Keep::Nothing => bytes.into(),
        })
    }
}

impl std::ops::Deref for SharedRuleset {
    type Target = ServiceRuleset;

    fn deref(&self) -> &ServiceRuleset {
        &self.0.ruleset
    }
}

impl std::ops::DerefMut for SharedRuleset {
    fn deref_mut(&mut self) -> &mut ServiceRuleset {
        let inner = Arc::make_mut(&mut self.0);
        inner.encoded = OnceLock::new();
        inner.digest = OnceLock::new();
        &mut inner.ruleset
    }
}

impl From<ServiceRuleset> for SharedRuleset {
    fn from(ruleset: ServiceRuleset) -> Self {
        SharedRuleset::new(ruleset)
    }
}

impl fmt::Debug for SharedRuleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.ruleset.fmt(f)
    }
}

impl PartialEq for SharedRuleset {
    fn eq(&self, other: &SharedRuleset) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.ruleset == other.0.ruleset
    }
}

impl Eq for SharedRuleset {}

impl Serialize for SharedRuleset {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.ruleset.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SharedRuleset {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ServiceRuleset::deserialize(deserializer).map(SharedRuleset::new)
    }
}

/// Whether the services' encodings made for a hash are kept with them: by a compiler that
/// compiles the same policy again (the next snapshot reuses them), not by a one-off compile or
/// a decode (the encoding would cost memory in proportion to the policy and never be reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Keep each service's encoding.
    Encodings,
    /// Keep none.
    Nothing,
}

/// Everything that decides behaviour; this is what the hash covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotContent {
    /// Encoding version.
    pub format: u32,
    /// Environments, sorted by name.
    pub environments: Vec<EnvironmentEntry>,
    /// Services, sorted by name.
    pub services: Vec<SharedRuleset>,
    /// Bootstrap stages per environment (indexed like `environments`): each stage lists groups
    /// of services that start together (a group of several is an accepted intrinsic cycle).
    pub bootstrap: Vec<Vec<Vec<Vec<ServiceId>>>>,
}

/// Where an allow entry was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Index into [`DebugInfo::files`].
    pub file: u32,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    /// The service whose allow list holds the entry.
    pub service: ServiceId,
}

/// Source positions of rules; not hashed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DebugInfo {
    /// Policy file names.
    pub files: Vec<String>,
    /// Per service (indexed like [`Snapshot::services`]), one origin per allow entry and per
    /// `rpc_allow` pattern: a rule's [`OriginId`] indexes its service's list.
    pub origins: Vec<Arc<[Origin]>>,
    /// Where each service is defined (its name in `[services.NAME]`), indexed like
    /// [`Snapshot::services`].
    pub services: Vec<Origin>,
}

/// A SHA-256 content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 32]);

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Reading an encoded snapshot failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Not a snapshot file.
    #[error("not a depfence snapshot (bad magic bytes)")]
    BadMagic,
    /// Written by a build with another encoding.
    #[error("snapshot format {found} is not supported (this build reads format {SNAPSHOT_FORMAT})")]
    Format {
        /// The format in the file.
        found: u32,
    },
    /// A per-environment list does not match the environments.
    #[error("snapshot content is inconsistent (a per-environment list does not match the environments)")]
    Shape,
    /// The content does not match its hash.
    #[error("snapshot content does not match its hash (file damaged or edited)")]
    HashMismatch,
    /// Decoding or encoding failed.
    #[error("snapshot encoding: {0}")]
    Encoding(#[from] postcard::Error),
}

/// The file in the agent's state directory that holds the snapshot in force, for in-process
/// guards (`Guard::from_agent`). The agent replaces it whenever a policy is applied.
pub const AGENT_SNAPSHOT_FILE: &str = "snapshot.bin";

/// Writes an encoded snapshot to `path` durably ([`crate::durable::replace`]), readable by
/// everyone: a snapshot holds no secret, and unprivileged services load it. A reader never sees
/// a half-written snapshot.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::durable::replace(path, bytes, crate::durable::Access::Public)
}

/// The immutable compiled policy, with the index of its endpoints ([`Owners`]). Decoded only
/// by [`Snapshot::from_bytes`], which verifies the content before it builds the index.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    content: SnapshotContent,
    hash: ContentHash,
    debug: DebugInfo,
    /// Built from the content, never encoded: per environment (environments with the same
    /// endpoints share one).
    #[serde(skip_serializing)]
    owners: Vec<Arc<Owners>>,
}

/// A snapshot as encoded: everything but the index.
#[derive(Deserialize)]
struct Frozen {
    content: SnapshotContent,
    hash: ContentHash,
    debug: DebugInfo,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Snapshot) -> bool {
        // The index is a function of the content.
        (&self.content, self.hash, &self.debug) == (&other.content, other.hash, &other.debug)
    }
}

impl Eq for Snapshot {}

/// A connection attempt to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Connection {
    /// Destination address (IPv4-mapped IPv6 is treated as IPv4).
    pub addr: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Protocol (`Tcp` or `Udp`).
    pub proto: Proto,
}

/// `addr:port/proto`, `[v6]:port/proto` for IPv6.
impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V6(v6) => write!(f, "[{v6}]:{}/{}", self.port, self.proto),
            IpAddr::V4(v4) => write!(f, "{v4}:{}/{}", self.port, self.proto),
        }
    }
}

/// A destination that is not `ADDR:PORT[/PROTO]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid destination `{text}`: {why} (expected ADDR:PORT[/PROTO])")]
pub struct ParseConnectionError {
    text: String,
    why: &'static str,
}

impl std::str::FromStr for Connection {
    type Err = ParseConnectionError;

    /// Parses `ADDR:PORT[/PROTO]` or `[V6]:PORT[/PROTO]`; the protocol defaults to TCP.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |why| ParseConnectionError { text: text.to_owned(), why };
        let (socket, proto) = text.rsplit_once('/').unwrap_or((text, "tcp"));
        let proto = match Proto::parse(proto) {
            Some(p @ (Proto::Tcp | Proto::Udp)) => p,
            _ => return Err(error("the protocol is `tcp` or `udp`")),
        };
        let socket: std::net::SocketAddr = socket.parse().map_err(|_| error("not an address with a port"))?;
        Ok(Connection { addr: socket.ip(), port: socket.port(), proto })
    }
}

/// The outcome of [`ServiceRuleset::decide`]: the verdict and the rule that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'s> {
    /// The verdict under the service's mode.
    pub verdict: Verdict,
    /// The mode that applied.
    pub mode: Mode,
    /// The most specific matching rule, if any.
    pub rule: Option<&'s NetRule>,
}

impl Snapshot {
    /// Freezes compiled content; computes the hash.
    pub fn new(content: SnapshotContent, debug: DebugInfo) -> Result<Self, SnapshotError> {
        let owners = owners_per_environment(&content);
        Self::with_owners(content, debug, owners, Keep::Nothing)
    }

    /// [`Snapshot::new`] with each environment's index of the content's endpoints already
    /// built (the compiler builds them to infer dependencies), keeping the services' encodings
    /// or not.
    pub(crate) fn with_owners(
        content: SnapshotContent,
        debug: DebugInfo,
        owners: Vec<Arc<Owners>>,
        keep: Keep,
    ) -> Result<Self, SnapshotError> {
        check_shape(&content)?;
        if owners.len() != content.environments.len() {
            return Err(SnapshotError::Shape);
        }
        let hash = hash_content(&content, keep)?;
        Ok(Snapshot { content, hash, debug, owners })
    }

    /// Which service owns an address in environment `env` (an index into
    /// [`Snapshot::environments`]): the index of the endpoints declared there. An environment
    /// the snapshot does not have has none.
    pub fn owners(&self, env: usize) -> &Owners {
        static NONE: std::sync::LazyLock<Owners> = std::sync::LazyLock::new(Owners::default);
        self.owners.get(env).map_or(&NONE, |o| o.as_ref())
    }

    /// The content hash.
    pub fn hash(&self) -> ContentHash {
        self.hash
    }

    /// Environments, sorted by name.
    pub fn environments(&self) -> &[EnvironmentEntry] {
        &self.content.environments
    }

    /// Services, sorted by name.
    pub fn services(&self) -> &[SharedRuleset] {
        &self.content.services
    }

    /// Bootstrap stages in environment `env` (empty for an environment it does not have).
    pub fn bootstrap(&self, env: usize) -> &[Vec<Vec<ServiceId>>] {
        self.content.bootstrap.get(env).map_or(&[], Vec::as_slice)
    }

    /// Source positions.
    pub fn debug_info(&self) -> &DebugInfo {
        &self.debug
    }

    /// The content that decides behaviour.
    pub fn content(&self) -> &SnapshotContent {
        &self.content
    }

    /// Looks a service up by name.
    pub fn service(&self, name: &str) -> Option<(ServiceId, &ServiceRuleset)> {
        let services = &self.content.services;
        let index = services.binary_search_by(|s| s.name.as_str().cmp(name)).ok()?;
        services.get(index).map(|s| (index as ServiceId, &**s))
    }

    /// A rule in words: `10.0.0.0/8 port 443, tcp (service `db`)`.
    pub fn describe_rule(&self, rule: &NetRule) -> String {
        let proto = if rule.proto == Proto::Any { "any protocol".to_owned() } else { rule.proto.to_string() };
        let ports = if rule.ports.is_any() { "any port".to_owned() } else { format!("port {}", rule.ports) };
        let mut text = format!("{} {ports}, {proto}", rule.net);
        if let Some(target) = rule.target.and_then(|t| self.services().get(t as usize)) {
            text.push_str(&format!(" (service `{}`)", target.name));
        }
        text
    }

    /// A host rule in words: `host *.example.com port 443, tcp (service `api`)`.
    pub fn describe_host_rule(&self, rule: &HostRule) -> String {
        let proto = if rule.proto == Proto::Any { "any protocol".to_owned() } else { rule.proto.to_string() };
        let ports = if rule.ports.is_any() { "any port".to_owned() } else { format!("port {}", rule.ports) };
        let mut text = format!("host {} {ports}, {proto}", rule.host);
        if let Some(target) = rule.target.and_then(|t| self.services().get(t as usize)) {
            text.push_str(&format!(" (service `{}`)", target.name));
        }
        text
    }

    /// Where a rule of `service` was written: `file:line:col` of its allow entry (empty if
    /// unknown).
    pub fn rule_position(&self, service: ServiceId, rule: &NetRule) -> String {
        self.origin_position(service, rule.origin)
    }

    /// Where an allow entry or `rpc_allow` pattern of `service` was written: `file:line:col`
    /// (empty if unknown).
    pub fn origin_position(&self, service: ServiceId, origin: OriginId) -> String {
        self.position(self.origin(service, origin))
    }

    /// Where an allow entry or `rpc_allow` pattern of `service` was written.
    pub fn origin(&self, service: ServiceId, origin: OriginId) -> Option<&Origin> {
        self.debug.origins.get(service as usize)?.get(origin as usize)
    }

    /// Where a service is defined: `file:line:col` of its name (empty if unknown).
    pub fn service_position(&self, service: ServiceId) -> String {
        self.position(self.debug.services.get(service as usize))
    }

    fn position(&self, origin: Option<&Origin>) -> String {
        origin
            .map(|o| {
                let file = self.debug.files.get(o.file as usize).map_or("?", String::as_str);
                format!("{file}:{}:{}", o.line, o.column)
            })
            .unwrap_or_default()
    }

    /// Total number of RPC rules.
    pub fn rpc_rule_count(&self) -> usize {
        self.content.services.iter().map(|s| s.rpc_rules.len()).sum()
    }

    /// Index of an environment by name.
    pub fn environment_index(&self, name: &str) -> Option<usize> {
        self.content.environments.iter().position(|e| e.name == name)
    }

    /// Number of address rules in environment `env`.
    pub fn net_rule_count(&self, env: usize) -> usize {
        self.content.services.iter().map(|s| s.rules(env).net_rules.len()).sum()
    }

    /// The names of the environments, comma separated (for messages).
    pub fn environment_names(&self) -> String {
        self.content.environments.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Encodes to bytes: magic, then postcard.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SnapshotError> {
        // The postcard encoding of the struct: its fields one after the other.
        let (bytes, rest) = rayon::join(
            || encode_content(&self.content, SNAPSHOT_MAGIC.to_vec()),
            || postcard::to_stdvec(&(&self.hash, &self.debug)),
        );
        let mut bytes = bytes?;
        bytes.extend_from_slice(&rest?);
        Ok(bytes)
    }

    /// Decodes and verifies bytes written by [`Snapshot::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let body = bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice()).ok_or(SnapshotError::BadMagic)?;
        let Frozen { content, hash, debug } = postcard::from_bytes(body)?;
        if content.format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format { found: content.format });
        }
        if hash_content(&content, Keep::Nothing)? != hash {
            return Err(SnapshotError::HashMismatch);
        }
        check_shape(&content)?;
        let owners = owners_per_environment(&content);
        Ok(Snapshot { content, hash, debug, owners })
    }
}

/// Every per-environment list has one entry per environment, and every service's rules index
/// exists: so a lookup by environment never falls back on another environment's rules.
fn check_shape(content: &SnapshotContent) -> Result<(), SnapshotError> {
    let envs = content.environments.len();
    let services_ok = content.services.iter().all(|s| {
        s.modes.len() == envs
            && s.rules_of_env.len() == envs
            && s.rules_of_env.iter().all(|&i| (i as usize) < s.rules.len())
    });
    if services_ok && content.bootstrap.len() == envs { Ok(()) } else { Err(SnapshotError::Shape) }
}

/// The owner index of each environment; environments whose services all use the same rules
/// share one.
fn owners_per_environment(content: &SnapshotContent) -> Vec<Arc<Owners>> {
    let mut built: Vec<(Vec<u32>, Arc<Owners>)> = Vec::new();
    (0..content.environments.len())
        .map(|env| {
            let key: Vec<u32> =
                content.services.iter().map(|s| s.rules_of_env.get(env).copied().unwrap_or(0)).collect();
            if let Some((_, owners)) = built.iter().find(|(k, _)| *k == key) {
                return Arc::clone(owners);
            }
            let owners = Arc::new(Owners::new(content.services.iter().map(|s| s.rules(env).endpoints.as_slice())));
            built.push((key, Arc::clone(&owners)));
            owners
        })
        .collect()
}

/// The content hash: SHA-256 over the encoding of the format, the environments and the number
/// of services, then each service's digest (SHA-256 of its encoding, in order), then the
/// encoding of the bootstrap order. A tree of depth one: a snapshot that shares most of its
/// services with the last one ([`SharedRuleset`]) is hashed without hashing them again.
fn hash_content(content: &SnapshotContent, keep: Keep) -> Result<ContentHash, SnapshotError> {
    let digests: Vec<[u8; 32]> = content.services.par_iter().map(|s| s.digest(keep)).collect::<Result<_, _>>()?;
    let mut hasher = Sha256::new();
    hasher.update(postcard::to_stdvec(&(content.format, &content.environments, content.services.len()))?);
    for digest in &digests {
        hasher.update(digest);
    }
    hasher.update(postcard::to_stdvec(&content.bootstrap)?);
    Ok(ContentHash(hasher.finalize().into()))
}

/// Appends the postcard encoding of `content` to `out`: [`emit_content`]'s pieces, in order.
fn encode_content(content: &SnapshotContent, mut out: Vec<u8>) -> Result<Vec<u8>, SnapshotError> {
    emit_content(content, Keep::Nothing, |bytes| out.extend_from_slice(bytes))?;
    Ok(out)
}

/// How many services are encoded at once (in parallel) before their bytes are handed on: unless
/// the encodings are kept, the encoding of a large policy is never held whole in memory.
const SERVICES_PER_BATCH: usize = 256;

/// Hands the postcard encoding of `content` to `sink`, piece by piece, encoding the services in
/// parallel batches. Postcard encodes a struct as its fields in order and a sequence as its
/// length then its elements, so the services can be encoded one by one and concatenated: the
/// pieces, concatenated, are exactly `postcard::to_stdvec(content)`. A service whose encoding
/// is kept ([`SharedRuleset`]) is not encoded again.
fn emit_content(content: &SnapshotContent, keep: Keep, mut sink: impl FnMut(&[u8])) -> Result<(), SnapshotError> {
    let services = &content.services;
    sink(&postcard::to_stdvec(&(content.format, &content.environments, services.len()))?);
    for batch in services.chunks(SERVICES_PER_BATCH) {
        let parts: Vec<std::borrow::Cow<'_, [u8]>> =
            batch.par_iter().map(|s| s.encoded(keep)).collect::<Result<_, _>>()?;
        for part in &parts {
            sink(part);
        }
    }
    sink(&postcard::to_stdvec(&content.bootstrap)?);
    Ok(())
}

#[cfg(test)]
mod encoding_tests {
    use super::*;
    use crate::compile::compile;
    use crate::policy::parse_sources;
    use crate::synth::{SynthSpec, generate};

    #[test]
    fn parallel_encoding_is_plain_postcard() {
        let compiled = compile(&parse_sources(generate(&SynthSpec::new(200, 5_000))).policy).unwrap();
        let snapshot = &compiled.snapshot;
        let plain = postcard::to_stdvec(snapshot.content()).unwrap();
        assert_eq!(encode_content(snapshot.content(), Vec::new()).unwrap(), plain);
        // The hash, by its definition: the header, each service's digest, the bootstrap order.
        let content = snapshot.content();
        let mut tree = postcard::to_stdvec(&(content.format, &content.environments, content.services.len())).unwrap();
        for service in &content.services {
            tree.extend(Sha256::digest(postcard::to_stdvec(&**service).unwrap()));
        }
        tree.extend(postcard::to_stdvec(&content.bootstrap).unwrap());
        assert_eq!(snapshot.hash().0, <[u8; 32]>::from(Sha256::digest(&tree)));
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bytes.extend(postcard::to_stdvec(snapshot).unwrap());
        assert_eq!(snapshot.to_bytes().unwrap(), bytes);
        assert_eq!(&Snapshot::from_bytes(&bytes).unwrap(), snapshot);
    }
}
