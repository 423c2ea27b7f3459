"""Byte-identical output: fixed inputs convert to digests pinned before the
package restructure (issue 10).

The digests were computed with main's code at 0327c94, before estargz/ was
split into layer packages; any change of layout, refactoring or clean-up that
alters a single output byte fails here. A deliberate format change must
update the pins and say why in its commit.

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
    ("zlib-ng", False): ("sha256:b0b569284d0eb6bb97c286fcc5b6340ceba64dcacb0ed86ccd0050432d83b32f",
                         "sha256:ef41cefc54734f79394060ce8d9aee4e7125ae1790889867e0b4557270e9c606",
                         "sha256:05876cf16c23200c5f35ff933fd831aa4f80c07e462d95041b44a9f095395d16"),
    ("zlib-ng", True): ("sha256:9b013122a4d633238dbed9b42d6a690e9382c6a23835c9455b4232acaf4f8725",
                        "sha256:93c73986e2920ab9fc61aa7f31b82f9a30946024461234ebb187eac806e8cb62",
                        "sha256:732473566cda6708400797e5326b6deecdb715d9803a65d9c1713bb3b222c6e2"),
    ("zlib", False): ("sha256:cf82d32ae9709a34bcbcd0e503fea17f9b81c1c0baed2c5b2a4f93ac2b722d90",
                      "sha256:dbb54326bd5a0e0bdefa291dc2ade60fd3fc34ce384dc9fc5170c2b682665a2c",
                      "sha256:e541cc9bdf92799c08b8e3eb948dbd827a582358e8bf92321b102588f51811e9"),
    ("zlib", True): ("sha256:2a9af84c7b00487387dcf3daac457c3ae532f1f8a573e21ee3ecb857ce3da419",
                     "sha256:b0067476a8ee6becb7463d2626ae4eb650e3f7d94ba05c461013062a792541c0",
                     "sha256:8b10d02f5336dd314d4e8672dae803a875c5d01d83ed43e7496a6485f9896750"),
}

# Image digests: the image built here from sample-layer.tar.gz (no outside
# input at all), and the busybox test image, whose input is pinned too
# because build.py takes busybox from the Debian package of the day.
SAMPLE_IMAGE_PIN = "sha256:5ed14bc971dc5e0b084174d6da9313d41584754d1019a63f020c06ae992197de"
BUSYBOX_SOURCE = "sha256:56de6362eaf53d1e7275669b0defb11883a7ae8adf99bebcccce06e29a3596d1"
BUSYBOX_PIN = "sha256:2a5be6d0145954cc088896693eca071b81636e76751177b2d3509d4ba4ea03a1"


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
