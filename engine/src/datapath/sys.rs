//! The few bpf(2) commands aya 0.14 does not wrap: batched map updates and deletes (a
//! million-rule ruleset is one syscall per 64 Ki entries instead of one per entry), a wait
//! for every running eBPF program to finish (so an old ruleset is freed only once no hook can
//! still be reading it), and a pinned cgroup link for a socket-option program (aya 0.14 keeps
//! that link inside the program: it has no conversion to a pinnable `FdLink`).
//!
//! The wait uses a documented kernel guarantee: an update of an `ARRAY_OF_MAPS` from user space
//! returns only after `synchronize_rcu()` (kernel/bpf/syscall.c, `maybe_wait_bpf_programs`),
//! i.e. after every non-sleepable program that was running has finished. Cgroup sock_addr
//! programs are non-sleepable.
use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya::maps::{Array, MapData};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: a cgroup's setsockopt hook.
pub(crate) const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// Entries per batch syscall: bounds the time the kernel spends in one call.
const BATCH: usize = 65_536;

/// `union bpf_attr` for `BPF_MAP_*_BATCH`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_MAP_CREATE` (the fields up to `map_name`; the rest stays zero).
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_value_type_id: u32,
    map_extra: u64,
}

/// `union bpf_attr` for `BPF_MAP_*_ELEM`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (the fields up to `flags`).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
#[derive(Default)]
struct PinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let size = size_of::<T>() as libc::c_long;
    // SAFETY: `attr` is a live, initialised `bpf_attr` prefix of `size` bytes; the kernel reads
    // (and for batches writes `count` back into) exactly that memory, and any pointers in it
    // point at buffers the caller keeps alive for the call.
    #[expect(unsafe_code, reason = "bpf(2) has no safe wrapper for these commands in aya 0.14")]
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// Writes every (key, value) into the map behind `map_fd`, 64 Ki entries per syscall.
pub(crate) fn update_batch<K, V>(map_fd: BorrowedFd<'_>, entries: &[(K, V)]) -> io::Result<()>
where
    K: Copy,
    V: Copy,
{
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
            map_fd: fd_u32(map_fd),
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Deletes every key from the map behind `map_fd`, 64 Ki keys per syscall. Fails with
/// `NotFound` if a key is absent (the keys before it are gone).
pub(crate) fn delete_batch<K: Copy>(map_fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for chunk in keys.chunks(BATCH) {
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: u32::try_from(chunk.len()).unwrap_or(u32::MAX),
            map_fd: fd_u32(map_fd),
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_DELETE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Deletes those of `keys` that are in the map, ignoring the absent ones (cleanup after a
/// failed install). One syscall per key.
pub(crate) fn delete_present<K: Copy>(map_fd: BorrowedFd<'_>, keys: &[K]) {
    for key in keys {
        let mut attr = ElemAttr { map_fd: fd_u32(map_fd), key: std::ptr::from_ref(key) as u64, ..ElemAttr::default() };
        let _ = bpf(BPF_MAP_DELETE_ELEM, &mut attr);
    }
}

/// Attaches the program `prog_fd` to the cgroup `cgroup_fd` at `attach_type` through a link,
/// and pins the link at `pin` (the pin keeps it attached; our fd is closed on return).
pub(crate) fn attach_pinned(
    prog_fd: BorrowedFd<'_>,
    cgroup_fd: BorrowedFd<'_>,
    attach_type: u32,
    pin: &std::path::Path,
) -> io::Result<()> {
    let mut attr = LinkCreateAttr { prog_fd: fd_u32(prog_fd), target_fd: fd_u32(cgroup_fd), attach_type, flags: 0 };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing else owns.
    #[expect(unsafe_code, reason = "taking ownership of the fd the kernel just created")]
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(pin.as_os_str()))?;
    let mut attr = PinAttr { pathname: path.as_ptr() as u64, bpf_fd: fd_u32(link.as_fd()), file_flags: 0 };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// A one-slot `ARRAY_OF_MAPS` whose every update waits for running eBPF programs to finish.
pub(crate) struct ReaderBarrier {
    inner: Array<MapData, u32>,
    outer: OwnedFd,
}

impl ReaderBarrier {
    /// Creates the two small maps (they live as long as this value; nothing is pinned).
    pub(crate) fn new() -> io::Result<Self> {
        let inner = Array::<MapData, u32>::create(1, 0).map_err(io::Error::other)?;
        let inner_fd = aya::maps::IterableMap::map(&inner).fd().as_fd();
        let mut name = [0u8; 16];
        for (slot, byte) in name.iter_mut().zip(b"df_barrier") {
            *slot = *byte;
        }
        let mut attr = CreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: fd_u32(inner_fd),
            map_name: name,
            ..CreateAttr::default()
        };
        let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
        let fd = i32::try_from(fd).map_err(io::Error::other)?;
        // SAFETY: BPF_MAP_CREATE returned a new file descriptor that nothing else owns.
        #[expect(unsafe_code, reason = "taking ownership of the fd the kernel just created")]
        let outer = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { inner, outer })
    }

    /// Returns once every eBPF program that was running when it was called has finished.
    pub(crate) fn wait_for_readers(&self) -> io::Result<()> {
        let key = 0u32;
        let value = fd_u32(aya::maps::IterableMap::map(&self.inner).fd().as_fd());
        let mut attr = ElemAttr {
            map_fd: fd_u32(self.outer.as_fd()),
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }
}
