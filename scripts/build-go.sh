#!/bin/sh
# Build one of the Go programs the tests and benchmarks run into a cache dir
# and print the binary's path as the last line of stdout.
#
#   scripts/build-go.sh TARGET                 # -> ~/.cache/estargz-dev/bin/...
#   ESTARGZ_CACHE=/tmp/c scripts/build-go.sh TARGET
#
# Targets (tests/gobuild.py runs this for the Python side):
#
#   goref                      tests/interop/goref: a CLI over the reference
#                              estargz package, Debian's 0.12 sources
#   goref-v018                 the same CLI with tests/interop/goref-v018's
#                              subcommands, over the reference v0.18
#                              (min-chunk-size, external TOC, keep-diff-id,
#                              zstd:chunked)
#   stargz-snapshotter-v018    tests/lazypull/snapshotter-v018: the Stargz
#                              Snapshotter v0.18 as a containerd proxy plugin
#   stargz-snapshotter-debian  tests/lazypull/snapshotter-debian: the same
#                              over Debian's 0.12 sources
#   storage-chunked            tests/interop/storage-chunked: containers/storage
#                              applying a zstd:chunked blob as a partial pull
#   referrers-registry         tests/interop/referrers-registry:
#                              go-containerregistry's registry with the OCI
#                              1.1 referrers API
#   soci, soci-snapshotter     soci-snapshotter v0.16.1's `soci` CLI and
#                              soci-snapshotter-grpc (tests/lazypull/soci-v016)
#   soci-rpull                 tests/lazypull/soci-v016/rpull: containerd's Go
#                              client pulling with a remote snapshotter's
#                              labels, as `soci image rpull` did before v0.10
#   containerd-v2              containerd 2 (tests/lazypull/containerd-v2):
#                              containerd, ctr and containerd-shim-runc-v2 in
#                              bin/containerd-v2/ (a shim is found beside
#                              containerd); soci needs it, as containerd 1.6
#                              does not pass the namespace to a proxy plugin
#   soci-ztoc                  tests/interop/soci-ztoc: soci v0.16.1's zTOC
#                              packages as a checker of the zTOCs we write
#   oras                       the oras CLI (oras.land/oras v1.3.6)
#
# Two ways to build:
# - Debian's packaged sources (goref, stargz-snapshotter-debian) have no
#   go.mod: GOPATH mode with Debian's own Go 1.19, no network.
# - Everything else: module mode with the committed go.mod/go.sum
#   (-mod=readonly: go fetches exactly what they pin and never edits them)
#   through the Go module proxy.  Why our own modules and not `go install
#   .../cmd/X@version`: those cmd modules carry `replace` directives, which
#   Go honours only in the main module, so ours require them and repeat the
#   replaces.  The Go is the one on PATH if it is as new as the go.mod's
#   `go` line, else Go $toolchain fetched from the module proxy as
#   golang.org/toolchain with Debian's go.  Modules and the build cache live
#   under the cache dir, so only the first build downloads.
#
# A binary's name carries a hash of what it is built from: this script, the
# target, our sources and (for Debian's) the packaged library's files and
# times, so a change of any (an edit, a checkout, an apt upgrade) builds a
# new one, and two checkouts sharing the cache (worktrees, a CI clone beside
# a working tree) never run each other's.  Runs are safe concurrently: each
# builds into its own temp file and atomically renames it into place.
# Builds of other hashes unused for a week are removed.
set -eu

die() {
    echo "build-go: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 TARGET (see the comment at its top)"
target=$1

script=$(readlink -f -- "$0" 2>/dev/null) || script=$0
repo=$(CDPATH= cd -- "$(dirname -- "$script")/.." && pwd) ||
    die "cannot locate the repository from $0"
interop="$repo/tests/interop"
lazypull="$repo/tests/lazypull"

cache_dir="${ESTARGZ_CACHE:-${HOME:?HOME is not set and ESTARGZ_CACHE is empty}/.cache/estargz-dev}"
bin_dir="$cache_dir/bin"
mkdir -p "$bin_dir" || die "cannot create cache dir $bin_dir (set ESTARGZ_CACHE to a writable dir)"
gomodcache="${GOMODCACHE:-$cache_dir/go-mod}"
gocache="${GOCACHE:-$cache_dir/go-build}"
goproxy="${GOPROXY:-https://proxy.golang.org,direct}"
gocode=/usr/share/gocode
debian_go=${GO_DEBIAN:-/usr/lib/go-1.19/bin/go}
# The Go fetched when the one on PATH is older than a go.mod needs: as new as
# the newest `go` line of our modules.
toolchain=go1.26.6

# What each target sets:
#   mode     gopath | module | install
#   src      the directory built in (module), or holding main.go (gopath)
#   files    files copied together into a temp module (module mode, when the
#            program spans directories); empty: build in $src
#   package  what `go build` is given (module mode); install: PKG@VERSION
#   names    the binaries, below bin/ (the first is printed)
#   sources  our files whose change means a rebuild
#   watch    packaged files whose change means a rebuild (gopath)
#   cgo tags ldflags
mode=module files="" package=. cgo=0 tags="" ldflags="" watch=""
soci_version=v0.16.1
soci_revision=61147fe7c929
soci_ldflags="-X github.com/awslabs/soci-snapshotter/version.Version=$soci_version"
soci_ldflags="$soci_ldflags -X github.com/awslabs/soci-snapshotter/version.Revision=$soci_revision"
stargz_pkg="$gocode/src/github.com/containerd/stargz-snapshotter"
debian_pkgs="golang-go golang-github-containerd-stargz-snapshotter-dev golang-github-containerd-containerd-dev golang-github-burntsushi-toml-dev golang-google-grpc-dev golang-github-hashicorp-go-retryablehttp-dev golang-github-klauspost-compress-dev golang-github-opencontainers-go-digest-dev golang-github-vbatts-tar-split-dev golang-golang-x-sync-dev"

case "$target" in
    goref)
        mode=gopath src="$interop/goref" names=goref
        watch="$stargz_pkg/estargz/*.go"
        ;;
    goref-v018)
        src="$interop/goref-v018" names=goref-v018
        files="$interop/goref/main.go $src/v018.go $src/zstdchunked.go $src/go.mod $src/go.sum"
        ;;
    stargz-snapshotter-v018)
        src="$lazypull/snapshotter-v018" names=containerd-stargz-grpc-v018
        ;;
    stargz-snapshotter-debian)
        mode=gopath src="$lazypull/snapshotter-debian" names=containerd-stargz-grpc-debian
        watch="$stargz_pkg/fs/*.go $stargz_pkg/fs/*/*.go $stargz_pkg/snapshot/*.go"
        ;;
    storage-chunked)
        src="$interop/storage-chunked" names=storage-chunked
        # No cgo: leave out the graph drivers that need it.
        tags="exclude_graphdriver_btrfs exclude_graphdriver_devicemapper"
        ;;
    referrers-registry)
        src="$interop/referrers-registry" names=referrers-registry
        ;;
    soci|soci-snapshotter)
        src="$lazypull/soci-v016" cgo=1 ldflags=$soci_ldflags
        package=github.com/awslabs/soci-snapshotter/cmd/$target
        [ "$target" = soci ] || package=${package}-grpc
        names=$(basename "$package")-v016
        ;;
    soci-rpull)
        src="$lazypull/soci-v016" cgo=1 ldflags=$soci_ldflags package=./rpull
        names=soci-rpull-v016
        ;;
    containerd-v2)
        src="$lazypull/containerd-v2"
        # One package per binary: .../cmd/NAME.
        package=github.com/containerd/containerd/v2/cmd
        names="containerd-v2/containerd containerd-v2/ctr containerd-v2/containerd-shim-runc-v2"
        # btrfs would need cgo and its headers; cli docs are not needed.
        tags="urfave_cli_no_docs no_btrfs"
        ldflags="-X github.com/containerd/containerd/v2/version.Version=$(
            sed -n 's/^require github.com\/containerd\/containerd\/v2 //p' "$src/go.mod")"
        ;;
    soci-ztoc)
        # The zTOC code is cgo over zlib (linked with -l:libz.a).
        src="$interop/soci-ztoc" names=soci-ztoc cgo=1
        ;;
    oras)
        mode=install package=oras.land/oras/cmd/oras@v1.3.6 names=oras-v1.3.6 src=""
        ;;
    *)
        die "unknown target '$target' (see the comment at the top of $0)"
        ;;
esac
if [ "$mode" = module ] && [ -z "$files" ]; then
    sources=$(find "$src" -name '*.go' -o -name go.mod -o -name go.sum | sort)
else
    sources="$files"
fi
[ "$mode" != gopath ] || sources="$src/main.go"
[ "$mode" != module ] || [ -f "$src/go.mod" ] || die "missing $src/go.mod"
for f in $sources; do
    [ -f "$f" ] || die "missing $f"
done

# The key: what the binary is built from (file names relative to the
# repository, so that two clones of one revision share a build).
key=$(
    {
        echo "$target"
        cat "$script"
        for f in $sources; do
            echo "${f#"$repo"/}"
            cat "$f"
        done
        # Debian's library: its files' names, sizes and times suffice.
        [ -z "$watch" ] || ls -l --time-style=+%s $watch 2>/dev/null
    } | sha256sum | cut -c1-12
)
# Where binary $1 of $names goes: NAME-KEY, or DIR-KEY/NAME for one of a set
# that must sit together (containerd and its shim).
keyed() {
    case "$1" in
        */*) echo "$bin_dir/${1%%/*}-$key/${1#*/}" ;;
        *) echo "$bin_dir/$1-$key" ;;
    esac
}
needs_build() {
    for n in $names; do
        [ -x "$(keyed "$n")" ] || return 0
    done
    return 1
}
if ! needs_build; then
    set -- $names
    keyed "$1"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/build-go.XXXXXX")
tmp_bin=""
cleanup() {
    rm -rf "$work"
    [ -z "$tmp_bin" ] || rm -f "$tmp_bin"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

go_minor() { "$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p'; }

# Sets GO: for GOPATH mode Debian's own toolchain (the packaged sources are
# of its era), else a Go at least as new as the go.mod's `go` line.
pick_go() {
    if [ "$mode" = gopath ]; then
        GO=$debian_go
        [ -x "$GO" ] ||
            die "Debian's Go toolchain not found at $GO; install it with: apt-get install $debian_pkgs"
        [ -d "$stargz_pkg" ] ||
            die "Debian's stargz-snapshotter sources not found at $stargz_pkg; install them with: apt-get install $debian_pkgs"
        return
    fi
    need=0
    [ "$mode" != module ] ||
        need=$(sed -n 's/^go 1\.\([0-9]*\).*/\1/p' "$src/go.mod")
    GO=${GO_MODULES:-go}
    if command -v "$GO" >/dev/null 2>&1 && [ "$(go_minor "$GO")" -ge "${need:-0}" ] 2>/dev/null; then
        return
    fi
    [ -x "$debian_go" ] ||
        die "no Go >= 1.$need on PATH, and no Debian Go at $debian_go to fetch one (apt-get install golang-go)"
    module="golang.org/toolchain@v0.0.1-$toolchain.linux-$("$debian_go" env GOARCH)"
    dir="$gomodcache/$module"
    if [ ! -x "$dir/bin/go" ]; then
        echo "build-go: no Go >= 1.$need on PATH; fetching $module" >&2
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

if [ "$cgo" = 1 ]; then
    command -v "${CC:-gcc}" >/dev/null 2>&1 ||
        die "no C compiler (${CC:-gcc}) for $target's cgo zlib code; apt-get install gcc libc6-dev zlib1g-dev"
    [ -f /usr/include/zlib.h ] ||
        die "no zlib headers for $target's cgo zlib code; apt-get install zlib1g-dev"
fi
pick_go

for n in $names; do
    bin=$(keyed "$n")
    mkdir -p "$(dirname "$bin")" || die "cannot create $(dirname "$bin")"
    pkg=$package
    [ "$target" != containerd-v2 ] || pkg="$package/$(basename "$n")"
    # Temp file in the destination dir so the final mv is an atomic rename.
    tmp_bin=$(mktemp "$(dirname "$bin")/.$(basename "$n").XXXXXX")
    echo "build-go: building $bin" >&2
    case "$mode" in
        gopath)
            # A private GOPATH whose src/ holds only our program; the
            # dependencies come from the second entry, Debian's
            # /usr/share/gocode.  GOFLAGS is cleared so a user's -mod=...
            # cannot break GOPATH mode.
            mkdir -p "$work/src/$target"
            cp "$src/main.go" "$work/src/$target/main.go"
            (
                cd "$work/src/$target"
                GOPATH="$work:$gocode" GO111MODULE=off GOFLAGS= GOPROXY=off \
                    CGO_ENABLED=0 GOCACHE="$gocache" \
                    "$GO" build -trimpath -o "$tmp_bin" .
            ) >&2 || die "go build failed"
            ;;
        module)
            dir=$src
            if [ -n "$files" ]; then
                dir="$work/module"
                mkdir -p "$dir"
                cp $files "$dir/"
            fi
            # GOTOOLCHAIN=local: never download another Go behind our back;
            # -modcacherw: a cache dir the user can simply delete.
            (
                cd "$dir"
                GOMODCACHE="$gomodcache" GOCACHE="$gocache" \
                    GOFLAGS="-mod=readonly -modcacherw -buildvcs=false" GO111MODULE=on \
                    GOTOOLCHAIN=local GOPROXY="$goproxy" CGO_ENABLED="$cgo" \
                    "$GO" build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$tmp_bin" "$pkg"
            ) >&2 || die "go build failed"
            ;;
        install)
            # In an empty directory: no go.mod of ours is involved.
            (
                cd "$work"
                GOBIN="$work/bin" GOMODCACHE="$gomodcache" GOCACHE="$gocache" \
                    GOFLAGS="-modcacherw -buildvcs=false" GOPROXY="$goproxy" CGO_ENABLED=0 \
                    "$GO" install "$pkg"
            ) >&2 || die "go install failed"
            mv -f "$work/bin/$(basename "${pkg%@*}")" "$tmp_bin"
            ;;
    esac
    chmod 755 "$tmp_bin"
    mv -f "$tmp_bin" "$bin"
    tmp_bin=""
done

# Builds of other keys unused for a week: gone (a running one keeps its inode).
for n in $names; do
    stem=${n%%/*}
    find "$bin_dir" -mindepth 1 -maxdepth 1 -name "$stem-????????????" ! -name "$stem-$key" \
        -atime +7 -exec rm -rf {} + 2>/dev/null || true
done

set -- $names
keyed "$1"
