#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what a fresh Debian machine
# with only the Rust toolchain lacks, fetches the kernel for the Linux boot test, and
# runs every test of the workspace. KVM tests fail loudly when /dev/kvm is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/setup.sh
./vmm-node/scripts/fetch-test-kernel.sh >/dev/null

if command -v sccache >/dev/null 2>&1 && [ -z "${RUSTC_WRAPPER:-}" ]; then
    export RUSTC_WRAPPER=sccache
fi
cargo test --workspace --locked "$@"
