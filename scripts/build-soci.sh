#!/bin/sh
# Build SOCI programs from soci-snapshotter (github.com/awslabs/soci-snapshotter,
# through the Go module proxy) into a cache dir and print the binary's path
# as the last line of stdout.
#
#   scripts/build-soci.sh ztoc-check   # -> ~/.cache/estargz-dev/bin/soci-ztoc
#   ESTARGZ_CACHE=/tmp/c scripts/build-soci.sh ztoc-check
#
# ztoc-check  tests/interop/soci-ztoc: soci v0.16.1's ztoc packages (its zTOC
#             builder, marshaler and cgo zran code over the system zlib) as a
#             checker for the zTOCs estargz writes: build / info / extract.
#             Needs cgo: gcc and zlib1g-dev (scripts/install-test-deps.sh).
#
# Modules and the Go build cache live under the cache dir, so only the first
# build downloads. It rebuilds only when the sources are newer than the
# binary, and it is safe to run concurrently: each run builds into its own
# temp file and atomically renames it into place.
set -eu

die() {
    echo "build-soci: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 ztoc-check"
target=$1

script=$(readlink -f -- "$0" 2>/dev/null) || script=$0
script_dir=$(CDPATH= cd -- "$(dirname -- "$script")" && pwd) ||
    die "cannot locate script directory from $0"

cache_dir="${ESTARGZ_CACHE:-${HOME:?HOME is not set and ESTARGZ_CACHE is empty}/.cache/estargz-dev}"
bin_dir="$cache_dir/bin"
mkdir -p "$bin_dir" || die "cannot create cache dir $bin_dir (set ESTARGZ_CACHE to a writable dir)"

case "$target" in
    ztoc-check)
        # The zTOC checker (tests/interop/soci-ztoc): soci's ztoc/compression
        # package is cgo over zlib, so this one target needs a C compiler.
        src_dir="$script_dir/../tests/interop/soci-ztoc"
        name=soci-ztoc
        cgo=1
        sources="$src_dir/main.go $src_dir/go.mod $src_dir/go.sum"
        ;;
    *)
        die "unknown target '$target' (expected ztoc-check)"
        ;;
esac
for f in $sources; do
    [ -f "$f" ] || die "missing $f"
done
bin="$bin_dir/$name"

needs_build() {
    [ -x "$bin" ] || return 0
    for f in $sources; do
        [ "$f" -nt "$bin" ] && return 0
    done
    return 1
}

GO=${GO_MODULES:-go}
command -v "$GO" >/dev/null 2>&1 || die "no Go toolchain '$GO' on PATH"
# soci-snapshotter v0.16.1's go.mod says go 1.26.0.
go_minor=$("$GO" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
[ "${go_minor:-0}" -ge 26 ] 2>/dev/null ||
    die "$GO is $("$GO" env GOVERSION 2>/dev/null); soci v0.16.1 needs Go >= 1.26 (set GO_MODULES)"
if [ "$cgo" = 1 ]; then
    command -v "${CC:-gcc}" >/dev/null 2>&1 ||
        die "cgo needs a C compiler; install one with: apt-get install gcc zlib1g-dev"
    [ -f /usr/include/zlib.h ] ||
        die "cgo needs zlib's header; install it with: apt-get install zlib1g-dev"
fi
gomodcache="${GOMODCACHE:-$cache_dir/go-mod}"
gocache="${GOCACHE:-$cache_dir/go-build}"
goproxy="${GOPROXY:-https://proxy.golang.org,direct}"

if needs_build; then
    tmp_bin=""
    cleanup() { [ -z "$tmp_bin" ] || rm -f "$tmp_bin"; }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    # Temp file in the destination dir so the final mv is an atomic rename.
    tmp_bin=$(mktemp "$bin_dir/.$name.XXXXXX")
    echo "build-soci: building $bin" >&2
    # -mod=readonly: go fetches exactly what the committed go.mod/go.sum pin
    # and never edits them. GOTOOLCHAIN=local: never download another Go.
    # -modcacherw: a cache dir the user can simply delete.
    (
        cd "$src_dir"
        GOMODCACHE="$gomodcache" GOCACHE="$gocache" \
            GOFLAGS="-mod=readonly -modcacherw -buildvcs=false" GO111MODULE=on \
            GOTOOLCHAIN=local GOPROXY="$goproxy" CGO_ENABLED="$cgo" \
            "$GO" build -trimpath -o "$tmp_bin" .
    ) >&2 || die "go build failed"
    chmod 755 "$tmp_bin"
    mv -f "$tmp_bin" "$bin"
    tmp_bin=""
fi

echo "$bin"
