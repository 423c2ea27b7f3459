#!/bin/sh
# Build tests/interop/goref (a CLI over the reference Go estargz package) into
# a cache dir and print the binary's path as the last line of stdout.
#
#   scripts/build-goref.sh            # -> ~/.cache/estargz-dev/bin/goref
#   ESTARGZ_CACHE=/tmp/c scripts/build-goref.sh
#
# The build uses Debian's packaged Go sources in GOPATH mode (they ship without
# go.mod), so it needs no network. It only rebuilds when main.go (or the
# packaged estargz sources, e.g. after an apt upgrade) is newer than the
# binary, and it is safe to run concurrently: each run builds into its own
# temp file and atomically renames it into place.
set -eu

die() {
    echo "build-goref: $*" >&2
    exit 1
}

# Resolve paths from this script's real location (following symlinks) so it
# works from any cwd and when invoked through a link.
script=$(readlink -f -- "$0" 2>/dev/null) || script=$0
script_dir=$(CDPATH= cd -- "$(dirname -- "$script")" && pwd) ||
    die "cannot locate script directory from $0"
src_dir=$(CDPATH= cd -- "$script_dir/../tests/interop/goref" 2>/dev/null && pwd) ||
    die "source dir not found: $script_dir/../tests/interop/goref"
main_go="$src_dir/main.go"
[ -f "$main_go" ] || die "missing $main_go"

gocode=/usr/share/gocode
estargz_pkg="$gocode/src/github.com/containerd/stargz-snapshotter/estargz"
apt_pkgs="golang-go golang-github-containerd-stargz-snapshotter-dev golang-github-klauspost-compress-dev golang-github-opencontainers-go-digest-dev golang-github-vbatts-tar-split-dev golang-golang-x-sync-dev"

# Debian's own toolchain (Go 1.19), not whatever `go` is first on PATH: the
# packaged sources (0.12, Go 1.19 era) are built in GOPATH mode with the
# toolchain they were packaged for; the newer Go on PATH is for module builds.
GO=${GO_DEBIAN:-/usr/lib/go-1.19/bin/go}
[ -x "$GO" ] ||
    die "Debian's Go toolchain not found at $GO; install it with: sudo apt-get install $apt_pkgs"
[ -d "$estargz_pkg" ] ||
    die "reference package not found at $estargz_pkg; install it with: sudo apt-get install $apt_pkgs"

cache_dir="${ESTARGZ_CACHE:-${HOME:?HOME is not set and ESTARGZ_CACHE is empty}/.cache/estargz-dev}"
bin_dir="$cache_dir/bin"
bin="$bin_dir/goref"
mkdir -p "$bin_dir" || die "cannot create cache dir $bin_dir (set ESTARGZ_CACHE to a writable dir)"

needs_build() {
    [ -x "$bin" ] || return 0
    [ "$main_go" -nt "$bin" ] && return 0
    # Rebuild when the reference itself changed, so tests never run against
    # a stale copy of the package.
    for f in "$estargz_pkg"/*.go; do
        [ "$f" -nt "$bin" ] && return 0
    done
    return 1
}

if needs_build; then
    # Private GOPATH whose src/ holds only our program; the dependencies come
    # from the second GOPATH entry, Debian's /usr/share/gocode.
    work=$(mktemp -d "${TMPDIR:-/tmp}/goref-build.XXXXXX")
    tmp_bin=""
    cleanup() {
        rm -rf "$work"
        [ -z "$tmp_bin" ] || rm -f "$tmp_bin"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    mkdir -p "$work/src/goref"
    cp "$main_go" "$work/src/goref/main.go"
    # Temp file in the destination dir so the final mv is an atomic rename.
    tmp_bin=$(mktemp "$bin_dir/.goref.XXXXXX")

    echo "build-goref: building $bin" >&2
    (
        cd "$work/src/goref"
        # GO111MODULE=off: Debian's sources have no go.mod. GOFLAGS is cleared
        # so a user's -mod=... setting can't break GOPATH mode. CGO is not
        # needed and disabling it avoids requiring a C toolchain.
        GOPATH="$work:$gocode" GO111MODULE=off GOFLAGS= GOPROXY=off \
            CGO_ENABLED=0 GOCACHE="${GOCACHE:-$cache_dir/go-build}" \
            "$GO" build -trimpath -o "$tmp_bin" .
    ) >&2 || die "go build failed"
    chmod 755 "$tmp_bin"
    mv -f "$tmp_bin" "$bin"
    tmp_bin=""
fi

echo "$bin"
