#!/usr/bin/env python3
"""Build small container images for tests, from Debian packages, into a cache.

Usage: testdata/images/build.py [--force] IMAGE...
       testdata/images/build.py [--force] all

IMAGE is one of:

  busybox             OCI layout, one gzip layer: Debian's busybox-static as
                      /bin/busybox plus one symlink per applet; Cmd ["sh"];
                      host architecture; tag "latest".  Also oci-archive.tar.
  debian-multilayer   OCI layout made with umoci: layer 1 is the Debian minbase
                      rootfs (testdata/build-debian-rootfs.sh), layer 2 a real
                      `umoci repack` diff layer (adds /usr/local/bin/hello,
                      changes /etc/motd, whiteout for /etc/issue.net).
  debian-python3      OCI layout, two gzip layers: layer 1 is debian-multilayer's
                      layer 1 (same blob), layer 2 what installing python3 adds
                      and changes (a diff of build-debian-rootfs.sh's minbase
                      and --with-python3 tars, whiteouts for removed files);
                      Cmd ["python3", "-c", "import json"].
  two-platform        OCI layout whose tag "latest" is an image index: the
                      busybox image (host platform), a synthetic arm64 image
                      (text files only; amd64 on an arm64 host) and one
                      BuildKit-style attestation manifest per platform
                      (platform unknown/unknown).  Tag "platforms-only" is the
                      same index without the attestations.
  docker-media-types  The busybox image with Docker schema 2 media types, as an
                      OCI layout (oci/) and as a `docker save` archive
                      (docker-archive.tar, RepoTags busybox:latest).
  lazy-kinds          OCI layout + oci-archive.tar: busybox's layer, then a
                      GNU-format and a PAX-format gzip layer with every entry
                      kind eStargz and overlayfs must carry (whiteouts of a
                      file and a directory, an opaque directory, hardlinks,
                      symlinks, char/block devices, a FIFO, user.* and
                      security.capability xattrs, a 9 MiB file, an empty file,
                      non-ASCII and >100-byte names, setuid/setgid/sticky/0000
                      modes, uids 1000 and 65534, a sub-second mtime).  Its Cmd
                      reads some of them and prints the one line stored in
                      expected-output.txt.

Output: ${ESTARGZ_CACHE:-$HOME/.cache/estargz-dev}/images/IMAGE/, holding
oci/ (the OCI image layout), build-info.json and, depending on the image,
oci-archive.tar or docker-archive.tar.  The directory's path is printed as the
last line on stdout (for "all", one line per image); progress goes to stderr.

The directory is built under a temporary name beside it and renamed into
place, so it is either complete or absent.  A cached image is reused when its
build-info.json "key" matches: a hash of this script and of the inputs
(busybox-static version, the Debian layer tar, tool versions,
SOURCE_DATE_EPOCH).  --force rebuilds anyway.  Builders of the same image
serialize on a lock file; temporary directories left by a killed build are
removed by the next one.

Everything gets fixed timestamps (SOURCE_DATE_EPOCH, default 1704067200 =
2024-01-01T00:00:00Z): rebuilding from the same inputs gives the same digests.

Needs: python3 >= 3.9 (stdlib only), dpkg; umoci (debian-multilayer,
debian-python3), skopeo (oci-archive.tar, docker-archive.tar and validation);
root and debootstrap for the Debian layers.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import gzip
import hashlib
import io
import json
import os
import platform
import posixpath
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE_ROOT = Path(os.environ.get("ESTARGZ_CACHE") or Path.home() / ".cache" / "estargz-dev")
IMAGES = CACHE_ROOT / "images"
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH") or 1704067200)
TAG = "latest"
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Media types.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"
REF_NAME = "org.opencontainers.image.ref.name"


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


class BuildError(Exception):
    pass


def run(*args: str, capture: bool = False, env: Optional[dict] = None) -> str:
    """Run a command; its stdout goes to our stderr unless captured."""
    cmd = [str(a) for a in args]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else sys.stderr,
                           stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH), **(env or {})})
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} not found; install it (apt-get install {cmd[0]})")
    if p.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.stdout if capture else ""


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise BuildError(f"{tool} not found; install it with: apt-get install {package}")


def iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_platform() -> dict:
    """The OCI platform of this machine, from dpkg's architecture name."""
    try:
        deb = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        deb = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    table = {
        "amd64": ("amd64", None), "arm64": ("arm64", "v8"), "armhf": ("arm", "v7"),
        "armel": ("arm", "v5"), "i386": ("386", None), "ppc64el": ("ppc64le", None),
        "s390x": ("s390x", None), "riscv64": ("riscv64", None), "mips64el": ("mips64le", None),
    }
    arch, variant = table.get(deb, (deb, None))
    p = {"architecture": arch, "os": "linux"}
    if variant:
        p["variant"] = variant
    return p


def canonical_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# --- writing an OCI image layout --------------------------------------------

class Layout:
    """An OCI image layout being written by hand."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict] = []

    def blob(self, data: bytes, media_type: str, **extra) -> dict:
        """Store ``data``; return its descriptor."""
        digest = sha256(data)
        path = self.root / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def read(self, desc: dict) -> bytes:
        return (self.root / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]).read_bytes()

    def tag(self, desc: dict, name: str) -> None:
        ann = {**desc.get("annotations", {}), REF_NAME: name}
        self.index.append({**{k: v for k, v in desc.items() if k != "annotations"},
                           "annotations": ann})

    def finish(self) -> None:
        (self.root / "index.json").write_bytes(canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index}))


def read_layout(root: Path, tag: str = TAG):
    """(index.json, descriptor tagged ``tag``) of an existing layout."""
    index = json.loads((root / "index.json").read_text())
    for d in index["manifests"]:
        if d.get("annotations", {}).get(REF_NAME) == tag:
            return index, d
    raise BuildError(f"{root}: no tag {tag!r}")


def blob_path(root: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return root / "blobs" / algo / hexd


# --- layer tars --------------------------------------------------------------

class Entry:
    def __init__(self, name: str, kind: bytes, mode: int, data: bytes = b"",
                 linkname: str = "", mtime: int = EPOCH):
        self.name, self.kind, self.mode = name, kind, mode
        self.data, self.linkname, self.mtime = data, linkname, mtime


def make_tar(entries: Iterable[Entry]) -> bytes:
    """A deterministic layer tar: parents first, names sorted, no './'."""
    by_name = {e.name.strip("/"): e for e in entries}
    # Every parent directory gets an entry.
    for name in list(by_name):
        parts = name.split("/")
        for i in range(1, len(parts)):
            by_name.setdefault("/".join(parts[:i]), Entry("/".join(parts[:i]), tarfile.DIRTYPE, 0o755))
    order = sorted(by_name, key=lambda n: n.split("/"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in order:
            e = by_name[name]
            ti = tarfile.TarInfo(name + "/" if e.kind == tarfile.DIRTYPE else name)
            ti.type, ti.mode, ti.mtime = e.kind, e.mode, e.mtime
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            ti.linkname = e.linkname
            if e.kind == tarfile.REGTYPE:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a fixed header (mtime 0, no name) for reproducible digests."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


# --- busybox-static from Debian ---------------------------------------------

def is_static_elf(data: bytes) -> bool:
    """True for an ELF executable with no PT_INTERP (no dynamic loader)."""
    import struct
    if data[:4] != b"\x7fELF":
        return False
    is64, little = data[4] == 2, data[5] == 1
    e = "<" if little else ">"
    if is64:
        phoff, = struct.unpack_from(e + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(e + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 0x2A)
    for i in range(phnum):
        p_type, = struct.unpack_from(e + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def busybox_from_debian(tmp: Path) -> tuple[bytes, str]:
    """(binary, package version) of busybox-static: the installed copy when
    its md5sum matches dpkg's record, else the .deb from apt-get download."""
    pkg = "busybox-static"
    q = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", pkg],
                       capture_output=True, text=True)
    if q.returncode == 0 and q.stdout.startswith("install ok installed"):
        version = q.stdout.split("\t", 1)[1]
        sums = Path(f"/var/lib/dpkg/info/{pkg}.md5sums")
        if not sums.exists():
            sums = Path(f"/var/lib/dpkg/info/{pkg}:{host_debarch()}.md5sums")
        for line in sums.read_text().splitlines():
            md5, name = line.split(None, 1)
            if name.strip() in ("bin/busybox", "usr/bin/busybox"):
                for cand in ("/" + name.strip(), "/bin/busybox", "/usr/bin/busybox"):
                    if os.path.exists(cand):
                        data = Path(cand).read_bytes()
                        if hashlib.md5(data).hexdigest() == md5:
                            return data, version
                log(f"installed {pkg} does not match its md5sums; downloading the .deb")
                break
    need("apt-get", "apt")
    log(f"apt-get download {pkg}")
    dl = tmp / "deb"
    dl.mkdir()
    p = subprocess.run(["apt-get", "download", pkg], cwd=dl, stdout=sys.stderr,
                       stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise BuildError(f"apt-get download {pkg} failed (run apt-get update?): {p.stderr.strip()}")
    deb = next(dl.glob("*.deb"))
    version = run("dpkg-deb", "-f", deb, "Version", capture=True).strip()
    fs = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(fs)) as tf:
        for m in tf:
            if m.name.lstrip("./") in ("bin/busybox", "usr/bin/busybox") and m.isfile():
                return tf.extractfile(m).read(), version
    raise BuildError(f"{deb.name} has no bin/busybox")


def host_debarch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True).stdout.strip() or "amd64"


def busybox_applets(binary: bytes, tmp: Path) -> list[str]:
    """Applet paths (e.g. 'bin/sh', 'usr/bin/env') from `busybox --list-full`."""
    exe = tmp / "busybox"
    exe.write_bytes(binary)
    exe.chmod(0o755)
    out = run(exe, "--list-full", capture=True)
    exe.unlink()
    names = sorted({l.strip().lstrip("/") for l in out.splitlines()
                    if "/" in l and l.strip().lstrip("/") != "bin/busybox"})
    if "bin/sh" not in names:
        raise BuildError("busybox --list-full has no bin/sh")
    return names


# --- image builders ------------------------------------------------------------

def busybox_inputs() -> tuple[dict, Callable[[Path], None]]:
    # The binary is read once here for the key; build() reuses it.
    tmp = Path(tempfile.mkdtemp(prefix="estargz-busybox-"))
    try:
        binary, version = busybox_from_debian(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not is_static_elf(binary):
        raise BuildError("busybox-static's /bin/busybox is not a static executable")
    inputs = {"busybox-static": version, "busybox.sha256": sha256(binary),
              "platform": host_platform()}

    def build(out: Path) -> None:
        applets = busybox_applets(binary, out)
        entries = [Entry("bin/busybox", tarfile.REGTYPE, 0o755, binary)]
        entries += [Entry(a, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox") for a in applets]
        entries += [
            Entry("etc/passwd", tarfile.REGTYPE, 0o644,
                  b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
            Entry("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n"),
            Entry("dev", tarfile.DIRTYPE, 0o755), Entry("proc", tarfile.DIRTYPE, 0o755),
            Entry("sys", tarfile.DIRTYPE, 0o755), Entry("root", tarfile.DIRTYPE, 0o700),
            Entry("tmp", tarfile.DIRTYPE, 0o1777), Entry("var", tarfile.DIRTYPE, 0o755),
            Entry("sbin", tarfile.DIRTYPE, 0o755), Entry("usr/sbin", tarfile.DIRTYPE, 0o755),
        ]
        tar = make_tar(entries)
        layout = Layout(out / "oci")
        layer = layout.blob(gzip_bytes(tar), OCI_LAYER_GZIP)
        created_by = f"estargz testdata/images/build.py busybox (busybox-static {version})"
        config = {
            "created": iso(EPOCH),
            **host_platform(),
            "config": {"Env": [ENV_PATH], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
            "history": [{"created": iso(EPOCH), "created_by": created_by}],
        }
        cfg = layout.blob(canonical_json(config), OCI_CONFIG)
        manifest = layout.blob(canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": [layer]}),
            OCI_MANIFEST)
        layout.tag(manifest, TAG)
        layout.finish()
        validate(out / "oci", TAG)
        # An oci-archive (a tar of the layout) for `ctr images import`.
        need("skopeo", "skopeo")
        run("skopeo", "copy", "--quiet", f"oci:{out / 'oci'}:{TAG}",
            f"oci-archive:{out / 'oci-archive.tar'}:{TAG}")
        normalize_tar(out / "oci-archive.tar")

    return inputs, build


def debian_rootfs_tar(*flags: str) -> Path:
    """A cached layer tar of testdata/build-debian-rootfs.sh (built if missing)."""
    script = REPO / "testdata" / "build-debian-rootfs.sh"
    log("getting the Debian layer: " + " ".join(["testdata/build-debian-rootfs.sh", *flags]))
    p = subprocess.run([str(script), *flags], stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        raise BuildError(f"{script} failed (exit {p.returncode})")
    return Path(p.stdout.strip().splitlines()[-1])


def debian_multilayer_inputs() -> tuple[dict, Callable[[Path], None]]:
    base = debian_rootfs_tar()
    st = base.stat()
    need("umoci", "umoci")
    inputs = {"base": str(base), "base.size": st.st_size, "base.mtime_ns": st.st_mtime_ns,
              "umoci": run("umoci", "--version", capture=True).strip()}

    def build(out: Path) -> None:
        img = out / "oci"
        ref = f"{img}:{TAG}"
        t0, t1 = iso(EPOCH), iso(EPOCH + 86400)
        run("umoci", "init", "--layout", img)
        run("umoci", "new", "--image", ref)
        run("umoci", "config", "--image", ref, "--created", t0, "--no-history",
            "--architecture", host_platform()["architecture"], "--os", "linux")
        log("umoci raw add-layer (Debian minbase)")
        run("umoci", "raw", "add-layer", "--image", ref, "--history.created", t0,
            "--history.created_by", "debootstrap --variant=minbase bookworm "
            "(testdata/build-debian-rootfs.sh)", base)
        log("umoci unpack")
        bundle = out / "bundle"
        run("umoci", "unpack", "--image", ref, bundle)
        rootfs = bundle / "rootfs"
        hello = rootfs / "usr/local/bin/hello"
        hello.write_text('#!/bin/sh\necho "hello from layer 2"\n')
        hello.chmod(0o755)
        (rootfs / "etc/motd").write_text("Debian minbase + estargz test layer 2.\n")
        (rootfs / "etc/issue.net").unlink()
        for p_ in (hello, rootfs / "etc/motd", rootfs / "usr/local/bin", rootfs / "etc"):
            os.utime(p_, (EPOCH + 86400, EPOCH + 86400), follow_symlinks=False)
        log("umoci repack (diff layer)")
        run("umoci", "repack", "--image", ref, "--history.created", t1,
            "--history.created_by", "add /usr/local/bin/hello, change /etc/motd, "
            "remove /etc/issue.net", bundle)
        shutil.rmtree(bundle)
        run("umoci", "config", "--image", ref, "--created", t1, "--config.env", ENV_PATH,
            "--config.cmd", "bash", "--history.created", t1,
            "--history.created_by", '/bin/sh -c #(nop)  CMD ["bash"]')
        run("umoci", "gc", "--layout", img)
        fix_modes(img)
        check_debian_diff_layer(img)
        validate(img, TAG)

    return inputs, build


def check_debian_diff_layer(img: Path) -> None:
    _, desc = read_layout(img)
    manifest = json.loads(blob_path(img, desc["digest"]).read_bytes())
    if len(manifest["layers"]) != 2:
        raise BuildError(f"expected 2 layers, got {len(manifest['layers'])}")
    with tarfile.open(blob_path(img, manifest["layers"][1]["digest"]), "r:gz") as tf:
        names = {m.name.rstrip("/") for m in tf}
    want = {"usr/local/bin/hello", "etc/motd", "etc/.wh.issue.net"}
    if not want <= names or {"usr", "usr/local"} & names:
        raise BuildError(f"unexpected diff layer entries: {sorted(names)}")


def _tar_state(path: Path) -> dict[str, tuple]:
    """Name -> everything a layer diff compares, for each member of a tar."""
    state = {}
    with tarfile.open(path) as tf:
        for m in tf:
            digest = None
            if m.isreg():
                h = hashlib.sha256()
                f = tf.extractfile(m)
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                digest = h.hexdigest()
            xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.")))
            state[m.name.rstrip("/")] = (m.type, m.mode, m.uid, m.gid, m.mtime, m.linkname,
                                         m.size, m.devmajor, m.devminor, xattrs, digest)
    return state


def rootfs_diff(base: Path, new: Path, mtime: int) -> tuple[bytes, dict]:
    """A diff layer taking root filesystem tar ``base`` to ``new``.

    What docker or umoci would write: the members of ``new`` that are not in
    ``base`` or differ from it (type, mode, owner, mtime, link, device,
    xattrs, content), copied in ``new``'s order, then a ``.wh.`` whiteout for
    each top-most path of ``base`` that ``new`` lacks. Unchanged parent
    directories are left out, as umoci does. Returns the tar and a summary."""
    old, cur = _tar_state(base), _tar_state(new)
    changed = {n for n, st in cur.items() if old.get(n) != st}
    # A hardlink group goes whole: a layer's hardlink must point inside the
    # layer, and the merged view shows one layer's inode per path.
    groups: dict[str, set] = {}
    for n, st in cur.items():
        if st[0] == tarfile.LNKTYPE:
            groups.setdefault(st[5], {st[5]}).add(n)
    for members in groups.values():
        if members & changed:
            changed |= members
    # Whiteouts only where the parent is still a directory: a removed
    # directory's whiteout covers its contents.
    removed = sorted(n for n in old if n not in cur)
    whiteouts = [n for n in removed if posixpath.dirname(n) == ""
                 or cur.get(posixpath.dirname(n), (None,))[0] == tarfile.DIRTYPE]
    buf = io.BytesIO()
    with tarfile.open(new) as src, \
            tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            if m.name.rstrip("/") in changed:
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        for n in whiteouts:
            parent, name = posixpath.split(n)
            ti = tarfile.TarInfo(posixpath.join(parent, ".wh." + name))
            ti.mode, ti.mtime, ti.uname, ti.gname = 0o644, mtime, "", ""
            dst.addfile(ti, io.BytesIO(b""))
    summary = {"added": sum(1 for n in changed if n not in old),
               "changed": sorted(n for n in changed if n in old), "whiteouts": whiteouts}
    return buf.getvalue(), summary


def debian_python3_inputs() -> tuple[dict, Callable[[Path], None]]:
    multi = ensure("debian-multilayer")
    new = debian_rootfs_tar("--with-python3")
    st = new.stat()
    inputs = {"debian-multilayer": json.loads((multi / "build-info.json").read_text())["key"],
              "python3": str(new), "python3.size": st.st_size, "python3.mtime_ns": st.st_mtime_ns,
              # tarfile writes the diff, zlib compresses it
              "python": "%d.%d" % sys.version_info[:2], "zlib": zlib.ZLIB_RUNTIME_VERSION}

    def build(out: Path) -> None:
        src = multi / "oci"
        _, desc = read_layout(src)
        manifest = json.loads(blob_path(src, desc["digest"]).read_bytes())
        base_config = json.loads(blob_path(src, manifest["config"]["digest"]).read_bytes())
        base_layer, base_diff_id = manifest["layers"][0], base_config["rootfs"]["diff_ids"][0]
        base = Path(json.loads((multi / "build-info.json").read_text())["inputs"]["base"])
        if file_sha256(base) != base_diff_id:
            raise BuildError(f"{base} is not debian-multilayer's layer 1 any more; "
                             "rebuild debian-multilayer (--force)")
        t0, t1 = iso(EPOCH), iso(EPOCH + 86400)
        log("diffing the python3 rootfs against minbase")
        diff, summary = rootfs_diff(base, new, EPOCH + 86400)
        log(f"diff layer: {summary['added']} added, {len(summary['changed'])} changed "
            f"({', '.join(summary['changed'][:5])}), {len(summary['whiteouts'])} whiteouts, "
            f"{len(diff) >> 20} MiB")
        layout = Layout(out / "oci")
        layers = [layout.blob(blob_path(src, base_layer["digest"]).read_bytes(),
                              base_layer["mediaType"]),
                  layout.blob(gzip_bytes(diff), OCI_LAYER_GZIP)]
        config = {
            "created": t1, **host_platform(),
            "config": {"Env": [ENV_PATH], "Cmd": ["python3", "-c", "import json"]},
            "rootfs": {"type": "layers", "diff_ids": [base_diff_id, sha256(diff)]},
            "history": [
                {"created": t0, "created_by": "debootstrap --variant=minbase bookworm "
                 "(testdata/build-debian-rootfs.sh)"},
                {"created": t1, "created_by": "debootstrap --include=python3: the diff "
                 "(testdata/build-debian-rootfs.sh --with-python3)"},
            ],
        }
        cfg = layout.blob(canonical_json(config), OCI_CONFIG)
        m = layout.blob(canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": layers}),
            OCI_MANIFEST)
        layout.tag(m, TAG)
        layout.finish()
        check_python3_diff_layer(out / "oci")
        validate(out / "oci", TAG)

    return inputs, build


def check_python3_diff_layer(img: Path) -> None:
    _, desc = read_layout(img)
    manifest = json.loads(blob_path(img, desc["digest"]).read_bytes())
    with tarfile.open(blob_path(img, manifest["layers"][1]["digest"]), "r:gz") as tf:
        names = {m.name.rstrip("/") for m in tf}
    if "usr/bin/python3.11" not in names or "usr" in names or \
            any(n.endswith("/libc.so.6") for n in names):
        raise BuildError("the python3 diff layer does not hold what it should")


def synthetic_image(layout: Layout, plat: dict) -> dict:
    """A tiny image of text files for a platform that will never run here."""
    arch = plat["architecture"] + ("/" + plat["variant"] if "variant" in plat else "")
    files = {
        "etc/hostname": b"synthetic\n",
        "etc/os-release": f'NAME="estargz synthetic"\nID=synthetic\nARCH={arch}\n'.encode(),
        "usr/share/doc/synthetic/README":
            f"A synthetic linux/{arch} image for platform selection tests.\n"
            "It holds text files only and is never run.\n".encode(),
    }
    files.update({f"srv/data/file-{i:02d}.txt": f"line {i}\n".encode() * (i + 1) for i in range(8)})
    tar = make_tar(Entry(n, tarfile.REGTYPE, 0o644, d) for n, d in files.items())
    layer = layout.blob(gzip_bytes(tar), OCI_LAYER_GZIP)
    config = {
        "created": iso(EPOCH), **plat,
        "config": {"Env": [ENV_PATH], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "history": [{"created": iso(EPOCH), "created_by": "estargz testdata/images/build.py two-platform"}],
    }
    cfg = layout.blob(canonical_json(config), OCI_CONFIG)
    return layout.blob(canonical_json(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": [layer]}),
        OCI_MANIFEST)


def attestation(layout: Layout, subject: dict, plat: dict) -> dict:
    """A BuildKit-style provenance attestation manifest for ``subject``."""
    arch = plat["architecture"] + ("/" + plat["variant"] if "variant" in plat else "")
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{"name": f"pkg:docker/estargz-test/two-platform@{TAG}?platform=linux%2F"
                             + arch.replace("/", "%2F"),
                     "digest": {"sha256": subject["digest"].split(":", 1)[1]}}],
        "predicate": {"builder": {"id": ""}, "buildType": "https://mobyproject.org/buildkit@v1",
                      "metadata": {"buildStartedOn": iso(EPOCH), "buildFinishedOn": iso(EPOCH)}},
    }
    layer = layout.blob(canonical_json(statement), IN_TOTO,
                        annotations={"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"})
    config = {"architecture": "unknown", "os": "unknown", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}
    cfg = layout.blob(canonical_json(config), OCI_CONFIG)
    m = layout.blob(canonical_json(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": [layer]}),
        OCI_MANIFEST)
    return {**m, "annotations": {"vnd.docker.reference.digest": subject["digest"],
                                 "vnd.docker.reference.type": "attestation-manifest"},
            "platform": {"architecture": "unknown", "os": "unknown"}}


def copy_image(src: Path, desc: dict, dst: Layout) -> None:
    """Copy the blobs of the image manifest ``desc`` from layout ``src``."""
    manifest = blob_path(src, desc["digest"]).read_bytes()
    m = json.loads(manifest)
    for d in [m["config"], *m["layers"]]:
        dst.blob(blob_path(src, d["digest"]).read_bytes(), d["mediaType"])
    dst.blob(manifest, desc["mediaType"])


def two_platform_inputs() -> tuple[dict, Callable[[Path], None]]:
    bb = ensure("busybox")
    inputs = {"busybox": json.loads((bb / "build-info.json").read_text())["key"]}

    def build(out: Path) -> None:
        layout = Layout(out / "oci")
        _, bb_desc = read_layout(bb / "oci")
        copy_image(bb / "oci", bb_desc, layout)
        host = host_platform()
        other = ({"architecture": "arm64", "os": "linux", "variant": "v8"}
                 if host["architecture"] != "arm64" else {"architecture": "amd64", "os": "linux"})
        images = [({"mediaType": OCI_MANIFEST, "digest": bb_desc["digest"], "size": bb_desc["size"]}, host),
                  (synthetic_image(layout, other), other)]
        plain = [{**d, "platform": p} for d, p in images]
        with_att = plain + [attestation(layout, d, p) for d, p in images]
        for tag, manifests in (("latest", with_att), ("platforms-only", plain)):
            idx = layout.blob(canonical_json(
                {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}), OCI_INDEX)
            layout.tag(idx, tag)
        layout.finish()
        for tag in ("latest", "platforms-only"):
            validate(out / "oci", tag, index=True)

    return inputs, build


def docker_media_types_inputs() -> tuple[dict, Callable[[Path], None]]:
    bb = ensure("busybox")
    need("skopeo", "skopeo")
    inputs = {"busybox": json.loads((bb / "build-info.json").read_text())["key"],
              "skopeo": run("skopeo", "--version", capture=True).strip()}

    def build(out: Path) -> None:
        src = bb / "oci"
        _, desc = read_layout(src)
        m = json.loads(blob_path(src, desc["digest"]).read_bytes())
        layout = Layout(out / "oci")
        # Docker's image config is the same JSON; only the media types change.
        cfg = layout.blob(blob_path(src, m["config"]["digest"]).read_bytes(), DOCKER_CONFIG)
        layers = [layout.blob(blob_path(src, l["digest"]).read_bytes(), DOCKER_LAYER_GZIP)
                  for l in m["layers"]]
        manifest = layout.blob(canonical_json(
            {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": cfg, "layers": layers}),
            DOCKER_MANIFEST)
        layout.tag(manifest, TAG)
        layout.finish()
        # skopeo (containers/image) ignores index.json entries that are not OCI
        # media types ("no descriptor found for reference"), so it can neither
        # validate this layout nor copy from it: the archive is made from the
        # busybox layout.  Same config and layer bytes, so the same image ID.
        # `docker save` format: manifest.json (Config, RepoTags, Layers),
        # repositories, <config>.json and uncompressed layer tars.
        run("skopeo", "copy", "--quiet", f"oci:{src}:{TAG}",
            f"docker-archive:{out / 'docker-archive.tar'}:busybox:{TAG}")
        normalize_tar(out / "docker-archive.tar")

    return inputs, build


# --- lazy-kinds: every entry kind eStargz and overlayfs must carry ---------------

class Member:
    """One tar member of the lazy-kinds layers, with everything a tar header
    can say (make_tar's Entry is root-owned, integer-mtime and sorted)."""

    def __init__(self, name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
                 data: bytes = b"", linkname: str = "", uid: int = 0, gid: int = 0,
                 mtime: float = EPOCH, dev: tuple[int, int] = (0, 0),
                 xattrs: Optional[dict[str, bytes]] = None):
        self.name, self.kind, self.mode, self.data = name, kind, mode, data
        self.linkname, self.uid, self.gid, self.mtime = linkname, uid, gid, mtime
        self.dev, self.xattrs = dev, xattrs or {}


def members_tar(members: list[Member], fmt: int) -> bytes:
    """A layer tar of ``members`` in the given order (a hardlink must follow
    its target), in tar format ``fmt`` (GNU_FORMAT: long names as GNU
    ././@LongLink records; PAX_FORMAT: path/linkpath/mtime/SCHILY.xattr)."""
    seen: set[str] = set()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            if m.kind == tarfile.LNKTYPE and m.linkname not in seen:
                raise BuildError(f"hardlink {m.name} before its target {m.linkname}")
            if m.xattrs and fmt != tarfile.PAX_FORMAT:
                raise BuildError(f"{m.name}: xattrs need PAX_FORMAT")
            ti = tarfile.TarInfo(m.name + "/" if m.kind == tarfile.DIRTYPE else m.name)
            ti.type, ti.mode, ti.mtime, ti.linkname = m.kind, m.mode, m.mtime, m.linkname
            ti.uid, ti.gid = m.uid, m.gid
            ti.uname = {0: "root", 1000: "user", 65534: "nobody"}.get(m.uid, "")
            ti.gname = {0: "root", 1000: "user", 65534: "nogroup"}.get(m.gid, "")
            ti.devmajor, ti.devminor = m.dev
            # Binary values (security.capability) go through surrogateescape,
            # which tarfile turns back into the raw bytes.
            ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                              for k, v in sorted(m.xattrs.items())}
            if m.kind == tarfile.REGTYPE:
                ti.size = len(m.data)
                tf.addfile(ti, io.BytesIO(m.data))
            else:
                tf.addfile(ti)
            seen.add(m.name)
    return buf.getvalue()


LAZY_BIG = "data/big/random-9MiB.bin"
LAZY_LONG_GNU = "data/long/" + "gnu-long-name-" * 8 + "end.txt"      # > 100 bytes
LAZY_LONG_PAX = "data/long/" + "pax-long-name-" * 8 + "end.txt"
LAZY_LONG_TARGET = "../" + "long-symlink-target-" * 6 + "dangling"
# The capability set of `setcap cap_net_bind_service+ep`: VFS_CAP_REVISION_2
# with the effective flag, permitted = bit 10, inheritable = 0 (20 bytes).
LAZY_CAPABILITY = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")


def lazy_kinds_layers() -> tuple[list[Member], list[Member]]:
    """The two layers above busybox: a lower one in GNU tar format and an
    upper one in PAX format that whiteouts, makes opaque, replaces and adds.

    Each layer lists every parent directory of its members: where a layer
    leaves one out, containerd's overlayfs applier creates it with the
    current time as mtime, so the unpacked tree would not be reproducible
    (debian-python3's umoci-style diff layer covers that case)."""
    t1, t2 = EPOCH + 3600, EPOCH + 7200
    D, F, L, S = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
    big = hashlib.shake_256(b"estargz lazy-kinds big file").digest(9 << 20)
    lower = [
        Member("data", D, 0o755, mtime=t1),
        Member("data/keep.txt", F, 0o644, b"kept from layer 2\n", mtime=t1),
        Member("data/remove-me.txt", F, 0o644, b"whited out by layer 3\n", mtime=t1),
        Member("data/remove-dir", D, 0o755, mtime=t1),
        Member("data/remove-dir/inner.txt", F, 0o644, b"gone\n", mtime=t1),
        Member("data/remove-dir/sub", D, 0o700, mtime=t1),
        Member("data/remove-dir/sub/deep.txt", F, 0o600, b"gone too\n", mtime=t1),
        Member("data/opaque", D, 0o755, mtime=t1),
        Member("data/opaque/old-a.txt", F, 0o644, b"hidden by the opaque dir\n", mtime=t1),
        Member("data/opaque/old-dir", D, 0o755, mtime=t1),
        Member("data/opaque/old-dir/x.txt", F, 0o644, b"hidden\n", mtime=t1),
        Member("data/replaced.txt", F, 0o644, b"old content\n", mtime=t1),
        Member("data/big", D, 0o755, mtime=t1),
        Member(LAZY_BIG, F, 0o644, big, mtime=t1),
        Member("data/hardlinks", D, 0o755, mtime=t1),
        Member("data/hardlinks/lower-a", F, 0o640, b"one inode, two names (layer 2)\n",
               uid=65534, gid=65534, mtime=t1),
        Member("data/hardlinks/lower-b", L, 0o640, linkname="data/hardlinks/lower-a",
               uid=65534, gid=65534, mtime=t1),
        Member("data/long", D, 0o755, mtime=t1),
        Member(LAZY_LONG_GNU, F, 0o644, b"a GNU long name\n", mtime=t1),
        Member("data/long/gnu-long-link", S, 0o777, linkname=LAZY_LONG_TARGET, mtime=t1),
        Member("données", D, 0o755, mtime=t1),
        Member("données/naïve-ü.txt", F, 0o644, b"na\xc3\xafve\n", mtime=t1),
        Member("home", D, 0o755, mtime=t1),
        Member("home/user", D, 0o750, uid=1000, gid=1000, mtime=t1),
        Member("home/user/.profile", F, 0o644, b"export PS1='$ '\n", uid=1000, gid=1000, mtime=t1),
    ]
    upper = [
        Member("data", D, 0o755, mtime=t2),
        Member("data/.wh.remove-me.txt", F, 0o644, mtime=t2),
        Member("data/.wh.remove-dir", F, 0o644, mtime=t2),
        Member("data/opaque", D, 0o755, mtime=t2),
        Member("data/opaque/.wh..wh..opq", F, 0o644, mtime=t2),
        Member("data/opaque/new.txt", F, 0o644, b"the only entry left\n", mtime=t2),
        Member("data/replaced.txt", F, 0o600, b"new content from layer 3\n",
               uid=1000, gid=1000, mtime=t2),
        Member("data/read", D, 0o755, mtime=t2),
        Member("data/read/config.txt", F, 0o644, b"lazy-config\n", mtime=t2),
        Member("data/hardlinks", D, 0o755, mtime=t2),
        # A second name for a file the workload reads (prioritized by optimize)...
        Member("data/hardlinks/config-link", L, 0o644, linkname="data/read/config.txt", mtime=t2),
        # ...and a file the workload reads only through its second name.
        Member("data/hardlinks/target.txt", F, 0o644, b"read-via-link\n", mtime=t2),
        Member("data/hardlinks/via-link", L, 0o644, linkname="data/hardlinks/target.txt", mtime=t2),
        Member("data/hardlinks/via-link-2", L, 0o644, linkname="data/hardlinks/target.txt", mtime=t2),
        Member("data/links", D, 0o755, mtime=t2),
        Member("data/links/relative", S, 0o777, linkname="../keep.txt", mtime=t2),
        Member("data/links/absolute", S, 0o777, linkname="/data/keep.txt", mtime=t2),
        Member("data/links/dangling", S, 0o777, linkname="../does-not-exist", mtime=t2),
        Member("data/links/to-dir", S, 0o777, linkname="../../données", mtime=t2),
        Member("data/links/pax-long-link", S, 0o777, linkname=LAZY_LONG_TARGET + "-pax", mtime=t2),
        Member("data/dev", D, 0o755, mtime=t2),
        Member("data/dev/char-null", tarfile.CHRTYPE, 0o666, dev=(1, 3), mtime=t2),
        Member("data/dev/block-loop0", tarfile.BLKTYPE, 0o660, dev=(7, 0), uid=0, gid=6, mtime=t2),
        Member("data/dev/fifo", tarfile.FIFOTYPE, 0o620, mtime=t2),
        Member("data/bin", D, 0o755, mtime=t2),
        Member("data/bin/tool", F, 0o755, b"\x7fELF\x02\x01\x01" + bytes(57) + b"not really\n",
               mtime=t2, xattrs={"security.capability": LAZY_CAPABILITY,
                                 "user.origin": b"estargz lazy-kinds"}),
        Member("data/xattr-dir", D, 0o755, mtime=t2, xattrs={"user.dir": b"on a directory"}),
        Member("data/xattr-dir/two.txt", F, 0o644, b"two xattrs\n", mtime=t2,
               xattrs={"user.a": b"1", "user.ümlaut": "wert-ä".encode()}),
        Member("data/empty", F, 0o644, b"", mtime=t2),
        Member("data/long", D, 0o755, mtime=t2),
        Member(LAZY_LONG_PAX, F, 0o644, b"a PAX long name\n", mtime=t2),
        Member("data/modes", D, 0o755, mtime=t2),
        Member("data/modes/setuid", F, 0o4755, b"#!/bin/sh\n", mtime=t2),
        Member("data/modes/setgid", F, 0o2755, b"#!/bin/sh\n", mtime=t2),
        Member("data/modes/zero", F, 0o000, b"no access\n", mtime=t2),
        Member("data/modes/sticky", D, 0o1777, mtime=t2),
        Member("data/modes/setgid-dir", D, 0o2775, gid=1000, mtime=t2),
        Member("data/owners", D, 0o755, uid=1000, gid=1000, mtime=t2),
        Member("data/owners/user", F, 0o644, b"1000\n", uid=1000, gid=1000, mtime=t2),
        Member("data/owners/nobody", F, 0o644, b"65534\n", uid=65534, gid=65534, mtime=t2),
        Member("data/owners/mixed", F, 0o640, b"1000:65534\n", uid=1000, gid=65534, mtime=t2),
        Member("data/times", D, 0o755, mtime=t2),
        Member("data/times/one-second", F, 0o644, b"1970\n", mtime=1),
        Member("data/times/subsecond", F, 0o644, b"frac\n", mtime=t2 + 0.25),
        Member("data/times/y2038", F, 0o644, b"2038+\n", mtime=2**31 + 7),
        Member("データ", D, 0o755, mtime=t2),
        Member("データ/日本語のファイル名.txt", F, 0o644, "こんにちは\n".encode(), mtime=t2),
    ]
    return lower, upper


# The workload: reads files through names of several kinds and prints one line
# (busybox ls prints non-ASCII names as '?', so names are only cat'ed).
LAZY_SCRIPT = ('echo "lazy-kinds ok: $(cat /data/read/config.txt) $(cat /data/hardlinks/via-link)'
               ' $(cat /données/naïve-ü.txt) opaque=$(ls /data/opaque)'
               ' to-dir=$(cat /data/links/to-dir/naïve-ü.txt) big=$(sha256sum < /data/big/random-9MiB.bin'
               ' | cut -c1-16)"')


def lazy_kinds_inputs() -> tuple[dict, Callable[[Path], None]]:
    bb = ensure("busybox")
    need("skopeo", "skopeo")
    inputs = {"busybox": json.loads((bb / "build-info.json").read_text())["key"],
              "skopeo": run("skopeo", "--version", capture=True).strip(),
              "python": "%d.%d" % sys.version_info[:2], "zlib": zlib.ZLIB_RUNTIME_VERSION}

    def build(out: Path) -> None:
        src = bb / "oci"
        _, desc = read_layout(src)
        bb_manifest = json.loads(blob_path(src, desc["digest"]).read_bytes())
        bb_config = json.loads(blob_path(src, bb_manifest["config"]["digest"]).read_bytes())
        lower, upper = lazy_kinds_layers()
        tars = [members_tar(lower, tarfile.GNU_FORMAT), members_tar(upper, tarfile.PAX_FORMAT)]
        layout = Layout(out / "oci")
        base = bb_manifest["layers"][0]
        layers = [layout.blob(blob_path(src, base["digest"]).read_bytes(), base["mediaType"])]
        layers += [layout.blob(gzip_bytes(t), OCI_LAYER_GZIP) for t in tars]
        t1, t2 = iso(EPOCH + 3600), iso(EPOCH + 7200)
        config = {
            "created": t2, **host_platform(),
            "config": {"Env": [ENV_PATH], "Cmd": ["sh", "-c", LAZY_SCRIPT]},
            "rootfs": {"type": "layers",
                       "diff_ids": [bb_config["rootfs"]["diff_ids"][0], *map(sha256, tars)]},
            "history": [*bb_config["history"],
                        {"created": t1, "created_by": "estargz testdata/images/build.py "
                         "lazy-kinds: lower layer (GNU tar)"},
                        {"created": t2, "created_by": "estargz testdata/images/build.py "
                         "lazy-kinds: upper layer (PAX tar: whiteouts, opaque dir, xattrs)"}],
        }
        cfg = layout.blob(canonical_json(config), OCI_CONFIG)
        m = layout.blob(canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": layers}),
            OCI_MANIFEST)
        layout.tag(m, TAG)
        layout.finish()
        check_lazy_kinds(out / "oci")
        validate(out / "oci", TAG)
        big = next(x.data for x in lower if x.name == LAZY_BIG)
        (out / "expected-output.txt").write_text(
            f"lazy-kinds ok: lazy-config read-via-link naïve opaque=new.txt to-dir=naïve "
            f"big={hashlib.sha256(big).hexdigest()[:16]}\n")
        run("skopeo", "copy", "--quiet", f"oci:{out / 'oci'}:{TAG}",
            f"oci-archive:{out / 'oci-archive.tar'}:{TAG}")
        normalize_tar(out / "oci-archive.tar")

    return inputs, build


def check_lazy_kinds(img: Path) -> None:
    """The lazy-kinds layers hold every kind they are meant to (read back
    with tarfile from the stored gzip blobs)."""
    _, desc = read_layout(img)
    manifest = json.loads(blob_path(img, desc["digest"]).read_bytes())
    if len(manifest["layers"]) != 3:
        raise BuildError(f"lazy-kinds: expected 3 layers, got {len(manifest['layers'])}")
    got: set[str] = set()
    for i, layer in enumerate(manifest["layers"][1:], 2):
        raw = gzip.decompress(blob_path(img, layer["digest"]).read_bytes())
        if i == 2 and b"././@LongLink" not in raw:
            raise BuildError("lazy-kinds: layer 2 has no GNU long name record")
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            members = tf.getmembers()
            names = {m.name.rstrip("/") for m in members}
            orphans = {m.name for m in members if posixpath.dirname(m.name.rstrip("/"))
                       not in names | {""}}
            if orphans:
                raise BuildError(f"lazy-kinds layer {i} lacks the parents of {sorted(orphans)}")
            for m in members:
                base = posixpath.basename(m.name.rstrip("/"))
                got.update(k for k, ok in {
                    "whiteout": base.startswith(".wh.") and base != ".wh..wh..opq",
                    "opaque": base == ".wh..wh..opq", "hardlink": m.islnk(),
                    "symlink": m.issym(), "char": m.ischr(), "block": m.isblk(),
                    "fifo": m.isfifo(), "capability": "SCHILY.xattr.security.capability"
                    in m.pax_headers, "user-xattr": any(k.startswith("SCHILY.xattr.user.")
                                                        for k in m.pax_headers),
                    "over-chunk": m.size > 4 << 20, "empty": m.isreg() and m.size == 0
                    and not base.startswith(".wh."), "non-ascii": not m.name.isascii(),
                    "long-name": len(m.name.encode()) > 100, "setuid": bool(m.mode & 0o4000),
                    "setgid": bool(m.mode & 0o2000), "sticky": bool(m.mode & 0o1000),
                    "mode-0": m.isreg() and m.mode == 0, "uid-1000": m.uid == 1000,
                    "uid-65534": m.uid == 65534, "subsecond": m.mtime != int(m.mtime),
                }.items() if ok)
    want = {"whiteout", "opaque", "hardlink", "symlink", "char", "block", "fifo", "capability",
            "user-xattr", "over-chunk", "empty", "non-ascii", "long-name", "setuid", "setgid",
            "sticky", "mode-0", "uid-1000", "uid-65534", "subsecond"}
    if want - got:
        raise BuildError(f"lazy-kinds layers lack {sorted(want - got)}")


BUILDERS = {
    "busybox": busybox_inputs,
    "debian-multilayer": debian_multilayer_inputs,
    "debian-python3": debian_python3_inputs,
    "two-platform": two_platform_inputs,
    "docker-media-types": docker_media_types_inputs,
    "lazy-kinds": lazy_kinds_inputs,
}


# --- validation and file modes ---------------------------------------------------

def validate(layout: Path, tag: str, index: bool = False) -> None:
    """skopeo must read the manifest (and, for one image, its config)."""
    if shutil.which("skopeo") is None:
        log("skopeo not found: skipping validation")
        return
    raw = json.loads(run("skopeo", "inspect", "--raw", f"oci:{layout}:{tag}", capture=True))
    if index != (raw.get("mediaType") == OCI_INDEX):
        raise BuildError(f"oci:{layout}:{tag}: unexpected manifest {raw.get('mediaType')}")
    if not index:
        run("skopeo", "inspect", "--config", f"oci:{layout}:{tag}", capture=True)


def normalize_tar(path: Path) -> None:
    """Rewrite a tar skopeo wrote with fixed mtimes and owners, in place.

    skopeo stamps archive members with the current time; this keeps its
    member names, order and contents and makes the archive reproducible."""
    tmp = path.with_name(path.name + ".norm")
    with tarfile.open(path) as src, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            m.mtime = EPOCH
            m.uid = m.gid = 0
            m.uname = m.gname = ""
            m.pax_headers = {}
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    os.replace(tmp, path)


def fix_modes(root: Path) -> None:
    """umoci writes blobs 0600; make the cache readable like the rest."""
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


# --- caching: key, lock, temp dir, rename ----------------------------------------

def script_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def cached_key(out: Path) -> Optional[str]:
    try:
        return json.loads((out / "build-info.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


FORCE: set[str] = set()
_DONE: dict[str, Path] = {}


def ensure(name: str) -> Path:
    """Build image ``name`` unless cached and current; return its directory."""
    if name in _DONE:
        return _DONE[name]
    IMAGES.mkdir(parents=True, exist_ok=True)
    out = IMAGES / name
    with open(IMAGES / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        inputs, build = BUILDERS[name]()
        inputs = {"script": script_hash(), "SOURCE_DATE_EPOCH": EPOCH, **inputs}
        key = hashlib.sha256(canonical_json(inputs)).hexdigest()
        if name not in FORCE and out.is_dir() and cached_key(out) == key:
            _DONE[name] = out
            return out
        # Holding the lock: leftovers of killed builds can go.
        for stale in IMAGES.glob(f".{name}.tmp-*"):
            log(f"removing stale {stale}")
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=IMAGES))
        try:
            log(f"building {name} in {tmp}")
            t0 = time.monotonic()
            build(tmp)
            (tmp / "build-info.json").write_text(json.dumps(
                {"image": name, "key": key, "inputs": inputs}, indent=2) + "\n")
            fix_modes(tmp)
            old = None
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=IMAGES))
                os.rename(out, old / name)
            os.rename(tmp, out)
            tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            log(f"built {name} in {time.monotonic() - t0:.1f} s")
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    _DONE[name] = out
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="build.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("image", nargs="+", metavar="IMAGE", choices=[*BUILDERS, "all"])
    ap.add_argument("--force", action="store_true",
                    help="rebuild the image (not its dependencies) even if cached")
    args = ap.parse_args(argv)
    names = list(BUILDERS) if "all" in args.image else list(dict.fromkeys(args.image))
    if args.force:
        FORCE.update(names)

    def on_term(signum, frame):
        log("terminated")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    return build_and_print(ensure, names)


def build_and_print(build: Callable[[str], Path], names: list[str]) -> int:
    """Build each of ``names`` with ``build``, print the directories (one a
    line) once all are there, and return the exit status: 1 after a
    :class:`BuildError` (said on stderr), 130 after Ctrl-C."""
    try:
        outs = [build(n) for n in names]
    except BuildError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    for o in outs:
        print(o, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
