"""SOCI index documents (estargz.image.sociindex): the index manifest, the v2
binding's manifest and image index, and hostile index manifests."""

from __future__ import annotations

import json

import pytest

from estargz import Descriptor, InvalidInput, Platform, sha256_digest
from estargz.image.sociindex import (
    BUILD_TOOL_ANNOTATION,
    INDEX_DIGEST_ANNOTATION,
    LAYER_DIGEST_ANNOTATION,
    SOCI_INDEX_V1,
    SOCI_INDEX_V2,
    annotated_manifest,
    go_json,
    index_manifest,
    parse_index_manifest,
    v2_image_index,
    ztoc_descriptor,
    ztoc_layer_kind,
)

LAYER = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "a" * 64, 12 << 20)
IMAGE = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "b" * 64, 700)


def test_go_json_escapes_as_go_does():
    assert go_json({"a": "<&>\u2028é"}) == b'{"a":"\\u003c\\u0026\\u003e\\u2028\xc3\xa9"}'


def test_index_manifest_v1_has_subject_and_config_type():
    z = ztoc_descriptor(b"ztoc-bytes", LAYER, 4 << 20)
    data = index_manifest("v1", [z], "estargz test", IMAGE)
    m = json.loads(data)
    assert list(m) == ["schemaVersion", "mediaType", "config", "layers", "subject",
                       "annotations"]
    assert m["config"] == {"mediaType": SOCI_INDEX_V1, "digest": sha256_digest(b"{}"),
                           "size": 2}
    assert m["subject"] == {"mediaType": IMAGE.media_type, "digest": IMAGE.digest,
                            "size": 700}
    assert m["layers"][0]["annotations"] == {
        "com.amazon.soci.image-layer-digest": LAYER.digest,
        "com.amazon.soci.image-layer-mediaType": LAYER.media_type,
        "com.amazon.soci.span-size": str(4 << 20)}
    assert m["annotations"] == {BUILD_TOOL_ANNOTATION: "estargz test"}
    index = parse_index_manifest(data)
    assert index.version == "v1" and index.subject is not None
    assert index.ztoc_for(LAYER.digest) == z


def test_index_manifest_versions_and_subjects():
    z = ztoc_descriptor(b"x", LAYER, 1)
    assert parse_index_manifest(index_manifest("v2", [z], "t")).version == "v2"
    with pytest.raises(InvalidInput):
        index_manifest("v2", [z], "t", IMAGE)
    with pytest.raises(InvalidInput):
        index_manifest("v1", [z], "t")


def test_annotated_manifest_keeps_config_and_layers():
    config = {"mediaType": "application/vnd.docker.container.image.v1+json",
              "digest": "sha256:" + "c" * 64, "size": 10}
    layer = {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
             "digest": LAYER.digest, "size": LAYER.size}
    docker = json.dumps({"schemaVersion": 2, "mediaType":
                         "application/vnd.docker.distribution.manifest.v2+json",
                         "config": config, "layers": [layer]}).encode()
    bound = json.loads(annotated_manifest(docker, "sha256:" + "d" * 64))
    assert bound["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert bound["config"]["digest"] == config["digest"]
    assert bound["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert bound["layers"] == [layer]  # layers keep their media type
    assert bound["annotations"] == {INDEX_DIGEST_ANNOTATION: "sha256:" + "d" * 64}


def test_v2_image_index_lists_manifest_then_soci_index():
    plat = Platform("linux", "amd64")
    soci = Descriptor(IMAGE.media_type, "sha256:" + "e" * 64, 300,
                      {"com.amazon.soci.image-manifest-digest": IMAGE.digest}, plat,
                      {"artifactType": SOCI_INDEX_V2})
    idx = json.loads(v2_image_index(None, [IMAGE.replace(platform=plat), soci]))
    assert idx["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["digest"] for m in idx["manifests"]] == [IMAGE.digest, soci.digest]
    assert list(idx["manifests"][1]) == ["mediaType", "digest", "size", "annotations",
                                        "platform", "artifactType"]


def test_layer_kinds():
    assert ztoc_layer_kind("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    assert ztoc_layer_kind("application/vnd.oci.image.layer.v1.tar") == "uncompressed"
    assert ztoc_layer_kind("application/vnd.oci.image.layer.v1.tar+zstd") is None
    with pytest.raises(InvalidInput, match="not a layer media type"):
        ztoc_layer_kind("application/vnd.oci.image.config.v1+json")


@pytest.mark.parametrize("doc, message", [
    (b"[]", "object"),
    (b'{"config": {"mediaType": "x"}}', "not a SOCI index"),
    (json.dumps({"config": {"mediaType": SOCI_INDEX_V2}}).encode(), "no layers list"),
    (json.dumps({"config": {"mediaType": SOCI_INDEX_V2}, "layers": [
        {"mediaType": "application/octet-stream", "digest": "sha256:" + "a" * 64,
         "size": 1}]}).encode(), "names no image layer"),
    (json.dumps({"config": {"mediaType": SOCI_INDEX_V2}, "layers": [
        {"mediaType": "application/octet-stream", "digest": "sha256:" + "a" * 64,
         "size": 1, "annotations": {LAYER_DIGEST_ANNOTATION: "x"}}]}).encode(),
     "no valid span size"),
    (json.dumps({"config": {"mediaType": SOCI_INDEX_V2}, "layers": [
        {"mediaType": "text/plain", "digest": "sha256:" + "a" * 64, "size": 1,
         "annotations": {LAYER_DIGEST_ANNOTATION: "x"}}]}).encode(), "not a zTOC"),
    (json.dumps({"config": {"mediaType": SOCI_INDEX_V2}, "layers": [],
                 "annotations": {"a": 1}}).encode(), "malformed annotations"),
])
def test_hostile_index_manifests(doc, message):
    with pytest.raises(InvalidInput, match=message) as e:
        parse_index_manifest(doc)
    assert "\n" not in str(e.value)
