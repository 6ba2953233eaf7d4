//! Host-name matching for the DNS proxy: which names each service may resolve, and for which
//! protocols and ports the answers count.
//!
//! A [`NameMatcher`] indexes one service's [`HostRule`]s: exact names in one hash set, wildcard
//! domains in another. A query name is looked up exactly, then each of its proper parent domains
//! is looked up among the wildcards, so `*.mirror.internal` matches `a.mirror.internal` and
//! `a.b.mirror.internal` (on a label boundary) but not `mirror.internal`, `evilmirror.internal` or
//! `mirror.internal.evil`. Matching ignores ASCII case and one trailing dot, and costs one hash
//! lookup per label.
//!
//! [`DnsPolicy`] is the frozen view the proxy reads: per service name, its mode in one
//! environment and its matcher, built once from a [`Snapshot`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::policy::{HostPattern, Mode, PortRange, Proto};
use crate::snapshot::{HostRule, Snapshot};

/// What an allowed name grants once resolved: connections with this protocol to these ports of
/// the name's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    /// Protocol (`Any` for both).
    pub proto: Proto,
    /// Port range ([`PortRange::ANY`] for every port).
    pub ports: PortRange,
}

/// The names one service may resolve. Built once, then read-only.
#[derive(Debug, Clone, Default)]
pub struct NameMatcher {
    /// Exact names, lowercase, without a final dot → what they grant.
    exact: HashMap<Box<str>, Vec<Grant>>,
    /// Wildcard domains (`*.d` stored as `d`), lowercase → what they grant.
    wildcards: HashMap<Box<str>, Vec<Grant>>,
}

impl NameMatcher {
    /// Indexes host patterns with what each grants.
    pub fn new<'a>(rules: impl IntoIterator<Item = (&'a HostPattern, Grant)>) -> NameMatcher {
        let mut matcher = NameMatcher::default();
        for (pattern, grant) in rules {
            let table = if pattern.wildcard { &mut matcher.wildcards } else { &mut matcher.exact };
            let grants = table.entry(pattern.domain.to_ascii_lowercase().into_boxed_str()).or_default();
            if !grants.contains(&grant) {
                grants.push(grant);
            }
        }
        matcher
    }

    /// Indexes a service's compiled host rules.
    pub fn from_rules(rules: &[HostRule]) -> NameMatcher {
        NameMatcher::new(rules.iter().map(|r| (&r.host, Grant { proto: r.proto, ports: r.ports })))
    }

    /// True when no name is allowed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty()
    }

    /// True when `name` is allowed: equal to an exact name, or strictly below a wildcard's domain
    /// on a label boundary. Case insensitive; one trailing dot is ignored.
    pub fn matches(&self, name: &str) -> bool {
        self.visit(name, |_| true)
    }

    /// What resolving `name` grants: the union of the grants of every pattern that matches it,
    /// sorted and without duplicates. Empty when the name is not allowed.
    pub fn grants(&self, name: &str) -> Vec<Grant> {
        let mut out = Vec::new();
        self.visit(name, |grants| {
            out.extend_from_slice(grants);
            false
        });
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Calls `found` with the grants of each matching pattern until it returns true; returns
    /// whether it did.
    fn visit(&self, name: &str, mut found: impl FnMut(&[Grant]) -> bool) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || name.len() > 253 {
            return false;
        }
        // Names in the tables are lowercase; only allocate when the query is not.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(grants) = self.exact.get(name)
            && found(grants)
        {
            return true;
        }
        if self.wildcards.is_empty() {
            return false;
        }
        // Every proper parent domain: `a.b.c` → `b.c`, `c`. An empty label (`a..b`) never
        // matches, since no stored domain has one at that position.
        let mut rest = name;
        while let Some((label, parent)) = rest.split_once('.') {
            if label.is_empty() {
                return false;
            }
            if let Some(grants) = self.wildcards.get(parent)
                && found(grants)
            {
                return true;
            }
            rest = parent;
        }
        false
    }
}

/// One service as the proxy sees it.
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    /// The service's mode in the proxy's environment.
    pub mode: Mode,
    /// The names it may resolve.
    pub names: NameMatcher,
}

/// The frozen policy of the DNS proxy: per service name, its mode and allowed names. Replace it
/// whole (`Proxy::set_policy`) when a new snapshot is applied.
#[derive(Debug, Clone, Default)]
pub struct DnsPolicy {
    services: HashMap<Arc<str>, Arc<ServicePolicy>>,
}

impl DnsPolicy {
    /// Builds the policy of environment `env` (an index into [`Snapshot::environments`]);
    /// a service without a mode there is `off`.
    pub fn from_snapshot(snapshot: &Snapshot, env: usize) -> DnsPolicy {
        let services = snapshot
            .services()
            .iter()
            .map(|s| {
                let mode = s.mode(env);
                let policy = ServicePolicy { mode, names: NameMatcher::from_rules(&s.rules(env).host_rules) };
                (Arc::from(s.name.as_str()), Arc::new(policy))
            })
            .collect();
        DnsPolicy { services }
    }

    /// Builds a policy from explicit parts (tests, embedding).
    pub fn from_services(services: impl IntoIterator<Item = (String, ServicePolicy)>) -> DnsPolicy {
        DnsPolicy { services: services.into_iter().map(|(n, p)| (Arc::from(n), Arc::new(p))).collect() }
    }

    /// The policy of service `name`, if it exists.
    pub fn service(&self, name: &str) -> Option<&Arc<ServicePolicy>> {
        self.services.get(name)
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// True when there is no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn matcher(patterns: &[&str]) -> NameMatcher {
        let parsed: Vec<HostPattern> = patterns.iter().map(|p| HostPattern::parse(p).unwrap()).collect();
        NameMatcher::new(parsed.iter().map(|p| (p, Grant { proto: Proto::Any, ports: PortRange::ANY })))
    }

    /// Every case of the issue, and the traps around them, against the matcher and against
    /// `HostPattern::matches` (the reference definition): both must agree everywhere.
    #[test]
    fn wildcard_matches_on_label_boundaries_only() {
        let m = matcher(&["*.mirror.internal"]);
        let pattern = HostPattern::parse("*.mirror.internal").unwrap();
        let cases = [
            ("a.mirror.internal", true),
            ("a.b.mirror.internal", true),
            ("A.Mirror.INTERNAL", true),
            ("a.mirror.internal.", true),
            ("x-y_z.mirror.internal", true),
            ("mirror.internal", false),
            ("mirror.internal.", false),
            ("evilmirror.internal", false),
            ("a.evilmirror.internal", false),
            ("mirror.internal.evil", false),
            ("a.mirror.internal.evil", false),
            ("a.mirror.internal..", false),
            (".mirror.internal", false),
            ("a..mirror.internal", false),
            ("amirror.internal", false),
            ("internal", false),
            ("", false),
            (".", false),
            ("a.mirror-internal", false),
            ("a.mirror.interna", false),
            ("a.mirror.internall", false),
        ];
        for (name, expected) in cases {
            assert_eq!(m.matches(name), expected, "matcher on `{name}`");
            assert_eq!(m.grants(name).is_empty(), !expected, "grants on `{name}`");
            if !name.ends_with("..") && !name.starts_with('.') && !name.contains("..") && !name.is_empty() {
                assert_eq!(pattern.matches(name), expected, "HostPattern::matches on `{name}`");
            }
        }
    }

    #[test]
    fn exact_names_match_only_themselves() {
        let m = matcher(&["mirror.internal", "API.Example.com."]);
        for (name, expected) in [
            ("mirror.internal", true),
            ("MIRROR.internal.", true),
            ("api.example.com", true),
            ("api.example.com.", true),
            ("a.mirror.internal", false),
            ("evilmirror.internal", false),
            ("mirror.internal.evil", false),
            ("example.com", false),
            ("x.api.example.com", false),
            ("mirror.internal..", false),
        ] {
            assert_eq!(m.matches(name), expected, "`{name}`");
        }
    }

    #[test]
    fn exact_and_wildcard_together_and_nested_wildcards() {
        let m = matcher(&["mirror.internal", "*.mirror.internal", "*.b.example.com"]);
        assert!(m.matches("mirror.internal"));
        assert!(m.matches("x.mirror.internal"));
        assert!(m.matches("a.b.example.com"));
        assert!(m.matches("z.a.b.example.com"));
        assert!(!m.matches("b.example.com"));
        assert!(!m.matches("example.com"));
        assert!(!m.matches("c.example.com"));
    }

    #[test]
    fn empty_matcher_allows_nothing() {
        let m = NameMatcher::default();
        assert!(m.is_empty());
        assert!(!m.matches("a.mirror.internal"));
        assert!(m.grants("a.mirror.internal").is_empty());
        assert!(!matcher(&["*.a"]).is_empty());
    }

    #[test]
    fn overlong_names_never_match() {
        let m = matcher(&["*.internal"]);
        let long = format!("{}internal", "a.".repeat(130));
        assert!(long.len() > 253);
        assert!(!m.matches(&long));
        let ok = format!("{}internal", "a.".repeat(60));
        assert!(m.matches(&ok));
    }

    #[test]
    fn grants_are_the_union_of_every_matching_pattern() {
        let exact = HostPattern::parse("metrics.internal").unwrap();
        let wild = HostPattern::parse("*.internal").unwrap();
        let udp = Grant { proto: Proto::Udp, ports: PortRange { first: 8125, last: 8125 } };
        let tcp = Grant { proto: Proto::Tcp, ports: PortRange { first: 443, last: 443 } };
        let m = NameMatcher::new([(&exact, udp), (&wild, tcp), (&wild, tcp)]);
        assert_eq!(m.grants("metrics.internal"), {
            let mut v = vec![udp, tcp];
            v.sort_unstable();
            v
        });
        assert_eq!(m.grants("other.internal"), vec![tcp]);
        assert_eq!(m.grants("internal"), Vec::<Grant>::new());
    }

    /// Random names built from a small alphabet of labels, checked against the reference
    /// definition (`HostPattern::matches`) for a set of patterns.
    #[test]
    fn agrees_with_the_reference_on_generated_names() {
        let labels = ["a", "mirror", "internal", "evilmirror", "evil", "MIRROR", "b"];
        let patterns = ["*.mirror.internal", "mirror.internal", "*.internal", "evil", "*.a.b"];
        let parsed: Vec<HostPattern> = patterns.iter().map(|p| HostPattern::parse(p).unwrap()).collect();
        for set in 1u32..(1 << patterns.len()) {
            let chosen: Vec<&HostPattern> =
                parsed.iter().enumerate().filter(|(i, _)| set & (1 << i) != 0).map(|(_, p)| p).collect();
            let m = NameMatcher::new(chosen.iter().map(|p| (*p, Grant { proto: Proto::Any, ports: PortRange::ANY })));
            // Every name of 1 to 4 labels.
            let mut names = vec![String::new()];
            for _ in 0..4 {
                let mut next = Vec::new();
                for prefix in &names {
                    for label in labels {
                        next.push(if prefix.is_empty() { label.to_owned() } else { format!("{label}.{prefix}") });
                    }
                }
                for name in &next {
                    let expected = chosen.iter().any(|p| p.matches(name));
                    assert_eq!(m.matches(name), expected, "`{name}` against {chosen:?}");
                }
                names = next;
            }
        }
    }

    /// A service allowed another service whose endpoints are host names may resolve those
    /// names, with the endpoints' ports; the other service itself may not (it has no such rule).
    #[test]
    fn host_endpoints_of_an_allowed_service_are_its_names() {
        let text = r#"version = 1
[environments]
prod = "enforce"

[services.mirror]
endpoints = [{ host = "*.mirror.internal", ports = [443], proto = "tcp" }]

[services.builder]
allow = [{ service = "mirror" }]
"#;
        let snapshot = crate::compile::compile_str("p.toml", text).map_err(|(_, d)| d).unwrap().snapshot;
        let policy = DnsPolicy::from_snapshot(&snapshot, 0);
        let builder = policy.service("builder").unwrap();
        assert_eq!(builder.mode, Mode::Enforce);
        assert_eq!(
            builder.names.grants("a.mirror.internal"),
            [Grant { proto: Proto::Tcp, ports: PortRange { first: 443, last: 443 } }]
        );
        assert!(!builder.names.matches("evilmirror.internal"));
        assert!(!builder.names.matches("mirror.internal.evil"));
        assert!(policy.service("mirror").unwrap().names.is_empty());
    }
}
