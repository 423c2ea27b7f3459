"""`estargz convert`: whole images between OCI layouts, archives and the daemon.

Each converted image is checked by independent consumers: skopeo reads it,
the Go reference verifies every layer against the TOC digest in its
manifest annotation, and containerd (unpacking, which checks diff_ids) and
the Docker engine run a command in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

TOC = "containerd.io/snapshot/stargz/toc.digest"
USIZE = "io.containers.estargz.uncompressed-size"


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def load(layout: Path, digest: str) -> dict:
    return json.loads(blob(layout, digest).read_bytes())


def root_of(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    return next(d for d in index["manifests"]
                if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)


def convert(*args: str, env: dict | None = None) -> dict:
    r = run_cli("convert", *args, "--json", env=env)
    assert r.code == 0, r.err
    return r.json()


def check_layers_with_reference(goref: Path, layout: Path, manifest: dict) -> None:
    """The reference verifies each layer with the TOC digest the manifest names."""
    for layer in manifest["layers"]:
        toc = layer["annotations"][TOC]
        p = subprocess.run([goref, "verify", blob(layout, layer["digest"]), toc],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        r = run_cli("layer", "verify", blob(layout, layer["digest"]), "--toc-digest", toc)
        assert r.code == 0, r.err


def test_oci_layout_to_oci_layout(tmp_path, test_images, goref):
    out = tmp_path / "out"
    result = convert(f"oci:{test_images.busybox}:latest", f"oci:{out}:esgz")
    m_desc = root_of(out, "esgz")
    assert m_desc["digest"] == result["digest"]
    manifest = load(out, m_desc["digest"])
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert layer["annotations"][TOC] == result["layers"][0]["toc_digest"]
    check_layers_with_reference(goref, out, manifest)
    # diff_ids match the uncompressed layers; history is kept.
    old_m = load(test_images.busybox, root_of(test_images.busybox, "latest")["digest"])
    old_cfg = load(test_images.busybox, old_m["config"]["digest"])
    cfg = load(out, manifest["config"]["digest"])
    r = run_cli("layer", "verify", blob(out, layer["digest"]), "--json")
    assert cfg["rootfs"]["diff_ids"] == [
        "sha256:" + __import__("hashlib").sha256(
            __import__("gzip").decompress(blob(out, layer["digest"]).read_bytes())).hexdigest()]
    assert int(layer["annotations"][USIZE]) == r.json()["uncompressed_size"]
    assert cfg["history"] == old_cfg["history"]
    assert cfg["config"] == old_cfg["config"]
    # skopeo, an independent client, reads it.
    p = subprocess.run(["skopeo", "inspect", f"oci:{out}:esgz"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["Layers"] == [layer["digest"]]
    copied = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", f"oci:{out}:esgz", f"oci:{copied}:c"], check=True,
                   capture_output=True)
    assert blob(copied, layer["digest"]).read_bytes() == blob(out, layer["digest"]).read_bytes()


def test_multilayer_debian_runs_under_containerd(tmp_path, test_images, goref, containerd):
    archive = tmp_path / "debian.tar"
    result = convert(f"oci:{test_images.debian_multilayer}:latest",
                     f"oci-archive:{archive}:latest")
    assert len(result["layers"]) == 2
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-C", unpacked, "-xf", archive], check=True)
    manifest = load(unpacked, root_of(unpacked, "latest")["digest"])
    check_layers_with_reference(goref, unpacked, manifest)
    name = "estargz.test/debian-multilayer:esgz"
    containerd.ctr("images", "import", "--base-name", "estargz.test/debian-multilayer",
                   "--digests", archive)
    containerd.ctr("images", "tag", "--force",
                   f"estargz.test/debian-multilayer@{result['digest']}", name)
    # Unpacking checks every layer's diff_id against the config.
    out = containerd.run(name, "sh", "-c", "cat /etc/motd; /usr/local/bin/hello; "
                         "test -e /etc/issue.net && echo present || echo whited-out").stdout
    assert "whited-out" in out
    containerd.ctr("images", "rm", name, check=False)


def test_index_platform_selection_and_dropped_artifacts(tmp_path, test_images):
    src = f"oci:{test_images.two_platform}:latest"
    default = convert(src, f"oci:{tmp_path / 'host'}")
    assert default["platforms"] == ["linux/amd64"]
    assert len(default["dropped"]) == 3  # arm64 and two attestations
    assert any("attestation-manifest" in d for d in default["dropped"])
    index = load(tmp_path / "host", default["digest"])
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64"]

    both = convert(src, f"oci:{tmp_path / 'all'}", "--all-platforms")
    assert sorted(both["platforms"]) == ["linux/amd64", "linux/arm64/v8"]
    assert len(both["dropped"]) == 2
    arm = convert(src, f"oci:{tmp_path / 'arm'}", "--platform", "linux/arm64")
    assert arm["platforms"] == ["linux/arm64/v8"]
    r = run_cli("convert", src, f"oci:{tmp_path / 'none'}", "--platform", "linux/s390x")
    assert r.code == 1
    assert r.err.strip().startswith("estargz: error: no manifest for linux/s390x in the index")
    assert not (tmp_path / "none").exists()


def test_docker_media_types_kept_with_warning_or_made_oci(tmp_path, test_images):
    src = f"oci:{test_images.docker_media_types}:latest"
    r = run_cli("convert", src, f"oci:{tmp_path / 'docker'}", "--docker-media-types", "--json")
    assert r.code == 0, r.err
    assert "allow_no_verification" in r.err
    m = load(tmp_path / "docker", r.json()["digest"])
    assert m["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert m["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert "annotations" not in m["layers"][0]
    # OCI is the default; --oci (ctr-remote's and nerdctl's spelling) says the same.
    digests = set()
    for name, flags in (("default", ()), ("oci", ("--oci",))):
        r = run_cli("convert", src, f"oci:{tmp_path / name}", *flags, "--json")
        assert r.code == 0 and r.err == "", r.err
        m = load(tmp_path / name, r.json()["digest"])
        assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        assert m["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
        assert m["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert TOC in m["layers"][0]["annotations"]
        digests.add(r.json()["digest"])
    assert len(digests) == 1


def test_docker_archive_round_trip_through_the_engine(tmp_path, test_images, dockerd):
    out = tmp_path / "esgz.tar"
    convert(f"docker-archive:{test_images.docker_archive}", f"docker-archive:{out}:busybox:esgz")
    dockerd.docker("load", "-i", out)
    p = dockerd.docker("run", "--rm", "--network", "none", "busybox:esgz", "sh", "-c",
                       "echo hello from esgz; ls /stargz.index.json")
    assert "hello from esgz" in p.stdout
    # docker-daemon: as source and destination.
    result = convert("docker-daemon:busybox:esgz", "docker-daemon:busybox:esgz2", "--reuse",
                     env={"DOCKER_HOST": dockerd.host})
    # No annotations to verify: converted again.
    assert [item["action"] for item in result["layers"]] == ["converted"]
    p = dockerd.docker("run", "--rm", "--network", "none", "busybox:esgz2", "echo", "again")
    assert p.stdout.strip() == "again"
    r = run_cli("convert", "docker-daemon:no-such-image:1", f"oci:{tmp_path / 'x'}",
                env={"DOCKER_HOST": dockerd.host})
    assert r.code == 1 and "no-such-image:1 is not in the Docker daemon" in r.err


def test_record_in_prioritizes_per_layer(tmp_path, test_images):
    src = test_images.busybox
    digest = root_of(src, "latest")["digest"]
    record = tmp_path / "record.jsonl"
    record.write_text("\n".join(json.dumps(r) for r in [
        {"path": "/bin/sh", "manifestDigest": digest, "layerIndex": 0},
        {"path": "/bin/busybox", "manifestDigest": digest, "layerIndex": 0},
        {"path": "/bin/sh", "manifestDigest": digest, "layerIndex": 0},
        {"path": "/ignored", "manifestDigest": "sha256:" + "0" * 64, "layerIndex": 0},
    ]) + "\n")
    result = convert(f"oci:{src}:latest", f"oci:{tmp_path / 'out'}", "--record-in", record)
    layer = result["layers"][0]["new_digest"]
    r = run_cli("layer", "toc", blob(tmp_path / "out", layer), check=True)
    names = [e["name"] for e in json.loads(r.out)["entries"] if e["type"] != "chunk"]
    landmark = names.index(".prefetch.landmark")
    assert {"bin/sh", "bin/busybox"} <= set(names[:landmark])


def make_layout_with_repeated_layer(src: Path, dst: Path) -> None:
    """busybox with its one layer listed twice (as images built FROM scratch
    twice over can have)."""
    shutil.copytree(src, dst)
    m_desc = root_of(dst, "latest")
    m = load(dst, m_desc["digest"])
    cfg = load(dst, m["config"]["digest"])
    m["layers"] = m["layers"] * 2
    cfg["rootfs"]["diff_ids"] = cfg["rootfs"]["diff_ids"] * 2
    def put(obj: dict) -> tuple[str, int]:
        data = json.dumps(obj).encode()
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        blob(dst, d).write_bytes(data)
        return d, len(data)
    m["config"]["digest"], m["config"]["size"] = put(cfg)
    d, n = put(m)
    index = json.loads((dst / "index.json").read_text())
    for e in index["manifests"]:
        if e["digest"] == m_desc["digest"]:
            e["digest"], e["size"] = d, n
    (dst / "index.json").write_text(json.dumps(index))


def test_identical_layers_convert_once(tmp_path, test_images):
    src = tmp_path / "twice"
    make_layout_with_repeated_layer(test_images.busybox, src)
    result = convert(f"oci:{src}:latest", f"oci:{tmp_path / 'out'}")
    assert [item["action"] for item in result["layers"]] == ["converted", "shared"]
    assert result["layers"][0]["new_digest"] == result["layers"][1]["new_digest"]


def test_reuse_keeps_verified_estargz_layers(tmp_path, test_images):
    first = convert(f"oci:{test_images.busybox}:latest", f"oci:{tmp_path / 'a'}:v1")
    again = convert(f"oci:{tmp_path / 'a'}:v1", f"oci:{tmp_path / 'b'}:v1", "--reuse")
    assert again["layers"][0]["action"] == "reused"
    assert again["digest"] == first["digest"]  # nothing changed at all
    # The --json record of a reused layer: the same flat keys, its verified
    # TOC digest, and no prefetch figures (nothing was converted to know them).
    converted, reused = first["layers"][0], again["layers"][0]
    assert list(reused) == list(converted) == [
        "manifest", "index", "old_digest", "old_size", "new_digest", "new_size",
        "toc_digest", "seconds", "action", "prefetch_size", "toc_size"]
    assert reused["toc_digest"] == converted["toc_digest"]
    assert reused["new_digest"] == reused["old_digest"] == converted["new_digest"]
    assert (reused["prefetch_size"], reused["toc_size"]) == (0, 0)
    assert converted["toc_size"] > 0
    # A wrong TOC digest annotation is not trusted: the layer is converted.
    layout = tmp_path / "a"
    m_desc = root_of(layout, "v1")
    m = load(layout, m_desc["digest"])
    m["layers"][0]["annotations"][TOC] = "sha256:" + "1" * 64
    data = json.dumps(m).encode()
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    blob(layout, d).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest=d, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    third = convert(f"oci:{layout}:v1", f"oci:{tmp_path / 'c'}", "--reuse")
    assert third["layers"][0]["action"] == "converted"


@pytest.mark.parametrize("args, message", [
    (["nosuch:x", "oci:{tmp}/o"], "unknown transport 'nosuch'"),
    (["oci:{busybox}:nope", "oci:{tmp}/o"], "tag 'nope' is not in OCI layout"),
    (["oci:{tmp}/missing", "oci:{tmp}/o"], "is not an OCI image layout"),
    (["docker-archive:{tmp}/none.tar", "oci:{tmp}/o"], "does not exist"),
    (["oci:{busybox}:latest", "docker://127.0.0.1:1/x@sha256:" + "a" * 64],
     "names a digest; push to a tag"),
])
def test_bad_references_are_one_clear_line(tmp_path, test_images, args, message):
    args = [a.format(tmp=tmp_path, busybox=test_images.busybox) for a in args]
    r = run_cli("convert", *args)
    assert r.code in (1, 3), r.err
    assert r.err.count("\n") == 1 and r.err.startswith("estargz: error: ")
    assert message in r.err
    assert not (tmp_path / "o").exists()


def test_unsupported_layer_media_type_leaves_nothing(tmp_path, test_images):
    src = tmp_path / "foreign"
    shutil.copytree(test_images.busybox, src)
    m_desc = root_of(src, "latest")
    m = load(src, m_desc["digest"])
    m["layers"][0]["mediaType"] = "application/vnd.example.weird"
    data = json.dumps(m).encode()
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    blob(src, d).write_bytes(data)
    index = json.loads((src / "index.json").read_text())
    for e in index["manifests"]:
        if e["digest"] == m_desc["digest"]:
            e.update(digest=d, size=len(data))
    (src / "index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    r = run_cli("convert", f"oci:{src}:latest", f"oci:{out}")
    assert r.code == 1
    assert "unsupported media type 'application/vnd.example.weird'" in r.err
    assert not out.exists()
    # An existing layout keeps what it had: no new blob, index.json untouched.
    existing = tmp_path / "existing"
    convert(f"oci:{test_images.busybox}:latest", f"oci:{existing}:keep")
    before = {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    r = run_cli("convert", f"oci:{src}:latest", f"oci:{existing}:new")
    assert r.code == 1
    assert {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()} == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: room for a manifest, not for a layer."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt], check=True)
    yield mnt
    subprocess.run(["umount", mnt], check=True)


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_full_disk_is_one_line_and_leaves_nothing(tiny_disk, test_images, kind):
    dst = {"oci": f"oci:{tiny_disk}/layout:x", "oci-archive": f"oci-archive:{tiny_disk}/a.tar",
           "docker-archive": f"docker-archive:{tiny_disk}/d.tar"}[kind]
    # Converted layers are staged in TMPDIR; put that on the full disk too.
    r = run_cli("convert", f"oci:{test_images.debian_multilayer}:latest", dst,
                env={"TMPDIR": str(tiny_disk)})
    assert r.code == 3, r.err
    assert r.err.count("\n") == 1 and "No space left on device" in r.err
    assert os.listdir(tiny_disk) == []


def test_layer_convert_full_disk(tiny_disk, test_images):
    src = test_images.busybox / "blobs" / "sha256"
    biggest = max(src.iterdir(), key=lambda p: p.stat().st_size)
    r = run_cli("layer", "convert", biggest, tiny_disk / "out.esgz")
    assert r.code == 3
    assert r.err.strip().endswith("No space left on device")
    assert os.listdir(tiny_disk) == []


def test_ctrl_c_leaves_no_output_and_no_temporaries(tmp_path, test_images):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "estargz", "convert",
                          f"oci:{test_images.debian_multilayer}:latest", f"oci:{out}:x"],
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "TMPDIR": str(tmp)},
                         cwd=Path(__file__).resolve().parent.parent)

    def writing() -> bool:
        # Converted layers are written in the new layout being assembled
        # beside ``out`` (renamed into place when done); anything else goes
        # to TMPDIR.
        return any(tmp_path.glob(".estargz-*.tmp/blobs/sha256/.estargz-*.esgz.tmp")) \
            or any(tmp.rglob("*.esgz"))

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not writing():
        time.sleep(0.05)
    assert writing(), "conversion never started writing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert err.strip() == "estargz: error: interrupted"
    assert not out.exists()
    assert not list(tmp_path.glob(".estargz-*"))
    assert list(tmp.iterdir()) == []
