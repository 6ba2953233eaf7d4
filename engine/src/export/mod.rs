//! The policy, its dependency graph, what runs where and the traffic the agents saw, as a SQLite
//! database for ad-hoc SQL (`policyctl export --sqlite`): who owns what, who depends on whom,
//! what is enforced, which versions run and which the policy requires, what was seen. The schema is [`SCHEMA`] (`schema.sql`), versioned by
//! [`SCHEMA_VERSION`] and documented column by column in `docs/export-schema.md`; its `owners`
//! and `repository_metadata` views have the columns of dependency-management-data's tables of
//! those names, so a dependency-management-data database can be joined with it.
//!
//! The file is written whole or not at all: the database is built in a temporary file beside
//! the target and moved into place ([`crate::durable::install`]); an existing file is replaced
//! only when asked. The same inputs give the same rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, Transaction, params};

use semver::{Op, Version, VersionReq};

use crate::compile::{Compiled, EdgeKind};
use crate::deploy::ParsedDeployed;
use crate::diag::Sources;
use crate::learn::{Destination, Observed};
use crate::policy::{PolicySet, PortRange, Proto};
use crate::snapshot::{Origin, ServiceId, Snapshot};
use crate::timefmt::rfc3339_seconds;
use crate::usage::{HOST_RULES, Usage};

/// The schema, as the `CREATE` statements of a new database.
pub const SCHEMA: &str = include_str!("schema.sql");

/// The schema's version: `meta.schema_version` and `PRAGMA user_version`. A later version only
/// adds tables, columns and views.
pub const SCHEMA_VERSION: u32 = 2;

/// The file mode of an export: readable by everyone, as a report is.
const EXPORT_MODE: u32 = 0o644;

/// Where observed traffic came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One agent's control socket (`Observed` request).
    Agent,
    /// The fleet's metrics in Prometheus.
    Prometheus,
}

impl Source {
    /// The name stored in `observed_edges.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Agent => "agent",
            Source::Prometheus => "prometheus",
        }
    }
}

/// Traffic observed in one environment.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// The environment the traffic was seen in.
    pub environment: String,
    /// Where it came from.
    pub source: Source,
    /// The window it covers.
    pub window: Duration,
    /// Would-rejected destinations, as `policyctl learn` reads them.
    pub observed: Vec<Observed>,
    /// The declared dependencies and their hits, as `policyctl unused` reads them (the agent's
    /// `Usage` answer or [`crate::usage::usage_in_fleet`]): each backend with hits is an
    /// allowed row of `observed_edges`.
    pub usage: Option<Usage>,
}

/// The deployed-versions manifest of one environment.
#[derive(Debug, Clone, Copy)]
pub struct Manifest<'a> {
    /// The environment it describes (an exported one).
    pub environment: &'a str,
    /// The manifest as read (its positions point into its sources).
    pub manifest: &'a ParsedDeployed,
}

/// What to export.
#[derive(Debug)]
pub struct Export<'a> {
    /// The policy as read (descriptions, the criticality of allow entries).
    pub policy: &'a PolicySet,
    /// The policy compiled.
    pub compiled: &'a Compiled,
    /// The policy's name: `meta.policy`, and the `organisation` of the dependency-management-data
    /// views (`meta.dmd_organisation`).
    pub name: String,
    /// The environments to export (empty: every one).
    pub environments: Vec<String>,
    /// Observed traffic, per environment.
    pub evidence: Vec<Evidence>,
    /// What runs, per environment (at most one manifest each).
    pub deployed: Vec<Manifest<'a>>,
}

/// How many rows each table got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Summary {
    /// `environments`.
    pub environments: usize,
    /// `services`.
    pub services: usize,
    /// `service_edges`.
    pub service_edges: usize,
    /// `dependencies`.
    pub dependencies: usize,
    /// `observed_edges`.
    pub observed_edges: usize,
    /// `deployed_versions`.
    pub deployed_versions: usize,
    /// `requirements`.
    pub requirements: usize,
}

/// Why the export was not written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The file exists and replacing it was not asked for.
    #[error("`{}` exists; pass --force to replace it", .0.display())]
    Exists(PathBuf),
    /// An environment the policy does not have.
    #[error("unknown environment `{name}` (the policy has: {known})")]
    UnknownEnvironment {
        /// The name asked for.
        name: String,
        /// The policy's environments, comma separated.
        known: String,
    },
    /// A manifest for an environment that is not exported.
    #[error("a deployed-versions manifest for environment `{0}`, which is not exported")]
    NotExported(String),
    /// Two manifests for one environment.
    #[error("two deployed-versions manifests for environment `{0}`")]
    TwoManifests(String),
    /// Writing the database failed.
    #[error("writing the export: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Creating or moving the file failed.
    #[error("writing `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Writes `export` to a new SQLite database at `path`; an existing file is replaced only with
/// `replace_existing`.
pub fn write_sqlite(path: &Path, export: &Export<'_>, replace_existing: bool) -> Result<Summary, ExportError> {
    let io = |source| ExportError::Io { path: path.to_owned(), source };
    if !replace_existing && path.symlink_metadata().is_ok() {
        return Err(ExportError::Exists(path.to_owned()));
    }
    let envs = environments(export)?;
    for (i, manifest) in export.deployed.iter().enumerate() {
        if !envs.iter().any(|(_, name)| name == manifest.environment) {
            return Err(match export.compiled.snapshot.environment_index(manifest.environment) {
                Some(_) => ExportError::NotExported(manifest.environment.to_owned()),
                None => ExportError::UnknownEnvironment {
                    name: manifest.environment.to_owned(),
                    known: export.compiled.snapshot.environment_names(),
                },
            });
        }
        if export.deployed.iter().take(i).any(|m| m.environment == manifest.environment) {
            return Err(ExportError::TwoManifests(manifest.environment.to_owned()));
        }
    }
    let temp = crate::durable::temp_beside(path, EXPORT_MODE).map_err(io)?;
    let mut db = Connection::open(temp.path())?;
    let summary = fill(&mut db, export, &envs)?;
    db.close().map_err(|(_, e)| e)?;
    match crate::durable::install(temp, path, replace_existing) {
        Ok(()) => Ok(summary),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(ExportError::Exists(path.to_owned())),
        Err(e) => Err(io(e)),
    }
}

/// The exported environments: (index in the snapshot, name), in name order.
fn environments(export: &Export<'_>) -> Result<Vec<(usize, String)>, ExportError> {
    let snapshot = &export.compiled.snapshot;
    let all: Vec<(usize, String)> = snapshot.environments().iter().map(|e| e.name.clone()).enumerate().collect();
    if export.environments.is_empty() {
        return Ok(all);
    }
    for name in &export.environments {
        if snapshot.environment_index(name).is_none() {
            return Err(ExportError::UnknownEnvironment { name: name.clone(), known: snapshot.environment_names() });
        }
    }
    Ok(all.into_iter().filter(|(_, name)| export.environments.contains(name)).collect())
}

fn fill(db: &mut Connection, export: &Export<'_>, envs: &[(usize, String)]) -> Result<Summary, ExportError> {
    let tx = db.transaction()?;
    tx.execute_batch(SCHEMA)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    let snapshot = &export.compiled.snapshot;
    let mut summary = Summary::default();

    let observed = export.evidence.iter().find(|e| envs.iter().any(|(_, n)| *n == e.environment));
    let meta: Vec<(&str, String)> = vec![
        ("schema_version", SCHEMA_VERSION.to_string()),
        ("generator", format!("depfence {}", env!("CARGO_PKG_VERSION"))),
        ("policy", export.name.clone()),
        ("snapshot_hash", snapshot.hash().to_string()),
        ("environments", envs.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(",")),
        ("observed_source", observed.map_or("none", |e| e.source.as_str()).to_owned()),
        ("observed_window_secs", observed.map_or(String::new(), |e| e.window.as_secs().to_string())),
        ("dmd_platform", "depfence".to_owned()),
        ("dmd_organisation", export.name.clone()),
        ("deployed_environments", deployed_environments(export)),
    ];
    for (key, value) in meta {
        tx.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", params![key, value])?;
    }

    for &(index, ref name) in envs {
        let mode = snapshot.environments().get(index).map(|e| e.mode);
        tx.execute(
            "INSERT INTO environments (name, default_mode) VALUES (?1, ?2)",
            params![name, mode.map(|m| m.to_string())],
        )?;
        summary.environments += 1;
    }

    summary.services = services(&tx, export, envs)?;
    summary.service_edges = service_edges(&tx, export, envs)?;
    summary.dependencies = dependencies(&tx, export, envs)?;
    for evidence in &export.evidence {
        if let Some(&(index, _)) = envs.iter().find(|(_, n)| *n == evidence.environment) {
            summary.observed_edges += observed_edges(&tx, snapshot, index, evidence)?;
            if let Some(usage) = &evidence.usage {
                summary.observed_edges += allowed_edges(&tx, snapshot, evidence, usage)?;
            }
        }
    }
    for manifest in &export.deployed {
        summary.deployed_versions += deployed_versions(&tx, snapshot, manifest)?;
    }
    summary.requirements = requirements(&tx, export, envs)?;
    tx.commit()?;
    Ok(summary)
}

/// `services` and `service_modes`.
fn services(tx: &Transaction<'_>, export: &Export<'_>, envs: &[(usize, String)]) -> Result<usize, ExportError> {
    let snapshot = &export.compiled.snapshot;
    // The first definition of a name is the service (a duplicate is an error of its own).
    let mut descriptions: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for service in &export.policy.services {
        descriptions.entry(service.name.value.as_str()).or_insert(service.description.as_deref());
    }
    let mut count = 0;
    for (id, service) in snapshot.services().iter().enumerate() {
        let (file, line, column) = position(snapshot, snapshot.debug_info().services.get(id));
        tx.execute(
            "INSERT INTO services (name, owner, tier, layer, grp, description, file, line, column) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                service.name,
                service.owner,
                service.tier,
                service.layer,
                service.group,
                descriptions.get(service.name.as_str()).copied().flatten(),
                file,
                line,
                column
            ],
        )?;
        for &(index, ref env) in envs {
            tx.execute(
                "INSERT INTO service_modes (service, environment, mode) VALUES (?1, ?2, ?3)",
                params![service.name, env, service.mode(index).to_string()],
            )?;
        }
        count += 1;
    }
    Ok(count)
}

/// `service_edges`: each exported environment's graph.
fn service_edges(tx: &Transaction<'_>, export: &Export<'_>, envs: &[(usize, String)]) -> Result<usize, ExportError> {
    let analysis = &export.compiled.analysis;
    let sources = &export.compiled.sources;
    let mut count = 0;
    for &(index, ref env) in envs {
        let Some(graph) = analysis.graph(index) else { continue };
        for edge in &graph.edges {
            let at = sources.position(edge.loc);
            let kind = match edge.kind {
                EdgeKind::Declared => "declared",
                EdgeKind::Inferred => "inferred",
            };
            tx.execute(
                "INSERT INTO service_edges (environment, from_service, to_service, critical, kind, file, line, column) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    env,
                    analysis.name(edge.from),
                    analysis.name(edge.to),
                    edge.critical,
                    kind,
                    at.file,
                    at.line,
                    at.column
                ],
            )?;
            count += 1;
        }
    }
    Ok(count)
}

/// `dependencies`: every compiled rule of every service in each exported environment.
fn dependencies(tx: &Transaction<'_>, export: &Export<'_>, envs: &[(usize, String)]) -> Result<usize, ExportError> {
    let snapshot = &export.compiled.snapshot;
    let critical = criticality(export.policy, &export.compiled.sources);
    let mut insert = tx.prepare(
        "INSERT INTO dependencies (from_service, environment, rule_id, to_service, destination, destination_kind, \
         ports, port_first, port_last, protocol, critical, file, line, column) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?;
    let mut count = 0;
    // Rule ids number the allow entries over the whole policy: each service's origins after
    // those of the services before it.
    let mut first_origin = 0i64;
    for (id, service) in snapshot.services().iter().enumerate() {
        let id = id as ServiceId;
        for &(index, ref env) in envs {
            let rules = service.rules(index);
            let net =
                rules.net_rules.iter().map(|r| (r.origin, r.target, r.net.to_string(), "address", r.ports, r.proto));
            let host =
                rules.host_rules.iter().map(|r| (r.origin, r.target, r.host.to_string(), "host", r.ports, r.proto));
            for (origin, target, destination, kind, ports, proto) in net.chain(host) {
                let at = snapshot.origin(id, origin);
                let (file, line, column) = position(snapshot, at);
                let is_critical = at.and_then(|o| critical.get(&(o.file, o.line, o.column))).copied().unwrap_or(true);
                let to_service = target.and_then(|t| snapshot.services().get(t as usize)).map(|s| s.name.as_str());
                insert.execute(params![
                    service.name,
                    env,
                    first_origin + i64::from(origin),
                    to_service,
                    destination,
                    kind,
                    ports_text(ports),
                    ports.first,
                    ports.last,
                    proto.as_str(),
                    is_critical,
                    file,
                    line,
                    column
                ])?;
                count += 1;
            }
        }
        first_origin += snapshot.debug_info().origins.get(id as usize).map_or(0, |o| o.len() as i64);
    }
    Ok(count)
}

fn ports_text(ports: PortRange) -> String {
    ports.to_string()
}

/// Whether each allow entry is critical, by where it was written (file, line, column), the key
/// the snapshot's origins carry.
fn criticality(policy: &PolicySet, sources: &Sources) -> BTreeMap<(u32, u32, u32), bool> {
    let mut map = BTreeMap::new();
    for entry in policy.services.iter().flat_map(|s| &s.allow) {
        if let Some(file) = sources.file(entry.loc.file) {
            let (line, column) = file.line_col(entry.loc.start);
            map.insert((entry.loc.file, line, column), entry.critical);
        }
    }
    map
}

/// `observed_edges`: the would-rejects of one environment.
fn observed_edges(
    tx: &Transaction<'_>,
    snapshot: &Snapshot,
    env: usize,
    evidence: &Evidence,
) -> Result<usize, ExportError> {
    let mut insert = tx.prepare(
        "INSERT INTO observed_edges (from_service, environment, destination, destination_kind, destination_service, \
         port, protocol, verdict, count, first_seen, last_seen, hosts, processes, source) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'would_reject', ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    let mut count = 0;
    for o in &evidence.observed {
        if snapshot.service(&o.service).is_none() {
            continue;
        }
        let service_name = |id: u32| snapshot.services().get(id as usize).map(|s| s.name.clone());
        let (destination, kind, service, port, proto): (String, &str, Option<String>, Option<u16>, Option<Proto>) =
            match &o.destination {
                Destination::Address { addr, port, proto } => (
                    addr.to_string(),
                    "address",
                    snapshot.owners(env).owner_of(*addr, Some(*port), *proto).and_then(service_name),
                    Some(*port),
                    Some(*proto),
                ),
                Destination::Name { name } => (name.clone(), "name", None, None, None),
                Destination::Service { name } => {
                    let known = snapshot.service(name).map(|(_, s)| s.name.clone());
                    (name.clone(), "service", known, None, None)
                }
            };
        let json = |set: &std::collections::BTreeSet<String>| serde_json::to_string(set).unwrap_or_default();
        insert.execute(params![
            o.service,
            evidence.environment,
            destination,
            kind,
            service,
            port,
            proto.map(Proto::as_str),
            i64::try_from(o.count).unwrap_or(i64::MAX),
            o.first_seen.map(rfc3339_seconds),
            o.last_seen.map(rfc3339_seconds),
            json(&o.hosts),
            json(&o.processes),
            evidence.source.as_str()
        ])?;
        count += 1;
    }
    Ok(count)
}

/// `observed_edges` with verdict `allowed`: each declared dependency (backend) of a service
/// with hits in the window. A backend is a service (kind `service`), an address block
/// (`address`) or the service's host rules as one ([`HOST_RULES`], kind `host_rules`).
fn allowed_edges(
    tx: &Transaction<'_>,
    snapshot: &Snapshot,
    evidence: &Evidence,
    usage: &Usage,
) -> Result<usize, ExportError> {
    let mut insert = tx.prepare(
        "INSERT INTO observed_edges (from_service, environment, destination, destination_kind, destination_service, \
         port, protocol, verdict, count, first_seen, last_seen, hosts, processes, source) \
         VALUES (?1, ?2, ?3, ?4, ?5, NULL, NULL, 'allowed', ?6, ?7, ?8, ?9, '[]', ?10)",
    )?;
    let mut count = 0;
    for service in &usage.services {
        if snapshot.service(&service.service).is_none() {
            continue;
        }
        for backend in service.backends.iter().filter(|b| b.hits > 0) {
            let target = snapshot.service(&backend.backend).map(|(_, s)| s.name.as_str());
            let kind = match target {
                Some(_) => "service",
                None if backend.backend == HOST_RULES => "host_rules",
                None => "address",
            };
            insert.execute(params![
                service.service,
                evidence.environment,
                backend.backend,
                kind,
                target,
                i64::try_from(backend.hits).unwrap_or(i64::MAX),
                backend.first_seen.map(rfc3339_seconds),
                backend.last_seen.map(rfc3339_seconds),
                serde_json::to_string(&backend.hosts).unwrap_or_default(),
                evidence.source.as_str()
            ])?;
            count += 1;
        }
    }
    Ok(count)
}

/// The environments with a manifest, comma separated, in name order.
fn deployed_environments(export: &Export<'_>) -> String {
    let mut names: Vec<&str> = export.deployed.iter().map(|m| m.environment).collect();
    names.sort_unstable();
    names.join(",")
}

/// A version part as an SQLite integer (saturating: SQLite integers are signed 64-bit).
fn part(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `deployed_versions`: one environment's manifest; services the policy does not know are left
/// out (the CLI warns about them, as `check-deploy` does).
fn deployed_versions(tx: &Transaction<'_>, snapshot: &Snapshot, manifest: &Manifest<'_>) -> Result<usize, ExportError> {
    let mut insert = tx.prepare(
        "INSERT OR IGNORE INTO deployed_versions (environment, service, component, version, major, minor, patch, \
         prerelease, build, file, line, column) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let sources = &manifest.manifest.sources;
    let mut count = 0;
    for (name, service) in &manifest.manifest.deployed.services {
        if snapshot.service(name).is_none() {
            continue;
        }
        let own = service.versions.iter().map(|v| ("", v));
        let components = service.components.iter().flat_map(|(c, vs)| vs.iter().map(move |v| (c.as_str(), v)));
        for (component, version) in own.chain(components) {
            let at = sources.position(version.loc);
            let v: &Version = &version.value;
            count += insert.execute(params![
                manifest.environment,
                name,
                component,
                v.to_string(),
                part(v.major),
                part(v.minor),
                part(v.patch),
                (!v.pre.is_empty()).then(|| v.pre.as_str()),
                (!v.build.is_empty()).then(|| v.build.as_str()),
                at.file,
                at.line,
                at.column
            ])?;
        }
    }
    Ok(count)
}

/// The lower bound of a requirement that is a single `>=X[.Y[.Z]]` comparator without a
/// pre-release (missing parts are 0).
pub fn simple_lower_bound(req: &VersionReq) -> Option<(u64, u64, u64)> {
    match req.comparators.as_slice() {
        [c] if c.op == Op::GreaterEq && c.pre.is_empty() => Some((c.major, c.minor.unwrap_or(0), c.patch.unwrap_or(0))),
        _ => None,
    }
}

/// `requirements`: each `requires` entry, in each exported environment where it holds.
fn requirements(tx: &Transaction<'_>, export: &Export<'_>, envs: &[(usize, String)]) -> Result<usize, ExportError> {
    let sources = &export.compiled.sources;
    let mut insert = tx.prepare(
        "INSERT INTO requirements (environment, consumer, target, version, applies_when, reason, min_major, \
         min_minor, min_patch, file, line, column) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let mut count = 0;
    for (_, env) in envs {
        for required in &export.compiled.analysis.requirements {
            let entry = &required.requirement;
            if !entry.env.includes(env) {
                continue;
            }
            let at = sources.position(entry.loc);
            let bound = simple_lower_bound(&entry.version.value.req);
            insert.execute(params![
                env,
                required.consumer,
                entry.service.value,
                entry.version.value.text,
                entry.when.as_ref().map(|w| w.value.text.as_str()),
                entry.reason,
                bound.map(|b| part(b.0)),
                bound.map(|b| part(b.1)),
                bound.map(|b| part(b.2)),
                at.file,
                at.line,
                at.column
            ])?;
            count += 1;
        }
    }
    Ok(count)
}

/// File name, line and column of an origin (None when unknown).
fn position(snapshot: &Snapshot, origin: Option<&Origin>) -> (Option<String>, Option<u32>, Option<u32>) {
    match origin.and_then(|o| snapshot.debug_info().files.get(o.file as usize).map(|f| (f, o))) {
        Some((file, o)) => (Some(file.clone()), Some(o.line), Some(o.column)),
        None => (None, None, None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "tests")]

    use std::collections::BTreeSet;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::compile::compile_sources;
    use crate::policy::parse_sources;

    const POLICY: &str = r#"version = 1
[environments]
prod = "enforce"
qa = "audit"

[services.db]
tier = 1
owner = "storage"
description = "the main database"
endpoints = [{ ip = "10.0.0.1", ports = [5432], proto = "tcp" }]

[services.api]
tier = 2
mode = { qa = "enforce" }
allow = [
  { service = "db" },
  { host = "*.example.com", ports = [443], proto = "tcp", critical = false },
]
"#;

    fn files() -> Vec<(String, String)> {
        vec![("policy.toml".to_owned(), POLICY.to_owned())]
    }

    fn rows(db: &Connection, sql: &str) -> Vec<String> {
        let mut statement = db.prepare(sql).unwrap();
        let columns = statement.column_count();
        statement
            .query_map([], |row| {
                let mut fields = Vec::new();
                for i in 0..columns {
                    let value: rusqlite::types::Value = row.get(i)?;
                    fields.push(match value {
                        rusqlite::types::Value::Null => "NULL".to_owned(),
                        rusqlite::types::Value::Integer(i) => i.to_string(),
                        rusqlite::types::Value::Text(t) => t,
                        other => format!("{other:?}"),
                    });
                }
                Ok(fields.join("|"))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn the_export_holds_the_policy_graph_rules_and_evidence() {
        let parsed = parse_sources(files());
        let compiled = compile_sources(files()).unwrap();
        let observed = Observed {
            service: "api".into(),
            destination: Destination::Address { addr: "10.0.0.1".parse().unwrap(), port: 5432, proto: Proto::Tcp },
            count: 3,
            hosts: BTreeSet::from(["host-a".to_owned()]),
            first_seen: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            last_seen: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_060)),
            processes: BTreeSet::from(["curl".to_owned()]),
        };
        let export = Export {
            policy: &parsed.policy,
            compiled: &compiled,
            name: "shop".into(),
            environments: vec!["prod".into()],
            evidence: vec![Evidence {
                environment: "prod".into(),
                source: Source::Agent,
                window: Duration::from_secs(3600),
                observed: vec![observed],
                usage: None,
            }],
            deployed: Vec::new(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deps.db");
        let summary = write_sqlite(&path, &export, false).unwrap();
        assert_eq!(
            summary,
            Summary {
                environments: 1,
                services: 2,
                service_edges: 1,
                dependencies: 2,
                observed_edges: 1,
                deployed_versions: 0,
                requirements: 0
            }
        );
        let db = Connection::open(&path).unwrap();
        assert_eq!(rows(&db, "PRAGMA user_version"), vec!["2"]);
        assert_eq!(rows(&db, "SELECT value FROM meta WHERE key = 'schema_version'"), vec!["2"]);
        assert_eq!(rows(&db, "SELECT * FROM environments"), vec!["prod|enforce"]);
        assert_eq!(
            rows(&db, "SELECT * FROM services ORDER BY name"),
            vec![
                "api|NULL|2|NULL|NULL|NULL|policy.toml|12|11",
                "db|storage|1|NULL|NULL|the main database|policy.toml|6|11"
            ]
        );
        assert_eq!(
            rows(&db, "SELECT * FROM service_modes ORDER BY service"),
            vec!["api|prod|enforce", "db|prod|enforce"]
        );
        assert_eq!(rows(&db, "SELECT * FROM service_edges"), vec!["prod|api|db|1|declared|policy.toml|16|3"]);
        assert_eq!(
            rows(&db, "SELECT * FROM dependencies ORDER BY rule_id, destination"),
            vec![
                "api|prod|0|db|10.0.0.1/32|address|5432|5432|5432|tcp|1|policy.toml|16|3",
                "api|prod|1|NULL|*.example.com|host|443|443|443|tcp|0|policy.toml|17|3",
            ]
        );
        assert_eq!(
            rows(&db, "SELECT * FROM observed_edges"),
            vec![
                "api|prod|10.0.0.1|address|db|5432|tcp|would_reject|3|2023-11-14T22:13:20Z|2023-11-14T22:14:20Z|[\"host-a\"]|[\"curl\"]|agent"
            ]
        );
        assert_eq!(rows(&db, "SELECT * FROM owners"), vec!["depfence|shop|db|storage|NULL|NULL"]);
        assert_eq!(
            rows(&db, "SELECT repo, repository_type, additional_metadata FROM repository_metadata ORDER BY repo"),
            vec![
                "api|service|{\"tier\":2,\"layer\":null,\"group\":null,\"owner\":null}",
                "db|service|{\"tier\":1,\"layer\":null,\"group\":null,\"owner\":\"storage\"}",
            ]
        );
    }

    #[test]
    fn an_existing_file_is_replaced_only_when_asked() {
        let parsed = parse_sources(files());
        let compiled = compile_sources(files()).unwrap();
        let export = Export {
            policy: &parsed.policy,
            compiled: &compiled,
            name: "shop".into(),
            environments: Vec::new(),
            evidence: Vec::new(),
            deployed: Vec::new(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deps.db");
        std::fs::write(&path, b"not a database").unwrap();
        let error = write_sqlite(&path, &export, false).unwrap_err();
        assert!(matches!(error, ExportError::Exists(_)), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a database");
        let summary = write_sqlite(&path, &export, true).unwrap();
        assert_eq!((summary.environments, summary.service_edges), (2, 2));
        let db = Connection::open(&path).unwrap();
        assert_eq!(rows(&db, "SELECT value FROM meta WHERE key = 'observed_source'"), vec!["none"]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("deps.db")]);
    }

    #[test]
    fn an_unknown_environment_is_refused() {
        let parsed = parse_sources(files());
        let compiled = compile_sources(files()).unwrap();
        let export = Export {
            policy: &parsed.policy,
            compiled: &compiled,
            name: "shop".into(),
            environments: vec!["prd".into()],
            evidence: Vec::new(),
            deployed: Vec::new(),
        };
        let dir = tempfile::tempdir().unwrap();
        let error = write_sqlite(&dir.path().join("deps.db"), &export, false).unwrap_err();
        assert_eq!(error.to_string(), "unknown environment `prd` (the policy has: prod, qa)");
    }

    const VERSIONED: &str = r#"version = 1
[environments]
prod = "enforce"
qa = "audit"

[services.db]
tier = 1
endpoints = [{ ip = "10.0.0.1", ports = [5432], proto = "tcp" }]

[services.api]
tier = 2
endpoints = [{ ip = "10.0.0.2", ports = [80], proto = "tcp" }]
allow = [{ service = "db" }, { cidr = "192.0.2.0/24", ports = [443], proto = "tcp" }]
requires = [
  { service = "db", version = ">=1.8", reason = "the new column" },
  { service = "db", version = "^2.0.0-rc.1, <3", when = ">=3.1", env = "qa" },
]
"#;

    #[test]
    fn deployed_versions_requirements_and_allowed_traffic() {
        let files = vec![("policy.toml".to_owned(), VERSIONED.to_owned())];
        let parsed = parse_sources(files.clone());
        let compiled = compile_sources(files).unwrap();
        let manifest = crate::deploy::parse_deployed_str(
            "prod.toml",
            "[services.db]\nversions = [\"1.10.0\", \"1.9.0-rc.1+b7\"]\n\n\
             [services.api]\nversions = \"3.0.0\"\ncomponents = { sidecar = [\"0.10.0\", \"0.2.1\"] }\n\n\
             [services.ghost]\nversions = \"1.0.0\"\n",
        );
        assert!(manifest.diagnostics.is_empty());
        let t = |s| Some(UNIX_EPOCH + Duration::from_secs(s));
        let mut usage = crate::usage::declared(&compiled.snapshot, 0, "prod", Duration::from_secs(3600));
        usage.add_rule_hits(
            "api",
            &usage.services[0].backends[0].rules[0].rule.clone(),
            4,
            t(60).unwrap(),
            t(120).unwrap(),
        );
        let rise = crate::promote::fleet::Rise {
            count: 2,
            hosts: BTreeSet::from(["h1".to_owned()]),
            first: t(0),
            last: t(30),
        };
        usage.add_backend_hits("api", "db", &rise);
        let export = Export {
            policy: &parsed.policy,
            compiled: &compiled,
            name: "shop".into(),
            environments: Vec::new(),
            evidence: vec![Evidence {
                environment: "prod".into(),
                source: Source::Prometheus,
                window: Duration::from_secs(3600),
                observed: Vec::new(),
                usage: Some(usage),
            }],
            deployed: vec![Manifest { environment: "prod", manifest: &manifest }],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deps.db");
        let summary = write_sqlite(&path, &export, false).unwrap();
        assert_eq!((summary.deployed_versions, summary.requirements, summary.observed_edges), (5, 3, 2));
        let db = Connection::open(&path).unwrap();
        assert_eq!(rows(&db, "SELECT value FROM meta WHERE key = 'deployed_environments'"), vec!["prod"]);
        assert_eq!(
            rows(&db, "SELECT * FROM deployed_versions ORDER BY service, component, major, minor, patch"),
            vec![
                "prod|api||3.0.0|3|0|0|NULL|NULL|prod.toml|5|12",
                "prod|api|sidecar|0.2.1|0|2|1|NULL|NULL|prod.toml|6|37",
                "prod|api|sidecar|0.10.0|0|10|0|NULL|NULL|prod.toml|6|27",
                "prod|db||1.9.0-rc.1+b7|1|9|0|rc.1|b7|prod.toml|2|23",
                "prod|db||1.10.0|1|10|0|NULL|NULL|prod.toml|2|13",
            ]
        );
        // Numerically, not as text: 0.10.0 is not below 0.3.0.
        assert_eq!(
            rows(
                &db,
                "SELECT version FROM deployed_versions WHERE component = 'sidecar' AND (major, minor, patch) < (0, 3, 0)"
            ),
            vec!["0.2.1"]
        );
        assert_eq!(
            rows(&db, "SELECT * FROM requirements ORDER BY environment, line"),
            vec![
                "prod|api|db|>=1.8|NULL|the new column|1|8|0|policy.toml|15|3",
                "qa|api|db|>=1.8|NULL|the new column|1|8|0|policy.toml|15|3",
                "qa|api|db|^2.0.0-rc.1, <3|>=3.1|NULL|NULL|NULL|NULL|policy.toml|16|3",
            ]
        );
        assert_eq!(
            rows(&db, "SELECT * FROM observed_edges ORDER BY destination"),
            vec![
                "api|prod|192.0.2.0/24|address|NULL|NULL|NULL|allowed|4|1970-01-01T00:01:00Z|1970-01-01T00:02:00Z|[]|[]|prometheus",
                "api|prod|db|service|db|NULL|NULL|allowed|2|1970-01-01T00:00:00Z|1970-01-01T00:00:30Z|[\"h1\"]|[]|prometheus",
            ]
        );
    }

    #[test]
    fn a_manifest_must_be_for_an_exported_environment() {
        let parsed = parse_sources(files());
        let compiled = compile_sources(files()).unwrap();
        let manifest = crate::deploy::parse_deployed_str("qa.toml", "");
        let export = |env, environments: Vec<String>, twice: bool| {
            let mut deployed = vec![Manifest { environment: env, manifest: &manifest }];
            if twice {
                deployed.push(Manifest { environment: env, manifest: &manifest });
            }
            let export = Export {
                policy: &parsed.policy,
                compiled: &compiled,
                name: "shop".into(),
                environments,
                evidence: Vec::new(),
                deployed,
            };
            let dir = tempfile::tempdir().unwrap();
            write_sqlite(&dir.path().join("deps.db"), &export, false).map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(
            export("qa", vec!["prod".into()], false),
            Err("a deployed-versions manifest for environment `qa`, which is not exported".into())
        );
        assert_eq!(export("qa", Vec::new(), true), Err("two deployed-versions manifests for environment `qa`".into()));
        assert_eq!(
            export("prd", Vec::new(), false),
            Err("unknown environment `prd` (the policy has: prod, qa)".into())
        );
        assert_eq!(export("qa", Vec::new(), false), Ok(()));
    }

    #[test]
    fn only_a_single_at_least_comparator_has_a_lower_bound() {
        let bound = |text: &str| simple_lower_bound(&VersionReq::parse(text).unwrap());
        assert_eq!(bound(">=0.3"), Some((0, 3, 0)));
        assert_eq!(bound(">=1.2.3"), Some((1, 2, 3)));
        assert_eq!(bound(">=2"), Some((2, 0, 0)));
        assert_eq!(bound(">=1.0.0-rc.1"), None);
        assert_eq!(bound(">=1, <2"), None);
        assert_eq!(bound("^1.2"), None);
    }
}
