"""`estargz optimize` reads its source once: one manifest resolution, pinned;
one GET per blob; one decompression per layer (the root filesystem and the
converter share the staged, uncompressed copy); the same bytes out as a plain
conversion with the same record.

Counted where it happens: requests through a logging proxy in front of a
real registry, and calls of the one function that decompresses a layer.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import estargz.layer.layerinput as layerinput
import estargz.transports.oci as oci_transport
from conftest import run_cli
from estargz import (
    ImageConvertOptions,
    StagedSource,
    TransportOptions,
    convert_source,
    open_source,
    parse_reference,
)
from profiler.optimize import OptimizeOptions, optimize_image
from services import FaultProxy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="profiling needs root")

PLAIN = TransportOptions(tls_verify=False)


def skopeo_copy(src: str, dst: str) -> None:
    p = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", src, dst],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def convert_digest(src: str, dst: Path, record: Path) -> str:
    r = run_cli("convert", src, f"oci:{dst}", "--record-in", record, "--json")
    assert r.code == 0, r.err
    return str(r.json()["digest"])


@pytest.fixture
def decompressed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kind of every layer decompression in this process, in order:
    ``_decompress_into`` is the one place a layer is decompressed."""
    kinds: list[str] = []
    real = layerinput._decompress_into

    def counting(kind, head, src, dst):
        kinds.append(kind)
        return real(kind, head, src, dst)

    monkeypatch.setattr(layerinput, "_decompress_into", counting)
    return kinds


def test_one_get_per_blob_and_one_decompression_per_layer(tmp_path, test_images, registry,
                                                          decompressed):
    skopeo_copy(f"oci:{test_images.debian_python3}:latest",
                f"docker://{registry.host}/onepass/py3:src")
    record = tmp_path / "record.jsonl"
    with FaultProxy(registry.host) as proxy:
        result = optimize_image(
            f"docker://{proxy.host}/onepass/py3:src", f"oci:{tmp_path / 'out'}",
            OptimizeOptions(convert=ImageConvertOptions(src=PLAIN), quiet=True,
                            args=["python3", "-c", "import json"], record_out=str(record)))
        log = list(proxy.log)
    assert result.image is not None
    manifest = json.loads((test_images.debian_python3 / "blobs" / "sha256" /
                           result.manifest_digest.split(":", 1)[1]).read_bytes())
    layers = [d["digest"] for d in manifest["layers"]]
    assert len(layers) == 2
    # The profile saw python read json: the run did happen, on the staged root.
    assert "usr/lib/python3.11/json/__init__.py" in [a.path for a in result.accesses]

    # (a) The tag resolved once; each blob (config, every layer) fetched once.
    gets = [e.path for e in log if e.method == "GET" and e.status == 200]
    assert sum(p.endswith("/manifests/src") for p in gets) == 1, gets
    for digest in [manifest["config"]["digest"], *layers]:
        assert sum(p.endswith(f"/blobs/{digest}") for p in gets) == 1, (digest, gets)
    assert not [p for p in gets if "/manifests/sha256:" in p], gets

    # (b) One decompression per layer: extraction and conversion read one copy.
    assert decompressed == ["gzip"] * len(layers)

    # (c) The same image as a plain conversion with the same record.
    assert result.image.digest == convert_digest(
        f"oci:{test_images.debian_python3}:latest", tmp_path / "plain", record)


def test_prefetch_list_reads_each_layer_once_too(tmp_path, test_images, decompressed,
                                                 monkeypatch):
    # Converted layers are renamed into the layout: only the config is copied.
    copied: list[str] = []
    real_copy = oci_transport._copy_file

    def counting_copy(src, out):
        copied.append(src)
        return real_copy(src, out)

    monkeypatch.setattr(oci_transport, "_copy_file", counting_copy)
    record = tmp_path / "record.jsonl"
    src = f"oci:{test_images.debian_python3}:latest"
    result = optimize_image(src, f"oci:{tmp_path / 'out'}",
                            OptimizeOptions(prefetch_list=("/usr/bin/python3.11",
                                                           "usr/lib/python3.11/json/*.py"),
                                            record_out=str(record), quiet=True))
    assert decompressed == ["gzip", "gzip"]
    assert len(copied) == 1 and copied[0].endswith(".json"), copied
    assert result.image is not None
    assert result.image.digest == convert_digest(src, tmp_path / "plain", record)


def test_the_pinned_manifest_is_converted_when_the_tag_moves(tmp_path, test_images, registry):
    ref = f"{registry.host}/onepass/moving:tag"
    skopeo_copy(f"oci:{test_images.busybox}:latest", f"docker://{ref}")
    with open_source(parse_reference(f"docker://{ref}"), PLAIN) as inner, \
            StagedSource(inner, str(tmp_path / "staged")) as source:
        pinned = source.pinned
        # The tag moves to another image between profiling and conversion.
        skopeo_copy(f"oci:{test_images.debian_multilayer}:latest", f"docker://{ref}")
        assert source.pinned == pinned
        moved = convert_source(source, f"oci:{tmp_path / 'out'}", ImageConvertOptions())
    expected = run_cli("convert", f"oci:{test_images.busybox}:latest",
                       f"oci:{tmp_path / 'busybox'}", "--json")
    assert expected.code == 0, expected.err
    assert moved.digest == expected.json()["digest"]
    assert [layer.old_digest for layer in moved.layers] == \
        [layer["old_digest"] for layer in expected.json()["layers"]]
