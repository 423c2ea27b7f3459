"""A layer the SOCI index leaves out, loaded by the real SOCI Snapshotter.

soci indexes only layers of at least ``--min-layer-size`` (10 MiB by
default); a smaller layer has no zTOC, and the snapshotter prepares it
itself ("local snapshot": it reads the image manifest from containerd's
content store and unpacks the layer).  For that it dials containerd, at
``/run/containerd/containerd.sock`` unless its config says otherwise, so a
test or benchmark containerd on a private socket must be named in the
snapshotter's config (``tests/socilazy.py`` does).  Otherwise soci waits
10 s for the host's socket on every such layer and then leaves the layer to
containerd, which made the start-up benchmark's nginx image 10 s slower.
"""

from __future__ import annotations

import json

from conftest import run_cli
from daemons import build_images
from services import RegistryDaemon

# soci_puller comes from the socilazy plugin that conftest.py registers.
from socilazy import SociLazyPuller

REPO_NAME = "soci-small-layers"


def test_a_layer_without_ztoc_is_unpacked_through_the_pullers_own_containerd(
        soci_puller: SociLazyPuller, registry: RegistryDaemon):
    """debian-python3 indexed with a 20 MiB minimum: the 49 MiB base layer
    is mounted lazily, the 15 MiB python layer gets no zTOC and is prepared
    as a local snapshot through the puller's containerd, with no attempt to
    reach the host's; the workload runs on both."""
    source = build_images("debian-python3")["debian-python3"] / "oci"
    ref = f"{registry.host}/{REPO_NAME}:v2"
    r = run_cli("soci", "create", "--min-layer-size", str(20 << 20), "--json",
                "--dest-tls-verify", "false", f"oci:{source}:latest", f"docker://{ref}")
    assert r.code == 0, r.err
    (index,) = json.loads(r.out)["indexes"]
    built = [layer for layer in index["layers"] if layer["ztoc"]]
    assert len(built) == 1 and len(index["layers"]) == 2, index["layers"]

    sn = soci_puller.snapshotter
    soci_puller.rpull(ref)
    prepared = sn.prepared_remote_snapshots()
    assert sorted(prepared.values()) == [False, True], (prepared, sn.remote_snapshot_errors())
    records = sn.log_records()
    assert any(rec.get("msg") == "local snapshot successfully prepared" for rec in records), \
        sn.log_tail()
    dialed_host = [rec["error"] for rec in records if "containerd.sock" in rec.get("error", "")
                   and sn.containerd_address not in rec["error"]]
    assert not dialed_host, dialed_host
    assert len(sn.fuse_mounts()) == 1, sn.fuse_mounts()

    result = soci_puller.run(ref, "python3", "-c", "import json; print('small layers ok')")
    assert "small layers ok" in result.stdout, (result.stdout, result.stderr)
