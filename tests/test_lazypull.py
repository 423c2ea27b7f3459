"""Our images, lazily pulled by a real Stargz Snapshotter (issue 9, points 2-4).

For both snapshotter versions (v0.18 from the Go module proxy, Debian's 0.12),
images made by ``estargz convert --oci`` and ``estargz optimize --oci`` of
busybox, debian-python3 and lazy-kinds (every entry kind) are pushed to
Debian's registry and pulled with ``ctr-remote images rpull`` through a
:class:`services.FaultProxy` that logs every request.  A test then checks:

* every layer is a FUSE mount whose TOC digest the snapshotter verified
  against the annotation we wrote;
* the snapshotter prefetched exactly our landmark offset of each layer, and
  the registry saw those bytes requested before the container started;
* the container runs its workload; for optimized images, nothing is fetched
  on demand while it runs (all it reads, the runtime's own reads of
  etc/passwd and etc/group included, came with the prefetch), and in
  particular no range request falls inside a file the record lists;
* the root filesystem read through the lazy mounts equals the original
  image unpacked by containerd's overlayfs snapshotter (treecompare: names,
  types, modes, owners, xattrs, link targets, contents, mtimes).

Tampering: a byte flipped in a chunk of a layer blob in the registry's
storage makes reading that file fail with EIO; a wrong TOC digest
annotation, and a Docker-media-type layer (which cannot carry one), are
refused by the snapshotter, and containerd falls back to pulling the whole
blob - visibly: no FUSE mount, the reason in the snapshotter's log, a full
GET in the registry's log.

Each test gets a cold snapshotter and containerd (``lazy_puller``); images
are converted and pushed once per session.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import estargz
from conftest import run_cli
from daemons import Containerd, build_images

# The fixtures (lazy_puller, make_lazy_puller, snapshotter_*) come from the
# lazypull plugin that conftest.py registers.
from lazypull import LazyPuller, SnapshotterConfig, mounted_image, parse_ranges, ranges_overlap
from services import FaultProxy, RegistryDaemon
from treecompare import assert_same_tree, snapshot_tree

# The TOC stores modtime in whole seconds (RFC 3339), so a FUSE layer reports
# whole seconds for an entry whose tar header had a fraction (lazy-kinds has
# one): compare mtimes to the second.
MTIME_TOLERANCE_NS = 10**9
# Both snapshotter versions fetch blobs in aligned units of this many bytes
# ([blob] chunk_size, default 50000).
FETCH_UNIT = 50_000
MEMORY_CACHES = 'http_cache_type = "memory"\nfilesystem_cache_type = "memory"'


@dataclass(frozen=True)
class Workload:
    """What a container of a source image runs, and a line it must print."""

    image: str                  # testdata/images/build.py name
    args: list[str] | None   # None: the image's own Cmd
    expect: str                 # expected in stdout; "" = expected-output.txt


WORKLOADS = {
    "busybox": Workload("busybox", ["sh", "-c", "echo busybox lazy ok"], "busybox lazy ok"),
    "debian-python3": Workload("debian-python3",
                               ["python3", "-c", "import json; print('python3 lazy ok')"],
                               "python3 lazy ok"),
    "lazy-kinds": Workload("lazy-kinds", None, ""),
}


@dataclass
class PushedImage:
    """An image in the session registry, as ``repo:tag`` (no host)."""

    name: str
    variant: str        # "original", "convert" or "optimize"
    ref: str
    #: Per layer, from ``--json``: new_digest, new_size, toc_digest, prefetch_size.
    layers: list[dict] = field(default_factory=list)
    #: optimize only: layer index -> paths the record lists.
    record: dict[int, list[str]] = field(default_factory=dict)
    args: list[str] | None = None
    expect: str = ""


def blob_path(registry: RegistryDaemon, digest: str) -> Path:
    """Where Debian's docker-registry (filesystem driver) stores a blob."""
    hexdigest = digest.split(":", 1)[1]
    return (registry.root / "docker" / "registry" / "v2" / "blobs" / "sha256" /
            hexdigest[:2] / hexdigest / "data")


def skopeo_copy(src: str, dst: str) -> None:
    p = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", src, dst],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"skopeo copy {src} {dst} failed: {p.stderr}")


def get_manifest(host: str, ref: str) -> dict:
    repo, _, tag = ref.rpartition(":")
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def put_manifest(host: str, ref: str, manifest: dict) -> None:
    repo, _, tag = ref.rpartition(":")
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="PUT",
                                 data=json.dumps(manifest).encode(),
                                 headers={"Content-Type": manifest["mediaType"]})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 201, r.status


def estargz_to_registry(args: list[str], src: Path, registry: RegistryDaemon, ref: str,
                        ) -> dict:
    """Run ``estargz ARGS --json SRC docker://REGISTRY/REF``; the image part
    of its JSON summary."""
    r = run_cli(*args, "--json", "--dest-tls-verify", "false", src,
                f"docker://{registry.host}/{ref}")
    assert r.code == 0, f"estargz {' '.join(args)} failed: {r.err}"
    out = r.json()
    return out.get("image", out)  # optimize nests the conversion under "image"


@pytest.fixture(scope="session")
def lazy_sources() -> dict[str, Path]:
    """Cache directories of the source images (built by build.py)."""
    return build_images(*WORKLOADS)


@pytest.fixture(scope="session")
def lazy_images(lazy_sources: dict[str, Path], registry: RegistryDaemon,
                tmp_path_factory) -> dict[tuple[str, str], PushedImage]:
    """(image, variant) -> the image pushed to ``registry``: the original
    (skopeo copy), ``estargz convert --oci`` and ``estargz optimize --oci``
    of its workload (record written with --record-out)."""
    work = tmp_path_factory.mktemp("lazy-images")
    images = {}
    for name, w in WORKLOADS.items():
        layout = lazy_sources[name] / "oci"
        expect = w.expect or (lazy_sources[name] / "expected-output.txt").read_text().strip()
        original = PushedImage(name, "original", f"{name}:original", args=w.args,
                               expect=expect)
        skopeo_copy(f"oci:{layout}:latest", f"docker://{registry.host}/{original.ref}")
        images[name, "original"] = original

        ref = f"{name}:esgz"
        info = estargz_to_registry(["convert", "--oci"], layout, registry, ref)
        images[name, "convert"] = PushedImage(name, "convert", ref, info["layers"],
                                              args=w.args, expect=expect)

        ref = f"{name}:esgz-optimized"
        record_file = work / f"{name}.record.jsonl"
        opts = ["optimize", "--oci", "--record-out", str(record_file)]
        if w.args is not None:
            opts += ["--args", json.dumps(w.args)]
        info = estargz_to_registry(opts, layout, registry, ref)
        record: dict[int, list[str]] = {}
        for line in record_file.read_text().splitlines():
            entry = json.loads(line)
            record.setdefault(entry["layerIndex"], []).append(entry["path"])
        images[name, "optimize"] = PushedImage(name, "optimize", ref, info["layers"], record,
                                               args=w.args, expect=expect)
    return images


@pytest.fixture(scope="session")
def lazy_proxy(registry: RegistryDaemon) -> Iterator[FaultProxy]:
    """The proxy every lazy pull goes through, logging each request."""
    with FaultProxy(registry.host) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def original_trees(containerd: Containerd, registry: RegistryDaemon, lazy_images,
                   tmp_path_factory):
    """name -> treecompare snapshot of the original image, pulled and
    unpacked by containerd's overlayfs snapshotter (computed on first use)."""
    trees: dict[str, dict] = {}
    base = tmp_path_factory.mktemp("original-trees")

    def tree(name: str) -> dict:
        if name not in trees:
            ref = f"{registry.host}/{lazy_images[name, 'original'].ref}"
            containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
            with mounted_image(containerd, ref, base / name, "overlayfs") as root:
                trees[name] = snapshot_tree(root)
        return trees[name]

    return tree


def layer_ranges(blob: Path, paths: list[str]) -> dict[str, list[tuple[int, int]]]:
    """path -> compressed byte ranges [start, end) of its chunks in ``blob``
    (regular files with data only: what a read of the file fetches)."""
    out = {}
    with estargz.FileSource(str(blob)) as src:
        reader = estargz.LayerReader(src)
        for path in paths:
            try:
                chunks = reader.chunks(path)
            except estargz.NotFound:  # a directory, symlink or device: no data
                continue
            if chunks:
                out[path] = [(c.offset, nxt) for c, _, nxt in chunks]
    return out


def implicit_dirs(registry: RegistryDaemon, layers: list[dict]) -> set[str]:
    """Directories whose uppermost mention is as the parent of another entry
    in a layer that does not list them itself (a diff layer such as
    debian-python3's).  Every unpacker invents such a directory with a time
    of its own - containerd's overlayfs unpack the time of the unpack, the
    Stargz Snapshotter Go's zero time (0001-01-01) - so their mtimes are
    not the image's to compare."""
    state: dict[str, bool] = {}  # path -> implicit in the uppermost layer naming it
    for layer in layers:
        with estargz.FileSource(str(blob_path(registry, layer["new_digest"]))) as src:
            names = {estargz.clean_name(e.name) for e in estargz.LayerReader(src).entries
                     if e.type != "chunk"}
        for name in names:
            state[name] = False
        for name in names:
            parent = os.path.dirname(name)
            while parent and parent not in names:
                state[parent] = True
                parent = os.path.dirname(parent)
    return {path for path, implicit in state.items() if implicit}


def blob_requests(proxy: FaultProxy, digest: str, size: int) -> list[tuple[int, int]]:
    """Byte ranges of the GETs of blob ``digest`` in the proxy's log."""
    out = []
    for e in proxy.requests("GET", f"/blobs/{digest}"):
        out += parse_ranges(e.range, size)
    return out


def covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether the union of ``ranges`` holds every byte of [start, end)."""
    pos = start
    for a, b in sorted(ranges):
        if a > pos:
            break
        pos = max(pos, b)
    return pos >= end


# --- lazy pull, run, compare ------------------------------------------------------

@pytest.mark.parametrize("variant", ["convert", "optimize"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_lazy_pull_mounts_verifies_prefetches_and_runs(
        lazy_puller: LazyPuller, lazy_proxy: FaultProxy, registry: RegistryDaemon,
        lazy_images, name: str, variant: str):
    """rpull mounts every layer lazily and verified; until the container
    starts only the footer, the TOC and our prefetch are fetched; the
    workload runs, and an optimized image needs nothing more."""
    image = lazy_images[name, variant]
    ref = f"{lazy_proxy.host}/{image.ref}"
    sn = lazy_puller.snapshotter
    digests = [layer["new_digest"] for layer in image.layers]

    # The manifest carries our TOC digests, which the snapshotter checks.
    manifest = get_manifest(registry.host, image.ref)
    assert [desc["digest"] for desc in manifest["layers"]] == digests
    assert [desc["annotations"][estargz.TOC_DIGEST_ANNOTATION] for desc in manifest["layers"]] \
        == [layer["toc_digest"] for layer in image.layers]

    lazy_proxy.clear()
    lazy_puller.rpull(ref)

    # A FUSE mount per layer, each verified against the annotation.
    mounts = sn.fuse_mounts()
    assert len(mounts) == len(digests), (mounts, sn.log_tail())
    assert sorted(sn.verified_mountpoints()) == mounts
    assert set(sn.prepared_remote_snapshots().values()) == {True}

    # The snapshotter prefetches exactly our landmark offset (0: a layer with
    # .no.prefetch.landmark), and those bytes were requested from the registry.
    prefetched = sn.wait_prefetched(digests)
    assert {d: prefetched[d] for d in digests} == \
        {layer["new_digest"]: layer["prefetch_size"] for layer in image.layers}
    if variant == "optimize":
        assert any(layer["prefetch_size"] for layer in image.layers)
    for layer in image.layers:
        got = blob_requests(lazy_proxy, layer["new_digest"], layer["new_size"])
        if layer["prefetch_size"]:
            assert covers(got, 0, layer["prefetch_size"]), (layer, got)
        # ... and nothing else but the footer and TOC: no byte between the
        # landmark and the TOC, each rounded to the snapshotter's fetch unit
        # (past the 2-byte probe "bytes=0-1" the resolver sends first).
        with estargz.FileSource(str(blob_path(registry, layer["new_digest"]))) as src:
            toc_offset = estargz.LayerReader(src).toc_offset
        gap = (max(2, -(-layer["prefetch_size"] // FETCH_UNIT) * FETCH_UNIT),
               toc_offset // FETCH_UNIT * FETCH_UNIT)
        assert not [g for g in got if ranges_overlap(g, gap)], (layer, gap, got)

    # The container runs its workload.
    lazy_proxy.clear()
    result = lazy_puller.run(ref, *(image.args or []))
    assert image.expect in result.stdout, (result.stdout, result.stderr)

    if variant == "optimize":
        # Nothing the run read was fetched on demand: no range request after
        # the start falls inside a file the record lists - nor anywhere else,
        # since the record holds every file the workload (and the runtime
        # before it) read.
        fetched = {}
        for i, layer in enumerate(image.layers):
            got = blob_requests(lazy_proxy, layer["new_digest"], layer["new_size"])
            if not got:
                continue
            blob = blob_path(registry, layer["new_digest"])
            recorded = layer_ranges(blob, image.record.get(i, []))
            inside = sorted({p for p, rs in recorded.items()
                             for r in rs for g in got if ranges_overlap(r, g)})
            assert not inside, f"layer {i}: recorded files fetched after start: {inside}"
            fetched[i] = got
        assert not fetched, f"fetched on demand while the workload ran: {fetched}"


@pytest.mark.parametrize("variant", ["convert", "optimize"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_lazily_mounted_root_filesystem_equals_the_original(
        make_lazy_puller, registry: RegistryDaemon, lazy_images, original_trees,
        name: str, variant: str):
    """Every file read through the lazy mounts (overlayfs over FUSE, as a
    container sees it) is the image.  Reading all of debian-python3 takes
    some thousand range requests, so this pulls from the registry directly
    (the logging proxy would only slow them down) and keeps the
    snapshotter's caches in memory instead of on disk, which halves the
    time and changes nothing in what is served."""
    lazy_puller = make_lazy_puller(SnapshotterConfig(extra=MEMORY_CACHES))
    image = lazy_images[name, variant]
    ref = f"{registry.host}/{image.ref}"
    lazy_puller.rpull(ref)
    assert len(lazy_puller.snapshotter.fuse_mounts()) == len(image.layers)
    with lazy_puller.mounted(ref) as root:
        lazy_tree = snapshot_tree(root)
    original = dict(original_trees(name))
    for path in implicit_dirs(registry, image.layers) & original.keys() & lazy_tree.keys():
        original[path] = dataclasses.replace(original[path], mtime_ns=lazy_tree[path].mtime_ns)
    assert_same_tree(lazy_tree, original, mtime_tolerance_ns=MTIME_TOLERANCE_NS)


# --- tampering ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def tamper_images(lazy_sources, registry: RegistryDaemon) -> dict[str, PushedImage]:
    """busybox by ``estargz convert`` (bin/busybox read on demand) and by
    ``estargz optimize`` (bin/busybox prefetched), with a compression level
    no other image uses, so that their layer blobs are their own and may be
    altered in the registry's storage."""
    source = lazy_sources["busybox"] / "oci"
    images = {}
    for variant, args in (("convert", ["convert"]),
                          ("optimize", ["optimize", "--args", json.dumps(["sh", "-c", "id"])])):
        ref = f"tamper:{variant}"
        info = estargz_to_registry([*args, "--oci", "--compression-level", "6"], source,
                                   registry, ref)
        assert info["layers"][0]["action"] == "converted"
        images[variant] = PushedImage("busybox", variant, ref, info["layers"])
    return images


@pytest.mark.parametrize("variant", ["convert", "optimize"])
def test_flipped_byte_in_a_chunk_reads_as_eio_never_wrong_bytes(
        lazy_puller: LazyPuller, lazy_proxy: FaultProxy, registry: RegistryDaemon,
        tamper_images: dict[str, PushedImage], variant: str):
    image = tamper_images[variant]
    layer = image.layers[0]
    blob = blob_path(registry, layer["new_digest"])
    (start, end), = layer_ranges(blob, ["bin/busybox"])["bin/busybox"]
    # The optimized image has bin/busybox in the prefetch: the broken chunk
    # then reaches the snapshotter's cache through the prefetch, not a read.
    assert (end <= layer["prefetch_size"]) == (variant == "optimize")
    with estargz.FileSource(str(blob)) as src:
        passwd = b"".join(estargz.LayerReader(src).iter_file("etc/passwd"))
    where = (start + end) // 2  # inside the deflate data of bin/busybox
    original = blob.read_bytes()
    tampered = bytearray(original)
    tampered[where] ^= 0x40
    blob.write_bytes(tampered)
    try:
        ref = f"{lazy_proxy.host}/{image.ref}"
        lazy_proxy.clear()
        # The TOC is intact: the layer mounts and verifies.
        lazy_puller.rpull(ref)
        assert len(lazy_puller.snapshotter.verified_mountpoints()) == 1
        with lazy_puller.mounted(ref) as root:
            # Other files are served as they are.
            assert (root / "etc" / "passwd").read_bytes() == passwd
            with pytest.raises(OSError) as caught:
                (root / "bin" / "busybox").read_bytes()
            assert caught.value.errno == errno.EIO
        # The bytes did come from the registry: the snapshotter saw them.
        got = blob_requests(lazy_proxy, layer["new_digest"], layer["new_size"])
        assert any(ranges_overlap((where, where + 1), g) for g in got)
        # A container cannot run its busybox either.
        result = lazy_puller.run(ref, "sh", "-c", "echo must-not-run", check=False)
        assert result.returncode != 0 and "must-not-run" not in result.stdout
    finally:
        blob.write_bytes(original)


def _assert_refused_and_pulled_whole(puller: LazyPuller, proxy: FaultProxy, ref: str,
                                     layer: dict, reason: str) -> None:
    """The snapshotter refused to mount the one layer lazily (``reason`` in
    its log), containerd pulled and unpacked the whole blob instead, and the
    container still runs."""
    proxy.clear()
    puller.rpull(ref)
    sn = puller.snapshotter
    assert sn.fuse_mounts() == []
    assert list(sn.prepared_remote_snapshots().values()) == [False]
    assert any(reason in e for e in sn.remote_snapshot_errors()), sn.remote_snapshot_errors()
    whole = [e for e in proxy.requests("GET", f"/blobs/{layer['new_digest']}") if not e.range]
    assert [e.sent for e in whole] == [layer["new_size"]]
    assert "still runs" in puller.run(ref, "sh", "-c", "echo still runs").stdout


def test_wrong_toc_digest_annotation_is_refused(
        lazy_puller: LazyPuller, lazy_proxy: FaultProxy, registry: RegistryDaemon,
        tamper_images: dict[str, PushedImage]):
    image = tamper_images["convert"]
    manifest = get_manifest(registry.host, image.ref)
    wrong = "sha256:" + "0" * 64
    manifest["layers"][0]["annotations"][estargz.TOC_DIGEST_ANNOTATION] = wrong
    put_manifest(registry.host, "tamper:wrong-toc", manifest)
    _assert_refused_and_pulled_whole(
        lazy_puller, lazy_proxy, f"{lazy_proxy.host}/tamper:wrong-toc", image.layers[0],
        f'invalid TOC JSON "{image.layers[0]["toc_digest"]}"; want "{wrong}"')


def test_docker_media_type_layer_is_not_lazily_pulled(
        lazy_puller: LazyPuller, lazy_proxy: FaultProxy, registry: RegistryDaemon):
    """Why `convert` defaults to OCI (issue 9, point 5): a Docker schema 2
    manifest has no annotations, so the snapshotter has no TOC digest to
    verify against and the pull silently becomes a full one."""
    source = build_images("docker-media-types")["docker-media-types"] / "oci"
    info = estargz_to_registry(["convert", "--docker-media-types"], source, registry,
                               "docker-typed:esgz")
    manifest = get_manifest(registry.host, "docker-typed:esgz")
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    _assert_refused_and_pulled_whole(lazy_puller, lazy_proxy,
                                     f"{lazy_proxy.host}/docker-typed:esgz",
                                     info["layers"][0], "digest of TOC JSON must be passed")
