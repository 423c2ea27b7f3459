"""Byte-identical output: fixed inputs convert to digests pinned before the
package restructure (issue 10).

The digests were computed with main's code at 0327c94, before estargz/ was
split into layer packages; any change of layout, refactoring or clean-up that
alters a single output byte fails here. A deliberate format change must
update the pins and say why in its commit. Changed once since, on purpose:
the TOC member is compressed at level 8 (``TOC_MAX_LEVEL``), which changed
the blob digests but no TOC digest and no diff_id.

The compressed bytes depend on the deflate implementation, so the layer
conversions use the ``zlib`` backend as well as the default ``zlib-ng``:
a new zlib-ng release that compresses differently fails only the zlib-ng
pins, which tells the two causes apart.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from estargz import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    ConvertOptions,
    ImageConvertOptions,
    convert_image,
    convert_layer,
)

TESTDATA = Path(__file__).resolve().parent.parent / "testdata"
SAMPLE_LAYER = TESTDATA / "sample-layer.tar.gz"
PRIORITIZED = [line for line in (TESTDATA / "sample-prioritized.txt").read_text().splitlines()
               if line and not line.startswith("#")]

# (backend, prioritized) -> (blob digest, TOC digest, diff_id)
LAYER_PINS: dict[tuple[str, bool], tuple[str, str, str]] = {
    ("zlib-ng", False): ("sha256:c7248cac66d2c016a7d5cb708ee16d0ef6cd1c666cddc13365c81fe3fb52f5e2",
                         "sha256:ef41cefc54734f79394060ce8d9aee4e7125ae1790889867e0b4557270e9c606",
                         "sha256:05876cf16c23200c5f35ff933fd831aa4f80c07e462d95041b44a9f095395d16"),
    ("zlib-ng", True): ("sha256:338d33636374fcdb74e00a50e7a65ff2d1466fe2d01ee315e9026f901f02c642",
                        "sha256:93c73986e2920ab9fc61aa7f31b82f9a30946024461234ebb187eac806e8cb62",
                        "sha256:732473566cda6708400797e5326b6deecdb715d9803a65d9c1713bb3b222c6e2"),
    ("zlib", False): ("sha256:161fc0784b8f3b5b3ab5da42eab8ef8ea4ffde73dadb5b79b51e593c465a33c3",
                      "sha256:dbb54326bd5a0e0bdefa291dc2ade60fd3fc34ce384dc9fc5170c2b682665a2c",
                      "sha256:e541cc9bdf92799c08b8e3eb948dbd827a582358e8bf92321b102588f51811e9"),
    ("zlib", True): ("sha256:5ab8b92c60171b4014e2ba81f911bb406a0eed889512387373c0fa44f29c3485",
                     "sha256:b0067476a8ee6becb7463d2626ae4eb650e3f7d94ba05c461013062a792541c0",
                     "sha256:8b10d02f5336dd314d4e8672dae803a875c5d01d83ed43e7496a6485f9896750"),
}

# Image digests: the image built here from sample-layer.tar.gz (no outside
# input at all), and the busybox test image, whose input is pinned too
# because build.py takes busybox from the Debian package of the day.
SAMPLE_IMAGE_PIN = "sha256:e4772317d1871ca85dc233c5c81f97a48d396c142cf84129fd4fd3d2a59ff76f"
BUSYBOX_SOURCE = "sha256:56de6362eaf53d1e7275669b0defb11883a7ae8adf99bebcccce06e29a3596d1"
BUSYBOX_PIN = "sha256:76fac9368934b47cca03972c1964a471e9379d7d80348a32e3602c4aed31c96c"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(layout: Path, data: bytes) -> str:
    digest = _digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def sample_image(layout: Path) -> None:
    """An OCI layout, tag ``latest``, whose one layer is sample-layer.tar.gz."""
    layer = SAMPLE_LAYER.read_bytes()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/app/bin/start"]},
        "rootfs": {"type": "layers", "diff_ids": [
            _digest(gzip.decompress(layer))]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _put(layout, config),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": _put(layout, layer),
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": _put(layout, manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.mark.parametrize("backend", ["zlib-ng", "zlib"])
@pytest.mark.parametrize("prioritized", [False, True], ids=["plain", "prioritized"])
def test_layer_digests(tmp_path, backend, prioritized):
    options = ConvertOptions(backend=backend, workers=2,
                             prioritized_files=PRIORITIZED if prioritized else None)
    r = convert_layer(str(SAMPLE_LAYER), str(tmp_path / "out.esgz"), options)
    assert (r.blob_digest, r.toc_digest, r.diff_id) == LAYER_PINS[(backend, prioritized)]


def test_sample_image_digest(tmp_path):
    src = tmp_path / "src"
    sample_image(src)
    r = convert_image(f"oci:{src}:latest", f"oci:{tmp_path / 'out'}:latest",
                      ImageConvertOptions(layer=ConvertOptions(prioritized_files=PRIORITIZED)))
    assert r.digest == SAMPLE_IMAGE_PIN


def test_busybox_image_digest(tmp_path, test_images):
    index = json.loads((test_images.busybox / "index.json").read_text())
    if index["manifests"][0]["digest"] != BUSYBOX_SOURCE:
        pytest.skip("the busybox test image changed (a new Debian busybox-static); "
                    "the pinned output digest is for " + BUSYBOX_SOURCE)
    r = convert_image(f"oci:{test_images.busybox}:latest", f"oci:{tmp_path / 'out'}:latest",
                      ImageConvertOptions(layer=ConvertOptions(prioritized_files=["bin/sh"])))
    assert r.digest == BUSYBOX_PIN
