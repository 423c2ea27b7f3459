"""Hostile JSON from every transport is refused in one line, never a traceback.

Every JSON document read from outside goes through one loader
(``estargz.layer.jsondoc``): an OCI layout's ``index.json``, a
docker-archive's ``manifest.json``, manifests, indexes and configs from any
source, a registry's manifests, error bodies and token responses, auth
files, record files, option values, and (in ``test_hostile.py``) the TOC.
Nested deeper than any real document (64 levels), over the size limit, not
UTF-8, or with NaN, each is refused by the command with exit 1 (4 for a
registry, 2 for an option), one ``estargz: error:`` line naming the
document, and the destination not created.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write
from estargz import InvalidInput, load_json
from estargz.cli import main
from estargz.layer.jsondoc import MAX_DEPTH, MAX_JSON_SIZE
from estargz.registry.credentials import find_credentials
from estargz.registry.errors import error_detail
from test_hostile_tar import layout, one_file_tar
from test_registry_safety import FakeServer

DEEP = b"[" * 100_000 + b"]" * 100_000
TOO_DEEP = b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
JUST_DEEP_ENOUGH = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH

_runner = CliRunner()


def invoke(*args: object):
    result = _runner.invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_one_line(result, code: int, *fragments: str) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("estargz: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# --- the loader ---------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (DEEP, "nested deeper than 64 levels"),
    (TOO_DEEP, "nested deeper than 64 levels"),
    (b"{" * 100_000, "nested deeper than 64 levels"),
    (b"[" * 100_000, "nested deeper than 64 levels"),
    (b"\xff[]", "not UTF-8 at byte 0"),
    ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
    (b"[NaN]", "NaN is not JSON"),
    (b"[1e400]", "number 1e400 is out of range"),
    (b"[" + b"1" * 5000 + b"]", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b" " * (MAX_JSON_SIZE + 1), f"exceeds the {MAX_JSON_SIZE}-byte limit"),
])
def test_the_loader_refuses_with_one_line(data, message):
    with pytest.raises(InvalidInput, match="^doc ") as e:
        load_json(data, "doc")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data", [
    JUST_DEEP_ENOUGH,
    b'["' + b"[" * 100_000 + b'"]',  # brackets in a string do not nest
    b'["\\"' + b"[" * 100 + b'", ' + b"[" * 60 + b"]" * 60 + b"]",  # nor after an escape
    b'["\\\\", ' + b"[" * 63 + b"]" * 63 + b"]",  # an escaped backslash ends no string
])
def test_the_loader_takes_what_is_deep_enough(data):
    assert load_json(data, "doc") == json.loads(data)


# --- an OCI layout ------------------------------------------------------------

def small_layout(root: Path) -> None:
    layout(root, gzip.compress(one_file_tar(), mtime=0))


@pytest.mark.parametrize("index, message", [
    (DEEP, "index.json is nested deeper than 64 levels"),
    (b'{"schemaVersion": 2, "manifests": [], "x": ' + DEEP + b"}", "nested deeper"),
    (b'{"manifests": NaN}', "index.json is not valid JSON: NaN is not JSON"),
    (b"\xfe\xff", "index.json is not valid JSON: not UTF-8"),
    (b'{"manifests": {}}', "index.json is not an OCI index"),
    (b"[]", "index.json is not an OCI index"),
    (b'{"manifests": [7]}', "descriptor is not a JSON object"),
    (b'{"manifests": [{"digest": 5, "size": 1}]}', "digest"),
])
def test_hostile_oci_index_json(tmp_path, index, message):
    src = tmp_path / "src"
    small_layout(src)
    (src / "index.json").write_bytes(index)
    dst = tmp_path / "dst"
    assert_one_line(invoke("convert", f"oci:{src}", f"oci:{dst}:x"), 1, message)
    assert not dst.exists()


def _rewrite_blob(root: Path, media_type_key: str, new: bytes) -> None:
    """Replace the manifest (``"manifest"``) or config (``"config"``) of the
    one image in layout ``root`` by ``new``, digests updated up the chain."""
    index = json.loads((root / "index.json").read_text())
    entry = index["manifests"][0]
    manifest_path = root / "blobs" / "sha256" / entry["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_bytes())
    if media_type_key == "config":
        manifest["config"]["digest"] = _put(root, new)
        manifest["config"]["size"] = len(new)
        new = json.dumps(manifest).encode()
    entry["digest"] = _put(root, new)
    entry["size"] = len(new)
    (root / "index.json").write_text(json.dumps(index))


def _put(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest


@pytest.mark.parametrize("which", ["manifest", "config"])
@pytest.mark.parametrize("doc, message", [
    (DEEP, "is nested deeper than 64 levels"),
    (b'{"schemaVersion": 2, "x": [1e400]}', "number 1e400 is out of range"),
    (b"[1]", "is not a JSON object"),
])
def test_hostile_manifest_or_config_in_a_layout(tmp_path, which, doc, message):
    src = tmp_path / "src"
    small_layout(src)
    _rewrite_blob(src, which, doc)
    dst = tmp_path / "dst"
    line = assert_one_line(invoke("convert", f"oci:{src}:latest", f"oci:{dst}:x"), 1, message)
    assert which in line
    assert not dst.exists()


def test_unpaired_surrogate_in_a_config_is_one_line(tmp_path):
    """JSON may escape half a surrogate pair; the rewritten config cannot be
    UTF-8, so the conversion refuses it in one line (the fuzzer found a
    traceback here)."""
    src = tmp_path / "src"
    small_layout(src)
    index = json.loads((src / "index.json").read_text())
    blobs = src / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    config.setdefault("config", {})["Env"] = ["A=\udc00"]
    # ensure_ascii (the default) writes the lone surrogate as the escape \udc00.
    _rewrite_blob(src, "config", json.dumps(config).encode())
    dst = tmp_path / "dst"
    assert_one_line(invoke("convert", "--quiet", f"oci:{src}:latest", f"oci:{dst}:x"), 1,
                    "not valid Unicode (an unpaired surrogate escape)")
    assert not dst.exists()


# --- a docker-archive ---------------------------------------------------------

def docker_archive(path: Path, manifest: bytes) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in (("manifest.json", manifest), ("c.json", b"{}")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("manifest, message", [
    (DEEP, "manifest.json is nested deeper than 64 levels"),
    (b"{}", "manifest.json lists no image"),
    (b"[]", "manifest.json lists no image"),
    (b"[7]", "manifest.json lists something other than an image"),
    (b'[{"Layers": []}]', "lists something other than an image"),
    (b'[{"Config": 5}]', "lists something other than an image"),
    (b'[{"Config": "c.json", "RepoTags": "x"}]', "lists something other than an image"),
    (b'[{"Config": "c.json", "Layers": [{"a": 1}]}]', "lists something other than an image"),
    (b'[{"Config": "c.json", "Layers": ["../../etc/passwd"]}]', "is missing from the archive"),
    (b'[{"Config": "c.json"}] trailing', "manifest.json is not valid JSON"),
])
def test_hostile_docker_archive_manifest_json(tmp_path, manifest, message):
    archive = tmp_path / "image.tar"
    docker_archive(archive, manifest)
    dst = tmp_path / "dst"
    assert_one_line(invoke("convert", f"docker-archive:{archive}", f"oci:{dst}:x"), 1, message)
    assert not dst.exists()


# --- a registry -----------------------------------------------------------------

def test_hostile_manifest_from_a_registry(tmp_path):
    def answer(method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
        if path == "/v2/":
            return 200, {}, b"{}"
        return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, DEEP

    server = FakeServer(answer)
    try:
        dst = tmp_path / "dst"
        r = invoke("convert", "--src-tls-verify=false", f"docker://{server.host}/deep:1",
                   f"oci:{dst}:x")
    finally:
        server.stop()
    assert_one_line(r, 1, "manifest", "nested deeper than 64 levels")
    assert not dst.exists()


def test_hostile_token_response_from_a_registry(tmp_path):
    def answer(method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
        if path.startswith("/token"):
            return 200, {"Content-Type": "application/json"}, b'{"token": ' + DEEP + b"}"
        realm = f"http://{server.host}/token"
        return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'}, b""

    server = FakeServer(answer)
    try:
        dst = tmp_path / "dst"
        r = invoke("convert", "--src-tls-verify=false", f"docker://{server.host}/deep:1",
                   f"oci:{dst}:x")
    finally:
        server.stop()
    assert_one_line(r, 4, "sent no token")
    assert not dst.exists()


def test_hostile_error_body_from_a_registry_is_ignored():
    assert error_detail(b'{"errors": ' + DEEP + b"}") == ""
    assert error_detail(b'{"errors": [{"code": "DENIED", "message": "no"}]}') == "DENIED: no"


# --- files and options ----------------------------------------------------------

def test_hostile_auth_file(tmp_path):
    auth = write(tmp_path / "auth.json", b'{"auths": ' + DEEP + b"}")
    with pytest.raises(InvalidInput, match="auth file .* is nested deeper than 64 levels"):
        find_credentials("registry.example", auth_file=str(auth))


@pytest.mark.parametrize("line, message", [
    (DEEP, "record line 1 is nested deeper than 64 levels"),
    (b'{"path": NaN}', "record line 1 is not valid JSON: NaN is not JSON"),
    (b"[1]", "record line 1 lacks path"),
])
def test_hostile_record_file(tmp_path, line, message):
    src = tmp_path / "src"
    small_layout(src)
    records = write(tmp_path / "records.json", line + b"\n")
    dst = tmp_path / "dst"
    assert_one_line(invoke("convert", "--record-in", records, f"oci:{src}:latest",
                           f"oci:{dst}:x"), 1, message)
    assert not dst.exists()


@pytest.mark.parametrize("option", ["--entrypoint", "--args"])
def test_deeply_nested_json_option_is_a_usage_error(tmp_path, option):
    r = invoke("optimize", option, DEEP.decode(), "oci:/nonexistent:x", f"oci:{tmp_path}/d:x")
    assert_one_line(r, 2, f"{option} takes a JSON array of strings",
                    "nested deeper than 64 levels")
