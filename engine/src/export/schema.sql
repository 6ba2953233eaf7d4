-- The schema of `policyctl export --sqlite`, version 2. Documented column by column in
-- docs/export-schema.md; `meta.schema_version` (and `PRAGMA user_version`) say which version a
-- file has. A later version only adds tables, columns, views and values. Version 2 added
-- `deployed_versions`, `requirements`, and `observed_edges` rows with verdict `allowed`.

-- What the file is: one row per key (schema_version, generator, policy, snapshot_hash,
-- environments, observed_source, observed_window_secs, dmd_platform, dmd_organisation,
-- deployed_environments).
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- The environments exported, with their default mode.
CREATE TABLE environments (
    name TEXT PRIMARY KEY NOT NULL,
    default_mode TEXT NOT NULL CHECK (default_mode IN ('off', 'audit', 'enforce'))
) STRICT;

-- One row per service of the policy.
CREATE TABLE services (
    name TEXT PRIMARY KEY NOT NULL,
    owner TEXT,
    tier INTEGER,
    layer TEXT,
    grp TEXT,
    description TEXT,
    file TEXT,
    line INTEGER,
    column INTEGER
) STRICT;

-- A service's mode in each exported environment.
CREATE TABLE service_modes (
    service TEXT NOT NULL REFERENCES services (name),
    environment TEXT NOT NULL REFERENCES environments (name),
    mode TEXT NOT NULL CHECK (mode IN ('off', 'audit', 'enforce')),
    PRIMARY KEY (service, environment)
) STRICT;

-- The dependency graph of each exported environment, as the compiler builds it: one row per
-- (environment, dependent, dependency), what `policyctl dependents` and `graph` walk.
CREATE TABLE service_edges (
    environment TEXT NOT NULL REFERENCES environments (name),
    from_service TEXT NOT NULL REFERENCES services (name),
    to_service TEXT NOT NULL REFERENCES services (name),
    critical INTEGER NOT NULL CHECK (critical IN (0, 1)),
    kind TEXT NOT NULL CHECK (kind IN ('declared', 'inferred')),
    file TEXT,
    line INTEGER,
    column INTEGER,
    PRIMARY KEY (environment, from_service, to_service)
) STRICT;

-- The declared dependencies as enforced: one row per compiled rule (an address rule or a host
-- rule) of a service in an exported environment.
CREATE TABLE dependencies (
    from_service TEXT NOT NULL REFERENCES services (name),
    environment TEXT NOT NULL REFERENCES environments (name),
    rule_id INTEGER NOT NULL,
    to_service TEXT REFERENCES services (name),
    destination TEXT NOT NULL,
    destination_kind TEXT NOT NULL CHECK (destination_kind IN ('address', 'host')),
    ports TEXT NOT NULL,
    port_first INTEGER NOT NULL,
    port_last INTEGER NOT NULL,
    protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp', 'any')),
    critical INTEGER NOT NULL CHECK (critical IN (0, 1)),
    file TEXT,
    line INTEGER,
    column INTEGER
) STRICT;

CREATE INDEX dependencies_by_target ON dependencies (to_service, environment);

-- Traffic seen by the agents (`--agent` or `--prometheus`): one row per (service, environment,
-- destination, verdict). `would_reject`: destinations the policy does not allow; `allowed`
-- (version 2): the declared dependencies (backends) that had hits in the window.
CREATE TABLE observed_edges (
    from_service TEXT NOT NULL REFERENCES services (name),
    environment TEXT NOT NULL REFERENCES environments (name),
    destination TEXT NOT NULL,
    destination_kind TEXT NOT NULL CHECK (destination_kind IN ('address', 'name', 'service', 'host_rules')),
    destination_service TEXT REFERENCES services (name),
    port INTEGER,
    protocol TEXT CHECK (protocol IN ('tcp', 'udp')),
    verdict TEXT NOT NULL CHECK (verdict IN ('allowed', 'would_reject')),
    count INTEGER NOT NULL,
    first_seen TEXT,
    last_seen TEXT,
    hosts TEXT NOT NULL,
    processes TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('agent', 'prometheus'))
) STRICT;

-- What runs in each environment with a deployed-versions manifest (`--deployed ENV=FILE`): one
-- row per (environment, service, component, version); `component` is '' for the service's own
-- versions. The version's parts are integers, so `(major, minor, patch) < (0, 3, 0)` compares
-- numerically (text would say '0.10.0' < '0.3').
CREATE TABLE deployed_versions (
    environment TEXT NOT NULL REFERENCES environments (name),
    service TEXT NOT NULL REFERENCES services (name),
    component TEXT NOT NULL,
    version TEXT NOT NULL,
    major INTEGER NOT NULL,
    minor INTEGER NOT NULL,
    patch INTEGER NOT NULL,
    prerelease TEXT,
    build TEXT,
    file TEXT,
    line INTEGER,
    column INTEGER,
    PRIMARY KEY (environment, service, component, version)
) STRICT;

CREATE INDEX deployed_versions_by_component ON deployed_versions (component, environment);

-- The version requirements (`requires`) of the policy: one row per (exported environment where
-- the requirement holds, requirement). `min_*`: the lower bound when the requirement is a single
-- `>=X[.Y[.Z]]` comparator without a pre-release, else NULL.
CREATE TABLE requirements (
    environment TEXT NOT NULL REFERENCES environments (name),
    consumer TEXT NOT NULL REFERENCES services (name),
    target TEXT NOT NULL REFERENCES services (name),
    version TEXT NOT NULL,
    applies_when TEXT,
    reason TEXT,
    min_major INTEGER,
    min_minor INTEGER,
    min_patch INTEGER,
    file TEXT,
    line INTEGER,
    column INTEGER
) STRICT;

-- dependency-management-data's `owners` table, one row per service with an owner.
CREATE VIEW owners AS
SELECT
    (SELECT value FROM meta WHERE key = 'dmd_platform') AS platform,
    (SELECT value FROM meta WHERE key = 'dmd_organisation') AS organisation,
    name AS repo,
    owner,
    NULL AS notes,
    NULL AS updated_at
FROM services
WHERE owner IS NOT NULL;

-- dependency-management-data's `repository_metadata` table, one row per service.
CREATE VIEW repository_metadata AS
SELECT
    (SELECT value FROM meta WHERE key = 'dmd_platform') AS platform,
    (SELECT value FROM meta WHERE key = 'dmd_organisation') AS organisation,
    name AS repo,
    0 AS is_monorepo,
    0 AS is_fork,
    'service' AS repository_type,
    layer AS repository_usage,
    NULL AS visibility,
    description,
    json_object('tier', tier, 'layer', layer, 'group', grp, 'owner', owner) AS additional_metadata
FROM services;
