"""``estargz soci create`` / ``index info`` / ``ztoc info`` (issue 14, point 1):
the whole binding byte for byte as soci v0.16.1 writes it, v1 and v2 in a
real registry, ``--reuse``, platforms, and bad input.

The reference is the real ``soci`` CLI (``scripts/build-go.sh soci``) in
its daemonless mode, ``soci convert --standalone`` (OCI layout in, OCI
layout out); lazy loading of what we write is tests/test_soci_lazy.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from gobuild import build_go

SOCI_TOOL = "AWS SOCI CLI v0.2"  # soci's build tool identifier, so digests can match
V1 = "application/vnd.amazon.soci.index.v1+json"
V2 = "application/vnd.amazon.soci.index.v2+json"
PLAIN = ("--src-tls-verify=false", "--dest-tls-verify=false")


def soci_create(*args: object) -> dict:
    r = run_cli("soci", "create", *args, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def blob(root: Path, desc: dict) -> bytes:
    data = (root / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]).read_bytes()
    assert len(data) == desc["size"], desc
    assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"], desc
    return data


def walk(root: Path, desc: dict) -> list[dict]:
    """Every descriptor reachable from ``desc`` in layout ``root``, each blob
    checked whole; returns the layer-like descriptors (layers, zTOCs)."""
    doc = json.loads(blob(root, desc))
    if "manifests" in doc:
        return [x for child in doc["manifests"] for x in walk(root, child)]
    blob(root, doc["config"])
    for item in doc["layers"]:
        blob(root, item)
    return list(doc["layers"])


def layout_root(root: Path, tag: str) -> dict:
    index = json.loads((root / "index.json").read_bytes())
    (entry,) = [m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    return entry


def soci_convert_standalone(src: Path, dst: Path, work: Path, *args: str) -> str:
    """soci v0.16.1's v2 binding of layout ``src``: the new image index's digest."""
    soci = build_go("soci")
    p = subprocess.run([str(soci), "--root", str(work / "soci-root"), "convert", "--standalone",
                        "--format", "oci-dir", *args, str(src), str(dst)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads((dst / "index.json").read_bytes())["manifests"]
    return entry["digest"]


@pytest.mark.parametrize("image, args", [
    ("debian_python3", ()),
    ("debian_multilayer", ("--span-size", "1048576", "--min-layer-size", "0")),
    ("lazy_kinds", ("--span-size", "65536", "--min-layer-size", "0")),
])
def test_v2_binding_is_soci_convert_byte_for_byte(test_images, tmp_path, image, args):
    src = getattr(test_images, image)
    theirs = soci_convert_standalone(src, tmp_path / "soci", tmp_path, *args)
    out = tmp_path / "ours"
    result = soci_create(f"oci:{src}:latest", f"oci:{out}:soci", "--build-tool-identifier",
                         SOCI_TOOL, *args)
    # The image index of the binding, and so everything it names (annotated
    # manifest, SOCI index manifest, every zTOC), has soci's digest.
    assert result["digest"] == theirs
    entry = layout_root(out, "soci")
    assert entry["digest"] == theirs
    walk(out, entry)  # every blob the binding names is there, whole
    index = json.loads(blob(out, entry))
    image_entry, soci_entry = index["manifests"]
    assert soci_entry["artifactType"] == V2
    # Layers and config are the source's, byte for byte; only the manifest
    # gained the index annotation.
    original = json.loads(blob(src, layout_root(src, "latest")))
    bound = json.loads(blob(out, image_entry))
    assert bound["config"]["digest"] == original["config"]["digest"]
    assert [x["digest"] for x in bound["layers"]] == [x["digest"] for x in original["layers"]]
    assert bound["annotations"]["com.amazon.soci.index-digest"] == soci_entry["digest"]
    # Our reader finds it and parses every zTOC.
    r = run_cli("soci", "index", "info", f"oci:{out}:soci", "--verify")
    assert r.code == 0, r.err
    (info,) = json.loads(r.out)
    assert info["version"] == "v2" and info["manifest"] == image_entry["digest"]
    assert [z["ztoc"] for z in info["ztocs"]] == [
        layer["ztoc"] for i in result["indexes"] for layer in i["layers"]
        if layer["action"] != "skipped"]
    assert all(z["files"] > 0 and z["spans"] >= 1 for z in info["ztocs"])


def skopeo_raw(ref: str) -> bytes:
    p = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def test_registry_v1_v2_and_reuse(registry, test_images, tmp_path):
    ref = f"docker://{registry.host}/soci/py:1"
    p = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false",
                        f"oci:{test_images.debian_python3}:latest", ref],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    before = skopeo_raw(ref)
    digest = "sha256:" + hashlib.sha256(before).hexdigest()

    # v1: the index refers to the unchanged manifest; Debian's registry has
    # no referrers API, so it is listed under the tag schema's tag.
    v1 = soci_create(ref, "--index-version", "v1", *PLAIN)
    assert v1["found_by"] == [f"tag sha256-{digest[7:]}"]
    assert v1["digest"] == digest and skopeo_raw(ref) == before
    (idx,) = v1["indexes"]
    built = {x["digest"]: x["ztoc"] for x in idx["layers"] if x["action"] == "built"}
    assert len(built) == 2
    fallback = json.loads(skopeo_raw(f"docker://{registry.host}/soci/py:sha256-{digest[7:]}"))
    assert [(m["digest"], m["artifactType"]) for m in fallback["manifests"]] == [
        (idx["index"], V1)]
    r = run_cli("soci", "index", "info", ref, "--tls-verify=false", "--verify")
    assert r.code == 0, r.err
    (info,) = json.loads(r.out)
    assert info["version"] == "v1" and info["manifest"] == digest

    # v2 to the default destination, TAG-soci, reusing the v1 index's zTOCs:
    # no layer is read again, and the zTOCs are the same blobs.
    v2 = soci_create(ref, "--reuse", *PLAIN)
    assert v2["destination"] == f"{ref}-soci"
    (idx2,) = v2["indexes"]
    assert {x["digest"]: x["ztoc"] for x in idx2["layers"] if x["action"] == "reused"} == built
    root = json.loads(skopeo_raw(f"{ref}-soci"))
    assert [m.get("artifactType") for m in root["manifests"]] == [None, V2]
    bound = json.loads(skopeo_raw(f"docker://{registry.host}/soci/py@"
                                  f"{root['manifests'][0]['digest']}"))
    assert [x["digest"] for x in bound["layers"]] == [
        x["digest"] for x in json.loads(before)["layers"]]
    assert skopeo_raw(ref) == before  # the source tag is untouched


def oras(*args: object, cwd: Path | None = None) -> str:
    p = subprocess.run([str(build_go("oras")), *map(str, args)], capture_output=True,
                       text=True, timeout=120, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_v1_in_an_oci_layout_is_a_referrer_oras_finds(test_images, tmp_path):
    """A v1 index in an OCI layout is listed in index.json untagged with its
    artifactType, as `oras attach --oci-layout` lists a referrer: oras
    discovers it, skopeo still copies the image, and we find it again."""
    src = test_images.debian_python3
    image = layout_root(src, "latest")
    out = tmp_path / "v1"
    v1 = soci_create(f"oci:{src}:latest", f"oci:{out}:t", "--index-version", "v1")
    assert v1["found_by"] == ["index.json entry"] and v1["digest"] == image["digest"]
    assert layout_root(out, "t")["digest"] == image["digest"]  # the image unchanged
    ((idx,), entries) = v1["indexes"], json.loads((out / "index.json").read_bytes())["manifests"]
    (listed,) = [m for m in entries if m.get("artifactType") == V1]
    assert listed["digest"] == idx["index"] and "annotations" not in listed
    assert json.loads(blob(out, listed))["subject"]["digest"] == image["digest"]
    walk(out, listed)  # the zTOCs and the config are there
    found = json.loads(oras("discover", "--oci-layout", "--format", "json", f"{out}:t"))
    assert [(r["digest"], r["artifactType"]) for r in found["referrers"]] == [
        (idx["index"], V1)]
    p = subprocess.run(["skopeo", "copy", f"oci:{out}:t", f"oci:{tmp_path}/copy:t"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr

    # In place, where oras attached something else first: ours is added
    # beside it, once however often it is made, and found by `index info`.
    here = tmp_path / "here"
    shutil.copytree(src, here)
    (tmp_path / "note.txt").write_text("not ours")
    oras("attach", "--oci-layout", "--artifact-type", "application/x-note", f"{here}:latest",
         "note.txt", cwd=tmp_path)
    before = json.loads((here / "index.json").read_bytes())["manifests"]
    for _ in range(2):
        again = soci_create(f"oci:{here}:latest", "--index-version", "v1")
        assert again["indexes"][0]["index"] == idx["index"]
    after = json.loads((here / "index.json").read_bytes())["manifests"]
    assert after == before + [listed]
    found = json.loads(oras("discover", "--oci-layout", "--format", "json", f"{here}:latest"))
    assert sorted(r["artifactType"] for r in found["referrers"]) == [V1, "application/x-note"]
    for ref in (f"oci:{here}:latest", f"oci:{here}"):  # untagged: the referrers do not count
        r = run_cli("soci", "index", "info", ref, "--verify")
        assert r.code == 0, r.err
        (info,) = json.loads(r.out)
        assert (info["version"], info["manifest"]) == ("v1", image["digest"])


def test_all_platforms(test_images, tmp_path):
    out = tmp_path / "multi"
    args = ("--all-platforms", "--min-layer-size", "0")
    # soci's standalone mode wants a layout holding one image: copy ours out.
    single = tmp_path / "single"
    p = subprocess.run(["skopeo", "copy", "--all", f"oci:{test_images.two_platform}:latest",
                        f"oci:{single}:latest"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    theirs = soci_convert_standalone(single, tmp_path / "soci", tmp_path, *args)
    result = soci_create(f"oci:{single}:latest", f"oci:{out}:soci",
                         "--build-tool-identifier", SOCI_TOOL, *args)
    assert sorted(i["platform"] for i in result["indexes"]) == ["linux/amd64",
                                                                 "linux/arm64/v8"]
    # Every bound manifest and SOCI index as soci writes them; the entries
    # neither indexes (attestations) keep their descriptors as they are,
    # where soci replaces their annotations with the manifests' own (none).
    ours_index = json.loads(blob(out, layout_root(out, "soci")))["manifests"]
    theirs_index = json.loads(blob(tmp_path / "soci", {"digest": theirs, "size": len(
        (tmp_path / "soci" / "blobs" / "sha256" / theirs[7:]).read_bytes())}))["manifests"]
    source = json.loads(blob(single, layout_root(single, "latest")))["manifests"]
    for mine, soci, original in zip(ours_index, theirs_index, source + [None, None],
                                    strict=True):
        if original is not None and original["platform"]["os"] == "unknown":
            assert mine == original and soci["digest"] == original["digest"]
        else:
            assert mine == soci
    index = json.loads(blob(out, layout_root(out, "soci")))
    socis = [m for m in index["manifests"] if m.get("artifactType") == V2]
    assert sorted(m["platform"]["architecture"] for m in socis) == ["amd64", "arm64"]
    bound = {m["digest"] for m in index["manifests"] if "artifactType" not in m}
    assert {m["annotations"]["com.amazon.soci.image-manifest-digest"] for m in socis} <= bound


def one_line_error(r, code: int, text: str) -> None:
    assert r.code == code, (r.code, r.err)
    assert text in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err


def test_bad_input(test_images, tmp_path):
    src = f"oci:{test_images.debian_python3}:latest"
    one_line_error(run_cli("soci", "create", src, f"oci-archive:{tmp_path}/x.tar:y",
                           "--index-version", "v1"), 1, "cannot hold a v1 SOCI index")
    one_line_error(run_cli("soci", "create", src, f"oci:{tmp_path}/x:y", "--min-layer-size",
                           str(1 << 40)), 1, "no layer to index")
    assert not (tmp_path / "x").exists()  # nothing half-written
    one_line_error(run_cli("soci", "create", src, f"oci:{tmp_path}/x:y", "--span-size", "0"),
                   2, "--span-size")
    garbage = tmp_path / "garbage.ztoc"
    garbage.write_bytes(b"\x10\x00\x00\x00not a flatbuffer at all")
    one_line_error(run_cli("soci", "ztoc", "info", garbage), 1, "invalid zTOC")
    one_line_error(run_cli("soci", "index", "info", src), 1, "no SOCI index is bound")


def test_optimize_soci_usage_errors(test_images, tmp_path):
    src = f"oci:{test_images.debian_python3}:latest"
    one_line_error(run_cli("optimize", "--soci", "--min-chunk-size", "65536", src,
                           f"oci:{tmp_path}/o:x"), 2, "drop --min-chunk-size")
    one_line_error(run_cli("optimize", "--soci", "--zstdchunked", src, f"oci:{tmp_path}/o:x"),
                   2, "drop --format")
    one_line_error(run_cli("optimize", "--workload", "no spaces", "--no-optimize", src), 1,
                   "workload name")
    assert not (tmp_path / "o").exists()
