#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine:
# the reference implementation and its Go sources (for the interop harness),
# the tools the tests drive (GNU tar, gzip, zstd, pigz, debootstrap), and tox.
# Idempotent; needs root (or sudo) for apt.
set -euo pipefail

APT_PACKAGES=(
  # the reference: ctr-remote, the spec, and the Go package our harness builds against
  stargz-snapshotter golang-go golang-github-containerd-stargz-snapshotter-dev
  golang-github-klauspost-compress-dev golang-github-cespare-xxhash-dev
  golang-github-opencontainers-go-digest-dev golang-github-vbatts-tar-split-dev
  golang-golang-x-sync-dev
  # the Stargz Snapshotter daemon our lazy-pull tests build from Debian's 0.12
  # sources (scripts/build-go.sh stargz-snapshotter-debian); v0.18 comes from the
  # Go module proxy with the Go on PATH
  golang-github-containerd-containerd-dev golang-github-burntsushi-toml-dev
  golang-google-grpc-dev golang-github-hashicorp-go-retryablehttp-dev
  golang-github-hanwen-go-fuse-dev
  # the SOCI tools (scripts/build-go.sh): their zTOC code is cgo over zlib
  gcc libc6-dev zlib1g-dev
  # tools the tests and benchmarks run (setpriv, useradd and pgrep: the rootless
  # tests run estargz as an account they create)
  tar gzip zstd pigz debootstrap python3-venv util-linux passwd procps
  # real image tooling and daemons the image tests start on private sockets
  docker-registry skopeo umoci containerd runc crun docker.io busybox-static
  # Docker's default seccomp profile, which container/seccomp.json extends
  golang-github-docker-docker-dev
  # soci's zTOC code is cgo over zlib (scripts/build-go.sh soci-ztoc)
  gcc libc6-dev zlib1g-dev
  # podman pulls our zstd:chunked images partially (tests/test_podman_zstdchunked.py)
  podman
  # the profiling report is checked in a real browser
  chromium
  # the order of fsync and rename calls writing an OCI layout (tests/test_crash_safety.py)
  strace
)

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" >&2
fi

PY=${PYTHON:-python3}
"$PY" -m tox --version >/dev/null 2>&1 || "$PY" -m pip install -q 'tox>=4' >&2
