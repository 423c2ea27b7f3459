"""The registry client against real daemons: Debian's docker-registry, plain,
over TLS with Basic auth, and in token mode; a fault proxy in front of it
for retries, drops, ignored ranges and tampering; skopeo as a second client."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import ssl
import subprocess
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Spec, build_tar, pattern
from estargz import (
    AuthenticationError,
    ConvertOptions,
    CountingSource,
    DigestMismatch,
    InvalidBlob,
    InvalidInput,
    LayerReader,
    NotFound,
    RegistryError,
    convert_layer,
)
from estargz.image import descriptor as media
from estargz.registry import RANGE_SKIP_LIMIT, RegistryClient, parse_challenge
from services import FaultProxy, free_port, make_tls

# --- helpers -------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_ambient_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine's own docker/podman logins out of these tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo() -> str:
    """A repository name no other test uses."""
    return f"test/{uuid.uuid4().hex[:12]}"


def client(host: str, **kwargs) -> RegistryClient:
    """A client for the plain-HTTP test registries: fast back-off."""
    kwargs.setdefault("tls_verify", False)
    kwargs.setdefault("retries", 3)
    kwargs.setdefault("backoff", 0.001)
    kwargs.setdefault("read_timeout", 10)
    return RegistryClient(host, **kwargs)


def blob_file(tmp_path: Path, data: bytes, name: str = "blob") -> tuple[str, int, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest(), len(data), str(path)


def push_blob(c: RegistryClient, repo: str, tmp_path: Path, data: bytes,
              name: str = "blob") -> tuple[str, int]:
    digest, size, path = blob_file(tmp_path, data, name)
    c.upload_blob(repo, digest, size, path)
    return digest, size


def push_image(c: RegistryClient, repo: str, tag: str, tmp_path: Path, *,
               docker: bool = False) -> tuple[bytes, str, str]:
    """Push a config, one gzip layer and a manifest; (manifest, its type, digest)."""
    layer = build_tar([Spec("hello.txt", data=b"hello from " + repo.encode())])
    layer_gz = gzip.compress(layer, mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
    cfg_digest, cfg_size = push_blob(c, repo, tmp_path, config, "config")
    lay_digest, lay_size = push_blob(c, repo, tmp_path, layer_gz, "layer")
    mtype = media.DOCKER_MANIFEST if docker else media.OCI_MANIFEST
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": {"mediaType": media.DOCKER_CONFIG if docker else media.OCI_CONFIG,
                   "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": media.DOCKER_LAYER_GZIP if docker else media.OCI_LAYER_GZIP,
                    "digest": lay_digest, "size": lay_size}],
    }, indent=2).encode()
    digest = c.put_manifest(repo, tag, manifest, mtype)
    return manifest, mtype, digest


def skopeo(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("skopeo")
    if exe is None:
        pytest.fail("skopeo is not installed (apt-get install skopeo)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    p = subprocess.run([exe, "--insecure-policy", *args], capture_output=True, text=True,
                       env=env, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- blobs ----------------------------------------------------------------------

def test_monolithic_upload_head_and_verified_download(tampering_proxy: FaultProxy,
                                                      tmp_path: Path, repo: str) -> None:
    c = client(tampering_proxy.host)
    data = os.urandom(300_000)
    digest, size, path = blob_file(tmp_path, data)
    assert c.head_blob(repo, digest) is None
    c.upload_blob(repo, digest, size, path)
    assert [e.method for e in tampering_proxy.requests(contains="/blobs/uploads/")] == \
        ["POST", "PUT"]
    assert c.head_blob(repo, digest) == size
    out = io.BytesIO()
    c.download_blob(repo, digest, size, out)
    assert out.getvalue() == data
    assert c.scheme == "http"  # https was tried first and fell back


def test_chunked_upload_sends_one_patch_per_chunk(tampering_proxy: FaultProxy,
                                                  tmp_path: Path, repo: str) -> None:
    c = client(tampering_proxy.host)
    data = os.urandom(4 * 65536 + 17)
    digest, size, path = blob_file(tmp_path, data)
    c.upload_blob(repo, digest, size, path, chunk_size=65536)
    session = tampering_proxy.requests(contains="/blobs/uploads/")
    assert [e.method for e in session] == ["POST"] + ["PATCH"] * 5 + ["PUT"]
    out = io.BytesIO()
    c.download_blob(repo, digest, size, out)
    assert out.getvalue() == data


def test_empty_blob_uploads_both_ways(registry, tmp_path: Path, repo: str) -> None:
    c = client(registry.host)
    digest, size, path = blob_file(tmp_path, b"")
    c.upload_blob(repo, digest, size, path, chunk_size=1024)
    c.upload_blob(repo + "-b", digest, size, path)
    assert c.head_blob(repo, digest) == 0 and c.head_blob(repo + "-b", digest) == 0


def test_upload_of_a_present_blob_sends_nothing(tampering_proxy: FaultProxy, tmp_path: Path,
                                                repo: str) -> None:
    c = client(tampering_proxy.host)
    digest, size, path = blob_file(tmp_path, b"already there")
    c.upload_blob(repo, digest, size, path)
    tampering_proxy.clear()
    c.upload_blob(repo, digest, size, path)
    assert [e.method for e in tampering_proxy.requests()] == ["HEAD"]


def test_mount_across_repositories(tampering_proxy: FaultProxy, tmp_path: Path,
                                   repo: str) -> None:
    c = client(tampering_proxy.host)
    digest, size, path = blob_file(tmp_path, os.urandom(50_000))
    c.upload_blob(repo, digest, size, path)
    tampering_proxy.clear()
    c.upload_blob(repo + "-copy", digest, size, path, mount_from=repo)
    posts = tampering_proxy.requests("POST")
    assert len(posts) == 1 and "mount=" in posts[0].path and posts[0].status == 201
    assert not tampering_proxy.requests("PUT")  # no bytes moved
    assert c.head_blob(repo + "-copy", digest) == size


def test_mount_declined_falls_back_to_the_session_it_opened(
        tampering_proxy: FaultProxy, tmp_path: Path, repo: str) -> None:
    c = client(tampering_proxy.host)
    digest, size, path = blob_file(tmp_path, os.urandom(10_000))
    c.upload_blob(repo, digest, size, path, mount_from=repo + "-has-nothing")
    posts = tampering_proxy.requests("POST")
    assert len(posts) == 1 and posts[0].status == 202  # the mount's session was used
    assert [e.status for e in tampering_proxy.requests("PUT")] == [201]
    assert c.head_blob(repo, digest) == size


def test_upload_checks_the_file_size_before_sending(registry, tmp_path: Path,
                                                    repo: str) -> None:
    c = client(registry.host)
    digest, size, path = blob_file(tmp_path, b"12345")
    with pytest.raises(InvalidInput, match="holds 5 bytes"):
        c.upload_blob(repo, digest, size + 1, path)


def test_upload_with_a_wrong_digest_is_refused_by_the_registry(registry, tmp_path: Path,
                                                               repo: str) -> None:
    c = client(registry.host)
    _, size, path = blob_file(tmp_path, b"content")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(RegistryError) as e:
        c.upload_blob(repo, wrong, size, path)
    assert "400" in one_line(e.value) and "DIGEST_INVALID" in str(e.value)


def test_tampered_blob_is_a_digest_mismatch(tampering_proxy: FaultProxy, tmp_path: Path,
                                            repo: str) -> None:
    c = client(tampering_proxy.host)
    data = os.urandom(70_000)
    digest, size = push_blob(c, repo, tmp_path, data)
    tampering_proxy.corrupt.add(digest)
    with pytest.raises(DigestMismatch) as e:
        c.download_blob(repo, digest, size, io.BytesIO())
    msg = one_line(e.value)
    assert digest in msg and tampering_proxy.host in msg and repo in msg


def test_download_checks_the_size(registry, tmp_path: Path, repo: str) -> None:
    c = client(registry.host)
    digest, size = push_blob(c, repo, tmp_path, b"x" * 1000)
    with pytest.raises(DigestMismatch, match="more than the expected 999 bytes"):
        c.download_blob(repo, digest, size - 1, io.BytesIO())
    with pytest.raises(DigestMismatch, match="has 1000 bytes, not 1001"):
        c.download_blob(repo, digest, size + 1, io.BytesIO())


def test_download_resumes_after_a_dropped_connection(tampering_proxy: FaultProxy,
                                                     tmp_path: Path, repo: str) -> None:
    c = client(tampering_proxy.host)
    data = os.urandom(400_000)
    digest, size = push_blob(c, repo, tmp_path, data)
    tampering_proxy.add_fault("GET", f"/blobs/{digest}", drop_after=100_000)
    tampering_proxy.clear()
    out = io.BytesIO()
    c.download_blob(repo, digest, size, out)
    assert out.getvalue() == data
    first, second = tampering_proxy.requests("GET", digest)
    assert (first.range, first.sent) == (None, 100_000)
    # Resumed from what had arrived, less at most one partly read piece.
    assert second.range is not None
    resumed_at = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 100_000 and second.sent == size - resumed_at


def test_missing_things_are_not_found(registry, tmp_path: Path, repo: str) -> None:
    c = client(registry.host)
    absent = "sha256:" + hashlib.sha256(b"absent").hexdigest()
    assert c.head_blob(repo, absent) is None
    with pytest.raises(NotFound) as e:
        c.download_blob(repo, absent, 6, io.BytesIO())
    assert absent in one_line(e.value) and repo in str(e.value) and registry.host in str(e.value)
    with pytest.raises(NotFound) as e:
        c.read_blob_range(repo, absent, 0, 1)
    assert absent in str(e.value)
    with pytest.raises(NotFound) as e:
        c.get_manifest(repo, "nope", [media.OCI_MANIFEST])
    assert f"manifest {repo}:nope not found in registry {registry.host}" == one_line(e.value)
    with pytest.raises(NotFound, match=f"manifest {repo}@{absent}"):
        c.get_manifest(repo, absent, [media.OCI_MANIFEST])


# --- ranges -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def esgz_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An eStargz blob with one small file among ~2 MiB of others."""
    work = tmp_path_factory.mktemp("esgz")
    files = {"etc/hostname": b"remote-host\n"}
    specs = [Spec("etc/", tarfile.DIRTYPE, mode=0o755),
             Spec("etc/hostname", data=files["etc/hostname"])]
    for i in range(4):
        name = f"usr/lib/big{i}.bin"
        files[name] = pattern(500_000, seed=i) + os.urandom(20_000)
        specs.append(Spec(name, data=files[name]))
    tar = work / "layer.tar"
    tar.write_bytes(build_tar(specs))
    out = work / "layer.esgz"
    convert_layer(str(tar), str(out), ConvertOptions(chunk_size=100_000))
    return out, files


def test_layer_reader_reads_a_remote_toc_and_one_file_by_ranges(
        tampering_proxy: FaultProxy, esgz_layer: tuple[Path, dict], repo: str) -> None:
    path, files = esgz_layer
    c = client(tampering_proxy.host)
    data = path.read_bytes()
    digest, size = "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
    c.upload_blob(repo, digest, size, str(path))
    tampering_proxy.clear()

    source = CountingSource(c.blob_source(repo, digest, size))
    reader = LayerReader(source)
    assert {"etc/hostname", "usr/lib/big0.bin"} <= {e.name for e in reader.entries}
    assert b"".join(reader.iter_file("etc/hostname")) == files["etc/hostname"]

    gets = tampering_proxy.requests("GET", digest)
    assert gets and all(g.status == 206 and g.range for g in gets)
    over_the_wire = sum(g.sent for g in gets)
    assert over_the_wire == source.bytes_read
    assert over_the_wire < size / 10, (over_the_wire, size)


def test_read_blob_range_returns_exactly_the_range(registry, tmp_path: Path,
                                                   repo: str) -> None:
    c = client(registry.host)
    data = os.urandom(10_000)
    digest, size = push_blob(c, repo, tmp_path, data)
    assert c.read_blob_range(repo, digest, 1234, 100) == data[1234:1334]
    assert c.read_blob_range(repo, digest, size - 1, 1) == data[-1:]
    assert c.read_blob_range(repo, digest, 5, 0) == b""
    src = c.blob_source(repo, digest, size)
    assert src.size == size and src.read_at(0, size) == data
    with pytest.raises(InvalidBlob, match="outside"):
        src.read_at(size - 1, 2)


def test_registry_ignoring_ranges(tampering_proxy: FaultProxy, tmp_path: Path,
                                  repo: str) -> None:
    c = client(tampering_proxy.host)
    data = os.urandom(RANGE_SKIP_LIMIT + 500_000)
    digest, size = push_blob(c, repo, tmp_path, data)
    tampering_proxy.ignore_range = True
    # Near the start a whole-blob answer is tolerated: the prefix is skipped.
    assert c.read_blob_range(repo, digest, 1000, 50) == data[1000:1050]
    # Further in, that would silently be a full download: an error instead.
    with pytest.raises(RegistryError, match="ignores HTTP range requests") as e:
        c.read_blob_range(repo, digest, size - 51, 51)
    assert tampering_proxy.host in one_line(e.value)


# --- manifests ----------------------------------------------------------------------

def test_oci_manifest_round_trip_and_skopeo_agrees(registry, tmp_path: Path,
                                                   repo: str) -> None:
    c = client(registry.host)
    manifest, mtype, digest = push_image(c, repo, "v1", tmp_path)
    assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
    raw, got_type, got_digest = c.get_manifest(repo, "v1", [media.OCI_MANIFEST])
    assert (raw, got_type, got_digest) == (manifest, media.OCI_MANIFEST, digest)
    assert c.get_manifest(repo, digest, [media.OCI_MANIFEST]) == (manifest, mtype, digest)

    ref = f"docker://{registry.host}/{repo}:v1"
    assert skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout.encode() == manifest
    assert json.loads(skopeo("inspect", "--tls-verify=false", ref).stdout)["Digest"] == digest
    # skopeo copy fetches and verifies every blob we pushed.
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'layout'}:v1")


def test_docker_schema2_manifest_and_index(registry, tmp_path: Path, repo: str) -> None:
    c = client(registry.host)
    manifest, mtype, digest = push_image(c, repo, "docker", tmp_path, docker=True)
    raw, got_type, _ = c.get_manifest(repo, "docker", [media.DOCKER_MANIFEST, media.OCI_MANIFEST])
    assert (raw, got_type) == (manifest, media.DOCKER_MANIFEST)

    oci, _, oci_digest = push_image(c, repo, "oci", tmp_path)
    index = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": [
        {"mediaType": media.OCI_MANIFEST, "digest": oci_digest, "size": len(oci),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    index_digest = c.put_manifest(repo, "multi", index, media.OCI_INDEX)
    raw, got_type, got_digest = c.get_manifest(
        repo, "multi", [media.OCI_INDEX, media.DOCKER_MANIFEST_LIST, media.OCI_MANIFEST])
    assert (raw, got_type, got_digest) == (index, media.OCI_INDEX, index_digest)


def test_we_read_what_skopeo_pushed(registry, tmp_path: Path, repo: str) -> None:
    # An OCI layout by hand, pushed by skopeo, read back by us.
    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    layer = build_tar([Spec("from-skopeo", data=b"pushed by skopeo\n")])
    lay = put(gzip.compress(layer, mtime=0))
    cfg = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode())
    man = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
                      "config": {"mediaType": media.OCI_CONFIG, **cfg},
                      "layers": [{"mediaType": media.OCI_LAYER_GZIP, **lay}]}).encode()
    man_desc = put(man)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": media.OCI_MANIFEST, **man_desc,
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
           f"docker://{registry.host}/{repo}:v1")

    c = client(registry.host)
    raw, mtype, digest = c.get_manifest(repo, "v1", [media.OCI_MANIFEST])
    assert (raw, mtype, digest) == (man, media.OCI_MANIFEST, man_desc["digest"])
    for desc in (cfg, lay):
        out = io.BytesIO()
        c.download_blob(repo, desc["digest"], desc["size"], out)
        assert out.getvalue() == (blobs / desc["digest"].split(":")[1]).read_bytes()


def test_manifest_naming_missing_blobs_is_refused(registry, repo: str) -> None:
    c = client(registry.host)
    missing = "sha256:" + "ab" * 32
    manifest = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
                           "config": {"mediaType": media.OCI_CONFIG, "digest": missing,
                                      "size": 2}, "layers": []}).encode()
    with pytest.raises(RegistryError) as e:
        c.put_manifest(repo, "broken", manifest, media.OCI_MANIFEST)
    msg = one_line(e.value)
    assert "400" in msg and "MANIFEST_BLOB_UNKNOWN" in msg and registry.host in msg


def test_manifest_put_outlasts_a_blob_link_being_rewritten(registry, tmp_path: Path,
                                                            repo: str) -> None:
    # The state distribution's filesystem storage is in while another client
    # mounts the same blob: the repository's link file truncated, not yet
    # rewritten. A manifest PUT then reads DIGEST_INVALID and
    # MANIFEST_BLOB_UNKNOWN; it is tried again, and the link comes back.
    c = client(registry.host, backoff=0.2)
    manifest, mtype, digest = push_image(c, repo, "v1", tmp_path)
    cfg = json.loads(manifest)["config"]["digest"].split(":")[1]
    link = (registry.root / "docker/registry/v2/repositories" / repo / "_layers/sha256"
            / cfg / "link")
    text = link.read_bytes()
    link.write_bytes(b"")
    with pytest.raises(RegistryError) as refused:
        client(registry.host, retries=0).put_manifest(repo, "v2", manifest, mtype)
    assert "DIGEST_INVALID" in str(refused.value) and "(and 1 more)" in str(refused.value)
    restore = threading.Timer(0.3, link.write_bytes, (text,))
    restore.start()
    try:
        t0 = time.monotonic()
        assert c.put_manifest(repo, "v2", manifest, mtype) == digest
        assert time.monotonic() - t0 >= 0.3  # it was refused first, then retried
    finally:
        restore.join()
    assert c.get_manifest(repo, "v2", [mtype])[2] == digest


def test_manifest_fetched_by_digest_is_verified(tampering_proxy: FaultProxy, tmp_path: Path,
                                                repo: str) -> None:
    c = client(tampering_proxy.host)
    _, _, digest = push_image(c, repo, "v1", tmp_path)
    tampering_proxy.corrupt.add(digest)
    with pytest.raises(DigestMismatch, match=f"manifest {repo}@{digest}"):
        c.get_manifest(repo, digest, [media.OCI_MANIFEST])


# --- retries --------------------------------------------------------------------------

def test_503_twice_then_success(tampering_proxy: FaultProxy, tmp_path: Path,
                                repo: str) -> None:
    c = client(tampering_proxy.host)
    manifest, _, _ = push_image(c, repo, "v1", tmp_path)
    tampering_proxy.add_fault("GET", "/manifests/v1", status=503, times=2)
    tampering_proxy.clear()
    assert c.get_manifest(repo, "v1", [media.OCI_MANIFEST])[0] == manifest
    assert [e.status for e in tampering_proxy.requests("GET", "/manifests/")] == [503, 503, 200]


def test_retry_after_is_honoured(tampering_proxy: FaultProxy, tmp_path: Path,
                                 repo: str) -> None:
    c = client(tampering_proxy.host)
    digest, size = push_blob(c, repo, tmp_path, b"rate limited")
    slept: list[float] = []
    c._sleep = slept.append
    tampering_proxy.add_fault("HEAD", "/blobs/", status=429, headers={"Retry-After": "3"})
    assert c.head_blob(repo, digest) == size
    assert slept == [3.0]
    # A long Retry-After is not waited for; the bounded back-off is used.
    tampering_proxy.add_fault("HEAD", "/blobs/", status=429, headers={"Retry-After": "3600"})
    assert c.head_blob(repo, digest) == size
    assert len(slept) == 2 and slept[1] < 1


def test_gives_up_after_the_retries(tampering_proxy: FaultProxy, repo: str) -> None:
    c = client(tampering_proxy.host, retries=2)
    body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "down"}]}).encode()
    tampering_proxy.add_fault("GET", "/manifests/", status=503, body=body, times=100)
    started = time.monotonic()
    with pytest.raises(RegistryError) as e:
        c.get_manifest(repo, "v1", [media.OCI_MANIFEST])
    msg = one_line(e.value)
    assert "503" in msg and "UNAVAILABLE: down" in msg and "gave up after 3 attempts" in msg
    assert len(tampering_proxy.requests("GET", "/manifests/")) == 3
    assert time.monotonic() - started < 2


def test_other_4xx_are_not_retried(tampering_proxy: FaultProxy, repo: str) -> None:
    c = client(tampering_proxy.host)
    body = json.dumps({"errors": [{"code": "NAME_INVALID", "message": "bad name"}]}).encode()
    tampering_proxy.add_fault("GET", "/manifests/", status=400, body=body, times=100)
    with pytest.raises(RegistryError) as e:
        c.get_manifest(repo, "v1", [media.OCI_MANIFEST])
    assert "400" in one_line(e.value) and "NAME_INVALID: bad name" in str(e.value)
    assert len(tampering_proxy.requests("GET", "/manifests/")) == 1


def test_timeout_is_retried(tampering_proxy: FaultProxy, tmp_path: Path, repo: str) -> None:
    c = client(tampering_proxy.host)
    digest, size = push_blob(c, repo, tmp_path, b"slow")
    slow = client(tampering_proxy.host, read_timeout=0.3)
    slow.head_blob(repo, digest)  # pick the scheme before the stall
    tampering_proxy.add_fault("HEAD", "/blobs/", stall=1.0)
    assert slow.head_blob(repo, digest) == size


def test_upload_restarts_after_a_failed_put(tampering_proxy: FaultProxy, tmp_path: Path,
                                            repo: str) -> None:
    c = client(tampering_proxy.host)
    data = os.urandom(30_000)
    digest, size, path = blob_file(tmp_path, data)
    tampering_proxy.add_fault("PUT", "/blobs/uploads/", status=500)
    c.upload_blob(repo, digest, size, path, chunk_size=10_000)
    assert len(tampering_proxy.requests("POST")) == 2  # a fresh session after the 500
    out = io.BytesIO()
    c.download_blob(repo, digest, size, out)
    assert out.getvalue() == data


def test_unreachable_registry_fails_fast() -> None:
    host = f"127.0.0.1:{free_port()}"
    for verify in (True, False):
        started = time.monotonic()
        with pytest.raises(RegistryError) as e:
            RegistryClient(host, tls_verify=verify).head_blob("a/b", "sha256:" + "0" * 64)
        assert one_line(e.value).startswith(f"cannot reach registry {host}: ")
        assert "refused" in str(e.value).lower()
        assert time.monotonic() - started < 2


def test_plain_http_registry_needs_tls_verify_off(registry) -> None:
    with pytest.raises(RegistryError, match="plain HTTP") as e:
        RegistryClient(registry.host).head_blob("a/b", "sha256:" + "0" * 64)
    assert registry.host in one_line(e.value)


# --- TLS and Basic auth ----------------------------------------------------------------

def test_tls_without_the_ca_is_refused(tls_registry) -> None:
    c = RegistryClient(tls_registry.host, credentials=(tls_registry.user, tls_registry.password))
    with pytest.raises(RegistryError) as e:
        c.head_blob("a/b", "sha256:" + "0" * 64)
    msg = one_line(e.value)
    assert f"cannot verify the TLS certificate of registry {tls_registry.host}" in msg
    assert "cert-dir" in msg


def test_tls_with_cert_dir_and_basic_credentials(tls_registry, tmp_path: Path,
                                                 repo: str) -> None:
    c = RegistryClient(tls_registry.host, cert_dir=str(tls_registry.ca_dir),
                       credentials=(tls_registry.user, tls_registry.password))
    manifest, _, digest = push_image(c, repo, "v1", tmp_path)
    assert c.get_manifest(repo, "v1", [media.OCI_MANIFEST])[::2] == (manifest, digest)
    assert c.scheme == "https"
    # skopeo agrees, through the same certificate directory.
    out = skopeo("inspect", "--cert-dir", str(tls_registry.ca_dir),
                 "--creds", f"{tls_registry.user}:{tls_registry.password}",
                 f"docker://{tls_registry.host}/{repo}:v1").stdout
    assert json.loads(out)["Digest"] == digest


def test_tls_verify_off_still_uses_https(tls_registry, tmp_path: Path, repo: str) -> None:
    c = RegistryClient(tls_registry.host, tls_verify=False,
                       credentials=(tls_registry.user, tls_registry.password))
    push_blob(c, repo, tmp_path, b"unverified but encrypted")
    assert c.scheme == "https"


def test_client_certificate_from_the_cert_dir(mtls_registry, tmp_path: Path,
                                              repo: str) -> None:
    # Without the client key the registry ends the handshake.
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    shutil.copy(mtls_registry.ca_dir / "ca.crt", only_ca / "ca.crt")
    with pytest.raises(RegistryError, match=f"registry {mtls_registry.host}"):
        RegistryClient(mtls_registry.host, cert_dir=str(only_ca), retries=0).head_blob(
            repo, "sha256:" + "0" * 64)
    c = RegistryClient(mtls_registry.host, cert_dir=str(mtls_registry.ca_dir))
    digest, size = push_blob(c, repo, tmp_path, b"mutual TLS")
    assert c.head_blob(repo, digest) == size


def test_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    # A TLS server whose certificate, from a trusted CA, names another host.
    tls = make_tls(tmp_path / "tls", hosts=("other.example",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(RegistryError) as e:
            RegistryClient(host, cert_dir=str(tls.ca_dir), retries=0, read_timeout=5).head_blob(
                "a/b", "sha256:" + "0" * 64)
        assert f"cannot verify the TLS certificate of registry {host}" in one_line(e.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_cert_dir_with_a_key_but_no_certificate(tmp_path: Path) -> None:
    (tmp_path / "client.key").write_text("")
    with pytest.raises(InvalidInput, match="client.key has no matching certificate"):
        RegistryClient("example.com", cert_dir=str(tmp_path))


def test_basic_auth_without_credentials_says_how_to_give_them(tls_registry, repo: str) -> None:
    c = RegistryClient(tls_registry.host, cert_dir=str(tls_registry.ca_dir))
    with pytest.raises(AuthenticationError) as e:
        c.get_manifest(repo, "v1", [media.OCI_MANIFEST])
    msg = one_line(e.value)
    assert f"registry {tls_registry.host} requires credentials for repository {repo}" in msg
    for hint in ("--src-creds", "--dest-creds", f"docker login {tls_registry.host}",
                 "REGISTRY_AUTH_FILE"):
        assert hint in msg


def test_basic_auth_with_wrong_password(tls_registry, repo: str) -> None:
    c = RegistryClient(tls_registry.host, cert_dir=str(tls_registry.ca_dir),
                       credentials=(tls_registry.user, "not-the-password"))
    with pytest.raises(AuthenticationError) as e:
        c.head_blob(repo, "sha256:" + "0" * 64)
    msg = one_line(e.value)
    assert "refused the credentials" in msg and tls_registry.host in msg
    assert "not-the-password" not in msg


def test_basic_credentials_from_an_auth_file(tls_registry, tmp_path: Path, repo: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    auth = base64.b64encode(f"{tls_registry.user}:{tls_registry.password}".encode()).decode()
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {tls_registry.host: {"auth": auth}}}))
    c = RegistryClient(tls_registry.host, cert_dir=str(tls_registry.ca_dir),
                       auth_file=str(auth_file))
    push_blob(c, repo, tmp_path, b"from auth.json")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    c = RegistryClient(tls_registry.host, cert_dir=str(tls_registry.ca_dir))
    assert c.head_blob(repo, "sha256:" + hashlib.sha256(b"from auth.json").hexdigest()) == 14


# --- Bearer tokens -------------------------------------------------------------------------

def test_bearer_push_and_pull_with_cached_tokens(token_registry, tmp_path: Path,
                                                 repo: str) -> None:
    server = token_registry.token_server
    start = len(server.requests)
    c = client(token_registry.host, credentials=(token_registry.user, token_registry.password))
    manifest, _, digest = push_image(c, repo, "v1", tmp_path)
    assert c.get_manifest(repo, digest, [media.OCI_MANIFEST])[0] == manifest
    assert c.head_blob(repo, digest) is None  # a manifest is not a blob
    asked = server.requests[start:]
    assert all(r["authenticated"] and r["account"] == token_registry.user for r in asked)
    scopes = [tuple(r["scopes"]) for r in asked]
    # One token for pushing (pull,push), one for pulling: cached for the rest.
    assert sorted(scopes) == sorted([(f"repository:{repo}:pull,push",),
                                     (f"repository:{repo}:pull",)])


def test_one_client_shared_by_threads(token_registry, tmp_path: Path, repo: str) -> None:
    server = token_registry.token_server
    pusher = client(token_registry.host,
                    credentials=(token_registry.user, token_registry.password))
    data = os.urandom(200_000)
    digest, size = push_blob(pusher, repo, tmp_path, data)
    start = len(server.requests)
    shared = client(token_registry.host,
                    credentials=(token_registry.user, token_registry.password))
    source = shared.blob_source(repo, digest, size)
    spans = [(i * 9_000, 7_000) for i in range(20)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda span: source.read_at(*span), spans))
    assert got == [data[o:o + n] for o, n in spans]
    assert len(server.requests) - start == 1  # one token, shared by every thread


def test_bearer_access_token_field(token_registry, tmp_path: Path, repo: str) -> None:
    server = token_registry.token_server
    server.reply_field = "access_token"
    try:
        c = client(token_registry.host,
                   credentials=(token_registry.user, token_registry.password))
        push_blob(c, repo, tmp_path, b"via access_token")
    finally:
        server.reply_field = "token"


def test_bearer_anonymous_is_denied_with_a_hint(token_registry, repo: str) -> None:
    c = client(token_registry.host)
    with pytest.raises(AuthenticationError) as e:
        c.get_manifest(repo, "v1", [media.OCI_MANIFEST])
    msg = one_line(e.value)
    assert f"registry {token_registry.host} requires credentials for repository {repo}" in msg
    assert "--src-creds" in msg


def test_bearer_anonymous_pull_when_the_token_server_allows_it(token_registry, tmp_path: Path,
                                                               repo: str) -> None:
    pusher = client(token_registry.host,
                    credentials=(token_registry.user, token_registry.password))
    digest, size = push_blob(pusher, repo, tmp_path, b"public")
    server = token_registry.token_server
    server.anonymous_actions = {"pull"}
    try:
        anon = client(token_registry.host)
        assert anon.head_blob(repo, digest) == size
        with pytest.raises(AuthenticationError):
            push_blob(anon, repo, tmp_path, b"not allowed", "other")
    finally:
        server.anonymous_actions = set()


def test_bearer_wrong_password(token_registry, repo: str) -> None:
    c = client(token_registry.host, credentials=(token_registry.user, "wrong-pw"))
    with pytest.raises(AuthenticationError) as e:
        c.head_blob(repo, "sha256:" + "0" * 64)
    msg = one_line(e.value)
    assert "token server" in msg and "refused the credentials" in msg
    assert token_registry.host in msg and "wrong-pw" not in msg


def test_bearer_mount_asks_for_both_repositories(token_registry, tmp_path: Path,
                                                 repo: str) -> None:
    server = token_registry.token_server
    c = client(token_registry.host, credentials=(token_registry.user, token_registry.password))
    digest, size, path = blob_file(tmp_path, os.urandom(5000))
    c.upload_blob(repo, digest, size, path)
    start = len(server.requests)
    c.upload_blob(repo + "-2", digest, size, path, mount_from=repo)
    assert c.head_blob(repo + "-2", digest) == size
    assert sorted(server.requests[start]["scopes"]) == sorted(
        [f"repository:{repo}-2:pull,push", f"repository:{repo}:pull"])


# --- units ------------------------------------------------------------------------------------

def test_parse_challenge() -> None:
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="reg.example",'
                         'scope="repository:a/b:pull repository:c:pull,push"')
    assert ch is not None
    assert ch.scheme == "bearer" and ch.realm == "https://auth.example/token"
    assert ch.service == "reg.example"
    assert ch.scopes == ["repository:a/b:pull", "repository:c:pull,push"]
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None
    assert basic.scheme == "basic" and basic.realm == "Registry Realm"
    assert parse_challenge("") is None and parse_challenge(None) is None
    quoted = parse_challenge('Bearer realm=unquoted,error="x\\"y"')
    assert quoted is not None and quoted.params == {
        "realm": "unquoted", "error": 'x"y'}


def test_bad_arguments_are_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        RegistryClient("https://example.com")
    with pytest.raises(InvalidInput, match="does not exist"):
        RegistryClient("example.com", cert_dir=str(tmp_path / "nope"))
    c = RegistryClient("example.com")
    with pytest.raises(InvalidInput):
        c.head_blob("Bad/Name", "sha256:" + "0" * 64)
    with pytest.raises(InvalidInput):
        c.head_blob("a/b", "md5:abc")
