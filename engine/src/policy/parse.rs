//! TOML text → [`PolicySet`] entries, reporting every problem with its location.
//!
//! Two stages, as in cedar: the TOML parser (with recovery) gives a spanned document tree; this
//! module walks it, checks each key and value, and builds the AST. A bad entry is reported and
//! skipped, so one run reports every independent problem in the file.

use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ast::*;
use crate::diag::{Diagnostic, Diagnostics, FileId, Loc, Located, SourceFile};
use crate::problem::{Problem, closest};

/// The policy language version this build reads.
pub const POLICY_VERSION: i64 = 1;

const TOP_KEYS: &[&str] = &["version", "environments", "model", "services", "intrinsic_cycles"];
const ENVIRONMENT_KEYS: &[&str] = &["mode"];
const MODEL_KEYS: &[&str] = &["layers", "isolated"];
const SERVICE_KEYS: &[&str] = &[
    "cgroup",
    "layer",
    "group",
    "owner",
    "description",
    "tier",
    "mode",
    "endpoints",
    "allow",
    "rpc_allow",
    "requires",
];
const SELECTOR_KEYS: &[&str] = &["regex"];
const ENDPOINT_KEYS: &[&str] = &["ip", "cidr", "host", "ports", "proto", "env"];
const ALLOW_KEYS: &[&str] =
    &["service", "ip", "cidr", "host", "ports", "proto", "critical", "env", "cross_environment", "reason"];
/// The key of an `endpoints` table for the environments the table does not name.
const DEFAULT_ENDPOINTS_KEY: &str = "default";
const RPC_ALLOW_KEYS: &[&str] = &["service", "rpcs"];
const REQUIRES_KEYS: &[&str] = &["service", "version", "when", "reason", "env"];
const CYCLE_KEYS: &[&str] = &["services", "reason"];

type Value<'i> = Spanned<DeValue<'i>>;

/// One file parsed on its own: its part of the policy, its diagnostics, and where it defines
/// `[model]` (which only one file may do; the merge in [`super::merge`] checks that).
pub(super) struct FilePart {
    pub(super) source: SourceFile,
    pub(super) policy: PolicySet,
    pub(super) diags: Diagnostics,
    pub(super) model_at: Option<Loc>,
    pub(super) syntax_ok: bool,
}

/// Parses one file. When it is not valid TOML, only the syntax errors are kept (its content is
/// not used, so later stages do not report problems that only follow from the bad syntax).
/// The result depends only on `file` and the text: the incremental cache relies on it.
pub(super) fn parse_file(file: FileId, source: SourceFile) -> FilePart {
    let mut policy = PolicySet::default();
    let mut diags = Diagnostics::default();
    let mut model_at = None;
    let (root, errors) = DeTable::parse_recoverable(source.text());
    let mut p = Parser { file, diags: &mut diags };
    let syntax_ok = errors.is_empty();
    if syntax_ok {
        p.document(root.get_ref(), &mut policy, &mut model_at);
    } else {
        for error in errors {
            let span = error.span().unwrap_or(0..0);
            let message = error.message().trim_end_matches('\n').replace('\n', "; ");
            p.error(Problem::Syntax { message }, span, "here");
        }
    }
    FilePart { source, policy, diags, model_at, syntax_ok }
}

struct Parser<'d> {
    file: FileId,
    diags: &'d mut Diagnostics,
}

/// What every reader of a TOML file with spans reports the same way: located errors, unknown
/// keys (with the closest known one), values of the wrong type. The policy parser and the
/// deployed-versions manifest reader implement the two accessors.
pub(crate) trait TomlReport {
    /// The file being read.
    fn file(&self) -> FileId;
    /// Where the diagnostics go.
    fn diagnostics(&mut self) -> &mut Diagnostics;

    /// A location in the file.
    fn loc(&self, span: Range<usize>) -> Loc {
        Loc::new(self.file(), span)
    }

    /// An error at `span`.
    fn error(&mut self, problem: Problem, span: Range<usize>, label: &str) {
        let loc = self.loc(span);
        self.diagnostics().push(Diagnostic::error(problem, loc, label));
    }

    /// A key that `context` does not know.
    fn unknown_key(&mut self, key: &Spanned<std::borrow::Cow<'_, str>>, context: &'static str, known: &[&str]) {
        let suggestion = closest(key.get_ref(), known.iter().copied());
        self.error(
            Problem::UnknownKey { key: key.get_ref().to_string(), context, suggestion },
            key.span(),
            "unknown key",
        );
    }

    /// A value of the wrong type for `key`.
    fn wrong_type(&mut self, key: &str, expected: &'static str, value: &Value<'_>) {
        self.error(
            Problem::WrongType { key: key.to_owned(), expected, found: value.get_ref().type_str() },
            value.span(),
            "wrong type",
        );
    }
}

impl TomlReport for Parser<'_> {
    fn file(&self) -> FileId {
        self.file
    }

    fn diagnostics(&mut self) -> &mut Diagnostics {
        self.diags
    }
}

impl Parser<'_> {
    fn string<'v>(&mut self, key: &str, value: &'v Value<'_>) -> Option<&'v str> {
        let text = value.get_ref().as_str();
        if text.is_none() {
            self.wrong_type(key, "a string", value);
        }
        text
    }

    fn table<'v, 'i>(&mut self, key: &str, value: &'v Value<'i>) -> Option<&'v DeTable<'i>> {
        let table = value.get_ref().as_table();
        if table.is_none() {
            self.wrong_type(key, "a table", value);
        }
        table
    }

    fn array<'v, 'i>(&mut self, key: &str, value: &'v Value<'i>) -> Option<&'v [Value<'i>]> {
        let array = value.get_ref().as_array().map(|a| &a[..]);
        if array.is_none() {
            self.wrong_type(key, "an array", value);
        }
        array
    }

    fn integer(&mut self, key: &str, value: &Value<'_>) -> Option<i64> {
        let Some(int) = value.get_ref().as_integer() else {
            self.wrong_type(key, "an integer", value);
            return None;
        };
        let parsed = i64::from_str_radix(int.as_str(), int.radix()).ok();
        if parsed.is_none() {
            self.wrong_type(key, "an integer that fits in 64 bits", value);
        }
        parsed
    }

    fn boolean(&mut self, key: &str, value: &Value<'_>) -> Option<bool> {
        let b = value.get_ref().as_bool();
        if b.is_none() {
            self.wrong_type(key, "`true` or `false`", value);
        }
        b
    }

    /// A name of a service, layer, group or environment.
    fn name(&mut self, text: &str, span: Range<usize>) -> Option<Located<String>> {
        let mut chars = text.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            Some(Located::new(text.to_owned(), self.loc(span)))
        } else {
            self.error(Problem::InvalidName { value: text.to_owned() }, span, "not a valid name");
            None
        }
    }

    fn name_value(&mut self, key: &str, value: &Value<'_>) -> Option<Located<String>> {
        let text = self.string(key, value)?;
        self.name(text, value.span())
    }

    /// One environment name or a list of them: `"qa"` or `["qa", "staging"]`.
    fn environment_names(&mut self, key: &str, value: &Value<'_>) -> Option<Vec<Located<String>>> {
        if value.get_ref().is_str() {
            return self.name_value(key, value).map(|name| vec![name]);
        }
        let Some(items) = value.get_ref().as_array() else {
            self.wrong_type(key, "an environment name or a list of them", value);
            return None;
        };
        let names: Vec<_> = items.iter().map(|item| self.name_value(key, item)).collect::<Option<_>>()?;
        if names.is_empty() {
            self.error(Problem::EmptyEnvironmentList { key: key.to_owned() }, value.span(), "no environment");
            return None;
        }
        Some(names)
    }

    fn mode(&mut self, key: &str, value: &Value<'_>) -> Option<Located<Mode>> {
        let text = self.string(key, value)?;
        match Mode::parse(text) {
            Some(mode) => Some(Located::new(mode, self.loc(value.span()))),
            None => {
                self.error(Problem::InvalidMode { value: text.to_owned() }, value.span(), "unknown mode");
                None
            }
        }
    }

    fn document(&mut self, root: &DeTable<'_>, policy: &mut PolicySet, model_at: &mut Option<Loc>) {
        let mut version_seen = false;
        for (key, value) in root.iter() {
            match key.get_ref().as_ref() {
                "version" => {
                    version_seen = true;
                    if let Some(v) = self.integer("version", value)
                        && v != POLICY_VERSION
                    {
                        self.error(Problem::UnsupportedVersion { found: v.to_string() }, value.span(), "unsupported");
                    }
                }
                "environments" => self.environments(value, policy),
                "model" => {
                    *model_at = Some(self.loc(key.span()));
                    self.model(value, policy);
                }
                "services" => {
                    if let Some(table) = self.table("services", value) {
                        for (name, body) in table.iter() {
                            if let Some(service) = self.service(name, body) {
                                policy.services.push(service);
                            }
                        }
                    }
                }
                "intrinsic_cycles" => {
                    for item in self.array("intrinsic_cycles", value).unwrap_or_default() {
                        if let Some(cycle) = self.intrinsic_cycle(item) {
                            policy.intrinsic_cycles.push(cycle);
                        }
                    }
                }
                _ => self.unknown_key(key, "the policy", TOP_KEYS),
            }
        }
        if !version_seen {
            self.error(Problem::MissingKey { key: "version", context: "the policy file" }, 0..0, "add `version = 1`");
        }
    }

    fn environments(&mut self, value: &Value<'_>, policy: &mut PolicySet) {
        let Some(table) = self.table("environments", value) else { return };
        for (key, body) in table.iter() {
            let Some(name) = self.name(key.get_ref(), key.span()) else { continue };
            // `qa = "enforce"` is shorthand for `qa = { mode = "enforce" }`.
            let mode = if body.get_ref().is_str() {
                self.mode("mode", body)
            } else {
                let Some(env) = self.table(key.get_ref(), body) else { continue };
                let mut mode = None;
                for (k, v) in env.iter() {
                    match k.get_ref().as_ref() {
                        "mode" => mode = self.mode("mode", v),
                        _ => self.unknown_key(k, "an environment", ENVIRONMENT_KEYS),
                    }
                }
                if mode.is_none() && !env.contains_key("mode") {
                    self.error(Problem::MissingKey { key: "mode", context: "an environment" }, key.span(), "no mode");
                }
                mode
            };
            if let Some(mode) = mode {
                policy.environments.push(Environment { name, mode });
            }
        }
    }

    fn model(&mut self, value: &Value<'_>, policy: &mut PolicySet) {
        let Some(table) = self.table("model", value) else { return };
        for (key, v) in table.iter() {
            match key.get_ref().as_ref() {
                "layers" => {
                    for item in self.array("layers", v).unwrap_or_default() {
                        if let Some(layer) = self.name_value("layers", item) {
                            policy.layers.push(layer);
                        }
                    }
                }
                "isolated" => {
                    for set in self.array("isolated", v).unwrap_or_default() {
                        let Some(items) = self.array("isolated", set) else { continue };
                        let groups: Vec<_> = items.iter().filter_map(|g| self.name_value("isolated", g)).collect();
                        policy.isolated.push(IsolationSet { groups, loc: self.loc(set.span()) });
                    }
                }
                _ => self.unknown_key(key, "the model", MODEL_KEYS),
            }
        }
    }

    fn service(&mut self, key: &Spanned<std::borrow::Cow<'_, str>>, body: &Value<'_>) -> Option<Service> {
        let name = self.name(key.get_ref(), key.span())?;
        let table = self.table(key.get_ref(), body)?;
        let mut service = Service {
            name,
            selector: None,
            layer: None,
            group: None,
            owner: None,
            description: None,
            tier: None,
            mode: ModeSpec::Inherit,
            endpoints: Vec::new(),
            allow: Vec::new(),
            rpc_allow: Vec::new(),
            requires: Vec::new(),
        };
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "cgroup" => service.selector = self.selector(v),
                "layer" => service.layer = self.name_value("layer", v),
                "group" => service.group = self.name_value("group", v),
                "owner" => service.owner = self.string("owner", v).map(str::to_owned),
                "description" => service.description = self.string("description", v).map(str::to_owned),
                "tier" => {
                    if let Some(t) = self.integer("tier", v) {
                        match u8::try_from(t) {
                            Ok(tier @ 1..=9) => service.tier = Some(Located::new(tier, self.loc(v.span()))),
                            _ => self.error(Problem::InvalidTier { value: t }, v.span(), "out of range"),
                        }
                    }
                }
                "mode" => service.mode = self.mode_spec(v),
                "endpoints" => self.endpoints(v, &mut service.endpoints),
                "allow" => {
                    for item in self.array("allow", v).unwrap_or_default() {
                        if let Some(entry) = self.allow_entry(item) {
                            service.allow.push(entry);
                        }
                    }
                }
                "requires" => {
                    for item in self.array("requires", v).unwrap_or_default() {
                        if let Some(entry) = self.requirement(item) {
                            service.requires.push(entry);
                        }
                    }
                }
                "rpc_allow" => {
                    for item in self.array("rpc_allow", v).unwrap_or_default() {
                        if let Some(entry) = self.rpc_allow_entry(item) {
                            service.rpc_allow.push(entry);
                        }
                    }
                }
                _ => self.unknown_key(k, "a service", SERVICE_KEYS),
            }
        }
        Some(service)
    }

    fn selector(&mut self, value: &Value<'_>) -> Option<Located<Selector>> {
        let loc = self.loc(value.span());
        if let Some(path) = value.get_ref().as_str() {
            let path = path.trim_matches('/');
            return Some(Located::new(Selector::Path(path.to_owned()), loc));
        }
        let table = self.table("cgroup", value)?;
        let mut selector = None;
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "regex" => {
                    let text = self.string("regex", v)?;
                    match regex::Regex::new(text) {
                        Ok(_) => selector = Some(Located::new(Selector::Regex(text.to_owned()), loc)),
                        Err(e) => {
                            let reason = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
                            self.error(Problem::InvalidRegex { reason }, v.span(), "does not compile");
                        }
                    }
                }
                _ => self.unknown_key(k, "a cgroup selector", SELECTOR_KEYS),
            }
        }
        selector
    }

    fn mode_spec(&mut self, value: &Value<'_>) -> ModeSpec {
        if value.get_ref().is_str() {
            return self.mode("mode", value).map_or(ModeSpec::Inherit, ModeSpec::All);
        }
        let Some(table) = self.table("mode", value) else { return ModeSpec::Inherit };
        let mut per_env = Vec::new();
        for (k, v) in table.iter() {
            if let (Some(env), Some(mode)) = (self.name(k.get_ref(), k.span()), self.mode("mode", v)) {
                per_env.push((env, mode));
            }
        }
        ModeSpec::PerEnvironment(per_env)
    }

    /// The destination keys shared by endpoints and allow entries: `ip`, `cidr`, `host`.
    fn destination(&mut self, key: &str, value: &Value<'_>) -> Option<Destination> {
        let text = self.string(key, value)?;
        match key {
            "ip" => match text.parse::<IpAddr>() {
                Ok(ip) => Some(Destination::Net(host_net(ip.to_canonical()))),
                Err(_) => {
                    let reason = if text.contains('/') {
                        "write a block as `cidr = \"…\"`".to_owned()
                    } else {
                        "not an IPv4 or IPv6 address".to_owned()
                    };
                    self.error(
                        Problem::InvalidAddress { what: "address", value: text.to_owned(), reason, suggestion: None },
                        value.span(),
                        "invalid",
                    );
                    None
                }
            },
            "cidr" => match text.parse::<IpNet>() {
                Ok(net) if net.trunc() != net => {
                    self.error(
                        Problem::InvalidAddress {
                            what: "cidr",
                            value: text.to_owned(),
                            reason: "host bits are set".to_owned(),
                            suggestion: Some(net.trunc().to_string()),
                        },
                        value.span(),
                        "host bits set",
                    );
                    None
                }
                Ok(net) => Some(Destination::Net(canonical_net(net))),
                Err(_) => {
                    self.error(
                        Problem::InvalidAddress {
                            what: "cidr",
                            value: text.to_owned(),
                            reason: "expected `ADDRESS/PREFIX`, e.g. `10.0.0.0/8`".to_owned(),
                            suggestion: None,
                        },
                        value.span(),
                        "invalid",
                    );
                    None
                }
            },
            _ => match HostPattern::parse(text) {
                Ok(host) => Some(Destination::Host(host)),
                Err(reason) => {
                    self.error(Problem::InvalidHost { value: text.to_owned(), reason }, value.span(), "invalid");
                    None
                }
            },
        }
    }

    fn ports(&mut self, value: &Value<'_>) -> Option<Vec<PortRange>> {
        match value.get_ref() {
            DeValue::Array(items) if items.is_empty() => {
                self.error(
                    Problem::InvalidPort { value: "[]".into(), reason: "the list is empty; omit `ports` for any port" },
                    value.span(),
                    "empty",
                );
                None
            }
            DeValue::Array(items) => {
                // Every item is checked (and reported), even after a bad one.
                let mut ranges = Vec::with_capacity(items.len());
                let mut ok = true;
                for item in items {
                    match self.port_range(item) {
                        Some(range) => ranges.push(range),
                        None => ok = false,
                    }
                }
                ok.then_some(ranges)
            }
            _ => self.port_range(value).map(|r| vec![r]),
        }
    }

    fn port_range(&mut self, value: &Value<'_>) -> Option<PortRange> {
        let result = match value.get_ref() {
            DeValue::Integer(_) => {
                let n = self.integer("ports", value)?;
                port_from_integer(n).map(PortRange::single)
            }
            DeValue::String(text) => parse_port_range(text),
            _ => {
                self.wrong_type("ports", "a port, a range or a list of them", value);
                return None;
            }
        };
        match result {
            Ok(range) => Some(range),
            Err(reason) => {
                let shown = match value.get_ref() {
                    DeValue::String(s) => s.to_string(),
                    DeValue::Integer(i) => i.as_str().to_owned(),
                    other => other.type_str().to_owned(),
                };
                self.error(Problem::InvalidPort { value: shown, reason }, value.span(), "invalid");
                None
            }
        }
    }

    fn proto(&mut self, value: &Value<'_>) -> Option<Proto> {
        let text = self.string("proto", value)?;
        let proto = Proto::parse(text);
        if proto.is_none() {
            self.error(Problem::InvalidProto { value: text.to_owned() }, value.span(), "unknown protocol");
        }
        proto
    }

    /// Reads the destination keys of an entry, reporting a conflict or an absence.
    fn one_destination<'v, 'i>(
        &mut self,
        table: &'v DeTable<'i>,
        keys: &[&'static str],
        context: &'static str,
        span: Range<usize>,
    ) -> Option<(&'static str, &'v Value<'i>)> {
        let mut found: Option<(&'static str, &'v Value<'i>)> = None;
        let mut conflict = false;
        for (k, v) in table.iter() {
            let Some(&key) = keys.iter().find(|&&known| known == k.get_ref().as_ref()) else { continue };
            if let Some((first, _)) = found {
                self.error(
                    Problem::ConflictingKeys { first: first.to_owned(), second: key.to_owned() },
                    k.span(),
                    "second destination",
                );
                conflict = true;
            } else {
                found = Some((key, v));
            }
        }
        if found.is_none() {
            self.error(Problem::MissingDestination { context }, span, "no destination");
        }
        if conflict { None } else { found }
    }

    /// `endpoints = [...]` (every environment, or each entry's `env`), or a table of lists by
    /// environment, `endpoints = { prod = [...], qa = [...], default = [...] }`, where `default`
    /// holds the endpoints of the environments the table does not name.
    fn endpoints(&mut self, value: &Value<'_>, out: &mut Vec<Endpoint>) {
        let Some(table) = value.get_ref().as_table() else {
            for item in self.array("endpoints", value).unwrap_or_default() {
                out.extend(self.endpoint(item, None));
            }
            return;
        };
        let named: Vec<Located<String>> = table
            .iter()
            .filter(|(k, _)| k.get_ref() != DEFAULT_ENDPOINTS_KEY)
            .filter_map(|(k, _)| self.name(k.get_ref(), k.span()))
            .collect();
        for (k, v) in table.iter() {
            let scope = if k.get_ref() == DEFAULT_ENDPOINTS_KEY {
                EnvScope::Except(named.clone())
            } else {
                match named.iter().find(|n| n.value == k.get_ref().as_ref()) {
                    Some(name) => EnvScope::Only(vec![name.clone()]),
                    None => continue,
                }
            };
            let key = format!("endpoints.{}", k.get_ref());
            for item in self.array(&key, v).unwrap_or_default() {
                out.extend(self.endpoint(item, Some((&key, &scope))));
            }
        }
    }

    /// One endpoint; `table` is the `endpoints.ENV` list it is in, with that list's scope.
    fn endpoint(&mut self, value: &Value<'_>, table: Option<(&str, &EnvScope)>) -> Option<Endpoint> {
        let table_scope = table;
        let table = self.table("endpoints", value)?;
        let mut ports = Vec::new();
        let mut proto = Proto::Any;
        let mut env = table_scope.map(|(_, scope)| scope.clone()).unwrap_or_default();
        let mut ok = true;
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "ip" | "cidr" | "host" => {}
                "env" => match table_scope {
                    Some((list, _)) => {
                        self.error(
                            Problem::ConflictingKeys { first: list.to_owned(), second: "env".to_owned() },
                            k.span(),
                            "the list already names the environment",
                        );
                        ok = false;
                    }
                    None => match self.environment_names("env", v) {
                        Some(names) => env = EnvScope::Only(names),
                        None => ok = false,
                    },
                },
                "ports" => match self.ports(v) {
                    Some(p) => ports = p,
                    None => ok = false,
                },
                "proto" => match self.proto(v) {
                    Some(p) => proto = p,
                    None => ok = false,
                },
                _ => self.unknown_key(k, "an endpoint", ENDPOINT_KEYS),
            }
        }
        let (key, v) = self.one_destination(table, &["ip", "cidr", "host"], "an endpoint", value.span())?;
        let destination = self.destination(key, v)?;
        ok.then(|| Endpoint {
            destination: Located::new(destination, self.loc(v.span())),
            ports,
            proto,
            env,
            loc: self.loc(value.span()),
        })
    }

    fn allow_entry(&mut self, value: &Value<'_>) -> Option<AllowEntry> {
        let table = self.table("allow", value)?;
        let mut ports = None;
        let mut proto = None;
        let mut critical = true;
        let mut env = EnvScope::All;
        let mut cross_environment = Vec::new();
        let mut reason = None;
        let mut ok = true;
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "service" | "ip" | "cidr" | "host" => {}
                "env" => match self.environment_names("env", v) {
                    Some(names) => env = EnvScope::Only(names),
                    None => ok = false,
                },
                "cross_environment" => match self.environment_names("cross_environment", v) {
                    Some(names) => cross_environment = names,
                    None => ok = false,
                },
                "ports" => match self.ports(v) {
                    Some(p) => ports = Some(p),
                    None => ok = false,
                },
                "proto" => match self.proto(v) {
                    Some(p) => proto = Some(p),
                    None => ok = false,
                },
                "critical" => critical = self.boolean("critical", v).unwrap_or(true),
                "reason" => match self.string("reason", v) {
                    Some(text) => reason = Some(text.to_owned()),
                    None => ok = false,
                },
                _ => self.unknown_key(k, "an allow entry", ALLOW_KEYS),
            }
        }
        let (key, v) =
            self.one_destination(table, &["service", "ip", "cidr", "host"], "an allow entry", value.span())?;
        let target = if key == "service" {
            Target::Service(self.name_value("service", v)?.value)
        } else {
            Target::Destination(self.destination(key, v)?)
        };
        if !cross_environment.is_empty() && reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            self.error(
                Problem::MissingKey { key: "reason", context: "an allow entry with `cross_environment`" },
                value.span(),
                "why may it reach another environment?",
            );
            ok = false;
        }
        ok.then(|| AllowEntry {
            target: Located::new(target, self.loc(v.span())),
            ports,
            proto,
            critical,
            env,
            cross_environment,
            reason,
            loc: self.loc(value.span()),
        })
    }

    /// `{ service = "billing", rpcs = ["/billing.Billing/Charge", "/billing.Billing/*"] }`.
    fn rpc_allow_entry(&mut self, value: &Value<'_>) -> Option<RpcAllowEntry> {
        let table = self.table("rpc_allow", value)?;
        let mut service = None;
        let mut rpcs = None;
        let mut ok = true;
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "service" => {
                    service = self.name_value("service", v);
                    ok &= service.is_some();
                }
                "rpcs" => {
                    let Some(items) = v.get_ref().as_array() else {
                        self.wrong_type("rpcs", "an array of rpc names", v);
                        ok = false;
                        continue;
                    };
                    if items.is_empty() {
                        self.error(Problem::EmptyRpcList, v.span(), "empty");
                        ok = false;
                        continue;
                    }
                    // Every pattern is checked (and reported), even after a bad one.
                    let mut patterns = Vec::with_capacity(items.len());
                    for item in items {
                        let Some(text) = self.string("rpcs", item) else {
                            ok = false;
                            continue;
                        };
                        match RpcPattern::parse(text) {
                            Ok(pattern) => patterns.push(Located::new(pattern, self.loc(item.span()))),
                            Err(reason) => {
                                self.error(
                                    Problem::InvalidRpcPattern { value: text.to_owned(), reason },
                                    item.span(),
                                    "invalid rpc name",
                                );
                                ok = false;
                            }
                        }
                    }
                    rpcs = Some(patterns);
                }
                _ => self.unknown_key(k, "an rpc_allow entry", RPC_ALLOW_KEYS),
            }
        }
        for (key, missing) in [("service", !table.contains_key("service")), ("rpcs", !table.contains_key("rpcs"))] {
            if missing {
                self.error(
                    Problem::MissingKey { key, context: "an rpc_allow entry" },
                    value.span(),
                    format!("no `{key}`").as_str(),
                );
                ok = false;
            }
        }
        match (service, rpcs) {
            (Some(service), Some(rpcs)) if ok => Some(RpcAllowEntry { service, rpcs, loc: self.loc(value.span()) }),
            _ => None,
        }
    }

    /// `{ service = "payments", version = ">=2.14", when = ">=3.1", reason = "…", env = "prod" }`.
    fn requirement(&mut self, value: &Value<'_>) -> Option<Requirement> {
        let table = self.table("requires", value)?;
        let mut service = None;
        let mut version = None;
        let mut when = None;
        let mut reason = None;
        let mut env = EnvScope::All;
        let mut ok = true;
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "service" => {
                    service = self.name_value("service", v);
                    ok &= service.is_some();
                }
                "version" => {
                    version = self.version_constraint("version", v);
                    ok &= version.is_some();
                }
                "when" => {
                    when = self.version_constraint("when", v);
                    ok &= when.is_some();
                }
                "reason" => match self.string("reason", v) {
                    Some(text) => reason = Some(text.to_owned()),
                    None => ok = false,
                },
                "env" => match self.environment_names("env", v) {
                    Some(names) => env = EnvScope::Only(names),
                    None => ok = false,
                },
                _ => self.unknown_key(k, "a requires entry", REQUIRES_KEYS),
            }
        }
        for key in ["service", "version"] {
            if !table.contains_key(key) {
                self.error(
                    Problem::MissingKey { key, context: "a requires entry" },
                    value.span(),
                    format!("no `{key}`").as_str(),
                );
                ok = false;
            }
        }
        match (service, version) {
            (Some(service), Some(version)) if ok => {
                Some(Requirement { service, version, when, reason, env, loc: self.loc(value.span()) })
            }
            _ => None,
        }
    }

    /// A semver requirement with an explicit operator on every comparator.
    fn version_constraint(&mut self, key: &str, value: &Value<'_>) -> Option<Located<VersionConstraint>> {
        let text = self.string(key, value)?.trim();
        match parse_version_constraint(text) {
            Ok(constraint) => Some(Located::new(constraint, self.loc(value.span()))),
            Err(ConstraintError::Bare) => {
                self.error(
                    Problem::BareVersionRequirement { key: key.to_owned(), value: text.to_owned() },
                    value.span(),
                    "no operator",
                );
                None
            }
            Err(ConstraintError::Invalid(reason)) => {
                self.error(
                    Problem::InvalidVersionRequirement { key: key.to_owned(), value: text.to_owned(), reason },
                    value.span(),
                    "not a version requirement",
                );
                None
            }
        }
    }

    fn intrinsic_cycle(&mut self, value: &Value<'_>) -> Option<IntrinsicCycle> {
        let table = self.table("intrinsic_cycles", value)?;
        let mut services = Vec::new();
        let mut reason = None;
        for (k, v) in table.iter() {
            match k.get_ref().as_ref() {
                "services" => {
                    services = self
                        .array("services", v)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|s| self.name_value("services", s))
                        .collect();
                }
                "reason" => reason = self.string("reason", v).map(str::to_owned),
                _ => self.unknown_key(k, "an intrinsic cycle", CYCLE_KEYS),
            }
        }
        let Some(reason) = reason else {
            self.error(
                Problem::MissingKey { key: "reason", context: "an intrinsic cycle" },
                value.span(),
                "every accepted cycle needs a reason",
            );
            return None;
        };
        Some(IntrinsicCycle { services, reason, loc: self.loc(value.span()) })
    }
}

/// Why a version requirement was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConstraintError {
    /// A comparator without an operator (`2.14`), which Cargo reads as `^2.14`.
    Bare,
    /// Not a requirement; the `semver` crate's message.
    Invalid(String),
}

/// Parses a requirement such as `>=2.14` or `>=2.14, <3`. Every comparator needs an operator
/// (`=`, `>`, `>=`, `<`, `<=`, `~`, `^`) or a wildcard (`2.*`, `*`): a bare `2.14` means `^2.14`
/// to Cargo, which a reader easily takes for `=2.14` or `>=2.14`.
pub(crate) fn parse_version_constraint(text: &str) -> Result<VersionConstraint, ConstraintError> {
    let req = semver::VersionReq::parse(text).map_err(|e| ConstraintError::Invalid(e.to_string()))?;
    let bare = text
        .split(',')
        .map(str::trim)
        .any(|part| part.starts_with(|c: char| c.is_ascii_digit()) && !part.contains(['*', 'x', 'X']));
    if bare {
        return Err(ConstraintError::Bare);
    }
    Ok(VersionConstraint { req, text: text.to_owned() })
}

/// IPv4-mapped IPv6 blocks (`::ffff:a.b.c.d/96+n`) become IPv4 blocks, so they match IPv4
/// connections and overlap checks see one address space.
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

fn port_number(text: &str) -> Result<u16, &'static str> {
    // Parsed as i64 so a negative number is reported as out of range, not as "not a number".
    match text.trim().parse::<i64>() {
        Ok(n) => port_from_integer(n),
        Err(_) => Err("not a number"),
    }
}

fn port_from_integer(n: i64) -> Result<u16, &'static str> {
    match n {
        0 => Err("port 0 is not a port; omit `ports` for any port"),
        n => u16::try_from(n).map_err(|_| "ports run from 1 to 65535"),
    }
}

/// Parses `"443"` or `"8000-8100"`.
pub fn parse_port_range(text: &str) -> Result<PortRange, &'static str> {
    match text.split_once('-') {
        Some((first, last)) => {
            let (first, last) = (port_number(first)?, port_number(last)?);
            if first > last {
                return Err("the range runs backwards");
            }
            Ok(PortRange { first, last })
        }
        None => port_number(text).map(PortRange::single),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("443"), Ok(PortRange::single(443)));
        assert_eq!(parse_port_range("8000-8100"), Ok(PortRange { first: 8000, last: 8100 }));
        assert!(parse_port_range("8100-8000").is_err());
        assert!(parse_port_range("0").is_err());
        assert!(parse_port_range("70000").is_err());
        assert!(parse_port_range("http").is_err());
    }

    #[test]
    fn version_constraints_need_an_operator() {
        assert_eq!(parse_version_constraint(">=2.14").unwrap().text, ">=2.14");
        assert!(parse_version_constraint(">=2.14, <3").is_ok());
        assert!(parse_version_constraint("^2.14").is_ok());
        assert!(parse_version_constraint("2.*").is_ok());
        assert_eq!(parse_version_constraint("2.14"), Err(ConstraintError::Bare));
        assert_eq!(parse_version_constraint(">=1, 2.14"), Err(ConstraintError::Bare));
        assert!(matches!(parse_version_constraint(">=two"), Err(ConstraintError::Invalid(_))));
        assert!(matches!(parse_version_constraint(""), Err(ConstraintError::Invalid(_))));
    }

    #[test]
    fn pre_releases_compare_conservatively() {
        let at_least = parse_version_constraint(">=2.14").unwrap();
        let v = |t: &str| semver::Version::parse(t).unwrap();
        // A target's pre-release does not satisfy a requirement on the release.
        assert!(!at_least.admits(&v("2.14.0-rc.1")));
        assert!(at_least.admits(&v("2.14.0")));
        assert!(at_least.admits(&v("2.15.3")));
        // A consumer's canary counts as its release for `when`.
        let when = parse_version_constraint(">=3.1").unwrap();
        assert!(when.selects(&v("3.1.0-canary.1")));
        assert!(when.selects(&v("3.1.0+build.7")));
        assert!(!when.selects(&v("3.0.9")));
        assert!(!when.selects(&v("3.0.0-rc.1")));
    }

    #[test]
    fn mapped_ipv6_becomes_ipv4() {
        let net: IpNet = "::ffff:10.1.0.0/112".parse().unwrap();
        assert_eq!(canonical_net(net), "10.1.0.0/16".parse::<IpNet>().unwrap());
        let plain: IpNet = "2001:db8::/32".parse().unwrap();
        assert_eq!(canonical_net(plain), plain);
    }
}
