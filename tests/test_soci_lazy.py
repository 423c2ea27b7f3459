"""SOCI indexes, lazily loaded by the real SOCI Snapshotter (issue 14, point 4).

The reference flow, with soci-snapshotter v0.16.1 and containerd 2 built
through the Go module proxy (scripts/build-go.sh, tests/socilazy.py):
debian-python3 (two gzip layers of 49 and 15 MiB, both above soci's 10 MiB
minimum) is pushed unchanged to Debian's registry (plain HTTP, no referrers
API), pulled into a containerd, and indexed with the ``soci`` CLI:

* v2: ``soci convert`` makes a SOCI-enabled image (a new image index holding
  the image manifest, annotated with ``com.amazon.soci.index-digest``, and
  the SOCI index manifest), pushed whole with ``ctr images push``;
* v1: ``soci create`` + ``soci push``: the index names the unchanged
  manifest as its ``subject``; oras, finding no referrers API, tags the
  referrers list ``sha256-HEX``.

A cold SOCI Snapshotter + containerd then pulls through a
:class:`services.FaultProxy` that logs every request, and the tests check:
a FUSE mount per indexed layer; until the container starts, no layer byte
but soci's 2- and 10-byte probes; the workload runs, fetching spans by range
requests only (never a whole layer, fewer than the zTOC's spans); the root
filesystem read through the mounts equals the original image unpacked by
containerd's overlayfs snapshotter.  The same with the index of ``estargz
soci create SRC DST`` (skipped while that command does not exist).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import run_cli
from daemons import Containerd, build_images
from lazypull import mounted_image
from services import FaultProxy, RegistryDaemon

# The fixtures (soci_binaries, soci_puller, make_soci_puller) come from the
# socilazy plugin that conftest.py registers.
from socilazy import (
    MIN_LAYER_SIZE,
    SOCI_INDEX_ANNOTATION,
    SOCI_INDEX_ARTIFACT_V1,
    SOCI_INDEX_ARTIFACT_V2,
    Soci,
    SociBinaries,
    SociConfig,
    SociLazyPuller,
    lazy_start,
)
from test_lazypull import blob_requests, get_manifest, skopeo_copy
from treecompare import assert_same_tree, snapshot_tree

REPO_NAME = "soci-dp3"
WORKLOAD = ("python3", "-c", "import json, sqlite3; print('python3 soci ok')")
EXPECT = "python3 soci ok"
#: What soci reads of a layer before any file: ``bytes=0-1`` (the
#: resolver's probe) and ``bytes=0-9`` (the gzip header).
PROBE_BYTES = 2 + 10


@dataclass
class SociImages:
    """debian-python3 in the session registry (refs without host) and what
    the ``soci`` CLI made of it."""

    original: str
    v2: str
    #: The original manifest's layers: digest, size, mediaType.
    layers: list[dict]
    v1_index: str = ""
    v2_index: str = ""
    #: SOCI index manifests by digest (``soci index info``).
    indexes: dict[str, dict] = field(default_factory=dict)
    #: layer digest -> ``soci ztoc info`` of its zTOC.
    ztocs: dict[str, dict] = field(default_factory=dict)

    def indexed_layers(self) -> list[dict]:
        """The layers soci indexes (at least its 10 MiB minimum)."""
        return [layer for layer in self.layers if layer["size"] >= MIN_LAYER_SIZE]


@pytest.fixture(scope="session")
def soci_images(registry: RegistryDaemon, containerd: Containerd, soci_binaries: SociBinaries,
                tmp_path_factory) -> SociImages:
    """The original image, its SOCI-enabled image (v2) and its v1 index, in
    ``registry``; made with the session's containerd, whose overlayfs
    snapshot of the original is the tree to compare."""
    source = build_images("debian-python3")["debian-python3"] / "oci"
    host = registry.host
    images = SociImages(f"{REPO_NAME}:original", f"{REPO_NAME}:soci-v2",
                        get_manifest_layers_after_copy(source, host, f"{REPO_NAME}:original"))
    src = f"{host}/{images.original}"
    containerd.ctr("images", "pull", "--plain-http", src)
    soci = Soci(containerd, tmp_path_factory.mktemp("soci-cli"), soci_binaries.soci)

    soci.convert(src, f"{host}/{images.v2}")
    containerd.ctr("images", "push", "--plain-http", f"{host}/{images.v2}")
    soci.create(src)
    soci.push(src)

    for row in soci.index_list():
        digest, version = row["DIGEST"], row["MANIFEST VERSION"]
        images.indexes[digest] = soci.index_info(digest)
        if version == "v2":
            images.v2_index = digest
        elif version == "v1":
            images.v1_index = digest
    assert images.v1_index and images.v2_index, soci.index_list()
    for ztoc in images.indexes[images.v2_index]["layers"]:
        layer = ztoc["annotations"]["com.amazon.soci.image-layer-digest"]
        images.ztocs[layer] = soci.ztoc_info(ztoc["digest"])
    return images


def get_manifest_layers_after_copy(layout: Path, host: str, ref: str) -> list[dict]:
    """skopeo-copy the OCI layout to ``host/ref``; the pushed manifest's layers."""
    skopeo_copy(f"oci:{layout}:latest", f"docker://{host}/{ref}")
    return get_manifest(host, ref)["layers"]


@pytest.fixture(scope="session")
def soci_original_tree(soci_images: SociImages, containerd: Containerd, registry: RegistryDaemon,
                       tmp_path_factory) -> dict:
    """treecompare snapshot of the original image as containerd's overlayfs
    snapshotter unpacked it."""
    ref = f"{registry.host}/{soci_images.original}"
    with mounted_image(containerd, ref, tmp_path_factory.mktemp("soci-original") / "root",
                       "overlayfs") as root:
        return snapshot_tree(root)


@pytest.fixture(scope="session")
def soci_proxy(registry: RegistryDaemon):
    """The proxy every lazy pull goes through, logging each request."""
    with FaultProxy(registry.host) as proxy:
        yield proxy


def implicit_dirs(images: SociImages) -> set[str]:
    """Directories whose uppermost mention is as the parent of another entry
    in a layer that does not list them itself (debian-python3's diff layer
    has such): every unpacker invents them with a time of its own -
    containerd's overlayfs unpack the time of the unpack, the SOCI
    Snapshotter Go's zero time (0001-01-01) - so their mtimes are not the
    image's to compare.  From the zTOCs' file tables, which list every entry."""
    state: dict[str, bool] = {}  # path -> implicit in the uppermost layer naming it
    for layer in images.layers:
        names = {f["filename"].rstrip("/") for f in images.ztocs[layer["digest"]]["files"]}
        for name in names:
            state[name] = False
        for name in names:
            parent = os.path.dirname(name)
            while parent and parent not in names:
                state[parent] = True
                parent = os.path.dirname(parent)
    return {path for path, implicit in state.items() if implicit}


def layer_fetches(proxy: FaultProxy, layers: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """layer digest -> byte ranges of its GETs in the proxy's log; a GET
    without Range counts as the whole layer."""
    return {layer["digest"]: blob_requests(proxy, layer["digest"], layer["size"])
            for layer in layers}


def assert_only_ranges(proxy: FaultProxy, layers: list[dict]) -> None:
    """No layer was fetched whole: every GET of a layer blob had a Range."""
    for layer in layers:
        whole = [e for e in proxy.requests("GET", f"/blobs/{layer['digest']}") if not e.range]
        assert not whole, (layer["digest"], [(e.status, e.sent) for e in whole])


def lazy_pull_run_and_compare(puller: SociLazyPuller, proxy: FaultProxy, images: SociImages,
                              ref: str, original_tree: dict) -> dict[str, tuple[int, int]]:
    """The reference checks for a SOCI-indexed image at ``ref`` (no host):
    lazy pull, run, compare the tree.  Returns, per indexed layer, the
    range requests and bytes fetched while the workload ran."""
    sn = puller.snapshotter
    indexed = images.indexed_layers()
    full = f"{proxy.host}/{ref}"

    proxy.clear()
    puller.rpull(full)
    # A FUSE mount per indexed layer, each prepared as a remote snapshot.
    assert len(sn.fuse_mounts()) == len(indexed), (sn.fuse_mounts(), sn.log_tail())
    prepared = sn.prepared_remote_snapshots()
    assert list(prepared.values()) == [True] * len(indexed), (prepared,
                                                              sn.remote_snapshot_errors())
    # Until a container starts, soci reads its probes of each layer, nothing more.
    for digest, got in layer_fetches(proxy, indexed).items():
        assert sum(b - a for a, b in got) <= PROBE_BYTES, (digest, got)
    assert_only_ranges(proxy, indexed)

    # The workload runs, fetching spans on demand, by range only and not all
    # of them (a request per span: soci fetches a span whole).
    proxy.clear()
    result = puller.run(full, *WORKLOAD)
    assert EXPECT in result.stdout, (result.stdout, result.stderr)
    assert_only_ranges(proxy, indexed)
    fetched = {}
    for layer in indexed:
        got = blob_requests(proxy, layer["digest"], layer["size"])
        fetched[layer["digest"]] = (len(got), sum(b - a for a, b in got))
        assert len(got) < images.ztocs[layer["digest"]]["num_spans"], (layer, got)
    total = sum(n for _, n in fetched.values())
    assert 0 < total < sum(layer["size"] for layer in indexed) // 2, fetched

    # Every file read through the lazy mounts is the image's.
    with puller.mounted(full) as root:
        lazy_tree = snapshot_tree(root)
    original = dict(original_tree)
    for path in implicit_dirs(images) & original.keys() & lazy_tree.keys():
        original[path] = dataclasses.replace(original[path], mtime_ns=lazy_tree[path].mtime_ns)
    assert_same_tree(lazy_tree, original)
    assert_only_ranges(proxy, indexed)
    # Having read every file, soci fetched each span of each layer exactly
    # once, back to back from the end of the gzip header (10 bytes in these
    # layers) to the end of the blob; neighbours share at most the byte holding their checkpoint's
    # bit offset.
    for layer in indexed:
        got = sorted(blob_requests(proxy, layer["digest"], layer["size"]))
        assert len(got) == images.ztocs[layer["digest"]]["num_spans"], got
        assert got[0][0] == 10 and got[-1][1] == layer["size"], got
        assert all(0 <= prev_end - start <= 1 for (_, prev_end), (start, _) in
                   zip(got, got[1:], strict=False)), got
    return fetched


def fetch_manifest(host: str, repo: str, reference: str) -> tuple[str, dict]:
    """GET a manifest or index from the registry: (its digest, the document)."""
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{reference}", headers={
        "Accept": ", ".join(["application/vnd.oci.image.index.v1+json",
                             "application/vnd.oci.image.manifest.v1+json"])})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return "sha256:" + hashlib.sha256(raw).hexdigest(), json.loads(raw)


def test_soci_cli_indexes_are_what_the_snapshotter_looks_up(soci_images: SociImages,
                                                            registry: RegistryDaemon):
    """What soci v0.16.1 writes, as the snapshotter finds it.  v1: an index
    manifest whose config media type is the artifact type and whose
    ``subject`` is the unchanged manifest, found by the ``sha256-HEX`` tag
    of the referrers fallback.  v2: a new image index holding the image
    manifest - annotated with the index digest, so with a digest of its own,
    but the same config and layers - and the index manifest, with
    ``artifactType`` and the platform.  Both carry the same zTOCs."""
    images = soci_images
    host = registry.host
    original_digest, original = fetch_manifest(host, REPO_NAME, "original")

    v1 = images.indexes[images.v1_index]
    assert v1["config"]["mediaType"] == SOCI_INDEX_ARTIFACT_V1
    assert v1["subject"]["digest"] == original_digest
    _, referrers = fetch_manifest(host, REPO_NAME, original_digest.replace(":", "-"))
    assert [(m["digest"], m["artifactType"]) for m in referrers["manifests"]] == \
        [(images.v1_index, SOCI_INDEX_ARTIFACT_V1)]

    _, index = fetch_manifest(host, REPO_NAME, "soci-v2")
    by_type = {m.get("artifactType", ""): m for m in index["manifests"]}
    assert set(by_type) == {"", SOCI_INDEX_ARTIFACT_V2}, index
    assert by_type[SOCI_INDEX_ARTIFACT_V2]["digest"] == images.v2_index
    image_desc = by_type[""]
    assert image_desc["annotations"][SOCI_INDEX_ANNOTATION] == images.v2_index
    bound_digest, bound = fetch_manifest(host, REPO_NAME, image_desc["digest"])
    assert bound_digest != original_digest
    assert bound["annotations"][SOCI_INDEX_ANNOTATION] == images.v2_index
    assert (bound["config"], bound["layers"]) == (original["config"], original["layers"])
    v2 = images.indexes[images.v2_index]
    assert "subject" not in v2

    # One zTOC per layer of at least 10 MiB, in both, byte-identical.
    def ztocs(doc: dict) -> dict[str, str]:
        return {z["annotations"]["com.amazon.soci.image-layer-digest"]: z["digest"]
                for z in doc["layers"]}
    assert ztocs(v1) == ztocs(v2)
    assert sorted(ztocs(v2)) == sorted(layer["digest"] for layer in images.indexed_layers())


def test_soci_v2_image_loads_lazily_and_serves_the_original_tree(
        soci_puller: SociLazyPuller, soci_proxy: FaultProxy, soci_images: SociImages,
        soci_original_tree: dict):
    """The reference: ``soci convert``'s image, pulled by tag; the
    snapshotter finds the index from the manifest's annotation."""
    fetched = lazy_pull_run_and_compare(soci_puller, soci_proxy, soci_images, soci_images.v2,
                                        soci_original_tree)
    assert "using soci v2 index annotation" in soci_puller.snapshotter.index_lookups()
    print(f"\nsoci v2: (range requests, bytes) per layer while the workload ran: {fetched}")


def test_soci_v1_index_is_used_when_named_or_found_through_the_tag_fallback_when_enabled(
        make_soci_puller, soci_proxy: FaultProxy, soci_images: SociImages):
    """The unchanged image with a v1 index: the default config (v2 only)
    pulls it whole unless the pull names the index (the
    ``soci.index.digest`` label); with ``soci_v1`` the snapshotter asks the
    referrers API, gets 404 from Debian's registry and reads the
    ``sha256-HEX`` tag."""
    ref = f"{soci_proxy.host}/{soci_images.original}"
    indexed = soci_images.indexed_layers()

    default = make_soci_puller()
    soci_proxy.clear()
    default.rpull(ref)
    assert default.snapshotter.fuse_mounts() == []
    assert "soci v1 is disabled" in default.snapshotter.index_lookups()
    whole = {layer["digest"]: [e.sent for e in soci_proxy.requests(
        "GET", f"/blobs/{layer['digest']}") if not e.range] for layer in indexed}
    assert whole == {layer["digest"]: [layer["size"]] for layer in indexed}

    named = make_soci_puller()
    soci_proxy.clear()
    named.rpull(ref, index_digest=soci_images.v1_index)
    assert len(named.snapshotter.fuse_mounts()) == len(indexed)
    assert named.snapshotter.index_lookups() == ["using provided soci index digest"]
    assert not [e for e in soci_proxy.requests("GET") if "/referrers/" in e.path]

    v1 = make_soci_puller(SociConfig(soci_v1=True))
    soci_proxy.clear()
    v1.rpull(ref)
    assert len(v1.snapshotter.fuse_mounts()) == len(indexed)
    assert v1.snapshotter.index_lookups()[-1] == "using soci v1 index via referrers API"
    digest = get_manifest_digest(soci_proxy, soci_images.original)
    asked = [(e.path.split("?")[0], e.status) for e in soci_proxy.requests("GET")
             if "/referrers/" in e.path or "/manifests/sha256-" in e.path]
    assert asked == [(f"/v2/{REPO_NAME}/referrers/{digest}", 404),
                     (f"/v2/{REPO_NAME}/manifests/{digest.replace(':', '-')}", 200)]
    assert EXPECT in v1.run(ref, *WORKLOAD).stdout
    assert_only_ranges(soci_proxy, indexed)


def get_manifest_digest(proxy: FaultProxy, ref: str) -> str:
    """The digest of manifest ``ref`` (REPO:TAG) in the proxy's registry."""
    repo, _, tag = ref.rpartition(":")
    return fetch_manifest(proxy.upstream, repo, tag)[0]


def test_lazy_start_helper_for_benchmarks(soci_proxy: FaultProxy, soci_images: SociImages,
                                          registry: RegistryDaemon, soci_binaries: SociBinaries,
                                          tmp_path_factory, host_dirs):
    """:func:`socilazy.lazy_start`, as the start-up benchmark calls it."""
    soci_proxy.clear()
    start = lazy_start(tmp_path_factory.mktemp("soci-bench"),
                       f"{registry.host}/{soci_images.v2}", *WORKLOAD,
                       proxy_host=soci_proxy.host, binaries=soci_binaries)
    assert EXPECT in start.stdout
    assert start.fuse_mounts == len(soci_images.indexed_layers())
    assert start.pull_seconds > 0 and start.run_seconds > 0
    assert_only_ranges(soci_proxy, soci_images.indexed_layers())


def estargz_soci_create_missing() -> bool:
    """Whether this tree's CLI lacks ``estargz soci create``."""
    return run_cli("soci", "create", "--help").code != 0


@pytest.mark.skipif(estargz_soci_create_missing(), reason="needs estargz soci create")
def test_estargz_soci_index_loads_lazily_and_serves_the_original_tree(
        soci_puller: SociLazyPuller, soci_proxy: FaultProxy, soci_images: SociImages,
        registry: RegistryDaemon, soci_original_tree: dict):
    """Our index (``estargz soci create SRC DST``, v2 by default) of the
    unchanged image, loaded by the real snapshotter exactly as soci's own."""
    dst = f"{REPO_NAME}:estargz-soci"
    r = run_cli("soci", "create", "--src-tls-verify", "false", "--dest-tls-verify", "false",
                f"docker://{registry.host}/{soci_images.original}",
                f"docker://{registry.host}/{dst}")
    assert r.code == 0, r.err
    _, index = fetch_manifest(registry.host, REPO_NAME, "estargz-soci")
    image_desc, = [m for m in index["manifests"] if "artifactType" not in m]
    _, bound = fetch_manifest(registry.host, REPO_NAME, image_desc["digest"])
    assert bound["layers"] == soci_images.layers
    fetched = lazy_pull_run_and_compare(soci_puller, soci_proxy, soci_images, dst,
                                        soci_original_tree)
    assert "using soci v2 index annotation" in soci_puller.snapshotter.index_lookups()
    print(f"\nestargz soci v2: (range requests, bytes) per layer while the workload ran: "
          f"{fetched}")


def test_optimize_soci_prefetches_exactly_what_the_workload_reads(
        make_soci_puller, soci_proxy: FaultProxy, soci_images: SociImages,
        registry: RegistryDaemon, tmp_path: Path):
    """``estargz optimize --soci`` (issue 14, point 3): the workload is
    profiled, the image stays as it is, and the SOCI index carries one
    prefetch artifact per layer read, the spans of the files read in
    first-access order.  With ``[prefetch] enable`` the snapshotter fetches
    those spans while it mounts the layers, and the workload then runs
    without a single on-demand fetch.  ``soci create --load-order`` with the
    document optimize wrote makes the same index."""
    host = registry.host
    plain = ("--src-tls-verify", "false", "--dest-tls-verify", "false")
    doc = tmp_path / "python3.load-order.json"
    r = run_cli("optimize", "--soci", "--period", "60", "--args", json.dumps(list(WORKLOAD)),
                "--wait-on-line", EXPECT, "--load-order-out", doc, "--json", *plain,
                f"docker://{host}/{soci_images.original}",
                f"docker://{host}/{REPO_NAME}:optimized-soci")
    assert r.code == 0, r.err
    result = json.loads(r.out)["soci"]
    (index,) = result["indexes"]
    layers = {x["digest"]: x for x in index["layers"]}
    indexed = soci_images.indexed_layers()
    for layer in indexed:
        got = layers[layer["digest"]]
        assert got["prefetch"] and 0 < got["prefetch_spans"] <= got["spans"], got
    loaded = json.loads(doc.read_bytes())
    assert loaded["workload"] == "python3"
    assert {x["digest"] for x in loaded["layers"]} >= {x["digest"] for x in indexed}

    # The same document through soci create gives the same SOCI index.
    r = run_cli("soci", "create", "--load-order", doc, "--json", *plain,
                f"docker://{host}/{soci_images.original}",
                f"docker://{host}/{REPO_NAME}:from-load-order")
    assert r.code == 0, r.err
    assert json.loads(r.out)["indexes"][0]["index"] == index["index"]

    puller = make_soci_puller(SociConfig(prefetch=True))
    full = f"{soci_proxy.host}/{REPO_NAME}:optimized-soci"
    soci_proxy.clear()
    puller.rpull(full)
    before = layer_fetches(soci_proxy, indexed)
    for layer in indexed:
        want = layers[layer["digest"]]
        spans = sum(b - a for a, b in before[layer["digest"]]) - PROBE_BYTES
        # Every prefetched span was fetched at mount time (spans may share a byte).
        assert want["prefetch_bytes"] - want["prefetch_spans"] <= spans <= \
            want["prefetch_bytes"], (layer["digest"], before[layer["digest"]], want)
    soci_proxy.clear()
    result_run = puller.run(full, *WORKLOAD)
    assert EXPECT in result_run.stdout, (result_run.stdout, result_run.stderr)
    after = layer_fetches(soci_proxy, indexed)
    assert all(not got for got in after.values()), after
    print(f"\noptimize --soci: prefetched (spans, bytes) per layer: "
          f"{ {d[:19]: (x['prefetch_spans'], x['prefetch_bytes']) for d, x in layers.items()} }")
