//! An agent of a newer ABI takes over pins made by a build of the previous ABI (the eBPF object
//! of ABI 3 in `integration/fixtures/depfence-bpf-abi3.o`, built at commit b442a18 and stripped
//! of debug info with `llvm-objcopy --strip-debug`) without a moment in which the policy lapses:
//! the old programs stay attached until the new ones enforce, and the counters carry on. Root
//! only; under CI a skip is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use depfence::cgroup::{cgroup_id, spawn_in};
use depfence::datapath::abi::{
    ABI_VERSION, CgroupState, MODE_ENFORCE, Meta, RuleKey, RuleValue, VERDICT_ALLOWED, VERDICT_REJECTED, map_names,
};
use depfence::datapath::pins::{PinLayout, ensure_bpffs, random_suffix};
use depfence::datapath::{Maps, abi::IPPROTO_TCP};
use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, LO4, crate_binary, tcp_listener};

/// The previous ABI and its object.
const PREVIOUS_ABI: u32 = 3;
const PREVIOUS_OBJECT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../integration/fixtures/depfence-bpf-abi3.o");
/// Its hooks (ABI 3 had no sock_create, setsockopt or egress programs).
const PREVIOUS_HOOKS: [&str; 8] = [
    "df_connect4",
    "df_connect6",
    "df_sendmsg4",
    "df_sendmsg6",
    "df_recvmsg4",
    "df_recvmsg6",
    "df_getpeername4",
    "df_getpeername6",
];

/// Pins what an agent of the previous ABI would have: its maps, its programs attached to
/// `cgroup` by pinned links, and `cgroup` enforcing a ruleset that allows `127.0.0.1:db`.
/// Returns the ids of its programs.
fn pin_previous_abi(layout: &PinLayout, cgroup: &Path, db: u16) -> Vec<u32> {
    std::fs::create_dir_all(layout.maps_dir()).unwrap();
    std::fs::create_dir_all(layout.links_dir()).unwrap();
    let object = std::fs::read(PREVIOUS_OBJECT).unwrap();
    let mut loader = aya::EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, layout.map(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(&object).unwrap();
    let dir = std::fs::File::open(cgroup).unwrap();
    let cgid = cgroup_id(cgroup).unwrap();
    let mut ids = Vec::new();
    for name in PREVIOUS_HOOKS {
        let prog: &mut CgroupSockAddr = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap();
        ids.push(prog.info().unwrap().id());
        let link = prog.attach(&dir, CgroupAttachMode::Single).unwrap();
        let link: aya::programs::links::FdLink = prog.take_link(link).unwrap().try_into().unwrap();
        link.pin(layout.link(name, cgid)).unwrap();
    }
    let open = |name: &str| Map::from_map_data(MapData::from_pin(layout.map(name)).unwrap()).unwrap();
    let mut meta: Array<MapData, Meta> = Array::try_from(open(map_names::META)).unwrap();
    meta.set(0, Meta { abi_version: PREVIOUS_ABI, _reserved: 0 }, 0).unwrap();
    let mut rules: HashMap<MapData, RuleKey, RuleValue> = HashMap::try_from(open(map_names::RULES)).unwrap();
    rules.insert(RuleKey::new(1, IPPROTO_TCP, db, LO4), RuleValue { rule_id: 1 }, 0).unwrap();
    let mut cgroups: HashMap<MapData, u64, CgroupState> = HashMap::try_from(open(map_names::CGROUPS)).unwrap();
    let state = CgroupState { ruleset_id: 1, mode: MODE_ENFORCE, counter_slot: 0, generation: 1, ..Default::default() };
    cgroups.insert(cgid, state, 0).unwrap();
    ids
}

/// `depfence-probe tally` from `cgroup`: its line.
fn tally(cgroup: &Path, port: u16, count: u32) -> String {
    let mut cmd = Command::new(crate_binary("depfence-probe"));
    cmd.args(["tally", "127.0.0.1", &port.to_string(), &count.to_string()]).stdout(Stdio::piped());
    let out = spawn_in(cgroup, &mut cmd).unwrap().wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn an_agent_of_a_newer_abi_takes_over_without_a_lapse() {
    let test = "an_agent_of_a_newer_abi_takes_over_without_a_lapse";
    if !depfence_integration::require_privileges(test) {
        return;
    }
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let (db, other) = (tcp_listener(LO4), tcp_listener(LO4));
    let (bpffs, _) = ensure_bpffs().unwrap();
    let layout = PinLayout::new(bpffs.join(format!("depfence-test-upgrade-{}", random_suffix())));
    let old_programs = pin_previous_abi(&layout, &app, db);

    // The previous ABI enforces: db allowed, the rest refused, and counted.
    assert_eq!(tally(&app, db, 5), "tally 5 0 0");
    assert_eq!(tally(&app, other, 7), "tally 0 7 0");

    // A client connecting throughout the upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (app, stop) = (app.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut lapses = Vec::new();
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) || rounds < 3 {
                for (port, expected) in [(db, "tally 20 0 0"), (other, "tally 0 20 0")] {
                    let line = tally(&app, port, 20);
                    if line != expected {
                        lapses.push((port, line));
                    }
                }
                rounds += 1;
            }
            (rounds, lapses)
        })
    };

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let text = format!(
        "version = 1\n[environments]\nprod = \"enforce\"\n[services.db]\n\
         endpoints = [{{ ip = \"127.0.0.1\", ports = [{db}], proto = \"tcp\" }}]\n\
         [services.app]\ncgroup = \"{}/app\"\nallow = [{{ service = \"db\" }}]\n",
        cgroups.relative()
    );
    std::fs::write(&policy, text).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let agent = Agent::start_on(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod", layout.clone(), &[]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (rounds, lapses) = watcher.join().unwrap();
    eprintln!("{rounds} rounds of 20 + 20 connects across the upgrade");
    assert!(lapses.is_empty(), "the policy lapsed during the upgrade: {lapses:?}");

    // The new ABI is in force alone: the previous one's pins are gone, its programs unloaded.
    assert!(layout.retired().is_empty(), "{:?}", layout.retired());
    let maps = Maps::from_pins(&layout).unwrap();
    assert_eq!(maps.meta.get(&0, 0).unwrap().abi_version, ABI_VERSION);
    let loaded: Vec<u32> = aya::programs::loaded_programs().filter_map(|p| p.ok()).map(|p| p.id()).collect();
    assert!(old_programs.iter().all(|id| !loaded.contains(id)), "the previous ABI's programs are unloaded");
    assert!(agent.log_text().contains("the previous ABI's programs are detached"), "{}", agent.log_text());

    // The counters carried on across the upgrade: nothing counted before it was lost.
    let (allowed, rejected) = (maps.counter(0, VERDICT_ALLOWED).unwrap(), maps.counter(0, VERDICT_REJECTED).unwrap());
    assert!(allowed >= 5 + 20 && rejected >= 7 + 20, "allowed {allowed}, rejected {rejected}");
    assert_eq!(tally(&app, other, 1), "tally 0 1 0");
    assert_eq!(tally(&app, db, 1), "tally 1 0 0");
}
