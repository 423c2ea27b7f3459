"""tests/treecompare.py reports every kind of difference, and the lazy-kinds
image unpacks to the same tree whoever unpacks it.

The first half builds small trees in tmp and changes one thing at a time:
each change must give exactly the expected line (so a comparison built on
treecompare can fail).  The second half is the baseline the lazy-pull tests
compare against: the lazy-kinds test image as containerd's overlayfs
snapshotter presents it (a read-only view of the committed snapshot,
mounted on the host) equals ``umoci unpack`` of the same image, and equals
``umoci unpack`` of the image after ``estargz convert --oci``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import run_cli
from daemons import build_images, mounts_under
from treecompare import (
    ESTARGZ_FILES,
    RUNTIME_PATHS,
    EntryState,
    assert_same_tree,
    chain_id,
    diff_trees,
    mounted_view,
    snapshot_tree,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="owners, devices and trusted.* xattrs need root")

T = 1_700_000_000_123_456_789  # every entry's mtime in ns, a fraction included


# --- small trees in tmp --------------------------------------------------------------

def make_tree(root: Path) -> Path:
    """A tree with one entry of each kind treecompare looks at."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/other").write_text("other\n")
    (root / "etc/link").symlink_to("motd")
    (root / "etc/dirlink").symlink_to("../usr")
    (root / "etc/hard1").write_text("shared inode\n")
    os.link(root / "etc/hard1", root / "etc/hard2")
    (root / "etc/x").write_text("xattrs\n")
    os.setxattr(root / "etc/x", "user.a", b"1")
    (root / "usr").mkdir()
    (root / "usr/file").write_text("not to be found through etc/dirlink\n")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mkfifo(root / "dev/fifo", 0o600)
    stamp(root)
    return root


def stamp(root: Path, ns: int = T) -> None:
    """Give every entry (symlinks too) and ``root`` the same mtime."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def rewrite(p: Path, data: str) -> None:
    p.unlink()
    p.write_text(data)


def _replace_link(root: Path) -> None:
    (root / "etc/link").unlink()
    (root / "etc/link").symlink_to("other")


def _link_to_file(root: Path) -> None:
    (root / "etc/link").unlink()
    (root / "etc/link").write_text("motd\n")


def _device(root: Path, kind: int, minor: int) -> None:
    (root / "dev/null").unlink()
    os.mknod(root / "dev/null", 0o666 | kind, os.makedev(1, minor))


def _unlink_hardlink(root: Path) -> None:
    (root / "etc/hard2").unlink()
    (root / "etc/hard2").write_text("shared inode\n")


def sha16(text: str) -> str:
    """How diff_trees shows a content digest."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


HELLO, HELLO_CAP, HELLO_WORLD = sha16("hello\n"), sha16("Hello\n"), sha16("hello, world\n")

# change applied to tree b -> the exact lines diff_trees(a, b) must give
CHANGES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "mode": (lambda r: os.chmod(r / "etc/motd", 0o600), ["etc/motd: mode 0644 != 0600"]),
    "setuid": (lambda r: os.chmod(r / "etc/motd", 0o4644), ["etc/motd: mode 0644 != 4644"]),
    "sticky-dir": (lambda r: os.chmod(r / "usr", 0o1755), ["usr: mode 0755 != 1755"]),
    "uid": (lambda r: os.chown(r / "etc/motd", 1000, -1), ["etc/motd: uid 0 != 1000"]),
    "gid": (lambda r: os.chown(r / "etc/motd", -1, 65534), ["etc/motd: gid 0 != 65534"]),
    "symlink-owner": (lambda r: os.chown(r / "etc/link", 7, 8, follow_symlinks=False),
                      ["etc/link: uid 0 != 7", "etc/link: gid 0 != 8"]),
    "content": (lambda r: rewrite(r / "etc/motd", "Hello\n"),
                [f"etc/motd: sha256 {HELLO} != {HELLO_CAP}"]),
    "size": (lambda r: rewrite(r / "etc/motd", "hello, world\n"),
             ["etc/motd: size 6 != 13",
              f"etc/motd: sha256 {HELLO} != {HELLO_WORLD}"]),
    "link-target": (_replace_link, ["etc/link: link_target motd != other"]),
    "kind": (_link_to_file, ["etc/link: kind symlink != file"]),
    "device-number": (lambda r: _device(r, 0o020000, 5), ["dev/null: device 1:3 != 1:5"]),
    "device-kind": (lambda r: _device(r, 0o060000, 3), ["dev/null: kind char != block"]),
    "xattr-value": (lambda r: os.setxattr(r / "etc/x", "user.a", b"2"),
                    ["etc/x: xattr user.a b'1' != b'2'"]),
    "xattr-added": (lambda r: os.setxattr(r / "etc/motd", "user.new", b""),
                    ["etc/motd: xattr user.new only in b"]),
    "xattr-removed": (lambda r: os.removexattr(r / "etc/x", "user.a"),
                      ["etc/x: xattr user.a only in a"]),
    "capability": (lambda r: os.setxattr(r / "etc/x", "security.capability",
                                         bytes.fromhex("0100000200040000") + bytes(12)),
                   ["etc/x: xattr security.capability only in b"]),
    "hardlink-split": (_unlink_hardlink,
                       ["etc/hard1: hardlinks [etc/hard1, etc/hard2] != []",
                        "etc/hard2: hardlinks [etc/hard1, etc/hard2] != []"]),
    "hardlink-added": (lambda r: os.link(r / "etc/other", r / "etc/other2"),
                       ["etc/other: hardlinks [] != [etc/other, etc/other2]",
                        "etc/other2: only in b (file)"]),
    "missing": (lambda r: (r / "etc/motd").unlink(), ["etc/motd: only in a (file)"]),
    "extra-dir": (lambda r: (r / "usr/new").mkdir(), ["usr/new: only in b (dir)"]),
}


@needs_root
def test_equal_trees_have_no_differences(tmp_path):
    a, b = make_tree(tmp_path / "a"), make_tree(tmp_path / "b")
    sa, sb = snapshot_tree(a), snapshot_tree(b)
    assert diff_trees(sa, sb) == []
    assert sorted(sa) == ["dev", "dev/fifo", "dev/null", "etc", "etc/dirlink", "etc/hard1",
                          "etc/hard2", "etc/link", "etc/motd", "etc/other", "etc/x", "usr",
                          "usr/file"]
    assert sa["etc/motd"] == EntryState(kind="file", mode=0o644, uid=0, gid=0, size=6,
                                        sha256=sa["etc/motd"].sha256, mtime_ns=T)
    assert sa["etc/link"].link_target == "motd" and sa["etc/link"].mtime_ns == T
    assert sa["dev/null"].device == (1, 3)
    assert sa["etc/hard1"].hardlinks == sa["etc/hard2"].hardlinks == ("etc/hard1", "etc/hard2")
    assert sa["etc/x"].xattrs == (("user.a", b"1"),)


@needs_root
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_difference_is_reported(tmp_path, change):
    mutate, want = CHANGES[change]
    a, b = make_tree(tmp_path / "a"), make_tree(tmp_path / "b")
    mutate(b)
    stamp(b)  # a change must show as itself, not as a parent's new mtime
    sa, sb = snapshot_tree(a), snapshot_tree(b)
    assert diff_trees(sa, sb) == want
    # ... and the other way round
    flipped = diff_trees(sb, sa)
    assert len(flipped) == len(want)
    with pytest.raises(AssertionError, match=f"{len(want)} differences"):
        assert_same_tree(sa, sb)


@needs_root
def test_mtime_and_its_tolerance(tmp_path):
    a, b = make_tree(tmp_path / "a"), make_tree(tmp_path / "b")
    os.utime(b / "etc/motd", ns=(T, T + 1))
    os.utime(b / "etc/link", ns=(T, T - 123_456_789), follow_symlinks=False)  # whole second
    sa, sb = snapshot_tree(a), snapshot_tree(b)
    assert diff_trees(sa, sb) == [
        "etc/link: mtime 2023-11-14T22:13:20.123456789Z != 2023-11-14T22:13:20.000000000Z",
        "etc/motd: mtime 2023-11-14T22:13:20.123456789Z != 2023-11-14T22:13:20.123456790Z"]
    assert diff_trees(sa, sb, mtime_tolerance_ns=1) == [diff_trees(sa, sb)[0]]
    assert diff_trees(sa, sb, mtime_tolerance_ns=10**9) == []
    assert diff_trees(sa, sb, ignore=["symlink.mtime"]) == [diff_trees(sa, sb)[1]]
    assert diff_trees(sa, sb, ignore=["mtime"]) == []
    with pytest.raises(ValueError, match="unknown fields to ignore: .'mtim'."):
        diff_trees(sa, sb, ignore=["mtim"])


@needs_root
def test_kernel_xattrs_are_left_out(tmp_path):
    """overlayfs' own xattrs are never recorded; security.selinux on one side
    only is ignored, a differing value on both sides is not."""
    a, b = make_tree(tmp_path / "a"), make_tree(tmp_path / "b")
    os.setxattr(b / "usr", "trusted.overlay.opaque", b"y")
    os.setxattr(b / "etc/x", "trusted.estargz-test", b"kept")
    sb = snapshot_tree(b)
    assert sb["usr"].xattrs == ()
    assert diff_trees(snapshot_tree(a), sb) == ["etc/x: xattr trusted.estargz-test only in b"]
    x = EntryState(kind="file", mode=0o644, uid=0, gid=0, xattrs=(("security.selinux", b"s0"),))
    y = EntryState(kind="file", mode=0o644, uid=0, gid=0)
    z = EntryState(kind="file", mode=0o644, uid=0, gid=0, xattrs=(("security.selinux", b"s1"),))
    assert diff_trees({"f": x}, {"f": y}) == []
    assert diff_trees({"f": x}, {"f": y}, one_sided_xattrs=()) == [
        "f: xattr security.selinux only in a"]
    assert diff_trees({"f": x}, {"f": z}) == ["f: xattr security.selinux b's0' != b's1'"]


@needs_root
def test_skip_mounts_and_symlinks(tmp_path):
    root = make_tree(tmp_path / "a")
    (root / "proc").mkdir()
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "dev/pts").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "proc")],
                   check=True)
    try:
        (root / "proc/mounted-file").write_text("on the tmpfs\n")
        s = snapshot_tree(root)
        # the mount point is left out with its contents; the symlink to usr
        # is an entry, not a way into usr
        assert "proc" not in s and "proc/mounted-file" not in s
        assert s["etc/dirlink"].kind == "symlink" and "etc/dirlink/file" not in s
        crossed = snapshot_tree(root, cross_mounts=True)
        assert crossed["proc/mounted-file"].size == 13
        runtime = snapshot_tree(root, skip=RUNTIME_PATHS)
        assert {"dev", "etc"} <= runtime.keys()
        assert not {"dev/null", "dev/pts", "etc/hosts"} & runtime.keys()
        assert "usr" not in snapshot_tree(root, skip=["usr"]) and \
            "usr/file" not in snapshot_tree(root, skip=["/usr/"])
        assert snapshot_tree(root, include_root=True)["."].kind == "dir"
    finally:
        subprocess.run(["umount", str(root / "proc")], check=True)
    assert mounts_under(root) == []


def test_assert_same_tree_refuses_two_empty_trees():
    with pytest.raises(AssertionError, match="nothing was compared"):
        assert_same_tree({}, {})


# --- the lazy-kinds image, unpacked three ways ------------------------------------------

# What the lazy-kinds image must hold once unpacked (whiteouts and the opaque
# dir applied, every kind present), so that "equal" cannot mean "both empty".
GONE = ["data/remove-me.txt", "data/remove-dir", "data/remove-dir/inner.txt",
        "data/opaque/old-a.txt", "data/opaque/old-dir", "data/.wh.remove-me.txt",
        "data/opaque/.wh..wh..opq"]


def check_lazy_kinds_tree(s: dict[str, EntryState]) -> None:
    assert not set(GONE) & s.keys()
    assert [p for p in s if p.startswith("data/opaque/")] == ["data/opaque/new.txt"]
    assert s["data/replaced.txt"].uid == 1000 and s["data/replaced.txt"].mode == 0o600
    assert s["data/big/random-9MiB.bin"].size == 9 << 20
    assert s["data/empty"].size == 0
    assert s["data/dev/char-null"].device == (1, 3) and s["data/dev/char-null"].kind == "char"
    assert s["data/dev/block-loop0"].kind == "block" and s["data/dev/fifo"].kind == "fifo"
    assert dict(s["data/bin/tool"].xattrs) == {
        "security.capability": bytes.fromhex("0100000200040000") + bytes(12),
        "user.origin": b"estargz lazy-kinds"}
    assert dict(s["data/xattr-dir/two.txt"].xattrs)["user.ümlaut"] == "wert-ä".encode()
    assert s["data/read/config.txt"].hardlinks == ("data/hardlinks/config-link",
                                                   "data/read/config.txt")
    assert len(s["data/hardlinks/via-link"].hardlinks) == 3
    assert s["data/links/to-dir"].link_target == "../../données"
    assert s["données/naïve-ü.txt"].kind == s["データ/日本語のファイル名.txt"].kind == "file"
    assert [p for p in s if len(p.encode()) > 100 and p.startswith("data/long/")]
    assert s["data/modes/setuid"].mode == 0o4755 and s["data/modes/zero"].mode == 0
    assert s["data/modes/sticky"].mode == 0o1777 and s["data/modes/setgid-dir"].mode == 0o2775
    assert s["data/owners/nobody"].uid == 65534 and s["data/owners/mixed"].gid == 65534
    assert s["data/times/subsecond"].mtime_ns == (1704067200 + 7200) * 10**9 + 250_000_000
    assert s["data/times/one-second"].mtime_ns == 10**9
    assert s["bin/busybox"].kind == "file" and s["bin/sh"].link_target == "/bin/busybox"


@pytest.fixture(scope="module")
def images() -> dict[str, Path]:
    """Cache directories of lazy-kinds and busybox (only these built)."""
    return build_images("busybox", "lazy-kinds")


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)],
                   check=True, capture_output=True)
    return dest / "rootfs"


def diff_ids(layout: Path, tag: str = "latest") -> list[str]:
    out = subprocess.run(["skopeo", "inspect", "--config", f"oci:{layout}:{tag}"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["rootfs"]["diff_ids"]


def overlayfs_tree(containerd, archive: Path, name: str, layout: Path, tag: str,
                   mnt: Path, layers: int = 0, **snapshot_options) -> dict[str, EntryState]:
    """Import ``archive`` into containerd as ``name`` (unpacked by the
    overlayfs snapshotter), mount a read-only view of the snapshot of its
    first ``layers`` layers (all by default) and snapshot the tree."""
    containerd.ctr("images", "import", "--base-name", name, archive)
    ids = diff_ids(layout, tag)
    mnt.mkdir()
    # The image's committed snapshots are named by their ChainIDs.
    with mounted_view(containerd.ctr, "overlayfs", chain_id(ids[:layers or len(ids)]),
                      f"treecompare-{os.getpid()}-{mnt.name}", mnt):
        assert mounts_under(mnt) == [str(mnt)]
        tree = snapshot_tree(mnt, **snapshot_options)
    assert mounts_under(mnt) == []
    return tree


@needs_root
def test_lazy_kinds_is_reproducible(images, tmp_path):
    """A build into an empty cache gives the same bytes."""
    fresh = build_images("lazy-kinds", env={"ESTARGZ_CACHE": str(tmp_path)})["lazy-kinds"]
    old = images["lazy-kinds"]
    files = sorted(p.relative_to(old) for p in old.rglob("*")
                   if p.is_file() and p.name != "build-info.json")
    assert Path("oci-archive.tar") in files and Path("expected-output.txt") in files
    for f in files:
        assert (fresh / f).read_bytes() == (old / f).read_bytes(), f


@needs_root
def test_umoci_unpack_of_lazy_kinds(images, tmp_path):
    rootfs = umoci_unpack(images["lazy-kinds"] / "oci", "latest", tmp_path / "bundle")
    check_lazy_kinds_tree(snapshot_tree(rootfs))


@needs_root
def test_containerd_overlayfs_view_equals_umoci_unpack(containerd, images, tmp_path):
    """The reference tree for the lazy-pull tests.  Nothing needs excusing:
    containerd 1.6's overlayfs snapshotter and umoci 0.4 agree on every
    field of every entry, sub-second mtimes and xattrs included; so they do
    for the busybox layer alone (a bind mount, not an overlay)."""
    lazy = images["lazy-kinds"]
    want = snapshot_tree(umoci_unpack(lazy / "oci", "latest", tmp_path / "bundle"))
    name = "treecompare/lazy-kinds"
    try:
        got = overlayfs_tree(containerd, lazy / "oci-archive.tar", name, lazy / "oci",
                             "latest", tmp_path / "mnt")
        base = overlayfs_tree(containerd, lazy / "oci-archive.tar", name, lazy / "oci",
                              "latest", tmp_path / "mnt-base", layers=1)
        run = containerd.run(f"{name}:latest")
    finally:
        containerd.ctr("images", "rm", f"{name}:latest", check=False)
    check_lazy_kinds_tree(got)
    assert_same_tree(got, want)
    assert_same_tree(base, snapshot_tree(umoci_unpack(images["busybox"] / "oci", "latest",
                                                      tmp_path / "busybox")))
    assert run.stdout == (lazy / "expected-output.txt").read_text()


@needs_root
def test_estargz_convert_unpacks_to_the_same_tree(containerd, images, tmp_path):
    """`estargz convert --oci`, read by plain consumers (umoci, and
    containerd's overlayfs applier), gives the original tree; they also
    write the TOC and the landmark as files at the root, which a lazy
    puller does not show (ESTARGZ_FILES)."""
    lazy = images["lazy-kinds"]
    out, archive = tmp_path / "esgz", tmp_path / "esgz.tar"
    run_cli("convert", f"oci:{lazy / 'oci'}:latest", f"oci:{out}:esgz", "--oci", check=True)
    run_cli("convert", f"oci:{lazy / 'oci'}:latest", f"oci-archive:{archive}:esgz", "--oci",
            check=True)
    # the converted layers are new blobs, not the originals passed through
    assert not set(diff_ids(out, "esgz")) & set(diff_ids(lazy / "oci"))
    want = snapshot_tree(umoci_unpack(lazy / "oci", "latest", tmp_path / "orig"))
    got_root = umoci_unpack(out, "esgz", tmp_path / "converted")
    assert (got_root / "stargz.index.json").is_file()
    assert (got_root / ".no.prefetch.landmark").is_file()
    got = snapshot_tree(got_root, skip=ESTARGZ_FILES)
    check_lazy_kinds_tree(got)
    assert_same_tree(got, want)
    name = "treecompare/lazy-kinds-esgz"
    try:
        in_containerd = overlayfs_tree(containerd, archive, name, out, "esgz", tmp_path / "mnt",
                                       skip=ESTARGZ_FILES)
    finally:
        containerd.ctr("images", "rm", f"{name}:esgz", check=False)
    assert_same_tree(in_containerd, want)
