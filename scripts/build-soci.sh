#!/bin/sh
# Build a tool of the SOCI Snapshotter (github.com/awslabs/soci-snapshotter)
# into a cache dir and print the binary's path as the last line of stdout.
#
#   scripts/build-soci.sh soci          # -> ~/.cache/estargz-dev/bin/soci-v016
#   scripts/build-soci.sh snapshotter   # -> ~/.cache/estargz-dev/bin/soci-snapshotter-grpc-v016
#   scripts/build-soci.sh rpull         # -> ~/.cache/estargz-dev/bin/soci-rpull-v016
#   scripts/build-soci.sh containerd    # -> ~/.cache/estargz-dev/bin/containerd-v2/containerd
#   ESTARGZ_CACHE=/tmp/c scripts/build-soci.sh soci
#
# soci         the `soci` CLI (create, convert, push, index/ztoc info) of
#              soci-snapshotter v0.16.1
# snapshotter  soci-snapshotter-grpc v0.16.1, the containerd proxy snapshotter
# rpull        our puller (tests/lazypull/soci-v016/rpull): containerd's Go
#              client pulling with the labels a remote snapshotter needs,
#              as `soci image rpull` did before v0.10 removed it
# containerd   containerd 2 (tests/lazypull/containerd-v2/go.mod: v2.4.2, the
#              newest release when written): containerd, ctr and
#              containerd-shim-runc-v2 side by side in bin/containerd-v2/.
#              soci-snapshotter needs it: containerd 1.6 (Debian's) does not
#              pass the namespace to a proxy snapshotter, and soci refuses
#              to prepare a snapshot without one.  Pure Go, no cgo.
#
# The soci tools come from one module of ours, tests/lazypull/soci-v016, built through
# the Go module proxy.  Why not `go install .../cmd/soci@v0.16.1`: the cmd
# module is not tagged (the proxy serves the v0.16.1 commit as a
# pseudo-version) and its go.mod needs `replace` directives, which Go only
# honours in the main module; our go.mod requires both modules and repeats
# the replaces (see the comment there).  `go get` there moves the versions.
#
# The library's zTOC code is cgo over zlib (ztoc/compression/gzip_zinfo.c,
# linked with -l:libz.a): a C compiler and zlib's static library are needed
# (apt: gcc libc6-dev zlib1g-dev, in scripts/install-test-deps.sh).
#
# Go >= 1.26 (the modules say go 1.26.x): the go on PATH if new enough, else
# Go 1.26.6 fetched from the module proxy as golang.org/toolchain with
# Debian's go.  Modules and the build cache live under the cache dir, so only
# the first build downloads.  A binary is only rebuilt when our sources are
# newer than it, and runs are safe concurrently: each builds into its own
# temp file and atomically renames it into place.
set -eu

die() {
    echo "build-soci: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 soci|snapshotter|rpull|containerd"
target=$1

script=$(readlink -f -- "$0" 2>/dev/null) || script=$0
script_dir=$(CDPATH= cd -- "$(dirname -- "$script")" && pwd) ||
    die "cannot locate script directory from $0"
src_dir="$script_dir/../tests/lazypull/soci-v016"

cache_dir="${ESTARGZ_CACHE:-${HOME:?HOME is not set and ESTARGZ_CACHE is empty}/.cache/estargz-dev}"
bin_dir="$cache_dir/bin"
mkdir -p "$bin_dir" || die "cannot create cache dir $bin_dir (set ESTARGZ_CACHE to a writable dir)"

# The version the binaries report (`soci --version`); the go.mod pins it.
soci_version=v0.16.1
soci_revision=61147fe7c929
cgo=1
tags=""
sources="$src_dir/go.mod $src_dir/go.sum"
ldflags="-X github.com/awslabs/soci-snapshotter/version.Version=$soci_version"
ldflags="$ldflags -X github.com/awslabs/soci-snapshotter/version.Revision=$soci_revision"

case "$target" in
    soci)
        name=soci-v016
        package=github.com/awslabs/soci-snapshotter/cmd/soci
        ;;
    snapshotter)
        name=soci-snapshotter-grpc-v016
        package=github.com/awslabs/soci-snapshotter/cmd/soci-snapshotter-grpc
        ;;
    rpull)
        name=soci-rpull-v016
        package=./rpull
        sources="$sources $src_dir/rpull/main.go"
        ;;
    containerd)
        # Three binaries in one directory: containerd finds its shim next to
        # itself (when no other is on PATH; tests/socilazy.py puts this
        # directory first on the daemon's PATH).
        src_dir="$script_dir/../tests/lazypull/containerd-v2"
        sources="$src_dir/go.mod $src_dir/go.sum"
        name="containerd-v2/containerd containerd-v2/ctr containerd-v2/containerd-shim-runc-v2"
        package=github.com/containerd/containerd/v2/cmd
        cgo=0
        # btrfs would need cgo and its headers; cli docs are not needed.
        tags="urfave_cli_no_docs no_btrfs"
        ldflags="-X github.com/containerd/containerd/v2/version.Version=$(
            sed -n 's/^require github.com\/containerd\/containerd\/v2 //p' "$src_dir/go.mod")"
        ;;
    *)
        die "unknown target '$target' (expected soci, snapshotter, rpull or containerd)"
        ;;
esac
for f in $sources; do
    [ -f "$f" ] || die "missing $f"
done
# $name: the binaries to build (paths below bin/; the first is printed).
needs_build() {
    for n in $name; do
        [ -x "$bin_dir/$n" ] || return 0
        for f in $sources; do
            [ "$f" -nt "$bin_dir/$n" ] && return 0
        done
    done
    return 1
}

gomodcache="${GOMODCACHE:-$cache_dir/go-mod}"
goproxy="${GOPROXY:-https://proxy.golang.org,direct}"
GO=${GO_MODULES:-go}

toolchain=go1.26.6
go_minor() { "$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p'; }
pick_module_go() {
    if command -v "$GO" >/dev/null 2>&1 && [ "$(go_minor "$GO")" -ge 26 ] 2>/dev/null; then
        return
    fi
    debian_go=${GO_DEBIAN:-/usr/lib/go-1.19/bin/go}
    [ -x "$debian_go" ] ||
        die "no Go >= 1.26 on PATH, and no Debian Go at $debian_go to fetch one (apt-get install golang-go)"
    module="golang.org/toolchain@v0.0.1-$toolchain.linux-$("$debian_go" env GOARCH)"
    dir="$gomodcache/$module"
    if [ ! -x "$dir/bin/go" ]; then
        echo "build-soci: no Go >= 1.26 on PATH; fetching $module" >&2
        (
            cd "$work"
            GOMODCACHE="$gomodcache" GOFLAGS=-modcacherw GO111MODULE=on GOPROXY="$goproxy" \
                GOTOOLCHAIN=local "$debian_go" mod download "$module"
        ) >&2 || die "cannot download $module"
        # Module zips carry no file modes.
        chmod +x "$dir"/bin/* "$dir"/pkg/tool/*/*
    fi
    GO="$dir/bin/go"
}

if needs_build; then
    if [ "$cgo" = 1 ]; then
        command -v "${CC:-gcc}" >/dev/null 2>&1 ||
            die "no C compiler (${CC:-gcc}) for soci's cgo zlib code; apt-get install gcc libc6-dev zlib1g-dev"
        [ -f /usr/include/zlib.h ] ||
            die "no zlib headers for soci's cgo zlib code; apt-get install zlib1g-dev"
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/soci-build.XXXXXX")
    tmp_bin=""
    cleanup() {
        rm -rf "$work"
        [ -z "$tmp_bin" ] || rm -f "$tmp_bin"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    gocache="${GOCACHE:-$cache_dir/go-build}"
    pick_module_go
    for n in $name; do
        bin="$bin_dir/$n"
        mkdir -p "$(dirname "$bin")" || die "cannot create $(dirname "$bin")"
        # The containerd target builds .../cmd/NAME for each of its binaries.
        pkg=$package
        [ "$target" != containerd ] || pkg="$package/$(basename "$n")"
        # Temp file in the destination dir so the final mv is an atomic rename.
        tmp_bin=$(mktemp "$(dirname "$bin")/.$(basename "$n").XXXXXX")
        echo "build-soci: building $bin" >&2
        # -mod=readonly: go fetches exactly what the committed go.mod/go.sum
        # pin and never edits them; GOTOOLCHAIN=local: never download another
        # Go; -modcacherw: a cache dir the user can simply delete.
        (
            cd "$src_dir"
            GOMODCACHE="$gomodcache" GOCACHE="$gocache" \
                GOFLAGS="-mod=readonly -modcacherw -buildvcs=false" GO111MODULE=on \
                GOTOOLCHAIN=local GOPROXY="$goproxy" CGO_ENABLED="$cgo" \
                "$GO" build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$tmp_bin" "$pkg"
        ) >&2 || die "go build failed"
        chmod 755 "$tmp_bin"
        mv -f "$tmp_bin" "$bin"
        tmp_bin=""
    done
fi

set -- $name
echo "$bin_dir/$1"
