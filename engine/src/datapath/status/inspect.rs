//! Reading one pin root: the [`Inspector`] opens its maps and links and reads the registered
//! cgroups and the counters; the helpers here read a map's or a link's kernel facts and fdinfo.
use std::{
    collections::{BTreeSet, HashMap},
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        loaded_programs,
    },
};

use super::{
    CgroupStatus, ConfigStatus, GlobalCounters, LinkStatus, MapStatus, ProgramStatus, Result, RootStatus, StatusError,
    io_error, link_error, map_error, maps_error,
    names::{attach_type_name, flag_names, link_type_name, map_type_name, mode_name},
    roots::{check_pin_root, is_policyctl},
};
use crate::cgroup::CgroupPaths;
use crate::datapath::{
    Maps,
    abi::{
        ABI_VERSION, DedupKey, GLOBAL_BAD_SLOT, GLOBAL_EVENTS_DEDUPED, GLOBAL_EVENTS_DROPPED, GLOBAL_UNREGISTERED,
        Meta, map_names,
    },
    pins::{PinLayout, run_pid},
};

/// Reads pin roots, sharing the cgroup-path walk and the program list between them.
pub struct Inspector {
    cgroups: Option<CgroupPaths>,
    programs: Option<HashMap<u32, ProgramStatus>>,
}

impl Inspector {
    /// An inspector resolving cgroup ids under `cgroup2` (the mount), if given.
    pub fn new(cgroup2: Option<&Path>) -> Self {
        Self { cgroups: cgroup2.map(CgroupPaths::new), programs: None }
    }

    fn cgroup_path(&mut self, id: u64) -> Option<PathBuf> {
        self.cgroups.as_mut()?.find(id)
    }

    fn program(&mut self, id: u32) -> ProgramStatus {
        let programs = self.programs.get_or_insert_with(|| {
            loaded_programs()
                .flatten()
                .map(|p| {
                    let status = ProgramStatus {
                        id: p.id(),
                        name: p.name_as_str().map(str::to_owned),
                        run_count: Some(p.run_count()),
                        run_time_ns: Some(u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX)),
                    };
                    (p.id(), status)
                })
                .collect()
        });
        programs.get(&id).cloned().unwrap_or(ProgramStatus { id, name: None, run_count: None, run_time_ns: None })
    }

    /// Reads one pin root.
    pub fn root(&mut self, root: &Path) -> Result<RootStatus> {
        check_pin_root(root)?;
        let layout = PinLayout::new(root);
        let mut warnings = Vec::new();

        let meta_path = layout.map(map_names::META);
        let meta_map = open_map(&meta_path)?;
        let meta: Array<MapData, Meta> = Array::try_from(meta_map).map_err(map_error(&meta_path))?;
        let abi_version = meta.get(&0, 0).map_err(map_error(&meta_path))?.abi_version;
        let abi_supported = abi_version == ABI_VERSION;
        if !abi_supported {
            warnings.push(format!(
                "ABI version {abi_version} is not the one this build knows ({ABI_VERSION}): contents not decoded"
            ));
        }

        let mut maps = Vec::new();
        for name in map_names::ALL {
            let path = layout.map(name);
            match map_status(name, &path) {
                Ok(m) => maps.push(m),
                Err(StatusError::NotFound(_)) => warnings.push(format!("map pin `{}` is missing", path.display())),
                Err(e) => return Err(e),
            }
        }

        let links = self.links(&layout, &mut warnings)?;

        let (cgroups, globals, config) = if abi_supported && maps.len() == map_names::ALL.len() {
            let typed = Maps::from_pins(&layout).map_err(maps_error(root))?;
            let cgroups = self.cgroups(&typed, &mut warnings);
            fill_entries(&mut maps, &typed, &layout, &cgroups, &mut warnings);
            let global = |idx| typed.global(idx).unwrap_or(0);
            let globals = GlobalCounters {
                events_dropped: global(GLOBAL_EVENTS_DROPPED),
                events_deduped: global(GLOBAL_EVENTS_DEDUPED),
                unregistered: global(GLOBAL_UNREGISTERED),
                bad_slot: global(GLOBAL_BAD_SLOT),
            };
            let config = typed
                .config
                .get(&0, 0)
                .ok()
                .map(|c| ConfigStatus { max_level: c.max_level, dedup_window_ns: c.dedup_window_ns });
            (cgroups, Some(globals), config)
        } else {
            (Vec::new(), None, None)
        };

        let mut gone: Vec<(Option<u64>, usize)> = Vec::new();
        for link in links.iter().filter(|l| !l.attached || !l.cgroup_exists) {
            match gone.iter_mut().find(|(id, _)| *id == link.cgroup_id) {
                Some((_, n)) => *n += 1,
                None => gone.push((link.cgroup_id, 1)),
            }
        }
        for (id, n) in gone {
            let id = id.map_or_else(|| "?".to_owned(), |id| id.to_string());
            let links = if n == 1 { "1 link is".to_owned() } else { format!("{n} links are") };
            warnings
                .push(format!("cgroup {id} no longer exists: {links} detached, but the pins keep the programs loaded"));
        }
        for cgroup in &cgroups {
            if !cgroup.exists {
                warnings.push(format!("registered cgroup {} no longer exists (stale DF_CGROUPS entry)", cgroup.id));
            }
        }

        if let Some(pid) = run_pid(root).filter(|pid| !is_policyctl(*pid)) {
            warnings.push(format!(
                "the `policyctl run` (pid {pid}) that made these pins is gone: they are leftovers (`rm -r {}` removes them)",
                root.display()
            ));
        }

        Ok(RootStatus {
            root: root.to_owned(),
            abi_version,
            abi_supported,
            maps,
            links,
            cgroups,
            globals,
            config,
            warnings,
        })
    }

    fn links(&mut self, layout: &PinLayout, warnings: &mut Vec<String>) -> Result<Vec<LinkStatus>> {
        let dir = layout.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warnings.push(format!("`{}` is missing: nothing is attached", dir.display()));
                return Ok(Vec::new());
            }
            Err(e) => return Err(io_error(&dir)(e)),
        };
        let mut pins: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        pins.sort();
        let mut links = Vec::new();
        for pin in pins {
            let link = match PinnedLink::from_pin(&pin) {
                Ok(link) => FdLink::from(link),
                // Unpinned between the listing and the open: a run ending.
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(link_error(&pin)(e)),
            };
            let info = link.info().map_err(link_error(&pin))?;
            let fdinfo = link_fdinfo(info.id()).unwrap_or_default();
            let kernel_cgroup = fdinfo_field(&fdinfo, "cgroup_id").and_then(|v| v.parse::<u64>().ok());
            let attached = kernel_cgroup.is_some_and(|id| id != 0);
            let cgroup_id = kernel_cgroup.filter(|id| *id != 0).or_else(|| PinLayout::cgroup_of_link(&pin));
            let cgroup_path = if attached { cgroup_id.and_then(|id| self.cgroup_path(id)) } else { None };
            links.push(LinkStatus {
                link_id: info.id(),
                link_type: info.link_type().map_or_else(|_| "unknown".to_owned(), link_type_name),
                attach_type: fdinfo_field(&fdinfo, "attach_type").and_then(|v| v.parse().ok()).map(attach_type_name),
                program: self.program(info.program_id()),
                cgroup_exists: cgroup_path.is_some(),
                cgroup_path,
                cgroup_id,
                attached,
                pin,
            });
            drop(link); // our fd only; the pin keeps the link
        }
        Ok(links)
    }

    fn cgroups(&mut self, maps: &Maps, warnings: &mut Vec<String>) -> Vec<CgroupStatus> {
        let mut entries = Vec::new();
        for item in maps.cgroups.iter() {
            match item {
                Ok(entry) => entries.push(entry),
                Err(e) => warnings.push(format!("reading DF_CGROUPS: {e}")),
            }
        }
        entries.sort_by_key(|(id, _)| *id);
        let mut out = Vec::new();
        for (id, state) in entries {
            let counters = maps.counts(state.counter_slot);
            if let Err(e) = &counters {
                warnings.push(format!("cgroup {id}: counter slot {}: {e}", state.counter_slot));
            }
            let path = self.cgroup_path(id);
            out.push(CgroupStatus {
                id,
                exists: path.is_some(),
                path,
                mode: mode_name(state.mode),
                ruleset: state.ruleset_id,
                candidate_ruleset: (state.candidate_ruleset != 0).then_some(state.candidate_ruleset),
                generation: state.generation,
                flags: flag_names(state.flags),
                counter_slot: state.counter_slot,
                counters: counters.ok(),
            });
        }
        out
    }
}

fn open_map(path: &Path) -> Result<Map> {
    let data = MapData::from_pin(path).map_err(map_error(path))?;
    Map::from_map_data(data).map_err(map_error(path))
}

/// Kernel facts of one map: type, sizes, capacity, memlock. Entries are filled in later.
fn map_status(name: &str, path: &Path) -> Result<MapStatus> {
    let data = MapData::from_pin(path).map_err(map_error(path))?;
    let info = data.info().map_err(map_error(path))?;
    let fd = data.fd().as_fd().as_raw_fd();
    let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    Ok(MapStatus {
        name: name.to_owned(),
        id: info.id(),
        map_type: info.map_type().map_or_else(|_| "unknown".to_owned(), map_type_name),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        entries: None,
        fill: None,
        memlock_bytes: fdinfo_field(&fdinfo, "memlock").and_then(|v| v.parse().ok()),
    })
}

/// Counts the entries of the hashes and the trie (one key walk each), and the counter slots
/// the registered cgroups use.
fn fill_entries(
    maps: &mut [MapStatus],
    typed: &Maps,
    layout: &PinLayout,
    cgroups: &[CgroupStatus],
    warnings: &mut Vec<String>,
) {
    for map in maps {
        let count = match map.name.as_str() {
            map_names::CGROUPS => Some(count_keys(typed.cgroups.keys())),
            map_names::RULES => Some(count_keys(typed.rules.keys())),
            map_names::CIDRS => Some(count_keys(typed.cidrs.keys())),
            map_names::DEDUP => {
                let path = layout.map(map_names::DEDUP);
                let dedup = open_map(&path)
                    .and_then(|m| BpfHashMap::<MapData, DedupKey, u64>::try_from(m).map_err(map_error(&path)));
                match dedup {
                    Ok(dedup) => Some(count_keys(dedup.keys())),
                    Err(e) => {
                        warnings.push(format!("counting DF_DEDUP: {e}"));
                        None
                    }
                }
            }
            map_names::COUNTERS => {
                let slots: BTreeSet<u32> = cgroups.iter().map(|c| c.counter_slot).collect();
                Some(Ok(slots.len() as u64))
            }
            _ => None,
        };
        match count {
            Some(Ok(n)) => {
                map.entries = Some(n);
                map.fill = Some(fill_ratio(n, map.max_entries));
            }
            Some(Err(e)) => warnings.push(format!("counting {}: {e}", map.name)),
            None => {}
        }
    }
}

/// Counts keys, stopping at the first error (a map changing under the walk may end it early;
/// the count is then a lower bound and says so).
fn count_keys<K>(keys: impl Iterator<Item = Result<K, MapError>>) -> Result<u64, MapError> {
    let mut n = 0u64;
    for key in keys {
        key?;
        n += 1;
    }
    Ok(n)
}

/// `entries / max_entries`, 0 for an empty capacity.
pub fn fill_ratio(entries: u64, max_entries: u32) -> f64 {
    if max_entries == 0 { 0.0 } else { entries as f64 / f64::from(max_entries) }
}

/// The value of `key:` in a `/proc/<pid>/fdinfo/<fd>` text (`key:\tvalue` lines).
pub fn fdinfo_field<'a>(fdinfo: &'a str, key: &str) -> Option<&'a str> {
    fdinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// The fdinfo of our own fd on the link with kernel id `link_id` (aya's `FdLink` does not lend
/// its fd, so find it among ours: `anon_inode:bpf-link` fds whose `link_id` matches).
fn link_fdinfo(link_id: u32) -> Option<String> {
    let want = link_id.to_string();
    for entry in fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let is_link = fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-link");
        if !is_link {
            continue;
        }
        let Ok(text) = fs::read_to_string(Path::new("/proc/self/fdinfo").join(entry.file_name())) else { continue };
        if fdinfo_field(&text, "link_id") == Some(want.as_str()) {
            return Some(text);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;

    const MAP_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\nmap_type:\t1\nkey_size:\t24\n\
        value_size:\t4\nmax_entries:\t2097152\nmap_flags:\t0x1\nmap_extra:\t0x0\nmemlock:\t33555416\n\
        map_id:\t1734\nfrozen:\t0\n";
    const LINK_FDINFO: &str = "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t1038\nlink_type:\tcgroup\n\
        link_id:\t540\nprog_tag:\ted0765918a89f255\nprog_id:\t1565\ncgroup_id:\t7872\nattach_type:\t15\n";

    #[test]
    fn fdinfo_fields_are_read_by_exact_key() {
        assert_eq!(fdinfo_field(MAP_FDINFO, "memlock"), Some("33555416"));
        assert_eq!(fdinfo_field(MAP_FDINFO, "map_id"), Some("1734"));
        assert_eq!(fdinfo_field(MAP_FDINFO, "map"), None);
        assert_eq!(fdinfo_field(LINK_FDINFO, "cgroup_id"), Some("7872"));
        assert_eq!(
            fdinfo_field(LINK_FDINFO, "attach_type").map(|v| attach_type_name(v.parse().unwrap())).unwrap(),
            "sendmsg6"
        );
        assert_eq!(fdinfo_field(LINK_FDINFO, "link_type"), Some("cgroup"));
        assert_eq!(fdinfo_field("", "memlock"), None);
    }

    #[test]
    fn fill_ratio_handles_empty_capacity() {
        assert_eq!(fill_ratio(0, 0), 0.0);
        assert_eq!(fill_ratio(1, 4), 0.25);
        assert_eq!(fill_ratio(16_384, 16_384), 1.0);
    }
}
