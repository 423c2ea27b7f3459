#!/usr/bin/env bash
# Build the oras CLI (oras.land/oras), an independent OCI 1.1 client, for the
# tests that check our record artifacts the way other tools see them
# (`oras discover`, `oras pull`, `oras attach`). Built once from the Go module
# proxy with the Go on PATH into ${ESTARGZ_CACHE:-~/.cache/estargz-dev}/bin;
# prints the binary's path on the last line.
set -euo pipefail

version=v1.3.6
cache_dir="${ESTARGZ_CACHE:-$HOME/.cache/estargz-dev}"
bin="$cache_dir/bin/oras-$version"
if [ ! -x "$bin" ]; then
    command -v go >/dev/null || { echo "build-oras: no go on PATH" >&2; exit 1; }
    work=$(mktemp -d "${TMPDIR:-/tmp}/oras-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$cache_dir/bin"
    # In an empty directory: no go.mod of ours is involved.
    (cd "$work" && GOBIN="$work/bin" GOFLAGS="-modcacherw -buildvcs=false" CGO_ENABLED=0 \
        GOMODCACHE="${GOMODCACHE:-$cache_dir/go-mod}" \
        GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}" \
        go install "oras.land/oras/cmd/oras@$version") >&2
    mv "$work/bin/oras" "$bin.tmp" && mv "$bin.tmp" "$bin"
fi
echo "$bin"
