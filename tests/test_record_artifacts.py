"""Records travel with the image: `optimize --record-out docker://HOST/REPO`
pushes the record as an OCI 1.1 artifact whose `subject` is the source image;
`convert --record-from-referrers` finds it by the source's digest, and
`convert --record-in docker://…@DIGEST` reads it by name.

Against Debian's `docker-registry` 2.8 (Distribution 2.8), which has no
referrers API (`GET /v2/REPO/referrers/DIGEST` is 404): the tag schema
fallback (`sha256-HEX` index) is what these tests exercise; the artifact is
checked with skopeo, not only with our own client.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import run_cli
from estargz import TransportOptions, sha256_digest
from estargz.image.descriptor import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor
from estargz.image.records import OCI_EMPTY, RECORD_ARTIFACT_TYPE
from estargz.registry.client import client_for
from estargz.registry.records import fallback_tag, fetch_record, find_record, push_record
from gobuild import build_go

PLAIN = TransportOptions(tls_verify=False)
RECORD = b'{"path":"bin/sh","manifestDigest":"sha256:' + b"a" * 64 + b'","layerIndex":0}\n'


def skopeo(*args: str) -> str:
    p = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def subject(registry, test_images) -> tuple[str, Descriptor]:
    """busybox in the registry: (repository, its manifest's descriptor)."""
    repo = "records/busybox"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{test_images.busybox}:latest",
           f"docker://{registry.host}/{repo}:1")
    raw = skopeo("inspect", "--raw", "--tls-verify=false",
                 f"docker://{registry.host}/{repo}:1").encode()
    return repo, Descriptor(json.loads(raw)["mediaType"], sha256_digest(raw), len(raw))


def test_push_uses_the_tag_schema_where_the_registry_has_no_referrers_api(registry, subject):
    repo, image = subject
    with client_for(registry.host, PLAIN) as client:
        assert client.get_referrers(repo, image.digest) is None  # Distribution 2.8: 404
        pushed = push_record(client, repo, RECORD, image, created="2026-01-01T00:00:00Z")
    assert pushed.found_by == f"tag {fallback_tag(image.digest)}"
    assert pushed.subject == image.digest
    # What another tool sees: the artifact, and the tag schema index.
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                 f"docker://{registry.host}/{repo}@{pushed.digest}"))
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == RECORD_ARTIFACT_TYPE
    assert manifest["subject"] == {"mediaType": image.media_type, "digest": image.digest,
                                   "size": image.size}
    assert manifest["config"]["mediaType"] == OCI_EMPTY and manifest["config"]["size"] == 2
    [layer] = manifest["layers"]
    assert (layer["mediaType"], layer["digest"], layer["size"]) == \
        (RECORD_ARTIFACT_TYPE, sha256_digest(RECORD), len(RECORD))
    assert layer["annotations"]["org.opencontainers.image.title"] == "stargz.record.json"
    index = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                              f"docker://{registry.host}/{repo}:{fallback_tag(image.digest)}"))
    [entry] = [m for m in index["manifests"] if m["digest"] == pushed.digest]
    assert entry["artifactType"] == RECORD_ARTIFACT_TYPE
    assert entry["annotations"]["org.opencontainers.image.created"] == "2026-01-01T00:00:00Z"
    with client_for(registry.host, PLAIN) as client:
        assert fetch_record(client, repo, pushed.digest) == RECORD
        # A newer record of the same image wins, and the choice is said.
        newer = RECORD.replace(b"bin/sh", b"bin/busybox")
        second = push_record(client, repo, newer, image, created="2026-02-01T00:00:00Z")
        record, digest, notes = find_record(client, repo, image.digest)
    assert (record, digest) == (newer, second.digest)
    assert notes and notes[0].startswith(f"2 records refer to {image.digest}; using the newest")


def test_the_record_file_image_of_stargz_snapshotter_pr_642_is_read(registry, subject):
    """One tar+gzip layer holding stargz.record.json, an ordinary image."""
    repo = "records/pr642"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("stargz.record.json")
        info.size = len(RECORD)
        tar.addfile(info, io.BytesIO(RECORD))
    layer = gzip.compress(buf.getvalue(), mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha256_digest(buf.getvalue())]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                                      "size": len(config)},
                           "layers": [{"mediaType": OCI_LAYER_GZIP,
                                       "digest": sha256_digest(layer),
                                       "size": len(layer)}]}).encode()
    with client_for(registry.host, PLAIN) as client:
        for blob in (config, layer):
            path = registry.root.parent / f"blob-{sha256_digest(blob)[7:19]}"
            path.write_bytes(blob)
            client.upload_blob(repo, sha256_digest(blob), len(blob), str(path))
        client.put_manifest(repo, "record", manifest, OCI_MANIFEST)
    with client_for(registry.host, PLAIN) as client:
        assert fetch_record(client, repo, "record") == RECORD


@pytest.fixture(scope="session")
def oras() -> Path:
    """The oras CLI, built once from the Go module proxy."""
    return build_go("oras")


def test_oras_reads_our_record_and_we_read_what_oras_attaches(tmp_path, registry,
                                                              test_images, oras):
    """An independent OCI 1.1 client: `oras discover` lists our record through
    the tag schema, `oras pull` saves it as stargz.record.json, byte for
    byte; a record `oras attach` puts on the image is the one we then find."""
    repo = "records/oras"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{test_images.busybox}:latest",
           f"docker://{registry.host}/{repo}:1")
    raw = skopeo("inspect", "--raw", "--tls-verify=false",
                 f"docker://{registry.host}/{repo}:1").encode()
    image = Descriptor(json.loads(raw)["mediaType"], sha256_digest(raw), len(raw))
    with client_for(registry.host, PLAIN) as client:
        ours = push_record(client, repo, RECORD, image, created="2026-03-01T00:00:00Z")

    def run_oras(*args: str) -> str:
        p = subprocess.run([str(oras), *args], capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        return p.stdout

    subject = f"{registry.host}/{repo}@{image.digest}"
    found = json.loads(run_oras("discover", "--plain-http", "--distribution-spec",
                                "v1.1-referrers-tag", "--format", "json", subject))
    [listed] = found["referrers"]
    assert (listed["digest"], listed["artifactType"]) == (ours.digest, RECORD_ARTIFACT_TYPE)
    run_oras("pull", "--plain-http", "-o", "pulled", f"{registry.host}/{repo}@{ours.digest}")
    assert (tmp_path / "pulled" / "stargz.record.json").read_bytes() == RECORD

    newer = RECORD.replace(b"bin/sh", b"bin/busybox")
    (tmp_path / "stargz.record.json").write_bytes(newer)
    run_oras("attach", "--plain-http", "--distribution-spec", "v1.1-referrers-tag",
             "--artifact-type", RECORD_ARTIFACT_TYPE, subject,
             f"stargz.record.json:{RECORD_ARTIFACT_TYPE}")
    with client_for(registry.host, PLAIN) as client:
        record, digest, notes = find_record(client, repo, image.digest)
    assert record == newer and digest != ours.digest  # oras dates it now: the newest
    assert notes[0].startswith("2 records refer to")


@pytest.mark.parametrize("args, message", [
    (("convert", "oci:/x", "oci:/y", "--record-from-referrers"), "needs a docker:// SRC"),
    (("convert", "oci:/x", "oci:/y", "--record-from-referrers", "--record-in", "f"),
     "not both"),
    (("optimize", "oci:/x", "--no-optimize", "--record-out",
      "docker://127.0.0.1:1/r@sha256:" + "0" * 64), "not to a digest"),
])
def test_usage_errors(args, message):
    r = run_cli(*args)
    assert r.code == 2 and message in r.err, r.err


@pytest.mark.skipif(os.geteuid() != 0, reason="profiling needs root")
def test_profile_once_convert_anywhere(tmp_path, registry, test_images):
    """optimize pushes the record beside the source; convert elsewhere, with
    the record found by the source's digest, makes the same image."""
    src = f"docker://{registry.host}/pipeline/py3:src"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{test_images.debian_python3}:latest", src)
    r = run_cli("optimize", src, f"oci:{tmp_path / 'optimized'}", "--args",
                '["python3", "-c", "import json"]', "--record-out",
                f"docker://{registry.host}/pipeline/py3", "--src-tls-verify=false",
                "--dest-tls-verify=false", "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["record"]["found_by"].startswith("tag sha256-")
    optimized = out["image"]["digest"]
    again = run_cli("convert", src, f"oci:{tmp_path / 'elsewhere'}", "--record-from-referrers",
                    "--src-tls-verify=false", "--json")
    assert again.code == 0, again.err
    assert again.json()["digest"] == optimized
    assert f"record {out['record']['digest']}" in again.err
    by_name = run_cli("convert", src, f"oci:{tmp_path / 'by-name'}", "--record-in",
                      f"docker://{out['record']['reference']}", "--src-tls-verify=false",
                      "--json")
    assert by_name.code == 0, by_name.err
    assert by_name.json()["digest"] == optimized
    # Without the record, the image differs: the record is what made it equal.
    plain = run_cli("convert", src, f"oci:{tmp_path / 'plain'}", "--src-tls-verify=false",
                    "--json")
    assert plain.code == 0 and plain.json()["digest"] != optimized
