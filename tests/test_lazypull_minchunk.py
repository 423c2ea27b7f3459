"""Smaller layers, lazily pulled by the Stargz Snapshotter v0.18 (issue 12, point 3).

``estargz convert --min-chunk-size`` (small files share gzip members; TOC
entries with ``innerOffset``) and ``--external-toc`` (each layer's TOC in the
TOC image ``TAG-esgztoc`` beside it) of lazy-kinds (every entry kind, a
9 MiB file) are pushed to Debian's registry and pulled with ``ctr-remote
images rpull``: every layer is a FUSE mount verified against our TOC digest,
the container runs, and the root filesystem read through the lazy mounts
equals the original unpacked by containerd's overlayfs snapshotter. Debian's
0.12 snapshotter reads neither layout; the last test pins what it does
instead (tests/test_minchunk.py pins its Go package's errors).
"""

from __future__ import annotations

import dataclasses

import pytest

from daemons import build_images
from lazypull import SnapshotterConfig
from services import RegistryDaemon
from test_lazypull import (
    MEMORY_CACHES,
    MTIME_TOLERANCE_NS,
    estargz_to_registry,
    get_manifest,
    implicit_dirs,
    skopeo_copy,
)
from treecompare import assert_same_tree, snapshot_tree

IMAGE = "lazy-kinds"
VARIANTS = {
    "min-chunk": ["--min-chunk-size", "65536"],
    "external-toc": ["--min-chunk-size", "65536", "--external-toc"],
}


@pytest.fixture(scope="module")
def pushed(registry: RegistryDaemon) -> dict[str, dict]:
    """variant -> the converted image's JSON summary (plus "ref"); and the
    original, copied by skopeo."""
    layout = build_images(IMAGE)[IMAGE] / "oci"
    skopeo_copy(f"oci:{layout}:latest", f"docker://{registry.host}/{IMAGE}:original")
    out = {"original": {"ref": f"{IMAGE}:original",
                        "expect": (layout.parent / "expected-output.txt").read_text().strip()}}
    for variant, args in VARIANTS.items():
        ref = f"{IMAGE}:{variant}"
        info = estargz_to_registry(["convert", "--oci", *args], layout, registry, ref)
        out[variant] = {**info, "ref": ref}
    return out


@pytest.mark.parametrize("snapshotter_version", ["v0.18"], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_v018_lazily_pulls_runs_and_reads_the_original_tree(
        make_lazy_puller, registry: RegistryDaemon, pushed, variant: str):
    image = pushed[variant]
    ref = f"{registry.host}/{image['ref']}"
    manifest = get_manifest(registry.host, image["ref"])
    if variant == "external-toc":
        # The TOC image, named and built as the reference's converter does.
        assert image["toc_image"] == f"docker://{ref}-esgztoc"
        toc_manifest = get_manifest(registry.host, image["ref"] + "-esgztoc")
        assert sorted(d["annotations"]["containerd.io/snapshot/stargz/layer.digest"]
                      for d in toc_manifest["layers"]) == \
            sorted(d["digest"] for d in manifest["layers"])
    puller = make_lazy_puller(SnapshotterConfig(extra=MEMORY_CACHES))
    puller.rpull(ref)
    sn = puller.snapshotter
    mounts = sn.fuse_mounts()
    assert len(mounts) == len(manifest["layers"]), (mounts, sn.log_tail())
    assert sorted(sn.verified_mountpoints()) == mounts

    result = puller.run(ref)
    assert pushed["original"]["expect"] in result.stdout, (result.stdout, result.stderr)

    with puller.mounted(ref) as root:
        lazy_tree = snapshot_tree(root)
    original_ref = f"{registry.host}/{pushed['original']['ref']}"
    puller.pull(original_ref)
    with puller.mounted(original_ref, "original", "overlayfs") as root:
        original = snapshot_tree(root)
    # Implicit parent directories get an unpacker's own mtime (see
    # implicit_dirs); the embedded-TOC variant names the same entries.
    for path in implicit_dirs(registry, pushed["min-chunk"]["layers"]) \
            & original.keys() & lazy_tree.keys():
        original[path] = dataclasses.replace(original[path], mtime_ns=lazy_tree[path].mtime_ns)
    assert_same_tree(lazy_tree, original, mtime_tolerance_ns=MTIME_TOLERANCE_NS)


@pytest.mark.parametrize("snapshotter_version", ["debian"], indirect=True)
def test_what_the_debian_snapshotter_does_with_these_layouts(
        make_lazy_puller, registry: RegistryDaemon, pushed):
    """Debian's 0.12 snapshotter, pinned (not endorsed): it mounts a
    min-chunk-size layer lazily, ignores innerOffset, and so reads the wrong
    bytes of a file in a shared member, which its chunk digest check turns
    into EIO: the container cannot start. An external-TOC layer's footer is
    not a footer to it: no lazy mount, containerd pulls the layers whole,
    and the container runs."""
    puller = make_lazy_puller(SnapshotterConfig(extra=MEMORY_CACHES))
    ref = f"{registry.host}/{pushed['min-chunk']['ref']}"
    puller.rpull(ref)
    assert len(puller.snapshotter.fuse_mounts()) == len(pushed["min-chunk"]["layers"])
    run = puller.run(ref, check=False)
    assert run.returncode != 0 and "input/output error" in run.stderr, run.stderr

    puller = make_lazy_puller(SnapshotterConfig(extra=MEMORY_CACHES))
    ref = f"{registry.host}/{pushed['external-toc']['ref']}"
    puller.rpull(ref)
    assert puller.snapshotter.fuse_mounts() == []
    assert "invalid magic number" in puller.snapshotter.log_tail()
    run = puller.run(ref)
    assert pushed["original"]["expect"] in run.stdout
