#!/bin/sh
# Build a Stargz Snapshotter daemon (a containerd proxy snapshotter, like
# containerd-stargz-grpc) into a cache dir and print the binary's path as the
# last line of stdout.
#
#   scripts/build-stargz-snapshotter.sh v0.18    # -> ~/.cache/estargz-dev/bin/containerd-stargz-grpc-v018
#   scripts/build-stargz-snapshotter.sh debian   # -> ~/.cache/estargz-dev/bin/containerd-stargz-grpc-debian
#   ESTARGZ_CACHE=/tmp/c scripts/build-stargz-snapshotter.sh v0.18
#   scripts/build-stargz-snapshotter.sh goref-v018  # zstd:chunked checker, tests/interop/goref-v018
#   scripts/build-stargz-snapshotter.sh storage-chunked  # containers/storage's partial-pull applier
#
# v0.18   github.com/containerd/stargz-snapshotter v0.18.x (the newest v0.18
#         release when tests/lazypull/snapshotter-v018/go.mod was last
#         updated; `go get github.com/containerd/stargz-snapshotter@v0.18`
#         there moves it), built in module mode through the Go module proxy
#         with the Go on PATH if it is >= 1.25, else with Go 1.25 fetched
#         from the proxy as module golang.org/toolchain.  Modules and the
#         build cache live under the cache dir, so only the first build
#         downloads.
# debian  Debian bookworm's packaged 0.12 sources (/usr/share/gocode) in GOPATH
#         mode with Debian's Go 1.19, no network.
#
# The sources are ours (tests/lazypull/snapshotter-*/): a small main that
# serves the library's snapshotter over gRPC on a unix socket, see main.go.
# It only rebuilds when those sources (or, for debian, the packaged library)
# are newer than the binary, and it is safe to run concurrently: each run
# builds into its own temp file and atomically renames it into place.
set -eu

die() {
    echo "build-stargz-snapshotter: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 v0.18|debian|goref-v018|storage-chunked"
version=$1

script=$(readlink -f -- "$0" 2>/dev/null) || script=$0
script_dir=$(CDPATH= cd -- "$(dirname -- "$script")" && pwd) ||
    die "cannot locate script directory from $0"
lazypull_dir="$script_dir/../tests/lazypull"

cache_dir="${ESTARGZ_CACHE:-${HOME:?HOME is not set and ESTARGZ_CACHE is empty}/.cache/estargz-dev}"
bin_dir="$cache_dir/bin"
mkdir -p "$bin_dir" || die "cannot create cache dir $bin_dir (set ESTARGZ_CACHE to a writable dir)"

gocode=/usr/share/gocode
build_tags=""
stargz_pkg="$gocode/src/github.com/containerd/stargz-snapshotter"
debian_pkgs="golang-go golang-github-containerd-stargz-snapshotter-dev golang-github-containerd-containerd-dev golang-github-burntsushi-toml-dev golang-google-grpc-dev golang-github-hashicorp-go-retryablehttp-dev"

case "$version" in
    v0.18)
        src_dir="$lazypull_dir/snapshotter-v018"
        name=containerd-stargz-grpc-v018
        GO=${GO_MODULES:-go}
        sources="$src_dir/main.go $src_dir/go.mod $src_dir/go.sum"
        ;;
    goref-v018)
        # Not a snapshotter: the v0.18 estargz/zstdchunked packages as a
        # checker and converter for zstd:chunked (tests/interop/goref-v018).
        src_dir="$script_dir/../tests/interop/goref-v018"
        name=goref-v018
        GO=${GO_MODULES:-go}
        sources="$src_dir/main.go $src_dir/go.mod $src_dir/go.sum"
        ;;
    storage-chunked)
        # Current containers/storage (go.podman.io/storage) applying a
        # zstd:chunked blob as a partial pull does (tests/interop/storage-chunked).
        src_dir="$script_dir/../tests/interop/storage-chunked"
        name=storage-chunked
        GO=${GO_MODULES:-go}
        sources="$src_dir/main.go $src_dir/go.mod $src_dir/go.sum"
        # No cgo: leave out the graph drivers that need it.
        build_tags="exclude_graphdriver_btrfs exclude_graphdriver_devicemapper"
        ;;
    debian)
        src_dir="$lazypull_dir/snapshotter-debian"
        name=containerd-stargz-grpc-debian
        # Debian's own toolchain: the packaged sources are Go 1.19 era and
        # have no go.mod (see build-goref.sh).
        GO=${GO_DEBIAN:-/usr/lib/go-1.19/bin/go}
        [ -x "$GO" ] ||
            die "Debian's Go toolchain not found at $GO; install it with: apt-get install $debian_pkgs"
        [ -d "$stargz_pkg/snapshot" ] ||
            die "Debian's stargz-snapshotter sources not found at $stargz_pkg; install them with: apt-get install $debian_pkgs"
        sources="$src_dir/main.go"
        ;;
    *)
        die "unknown version '$version' (expected v0.18, debian, goref-v018 or storage-chunked)"
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
    if [ "$version" = debian ]; then
        # Rebuild after an apt upgrade of the library, so tests never run a
        # stale copy.
        for f in "$stargz_pkg"/fs/*.go "$stargz_pkg"/fs/*/*.go "$stargz_pkg"/snapshot/*.go; do
            [ "$f" -nt "$bin" ] && return 0
        done
    fi
    return 1
}

gomodcache="${GOMODCACHE:-$cache_dir/go-mod}"
goproxy="${GOPROXY:-https://proxy.golang.org,direct}"

# Go >= 1.25 for v0.18 (its go.mod says go 1.25.0): the go on PATH if it is
# new enough, else the release Go's own toolchain switching would fetch,
# golang.org/toolchain from the module proxy, downloaded with Debian's go
# (1.19 predates switching) into the module cache and used from there.
toolchain=go1.25.0
go_minor() { "$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p'; }
pick_module_go() {
    if command -v "$GO" >/dev/null 2>&1 && [ "$(go_minor "$GO")" -ge 25 ] 2>/dev/null; then
        return
    fi
    debian_go=${GO_DEBIAN:-/usr/lib/go-1.19/bin/go}
    [ -x "$debian_go" ] ||
        die "no Go >= 1.25 on PATH, and no Debian Go at $debian_go to fetch one (apt-get install golang-go)"
    module="golang.org/toolchain@v0.0.1-$toolchain.linux-$("$debian_go" env GOARCH)"
    dir="$gomodcache/$module"
    if [ ! -x "$dir/bin/go" ]; then
        echo "build-stargz-snapshotter: no Go >= 1.25 on PATH; fetching $module" >&2
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
    work=$(mktemp -d "${TMPDIR:-/tmp}/stargz-build.XXXXXX")
    tmp_bin=""
    cleanup() {
        rm -rf "$work"
        [ -z "$tmp_bin" ] || rm -f "$tmp_bin"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    # Temp file in the destination dir so the final mv is an atomic rename.
    tmp_bin=$(mktemp "$bin_dir/.$name.XXXXXX")
    echo "build-stargz-snapshotter: building $bin" >&2
    gocache="${GOCACHE:-$cache_dir/go-build}"
    # CGO is not needed (go-fuse mounts through /dev/fuse directly) and
    # disabling it avoids requiring a C toolchain.
    if [ "$version" != debian ]; then
        # The module is built where it is; -mod=readonly: go fetches exactly
        # what the committed go.mod/go.sum pin and never edits them.
        # GOTOOLCHAIN=local: never download another Go.
        pick_module_go
        # -modcacherw: a cache dir the user can simply delete.
        (
            cd "$src_dir"
            GOMODCACHE="$gomodcache" GOCACHE="$gocache" \
                GOFLAGS="-mod=readonly -modcacherw -buildvcs=false" GO111MODULE=on \
                GOTOOLCHAIN=local GOPROXY="$goproxy" CGO_ENABLED=0 \
                "$GO" build -trimpath -tags "$build_tags" -o "$tmp_bin" .
        ) >&2 || die "go build failed"
    else
        # Private GOPATH whose src/ holds only our program; the dependencies
        # come from the second GOPATH entry, Debian's /usr/share/gocode.
        mkdir -p "$work/src/$name"
        cp "$src_dir/main.go" "$work/src/$name/main.go"
        (
            cd "$work/src/$name"
            GOPATH="$work:$gocode" GO111MODULE=off GOFLAGS= GOPROXY=off \
                CGO_ENABLED=0 GOCACHE="$gocache" \
                "$GO" build -trimpath -o "$tmp_bin" .
        ) >&2 || die "go build failed"
    fi
    chmod 755 "$tmp_bin"
    mv -f "$tmp_bin" "$bin"
    tmp_bin=""
fi

echo "$bin"
