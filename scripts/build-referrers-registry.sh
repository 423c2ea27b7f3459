#!/bin/sh
# Build tests/interop/referrers-registry, go-containerregistry's registry
# (pkg/registry, v0.22.1 pinned by its go.mod) with the OCI 1.1 referrers
# API turned on, into a cache dir; print the binary's path as the last line
# of stdout.
#
#   scripts/build-referrers-registry.sh   # -> ~/.cache/estargz-dev/bin/referrers-registry
#   ESTARGZ_CACHE=/tmp/c scripts/build-referrers-registry.sh
#
# Debian's docker-registry 2.8 (tests/services.py `registry`) and
# Distribution 3 have no referrers API; this one is what tests/services.py's
# `referrers_registry` fixture runs.  Pure Go (no cgo), dependencies only
# from the Go module proxy.
#
# Go >= 1.26 (the go.mod says go 1.26.0): the go on PATH, or $GO_MODULES.
# Modules and the build cache live under the cache dir, so only the first
# build downloads.  The binary is only rebuilt when our sources are newer
# than it, and runs are safe concurrently: each builds into its own temp
# file and atomically renames it into place.
set -eu

die() {
    echo "build-referrers-registry: $*" >&2
    exit 1
}

[ $# -eq 0 ] || die "usage: $0"

script=$(readlink -f -- "$0" 2>/dev/null) || script=$0
script_dir=$(CDPATH= cd -- "$(dirname -- "$script")" && pwd) ||
    die "cannot locate script directory from $0"
src_dir="$script_dir/../tests/interop/referrers-registry"
sources="$src_dir/main.go $src_dir/go.mod $src_dir/go.sum"
for f in $sources; do
    [ -f "$f" ] || die "missing $f"
done

cache_dir="${ESTARGZ_CACHE:-${HOME:?HOME is not set and ESTARGZ_CACHE is empty}/.cache/estargz-dev}"
bin_dir="$cache_dir/bin"
mkdir -p "$bin_dir" || die "cannot create cache dir $bin_dir (set ESTARGZ_CACHE to a writable dir)"
bin="$bin_dir/referrers-registry"

needs_build() {
    [ -x "$bin" ] || return 0
    for f in $sources; do
        [ "$f" -nt "$bin" ] && return 0
    done
    return 1
}

if needs_build; then
    GO=${GO_MODULES:-go}
    command -v "$GO" >/dev/null 2>&1 || die "no go on PATH (Go >= 1.26 needed)"
    minor=$("$GO" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
    [ "${minor:-0}" -ge 26 ] 2>/dev/null ||
        die "$GO is $("$GO" env GOVERSION 2>/dev/null || echo unknown); Go >= 1.26 needed"
    # Temp file in the destination dir so the final mv is an atomic rename.
    tmp_bin=$(mktemp "$bin_dir/.referrers-registry.XXXXXX")
    trap 'rm -f "$tmp_bin"' EXIT
    trap 'exit 130' INT TERM
    echo "build-referrers-registry: building $bin" >&2
    # -mod=readonly: go fetches exactly what the committed go.mod/go.sum pin
    # and never edits them; GOTOOLCHAIN=local: never download another Go;
    # -modcacherw: a cache dir the user can simply delete.
    (
        cd "$src_dir"
        GOMODCACHE="${GOMODCACHE:-$cache_dir/go-mod}" GOCACHE="${GOCACHE:-$cache_dir/go-build}" \
            GOFLAGS="-mod=readonly -modcacherw -buildvcs=false" GO111MODULE=on \
            GOTOOLCHAIN=local GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}" \
            CGO_ENABLED=0 "$GO" build -trimpath -o "$tmp_bin" .
    ) >&2 || die "go build failed"
    chmod 755 "$tmp_bin"
    mv -f "$tmp_bin" "$bin"
fi

echo "$bin"
