"""Assembling an image's root filesystem: profiler/rootfs (extraction, overlay, layer map).

* extraction fidelity: every entry kind, modes, owners, exact mtimes, xattrs,
  hardlinks, devices, sparse files, gzip and zstd input, identical to GNU tar
  on a real Debian layer;
* whiteouts and opaque directories at several ancestor levels, mounted with
  overlayfs: what the kernel shows must be what ``layer_for`` says, path by
  path;
* hostile layers (``..``, absolute names, symlinks and hardlinks pointing
  out): nothing outside the destination is created or changed -- a canary
  directory beside it is compared before and after -- and each case has a
  documented outcome (refused, or extracted inside);
* the layer map: deep whiteouts, opacity, symlink resolution, prioritized
  lists;
* the debian-python3 test image assembles, runs python3 under chroot, and
  maps python3.11 to layer 1 and libc to layer 0;
* :class:`OverlayRoot` leaves no mount and no scratch directory behind, when
  the body raises, on Ctrl-C (even during the clean-up), with a busy mount,
  and with more layers than one page of mount options holds.

Everything that extracts or mounts needs root; the layer map tests do not.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import BinaryIO

import pytest

from conftest import REPO, Spec, build_tar, sparse_content, sparse_tar
from daemons import mounts_under
from estargz import (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    Descriptor,
    EstargzError,
    ImageSource,
    InvalidInput,
    StorageError,
    UnsupportedEntry,
    copy_verified,
    open_source,
    parse_reference,
    sha256_digest,
)
from profiler.rootfs import (
    LayerListing,
    OverlayRoot,
    assemble_image_rootfs,
    extract_layer,
    layer_for,
    link_targets,
    normalize,
    prioritized_lists,
    remove_tree,
    resolve,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown, mount)")

DIR, SYM, LNK = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
CHR, BLK, FIFO = tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE


# --- helpers ---------------------------------------------------------------------------

def layer(tmp_path: Path, specs: list[Spec], name: str = "layer.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(build_tar(specs))
    return path


def d(name: str, mode: int = 0o755, **kw) -> Spec:
    return Spec(name, DIR, mode=mode, **kw)


def f(name: str, data: bytes = b"", mode: int = 0o644, **kw) -> Spec:
    return Spec(name, data=data, mode=mode, **kw)


def wh(name: str) -> Spec:
    """A whiteout entry for ``name`` (``dir/.wh.base``)."""
    parent, _, base = name.rpartition("/")
    return f(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opq(dirname: str) -> Spec:
    return f(f"{dirname}/.wh..wh..opq" if dirname else ".wh..wh..opq")


class BlobSource(ImageSource):
    """Blobs held in memory: no local path, so every layer goes through
    ``fetch_blob`` (verified) as a registry's would."""

    name = "test blobs"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fetches = 0

    def add(self, data: bytes, media_type: str = OCI_LAYER) -> Descriptor:
        desc = Descriptor(media_type, sha256_digest(data), len(data))
        self.blobs[desc.digest] = data
        return desc

    def root(self) -> tuple[bytes, str]:
        raise NotImplementedError

    def get_manifest(self, desc: Descriptor) -> bytes:
        raise NotImplementedError

    def fetch_blob(self, desc: Descriptor, dst: BinaryIO) -> None:
        self.fetches += 1
        copy_verified(io.BytesIO(self.blobs[desc.digest]), dst, desc, self.name)


def mount_options(mountpoint: str) -> str:
    """The superblock options of the mount at ``mountpoint`` (mountinfo)."""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == mountpoint:
                return fields[5] + " " + fields[-1]
    raise AssertionError(f"{mountpoint} is not mounted")


def snapshot(root: Path) -> dict:
    """Everything about every file below ``root``, symlinks not followed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            extra: str | None
            if stat.S_ISLNK(st.st_mode):
                extra, xattrs = os.readlink(p), {}
            else:
                extra = (hashlib.sha256(Path(p).read_bytes()).hexdigest()
                         if stat.S_ISREG(st.st_mode) else None)
                xattrs = {k: os.getxattr(p, k) for k in os.listxattr(p)}
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                             st.st_ctime_ns, st.st_nlink, st.st_size,
                                             st.st_rdev, extra, xattrs)
    return out


def visible_files(root: str) -> dict[str, str]:
    """Relative path -> content (``dir``, ``->target``) of the merged view."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "->" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = Path(p).read_text()
    return out


# --- extraction fidelity -------------------------------------------------------------

@needs_root
def test_every_kind_is_extracted_faithfully(tmp_path):
    xattr_cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    specs = [
        d("./", 0o751, mtime=1_600_000_000),
        d("etc/", 0o755, uid=1, gid=2, mtime=1_500_000_000),
        f("etc/small", b"hello\n", 0o640, uid=1000, gid=1001, mtime=1_700_000_000.75),
        f("etc/suid", b"#!/bin/sh\n", 0o4755, uid=0, gid=50),
        f("etc/empty", b"", 0o600, mtime=0),
        Spec("etc/symlink", SYM, linkname="small", uid=7, gid=8, mtime=1_650_000_000),
        Spec("etc/abs-symlink", SYM, linkname="/etc/small"),
        Spec("etc/dangling", SYM, linkname="../nowhere/at/all"),
        Spec("etc/hardlink", LNK, linkname="etc/small"),
        Spec("etc/hardlink-abs", LNK, linkname="/etc/small"),
        d("dev/"),
        Spec("dev/null", CHR, mode=0o666, devmajor=1, devminor=3),
        Spec("dev/loop0", BLK, mode=0o660, devmajor=7, devminor=0, gid=6),
        Spec("dev/fifo", FIFO, mode=0o620),
        f("etc/xattrs", b"x", pax={
            "SCHILY.xattr.user.comment": "hi",
            "SCHILY.xattr.trusted.binary": b"\x00\xff\x01".decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.security.capability": xattr_cap.decode("utf-8", "surrogateescape")}),
        d("ro/", 0o555),
        f("ro/inside", b"written before the directory went read-only"),
        f("deep/" + "/".join(f"segment{i:02d}" for i in range(30)) + "/file", b"deep"),
        f("etc/ünïcødé-名前", b"unicode"),
        f("etc/bigid", b"id", uid=3_000_000, gid=4_000_000),
    ]
    dest = tmp_path / "out"
    listing = extract_layer(str(layer(tmp_path, specs)), str(dest))

    def st(rel: str) -> os.stat_result:
        return os.lstat(dest / rel)

    assert stat.S_IMODE(st(".").st_mode) == 0o751
    assert st(".").st_mtime_ns == 1_600_000_000 * 10**9
    assert (st("etc").st_uid, st("etc").st_gid, st("etc").st_mtime) == (1, 2, 1_500_000_000)
    s = st("etc/small")
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) == (0o640, 1000, 1001)
    assert s.st_mtime_ns == 1_700_000_000_750_000_000  # the PAX fraction, exactly
    assert (dest / "etc/small").read_bytes() == b"hello\n"
    assert stat.S_IMODE(st("etc/suid").st_mode) == 0o4755 and st("etc/suid").st_gid == 50
    assert st("etc/empty").st_mtime == 0 and st("etc/empty").st_size == 0
    assert os.readlink(dest / "etc/symlink") == "small"
    assert (st("etc/symlink").st_uid, st("etc/symlink").st_gid) == (7, 8)
    assert st("etc/symlink").st_mtime == 1_650_000_000
    assert os.readlink(dest / "etc/abs-symlink") == "/etc/small"  # stored as-is
    assert os.readlink(dest / "etc/dangling") == "../nowhere/at/all"
    assert st("etc/hardlink").st_ino == st("etc/hardlink-abs").st_ino == s.st_ino
    assert s.st_nlink == 3
    assert stat.S_ISCHR(st("dev/null").st_mode) and st("dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st("dev/null").st_mode) == 0o666
    assert stat.S_ISBLK(st("dev/loop0").st_mode) and st("dev/loop0").st_rdev == os.makedev(7, 0)
    assert st("dev/loop0").st_gid == 6 and stat.S_IMODE(st("dev/loop0").st_mode) == 0o660
    assert stat.S_ISFIFO(st("dev/fifo").st_mode) and stat.S_IMODE(st("dev/fifo").st_mode) == 0o620
    x = dest / "etc/xattrs"
    assert os.getxattr(x, "user.comment") == b"hi"
    assert os.getxattr(x, "trusted.binary") == b"\x00\xff\x01"
    assert os.getxattr(x, "security.capability") == xattr_cap
    assert stat.S_IMODE(st("ro").st_mode) == 0o555 and (dest / "ro/inside").exists()
    assert (dest / "etc/ünïcødé-名前").read_bytes() == b"unicode"
    assert (st("etc/bigid").st_uid, st("etc/bigid").st_gid) == (3_000_000, 4_000_000)

    assert listing.kinds["etc/small"] == "reg" and listing.kinds["etc"] == "dir"
    assert listing.kinds["etc/symlink"] == "symlink" and listing.symlinks["etc/symlink"] == "small"
    assert listing.kinds["etc/hardlink"] == "hardlink"
    assert listing.hardlinks == {"etc/hardlink": "etc/small", "etc/hardlink-abs": "etc/small"}
    assert (listing.kinds["dev/null"], listing.kinds["dev/loop0"],
            listing.kinds["dev/fifo"]) == ("char", "block", "fifo")
    assert "" not in listing.kinds  # the root is never listed
    # Parents of the deep file have no entries: implied, 0755.
    assert "deep" in listing.implicit_dirs and "deep" not in listing.kinds
    assert stat.S_IMODE(st("deep/segment00").st_mode) == 0o755
    assert not listing.whiteouts and not listing.opaque_dirs


@needs_root
def test_same_tree_as_gnu_tar_on_a_real_debian_layer(tmp_path, debian_layer):
    """Every file, mode, owner, mtime (ns), size, device, link and content of
    the Debian minbase layer, compared with GNU tar's extraction."""
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    listing = extract_layer(str(debian_layer), str(ours))
    gnu.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                    str(debian_layer), "-C", str(gnu)], check=True)
    a, b = snapshot(ours), snapshot(gnu)

    def strip(snap: dict) -> dict:  # ctime is when we wrote it; "." has no entry
        return {k: v[:4] + v[5:] for k, v in snap.items() if k != "."}
    assert strip(a) == strip(b)
    assert len(listing.kinds) == len(a) - 1 > 6000
    assert listing.symlinks["bin"] == "usr/bin"


@needs_root
def test_sparse_gzip_and_zstd_layers(tmp_path):
    tar = tmp_path / "sparse.tar"
    tar.write_bytes(sparse_tar(tmp_path, 64 << 20))
    expected = sparse_content(64 << 20)
    assert tar.stat().st_size < 1 << 20  # GNU sparse 1.0 entries
    out = tmp_path / "out"
    extract_layer(str(tar), str(out))
    assert (out / "sparse").read_bytes() == expected
    assert (out / "sparse").stat().st_blocks * 512 < 1 << 20  # holes stay holes

    import zstandard
    for name, data in (("gz", gzip.compress(tar.read_bytes())),
                       ("zst", zstandard.ZstdCompressor().compress(tar.read_bytes()))):
        (tmp_path / f"layer.{name}").write_bytes(data)
        extract_layer(str(tmp_path / f"layer.{name}"), str(tmp_path / name),
                      spool_dir=str(tmp_path))
        assert (tmp_path / name / "plain").read_bytes() == b"plain\n" * 1000
        assert (tmp_path / name / "sparse").read_bytes() == expected


@needs_root
def test_later_entries_replace_earlier_ones(tmp_path):
    specs = [
        f("a", b"file first"), d("a/"), f("a/child", b"c"),      # file -> dir
        d("b/"), f("b/x", b"x"), d("b/sub/"), f("b/sub/y", b"y"),
        f("b", b"file now"),                                     # dir tree -> file
        d("c/"), f("c/keep", b"kept"), d("c/", 0o700, mtime=5),  # dir -> dir: children stay
        Spec("s", SYM, linkname="a"), f("s", b"no longer a link"),
        f("dup", b"one"), f("dup", b"two"),
    ]
    out = tmp_path / "out"
    listing = extract_layer(str(layer(tmp_path, specs)), str(out))
    assert (out / "a/child").read_bytes() == b"c"
    assert (out / "b").read_bytes() == b"file now"
    assert (out / "c/keep").read_bytes() == b"kept"
    assert stat.S_IMODE((out / "c").stat().st_mode) == 0o700 and (out / "c").stat().st_mtime == 5
    assert not (out / "s").is_symlink() and (out / "s").read_bytes() == b"no longer a link"
    assert (out / "dup").read_bytes() == b"two"
    assert listing.kinds["b"] == "reg"
    assert not any(k.startswith("b/") for k in listing.kinds)
    assert listing.kinds["s"] == "reg" and "s" not in listing.symlinks


@needs_root
def test_implied_parents_take_the_lower_layers_metadata(tmp_path):
    lower = tmp_path / "l0"
    l0 = extract_layer(str(layer(tmp_path, [d("usr/", 0o750, uid=3, gid=4, mtime=111),
                                            d("usr/local/", 0o705, mtime=222)], "0.tar")),
                       str(lower))
    upper = tmp_path / "l1"
    l1 = extract_layer(str(layer(tmp_path, [f("usr/local/bin/tool", b"t"), f("new/dir/x")],
                                 "1.tar")), str(upper), lowers=[(str(lower), l0)])
    assert l1.implicit_dirs == {"usr", "usr/local", "usr/local/bin", "new", "new/dir"}
    s = (upper / "usr").stat()
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime) == (0o750, 3, 4, 111)
    s = (upper / "usr/local").stat()
    assert (stat.S_IMODE(s.st_mode), s.st_mtime) == (0o705, 222)
    # No lower directory: 0755 root, as containerd's applier makes them.
    for p in ("usr/local/bin", "new", "new/dir"):
        s = (upper / p).stat()
        assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) == (0o755, 0, 0)
    # Below an opaque directory the lower ones are hidden: nothing to copy.
    other = tmp_path / "l1b"
    extract_layer(str(layer(tmp_path, [opq("usr"), f("usr/local/x")], "1b.tar")), str(other),
                  lowers=[(str(lower), l0)])
    assert stat.S_IMODE((other / "usr").stat().st_mode) == 0o750
    assert stat.S_IMODE((other / "usr/local").stat().st_mode) == 0o755


@needs_root
def test_overlay_and_aufs_metadata_from_the_tar_is_not_honoured(tmp_path):
    specs = [d("dir/", pax={"SCHILY.xattr.trusted.overlay.opaque": "y",
                            "SCHILY.xattr.trusted.overlay.redirect": "/elsewhere"}),
             f("dir/f"), f(".wh..wh.plnk"), d(".wh..wh.orph/"), f(".wh..wh.orph/x"),
             opq(".wh..wh.orph")]
    out = tmp_path / "out"
    listing = extract_layer(str(layer(tmp_path, specs)), str(out))
    assert "trusted.overlay.opaque" not in os.listxattr(out / "dir")
    assert {x[1] for x in listing.skipped_xattrs} == {"trusted.overlay.opaque",
                                                       "trusted.overlay.redirect"}
    assert not listing.opaque_dirs
    assert sorted(os.listdir(out)) == ["dir"]


@needs_root
def test_deep_trees_long_names_and_out_of_range_values(tmp_path):
    """No recursion, no traceback: a 1 500-deep tree is built, replaced by a
    file and cleaned up; a name past PATH_MAX and values the kernel cannot
    take are clean errors."""
    deep = "/".join(["d"] * 1500)
    specs = [f(deep + "/leaf", b"bottom"), f("d", b"a file replaces the whole tree")]
    out = tmp_path / "out"
    listing = extract_layer(str(layer(tmp_path, specs)), str(out))
    assert (out / "d").read_bytes() == b"a file replaces the whole tree"
    assert listing.kinds == {"d": "reg"} and not listing.implicit_dirs

    keep = tmp_path / "keep"
    extract_layer(str(layer(tmp_path, [f(deep + "/leaf", b"bottom")])), str(keep))
    remove_tree(str(keep))
    assert not keep.exists()

    with pytest.raises(UnsupportedEntry, match="PATH_MAX"):
        extract_layer(str(layer(tmp_path, [f("x/" * 2100 + "y")])), str(tmp_path / "o1"))
    # Refused by the one tar walk, before anything is written (issue 11).
    with pytest.raises(InvalidInput, match="uid 1099511627776 is outside"):
        extract_layer(str(layer(tmp_path, [f("big-uid", uid=2**40)])), str(tmp_path / "o2"))
    with pytest.raises(InvalidInput, match="NUL"):
        extract_layer(str(layer(tmp_path, [Spec("nul", SYM, linkname="x",
                                                pax={"linkpath": "a\x00b"})])),
                      str(tmp_path / "o3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tar", "out"]


@needs_root
def test_data_is_copied_without_copy_file_range_too(tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")  # EXDEV, as before Linux 5.3
    monkeypatch.setattr(os, "copy_file_range", unsupported)
    data = bytes(range(256)) * 10000  # 2.5 MB: several 1 MiB pieces
    out = tmp_path / "out"
    extract_layer(str(layer(tmp_path, [f("data", data), f("empty")])), str(out))
    assert (out / "data").read_bytes() == data and (out / "empty").read_bytes() == b""


@needs_root
def test_truncated_and_malformed_layers_are_refused(tmp_path):
    good = build_tar([f("a", b"x" * 5000), f("b", b"y")])
    (tmp_path / "trunc.tar").write_bytes(good[:2048])
    with pytest.raises(InvalidInput, match="truncated"):
        extract_layer(str(tmp_path / "trunc.tar"), str(tmp_path / "out1"))
    assert not (tmp_path / "out1").exists()  # created by the call, removed on failure
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2/x").write_text("")
    with pytest.raises(StorageError, match="empty"):
        extract_layer(str(tmp_path / "trunc.tar"), str(tmp_path / "out2"))
    bad = bytearray(good)
    bad[148:156] = b"0000000\x00"  # first header's checksum
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(InvalidInput, match="invalid tar header at offset 0"):
        extract_layer(str(tmp_path / "bad.tar"), str(tmp_path / "out3"))
    with pytest.raises(UnsupportedEntry, match="names the layer root"):
        extract_layer(str(layer(tmp_path, [f("./")])), str(tmp_path / "out4"))


# --- whiteouts and opaque directories under overlayfs -----------------------------------

def content(i: int, path: str) -> bytes:
    return f"L{i}:{path}".encode()


def files(i: int, *paths: str) -> list[Spec]:
    return [f(p, content(i, p)) for p in paths]


LAYER0 = [
    d("a/"), d("a/b/"), d("a/b/c/"), d("a/b/c/d/"),
    *files(0, "top0", "a/f0", "a/b/f1", "a/b/c/f2", "a/b/c/d/f3"),
    d("w/"), d("w/x/"), d("w/x/y/"), *files(0, "w/x/y/z", "w/keep"),
    d("o/"), d("o/p/"), d("o/p/q/"), *files(0, "o/f", "o/p/f", "o/p/q/deep"),
    d("m/"), *files(0, "m/inner"),
    d("same/"), *files(0, "same/old"),
    Spec("lnk", SYM, linkname="target"), d("target/"), *files(0, "target/t0"),
    *files(0, "chr-whiteout", "keep-me"),
]
LAYER1 = [
    wh("top0"),                                   # a file
    wh("w"),                                      # a directory three levels deep
    opq("o/p"),                                   # opaque one level down
    *files(1, "o/p/new"),
    *files(1, "m"),                               # a file replaces a directory
    wh("same"), d("same/"), *files(1, "same/new"),  # whiteout + the same path: opaque
    *files(1, "lnk/new"),                         # implied directory over a symlink
    Spec("chr-whiteout", CHR, devmajor=0, devminor=0),  # overlayfs reads it as a whiteout
    *files(1, "a/b/f1"),                          # replaced, parents implied
]
LAYER2 = [
    wh("a/b/c"),                                  # a directory with a subdirectory
    *files(2, "a/b/c/fresh"),                     # ... recreated implicitly, opaque
    *files(2, "w/x/y/z"),                         # recreated below a whiteout of w
    opq("o"),                                     # opaque at the top of the chain
    *files(2, "o/only"),
]


def assemble(tmp_path: Path, layers: list[list[Spec]], gz: bool = False):
    source = BlobSource()
    descs = []
    for specs in layers:
        tar = build_tar(specs)
        descs.append(source.add(gzip.compress(tar), OCI_LAYER_GZIP) if gz else source.add(tar))
    return source, descs, assemble_image_rootfs(source, descs, str(tmp_path / "scratch"))


def check_map_matches_mount(mountpoint: str, listings: list[LayerListing]) -> None:
    """For every path any layer holds: overlayfs shows it iff layer_for finds
    it, with the content of the layer layer_for names."""
    for i, listing in enumerate(listings):
        for path, kind in listing.kinds.items():
            top = layer_for(path, listings)
            full = os.path.join(mountpoint, path)
            # Look through the parent without following a final symlink, and
            # only when no symlink sits on the way (the map takes paths literally).
            parent = os.path.dirname(full)
            if os.path.realpath(parent) != parent:
                continue
            shown = os.path.lexists(full)
            if kind == "dir":
                assert top is None or shown, path
                continue
            if shown and top is None:
                # hidden by a directory a higher layer implies at this path
                assert os.path.isdir(full) and not os.path.islink(full), path
                assert any(path in lst.implicit_dirs for lst in listings[i + 1:]), path
                continue
            assert shown == (top is not None), (path, top)
            if top is not None and listings[top].kinds[path] == "reg":
                assert Path(full).read_bytes() == content(top, path), path


@needs_root
def test_whiteouts_and_opaque_directories_at_every_level(tmp_path):
    source, descs, ctx = assemble(tmp_path, [LAYER0, LAYER1, LAYER2], gz=True)
    with ctx as (mnt, listings):
        view = visible_files(mnt)
        # layer 0 survivors
        assert view["a/f0"] == "L0:a/f0" and view["keep-me"] == "L0:keep-me"
        assert view["a/b/f1"] == "L1:a/b/f1"
        # whiteouts: a file, a deep directory, a directory then recreated below
        assert "top0" not in view
        assert "w/keep" not in view and view["w/x/y/z"] == "L2:w/x/y/z"
        assert "a/b/c/f2" not in view and "a/b/c/d" not in view
        assert view["a/b/c/fresh"] == "L2:a/b/c/fresh"
        # opaque one level down, then at the top of the chain
        assert "o/p/q" not in view and "o/p/new" not in view and "o/f" not in view
        assert view["o/only"] == "L2:o/only"
        # a file replacing a directory hides its contents
        assert view["m"] == "L1:m" and "m/inner" not in view
        # whiteout and the same path in one layer: the layer's own entry stays
        assert view["same/new"] == "L1:same/new" and "same/old" not in view
        # an implied directory over a lower symlink: overlayfs shows the directory
        assert view["lnk"] == "dir" and view["lnk/new"] == "L1:lnk/new"
        assert "chr-whiteout" not in view

        assert listings[1].whiteouts >= {"top0", "w", "same", "chr-whiteout"}
        assert listings[1].opaque_dirs == {"o/p", "same"}
        assert listings[2].opaque_dirs == {"o", "a/b/c"}
        assert any("lnk" in w for w in listings[1].warnings)
        check_map_matches_mount(mnt, listings)
        assert layer_for("a/b/c/d/f3", listings) is None   # whiteout two levels up
        assert layer_for("w/x/y/z", listings) == 2
        assert layer_for("o/p/q/deep", listings) is None   # opaque three levels up
        assert layer_for("lnk", listings) is None          # a directory now, implied
        assert resolve("lnk/t0", listings) == "lnk/t0"     # not through the old symlink
        scratch = tmp_path / "scratch"
        assert mounts_under(scratch) == [mnt]
        assert sorted(os.listdir(scratch / "layers")) == ["0", "1", "2"]
        assert not (scratch / "blobs").exists()  # fetched blobs go once extracted
    assert source.fetches == 3
    assert not (tmp_path / "scratch").exists() and not mounts_under(tmp_path)


@needs_root
def test_opaque_root_and_a_repeated_layer(tmp_path):
    base = [d("etc/"), *files(0, "etc/a", "b")]
    again = [*files(1, "etc/a")]
    top = [opq(""), *files(3, "only")]
    source = BlobSource()
    descs = [source.add(build_tar(s)) for s in (base, again)]
    descs += [descs[0], source.add(build_tar(top))]  # base comes twice
    with assemble_image_rootfs(source, descs, str(tmp_path / "s1")) as (mnt, listings):
        assert visible_files(mnt) == {"only": "L3:only"}
        assert layer_for("etc/a", listings) is None and layer_for("only", listings) == 3
        # overlayfs ignores opacity on a layer's root: the layers below are
        # simply not stacked
        options = mount_options(mnt)
        assert "layers/3" in options and "layers/0" not in options
    descs.pop()
    with assemble_image_rootfs(source, descs, str(tmp_path / "s2")) as (mnt, listings):
        assert Path(mnt, "etc/a").read_bytes() == content(0, "etc/a")  # layer 2 = layer 0
        assert layer_for("etc/a", listings) == 2
    assert source.fetches == 3 + 2  # each blob once per assembly (the repeat is reused)


@needs_root
def test_device_nodes_cannot_be_opened_through_the_mount(tmp_path):
    disk = os.stat("/").st_dev
    specs = [d("dev/"), Spec("dev/host-disk", BLK, mode=0o666, devmajor=os.major(disk),
                             devminor=os.minor(disk)),
             Spec("dev/null", CHR, mode=0o666, devmajor=1, devminor=3)]
    source = BlobSource()
    with assemble_image_rootfs(source, [source.add(build_tar(specs))],
                               str(tmp_path / "s")) as (mnt, _):
        assert stat.S_ISBLK(os.lstat(os.path.join(mnt, "dev/host-disk")).st_mode)
        for node in ("dev/host-disk", "dev/null"):
            with pytest.raises(PermissionError), open(os.path.join(mnt, node), "rb"):
                pass


@needs_root
def test_media_types_and_failures_clean_up(tmp_path):
    source = BlobSource()
    good = source.add(build_tar(files(0, "x")))
    attestation = source.add(b"{}", "application/vnd.in-toto+json")
    with pytest.raises(InvalidInput, match="not a tar layer"), \
            assemble_image_rootfs(source, [good, attestation], str(tmp_path / "s")):
        pass
    assert not (tmp_path / "s").exists()
    wrong = Descriptor(OCI_LAYER, good.digest, good.size + 1)
    with pytest.raises(estargz_error()), \
            assemble_image_rootfs(source, [wrong], str(tmp_path / "s")):
        pass
    assert not (tmp_path / "s").exists() and not mounts_under(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("mine")
    with pytest.raises(StorageError, match="must be empty"), \
            assemble_image_rootfs(source, [good], str(tmp_path / "busy")):
        pass
    assert (tmp_path / "busy/file").read_text() == "mine"


def estargz_error() -> type[EstargzError]:
    return EstargzError


# --- hostile layers ------------------------------------------------------------------------

@pytest.fixture
def canary(tmp_path) -> Path:
    """A directory beside the destination (``box/dest``) with things worth
    attacking."""
    c = tmp_path / "box" / "canary"
    (c / "etc").mkdir(parents=True)
    (c / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (c / "secret").write_text("do not touch\n")
    os.chmod(c / "secret", 0o600)
    return c


def hostile_cases(c: str) -> list[tuple[str, list[Spec], str | None]]:
    """(id, layer, expected error match or None for success) with canary ``c``."""
    return [
        ("dotdot", [f("../escape", b"x")], "climbs out"),
        ("dotdot-deep", [d("a/"), f("a/../../escape", b"x")], "climbs out"),
        ("dotdot-hardlink", [Spec("h", LNK, linkname="../canary/secret")], "climbs out"),
        ("symlink-parent-abs", [Spec("etc", SYM, linkname=f"{c}/etc"),
                                f("etc/passwd", b"pwned")], "is a symlink"),
        ("symlink-parent-etc", [Spec("etc", SYM, linkname="/etc"),
                                f("etc/passwd", b"pwned")], "is a symlink"),
        ("symlink-parent-rel", [Spec("etc", SYM, linkname="../canary/etc"),
                                f("etc/passwd", b"pwned")], "is a symlink"),
        ("symlink-chain", [Spec("a", SYM, linkname="b"), Spec("b", SYM, linkname=c),
                           f("a/secret", b"pwned")], "is a symlink"),
        ("symlink-dotdot", [Spec("up", SYM, linkname=".."), f("up/canary/secret", b"x")],
         "is a symlink"),
        ("symlink-dir-entry", [Spec("x", SYM, linkname=c), d("x/sub/")], "is a symlink"),
        ("symlink-whiteout", [Spec("x", SYM, linkname=c), wh("x/secret")], "is a symlink"),
        ("symlink-opaque", [Spec("x", SYM, linkname=c), opq("x")], "is a symlink"),
        ("symlink-device", [Spec("x", SYM, linkname=c),
                            Spec("x/null", CHR, devmajor=1, devminor=3)], "is a symlink"),
        ("hardlink-abs", [Spec("h", LNK, linkname=f"{c}/secret")], "not a regular file"),
        ("hardlink-etc-shadow", [Spec("h", LNK, linkname="/etc/shadow")], "not a regular file"),
        ("hardlink-via-symlink", [Spec("l", SYM, linkname=c), Spec("h", LNK, linkname="l/secret")],
         "not a regular file"),
        ("hardlink-to-symlink", [Spec("l", SYM, linkname=f"{c}/secret"),
                                 Spec("h", LNK, linkname="l")], "not a regular file"),
        ("hardlink-to-dir", [d("dd/"), Spec("h", LNK, linkname="dd")], "not a regular file"),
        ("whiteout-dotdot", [f(".wh..."), f("x")], "climbs out|invalid name"),
        ("file-as-parent", [f("plain", b"x"), f("plain/child", b"y")], "not a directory"),
        # Accepted: these stay inside the destination.
        ("absolute-names", [f(f"{c}/secret", b"inside"), f("/abs/path", b"inside")], None),
        ("symlink-replaced-by-file", [Spec("s", SYM, linkname=f"{c}/secret"),
                                      f("s", b"replaced")], None),
        ("symlink-replaced-by-dir", [Spec("s", SYM, linkname=c), d("s/", 0o777)], None),
        ("symlink-then-chmod-chown", [Spec("s", SYM, linkname=f"{c}/secret", mode=0o777,
                                           uid=1234, pax={"SCHILY.xattr.trusted.x": "1"})], None),
        ("dotdot-inside", [d("a/"), f("a/../b", b"inside")], None),
    ]


CASE_IDS = [case[0] for case in hostile_cases("/c")]


@needs_root
@pytest.mark.parametrize("case", CASE_IDS)
def test_hostile_layer_touches_nothing_outside(tmp_path, canary, case):
    cid, specs, error = next(x for x in hostile_cases(str(canary)) if x[0] == case)
    box = canary.parent
    before, beside = snapshot(canary), sorted(os.listdir(box))

    def host_etc() -> list:
        return [(s.st_ino, s.st_mode, s.st_nlink, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                for s in map(os.stat, ("/etc", "/etc/passwd", "/etc/shadow"))]
    host = host_etc()
    dest = box / "dest"
    tar = layer(tmp_path, specs)
    if error is None:
        listing = extract_layer(str(tar), str(dest))
    else:
        with pytest.raises(UnsupportedEntry, match=error):
            extract_layer(str(tar), str(dest))
    assert snapshot(canary) == before
    assert sorted(os.listdir(box)) == sorted(beside + ([] if error else ["dest"]))
    assert sorted(os.listdir(tmp_path)) == ["box", "layer.tar"]
    assert host_etc() == host
    if cid == "absolute-names":
        assert (dest / str(canary).lstrip("/") / "secret").read_bytes() == b"inside"
        assert (dest / "abs/path").read_bytes() == b"inside"
        assert listing.kinds["abs/path"] == "reg"
    elif cid == "symlink-replaced-by-file":
        assert (dest / "s").read_bytes() == b"replaced" and not (dest / "s").is_symlink()
    elif cid == "symlink-replaced-by-dir":
        assert (dest / "s").is_dir() and not (dest / "s").is_symlink()
        assert stat.S_IMODE((dest / "s").stat().st_mode) == 0o777
    elif cid == "symlink-then-chmod-chown":
        assert os.lstat(dest / "s").st_uid == 1234
        assert os.getxattr(dest / "s", "trusted.x", follow_symlinks=False) == b"1"
    elif cid == "dotdot-inside":
        assert (dest / "b").read_bytes() == b"inside"


@needs_root
def test_hostile_image_mounted_and_mapped(tmp_path, canary):
    """Symlinks pointing out are only ever resolved inside the image."""
    before = snapshot(canary)
    specs = [d("etc/"), f("etc/passwd", b"image passwd"),
             Spec("escape", SYM, linkname=f"../../../../../../{canary}/secret"),
             Spec("abs", SYM, linkname="/etc/passwd"),
             Spec("loop1", SYM, linkname="loop2"), Spec("loop2", SYM, linkname="/loop1")]
    source = BlobSource()
    with assemble_image_rootfs(source, [source.add(build_tar(specs))],
                               str(tmp_path / "s")) as (mnt, listings):
        assert resolve("/abs", listings) == "etc/passwd"
        assert resolve("escape", listings) == str(canary).lstrip("/") + "/secret"
        assert layer_for(resolve("escape", listings), listings) is None
        with pytest.raises(InvalidInput, match="too many levels"):
            resolve("loop1", listings)
        assert prioritized_lists(["/abs", "escape", "loop1"], listings) == {0: ["etc/passwd"]}
    assert snapshot(canary) == before


# --- the layer map --------------------------------------------------------------------------

def listing(kinds: dict | None = None, whiteouts=(), opaque=(), symlinks=None,
            implicit=()) -> LayerListing:
    symlinks = symlinks or {}
    kinds = dict(kinds or {})
    for p in symlinks:
        kinds[p] = "symlink"
    return LayerListing(kinds=kinds, whiteouts=set(whiteouts), opaque_dirs=set(opaque),
                        symlinks=dict(symlinks), implicit_dirs=set(implicit))


def tree(*paths: str) -> dict:
    """Kinds for ``paths`` and all their parents (``x/`` is a directory)."""
    out = {}
    for p in paths:
        parts = p.rstrip("/").split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = "dir"
        out[p.rstrip("/")] = "dir" if p.endswith("/") else "reg"
    return out


class TestLayerFor:
    base = listing(tree("usr/lib/x86_64/libc.so", "usr/lib/x86_64/libm.so", "usr/bin/env",
                        "etc/a/b/c/d", "opt/", "var/log/x"))

    def test_top_most_wins_and_paths_are_normalised(self):
        ls = [self.base, listing(tree("usr/bin/env")), listing(tree("etc/a/b/c/d"))]
        assert layer_for("usr/bin/env", ls) == 1
        assert layer_for("/usr/bin/env", ls) == 1
        assert layer_for("./usr//bin/./env/", ls) == 1
        assert layer_for("usr/lib/x86_64/libc.so", ls) == 0
        assert layer_for("etc/a/b/c/d", ls) == 2
        assert layer_for("usr", ls) == 1  # the top-most layer holding the directory
        assert layer_for("nowhere", ls) is None
        assert layer_for("/", ls) is None and layer_for("", ls) is None

    @pytest.mark.parametrize("whiteout", ["etc/a/b/c/d", "etc/a/b/c", "etc/a/b", "etc/a", "etc"])
    def test_whiteout_of_the_path_or_any_ancestor_hides_it(self, whiteout):
        ls = [self.base, listing(whiteouts=[whiteout])]
        assert layer_for("etc/a/b/c/d", ls) is None
        assert layer_for("usr/bin/env", ls) == 0
        # ... also from further up, with an unrelated layer between
        ls.append(listing(tree("opt/z")))
        assert layer_for("etc/a/b/c/d", ls) is None

    @pytest.mark.parametrize("opaque", ["etc/a/b/c", "etc/a/b", "etc/a", "etc"])
    def test_opaque_directory_at_any_ancestor_hides_it(self, opaque):
        ls = [self.base, listing(tree(opaque + "/"), opaque=[opaque])]
        assert layer_for("etc/a/b/c/d", ls) is None
        assert layer_for(opaque, ls) == 1  # the directory itself stays, from the top
        assert layer_for("var/log/x", ls) == 0

    def test_opaque_root_hides_every_lower_layer(self):
        ls = [self.base, listing(tree("new"), opaque=[""])]
        assert layer_for("usr/bin/env", ls) is None and layer_for("new", ls) == 1

    def test_immediate_parent_rules_only_would_be_wrong(self):
        """The reference checks the parent alone; a whiteout of ``usr`` must
        hide ``usr/lib/x86_64/libc.so``, two levels further down."""
        ls = [self.base, listing(whiteouts=["usr"]), listing(tree("usr/bin/env"))]
        assert layer_for("usr/lib/x86_64/libc.so", ls) is None
        assert layer_for("usr/bin/env", ls) == 2

    def test_whiteout_and_entry_in_one_layer(self):
        ls = [self.base, listing(tree("etc/"), whiteouts=["etc"], opaque=["etc"])]
        assert layer_for("etc", ls) == 1
        assert layer_for("etc/a/b/c/d", ls) is None

    def test_non_directory_ancestor_hides(self):
        ls = [self.base, listing({"etc": "reg"}), listing(tree("etc/"))]
        assert layer_for("etc/a/b/c/d", ls) is None  # a file at etc in layer 1
        assert layer_for("etc", ls) == 2
        ls = [self.base, listing(symlinks={"usr/lib": "lib64"})]
        assert layer_for("usr/lib/x86_64/libc.so", ls) is None
        assert layer_for("usr/lib", ls) == 1

    def test_implied_directory_hides_a_lower_non_directory(self):
        ls = [listing(symlinks={"bin": "usr/bin"}), listing({"bin/x": "reg"}, implicit=["bin"])]
        assert layer_for("bin", ls) is None
        assert layer_for("bin/x", ls) == 1
        ls = [listing(tree("d/")), listing({"d/x": "reg"}, implicit=["d"])]
        assert layer_for("d", ls) == 0  # directories merge


class TestResolve:
    ls = [listing({**tree("usr/bin/python3.11", "usr/lib/libc.so.6", "usr/etc/x", "etc/os"),
                   "bin": "symlink", "lib": "symlink"},
                  symlinks={"bin": "usr/bin", "lib": "/usr/lib", "usr/bin/python3": "python3.11",
                            "usr/bin/py": "/bin/python3", "up": "../../../..",
                            "etc/rel": "../usr/lib/libc.so.6", "loop/a": "b", "loop/b": "a",
                            "self": "self", "dangling": "/nowhere"})]

    @pytest.mark.parametrize("path,real", [
        ("/bin/python3", "usr/bin/python3.11"),
        ("bin/py", "usr/bin/python3.11"),           # absolute target, then relative chain
        ("/lib/libc.so.6", "usr/lib/libc.so.6"),
        ("etc/rel", "usr/lib/libc.so.6"),
        ("up/etc/os", "etc/os"),                     # .. clamped at the root
        ("/../../etc/os", "etc/os"),
        ("bin/../etc/x", "usr/etc/x"),               # .. of where bin leads, not lexical
        ("usr/bin/python3.11", "usr/bin/python3.11"),
        ("dangling", "nowhere"),
        ("missing/dir/file", "missing/dir/file"),
        ("/", ""),
    ])
    def test_resolve(self, path, real):
        assert resolve(path, self.ls) == real

    @pytest.mark.parametrize("path", ["loop/a", "self", "loop/b/x"])
    def test_loops(self, path):
        with pytest.raises(InvalidInput, match="too many levels"):
            resolve(path, self.ls)

    def test_forty_hops_allowed_forty_one_not(self):
        links = {f"l{i}": f"l{i + 1}" for i in range(41)}
        ls = [listing({"l41": "reg"}, symlinks=links)]
        assert resolve("l1", ls) == "l41"  # 40 hops
        with pytest.raises(InvalidInput):
            resolve("l0", ls)  # 41

    def test_custom_link_reader_and_hidden_symlinks(self):
        assert resolve("a/b", [], {"a": "/x/y"}.get) == "x/y/b"
        ls = [listing(symlinks={"bin": "usr/bin"}), listing(whiteouts=["bin"])]
        assert resolve("bin/sh", ls) == "bin/sh"
        assert link_targets(ls)("bin") is None


def test_prioritized_lists():
    l0 = listing(tree("usr/bin/python3.11", "usr/lib/libc.so.6", "etc/passwd",
                      "usr/lib/libz.so"),
                 symlinks={"bin": "usr/bin", "lib": "usr/lib"})
    l1 = listing({**tree("usr/bin/python3.11", "usr/lib/py/json.py")},
                 symlinks={"usr/bin/python3": "python3.11"}, whiteouts=["usr/lib/libz.so"])
    accessed = ["/bin/python3", "/lib/libc.so.6", "/usr/lib/py/json.py", "/etc/passwd",
                "/tmp/written-by-the-workload", "/usr/bin/python3.11", "/lib/libc.so.6",
                "usr/lib/libz.so", "/usr/lib/py/__pycache__/json.pyc", "/usr/lib/"]
    assert prioritized_lists(accessed, [l0, l1]) == {
        1: ["usr/bin/python3.11", "usr/lib/py/json.py", "usr/lib"],
        0: ["usr/lib/libc.so.6", "etc/passwd"],
    }
    assert prioritized_lists([], [l0, l1]) == {}
    assert normalize("/a/../../b/./c/") == "b/c"


# --- the debian-python3 image ------------------------------------------------------------------

def multiarch() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
        platform.machine(), platform.machine() + "-linux-gnu")


@needs_root
def test_debian_python3_image(tmp_path, test_images):
    src = open_source(parse_reference(f"oci:{test_images.debian_python3}:latest"))
    data, _ = src.root()
    manifest = json.loads(data)
    layers = [Descriptor.from_json(x) for x in manifest["layers"]]
    assert len(layers) == 2
    libc = f"usr/lib/{multiarch()}/libc.so.6"
    with assemble_image_rootfs(src, layers, str(tmp_path / "scratch")) as (mnt, listings):
        assert layer_for("usr/bin/python3.11", listings) == 1
        assert layer_for(libc, listings) == 0
        assert resolve("/bin/python3", listings) == "usr/bin/python3.11"
        assert resolve(f"/lib/{multiarch()}/libc.so.6", listings) == libc
        assert "usr" in listings[1].implicit_dirs  # the diff layer leaves parents out
        # The merged tree runs the image's command.
        p = subprocess.run(["chroot", mnt, "/usr/bin/python3", "-c",
                            "import json, sys; print(json.dumps(sys.version_info[:2]))"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "[3, 11]"
        written = [os.path.relpath(os.path.join(dp, n), tmp_path / "scratch/upper")
                   for dp, _, ns in os.walk(tmp_path / "scratch/upper") for n in ns]
        accessed = ["/bin/python3", f"/lib/{multiarch()}/libc.so.6",
                    "/usr/lib/python3.11/json/__init__.py", *("/" + w for w in written)]
        lists = prioritized_lists(accessed, listings)
        assert lists == {1: ["usr/bin/python3.11", "usr/lib/python3.11/json/__init__.py"],
                         0: [libc]}
    assert not (tmp_path / "scratch").exists() and not mounts_under(tmp_path)


# --- OverlayRoot: nothing left behind -------------------------------------------------------------

def make_lowers(tmp_path: Path, n: int, parent: str = "layers") -> list[str]:
    dirs = []
    for i in range(n):
        p = tmp_path / parent / str(i)
        p.mkdir(parents=True)
        (p / f"f{i}").write_text(str(i))
        (p / "shared").write_text(str(i))
        dirs.append(str(p))
    return dirs


@needs_root
def test_overlay_root_unmounts_when_the_body_raises(tmp_path):
    lowers = make_lowers(tmp_path, 2)
    scratch = tmp_path / "scratch"
    root = OverlayRoot(lowers, str(scratch))
    with pytest.raises(ZeroDivisionError), root as mnt:
        assert Path(mnt, "shared").read_text() == "1"
        assert Path(mnt, "f0").read_text() == "0"
        Path(mnt, "written").write_text("upper")
        assert (scratch / "upper/written").exists()
        assert mounts_under(scratch) == [mnt]
        assert root.method == "mount(2)"
        assert "nodev" in mount_options(mnt).split()[0].split(",")
        raise ZeroDivisionError
    assert not mounts_under(tmp_path) and not scratch.exists()
    assert all(os.path.isdir(x) for x in lowers)  # outside scratch: kept


@needs_root
def test_overlay_root_detaches_a_busy_mount(tmp_path):
    scratch = tmp_path / "scratch"
    with OverlayRoot(make_lowers(tmp_path, 1), str(scratch)) as mnt:
        busy = subprocess.Popen(["sleep", "60"], cwd=mnt)
    try:
        assert not mounts_under(tmp_path) and not scratch.exists()
    finally:
        busy.kill()
        busy.wait()


@needs_root
def test_overlay_root_with_more_layers_than_a_page_of_options(tmp_path):
    # ~45 bytes a path here: 150 layers need about 7 KiB of options.
    lowers = make_lowers(tmp_path / ("x" * 20), 150)
    assert len(":".join(lowers)) > os.sysconf("SC_PAGE_SIZE")
    root = OverlayRoot(lowers, str(tmp_path / "scratch"))
    with root as mnt:
        assert root.method.startswith("mount(2), relative paths")
        assert Path(mnt, "shared").read_text() == "149"
        assert Path(mnt, "f0").read_text() == "0" and Path(mnt, "f149").read_text() == "149"
        assert len(os.listdir(mnt)) == 151
    assert not mounts_under(tmp_path)
    with pytest.raises(StorageError, match="at most 500"), \
            OverlayRoot(["/nonexistent"] * 501, str(tmp_path / "scratch2")):
        pass
    assert not (tmp_path / "scratch2").exists()


@needs_root
def test_overlay_root_refuses_a_used_scratch_and_a_failed_mount(tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "upper").mkdir(parents=True)
    (scratch / "upper/mine").write_text("keep")
    with pytest.raises(StorageError, match="already exists"), \
            OverlayRoot(make_lowers(tmp_path, 1), str(scratch)):
        pass
    assert (scratch / "upper/mine").read_text() == "keep"
    with pytest.raises(StorageError, match="cannot mount"), \
            OverlayRoot([str(tmp_path / "missing")], str(tmp_path / "s2")):
        pass
    assert not (tmp_path / "s2").exists()


SIGINT_CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}]
    from profiler.rootfs import overlay
    lowers = {lowers!r}
    if sys.argv[1].startswith("during-cleanup"):
        real = overlay.unmount_all
        sig = signal.SIGTERM if sys.argv[1].endswith("sigterm") else signal.SIGINT
        def interrupted(path):
            os.kill(os.getpid(), sig)  # Ctrl-C (or kill) as the clean-up starts
            print("cleanup ran", flush=True)
            return real(path)
        overlay.unmount_all = interrupted
    with overlay.OverlayRoot(lowers, {scratch!r}) as mnt:
        print("mounted", mnt, flush=True)
        if sys.argv[1] == "in-body":
            os.kill(os.getpid(), signal.SIGINT)
            signal.pause()
    print("not reached for in-body", flush=True)
""")


@needs_root
@pytest.mark.parametrize("when", ["in-body", "during-cleanup", "during-cleanup-sigterm"])
def test_overlay_root_survives_ctrl_c(tmp_path, when):
    scratch = tmp_path / "scratch"
    code = SIGINT_CHILD.format(repo=str(REPO), lowers=make_lowers(tmp_path, 2),
                               scratch=str(scratch))
    p = subprocess.run([sys.executable, "-c", code, when], capture_output=True, text=True,
                       timeout=60)
    assert "mounted" in p.stdout
    if when.endswith("sigterm"):
        assert p.returncode == -signal.SIGTERM  # delivered, default action, after clean-up
    else:
        assert "KeyboardInterrupt" in p.stderr and p.returncode != 0
    if when.startswith("during-cleanup"):
        # the signal waited for the clean-up to finish
        assert "cleanup ran" in p.stdout and "not reached" not in p.stdout
    assert not mounts_under(tmp_path) and not scratch.exists()
