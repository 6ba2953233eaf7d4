//! Names for the numbers the kernel reports: cgroup modes, `FLAG_*` bits, attach types, link
//! and map types, as `policyctl status` prints them.
use aya::{maps::MapType, programs::links::LinkType};

use crate::datapath::abi::{
    FLAG_ACTIVE_HAS_CIDR, FLAG_CANDIDATE_HAS_CIDR, FLAG_DNS, FLAG_EVENT_ALLOWED, FLAG_EVENT_NO_DEDUP,
};
use crate::verdict::Mode;

/// `MODE_*` by name.
pub fn mode_name(mode: u32) -> String {
    Mode::from_code(mode).map_or_else(|| format!("unknown({mode})"), |m| m.as_str().to_owned())
}

/// `FLAG_*` bits by name; unknown bits as hex.
pub fn flag_names(flags: u32) -> Vec<String> {
    let known = [
        (FLAG_ACTIVE_HAS_CIDR, "active_has_cidr"),
        (FLAG_CANDIDATE_HAS_CIDR, "candidate_has_cidr"),
        (FLAG_EVENT_ALLOWED, "event_allowed"),
        (FLAG_EVENT_NO_DEDUP, "event_no_dedup"),
        (FLAG_DNS, "dns"),
    ];
    let mut names: Vec<String> =
        known.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| (*n).to_owned()).collect();
    let rest = known.iter().fold(flags, |f, (bit, _)| f & !bit);
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    names
}

/// A cgroup attach type (`enum bpf_attach_type`) by the name of its hook.
pub fn attach_type_name(attach_type: u32) -> String {
    match attach_type {
        1 => "egress".to_owned(),
        2 => "sock_create".to_owned(),
        22 => "setsockopt".to_owned(),
        10 => "connect4".to_owned(),
        11 => "connect6".to_owned(),
        14 => "sendmsg4".to_owned(),
        15 => "sendmsg6".to_owned(),
        19 => "recvmsg4".to_owned(),
        20 => "recvmsg6".to_owned(),
        29 => "getpeername4".to_owned(),
        30 => "getpeername6".to_owned(),
        other => format!("attach_type({other})"),
    }
}

pub(super) fn link_type_name(t: LinkType) -> String {
    match t {
        LinkType::Cgroup => "cgroup".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub(super) fn map_type_name(t: MapType) -> String {
    let name = match t {
        MapType::Hash => "hash",
        MapType::Array => "array",
        MapType::PerCpuHash => "percpu_hash",
        MapType::PerCpuArray => "percpu_array",
        MapType::LruHash => "lru_hash",
        MapType::LruPerCpuHash => "lru_percpu_hash",
        MapType::LpmTrie => "lpm_trie",
        MapType::ArrayOfMaps => "array_of_maps",
        MapType::HashOfMaps => "hash_of_maps",
        MapType::RingBuf => "ringbuf",
        other => return format!("{other:?}").to_lowercase(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::abi::{MODE_AUDIT, MODE_ENFORCE, MODE_OFF};

    #[test]
    fn names_of_modes_flags_and_attach_types() {
        assert_eq!(mode_name(MODE_OFF), "off");
        assert_eq!(mode_name(MODE_AUDIT), "audit");
        assert_eq!(mode_name(MODE_ENFORCE), "enforce");
        assert_eq!(mode_name(7), "unknown(7)");
        assert_eq!(flag_names(0), Vec::<String>::new());
        assert_eq!(
            flag_names(FLAG_ACTIVE_HAS_CIDR | FLAG_EVENT_NO_DEDUP | 1 << 9),
            ["active_has_cidr", "event_no_dedup", "0x200"]
        );
        assert_eq!(
            [10, 11, 14, 15, 19, 20, 29, 30, 3].map(attach_type_name),
            [
                "connect4",
                "connect6",
                "sendmsg4",
                "sendmsg6",
                "recvmsg4",
                "recvmsg6",
                "getpeername4",
                "getpeername6",
                "attach_type(3)"
            ]
        );
    }
}
