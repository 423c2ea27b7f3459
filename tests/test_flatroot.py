"""The flattened root filesystem of rootless profiling: profiler/rootfs/flat.py and
the flat mode of profiler/rootfs/extract.py's extractor.

* equivalence with overlayfs: crafted images covering whiteouts (a file, a
  deep directory, below a lower symlink, a 0/0 device), opaque directories
  (the root too), every replacement of one kind by another across layers,
  implied parents, hardlinks, modes, owners, exact mtimes, xattrs, sparse
  files, FIFOs, duplicate entries and a repeated layer, and a real two-layer
  Debian image: the tree :func:`assemble_flat_rootfs` builds on a tmpfs is
  compared entry by entry with what the overlayfs mount of
  :func:`assemble_image_rootfs` shows, and the listings with its listings;
* rootless: the same assembly as user nobody, root of its own user namespace
  (``unshare -Urm``) on a tmpfs mounted there, gives the same tree but for
  owners (all the namespace's root) and ``trusted.*`` xattrs, with no error
  for devices, whiteouts, xattrs or unmapped owners;
* :func:`layer_usage` bounds what a tmpfs really uses, closely, and a tmpfs
  of exactly the sum of an image's layers holds its assembly;
* hostile layers are refused in flat mode as in the other, and the merge
  never writes through a symlink a lower layer planted.

Everything needs root (mounts, and the overlayfs reference); the rootless
test runs its assembly as nobody.
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO, Spec, build_tar, sparse_tar
from estargz import (
    Descriptor,
    InvalidInput,
    StorageError,
    UnsupportedEntry,
    open_source,
    parse_reference,
)
from profiler.rootfs import (
    LayerListing,
    assemble_flat_rootfs,
    assemble_image_rootfs,
    extract_layer,
    layer_for,
    layer_usage,
    merge_layer,
)

# blobs in memory for assemble_image_rootfs, and the hostile layers of the overlay's extraction
from test_rootfs import BlobSource, hostile_cases

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root (tmpfs mounts, the overlayfs reference)")

DIR, SYM, LNK = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
CHR, BLK, FIFO = tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE


# --- crafting layers ---------------------------------------------------------------------

def d(name: str, mode: int = 0o755, **kw) -> Spec:
    return Spec(name.rstrip("/") + "/", DIR, mode=mode, **kw)


def f(name: str, data: bytes | None = None, mode: int = 0o644, **kw) -> Spec:
    return Spec(name, data=name.encode() if data is None else data, mode=mode, **kw)


def sym(name: str, target: str, **kw) -> Spec:
    return Spec(name, SYM, linkname=target, mode=0o777, **kw)


def hard(name: str, target: str) -> Spec:
    return Spec(name, LNK, linkname=target)


def wh(name: str) -> Spec:
    parent, _, base = name.rpartition("/")
    return Spec(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opq(dirname: str) -> Spec:
    return Spec(f"{dirname}/.wh..wh..opq" if dirname else ".wh..wh..opq")


def xattr(**values: str) -> dict:
    return {f"SCHILY.xattr.{k.replace('__', '.')}": v for k, v in values.items()}


def compress(data: bytes, how: str) -> bytes:
    if how == "gz":
        return gzip.compress(data, mtime=0)
    if how == "zst":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    return data


CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)  # security.capability v2, CAP_NET_BIND

L0 = [
    d("etc", mtime=100), f("etc/passwd", b"root:x:0:0"), f("etc/shadow", mode=0o640, gid=42),
    d("usr", 0o750, uid=3, gid=4, mtime=111), d("usr/local", 0o705, mtime=222),
    d("usr/local/bin"), f("usr/local/bin/tool", mode=0o755),
    f("top0"), d("w"), d("w/x"), d("w/x/y"), f("w/x/y/z"), f("w/keep"),
    d("o"), d("o/p"), d("o/p/q"), f("o/f"), f("o/p/f"), f("o/p/q/deep"),
    d("a"), d("a/b"), d("a/b/c"), d("a/b/c/d"), f("a/f0"), f("a/b/f1"), f("a/b/c/d/f3"),
    d("m"), f("m/inner"),                     # a directory, a file in layer 1
    f("filedir"),                             # a file, a directory in layer 1
    d("symdir"), f("symdir/x"),               # a directory, a symlink in layer 1
    sym("lnk", "target"), d("target"), f("target/t0"), f("target/t1"),
    sym("sd", "target"),                      # a symlink, a directory in layer 1
    f("filep"), f("pf"), f("wasfile"), f("chrwh"),
    d("redo"), f("redo/old"), d("same"), f("same/old"),
    d("hl"), f("hl/a", b"shared"), hard("hl/b", "hl/a"), hard("hl/c", "/hl/a"),
    d("modes"), f("modes/suid", mode=0o4755), f("modes/sgid", mode=0o2755, gid=50),
    f("modes/none", mode=0o000), d("modes/ro", 0o555), f("modes/ro/inside"),
    d("modes/sticky", 0o1777),
    d("own"), f("own/u1000", uid=1000, gid=1000), sym("own/link", "u1000", uid=7, gid=8),
    d("own/dir", uid=5, gid=6), f("own/dir/bigid", uid=3_000_000, gid=4_000_000),
    d("times"), f("times/frac", mtime=1_600_000_000.75), f("times/zero", mtime=0),
    Spec("fifo", FIFO, mode=0o620),
    d("dev"), Spec("dev/null", CHR, mode=0o666, devmajor=1, devminor=3),
    Spec("dev/loop0", BLK, mode=0o660, devmajor=7, devminor=0),
    d("x"), f("x/file", pax=xattr(user__comment="hi", trusted__t="1")),
    d("x/dir", pax=xattr(user__d="lower")), d("x/kept", pax=xattr(user__k="kept")),
    f("x/cap", pax={"SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape")}),
    f("dup", b"one"), f("dup", b"two"), d("dupdir", 0o700), d("dupdir", 0o751, mtime=5),
    sym("long", "x" * 200),
]
L1 = [
    wh("top0"), wh("w"),                                 # a file; a deep directory
    opq("o/p"), f("o/p/new"),
    f("m", b"a file now"),                               # file over directory
    d("filedir", 0o710, mtime=333), f("filedir/c"),      # directory over file
    sym("symdir", "target"),                             # symlink over directory
    wh("lnk/t0"),                                        # below a lower symlink
    d("sd", 0o700), f("sd/y"),                           # directory over symlink
    f("usr/local/bin/tool2"),                            # implied parents
    f("etc/passwd", b"root:x:0:0:new", mode=0o600),
    f("hl/a", b"replaced"), d("hl2"), f("hl2/a"), hard("hl2/b", "hl2/a"),
    wh("redo"), f("redo/x"),                             # `.wh.d` then `d/x`
    wh("same"), d("same"), f("same/new"),                # whiteout and the path itself
    d("wasfile"), opq("wasfile"), f("wasfile/n"),        # opaque directory over a file
    f("pf/x"),                                           # implied directory over a file
    wh("never"), wh("filep/x"),                          # nothing to delete
    Spec("chrwh", CHR, devmajor=0, devminor=0),          # overlayfs's own whiteout
    d("x/dir", pax=xattr(user__e="upper")),              # xattrs of the top-most copy
    f("x/kept/new"),                                     # implied: keeps user.k
]
L2 = [
    wh("a/b/c"), f("a/b/c/fresh"),                       # recreated implicitly: opaque
    f("w/x/y/z", b"again"),                              # below a whiteout of w
    opq("o"), f("o/only"),
    wh("hl/b"),
    d("etc", 0o700, mtime=300), f("etc/new"),            # explicit over implied,
    wh("etc/shadow"), d("x", 0o711, mtime=400),          # entries moved out of both
    f("x/other", b"new"), d("usr/local", 0o701, mtime=444), f("usr/local/new"),
    wh("modes/ro/inside"),
    f("lnk/new"),
]


def main_image(tmp: Path, zstd: bool = True) -> list[bytes]:
    """Blobs of the crafted image: gzip, plain, gzip, and a sparse layer."""
    return [compress(build_tar(L0), "gz"), build_tar(L1), compress(build_tar(L2), "gz"),
            compress(sparse_tar(tmp), "zst" if zstd else "gz")]


def opaque_root_image(tmp: Path, zstd: bool = True) -> list[bytes]:
    base = build_tar([d("etc"), f("etc/a"), f("b"), d("keep", 0o700, mtime=7)])
    again = build_tar([f("etc/a", b"again"), d("etc", 0o750, mtime=9)])
    top = build_tar([opq(""), f("only"), d("keep"), f("keep/new")])
    return [base, again, base, top, compress(again, "zst" if zstd else "gz")]


IMAGES: dict[str, Callable[..., list[bytes]]] = {"main": main_image,
                                                 "opaque-root": opaque_root_image}


def write_blobs(blobs: list[bytes], where: Path) -> list[str]:
    where.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(blobs):
        p = where / f"{i}.blob"
        p.write_bytes(data)
        paths.append(str(p))
    return paths


# --- comparing trees ------------------------------------------------------------------------

# snapshot_tree and listing_dict also run as nobody in the user namespace
# (their source is sent there): standard library only.

def snapshot_tree(root: str, recent_ns: int) -> dict:
    """Every entry below ``root`` (itself excluded), no symlink followed:
    type, mode, owner, mtime, size and sha256 of files, symlink targets,
    xattrs but ``security.*`` (the host's labels); a directory's mtime as
    ``"recent"`` if set during the test (a directory the layers only imply
    and no lower layer has). And the hardlink groups, and "ghosts": names
    readdir gives that do not exist (overlayfs passes readdir through to
    the one layer that provides a directory, whiteout devices included)."""
    import hashlib
    import os
    import stat
    entries: dict = {}
    inodes: dict = {}
    ghosts: list = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                ghosts.append(rel)
                continue
            kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink",
                    stat.S_IFIFO: "fifo", stat.S_IFCHR: "char",
                    stat.S_IFBLK: "block"}[stat.S_IFMT(st.st_mode)]
            e = {"type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid,
                 "gid": st.st_gid, "mtime": st.st_mtime_ns}
            if kind == "reg":
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                e["size"], e["sha256"] = st.st_size, h.hexdigest()
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif kind == "symlink":
                e["target"] = os.readlink(p)
            elif kind == "dir" and st.st_mtime_ns >= recent_ns:
                e["mtime"] = "recent"
            if kind != "symlink":
                e["xattrs"] = {k: os.getxattr(p, k).hex() for k in sorted(os.listxattr(p))
                               if not k.startswith("security.")}
            entries[rel] = e
    links = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return {"entries": entries, "hardlinks": links, "ghosts": sorted(ghosts)}


def listing_dict(listing: LayerListing) -> dict:
    """A listing as JSON-able data, comparable across processes."""
    return {"kinds": dict(sorted(listing.kinds.items())),
            "whiteouts": sorted(listing.whiteouts), "opaque_dirs": sorted(listing.opaque_dirs),
            "symlinks": dict(sorted(listing.symlinks.items())),
            "hardlinks": dict(sorted(listing.hardlinks.items())),
            "implicit_dirs": sorted(listing.implicit_dirs),
            "skipped_xattrs": sorted(list(x) for x in listing.skipped_xattrs),
            "warnings": list(listing.warnings)}


def without_devices(snap: dict) -> dict:
    """The snapshot of an overlay as flat mode makes it: no device nodes."""
    return {"entries": {k: v for k, v in snap["entries"].items()
                        if v["type"] not in ("char", "block")},
            "hardlinks": snap["hardlinks"], "ghosts": []}


def as_flat(listing: LayerListing) -> dict:
    """An overlay-mode listing as flat mode gives it: devices not listed
    (their warnings are compared separately)."""
    out = listing_dict(listing)
    out["kinds"] = {k: v for k, v in out["kinds"].items() if v not in ("char", "block")}
    return out


def split_warnings(listing: dict) -> tuple[dict, list[str]]:
    """(listing without flat mode's own warnings, those warnings)."""
    own = [w for w in listing["warnings"] if "skipped (flat extraction)" in w
           or "does not map" in w]
    return {**listing, "warnings": [w for w in listing["warnings"] if w not in own]}, own


def diff(a: dict, b: dict) -> list:
    """The entries that differ, for readable assertion messages."""
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)][:20]


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of its own (where rootless profiling builds the tree)."""
    mounts: list[Path] = []

    def mount(name: str = "tmpfs", size: str = "4g") -> Path:
        p = tmp_path / name
        p.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(p)], check=True)
        mounts.append(p)
        return p

    yield mount
    for p in reversed(mounts):
        subprocess.run(["umount", "--lazy", str(p)], check=False)


def recent_ns() -> int:
    # Filesystem timestamps come from the coarse clock: leave a margin.
    return time.time_ns() - 2 * 10**9


def overlay_reference(blobs: list[bytes], scratch: Path, since: int) -> tuple[dict, list]:
    source = BlobSource()
    descs = [source.add(b) for b in blobs]
    with assemble_image_rootfs(source, descs, str(scratch)) as (mnt, listings):
        return snapshot_tree(mnt, since), listings


# --- equivalence with the overlay -------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(IMAGES))
def test_flat_tree_is_what_the_overlay_shows(tmp_path, tmpfs, image):
    since = recent_ns()
    blobs = IMAGES[image](tmp_path)
    want, ovl_listings = overlay_reference(blobs, tmp_path / "scratch", since)
    fs = tmpfs()
    listings = assemble_flat_rootfs(write_blobs(blobs, tmp_path / "blobs"), str(fs / "root"),
                                    str(fs), spool_dir=str(tmp_path))
    got = snapshot_tree(str(fs / "root"), since)
    assert sorted(os.listdir(fs)) == ["root"]  # scratch/layer is gone

    ref = without_devices(want)
    assert got["ghosts"] == []
    whiteouts = set().union(*(x.whiteouts for x in ovl_listings))
    assert set(want["ghosts"]) <= whiteouts, want["ghosts"]
    if image == "main":
        # The one difference: overlayfs shows the top-most copy of a
        # directory, and the overlay extraction gives an implied one the
        # lower copy's owner, mode and mtime but not its xattrs. The flat
        # tree keeps the lower directory itself, xattrs and all, as
        # containerd's applier does.
        assert ref["entries"]["x/kept"]["xattrs"] == {}
        assert got["entries"]["x/kept"]["xattrs"] == {"user.k": b"kept".hex()}
        ref["entries"]["x/kept"]["xattrs"] = got["entries"]["x/kept"]["xattrs"]
    assert diff(got["entries"], ref["entries"]) == []
    assert got["hardlinks"] == ref["hardlinks"]
    assert len(listings) == len(ovl_listings)
    for i, (flat, ovl) in enumerate(zip(listings, ovl_listings, strict=True)):
        flat_d, own = split_warnings(listing_dict(flat))
        assert flat_d == as_flat(ovl), i
        devices = {p for p, k in ovl.kinds.items() if k in ("char", "block")}
        assert len(own) == len(devices) and all(any(repr(p) in w for w in own)
                                                for p in devices)

    if image == "main":
        e = got["entries"]
        # Spot checks, so that a bug shared by both builds still shows.
        assert "top0" not in e and "w/keep" not in e and e["w/x/y/z"]["size"] == 5
        assert "a/b/c/d" not in e and "a/b/c/fresh" in e and e["a/b/c"]["mtime"] == "recent"
        assert set(k for k in e if k.startswith("o/")) == {"o/only"}
        assert e["m"]["type"] == "reg" and "m/inner" not in e
        assert e["filedir"]["type"] == "dir" and e["filedir"]["mode"] == "0o710"
        assert e["symdir"] == {**e["symdir"], "type": "symlink", "target": "target"}
        assert e["lnk"]["type"] == "dir" and "lnk/t0" not in e and "target/t0" in e
        assert e["sd"]["mode"] == "0o700" and e["sd"]["mtime"] == 1_700_000_000 * 10**9
        assert (e["usr"]["mode"], e["usr"]["uid"], e["usr"]["mtime"]) == ("0o750", 3, 111 * 10**9)
        # implied, merged into: the lower directory's mtime stays
        assert e["usr/local/bin"]["mtime"] == 1_700_000_000 * 10**9
        assert "usr/local/bin/tool2" in e
        # explicit, merged into with entries moved in and out: the layer's
        assert (e["usr/local"]["mode"], e["usr/local"]["mtime"]) == ("0o701", 444 * 10**9)
        assert (e["etc"]["mode"], e["etc"]["mtime"]) == ("0o700", 300 * 10**9)
        assert (e["x"]["mode"], e["x"]["mtime"]) == ("0o711", 400 * 10**9)
        assert "etc/shadow" not in e and e["etc/passwd"]["mode"] == "0o600"
        assert set(k for k in e if k.startswith("redo/")) == {"redo/x"}
        assert set(k for k in e if k.startswith("same/")) == {"same/new"}
        assert "chrwh" not in e and "never" not in e and e["pf"]["type"] == "dir"
        # hl/a replaced in layer 1, hl/b whited out in layer 2: hl/c is alone
        assert got["hardlinks"] == [["hl2/a", "hl2/b"]] and e["hl/c"]["size"] == 6
        assert e["x/dir"]["xattrs"] == {"user.e": b"upper".hex()}
        assert e["x/file"]["xattrs"] == {"trusted.t": b"1".hex(), "user.comment": b"hi".hex()}
        assert e["times/frac"]["mtime"] == 1_600_000_000_750_000_000
        assert e["fifo"]["type"] == "fifo" and e["modes/none"]["mode"] == "0o0"
        assert e["own/dir/bigid"]["uid"] == 3_000_000
        assert e["sparse"]["size"] == 16 << 20
        assert os.stat(fs / "root/sparse").st_blocks * 512 < 1 << 20  # holes stay holes
        assert "dev/null" not in e and e["dev"]["type"] == "dir"
        assert layer_for("usr/local/bin/tool2", listings) == 1
        assert layer_for("w/x/y/z", listings) == 2 and layer_for("w/keep", listings) is None
    else:
        assert sorted(got["entries"]) == ["etc", "etc/a", "keep", "keep/new", "only"]


def test_real_debian_image(tmp_path, tmpfs, test_images):
    """The two-layer Debian image (a diff layer with a whiteout and implied
    parents), flattened and as overlayfs shows it."""
    layout = Path(test_images.debian_multilayer)
    src = open_source(parse_reference(f"oci:{layout}:latest"))
    manifest = json.loads(src.root()[0])
    layers = [Descriptor.from_json(x) for x in manifest["layers"]]
    assert len(layers) == 2
    paths = [str(layout / "blobs" / "sha256" / x.digest.split(":", 1)[1]) for x in layers]
    since = recent_ns()
    with assemble_image_rootfs(src, layers, str(tmp_path / "scratch")) as (mnt, ovl_listings):
        want = snapshot_tree(mnt, since)
    fs = tmpfs()
    listings = assemble_flat_rootfs(paths, str(fs / "root"), str(fs), spool_dir=str(tmp_path))
    got = snapshot_tree(str(fs / "root"), since)
    assert len(got["entries"]) > 6000
    assert diff(got["entries"], without_devices(want)["entries"]) == []
    assert got["hardlinks"] == want["hardlinks"] and got["ghosts"] == []
    assert [listing_dict(x) for x in listings] == [as_flat(x) for x in ovl_listings]
    assert "etc/issue.net" not in got["entries"] and "usr/local/bin/hello" in got["entries"]
    assert "usr" in listings[1].implicit_dirs


def test_flat_extraction_lists_what_the_other_does(tmp_path):
    """One layer on its own: the same listing, nothing on disk for whiteouts
    and opacity, devices skipped, FIFOs made."""
    specs = [*L0, wh("gone"), wh("d"), f("d/x"), opq("x"), d("o2"), wh("o2"),
             Spec("z", CHR, devmajor=0, devminor=0), f("z2"), Spec("z2", CHR, devmajor=0,
                                                                    devminor=0)]
    tar = tmp_path / "l.tar"
    tar.write_bytes(build_tar(specs))
    normal = extract_layer(str(tar), str(tmp_path / "normal"))
    flat = extract_layer(str(tar), str(tmp_path / "flat"), flat=True)
    flat_d, own = split_warnings(listing_dict(flat))
    assert flat_d == as_flat(normal)
    assert sorted(own) == ["'dev/loop0': block device 7/0 skipped (flat extraction)",
                           "'dev/null': character device 1/3 skipped (flat extraction)"]
    assert flat.whiteouts == {"gone", "d", "z", "z2", "o2"}
    assert flat.opaque_dirs == {"d", "x", "o2"}
    out = tmp_path / "flat"
    for p in ("gone", "z", "z2", "dev/null", "dev/loop0"):
        assert not os.path.lexists(out / p), p
    for p in ("d", "x", "o2"):
        assert "trusted.overlay.opaque" not in os.listxattr(out / p)
        assert "trusted.overlay.opaque" in os.listxattr(tmp_path / "normal" / p)
    assert sorted(os.listdir(out / "d")) == ["x"]
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode)
    assert os.getxattr(out / "x/file", "trusted.t") == b"1"  # root may: not skipped


# --- rootless ----------------------------------------------------------------------------------

CHILD = '''
from __future__ import annotations
import json, os, sys
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
from profiler.linux import mount
from profiler.rootfs import LayerListing, assemble_flat_rootfs
''' + inspect.getsource(snapshot_tree) + inspect.getsource(listing_dict) + '''
mnt, recent, blobs = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
try:
    mount("tmpfs", mnt, "tmpfs", 0, "mode=0755")
except OSError as e:
    sys.exit("cannot mount a tmpfs: " + e.strerror)
root = os.path.join(mnt, "root")
listings = assemble_flat_rootfs(blobs, root, mnt)
json.dump({"ids": [os.getuid(), os.getgid()],
           "uid_map": open("/proc/self/uid_map").read().split(),
           "left": sorted(os.listdir(mnt)),
           "snapshot": snapshot_tree(root, recent),
           "listings": [listing_dict(x) for x in listings]}, sys.stdout)
'''


@pytest.fixture(scope="module")
def nobody_python():
    """(python, source dir): Debian's python3, which any user may run (root's
    interpreter lives under /root, 0700), and a world-readable copy of the
    packages. Flat assembly needs nothing outside the standard library but
    zstandard, for zstd layers only, so no venv is needed."""
    python = shutil.which("python3", path="/usr/bin")
    if python is None or not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("needs /usr/bin/python3, setpriv and unshare (util-linux)")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "unshare", "--user", "--map-root-user", "--mount", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are not available: {probe.stderr.strip()}")
    public = Path(tempfile.mkdtemp(prefix="estargz-flat-"))
    try:
        for pkg in ("estargz", "profiler"):
            shutil.copytree(REPO / pkg, public / "src" / pkg,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for p in [public, *public.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield python, public
    finally:
        shutil.rmtree(public)


def run_as_nobody(nobody_python, blobs: list[bytes], since: int) -> dict:
    python, public = nobody_python
    work = Path(tempfile.mkdtemp(dir=public))
    try:
        work.chmod(0o755)
        paths = write_blobs(blobs, work / "blobs")
        for path in paths:
            os.chmod(path, 0o644)
        (work / "mnt").mkdir(mode=0o755)
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "unshare", "--user", "--map-root-user", "--mount",
                            python, "-c", CHILD, str(public / "src"), str(work / "mnt"),
                            str(since), *paths],
                           capture_output=True, text=True, cwd="/", timeout=600,
                           env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent",
                                "LANG": "C.UTF-8"})
        assert p.returncode == 0, p.stderr[-3000:]
        # Only the namespace had the tmpfs: nothing was written here.
        assert os.listdir(work / "mnt") == []
        return json.loads(p.stdout)
    finally:
        shutil.rmtree(work)


def as_namespace_root(snap: dict) -> dict:
    """A tree built as real root, as root of the single-id namespace sees it:
    everything owned by 0, no trusted.* xattrs (the namespace cannot set them)."""
    entries = {}
    for k, v in snap["entries"].items():
        v = {**v, "uid": 0, "gid": 0}
        if "xattrs" in v:
            v["xattrs"] = {n: x for n, x in v["xattrs"].items() if not n.startswith("trusted.")}
        entries[k] = v
    return {"entries": entries, "hardlinks": snap["hardlinks"], "ghosts": snap["ghosts"]}


@pytest.mark.parametrize("image", ["main", "debian"])
def test_rootless_assembly_in_a_user_namespace(tmp_path, tmpfs, nobody_python, image,
                                               request):
    if image == "debian":
        layout = Path(request.getfixturevalue("test_images").debian_multilayer)
        manifest = json.loads(open_source(parse_reference(f"oci:{layout}:latest")).root()[0])
        blobs = [(layout / "blobs" / "sha256" / x["digest"].split(":", 1)[1]).read_bytes()
                 for x in manifest["layers"]]
    else:
        blobs = main_image(tmp_path, zstd=False)  # no zstandard in Debian's python3 here
    since = recent_ns()
    out = run_as_nobody(nobody_python, blobs, since)
    assert out["ids"] == [0, 0] and out["uid_map"] == ["0", "65534", "1"]
    assert out["left"] == ["root"]

    fs = tmpfs()
    listings = assemble_flat_rootfs(write_blobs(blobs, tmp_path / "blobs"), str(fs / "root"),
                                    str(fs), spool_dir=str(tmp_path))
    want = as_namespace_root(snapshot_tree(str(fs / "root"), since))
    got = out["snapshot"]
    assert diff(got["entries"], want["entries"]) == []
    assert got["hardlinks"] == want["hardlinks"] and got["ghosts"] == want["ghosts"] == []

    assert len(out["listings"]) == len(listings)
    with_unmapped = []
    for i, (ns, real) in enumerate(zip(out["listings"], listings, strict=True)):
        ns_d, ns_own = split_warnings(ns)
        real_d, real_own = split_warnings(listing_dict(real))
        # Beyond warnings, the namespace skipped trusted.* xattrs: the only difference.
        skipped = [x for x in ns_d["skipped_xattrs"] if x not in real_d["skipped_xattrs"]]
        assert all(name.startswith("trusted.") for _, name, _ in skipped), skipped
        assert {**ns_d, "skipped_xattrs": []} == {**real_d, "skipped_xattrs": []}, i
        # Owners it cannot map: one warning for the layer, not one per file.
        unmapped = [w for w in ns_own if "does not map" in w]
        assert len(unmapped) <= 1 and [w for w in ns_own if w not in unmapped] == real_own
        with_unmapped += [i] * len(unmapped)
    # Only the base layers have owners other than root (uid 1000, gid 42,
    # ...); the implied directories of the others copy the namespace's view.
    assert with_unmapped == [0]
    ns0 = out["listings"][0]
    if image == "main":
        assert ["x/file", "trusted.t", "Operation not permitted"] in ns0["skipped_xattrs"]
        assert any("'dev/null': character device" in w for w in ns0["warnings"])
        assert any(w.endswith("entries have owners this user namespace does not map "
                              "(first 'etc/shadow', 0:42); owned by its root instead")
                   for w in ns0["warnings"])


# --- sizing the tmpfs ----------------------------------------------------------------------------

def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_layer_usage_bounds_what_tmpfs_uses(tmp_path, tmpfs, debian_layer):
    many = [f(f"small/{i}", b"x" * (i % 5000)) for i in range(2000)]
    links = [sym(f"links/{i}", "t" * n) for i, n in enumerate((1, 127, 128, 129, 1000, 4000))]
    crafted = {
        "l0": compress(build_tar(L0), "gz"),
        "small-files": build_tar([d("small"), *many, d("links"), *links,
                                  f("dup", b"a" * 10000), f("dup", b"b" * 10000)]),
        "sparse": compress(sparse_tar(tmp_path), "zst"),
        "debian": debian_layer.read_bytes(),
    }
    fs = tmpfs()
    for name, blob in crafted.items():
        path = tmp_path / f"{name}.blob"
        path.write_bytes(blob)
        bound = layer_usage(str(path), spool_dir=str(tmp_path))
        before = used_bytes(fs)
        extract_layer(str(path), str(fs / name), flat=True, spool_dir=str(tmp_path))
        used = used_bytes(fs) - before
        assert bound >= used, (name, bound, used)
        # Close: duplicates and pages shared by sparse pieces are all it adds.
        assert bound <= used * 1.01 + 8 * 4096, (name, bound, used)
    assert layer_usage(str(tmp_path / "sparse.blob")) < 1 << 20


def test_a_tmpfs_of_the_summed_usage_holds_the_assembly(tmp_path, tmpfs, test_images):
    layout = Path(test_images.debian_multilayer)
    manifest = json.loads(open_source(parse_reference(f"oci:{layout}:latest")).root()[0])
    images = {
        "main": write_blobs(main_image(tmp_path), tmp_path / "main"),
        "debian": [str(layout / "blobs" / "sha256" / x["digest"].split(":", 1)[1])
                   for x in manifest["layers"]],
    }
    for name, paths in images.items():
        need = sum(layer_usage(p, spool_dir=str(tmp_path)) for p in paths)
        fs = tmpfs(f"fs-{name}", size=str(need))
        assemble_flat_rootfs(paths, str(fs / "root"), str(fs), spool_dir=str(tmp_path))
        if name == "debian":  # little replaced across layers: the bound is close
            assert used_bytes(fs) > need * 0.95, (used_bytes(fs), need)
    # A layer that comes twice counts twice: its second copy is extracted
    # beside the first, which it replaces only once merged.
    twice = write_blobs([build_tar([f(f"big{i}", bytes(65536)) for i in range(40)])],
                        tmp_path / "twice") * 2
    once = layer_usage(twice[0])
    assert once == 40 * 65536
    fs = tmpfs("fs-twice", size=str(2 * once))
    assemble_flat_rootfs(twice, str(fs / "root"), str(fs))
    fs = tmpfs("fs-once", size=str(once))
    with pytest.raises(StorageError, match="No space left"):
        assemble_flat_rootfs(twice, str(fs / "root"), str(fs))
    # The limit is real: a tenth less does not hold Debian.
    small = tmpfs("small", size=str(int(need * 0.9)))
    with pytest.raises(StorageError, match="No space left"):
        assemble_flat_rootfs(paths, str(small / "root"), str(small), spool_dir=str(tmp_path))
    assert sorted(os.listdir(small)) == ["root"]


# --- hostile input ------------------------------------------------------------------------------

@pytest.fixture
def canary(tmp_path) -> Path:
    c = tmp_path / "box" / "canary"
    (c / "etc").mkdir(parents=True)
    (c / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (c / "secret").write_text("do not touch\n")
    return c


def tree_state(top: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in ["", *dirs, *files]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[p] = (st.st_mode, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, data)
    return out


def test_hostile_layers_are_refused_in_flat_mode_too(tmp_path, canary):
    before = tree_state(canary.parent)
    for cid, specs, error in hostile_cases(str(canary)):
        blob = tmp_path / f"{cid}.tar"
        blob.write_bytes(build_tar(specs))
        scratch = tmp_path / "s" / cid
        scratch.mkdir(parents=True)
        root = scratch / "root"
        if error is None:
            assemble_flat_rootfs([str(blob)], str(root), str(scratch))
        else:
            with pytest.raises(UnsupportedEntry, match=error):
                assemble_flat_rootfs([str(blob)], str(root), str(scratch))
        assert sorted(os.listdir(scratch)) == ["root"], cid  # scratch/layer removed
        assert tree_state(canary.parent) == before, cid
    assert sorted(os.listdir(tmp_path / "s" / "absolute-names" / "root")) == ["abs", "tmp"]


def test_merge_never_writes_through_a_lower_symlink(tmp_path, canary):
    """A lower layer's symlinks point at the canary; an upper layer whites out,
    makes opaque and writes below them. Only the image's tree changes."""
    c = str(canary)
    lower = [sym("etc", f"{c}/etc"), sym("abs", c), sym("up", "../../.."),
             sym("file", f"{c}/secret"), sym("deep", c)]
    upper = [wh("etc/passwd"), opq("abs"), f("abs/new"), f("up/escape"), f("file", b"mine"),
             d("deep", 0o700), wh("deep/etc"), wh("deep/secret")]
    blobs = write_blobs([build_tar(lower), build_tar(upper)], tmp_path / "blobs")
    before = tree_state(canary.parent)
    (tmp_path / "work").mkdir()
    root = tmp_path / "work" / "root"
    listings = assemble_flat_rootfs(blobs, str(root), str(tmp_path / "work"))
    assert tree_state(canary.parent) == before
    assert (canary / "etc/passwd").exists() and (canary / "secret").read_text()
    view = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert view == ["abs", "abs/new", "deep", "etc", "file", "up", "up/escape"]
    assert not any((root / p).is_symlink() for p in view)
    assert (root / "file").read_bytes() == b"mine"
    assert layer_for("etc/passwd", listings) is None
    # merge_layer on its own: a root whose parent of a whiteout is a symlink
    # out of the tree loses nothing outside.
    r2, l2 = tmp_path / "r2", tmp_path / "l2"
    r2.mkdir()
    os.symlink(c, r2 / "x")
    listing = extract_layer(str(write_blobs([build_tar([wh("x/secret"), opq("x/etc")])],
                                            tmp_path / "b2")[0]), str(l2), flat=True)
    merge_layer(str(r2), str(l2), listing)
    assert tree_state(canary.parent) == before and not l2.exists()
    assert (r2 / "x").is_dir() and not (r2 / "x").is_symlink()


def test_deep_trees_merge_without_recursion_or_running_out_of_fds(tmp_path, tmpfs):
    """Two layers with the same 1 500-deep tree (PATH_MAX allows about 2 000):
    the merge walks it all, past the fd cache's limit, with no recursion."""
    deep = "/".join(["d"] * 1500)
    blobs = [build_tar([f(deep + "/leaf", b"lower"), f(deep + "/gone"), d("d", 0o700)]),
             build_tar([f(deep + "/leaf2", b"upper"), wh(deep + "/gone"),
                        opq("/".join(["d"] * 700))])]
    fs = tmpfs()
    fds = len(os.listdir("/proc/self/fd"))
    listings = assemble_flat_rootfs(write_blobs(blobs, tmp_path / "b"), str(fs / "root"),
                                    str(fs))
    assert len(os.listdir("/proc/self/fd")) == fds  # every directory fd closed
    bottom = fs / "root" / deep
    assert sorted(os.listdir(bottom)) == ["leaf2"]  # leaf: below the opaque directory
    assert (bottom / "leaf2").read_bytes() == b"upper"
    assert stat.S_IMODE(os.stat(fs / "root/d").st_mode) == 0o700  # implied: kept
    assert layer_for(deep + "/leaf2", listings) == 1
    assert sorted(os.listdir(fs)) == ["root"]


def test_assembly_failures(tmp_path, tmpfs):
    good = write_blobs([build_tar([f("a")])], tmp_path / "good")[0]
    bad = tmp_path / "truncated.tar"
    bad.write_bytes(build_tar([f("a", b"x" * 5000), f("b")])[:2048])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(InvalidInput, match="truncated"):
        assemble_flat_rootfs([good, str(bad)], str(scratch / "root"), str(scratch))
    assert sorted(os.listdir(scratch)) == ["root"]  # the layer directory went
    with pytest.raises(StorageError, match="empty"):  # root holds layer 0 now
        assemble_flat_rootfs([good], str(scratch / "root"), str(scratch))
    (scratch / "layer").mkdir()
    (scratch / "layer/mine").write_text("keep")
    with pytest.raises(StorageError, match="already exists"):
        assemble_flat_rootfs([good], str(scratch / "root2"), str(scratch))
    assert (scratch / "layer/mine").read_text() == "keep"  # not ours to delete
    os.symlink(scratch / "elsewhere", scratch / "link")
    (scratch / "elsewhere").mkdir()
    with pytest.raises(StorageError, match="empty directory"):
        assemble_flat_rootfs([good], str(scratch / "link"), str(tmp_path))
    fs = tmpfs()
    with pytest.raises(StorageError, match="same filesystem"):
        assemble_flat_rootfs([good], str(fs / "root"), str(scratch))
    with pytest.raises(StorageError, match="cannot open"):
        assemble_flat_rootfs([str(tmp_path / "missing")], str(fs / "root3"), str(fs))
    assert sorted(os.listdir(fs)) == ["root", "root3"]
    # A missing scratch directory is made (one level), and stays.
    assemble_flat_rootfs([good], str(fs / "root4"), str(fs / "scratch"))
    assert os.listdir(fs / "scratch") == [] and os.listdir(fs / "root4") == ["a"]
    with pytest.raises(StorageError, match="cannot use"):
        assemble_flat_rootfs([good], str(fs / "root5"), str(fs / "no/such/scratch"))
