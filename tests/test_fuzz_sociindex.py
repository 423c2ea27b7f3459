"""Mutation fuzzing of SOCI index manifests (issue 14, point 4): the index
of a real v2 binding, edited one to three times (the JSON edits of
tests/test_fuzz.py), put back into the layout in place of the original, and
read the way ``estargz soci index info --verify`` and ``soci create
--reuse`` read it: :func:`find_soci_indexes`, then every zTOC it names
fetched and parsed. It parses or fails with one EstargzError line; never
a KeyError, TypeError or RecursionError."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from estargz import EstargzError, open_source, parse_reference
from estargz.image.socilookup import find_soci_indexes
from estargz.layer.ztoc import MAX_ZTOC_SIZE, unmarshal_ztoc
from test_fuzz import DOC_OP, HANG_SECONDS, assert_one_line, mutate_doc, time_limit

EXAMPLES = 150


@pytest.fixture(scope="module")
def bound_layout(tmp_path_factory, test_images) -> tuple[Path, dict, dict]:
    """lazy-kinds with our v2 SOCI index (every layer indexed): the layout,
    its image index and the SOCI index manifest."""
    root = tmp_path_factory.mktemp("fuzz-soci") / "layout"
    r = run_cli("soci", "create", f"oci:{test_images.lazy_kinds}:latest", f"oci:{root}:soci",
                "--min-layer-size", "0", "--span-size", "65536")
    assert r.code == 0, r.err
    (entry,) = json.loads((root / "index.json").read_bytes())["manifests"]
    index = json.loads((root / "blobs/sha256" / entry["digest"][7:]).read_bytes())
    soci = [m for m in index["manifests"] if m.get("artifactType")][0]
    manifest = json.loads((root / "blobs/sha256" / soci["digest"][7:]).read_bytes())
    return root, index, manifest


def read_like_index_info(ref: str) -> None:
    with open_source(parse_reference(ref)) as source:
        root, media_type = source.root()
        for bound in find_soci_indexes(source, root, media_type):
            for z in bound.index.ztocs:
                if z.size > MAX_ZTOC_SIZE:
                    continue
                buf = io.BytesIO()
                source.fetch_blob(z, buf)
                unmarshal_ztoc(buf.getvalue())


def put(root: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def test_mutated_soci_index_manifests_parse_or_fail_in_one_line(bound_layout, tmp_path):
    root, index, manifest = bound_layout
    read_like_index_info(f"oci:{root}:soci")  # the unmutated one reads
    count = 0

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(DOC_OP, min_size=1, max_size=3), target=st.sampled_from(
        ["index manifest", "image index"]))
    def check(ops, target):
        nonlocal count
        count += 1
        work = tmp_path / "layout"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(root, work)
        if target == "index manifest":
            new = put(work, mutate_doc(manifest, ops))
            doc = json.loads(json.dumps(index))
            for m in doc["manifests"]:
                if m.get("artifactType"):
                    m.update(new)
            top = put(work, json.dumps(doc).encode())
        else:
            top = put(work, mutate_doc(index, ops))
        layout = json.loads((work / "index.json").read_bytes())
        layout["manifests"][0].update(top)
        (work / "index.json").write_text(json.dumps(layout))
        try:
            with time_limit(HANG_SECONDS):
                read_like_index_info(f"oci:{work}:soci")
        except EstargzError as e:
            assert_one_line(e)

    check()
    assert count >= EXAMPLES
