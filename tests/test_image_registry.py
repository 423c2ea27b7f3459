"""`estargz convert` with registries: Debian's real docker-registry, plain and
TLS with htpasswd, read back by skopeo and pulled and run by containerd."""

from __future__ import annotations

import json
import subprocess

from conftest import run_cli
from test_image_convert import check_layers_with_reference

TOC = "containerd.io/snapshot/stargz/toc.digest"
PLAIN = ("--dest-tls-verify=false",)


def convert(*args: str) -> dict:
    r = run_cli("convert", *args, "--json")
    assert r.code == 0, r.err
    return r.json()


def skopeo(*args: str) -> str:
    p = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_push_then_skopeo_copies_it_out_and_containerd_runs_it(
        tmp_path, test_images, registry, containerd, goref):
    ref = f"{registry.host}/debian:esgz"
    result = convert(f"oci:{test_images.debian_multilayer}:latest", f"docker://{ref}", *PLAIN)
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert [item["annotations"][TOC] for item in manifest["layers"]] == \
        [item["toc_digest"] for item in result["layers"]]
    # skopeo copies it out; the reference verifies each layer with its annotation.
    out = tmp_path / "copied"
    skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:x")
    check_layers_with_reference(goref, out, manifest)
    # containerd pulls from the registry, unpacks (checking diff_ids) and runs it.
    containerd.ctr("images", "pull", "--plain-http", ref)
    out = containerd.run(ref, "sh", "-c", "cat /etc/motd; test -e /etc/issue.net || "
                         "echo whited-out").stdout
    assert "whited-out" in out
    containerd.ctr("images", "rm", ref, check=False)


def test_registry_to_registry_with_reuse_mounts_and_skips_conversion(registry, test_images):
    first = f"{registry.host}/busybox:esgz"
    convert(f"oci:{test_images.busybox}:latest", f"docker://{first}", *PLAIN)
    again = convert(f"docker://{first}", f"docker://{registry.host}/copy:esgz", "--reuse",
                    "--src-tls-verify=false", *PLAIN)
    assert [item["action"] for item in again["layers"]] == ["reused"]
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                 f"docker://{registry.host}/copy:esgz"))
    assert manifest["layers"][0]["digest"] == again["layers"][0]["old_digest"]


def test_two_platform_index_to_registry(registry, test_images):
    ref = f"{registry.host}/multi:esgz"
    result = convert(f"oci:{test_images.two_platform}:latest", f"docker://{ref}",
                     "--all-platforms", *PLAIN)
    index = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == ["amd64", "arm64"]
    assert result["digest"].startswith("sha256:")


def test_tls_registry_with_basic_auth(tls_registry, test_images):
    ref = f"docker://{tls_registry.host}/secure/busybox:esgz"
    src = f"oci:{test_images.busybox}:latest"
    # No credentials: one line naming the registry and how to supply them.
    r = run_cli("convert", src, ref, "--cert-dir", tls_registry.ca_dir)
    assert r.code == 4
    assert r.err.count("\n") == 1 and tls_registry.host in r.err and "--dest-creds" in r.err
    # No CA: the certificate is refused.
    r = run_cli("convert", src, ref, "--dest-creds", f"{tls_registry.user}:{tls_registry.password}")
    assert r.code == 4 and "certificate" in r.err and r.err.count("\n") == 1
    assert tls_registry.password not in r.err
    convert(src, ref, "--cert-dir", tls_registry.ca_dir,
            "--dest-creds", f"{tls_registry.user}:{tls_registry.password}")
    out = skopeo("inspect", "--raw", "--cert-dir", str(tls_registry.ca_dir),
                 "--creds", f"{tls_registry.user}:{tls_registry.password}", ref)
    assert json.loads(out)["layers"][0]["annotations"][TOC]


def test_tampered_blob_is_refused(tmp_path, registry, tampering_proxy, test_images):
    convert(f"oci:{test_images.busybox}:latest", f"docker://{registry.host}/t:v1", *PLAIN)
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                 f"docker://{registry.host}/t:v1"))
    layer = manifest["layers"][0]["digest"]
    tampering_proxy.corrupt.add(layer)
    out = tmp_path / "out"
    r = run_cli("convert", f"docker://{tampering_proxy.host}/t:v1", f"oci:{out}",
                "--src-tls-verify=false")
    assert r.code == 1
    assert r.err.count("\n") == 1 and layer in r.err and "does not match" in r.err
    assert not out.exists()


def test_missing_image_and_unreachable_registry(tmp_path, registry):
    r = run_cli("convert", f"docker://{registry.host}/nope:v1", f"oci:{tmp_path / 'o'}",
                "--src-tls-verify=false")
    assert (r.code, r.err.count("\n")) == (1, 1) and "nope:v1" in r.err and "not found" in r.err
    r = run_cli("convert", "docker://127.0.0.1:1/x:v1", f"oci:{tmp_path / 'o'}",
                "--src-tls-verify=false")
    assert r.code == 4 and "cannot reach registry 127.0.0.1:1" in r.err
    assert not (tmp_path / "o").exists()


def test_layer_commands_read_a_remote_layer_by_range(tmp_path, registry, tampering_proxy,
                                                     test_images):
    result = convert(f"oci:{test_images.debian_multilayer}:latest",
                     f"docker://{registry.host}/deb:esgz", *PLAIN)
    base = result["layers"][0]
    blob = f"docker://{tampering_proxy.host}/deb@{base['new_digest']}"
    tampering_proxy.clear()
    r = run_cli("layer", "ls", blob, "--tls-verify=false")
    assert r.code == 0, r.err
    assert any(item.endswith("etc/os-release") or "usr/lib/os-release" in item
               for item in r.out.splitlines())
    tampering_proxy.clear()
    r = run_cli("layer", "extract", blob, "usr/lib/os-release", "--tls-verify=false")
    assert r.code == 0 and "Debian" in r.out
    fetched = [e for e in tampering_proxy.requests("GET", contains="/blobs/")]
    assert fetched and all(e.status == 206 for e in fetched)
    # Footer, TOC and one small file: a sliver of the layer.
    sent = sum(e.sent for e in fetched)
    assert sent * 20 < base["new_size"], (sent, base["new_size"])
    r = run_cli("layer", "verify", blob, "--tls-verify=false", "--toc-digest",
                base["toc_digest"])
    assert r.code == 0, r.err
