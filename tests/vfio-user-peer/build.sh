#!/usr/bin/env bash
# Builds the independent vfio-user peers: libvfio-user (C, from a source tarball) as a static library,
# our device migr-device.c against it, and our client migr-client.c on its message framing. Prints the
# client binary's path, then the device binary's path as its last line.
#
# Usage: tests/vfio-user-peer/build.sh [TARBALL] [OUT_DIR]
#
#   TARBALL  libvfio-user source tarball (.tar.xz/.tar.gz) unpacking to one top directory
#            (default: ../shared/upstream/libvfio-user-*.tar.xz next to the repository)
#   OUT_DIR  where the cache lives (default ${VFIO_USER_PEER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfio-migration-vfio-user})
#
# Builds go to OUT_DIR/libvfio-user-<hash of the tarball>/ and OUT_DIR/peer-<hash of tarball,
# migr-device.c and migr-client.c>/{migr-device,migr-client}; a second run with the same inputs only
# prints the paths. Needs cc, meson, ninja, pkg-config and json-c (and cmocka: libvfio-user's
# meson.build requires it although we build no tests); on Debian: apt-get install meson ninja-build pkg-config libjson-c-dev libcmocka-dev
# (scripts/test-all installs them). Exit status 3 means a prerequisite is missing (the message names
# it); anything else non-zero is a build failure. Nothing from libvfio-user is part of this repository.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
log() { echo "vfio-user-peer: $*" >&2; }
missing() { echo "vfio-user-peer: MISSING: $*" >&2; exit 3; }
die() { echo "vfio-user-peer: ERROR: $*" >&2; exit 1; }

case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac

tarball="${1:-}"
if [ -z "$tarball" ]; then
    shopt -s nullglob
    candidates=("$repo"/../shared/upstream/libvfio-user-*.tar.*)
    shopt -u nullglob
    [ ${#candidates[@]} -gt 0 ] || missing "no libvfio-user tarball given and none in $repo/../shared/upstream/"
    tarball="${candidates[-1]}"
fi
[ -f "$tarball" ] || missing "libvfio-user tarball $tarball not found"
tarball="$(realpath "$tarball")"
out="${2:-${VFIO_USER_PEER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfio-migration-vfio-user}}"

# Prerequisites, each named with its Debian package.
for tool in "cc:gcc" "meson:meson" "ninja:ninja-build" "pkg-config:pkg-config" "tar:tar" "sha256sum:coreutils"; do
    command -v "${tool%%:*}" >/dev/null || missing "${tool%%:*} (Debian package ${tool#*:})"
done
pkg-config --exists 'json-c >= 0.11' || missing "json-c development files (Debian package libjson-c-dev)"
pkg-config --exists cmocka || missing "cmocka development files (Debian package libcmocka-dev; libvfio-user's meson.build requires it)"

mkdir -p "$out"
out="$(realpath "$out")"
# One build at a time per cache (parallel test processes may call this together).
if command -v flock >/dev/null; then
    exec 9>"$out/.lock"
    flock 9
fi
tar_hash="$(sha256sum "$tarball" | cut -c1-16)"
lib_dir="$out/libvfio-user-$tar_hash"
# Bump when the library build recipe below changes.
recipe=1
if [ ! -f "$lib_dir/done-$recipe" ]; then
    log "building libvfio-user from $tarball into $lib_dir"
    rm -rf "$lib_dir"
    mkdir -p "$lib_dir/src"
    tar -C "$lib_dir/src" -xf "$tarball" || die "cannot unpack $tarball"
    src="$(find "$lib_dir/src" -mindepth 2 -maxdepth 2 -name meson.build -printf '%h\n' | head -n1)"
    if [ -z "$src" ] || [ ! -f "$src/include/libvfio-user.h" ]; then
        die "$tarball does not look like libvfio-user (no */meson.build, */include/libvfio-user.h)"
    fi
    ln -s "$src" "$lib_dir/source"
    meson setup "$lib_dir/build" "$src" -Ddefault_library=static -Dbuildtype=release >"$lib_dir/meson-setup.log" 2>&1 \
        || { tail -n 30 "$lib_dir/meson-setup.log" >&2; die "meson setup failed (log: $lib_dir/meson-setup.log)"; }
    ninja -C "$lib_dir/build" lib/libvfio-user.a >"$lib_dir/ninja.log" 2>&1 \
        || { tail -n 30 "$lib_dir/ninja.log" >&2; die "ninja failed (log: $lib_dir/ninja.log)"; }
    touch "$lib_dir/done-$recipe"
fi
[ -f "$lib_dir/build/lib/libvfio-user.a" ] || die "$lib_dir/build/lib/libvfio-user.a missing (remove $lib_dir and retry)"

dev_hash="$( (echo "$tar_hash recipe $recipe"; cat "$here/migr-device.c" "$here/migr-client.c") | sha256sum | cut -c1-16)"
peer_dir="$out/peer-$dev_hash"
bin="$peer_dir/migr-device"
client="$peer_dir/migr-client"
# The library is static: the binaries need only libjson-c and libc at run time.
cflags=(-O2 -g -std=gnu99 -Wall -Wextra -Werror -Wno-unused-parameter)
if [ ! -x "$bin" ]; then
    log "compiling migr-device.c against $lib_dir"
    mkdir -p "$peer_dir"
    # shellcheck disable=SC2046
    cc "${cflags[@]}" -I "$lib_dir/source/include" -o "$bin.tmp" "$here/migr-device.c" \
        "$lib_dir/build/lib/libvfio-user.a" $(pkg-config --libs json-c) -lpthread -ldl \
        || die "compiling migr-device.c failed"
    mv "$bin.tmp" "$bin"
fi
if [ ! -x "$client" ]; then
    # The client uses libvfio-user's message framing (lib/tran_sock.h, lib/tran.h: internals, as its
    # samples/client.c does), so it also sees the library's private headers.
    log "compiling migr-client.c against $lib_dir"
    mkdir -p "$peer_dir"
    # shellcheck disable=SC2046
    cc "${cflags[@]}" $(pkg-config --cflags json-c) -I "$lib_dir/source/include" -I "$lib_dir/source/lib" \
        -o "$client.tmp" "$here/migr-client.c" \
        "$lib_dir/build/lib/libvfio-user.a" $(pkg-config --libs json-c) -lpthread -ldl \
        || die "compiling migr-client.c failed"
    mv "$client.tmp" "$client"
fi
# The client's path first, the device's last (the device tests take the last line).
echo "$client"
echo "$bin"
