//! Builds the kernel programs (`agent-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker (see deploy/setup.sh), into OUT_DIR, where
//! `sensors.rs` embeds them. There is no fallback: without the real object the
//! agent does not build.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-common/src")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
    .context("building agent-ebpf (needs the nightly toolchain with rust-src and bpf-linker: run deploy/setup.sh)")
}
