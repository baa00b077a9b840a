#!/usr/bin/env bash
# One-time, idempotent machine setup for building, testing and running the
# zero-trust agent and collector on Debian 12, as root.
#
# Installs only what is missing; a second run on a ready machine takes seconds.
#   - Debian packages: ClickHouse server and client, protoc, iproute2, build tools,
#     Chromium and chromedriver with a Japanese font (the console's browser tests)
#   - bpftool (the package tests check what stays attached), cargo-deb (builds
#     the .deb packages)
#   - the nightly toolchain's rust-src (the eBPF crate builds core with -Z build-std)
#   - bpf-linker, linked against rustc's own libLLVM (no LLVM 22 package on Debian 12)
#   - bpffs, tracefs and debugfs mounted if absent
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (eBPF, package installation and mounts need it)"

export PATH="$HOME/.cargo/bin:$PATH"

# --- Debian packages ---------------------------------------------------------
packages=(clickhouse-server clickhouse-client protobuf-compiler iproute2 build-essential pkg-config curl ca-certificates python3 chromium chromium-driver fonts-ipafont-gothic bpftool)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  # Never let package scripts start system services: the stack and the tests
  # start their own ClickHouse with their own data directories.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [ "$created_policy" -eq 1 ] && rm -f "$policy"
else
  log "Debian packages present"
fi

# --- Rust toolchains -----------------------------------------------------------
command -v rustup >/dev/null || die "rustup not found; install Rust with rustup first"
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --installed --toolchain nightly 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
else
  log "nightly rust-src present"
fi

# --- bpf-linker against rustc's libLLVM ----------------------------------------
BPF_LINKER_VERSION=0.13
if command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "bpf-linker ${BPF_LINKER_VERSION}"; then
  log "bpf-linker present ($(bpf-linker --version))"
else
  sysroot=$(rustc +nightly --print sysroot)
  llvm_lib=$(ls "$sysroot"/lib/libLLVM.so.*-rust-*-nightly 2>/dev/null | head -n1 || true)
  [ -n "$llvm_lib" ] || die "nightly toolchain ships no libLLVM under $sysroot/lib"
  major=$(basename "$llvm_lib" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
  prefix=/opt/zt/llvm-rust
  mkdir -p "$prefix/lib"
  ln -sf "$llvm_lib" "$prefix/lib/libLLVM.so"
  log "building bpf-linker ${BPF_LINKER_VERSION} against rustc's LLVM ${major} (a few minutes)"
  # rpath to the nightly's lib directory: the binary then finds libLLVM at run
  # time; if a nightly update replaces it, --version fails above and we rebuild.
  LLVM_PREFIX="$prefix" RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
    cargo install --locked --force bpf-linker --version "~${BPF_LINKER_VERSION}" \
    --no-default-features --features "llvm-${major}"
fi

# --- cargo-deb: the Debian packages (deploy/packaging, docs/install.md) -------
CARGO_DEB_VERSION=3.8.0
if command -v cargo-deb >/dev/null && cargo-deb --version 2>/dev/null | grep -q "cargo-deb ${CARGO_DEB_VERSION}"; then
  log "cargo-deb present"
else
  log "installing cargo-deb ${CARGO_DEB_VERSION}"
  cargo install --locked --force cargo-deb --version "=${CARGO_DEB_VERSION}"
fi

# --- kernel filesystems --------------------------------------------------------
mount_if_absent() { # fstype target
  local fstype=$1 target=$2
  if ! awk -v t="$target" '$2 == t { found = 1 } END { exit !found }' /proc/mounts; then
    mkdir -p "$target"
    mount -t "$fstype" "$fstype" "$target" && log "mounted $fstype at $target"
  fi
}
mount_if_absent bpf /sys/fs/bpf
mount_if_absent tracefs /sys/kernel/tracing
mount_if_absent debugfs /sys/kernel/debug

grep -q cgroup2 /proc/self/mountinfo || die "no cgroup v2 hierarchy is mounted"

log "ready"
