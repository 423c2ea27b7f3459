"""Checks that an image destination is whole: every tag resolves, every
referenced blob is there with its digest and size, every eStargz layer
verifies against its TOC digest annotation. Shared by the concurrent-writer
and crash-safety tests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import estargz
from estargz.registry.client import RegistryClient

REF_NAME = "org.opencontainers.image.ref.name"
TOC = "containerd.io/snapshot/stargz/toc.digest"
INDEXES = ("application/vnd.oci.image.index.v1+json",
           "application/vnd.docker.distribution.manifest.list.v2+json")
REPO_ROOT = Path(__file__).resolve().parent.parent


def estargz_cmd(*args: str) -> list[str]:
    """The real CLI in a process of its own, as a pipeline runs it."""
    return [sys.executable, "-m", "estargz", *args]


def run_all(commands: list[list[str]], env: dict[str, str], timeout: float = 120) -> float:
    """Start every command at once; wait for all; each must exit 0. Seconds taken."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=REPO_ROOT) for c in commands]
    errors = []
    for c, p in zip(commands, procs, strict=True):
        _, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            errors.append(f"{' '.join(c[3:])}: exit {p.returncode}: {err.decode()[-2000:]}")
    assert not errors, "\n".join(errors)
    return time.monotonic() - t0


def index_tags(index: dict) -> list[str]:
    return sorted((m.get("annotations") or {}).get(REF_NAME, "") for m in index["manifests"])


def check_layout(root: Path, tags: set[str], *, skopeo: bool = True) -> dict:
    """``root`` is a valid layout holding exactly ``tags`` (each once), with
    every referenced blob whole; returns its index.json."""
    index = json.loads((root / "index.json").read_bytes())
    assert index_tags(index) == sorted(tags)
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}

    def blob(desc: dict) -> bytes:
        data = (root / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]).read_bytes()
        assert len(data) == desc["size"], desc
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"], desc
        return data

    def layer(desc: dict) -> None:
        blob(desc)
        path = root / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]
        with estargz.FileSource(str(path)) as src:
            estargz.verify_blob(src, desc["annotations"][TOC])

    for entry in index["manifests"]:
        walk(entry, blob, layer)
        if skopeo:
            tag = entry["annotations"][REF_NAME]
            p = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{root}:{tag}"],
                               capture_output=True)
            assert p.returncode == 0, p.stderr.decode()
            assert "sha256:" + hashlib.sha256(p.stdout).hexdigest() == entry["digest"]
    return index


def walk(desc: dict, blob, layer) -> None:
    """Every blob ``desc`` references: manifests and configs through
    ``blob(desc) -> bytes``, eStargz layers through ``layer(desc)``."""
    doc = json.loads(blob(desc))
    if desc["mediaType"] in INDEXES:
        for child in doc["manifests"]:
            walk(child, blob, layer)
        return
    blob(doc["config"])
    for item in doc["layers"]:
        assert TOC in item.get("annotations", {}), item
        layer(item)


def unpack_archive(archive: Path, dest: Path) -> Path:
    """An oci-archive's layout, unpacked to ``dest`` (its members must be
    exactly a layout: no lock file, no temporaries)."""
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        tf.extractall(dest, filter="data")
    assert all(n in ("index.json", "oci-layout", "blobs", "blobs/sha256")
               or n.startswith("blobs/sha256/")
               for n in names), names
    return dest


def check_registry(host: str, repo: str, tags: set[str]) -> None:
    """Every tag of ``repo`` resolves (skopeo too) and every blob it
    references downloads whole; eStargz layers verify, read by range."""
    client = RegistryClient(host, tls_verify=False)
    accept = (*INDEXES, "application/vnd.oci.image.manifest.v1+json",
              "application/vnd.docker.distribution.manifest.v2+json")
    try:
        def blob(desc: dict) -> bytes:
            if desc["mediaType"] in accept:
                data, _, _ = client.get_manifest(repo, desc["digest"], accept)
            else:
                buf = io.BytesIO()
                client.download_blob(repo, desc["digest"], desc["size"], buf)
                data = buf.getvalue()
            assert len(data) == desc["size"], desc
            assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"], desc
            return data

        def layer(desc: dict) -> None:
            blob(desc)
            src = client.blob_source(repo, desc["digest"], desc["size"])
            estargz.verify_blob(src, desc["annotations"][TOC])

        for tag in sorted(tags):
            data, media_type, _ = client.get_manifest(repo, tag, accept)
            walk({"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                  "size": len(data)}, blob, layer)
            p = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                f"docker://{host}/{repo}:{tag}"], capture_output=True)
            assert p.returncode == 0, p.stderr.decode()
            assert p.stdout == data
    finally:
        client.close()


def leftovers(*dirs: Path) -> list[str]:
    """Temporaries of ours (``.estargz-*``, ``estargz-*``, ``.NAME.*.tmp``)
    in ``dirs``, recursively."""
    found = []
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            for name in dirnames + filenames:
                if name.startswith((".estargz-", "estargz-")) or \
                        (name.startswith(".") and name.endswith(".tmp")):
                    found.append(os.path.join(dirpath, name))
    return sorted(found)
