#!/usr/bin/env bash
# Install what a fresh Debian/Ubuntu machine with only the Rust toolchain needs to
# build and test the workspace. Idempotent: re-running installs nothing new.
#  - libclang-dev: bindgen (rocksdb's librocksdb-sys) needs libclang.
#  - build-essential: C/C++ compiler for RocksDB's bundled sources.
#  - lz4, util-linux (flock): vmm-node/scripts/fetch-test-kernel.sh unpacks the test kernel.
#  - iproute2, python3: the virtio-net tests build a bridge and TAPs in a network
#    namespace of their own and probe the guest from inside it.
#  - iptables: the partition tests cut links between the local agents with iptables rules
#    (tests/src/partition.rs); they run as root.
#  - chromium, chromium-driver: the web console test drives a real headless browser
#    (tests/src/browser.rs, cluster-agent/tests/web_console.rs).
#  - prometheus: its promtool lints a live agent's /metrics and deploy/prometheus-alerts.yml
#    (cluster-agent/tests/metrics.rs).
#  - dpkg-dev (dpkg-shlibdeps), and cargo-deb from crates.io (`cargo install --locked`, a
#    few minutes once; no Debian package of it): deploy/package.sh builds the .deb with them
#    and cluster-agent/tests/package.rs checks it.
#  - npm: installs buf (@bufbuild/buf) into the workspace's .tools/ (not in git); its
#    `buf lint` checks the .proto files against buf's STANDARD rules (proto/tests/buf_lint.rs).
#  - protoc is NOT needed: proto/build.rs uses the vendored protoc-bin-vendored.
#  - sccache (optional, recommended): caches the ~10-minute RocksDB C++ build.
set -euo pipefail
need=()
for pkg in libclang-dev build-essential pkg-config lz4 util-linux iproute2 python3 iputils-ping iptables chromium chromium-driver prometheus dpkg-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# npm may come with a nodejs package of its own (NodeSource): ask apt only when it is missing.
command -v npm >/dev/null 2>&1 || need+=(npm)
if ((${#need[@]})); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${need[@]}"
else
    echo "setup: build dependencies already installed"
fi
BUF_VERSION=1.75.0
root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "$("$root/.tools/node_modules/.bin/buf" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
    npm install --no-save --no-audit --no-fund --prefix "$root/.tools" "@bufbuild/buf@$BUF_VERSION"
fi
if ! command -v sccache >/dev/null 2>&1; then
    echo "setup: optional: 'apt-get install sccache' and export RUSTC_WRAPPER=sccache to cache the RocksDB build"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
# The version deploy/package.sh is written for (its CARGO_DEB_VERSION).
CARGO_DEB_VERSION="$(sed -n 's/^CARGO_DEB_VERSION="\(.*\)"$/\1/p' "$(dirname "$0")/package.sh")"
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    echo "setup: installing cargo-deb $CARGO_DEB_VERSION (cargo install, a few minutes once)"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
echo "setup: ready"
