"""podman (Debian's, containers/storage 1.43) pulls our zstd:chunked image
partially from a local registry and runs it.

(Needs root: podman's overlay storage.)

The storage is private (``--root``/``--runroot`` under tmp, a storage.conf
through ``CONTAINERS_STORAGE_CONF`` with ``enable_partial_images``). The
debug log must show the differ applied and every layer "Retrieved partial
blob" (a full download would not use the differ); the unpacked image must be
the tree ``umoci unpack`` makes of the original; ``podman run`` must read
files of every layer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli
from daemons import build_images, mounts_under
from services import registry  # noqa: F401  (fixture)
from test_treecompare import umoci_unpack
from treecompare import ESTARGZ_FILES, diff_trees, snapshot_tree

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="podman's overlay storage needs root here"),
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (scripts/install-test-deps.sh)"),
]


@dataclass
class Podman:
    root: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["podman", "--root", str(self.root / "graph"), "--runroot",
                            str(self.root / "run"), "--cgroup-manager=cgroupfs",
                            "--events-backend=file", *args],
                           env=self.env, capture_output=True, text=True, timeout=300)
        if check:
            assert p.returncode == 0, f"podman {' '.join(args)}: {p.stderr[-3000:]}"
        return p


@pytest.fixture
def podman() -> Iterator[Podman]:
    # podman refuses a runroot path longer than 50 characters: not tmp_path.
    root = Path(tempfile.mkdtemp(prefix="estargz-podman-", dir="/tmp"))
    conf = root / "storage.conf"
    conf.write_text(f"""[storage]
driver = "overlay"
runroot = "{root}/run"
graphroot = "{root}/graph"

[storage.options]
pull_options = {{enable_partial_images = "true", use_hard_links = "false", ostree_repos = ""}}
""")
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf),
           "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf")}
    (root / "registries.conf").write_text("")
    p = Podman(root, env)
    try:
        yield p
    finally:
        p("rm", "--all", "--force", check=False)
        p("image", "unmount", "--all", "--force", check=False)
        p("system", "reset", "--force", check=False)
        for m in reversed(mounts_under(root)):
            subprocess.run(["umount", "-l", m], check=False)
        left = mounts_under(root)
        shutil.rmtree(root, ignore_errors=True)
        assert not left


def test_podman_pulls_our_zstdchunked_image_partially_and_runs_it(podman, registry,  # noqa: F811
                                                                   tmp_path):
    lazy = build_images("lazy-kinds")["lazy-kinds"] / "oci"
    ref = f"{registry.host}/zstdchunked/lazy-kinds:zc"
    r = run_cli("convert", f"oci:{lazy}:latest", f"docker://{ref}", "--zstdchunked",
                "--dest-tls-verify=false", "--json")
    assert r.code == 0, r.err
    layers = [lay for lay in r.json()["layers"]]
    assert layers

    pull = podman("--log-level=debug", "pull", "--tls-verify=false", ref)
    log = pull.stderr
    (tmp_path / "pull.log").write_text(log)
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True, text=True, check=True).stdout)
    for layer in manifest["layers"]:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        assert "io.github.containers.zstd-chunked.manifest-checksum" in layer["annotations"]
        assert f"Retrieved partial blob {layer['digest']}" in log, log[-3000:]
    assert "Applying differ" in log

    # The unpacked image is the original tree (the landmark file aside, a
    # real tar entry that a partial pull writes too).
    mnt = Path(podman("image", "mount", ref).stdout.strip())
    try:
        got = snapshot_tree(mnt, skip=ESTARGZ_FILES)
    finally:
        podman("image", "unmount", ref)
    want = snapshot_tree(umoci_unpack(lazy, "latest", tmp_path / "orig"))
    # Contents, modes, owners, xattrs, links and hardlinks are the original's.
    # What differs is what containers/storage 1.43's differ does not do for
    # any zstd:chunked layer (fixed in later releases): it creates no device
    # nodes or FIFOs, and sets no times on directories (their children come
    # later) or symlinks. The TOC carries whole seconds, as the reference's.
    unexplained = []
    for line in diff_trees(got, want, mtime_tolerance_ns=10**9):
        path, _, what = line.partition(": ")
        if what.startswith("mtime ") and want[path].kind in ("dir", "symlink"):
            continue
        if what in ("only in b (char)", "only in b (block)", "only in b (fifo)"):
            continue
        unexplained.append(line)
    assert unexplained == [], "\n".join(unexplained[:40])
    assert got["data/replaced.txt"].uid == 1000 and got["data/modes/setuid"].mode == 0o4755
    assert got["data/big/random-9MiB.bin"].sha256 == want["data/big/random-9MiB.bin"].sha256
    assert got["data/times/one-second"].mtime_ns == 10**9

    # runc: crun 1.8 refuses this machine's hybrid cgroup layout.
    run = podman("--runtime", shutil.which("runc") or "runc", "run", "--rm", "--network=none",
                 "--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024", ref,
                 "cat", "/data/keep.txt", "/data/read/config.txt")
    assert "kept from layer 2" in run.stdout
