-- Which services in prod run a Kafka sidecar older than 0.3.0 (the race condition), who owns
-- them, how critical they are, and who depends on them (directly or through others), most
-- critical first. Versions compare as integers: (0, 10, 0) is not below (0, 3, 0), though the
-- text '0.10.0' sorts before '0.3'. A pre-release of 0.3.0 (0.3.0-rc.1) is older than 0.3.0.
WITH RECURSIVE
vulnerable(service, sidecar, major, minor, patch) AS (
  SELECT service, version, major, minor, patch FROM deployed_versions
  WHERE environment = 'prod' AND component = 'kafka-sidecar'
    AND ((major, minor, patch) < (0, 3, 0)
         OR ((major, minor, patch) = (0, 3, 0) AND prerelease IS NOT NULL))
),
dependent(affected, service) AS (
  SELECT e.to_service, e.from_service FROM service_edges e
  JOIN vulnerable v ON e.to_service = v.service WHERE e.environment = 'prod'
  UNION
  SELECT d.affected, e.from_service FROM service_edges e
  JOIN dependent d ON e.to_service = d.service WHERE e.environment = 'prod'
)
SELECT
  v.service,
  v.sidecar,
  s.owner,
  s.tier,
  (SELECT group_concat(name || ' (' || coalesce(owner, '-') || ', tier ' || coalesce(tier, '-') || ')', ', ')
   FROM (SELECT x.name, x.owner, x.tier FROM dependent d JOIN services x ON x.name = d.service
         WHERE d.affected = v.service AND x.name <> v.service
         ORDER BY x.tier IS NULL, x.tier, x.name)) AS dependents
FROM vulnerable v JOIN services s ON s.name = v.service
ORDER BY s.tier IS NULL, s.tier, v.service, v.major, v.minor, v.patch;
