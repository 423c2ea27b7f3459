"""Concurrent writers (issue 11, point 1): eight ``estargz convert``
processes at once into one OCI layout, one oci-archive or one registry
repository, over several rounds, lose no tag, no blob and no index entry.

Each writer converts busybox at its own compression level, so writers store
different layer blobs (and the same config); two of each round's eight write
the same tag. Two rounds (``ESTARGZ_STRESS_ROUNDS``) into a layout (the first
creates it) and into an archive, one into a registry plus one that mounts
blobs between repositories. After
each round every expected tag resolves (through our reader and skopeo),
every blob it references has its digest and size, every eStargz layer
verifies against its TOC digest, and nothing temporary is left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from estargz.transports.oci import LOCK_FILE
from layoutcheck import (
    check_layout,
    check_registry,
    estargz_cmd,
    index_tags,
    leftovers,
    run_all,
    unpack_archive,
)

WRITERS = 8
#: Rounds into a layout and into an archive; more for a longer stress run.
ROUNDS = int(os.environ.get("ESTARGZ_STRESS_ROUNDS", "2"))


def round_tags(r: int) -> list[str]:
    """Six tags of their own and one shared by the last two writers."""
    return [f"r{r}w{i}" for i in range(WRITERS - 2)] + [f"r{r}same"] * 2


def writers(src: str, dst: str, tags: list[str], *extra: str) -> list[list[str]]:
    return [estargz_cmd("convert", "-q", src, f"{dst}:{tag}", "--compression-level",
                        str(1 + i % 9), *extra)
            for i, tag in enumerate(tags)]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp)}


def test_eight_writers_into_one_oci_layout(tmp_path, test_images, env):
    # Round 0 creates the layout (all eight find no directory there);
    # the later rounds add to it.
    out = tmp_path / "out" / "layout"
    src = f"oci:{test_images.busybox}:latest"
    expected: set[str] = set()
    for r in range(ROUNDS):
        tags = round_tags(r)
        seconds = run_all(writers(src, f"oci:{out}", tags), env)
        expected |= set(tags)
        check_layout(out, expected, skopeo=r == ROUNDS - 1)  # skopeo once: it is slow
        print(f"round {r}: {WRITERS} writers in {seconds:.1f} s")
    assert sorted(os.listdir(out)) == ["blobs", "index.json", LOCK_FILE, "oci-layout"]
    assert all(len(name) == 64 for name in os.listdir(out / "blobs" / "sha256"))
    assert leftovers(tmp_path) == []


def test_eight_writers_into_one_oci_archive(tmp_path, test_images, env):
    archive = tmp_path / "out" / "image.tar"
    archive.parent.mkdir()
    src = f"oci:{test_images.busybox}:latest"
    expected: set[str] = set()
    for r in range(ROUNDS):
        tags = round_tags(r)
        seconds = run_all(writers(src, f"oci-archive:{archive}", tags), env)
        expected |= set(tags)
        layout = unpack_archive(archive, tmp_path / f"unpacked{r}")
        check_layout(layout, expected, skopeo=r == ROUNDS - 1)
        print(f"round {r}: {WRITERS} writers in {seconds:.1f} s")
    # The lock file sits beside the archive (the archive is replaced by rename).
    assert sorted(os.listdir(archive.parent)) == ["image.tar", "image.tar.lock"]
    assert leftovers(tmp_path) == []


def test_eight_writers_into_one_registry_repository(tmp_path, test_images, registry, env):
    # Tags are separate PUTs; the config blob is pushed by all eight at once,
    # and the converted manifests are read back whole. One round: a tag is
    # one PUT, so later rounds would only repeat the first.
    src = f"oci:{test_images.busybox}:latest"
    expected: set[str] = set()
    for r in range(1):
        tags = round_tags(r)
        seconds = run_all(writers(src, f"docker://{registry.host}/concurrent", tags,
                                  "--dest-tls-verify=false"), env)
        expected |= set(tags)
        check_registry(registry.host, "concurrent", expected)
        print(f"round {r}: {WRITERS} writers in {seconds:.1f} s")
    # Registry to registry with --reuse: the eStargz layers are mounted from
    # the source repository, by eight writers at once (two per layer).
    mounted = [f"m{i}" for i in range(WRITERS)]
    run_all([estargz_cmd("convert", "-q", "--reuse", "--src-tls-verify=false",
                         "--dest-tls-verify=false",
                         f"docker://{registry.host}/concurrent:{round_tags(0)[i % 4]}",
                         f"docker://{registry.host}/mounted:{tag}")
             for i, tag in enumerate(mounted)], env)
    check_registry(registry.host, "mounted", set(mounted))
    log = registry.log.read_text(errors="replace")
    assert re.search(r"/v2/mounted/blobs/uploads/\?from=concurrent&mount=sha256", log) or \
        re.search(r"/v2/mounted/blobs/uploads/\?mount=sha256[^ ]*from=concurrent", log), \
        "no blob was mounted"
    assert leftovers(tmp_path) == []


def test_writers_of_an_existing_archive_keep_its_tags(tmp_path, test_images, env):
    """An archive written by someone else (skopeo's, here the test image's)
    keeps its tags when we add ours."""
    archive = tmp_path / "image.tar"
    archive.write_bytes(test_images.busybox_oci_archive.read_bytes())
    before = json.loads(
        (unpack_archive(archive, tmp_path / "before") / "index.json").read_bytes())
    src = f"oci:{test_images.busybox}:latest"
    run_all(writers(src, f"oci-archive:{archive}", ["a", "b"]), env)
    layout = unpack_archive(archive, tmp_path / "after")
    index = json.loads((layout / "index.json").read_bytes())
    assert index_tags(index) == sorted(index_tags(before) + ["a", "b"])
    assert index["manifests"][0] == before["manifests"][0]


def test_a_lock_file_this_writer_cannot_write(tmp_path, test_images, env):
    """A layout on a volume two users write (CI): the second finds the first's
    index.json.lock read-only to it, and must lock it all the same (flock
    needs no write access). An immutable lock file refuses writing to root
    too, which stands in for the other user's here."""
    src = f"oci:{test_images.busybox}:latest"
    layout = tmp_path / "layout"
    run_all([estargz_cmd("convert", "-q", src, f"oci:{layout}:first")], env)
    (layout / LOCK_FILE).touch()
    if subprocess.run(["chattr", "+i", layout / LOCK_FILE], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        run_all([estargz_cmd("convert", "-q", src, f"oci:{layout}:second")], env)
    finally:
        subprocess.run(["chattr", "-i", layout / LOCK_FILE], check=True)
    check_layout(layout, {"first", "second"}, skopeo=False)
