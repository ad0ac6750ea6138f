#!/bin/sh
# Fetch the Debian cloud kernel used by the Linux boot test and print the vmlinuz path.
#
#   vmm-node/scripts/fetch-test-kernel.sh [DEST]   (default: <workspace>/target/test-kernel)
#
# Downloads the package that linux-image-cloud-amd64 depends on (apt-get download, no
# install), unpacks it with dpkg -x, and also extracts the uncompressed vmlinux ELF from
# the bzImage (for the vmlinux boot path). Idempotent: reuses an earlier download.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/../../target/test-kernel}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

# Tests run in parallel and may all call this script: one runs it, the others wait
# for its result instead of writing the same files at the same time.
if [ -z "${FETCH_TEST_KERNEL_LOCKED:-}" ]; then
    export FETCH_TEST_KERNEL_LOCKED=1
    exec flock "$dest/.lock" "$0" "$dest"
fi

existing=$(ls "$dest"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
if [ -z "$existing" ]; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-.*-cloud-amd64/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq >&2
        pkg=$(apt-cache depends linux-image-cloud-amd64 \
            | awk '/Depends: linux-image-.*-cloud-amd64/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
    (cd "$dest" && apt-get download "$pkg" >&2)
    dpkg -x "$dest/$pkg"_*.deb "$dest"
    existing=$(ls "$dest"/boot/vmlinuz-* | head -n1)
fi

# vmlinux: find the compressed payload in the bzImage (lz4 legacy, xz or zstd) and
# decompress it; the first candidate that yields an ELF wins.
vmlinux="$dest/vmlinux"
if [ ! -s "$vmlinux" ]; then
    for kind in lz4 xz zstd; do
        case $kind in
            lz4) pat='\x02\x21\x4c\x18' ;;
            xz) pat='\xfd\x37\x7a\x58\x5a\x00' ;;
            zstd) pat='\x28\xb5\x2f\xfd' ;;
        esac
        for off in $(LC_ALL=C grep -obUaP "$pat" "$existing" | cut -d: -f1 | head -n 4); do
            tail -c +"$((off + 1))" "$existing" | "$kind" -dc 2>/dev/null > "$vmlinux.tmp" || true
            if [ "$(head -c 4 "$vmlinux.tmp" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; then
                mv "$vmlinux.tmp" "$vmlinux"
                break 2
            fi
        done
    done
    rm -f "$vmlinux.tmp"
fi
echo "$existing"
