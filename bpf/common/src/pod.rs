//! `aya::Pod` for every map key, value and event (feature `aya`), so a loader reads and writes
//! them as they are.
#![allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe trait; every impl below is for a padding-free repr(C) integer type"
)]

use crate::{
    CgroupState, CidrKeyData, CidrValue, Config, DedupKey, DnsSlot, Event, Meta, NameKey, PortRange, RuleHitKey,
    RuleKey, RuleValue,
};

// SAFETY: all are #[repr(C)], Copy, contain only integers, and have no implicit padding
// (sizes are asserted in lib.rs).
unsafe impl aya::Pod for CgroupState {}
unsafe impl aya::Pod for RuleKey {}
unsafe impl aya::Pod for RuleValue {}
unsafe impl aya::Pod for RuleHitKey {}
unsafe impl aya::Pod for CidrKeyData {}
unsafe impl aya::Pod for PortRange {}
unsafe impl aya::Pod for CidrValue {}
unsafe impl aya::Pod for Meta {}
unsafe impl aya::Pod for Event {}
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for DedupKey {}
unsafe impl aya::Pod for NameKey {}
unsafe impl aya::Pod for DnsSlot {}
