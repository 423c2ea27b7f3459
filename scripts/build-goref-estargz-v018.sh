#!/bin/sh
# Build goref against the newest reference (github.com/containerd/
# stargz-snapshotter/estargz v0.18.x, through the Go module proxy) into a
# cache dir and print the binary's path as the last line of stdout.
#
#   scripts/build-goref-estargz-v018.sh     # -> ~/.cache/estargz-dev/bin/goref-estargz-v018
#
# The program is tests/interop/goref/main.go (the same CLI as the Debian 0.12
# build, scripts/build-goref.sh) plus tests/interop/goref-estargz-v018/v018.go, whose
# subcommands need v0.18: build-v018 (min-chunk-size, external TOC,
# keep-diff-id) and verify-external. Module mode with the committed
# go.mod/go.sum (-mod=readonly), modules and build cache under the cache dir
# (only the first build downloads), the Go on PATH if it is >= 1.24 (else set
# GO_MODULES). Rebuilds only when a source is newer than the binary; safe to
# run concurrently (temp file, atomic rename).
set -eu

die() {
    echo "build-goref-estargz-v018: $*" >&2
    exit 1
}

script=$(readlink -f -- "$0" 2>/dev/null) || script=$0
script_dir=$(CDPATH= cd -- "$(dirname -- "$script")" && pwd) ||
    die "cannot locate script directory from $0"
interop="$script_dir/../tests/interop"
src_dir="$interop/goref-estargz-v018"
sources="$interop/goref/main.go $src_dir/v018.go $src_dir/go.mod $src_dir/go.sum"
for f in $sources; do
    [ -f "$f" ] || die "missing $f"
done

cache_dir="${ESTARGZ_CACHE:-${HOME:?HOME is not set and ESTARGZ_CACHE is empty}/.cache/estargz-dev}"
bin_dir="$cache_dir/bin"
mkdir -p "$bin_dir" || die "cannot create cache dir $bin_dir (set ESTARGZ_CACHE to a writable dir)"
bin="$bin_dir/goref-estargz-v018"
GO=${GO_MODULES:-go}

needs_build() {
    [ -x "$bin" ] || return 0
    for f in $sources; do
        [ "$f" -nt "$bin" ] && return 0
    done
    return 1
}

if needs_build; then
    minor=$("$GO" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
    [ "${minor:-0}" -ge 24 ] 2>/dev/null ||
        die "needs Go >= 1.24 (v0.18's go.mod); set GO_MODULES to one"
    work=$(mktemp -d "${TMPDIR:-/tmp}/goref-estargz-v018.XXXXXX")
    tmp_bin=""
    cleanup() {
        rm -rf "$work"
        [ -z "$tmp_bin" ] || rm -f "$tmp_bin"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    cp $sources "$work/"
    tmp_bin=$(mktemp "$bin_dir/.goref-estargz-v018.XXXXXX")
    echo "build-goref-estargz-v018: building $bin" >&2
    (
        cd "$work"
        GOMODCACHE="${GOMODCACHE:-$cache_dir/go-mod}" GOCACHE="${GOCACHE:-$cache_dir/go-build}" \
            GOFLAGS="-mod=readonly -modcacherw -buildvcs=false" GO111MODULE=on \
            GOTOOLCHAIN=local GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}" \
            CGO_ENABLED=0 "$GO" build -trimpath -o "$tmp_bin" .
    ) >&2 || die "go build failed"
    chmod 755 "$tmp_bin"
    mv -f "$tmp_bin" "$bin"
    tmp_bin=""
fi

echo "$bin"
