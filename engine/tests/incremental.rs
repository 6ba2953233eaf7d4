//! The incremental compile against the full one, as a model: random edit sequences on a small
//! multi-file policy (STYLE.md, "Test against a simple model"), and after every step the
//! incremental result must equal a full compile of the same files: the same snapshot bytes and
//! hash, the same diagnostics, the same parse (AST, locations, diagnostics). The edits vary
//! what a service's resolved rules depend on, so a cache of resolved parts would be caught
//! here too: allow entries (service references, addresses, hosts, environment-scoped and
//! cross-environment entries), endpoints (per environment, ports, none), groups and their
//! isolation, `rpc_allow`, layers, files reformatted, broken, deleted, duplicated names; and
//! what the graph checks read, so reusing their results is caught too: tiers, non-critical
//! entries, cycles, isolation.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test helpers outside #[test] functions: a failing test should say where"
)]

use depfence::compile::{CompileError, Compiled, IncrementalCompiler, compile_sources};
use depfence::policy::{ParseCache, parse_sources};
use proptest::prelude::*;

/// One service as the model holds it.
#[derive(Debug, Clone)]
struct Svc {
    /// Unique among all services ever created (a duplicate name comes only from `Duplicate`).
    name: String,
    /// Allow entries: a service reference by number (may name no service: an error) or a raw IP.
    allow: Vec<Entry>,
    /// The layer (index into `LAYERS`).
    layer: usize,
    /// Its endpoints: one for every environment, one per environment, or none.
    endpoints: Endpoints,
    /// Its group (index into `GROUPS`), if any.
    group: Option<usize>,
    /// Whether it narrows its first service entry to one RPC (`rpc_allow`).
    rpc: bool,
    /// Its criticality tier, if any.
    tier: Option<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Endpoints {
    /// `endpoints = [...]` on this port (the address is the service's own).
    Everywhere(u16),
    /// `endpoints.prod` and `endpoints.qa`, with these last address bytes.
    PerEnvironment(u8, u8),
    None,
}

#[derive(Debug, Clone)]
enum Entry {
    Service(usize),
    /// `{ service = N, critical = false }`.
    NotCritical(usize),
    Ip(u8),
    /// An address no service owns (`10.200.0.N`): a rule, and no edge.
    Outside(u8),
    /// `{ host = "hN.mirror.internal" }`.
    Host(u8),
    /// `{ ip = "10.0.0.N", env = "qa" }`.
    IpInQa(u8),
    /// `{ service = N, env = "qa", cross_environment = "prod" }`.
    CrossToProd(usize),
}

const LAYERS: &[&str] = &["data", "core", "edge"];
const GROUPS: &[&str] = &["g0", "g1"];

/// One file: its services, or a syntax error in it, or deleted.
#[derive(Debug, Clone)]
struct File {
    services: Vec<Svc>,
    broken: bool,
    deleted: bool,
    /// Bumped by `Reformat`: comment lines before the services, so locations shift.
    padding: usize,
}

#[derive(Debug, Clone)]
enum Op {
    EditAllow {
        file: usize,
        service: usize,
        allow: Vec<Entry>,
    },
    AddService {
        file: usize,
        layer: usize,
    },
    RemoveService {
        file: usize,
        service: usize,
    },
    Touch,
    Reformat {
        file: usize,
    },
    Delete {
        file: usize,
    },
    Restore {
        file: usize,
    },
    Break {
        file: usize,
    },
    Fix {
        file: usize,
    },
    Duplicate {
        file: usize,
        service: usize,
    },
    SecondModel {
        file: usize,
    },
    Endpoints {
        file: usize,
        service: usize,
        endpoints: Endpoints,
    },
    Group {
        file: usize,
        service: usize,
        group: Option<usize>,
    },
    Rpc {
        file: usize,
        service: usize,
    },
    /// Isolates the groups from each other, or stops isolating them.
    Isolate,
    Tier {
        file: usize,
        service: usize,
        tier: Option<u8>,
    },
    /// Makes a service's critical service entries not critical, and the others critical.
    FlipCritical {
        file: usize,
        service: usize,
    },
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        3 => (0usize..14).prop_map(Entry::Service),
        1 => (0usize..14).prop_map(Entry::NotCritical),
        2 => (0u8..12).prop_map(Entry::Ip),
        3 => (0u8..12).prop_map(Entry::Outside),
        1 => (0u8..4).prop_map(Entry::Host),
        1 => (0u8..12).prop_map(Entry::IpInQa),
        1 => (0usize..14).prop_map(Entry::CrossToProd),
    ]
}

fn endpoints() -> impl Strategy<Value = Endpoints> {
    prop_oneof![
        2 => prop_oneof![Just(443u16), Just(8443)].prop_map(Endpoints::Everywhere),
        1 => (0u8..12, 0u8..12).prop_map(|(prod, qa)| Endpoints::PerEnvironment(prod, qa)),
        1 => Just(Endpoints::None),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let file = 0usize..4;
    prop_oneof![
        4 => (file.clone(), 0usize..6, prop::collection::vec(entry(), 0..4))
            .prop_map(|(file, service, allow)| Op::EditAllow { file, service, allow }),
        2 => (file.clone(), 0usize..3).prop_map(|(file, layer)| Op::AddService { file, layer }),
        2 => (file.clone(), 0usize..6).prop_map(|(file, service)| Op::RemoveService { file, service }),
        1 => Just(Op::Touch),
        1 => file.clone().prop_map(|file| Op::Reformat { file }),
        1 => file.clone().prop_map(|file| Op::Delete { file }),
        1 => file.clone().prop_map(|file| Op::Restore { file }),
        1 => file.clone().prop_map(|file| Op::Break { file }),
        2 => file.clone().prop_map(|file| Op::Fix { file }),
        1 => (file.clone(), 0usize..6).prop_map(|(file, service)| Op::Duplicate { file, service }),
        1 => file.clone().prop_map(|file| Op::SecondModel { file }),
        2 => (file.clone(), 0usize..6, endpoints())
            .prop_map(|(file, service, endpoints)| Op::Endpoints { file, service, endpoints }),
        1 => (file.clone(), 0usize..6, prop::option::of(0usize..2))
            .prop_map(|(file, service, group)| Op::Group { file, service, group }),
        1 => (file.clone(), 0usize..6).prop_map(|(file, service)| Op::Rpc { file, service }),
        1 => Just(Op::Isolate),
        1 => (file.clone(), 0usize..6, prop::option::of(1u8..4))
            .prop_map(|(file, service, tier)| Op::Tier { file, service, tier }),
        2 => (file.clone(), 0usize..6).prop_map(|(file, service)| Op::FlipCritical { file, service }),
    ]
}

struct Model {
    files: Vec<File>,
    next: usize,
    /// The file (by index) that holds a second `[model]`, if any.
    second_model: Option<usize>,
    /// `isolated = [["g0", "g1"]]` in the global `[model]`.
    isolated: bool,
}

impl Model {
    fn new() -> Self {
        let mut model = Model { files: Vec::new(), next: 0, second_model: None, isolated: false };
        for file in 0..4 {
            let services = (0..3).map(|i| model.service((file + i) % 3, Vec::new())).collect();
            model.files.push(File { services, broken: false, deleted: false, padding: 0 });
        }
        model
    }

    fn service(&mut self, layer: usize, allow: Vec<Entry>) -> Svc {
        self.next += 1;
        Svc {
            name: format!("s{}", self.next),
            allow,
            layer,
            endpoints: Endpoints::Everywhere(443),
            group: None,
            rpc: false,
            tier: None,
        }
    }

    fn apply(&mut self, op: &Op) {
        match op.clone() {
            Op::EditAllow { file, service, allow } => {
                if let Some(s) = self.files.get_mut(file).and_then(|f| f.services.get_mut(service)) {
                    s.allow = allow;
                }
            }
            Op::AddService { file, layer } => {
                let s = self.service(layer, vec![Entry::Service(1)]);
                if let Some(f) = self.files.get_mut(file) {
                    f.services.push(s);
                }
            }
            Op::RemoveService { file, service } => {
                if let Some(f) = self.files.get_mut(file)
                    && service < f.services.len()
                {
                    f.services.remove(service);
                }
            }
            Op::Touch => {}
            Op::Reformat { file } => self.files[file].padding += 1,
            Op::Delete { file } => self.files[file].deleted = true,
            Op::Restore { file } => self.files[file].deleted = false,
            Op::Break { file } => self.files[file].broken = true,
            Op::Fix { file } => {
                self.files[file].broken = false;
                if self.second_model == Some(file) {
                    self.second_model = None;
                }
                // Duplicates are fixed too: every name unique again.
                let names: Vec<String> = self.files.iter().flat_map(|f| &f.services).map(|s| s.name.clone()).collect();
                let mut seen = std::collections::BTreeSet::new();
                for (i, name) in names.iter().enumerate() {
                    if !seen.insert(name.clone()) {
                        let fresh = format!("s{}", self.next + 1 + i);
                        for s in self.files.iter_mut().flat_map(|f| &mut f.services).filter(|s| &s.name == name).skip(1)
                        {
                            s.name = fresh.clone();
                        }
                    }
                }
                self.next += names.len() + 1;
            }
            Op::Duplicate { file, service } => {
                let copy = self.files.iter().flat_map(|f| &f.services).nth(service).cloned();
                if let Some(copy) = copy {
                    self.files[file].services.push(copy);
                }
            }
            Op::SecondModel { file } => self.second_model = Some(file),
            Op::Endpoints { file, service, endpoints } => {
                if let Some(s) = self.files.get_mut(file).and_then(|f| f.services.get_mut(service)) {
                    s.endpoints = endpoints;
                }
            }
            Op::Group { file, service, group } => {
                if let Some(s) = self.files.get_mut(file).and_then(|f| f.services.get_mut(service)) {
                    s.group = group;
                }
            }
            Op::Rpc { file, service } => {
                if let Some(s) = self.files.get_mut(file).and_then(|f| f.services.get_mut(service)) {
                    s.rpc = !s.rpc;
                }
            }
            Op::Isolate => self.isolated = !self.isolated,
            Op::Tier { file, service, tier } => {
                if let Some(s) = self.files.get_mut(file).and_then(|f| f.services.get_mut(service)) {
                    s.tier = tier;
                }
            }
            Op::FlipCritical { file, service } => {
                if let Some(s) = self.files.get_mut(file).and_then(|f| f.services.get_mut(service)) {
                    for e in &mut s.allow {
                        *e = match *e {
                            Entry::Service(i) => Entry::NotCritical(i),
                            Entry::NotCritical(i) => Entry::Service(i),
                            ref other => other.clone(),
                        };
                    }
                }
            }
        }
    }

    /// The policy's files: a global file, then the team files not deleted.
    fn texts(&self) -> Vec<(String, String)> {
        let mut global = String::from(
            "version = 1\n\n[environments]\nqa = \"enforce\"\nprod = \"audit\"\n\n[model]\nlayers = [\"data\", \"core\", \"edge\"]\n",
        );
        if self.isolated {
            global.push_str("isolated = [[\"g0\", \"g1\"]]\n");
        }
        let mut out = vec![("00-global.toml".to_owned(), global)];
        let all: Vec<&str> = self.files.iter().flat_map(|f| &f.services).map(|s| s.name.as_str()).collect();
        for (index, file) in self.files.iter().enumerate() {
            if file.deleted {
                continue;
            }
            let mut text = String::from("version = 1\n");
            for _ in 0..file.padding {
                text.push_str("# reformatted\n");
            }
            if self.second_model == Some(index) {
                text.push_str("[model]\nlayers = [\"other\"]\n");
            }
            for s in &file.services {
                text.push_str(&format!("\n[services.{}]\nlayer = \"{}\"\n", s.name, LAYERS[s.layer]));
                if let Some(group) = s.group {
                    text.push_str(&format!("group = \"{}\"\n", GROUPS[group]));
                }
                if let Some(tier) = s.tier {
                    text.push_str(&format!("tier = {tier}\n"));
                }
                let n = s.name.trim_start_matches('s').parse::<u32>().unwrap_or(0);
                match s.endpoints {
                    Endpoints::Everywhere(port) => text.push_str(&format!(
                        "endpoints = [{{ ip = \"10.0.{}.{}\", ports = [{port}] }}]\n",
                        n / 200,
                        n % 200 + 1
                    )),
                    Endpoints::PerEnvironment(prod, qa) => text.push_str(&format!(
                        "endpoints.prod = [{{ ip = \"10.1.0.{prod}\", ports = [443] }}]\n\
                         endpoints.qa = [{{ ip = \"10.2.0.{qa}\", ports = [443] }}]\n"
                    )),
                    Endpoints::None => {}
                }
                text.push_str("allow = [\n");
                let name_of = |i: usize| all.get(i).copied().unwrap_or("ghost");
                for e in &s.allow {
                    match e {
                        Entry::Service(i) => text.push_str(&format!("  {{ service = \"{}\" }},\n", name_of(*i))),
                        Entry::NotCritical(i) => {
                            text.push_str(&format!("  {{ service = \"{}\", critical = false }},\n", name_of(*i)));
                        }
                        Entry::Ip(last) => text.push_str(&format!("  {{ ip = \"10.0.0.{last}\" }},\n")),
                        Entry::Outside(last) => text.push_str(&format!("  {{ ip = \"10.200.0.{last}\" }},\n")),
                        Entry::Host(n) => {
                            text.push_str(&format!("  {{ host = \"h{n}.mirror.internal\", ports = [443] }},\n"));
                        }
                        Entry::IpInQa(last) => {
                            text.push_str(&format!("  {{ ip = \"10.0.0.{last}\", env = \"qa\" }},\n"));
                        }
                        Entry::CrossToProd(i) => text.push_str(&format!(
                            "  {{ service = \"{}\", env = \"qa\", cross_environment = \"prod\", reason = \"test\" }},\n",
                            name_of(*i)
                        )),
                    }
                }
                text.push_str("]\n");
                let first_service = s.allow.iter().find_map(|e| match e {
                    Entry::Service(i) => Some(name_of(*i)),
                    _ => None,
                });
                if let (true, Some(target)) = (s.rpc, first_service) {
                    text.push_str(&format!("rpc_allow = [{{ service = \"{target}\", rpcs = [\"/pkg.Svc/Call\"] }}]\n"));
                }
            }
            if file.broken {
                text.push_str("[services.oops\nallow = [\n");
            }
            out.push((format!("team-{index}.toml"), text));
        }
        out
    }
}

/// What a compile gave, in comparable form.
fn outcome(result: &Result<Compiled, CompileError>) -> (Option<Vec<u8>>, Option<String>, Vec<String>) {
    match result {
        Ok(compiled) => (
            Some(compiled.snapshot.to_bytes().unwrap()),
            Some(compiled.snapshot.hash().to_string()),
            compiled.warning_lines(),
        ),
        Err(error) => (None, None, error.lines()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full(ops in prop::collection::vec(op(), 1..24)) {
        let mut model = Model::new();
        let mut compiler = IncrementalCompiler::new();
        let mut cache = ParseCache::new();
        let first = model.texts();
        prop_assert_eq!(outcome(&compiler.compile_sources(first.clone())), outcome(&compile_sources(first)));
        for op in &ops {
            model.apply(op);
            let texts = model.texts();
            let full = compile_sources(texts.clone());
            let incremental = compiler.compile_sources(texts.clone());
            prop_assert_eq!(outcome(&incremental), outcome(&full), "after {:?}", op);
            // The parse itself: the AST with its locations, and the diagnostics.
            let full_parse = format!("{:?}", parse_sources(texts.clone()));
            let cached_parse = format!("{:?}", cache.parse_sources(texts.clone()));
            prop_assert_eq!(cached_parse, full_parse, "after {:?}", op);
        }
    }
}

/// A one-file edit re-parses that file only; an unchanged policy re-parses nothing.
#[test]
fn only_changed_files_are_reparsed() {
    let mut model = Model::new();
    let mut compiler = IncrementalCompiler::new();
    let first = compiler.compile_sources(model.texts());
    assert!(first.is_ok(), "{:?}", first.err().map(|e| e.lines()));
    assert_eq!(compiler.reparsed(), 5);
    let _ = compiler.compile_sources(model.texts());
    assert_eq!(compiler.reparsed(), 0);
    model.apply(&Op::EditAllow { file: 2, service: 0, allow: vec![Entry::Ip(3)] });
    let result = compiler.compile_sources(model.texts());
    assert_eq!(compiler.reparsed(), 1);
    assert_eq!(outcome(&result), outcome(&compile_sources(model.texts())));
    // A file deleted: the ones after it move up, so they are parsed again (locations hold
    // the file's index); the ones before it are kept.
    model.apply(&Op::Delete { file: 1 });
    let _ = compiler.compile_sources(model.texts());
    assert_eq!(compiler.reparsed(), 2);
}

/// `ParseCache::load` reads a file again only when its stamp (inode, size, times) changed, and
/// trusts a stamp only when the file had been unchanged for a while before it was read: an
/// in-place write of the same size, a rename over it and a fresh write are all seen, and what
/// it parses is always what `policy::load` parses from the same files.
#[test]
fn files_on_disk_are_read_again_only_when_their_stamp_changed() {
    let model = Model::new();
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in model.texts() {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let files = model.texts().len();
    let same_as_full = |cache: &mut ParseCache| {
        let cached = format!("{:?}", cache.load(dir.path()).unwrap());
        assert_eq!(cached, format!("{:?}", depfence::policy::load(dir.path()).unwrap()));
    };
    let mut cache = ParseCache::new();
    // Just written: read and parsed, but not trusted yet, so read again next time.
    same_as_full(&mut cache);
    assert_eq!((cache.reparsed(), cache.unread()), (files, 0));
    same_as_full(&mut cache);
    assert_eq!((cache.reparsed(), cache.unread()), (0, 0), "recent files are read (and compared) again");
    // Settled: read once more, trusted, then not read at all.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    same_as_full(&mut cache);
    assert_eq!((cache.reparsed(), cache.unread()), (0, 0));
    same_as_full(&mut cache);
    assert_eq!((cache.reparsed(), cache.unread()), (0, files), "unchanged files are not read");
    // An explicit reload reads everything once (and trusts the settled stamps again).
    cache.forget_stamps();
    same_as_full(&mut cache);
    assert_eq!((cache.reparsed(), cache.unread()), (0, 0), "after forget_stamps every file is read");
    same_as_full(&mut cache);
    assert_eq!(cache.unread(), files);

    // An in-place write of the same length: its change time moves, so it is read and parsed.
    let path = dir.path().join("team-2.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen("10.0.", "10.9.", 1);
    assert_ne!(edited, text);
    assert_eq!(edited.len(), text.len());
    std::fs::write(&path, &edited).unwrap();
    same_as_full(&mut cache);
    assert_eq!((cache.reparsed(), cache.unread()), (1, files - 1));
    // A rename over a file (as editors and git write): another inode, read.
    let temp = dir.path().join(".team-3.toml.swp");
    std::fs::write(&temp, std::fs::read_to_string(dir.path().join("team-3.toml")).unwrap() + "\n# edited\n").unwrap();
    std::fs::rename(&temp, dir.path().join("team-3.toml")).unwrap();
    same_as_full(&mut cache);
    assert_eq!(cache.reparsed(), 1);
    assert_eq!(cache.unread(), files - 2, "the file written a moment ago is read again too");
}
