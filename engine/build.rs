//! With the `datapath` feature: builds `bpf/programs` (crate `depfence-bpf`) for bpfel-unknown-none with the nightly
//! toolchain via aya-build, which copies each bin target to `$OUT_DIR/<bin name>`; the lib
//! embeds it with `include_bytes_aligned!(concat!(env!("OUT_DIR"), "/depfence-bpf"))`.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (aya-build honours it); we then write an empty
//! placeholder so `cargo check`/`clippy` work without nightly and bpf-linker.
#[cfg(not(feature = "datapath"))]
fn main() {}

#[cfg(feature = "datapath")]
fn main() -> aya_build::Result<()> {
    use std::{env, fs, path::PathBuf};

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().ok_or_else(|| std::io::Error::other("engine has no parent directory"))?;
    let programs = root.join("bpf/programs");
    let common = root.join("bpf/common");
    // aya-build prints rerun-if-changed for `root_dir`; the shared crate is a dependency of
    // the eBPF object too.
    println!("cargo:rerun-if-changed={}", common.display());
    let out = PathBuf::from(env::var("OUT_DIR")?).join("depfence-bpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        if !out.exists() {
            fs::write(&out, [])?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let programs = programs.to_str().ok_or_else(|| std::io::Error::other("non-UTF-8 path"))?;
    // BPF v3 instructions (kernel ≥ 5.12): the DNS slot allocator needs an atomic
    // fetch-and-add, which v1 lacks. aya-build fixes the child's RUSTFLAGS, so the CPU goes in
    // as a profile rustflag (a nightly cargo feature; the child runs on nightly), which rustc
    // hands to bpf-linker as `--cpu v3`.
    #[allow(unsafe_code, reason = "set_var before any thread exists: the build script is single-threaded here")]
    // SAFETY: no other thread reads the environment while this runs.
    unsafe {
        env::set_var("CARGO_UNSTABLE_PROFILE_RUSTFLAGS", "true");
        env::set_var("CARGO_PROFILE_RELEASE_RUSTFLAGS", "-Ctarget-cpu=v3");
        // Not for the host-side build scripts and proc macros of that build.
        env::set_var("CARGO_PROFILE_RELEASE_BUILD_OVERRIDE_RUSTFLAGS", "-Ctarget-cpu=generic");
    }
    // The hook benchmark's cost-floor programs only where asked for (the privileged tests and
    // benchmarks): the shipped object leaves them out.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_BENCH_PROGRAMS").is_some() { &["bench"] } else { &[] };
    aya_build::build_ebpf(
        [aya_build::Package { name: "depfence-bpf", root_dir: programs, features, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
}
