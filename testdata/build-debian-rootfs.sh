#!/usr/bin/env bash
# Build a real Debian root filesystem and pack it as an uncompressed,
# OCI-style layer tar, cached outside the repository.
#
# Usage: testdata/build-debian-rootfs.sh [--with-python3 | --with-gcc | --with-jre
#                                         | --with-nginx] [--force]
#
#   (no option)      debian-bookworm-minbase.tar          (debootstrap --variant=minbase)
#   --with-python3   debian-bookworm-minbase-python3.tar  (same, plus --include=python3)
#   --with-gcc       debian-bookworm-minbase-gcc.tar      (plus gcc and libc6-dev)
#   --with-jre       debian-bookworm-minbase-jre.tar      (plus openjdk-17-jre-headless)
#   --with-nginx     debian-bookworm-minbase-nginx.tar    (plus nginx)
#   --force          rebuild even if the output already exists
#
# The --with-* variants are the start-up benchmark's application layers
# (benchmarks/images.py diffs each against the minbase tar); one at a time.
#
# Output: ${ESTARGZ_CACHE:-$HOME/.cache/estargz-dev}/testdata/<name>.tar
# The path of the output is printed as the last line on stdout; all progress
# goes to stderr.  If the output already exists, its path is printed at once.
#
# Only the layer tar is cached; the debootstrap'd directory is temporary and
# removed on exit, error or Ctrl-C.
#
# Layer format (GNU tar, --format=posix / PAX):
#   * member names are relative WITHOUT a leading "./" (e.g. "usr/bin/bash"),
#     as in layers written by Docker/containerd; there is no entry for the
#     root directory itself;
#   * names sorted bytewise (--sort=name, top-level entries sorted in C locale);
#   * --numeric-owner (uid/gid only, empty uname/gname), --xattrs;
#   * mtimes clamped to SOURCE_DATE_EPOCH (--mtime/--clamp-mtime); atime/ctime
#     are not recorded, PAX header names contain no PID;
#   * proc/, sys/, dev/ are kept as empty directories; apt caches
#     (var/cache/apt/archives/*.deb, var/lib/apt/lists/*) are left out, and so
#     are files that differ from run to run (logs, ldconfig aux-cache, *-old
#     backups) to keep rebuilds as reproducible as possible.
#
# Environment:
#   ESTARGZ_CACHE      cache root (default: $HOME/.cache/estargz-dev)
#   MIRROR             Debian mirror (default: taken from the apt sources,
#                      else http://deb.debian.org/debian)
#   SOURCE_DATE_EPOCH  mtime clamp (default: 1704067200 = 2024-01-01T00:00:00Z)
#
# Needs root (debootstrap), debootstrap and GNU tar >= 1.28.

set -Eeuo pipefail

SUITE=bookworm
ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
CACHE_DIR="${ESTARGZ_CACHE:-$HOME/.cache/estargz-dev}/testdata"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1704067200}"
export LC_ALL=C

log() { printf '[build-debian-rootfs] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2; }

# --- mirror -----------------------------------------------------------------

# Print the URI of the first enabled "deb" source that serves $SUITE, from
# /etc/apt/sources.list (one-line format) or /etc/apt/sources.list.d/*
# (one-line *.list and deb822 *.sources).  Prints nothing if none is found.
detect_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # deb822: paragraphs separated by blank lines.
        awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    key = tolower(line); sub(/:.*/, "", key)
                    val = line; sub(/^[^:]*:[ \t]*/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled == "no") next
                if ((" " types " ") !~ / deb /) next
                if ((" " suites " ") !~ (" " suite " ")) next
                split(uris, u, /[ \t]+/); print u[1]; exit
            }' "$f"
    done
}

# --- cleanup ----------------------------------------------------------------

CLEANUP_PATHS=()

# Unmount anything still mounted below $1 (debootstrap mounts proc/sys in the
# target and may leave them behind when interrupted), deepest first.
unmount_below() {
    local root=$1 mp
    [[ -r /proc/self/mountinfo ]] || return 0
    awk -v root="$root" '
        { mp = $5; gsub(/\\040/, " ", mp)
          if (mp == root || index(mp, root "/") == 1) print mp }' \
        /proc/self/mountinfo | sort -r | while IFS= read -r mp; do
        log "unmounting $mp"
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    done
}

cleanup() {
    local p
    for p in "${CLEANUP_PATHS[@]}"; do
        [[ -e $p || -L $p ]] || continue
        if [[ -d $p ]]; then
            unmount_below "$p"
            rm -rf --one-file-system -- "$p"
        else
            rm -f -- "$p"
        fi
    done
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

# --- layer building -------------------------------------------------------------

# Remove files whose content depends on when/where the bootstrap ran.
fixup_tree() {
    local root=$1
    rm -f "$root"/var/log/bootstrap.log \
          "$root"/var/log/dpkg.log \
          "$root"/var/log/alternatives.log \
          "$root"/var/log/apt/*.log \
          "$root"/var/cache/ldconfig/aux-cache \
          "$root"/var/cache/debconf/*-old \
          "$root"/var/lib/dpkg/*-old
    # No machine identity in an image layer (systemd creates it on first boot).
    if [[ -e $root/etc/machine-id ]]; then : >"$root/etc/machine-id"; fi
}

# Pack directory $1 into layer tar $2.
pack_layer() {
    local root=$1 out=$2
    local -a top
    mapfile -t top < <(cd "$root" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | sort)
    [[ ${#top[@]} -gt 0 ]] || die "empty root filesystem: $root"
    tar --create --file="$out" \
        --directory="$root" \
        --format=posix \
        --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' \
        --sort=name \
        --numeric-owner \
        --xattrs \
        --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime \
        --one-file-system \
        --anchored --wildcards \
        --exclude='proc/*' \
        --exclude='sys/*' \
        --exclude='dev/*' \
        --exclude='var/cache/apt/archives/*.deb' \
        --exclude='var/lib/apt/lists/*' \
        -- "${top[@]}"
}

# build_layer NAME [EXTRA_DEBOOTSTRAP_ARGS...]
# Builds $CACHE_DIR/NAME.tar unless it exists (or --force); prints its path.
build_layer() {
    local name=$1; shift
    local out="$CACHE_DIR/$name.tar"

    if [[ -e $out && $FORCE -eq 0 ]]; then
        printf '%s\n' "$out"
        return 0
    fi

    mkdir -p "$CACHE_DIR"
    # The tree lives next to the cache (not in /tmp, which may be tmpfs or
    # mounted nodev/noexec); the tar is written under a temporary name in the
    # final directory and renamed into place.
    local tree tmp_tar
    tree=$(mktemp -d "$CACHE_DIR/.$name.rootfs.XXXXXX")
    CLEANUP_PATHS+=("$tree")
    tmp_tar=$(mktemp "$CACHE_DIR/.$name.tar.XXXXXX")
    CLEANUP_PATHS+=("$tmp_tar")

    local mirror=${MIRROR:-$(detect_mirror | head -n1)}
    mirror=${mirror:-http://deb.debian.org/debian}

    log "debootstrap --variant=minbase $* $SUITE ($ARCH) from $mirror"
    log "  into $tree"
    local t0=$SECONDS
    # debootstrap writes progress to stdout; keep stdout for the result path.
    debootstrap --variant=minbase --arch="$ARCH" "$@" \
        "$SUITE" "$tree" "$mirror" >&2
    log "debootstrap done in $((SECONDS - t0)) s"

    unmount_below "$tree"
    fixup_tree "$tree"

    log "packing layer"
    t0=$SECONDS
    pack_layer "$tree" "$tmp_tar"
    chmod 0644 "$tmp_tar"
    mv -f -- "$tmp_tar" "$out"
    log "packed in $((SECONDS - t0)) s: $(du -h "$out" | cut -f1)"

    rm -rf --one-file-system -- "$tree"
    printf '%s\n' "$out"
}

# --- main -------------------------------------------------------------------

FORCE=0
WITH=""       # name suffix of the variant
INCLUDE=""    # its extra packages (debootstrap --include)
with() {
    [[ -z $WITH ]] || die "--with-$WITH and --with-$1 given; build one variant at a time"
    WITH=$1 INCLUDE=$2
}
while [[ $# -gt 0 ]]; do
    case $1 in
        --with-python3) with python3 python3 ;;
        --with-gcc) with gcc gcc,libc6-dev ;;
        --with-jre) with jre openjdk-17-jre-headless ;;
        --with-nginx) with nginx nginx ;;
        --force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
    shift
done

if [[ -n $WITH ]]; then
    set -- debian-$SUITE-minbase-$WITH --include="$INCLUDE"
else
    set -- debian-$SUITE-minbase
fi

# Fast path before any tool checks: cached output.
if [[ $FORCE -eq 0 && -e $CACHE_DIR/$1.tar ]]; then
    printf '%s\n' "$CACHE_DIR/$1.tar"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap needs it)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar required"

build_layer "$@"
