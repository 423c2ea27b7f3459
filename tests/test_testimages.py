"""The test images of testdata/images/build.py, and the daemon fixtures.

The images are checked for what later tests rely on (media types, layer
counts, the umoci diff layer's missing parents and its whiteout, the two
platforms and the attestations, the `docker save` archive), read back by
skopeo and umoci, and run: busybox under containerd (runc and crun) and under
dockerd.  The last test starts a second containerd and dockerd, leaves a
container running in each, kills dockerd, and checks that stopping them
leaves no mount, process or state directory behind.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from daemons import BUILD_IMAGES, Containerd, Dockerd, build_images, mounts_under, processes_under

_spec = importlib.util.spec_from_file_location("images_build", BUILD_IMAGES)
assert _spec is not None and _spec.loader is not None
images_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(images_build)

EPOCH = images_build.EPOCH
HOST = images_build.host_platform()
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


# --- reading layouts -------------------------------------------------------------

def blob(layout: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    data = (layout / "blobs" / algo / hexd).read_bytes()
    assert hashlib.new(algo, data).hexdigest() == hexd, f"blob {digest} does not match"
    return data


def tagged(layout: Path, tag: str = "latest") -> dict:
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    found = [d for d in index["manifests"]
             if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    assert len(found) == 1, f"tag {tag!r} in {layout}: {index}"
    return found[0]


def image(layout: Path, desc: dict) -> tuple[dict, dict]:
    """(manifest, config) of the image manifest ``desc``."""
    manifest = json.loads(blob(layout, desc["digest"]))
    assert len(blob(layout, desc["digest"])) == desc["size"]
    # umoci 0.4 leaves out the (optional) mediaType field of its manifests.
    assert manifest.get("mediaType", desc["mediaType"]) == desc["mediaType"]
    return manifest, json.loads(blob(layout, manifest["config"]["digest"]))


def layer_members(layout: Path, desc: dict) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob(layout, desc["digest"])), mode="r:gz") as tf:
        return {m.name: m for m in tf}


def skopeo(*args: str) -> str:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, check=True).stdout


def umoci_stat(layout: Path, tag: str = "latest") -> dict:
    out = subprocess.run(["umoci", "stat", "--json", "--image", f"{layout}:{tag}"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def tar_layout(layout: Path, out: Path) -> Path:
    """An OCI layout as an oci-archive tar, for `ctr images import`."""
    with tarfile.open(out, "w") as tf:
        for name in ("oci-layout", "index.json", "blobs"):
            tf.add(layout / name, arcname=name)
    return out


# --- the images --------------------------------------------------------------------

def test_busybox_layout(test_images):
    lay = test_images.busybox
    desc = tagged(lay)
    assert desc["mediaType"] == OCI_MANIFEST
    manifest, config = image(lay, desc)
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert [item["mediaType"] for item in manifest["layers"]] == [OCI_LAYER]
    assert config["architecture"] == HOST["architecture"] and config["os"] == "linux"
    assert config["config"]["Cmd"] == ["sh"]
    assert any(e.startswith("PATH=") and "/bin" in e for e in config["config"]["Env"])
    assert config["created"] == images_build.iso(EPOCH)

    layer = blob(lay, manifest["layers"][0]["digest"])
    raw = gzip.decompress(layer)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    members = layer_members(lay, manifest["layers"][0])
    bb = members["bin/busybox"]
    assert bb.isfile() and bb.mode == 0o755 and bb.size > 500_000
    for applet in ("bin/sh", "bin/ls", "bin/cat", "bin/echo", "usr/bin/env"):
        assert members[applet].issym() and members[applet].linkname == "/bin/busybox", applet
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert {m.mtime for m in members.values()} == {EPOCH}
    assert not any(n.startswith(("./", "/")) for n in members)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        elf = tf.extractfile("bin/busybox").read()
    assert images_build.is_static_elf(elf)

    # skopeo and umoci read it back.
    assert skopeo("inspect", "--raw", f"oci:{lay}:latest").encode() == blob(lay, desc["digest"])
    assert json.loads(skopeo("inspect", "--config", f"oci:{lay}:latest")) == config
    stat = umoci_stat(lay)
    assert len([h for h in stat["history"] if not h.get("empty_layer")]) == 1
    # The oci-archive is the same image.
    arch = test_images.busybox_oci_archive
    assert skopeo("inspect", "--raw", f"oci-archive:{arch}:latest").encode() == \
        blob(lay, desc["digest"])


def test_debian_multilayer(test_images, debian_layer_tar):
    lay = test_images.debian_multilayer
    desc = tagged(lay)
    manifest, config = image(lay, desc)
    assert "mediaType" not in manifest  # as umoci 0.4 writes it; optional in OCI
    assert [item["mediaType"] for item in manifest["layers"]] == [OCI_LAYER, OCI_LAYER]
    assert config["config"]["Cmd"] == ["bash"]
    assert len(config["rootfs"]["diff_ids"]) == 2
    # Layer 1 is the Debian rootfs tar, verbatim (umoci raw add-layer).
    h = hashlib.sha256()
    with open(debian_layer_tar, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert config["rootfs"]["diff_ids"][0] == "sha256:" + h.hexdigest()
    base = layer_members(lay, manifest["layers"][0])
    assert {"usr", "usr/local", "usr/local/bin", "etc/issue.net", "etc/motd"} <= set(base)

    # Layer 2 is umoci's diff: changed entries only, parents not repeated.
    diff = layer_members(lay, manifest["layers"][1])
    assert set(diff) == {"etc", "etc/.wh.issue.net", "etc/motd",
                         "usr/local/bin", "usr/local/bin/hello"}
    assert "usr" not in diff and "usr/local" not in diff
    assert diff["usr/local/bin/hello"].isfile() and diff["usr/local/bin/hello"].mode == 0o755
    assert diff["etc/.wh.issue.net"].isfile() and diff["etc/.wh.issue.net"].size == 0
    assert diff["etc/motd"].size != base["etc/motd"].size
    raw2 = gzip.decompress(blob(lay, manifest["layers"][1]["digest"]))
    assert config["rootfs"]["diff_ids"][1] == "sha256:" + hashlib.sha256(raw2).hexdigest()

    stat = umoci_stat(lay)
    assert [h.get("empty_layer", False) for h in stat["history"]] == [False, False, True]
    assert skopeo("inspect", "--raw", f"oci:{lay}:latest").encode() == blob(lay, desc["digest"])


def test_two_platform(test_images):
    lay = test_images.two_platform
    desc = tagged(lay, "latest")
    assert desc["mediaType"] == OCI_INDEX
    index = json.loads(blob(lay, desc["digest"]))
    assert index["mediaType"] == OCI_INDEX
    runnable = [m for m in index["manifests"] if m["platform"]["os"] != "unknown"]
    attestations = [m for m in index["manifests"] if m["platform"]["os"] == "unknown"]
    other = "arm64" if HOST["architecture"] != "arm64" else "amd64"
    assert sorted(m["platform"]["architecture"] for m in runnable) == \
        sorted([HOST["architecture"], other])
    for m in runnable:
        manifest, config = image(lay, m)
        assert config["architecture"] == m["platform"]["architecture"]
        assert config.get("variant") == m["platform"].get("variant")
        assert [item["mediaType"] for item in manifest["layers"]] == [OCI_LAYER]
    host_desc = next(m for m in runnable if m["platform"]["architecture"] == HOST["architecture"])
    assert host_desc["digest"] == tagged(test_images.busybox)["digest"]

    # One BuildKit-style attestation per platform.
    assert len(attestations) == 2
    for a in attestations:
        assert a["platform"] == {"architecture": "unknown", "os": "unknown"}
        assert a["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
        assert a["annotations"]["vnd.docker.reference.digest"] in {m["digest"] for m in runnable}
        manifest, config = image(lay, a)
        assert [item["mediaType"] for item in manifest["layers"]] == \
            ["application/vnd.in-toto+json"]
        statement = json.loads(blob(lay, manifest["layers"][0]["digest"]))
        assert statement["subject"][0]["digest"]["sha256"] == \
            a["annotations"]["vnd.docker.reference.digest"].split(":")[1]

    plain = json.loads(blob(lay, tagged(lay, "platforms-only")["digest"]))
    assert plain["manifests"] == runnable

    assert skopeo("inspect", "--raw", f"oci:{lay}:latest").encode() == blob(lay, desc["digest"])
    for arch in (HOST["architecture"], other):
        info = json.loads(skopeo("inspect", "--override-arch", arch, f"oci:{lay}:latest"))
        assert info["Architecture"] == arch


def test_docker_media_types(test_images):
    lay = test_images.docker_media_types
    desc = tagged(lay)
    assert desc["mediaType"] == DOCKER_MANIFEST
    manifest, config = image(lay, desc)
    assert manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert [item["mediaType"] for item in manifest["layers"]] == [DOCKER_LAYER]
    # Same config and layer bytes as the OCI busybox image.
    bb_manifest, bb_config = image(test_images.busybox, tagged(test_images.busybox))
    assert manifest["config"]["digest"] == bb_manifest["config"]["digest"]
    assert [item["digest"] for item in manifest["layers"]] == \
        [item["digest"] for item in bb_manifest["layers"]]
    # containers/image ignores index.json entries of Docker media types.
    p = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{lay}:latest"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "no descriptor found" in p.stderr

    # The `docker save` archive.
    with tarfile.open(test_images.docker_archive) as tf:
        files = {m.name: m for m in tf}
        (entry,) = json.loads(tf.extractfile("manifest.json").read())
        assert entry["RepoTags"] == ["docker.io/library/busybox:latest"]
        cfg_bytes = tf.extractfile(entry["Config"]).read()
        assert "sha256:" + hashlib.sha256(cfg_bytes).hexdigest() == bb_manifest["config"]["digest"]
        assert len(entry["Layers"]) == 1
        layer_tar = tf.extractfile(entry["Layers"][0]).read()  # uncompressed, like docker save
        assert ["sha256:" + hashlib.sha256(layer_tar).hexdigest()] == \
            bb_config["rootfs"]["diff_ids"]
        assert "repositories" in files
        assert {m.mtime for m in files.values()} == {EPOCH}
    raw = json.loads(skopeo("inspect", "--raw", f"docker-archive:{test_images.docker_archive}"))
    assert raw["mediaType"] == DOCKER_MANIFEST


def test_builds_are_cached_reproducible_and_atomic(test_images, tmp_path):
    """A second run reuses the cache; a fresh cache gives the same bytes;
    temporary directories of a killed build are cleaned up."""
    cache = tmp_path / "cache"
    stale = cache / "images" / ".busybox.tmp-killed"
    (stale / "oci").mkdir(parents=True)
    env = {"ESTARGZ_CACHE": str(cache)}
    names = ("busybox", "two-platform", "docker-media-types")
    fresh = build_images(*names, env=env)
    assert not stale.exists()
    assert sorted(p.name for p in (cache / "images").iterdir() if not p.name.endswith(".lock")) \
        == sorted(names)
    for name in names:
        for f in (test_images.dirs[name]).rglob("*"):
            if f.is_file() and f.name != "build-info.json":
                assert (fresh[name] / f.relative_to(test_images.dirs[name])).read_bytes() == \
                    f.read_bytes(), f"{name}: {f} differs"
    before = (fresh["busybox"] / "build-info.json").stat().st_mtime_ns
    p = subprocess.run([sys.executable, str(BUILD_IMAGES), "busybox"], capture_output=True,
                       text=True, env={**os.environ, **env}, check=True)
    assert p.stdout.strip().splitlines()[-1] == str(fresh["busybox"])
    assert "building" not in p.stderr
    assert (fresh["busybox"] / "build-info.json").stat().st_mtime_ns == before


@pytest.fixture(scope="session")
def debian_layer_tar(test_images) -> Path:
    """The Debian rootfs tar that debian-multilayer was built from."""
    info = (test_images.dirs["debian-multilayer"] / "build-info.json").read_text()
    return Path(json.loads(info)["inputs"]["base"])


# --- running them ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def busybox_in_containerd(containerd, test_images) -> str:
    ref = "docker.io/library/busybox"
    containerd.ctr("images", "import", "--base-name", ref, test_images.busybox_oci_archive)
    return ref + ":latest"


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_containerd_runs_busybox(containerd, busybox_in_containerd, runtime):
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} not installed")
    p = containerd.run(busybox_in_containerd, "echo", "hello", runtime=runtime, check=False)
    if runtime == "crun" and "cgroups in hybrid mode not supported" in p.stderr:
        # crun (1.8) refuses a cgroup v1 host whose v2 hierarchy has controllers.
        pytest.skip("crun: " + p.stderr.strip().splitlines()[-1])
    assert (p.returncode, p.stdout) == (0, "hello\n"), p.stderr
    p = containerd.run(busybox_in_containerd, "sh", "-c", "uname -m; cat /etc/passwd | head -1",
                       runtime=runtime)
    assert p.stdout.splitlines() == [os.uname().machine, "root:x:0:0:root:/root:/bin/sh"]


def test_containerd_imports_docker_media_types_and_index(containerd, test_images, tmp_path):
    """containerd reads what skopeo cannot (Docker types in an OCI layout),
    and picks the host's manifest from the two-platform index."""
    for name, layout in (("docker-types", test_images.docker_media_types),
                         ("two-platform", test_images.two_platform)):
        ref = f"docker.io/estargz/{name}"
        archive = tar_layout(layout, tmp_path / f"{name}.tar")
        containerd.ctr("images", "import", "--base-name", ref, archive)
        target = tagged(layout)
        listed = containerd.ctr("images", "ls").stdout
        line = next(item for item in listed.splitlines() if item.startswith(ref + ":latest "))
        assert target["mediaType"] in line and target["digest"] in line
        assert containerd.run(ref + ":latest", "echo", "hello").stdout == "hello\n"
    # All platforms, attestations included, import as content.
    ns = "estargz-test-all-platforms"
    containerd.ctr("images", "import", "--all-platforms", "--no-unpack", "--base-name",
                   "docker.io/estargz/all", tmp_path / "two-platform.tar", namespace=ns)
    index = json.loads(blob(test_images.two_platform, tagged(test_images.two_platform)["digest"]))
    content = containerd.ctr("content", "ls", "-q", namespace=ns).stdout.split()
    assert {m["digest"] for m in index["manifests"]} <= set(content)


def test_containerd_imports_docker_archive(containerd, test_images):
    ns = "estargz-test-docker-archive"
    containerd.ctr("images", "import", test_images.docker_archive, namespace=ns)
    listed = containerd.ctr("images", "ls", "-q", namespace=ns).stdout.split()
    assert "docker.io/library/busybox:latest" in listed


def test_dockerd_runs_busybox(dockerd, test_images):
    p = dockerd.docker("load", "-i", test_images.docker_archive)
    assert "busybox:latest" in p.stdout
    bb_manifest, _ = image(test_images.busybox, tagged(test_images.busybox))
    image_id = dockerd.docker("image", "inspect", "-f", "{{.Id}}", "busybox:latest").stdout.strip()
    assert image_id == bb_manifest["config"]["digest"]
    p = dockerd.docker("run", "--rm", "--network", "none", "busybox:latest", "echo", "hi")
    assert p.stdout == "hi\n"
    info = json.loads(dockerd.docker("info", "--format", "{{json .}}").stdout)
    assert info["Driver"] == "overlay2"
    assert info["DockerRootDir"] == str(dockerd.data_root)


def test_daemons_are_private(containerd, dockerd):
    """Unix sockets under the tmp dirs only; nothing on TCP."""
    assert os.path.exists(containerd.address) and os.path.exists(dockerd.socket)
    for pid in (containerd.proc.pid, dockerd.proc.pid):
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed since the listing
                inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        inodes = {i[len("socket:["):-1] for i in inodes if i.startswith("socket:[")}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                rows = [item.split() for item in f.readlines()[1:]]
            listening = [r for r in rows if r[3] == "0A" and r[9] in inodes]
            assert not listening, f"pid {pid} listens on TCP: {listening}"


def _shim_socket(containerd: Containerd, namespace: str, container: str) -> Path:
    """Where containerd 1.6's runc shim listens for ``container``: named by
    the daemon's address, the namespace and the id (runtime/v2/shim
    ``SocketAddress``), so that other daemons on the machine do not count."""
    key = hashlib.sha256(os.path.join(containerd.address, namespace, container).encode())
    return Path("/run/containerd/s", key.hexdigest())


@pytest.mark.parametrize("crash", ["dockerd", "both"])
def test_daemons_leave_nothing_behind(test_images, tmp_path, host_dirs, crash):
    """Stop with a container still running in each daemon after a crash
    (SIGKILL) of dockerd, or of both: the clean-up leaves no mount, no
    process, no shim socket and no state directory."""
    c = Containerd(tmp_path / "c")
    d = None
    try:
        c.start()
        c.ctr("images", "import", "--base-name", "docker.io/library/busybox",
              test_images.busybox_oci_archive)
        c.ctr("run", "-d", "--snapshotter", "overlayfs", "--runc-root", c.runc_root / "runc",
              "--fifo-dir", c.fifo_dir, "docker.io/library/busybox:latest", "sleeper",
              "sleep", "600")
        d = Dockerd(tmp_path / "d", c).start()
        d.docker("load", "-i", test_images.docker_archive)
        docker_id = d.docker("run", "-d", "--network", "none", "busybox:latest", "sleep",
                             "600").stdout.strip()
        shims = [_shim_socket(c, c.namespace, "sleeper"), _shim_socket(c, "moby", docker_id)]
        assert all(s.exists() for s in shims), shims  # the names are computed right
        assert mounts_under(c.base) and mounts_under(d.base)
        sleepers = [p for p in processes_under(c.base) if p[1] == "sleep 600"]
        assert len(sleepers) == 2

        for daemon in ([d] if crash == "dockerd" else [d, c]):
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
        assert mounts_under(d.base)
        forced = d.stop()
        assert forced["unmounted"], "the dead dockerd's mounts were not cleaned up"
        forced = c.stop()
        if crash == "both":  # nobody left to ask: shims and containers are killed
            killed = {pid for pid, _ in forced["killed"]}
            assert {pid for pid, _ in sleepers} <= killed
            assert any("containerd-shim" in cmd for _, cmd in forced["killed"])
        else:  # containerd removed the tasks of both namespaces itself
            assert forced["killed"] == []
    finally:
        for daemon in (d, c):
            if daemon is not None:
                daemon.stop()
    assert mounts_under(tmp_path) == []
    assert processes_under(tmp_path) == []
    assert [s for s in shims if s.exists()] == []
    for daemon in (c, d):
        assert daemon.proc.poll() is not None
        for state in daemon.state_dirs:
            assert not state.exists(), state
        assert daemon.log.exists()
