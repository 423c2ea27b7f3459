"""Records and v1 SOCI indexes against a registry that HAS the OCI 1.1
referrers API: go-containerregistry's registry (``pkg/registry`` v0.22.1,
the ``referrers_registry`` fixture), where tests/test_record_artifacts.py
and tests/test_soci_create.py can only prove the ``sha256-HEX`` tag schema
(Debian's docker-registry 2.8 answers 404 to ``GET /v2/REPO/referrers/D``).

What this registry does (its pkg/registry/manifest.go), and so what is
asserted: it lists every manifest whose ``subject`` is D, but sends no
``OCI-Subject`` header on push, so our push also writes the tag schema index,
as the distribution spec requires of clients; it ignores the
``artifactType`` filter; and it lists each referrer's ``artifactType`` as its
config's media type - the empty type for a record, whose real type is in the
manifest's own ``artifactType``.

Every request goes through a :class:`services.FaultProxy` that logs it.  To
prove a reader used the API, the fallback tag is deleted first, and the log
must show the ``referrers`` GET answered 200 and no ``sha256-HEX`` tag asked
for.  The same registry with the ``OCI-Subject`` header added (our
``-oci-subject``) shows pushes that skip the tag schema.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli
from estargz import NotFound, TransportOptions, sha256_digest
from estargz.image.descriptor import OCI_INDEX, Descriptor
from estargz.image.records import OCI_EMPTY, RECORD_ARTIFACT_TYPE
from estargz.registry.client import client_for
from estargz.registry.records import fallback_tag, find_record, push_record
from services import FaultProxy, RegistryDaemon, running_referrers_registry
from socilazy import MIN_LAYER_SIZE, SociConfig
from test_record_artifacts import RECORD, skopeo
from test_soci_create import V1, skopeo_raw
from test_soci_lazy import assert_only_ranges

PLAIN = TransportOptions(tls_verify=False)
PLAIN_CLI = ("--src-tls-verify=false", "--dest-tls-verify=false")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="profiling and FUSE need root")


@pytest.fixture(scope="module")
def proxy(referrers_registry: RegistryDaemon) -> Iterator[FaultProxy]:
    """The referrers registry behind a proxy that logs every request."""
    with FaultProxy(referrers_registry.host) as p:
        yield p


def copy_image(host: str, layout: Path, repo_tag: str) -> Descriptor:
    """Copy ``layout``'s latest to ``host/repo_tag``: its manifest's descriptor."""
    ref = f"docker://{host}/{repo_tag}"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:latest", ref)
    raw = skopeo_raw(ref)
    return Descriptor(json.loads(raw)["mediaType"], sha256_digest(raw), len(raw))


def raw_referrers(host: str, repo: str, subject: str) -> list[dict]:
    """The registry's own answer to ``GET /v2/REPO/referrers/SUBJECT``."""
    with urllib.request.urlopen(f"http://{host}/v2/{repo}/referrers/{subject}",
                                timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())["manifests"]


def drop_fallback_tag(host: str, repo: str, subject: str) -> list[str]:
    """Delete the tag schema index of ``subject``, so that only the referrers
    API can find its referrers: the digests it listed."""
    tag = fallback_tag(subject)
    with client_for(host, PLAIN) as client:
        index = json.loads(client.get_manifest(repo, tag, (OCI_INDEX,))[0])
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 202
    return [m["digest"] for m in index["manifests"]]


def lookups(proxy: FaultProxy, repo: str, subject: str) -> list[tuple[str, int]]:
    """How the referrers of ``subject`` were looked up since the proxy's log
    was cleared: ``("api", status)`` and ``("tag", status)`` in order."""
    api = f"/v2/{repo}/referrers/{subject}"
    tag = f"/v2/{repo}/manifests/{fallback_tag(subject)}"
    return [("api" if path == api else "tag", e.status)
            for e in proxy.requests("GET") if (path := e.path.split("?")[0]) in (api, tag)]


# --- records ---------------------------------------------------------------------

def test_records_are_found_through_the_referrers_api(referrers_registry, proxy, test_images):
    host, repo = proxy.host, "records/bb"
    image = copy_image(host, test_images.busybox, f"{repo}:1")
    with client_for(host, PLAIN) as client:
        first = push_record(client, repo, RECORD, image, created="2026-01-01T00:00:00Z")
    # No OCI-Subject header: the push keeps the tag schema index as well.
    assert first.found_by == f"tag {fallback_tag(image.digest)}"
    # The registry lists the record with its config's type, the empty one.
    [listed] = raw_referrers(host, repo, image.digest)
    assert (listed["digest"], listed["artifactType"]) == (first.digest, OCI_EMPTY)
    assert listed["annotations"]["org.opencontainers.image.created"] == "2026-01-01T00:00:00Z"
    # We read the artifact's own type: the record is found, correctly typed.
    with client_for(host, PLAIN) as client:
        assert client.get_referrers(repo, image.digest, RECORD_ARTIFACT_TYPE) == [
            {**listed, "artifactType": RECORD_ARTIFACT_TYPE}]
    assert drop_fallback_tag(host, repo, image.digest) == [first.digest]

    # A second record re-creates the tag with itself alone; the API lists
    # both, so finding two (and the newest) is the API's doing.
    newer = RECORD.replace(b"bin/sh", b"bin/busybox")
    with client_for(host, PLAIN) as client:
        second = push_record(client, repo, newer, image, created="2026-02-01T00:00:00Z")
    assert second.found_by == first.found_by
    proxy.clear()
    with client_for(host, PLAIN) as client:
        record, digest, notes = find_record(client, repo, image.digest)
    assert (record, digest) == (newer, second.digest)
    assert notes == [f"2 records refer to {image.digest}; using the newest, {second.digest} "
                     "(2026-02-01T00:00:00Z)"]
    assert lookups(proxy, repo, image.digest) == [("api", 200)]


@needs_root
def test_optimize_record_out_then_convert_record_from_referrers(tmp_path, proxy, test_images):
    """The CLI pipeline: the record optimize pushes is the one convert finds
    through the API (the fallback tag deleted), and it shapes the image."""
    host, repo = proxy.host, "pipeline/bb"
    image = copy_image(host, test_images.busybox, f"{repo}:src")
    src = f"docker://{host}/{repo}:src"
    r = run_cli("optimize", src, "--no-optimize", "--args", '["sh", "-c", "echo ok"]',
                "--record-out", f"docker://{host}/{repo}", *PLAIN_CLI, "--json")
    assert r.code == 0, r.err
    pushed = r.json()["record"]
    assert pushed["found_by"] == f"tag {fallback_tag(image.digest)}"
    assert pushed["subject"] == image.digest
    assert drop_fallback_tag(host, repo, image.digest) == [pushed["digest"]]

    proxy.clear()
    found = run_cli("convert", src, f"oci:{tmp_path / 'found'}", "--record-from-referrers",
                    "--src-tls-verify=false", "--json")
    assert found.code == 0, found.err
    assert f"record {pushed['digest']} (refers to {image.digest})" in found.err
    assert lookups(proxy, repo, image.digest) == [("api", 200)]
    by_name = run_cli("convert", src, f"oci:{tmp_path / 'by-name'}", "--record-in",
                      f"docker://{pushed['reference']}", "--src-tls-verify=false", "--json")
    assert by_name.code == 0, by_name.err
    assert found.json()["digest"] == by_name.json()["digest"]
    plain = run_cli("convert", src, f"oci:{tmp_path / 'plain'}", "--src-tls-verify=false",
                    "--json")
    assert plain.code == 0 and plain.json()["digest"] != found.json()["digest"]


# --- v1 SOCI indexes -----------------------------------------------------------------

@dataclass(frozen=True)
class V1Image:
    """debian-python3 in the referrers registry with a v1 SOCI index and a
    record referring to its manifest; the fallback tag deleted."""

    repo: str
    tag: str
    manifest: Descriptor
    #: ``soci create --json``'s one index entry.
    index: dict
    record: str

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.tag}"


@pytest.fixture(scope="module")
def v1_image(proxy, test_images) -> V1Image:
    host, repo, tag = proxy.host, "soci/py", "1"
    manifest = copy_image(host, test_images.debian_python3, f"{repo}:{tag}")
    r = run_cli("soci", "create", "--index-version", "v1", f"docker://{host}/{repo}:{tag}",
                *PLAIN_CLI, "--json")
    assert r.code == 0, r.err
    created = r.json()
    # As with Debian's registry: no OCI-Subject, so the tag schema index too.
    assert created["found_by"] == [f"tag {fallback_tag(manifest.digest)}"]
    [index] = created["indexes"]
    with client_for(host, PLAIN) as client:
        record = push_record(client, repo, RECORD, manifest, created="2026-01-01T00:00:00Z")
    assert drop_fallback_tag(host, repo, manifest.digest) == [index["index"], record.digest]
    return V1Image(repo, tag, manifest, index, record.digest)


def test_referrers_of_one_type_from_a_registry_that_ignores_the_filter(proxy, v1_image):
    host, repo, subject = proxy.host, v1_image.repo, v1_image.manifest.digest
    listed = {m["digest"]: m["artifactType"] for m in raw_referrers(host, repo, subject)}
    assert listed == {v1_image.index["index"]: V1, v1_image.record: OCI_EMPTY}
    proxy.clear()
    with client_for(host, PLAIN) as client:
        soci = client.get_referrers(repo, subject, V1)
        records = client.get_referrers(repo, subject, RECORD_ARTIFACT_TYPE)
        everything = client.get_referrers(repo, subject)
    assert soci is not None and records is not None and everything is not None
    assert [(m["digest"], m["artifactType"]) for m in soci] == [(v1_image.index["index"], V1)]
    assert [(m["digest"], m["artifactType"]) for m in records] == [
        (v1_image.record, RECORD_ARTIFACT_TYPE)]
    assert {m["digest"] for m in everything} == set(listed)
    # The filter was asked for (the registry ignored it); the record's entry,
    # listed with the empty type, cost a manifest GET in each filtered listing.
    asked = [e.path for e in proxy.requests("GET") if "/referrers/" in e.path]
    assert [p.partition("?")[2] for p in asked] == [
        "artifactType=application%2Fvnd.amazon.soci.index.v1%2Bjson",
        "artifactType=application%2Fvnd.estargz.record.v1%2Bjsonl", ""]
    assert [e.path for e in proxy.requests("GET", "/manifests/")] == [
        f"/v2/{repo}/manifests/{v1_image.record}"] * 2


def test_odd_referrers_listings(proxy, v1_image):
    """What a registry may list, as the proxy answers in its stead: entries
    whose type must be read from the manifest are read only if well formed,
    at most 32 of them a listing; a manifest gone since is skipped."""
    host, repo, subject = proxy.host, v1_image.repo, v1_image.manifest.digest
    real = {m["digest"]: m for m in raw_referrers(host, repo, subject)}[v1_image.record]
    gone = [f"sha256:{i:064x}" for i in range(40)]
    manifest = "application/vnd.oci.image.manifest.v1+json"
    listing = [
        {"mediaType": manifest, "digest": "sha256:not-a-digest", "size": 2},
        {"mediaType": OCI_INDEX, "digest": v1_image.record, "size": 2},  # not a manifest
        {"mediaType": manifest, "digest": v1_image.record, "size": 2,
         "artifactType": "application/vnd.example.other"},
        {k: v for k, v in real.items() if k != "artifactType"},  # no type: read it
    ]

    def answer(entries: list[dict]) -> None:
        proxy.add_fault("GET", "/referrers/", status=200,
                        headers={"Content-Type": OCI_INDEX},
                        body=json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                         "manifests": entries}).encode())

    answer(listing)
    proxy.clear()
    with client_for(host, PLAIN) as client:
        found = client.get_referrers(repo, subject, RECORD_ARTIFACT_TYPE)
    assert found == [{**real, "artifactType": RECORD_ARTIFACT_TYPE}]
    assert [e.path for e in proxy.requests("GET", "/manifests/")] == [
        f"/v2/{repo}/manifests/{v1_image.record}"]

    answer([{"mediaType": manifest, "digest": d, "size": 2, "artifactType": OCI_EMPTY}
            for d in gone] + [real])
    proxy.clear()
    with client_for(host, PLAIN) as client:
        assert client.get_referrers(repo, subject, RECORD_ARTIFACT_TYPE) == []
    asked = proxy.requests("GET", "/manifests/")
    assert [(e.path, e.status) for e in asked] == [
        (f"/v2/{repo}/manifests/{d}", 404) for d in gone[:32]]


def test_soci_index_info_finds_the_v1_index_through_the_referrers_api(proxy, v1_image):
    proxy.clear()
    r = run_cli("soci", "index", "info", f"docker://{proxy.host}/{v1_image.ref}",
                "--tls-verify=false", "--verify")
    assert r.code == 0, r.err
    (info,) = json.loads(r.out)
    assert (info["version"], info["manifest"]) == ("v1", v1_image.manifest.digest)
    assert info["index"] == v1_image.index["index"]
    built = {x["digest"]: x["ztoc"] for x in v1_image.index["layers"] if x["action"] == "built"}
    assert {z["layer"]: z["ztoc"] for z in info["ztocs"]} == built and len(built) == 2
    assert all(z["files"] > 0 and z["spans"] > 0 for z in info["ztocs"])  # --verify parsed them
    assert lookups(proxy, v1_image.repo, v1_image.manifest.digest) == [("api", 200)]


@needs_root
def test_soci_snapshotter_finds_the_v1_index_through_the_referrers_api(
        make_soci_puller, proxy, v1_image):
    """The SOCI Snapshotter (v0.16.1, soci v1 enabled) lazily loads the
    unchanged image with the index we made, found by the referrers API."""
    ref = f"{proxy.host}/{v1_image.ref}"
    with client_for(proxy.host, PLAIN) as client:
        manifest = json.loads(client.get_manifest(v1_image.repo, v1_image.manifest.digest,
                                                  (v1_image.manifest.media_type,))[0])
    indexed = [layer for layer in manifest["layers"] if layer["size"] >= MIN_LAYER_SIZE]
    assert len(indexed) == 2
    puller = make_soci_puller(SociConfig(soci_v1=True))
    proxy.clear()
    puller.rpull(ref)
    sn = puller.snapshotter
    assert len(sn.fuse_mounts()) == len(indexed), sn.log_tail()
    assert list(sn.prepared_remote_snapshots().values()) == [True] * len(indexed), \
        sn.remote_snapshot_errors()
    assert sn.index_lookups()[-1] == "using soci v1 index via referrers API"
    assert lookups(proxy, v1_image.repo, v1_image.manifest.digest) == [("api", 200)]
    assert proxy.requests("GET", f"/manifests/{v1_image.index['index']}")
    assert_only_ranges(proxy, indexed)
    result = puller.run(ref, "python3", "-c", "import json, sqlite3; print('soci v1 ok')")
    assert "soci v1 ok" in result.stdout, result.stderr
    assert_only_ranges(proxy, indexed)


# --- a registry that answers OCI-Subject ------------------------------------------------

@pytest.fixture(scope="module")
def subject_registry(tmp_path_factory) -> Iterator[RegistryDaemon]:
    """The referrers registry answering ``OCI-Subject`` to referrer pushes."""
    with running_referrers_registry(tmp_path_factory.mktemp("oci-subject-registry"),
                                    oci_subject=True) as reg:
        yield reg


def test_where_the_registry_answers_oci_subject_no_fallback_tag_is_written(
        subject_registry, test_images):
    """The push trusts the header once the API lists the artifact: records
    and v1 SOCI indexes are found by the API alone, no tag is made."""
    host, repo = subject_registry.host, "indexed/bb"
    image = copy_image(host, test_images.busybox, f"{repo}:1")
    tag = fallback_tag(image.digest)
    with client_for(host, PLAIN) as client:
        pushed = push_record(client, repo, RECORD, image, created="2026-01-01T00:00:00Z")
        assert pushed.found_by == "referrers API"
        with pytest.raises(NotFound):
            client.get_manifest(repo, tag, (OCI_INDEX,))
        assert find_record(client, repo, image.digest)[:2] == (RECORD, pushed.digest)

    # busybox's one layer is below soci's 10 MiB minimum: index it anyway.
    r = run_cli("soci", "create", "--index-version", "v1", "--min-layer-size", "0",
                f"docker://{host}/{repo}:1", *PLAIN_CLI, "--json")
    assert r.code == 0, r.err
    created = r.json()
    assert created["found_by"] == ["referrers API"]
    [index] = created["indexes"]
    info = run_cli("soci", "index", "info", f"docker://{host}/{repo}:1", "--tls-verify=false",
                   "--verify")
    assert info.code == 0, info.err
    assert [(i["index"], i["version"]) for i in json.loads(info.out)] == [(index["index"], "v1")]
    with client_for(host, PLAIN) as client, pytest.raises(NotFound):
        client.get_manifest(repo, tag, (OCI_INDEX,))
