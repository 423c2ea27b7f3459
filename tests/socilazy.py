"""Lazy loading with the real SOCI Snapshotter: the daemons and the client steps.

Importable by tests and by benchmarks (put ``tests/`` on ``sys.path``); the
pytest fixtures are at the bottom.  Needs root, /dev/fuse, runc (apt) and
what ``scripts/build-go.sh`` builds through the Go module proxy: from
soci-snapshotter v0.16.1 ``soci`` (the CLI), ``soci-snapshotter``
(soci-snapshotter-grpc) and ``soci-rpull`` (our puller, see below), and
``containerd-v2`` (containerd 2 with its ``ctr`` and runc shim).  Debian's containerd 1.6
cannot host the snapshotter: it does not pass the namespace on to a proxy
snapshotter, and soci refuses to prepare a snapshot without one ("context
has no namespace attached").  The ``soci`` CLI itself works against 1.6
(the tests index images in the session's Debian containerd).

What the SOCI Snapshotter needs from a pull
-------------------------------------------
A remote snapshotter sees only the labels the client sets on each layer's
``Prepare``.  soci reads ``containerd.io/snapshot/cri.image-ref``,
``cri.manifest-digest`` and ``cri.layer-digest`` (containerd's
``pkg/snapshotters.AppendInfoHandlerWrapper``, which CRI and nerdctl use;
``ctr`` and Debian's ``ctr-remote`` set none of them) and, optionally,
``containerd.io/snapshot/remote/soci.index.digest``.  soci v0.10 removed
its own ``soci image rpull``; ``soci-rpull`` (tests/lazypull/soci-v016/rpull)
is that puller again: containerd's Go client with both label wrappers.
Without an index digest the snapshotter finds the index itself: SOCI v2
(default) from the ``com.amazon.soci.index-digest`` annotation of the image
manifest it fetches by ``cri.manifest-digest``; SOCI v1 (off unless
``SociConfig(soci_v1=True)``) from the referrers of that manifest (the
referrers API, else the ``sha256-HEX`` tag of the fallback schema).

API
---

``SociBinaries.build()``: the four binaries of :data:`TARGETS`, by
:func:`gobuild.build_go` (cached under ``${ESTARGZ_CACHE:-~/.cache/estargz-dev}/bin``).

``SociConfig(background_fetch=False, soci_v1=False, prefetch=False,
extra="")``: the daemon's config.toml.  Background fetch is off by default
so that every registry request after the mount is an on-demand span fetch
a test (or benchmark) can attribute.

``SociSnapshotter(base, config=..., binary=None)``: a
:class:`daemons.Daemon` (``start()``, ``stop()``: no mount or process left;
soci keeps its FUSE mounts when it gets SIGTERM, to take them up again on
restart, so ``stop()`` always unmounts some by force) with its own
``root``, ``address`` and JSON ``log`` below ``base``.
``fuse_mounts()``; ``log_records()``; ``prepared_remote_snapshots()``
(``{snapshot key: True|False}``: mounted lazily, or left to containerd to
pull whole), ``remote_snapshot_errors()``, ``index_lookups()`` (how the
index was found).

``Containerd2(base, binary, extra_config="")``: :class:`daemons.Containerd`
with the containerd 2 binaries (NRI off, our shim first on its PATH).

``SociLazyPuller(base, config=..., binaries=None)``: a snapshotter plus a
containerd 2 with ``[proxy_plugins.soci]``, both on fresh state below
``base`` (a cold start).  ``start()``/``stop()`` or a context manager;
``.snapshotter``, ``.containerd``.  ``rpull(ref, index_digest=None)``:
lazy pull (plain HTTP) with ``soci-rpull``; ``run(ref, *cmd)``: ``ctr run
--rm`` on the soci snapshotter; ``mounted(ref)``: the image's root
filesystem read-only (overlayfs over the FUSE layers, as a container sees
it), see :func:`lazypull.mounted_image`.

``Soci(containerd, root)``: the ``soci`` CLI against a containerd, its
artifact database and content store in ``root``: ``soci(*args)``,
``convert(src, dst)`` (v2: a new image index in containerd holding the
image manifest, annotated with its index, and the SOCI index manifest),
``create(ref)`` + ``push(ref)`` (v1: the index with ``subject``, pushed with
oras, which falls back to the tag schema), ``index_info(digest)``,
``ztoc_info(digest)``, ``index_list()``.

``platform_manifest(containerd, ref) -> str``: the digest of the host
platform's image manifest of ``ref`` (itself when it is a manifest).

Benchmarks
----------
``lazy_start(base, ref, *cmd, proxy_host=None, config=SociConfig(),
index_digest=None) -> LazyStart``: a cold snapshotter and containerd below
``base``, ``rpull`` ``ref`` (from ``proxy_host`` if given, e.g. a
:class:`services.FaultProxy` counting bytes), ``ctr run`` ``cmd``, stop
everything; returns the pull and run times (seconds), stdout and the
FUSE mount count (bytes: count them in the proxy's log, e.g.
``FaultProxy.requests("GET", "/blobs/")``).  Needs root; raises
``AssertionError`` when a step fails.  containerd 2 leaves empty directories
in /run/containerd (shim sockets): wrap runs in a :class:`daemons.HostDirs`
and ``cleanup()`` it, as the ``host_dirs`` fixture does.

Fixtures: ``soci_binaries`` (session: :class:`SociBinaries`), ``make_soci_puller``
(function: ``make(config=SociConfig()) -> SociLazyPuller`` started, stopped
after the test), ``soci_puller`` (a default one).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons import CMD_TIMEOUT, Containerd, Daemon, _env, _set_pdeathsig
from gobuild import build_go
from lazypull import (
    DaemonPair,
    ProxySnapshotter,
    _require_fuse,
    mounted_image,
    proxy_plugin_config,
)

REPO = Path(__file__).resolve().parent.parent
#: The proxy plugin's name in containerd's config (soci's documented name).
SNAPSHOTTER = "soci"
#: The scripts/build-go.sh targets of :class:`SociBinaries`, in its order.
TARGETS = ("soci", "soci-snapshotter", "soci-rpull", "containerd-v2")
#: soci's default: layers smaller than this get no zTOC (10 MiB).
MIN_LAYER_SIZE = 10 << 20
SOCI_INDEX_ANNOTATION = "com.amazon.soci.index-digest"
SOCI_INDEX_ARTIFACT_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_INDEX_ARTIFACT_V2 = "application/vnd.amazon.soci.index.v2+json"
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class SociBinaries:
    """Paths of the binaries of :data:`TARGETS`."""

    soci: Path
    snapshotter: Path
    rpull: Path
    #: containerd 2; ``ctr`` and ``containerd-shim-runc-v2`` beside it.
    containerd: Path

    @classmethod
    def build(cls) -> SociBinaries:
        return cls(*(build_go(t) for t in TARGETS))


@dataclass(frozen=True)
class SociConfig:
    """The SOCI Snapshotter's config.toml (keys of soci's config package)."""

    #: Fetch whole layers in the background after mounting (the daemon's
    #: default); off here so registry requests are on-demand span fetches.
    background_fetch: bool = False
    #: Look indexes up through the referrers of the image manifest (SOCI
    #: index manifest v1); off by default since v0.10.
    soci_v1: bool = False
    #: Fetch the prefetch artifacts' spans of a layer before its mount is
    #: ready (``[prefetch] enable``; off by default, as in soci).
    prefetch: bool = False
    #: Further TOML, appended as is (after the tables: start it with one).
    extra: str = ""

    def toml(self, containerd_address: str = "") -> str:
        """The file's text; ``containerd_address``: the containerd whose
        content store soci reads when it prepares a layer without a zTOC
        itself (default /run/containerd/containerd.sock)."""
        store = ["[content_store]", f"  containerd_address = {json.dumps(containerd_address)}"]
        return "\n".join([
            # Metrics would need a TCP listener; we only read the log.
            "no_prometheus = true",
            *(store if containerd_address else []),
            "[background_fetch]",
            f"  disable = {str(not self.background_fetch).lower()}",
            "[pull_modes.soci_v1]",
            f"  enable = {str(self.soci_v1).lower()}",
            "[pull_modes.soci_v2]",
            "  enable = true",
            "[prefetch]",
            f"  enable = {str(self.prefetch).lower()}",
            self.extra, ""])


class SociSnapshotter(ProxySnapshotter):
    """soci-snapshotter-grpc on a private root and socket; see the module docstring."""

    name = "soci-snapshotter"

    def __init__(self, base: Path, config: SociConfig = SociConfig(),
                 binary: Path | None = None, log_level: str = "debug"):
        super().__init__(base, Path(binary) if binary else build_go("soci-snapshotter"),
                         "soci.sock", log_level)
        self.settings = config
        #: The containerd using this snapshotter (its socket), if not the
        #: host's: soci asks it for the image manifest when it prepares a
        #: layer that has no zTOC (smaller than the index's min layer size),
        #: and waits 10 s for the host's socket otherwise.
        self.containerd_address = ""

    def config_toml(self) -> str:
        return self.settings.toml(self.containerd_address)

    def prepared_remote_snapshots(self) -> dict[str, bool]:
        """Snapshot key -> True when the layer was mounted lazily (FUSE over
        its zTOC), False when soci left it to containerd to fetch and unpack
        whole (no index, no zTOC for it, or an error: see
        :meth:`remote_snapshot_errors`)."""
        out = {}
        for r in self.log_records():
            if "remote-snapshot-prepared" in r and "key" in r:
                out[r["key"]] = r["remote-snapshot-prepared"] == "true"
        return out

    def remote_snapshot_errors(self) -> list[str]:
        """Why preparing remote snapshots failed (the ``error`` fields)."""
        return [r.get("error", "") for r in self.log_records()
                if r.get("remote-snapshot-prepared") == "false"]

    def index_lookups(self) -> list[str]:
        """How the SOCI index was found, in order: the debug lines of
        ``fs.getIndexDescriptor`` (e.g. ``using soci v2 index annotation``)."""
        return [r["msg"] for r in self.log_records()
                if r.get("msg", "").startswith(("using soci", "using provided soci",
                                                 "index digest", "soci v",
                                                 "checking for soci"))]


class Containerd2(Containerd):
    """containerd 2 (``scripts/build-go.sh containerd-v2``) on a private
    socket, with its own ``ctr`` and runc shim: a :class:`daemons.Containerd`
    but for the binaries.  The SOCI Snapshotter needs it: containerd 1.6
    does not pass the namespace on to a proxy snapshotter, and soci refuses
    to prepare a snapshot without one ("context has no namespace
    attached")."""

    name = "containerd2"

    def __init__(self, base: Path, binary: Path, extra_config: str = ""):
        # NRI (on by default in containerd 2) would listen on /var/run/nri.
        super().__init__(base, extra_config="\n".join([
            extra_config, '[plugins."io.containerd.nri.v1.nri"]', "  disable = true"]))
        self.binary = str(binary)
        self.ctr_binary = str(Path(binary).with_name("ctr"))
        self.bin_dir = str(Path(binary).parent)

    def _spawn(self, argv: list[str]) -> None:
        # The shim is looked up on PATH before next to containerd: ours
        # first, not Debian's 1.6 one.
        path = self.bin_dir + os.pathsep + os.environ.get("PATH", os.defpath)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=_env(PATH=path),
                                         start_new_session=True, preexec_fn=_set_pdeathsig)


class SociLazyPuller(DaemonPair):
    """A SOCI Snapshotter and a containerd using it as proxy snapshotter
    ``soci``, on fresh state below ``base``; see the module docstring."""

    def __init__(self, base: Path, config: SociConfig = SociConfig(),
                 binaries: SociBinaries | None = None):
        base = Path(base)
        self.base = base
        self.binaries = binaries or SociBinaries.build()
        self.snapshotter = SociSnapshotter(base / "sn", config, self.binaries.snapshotter)
        self.containerd = Containerd2(
            base / "ctd", self.binaries.containerd,
            extra_config=proxy_plugin_config(self.snapshotter.address, SNAPSHOTTER))
        self.snapshotter.containerd_address = self.containerd.address
        self.mounts_dir = base / "mnt"

    def parts(self) -> tuple[Path, Daemon, Daemon]:
        return self.mounts_dir, self.containerd, self.snapshotter

    def start(self) -> SociLazyPuller:
        self.snapshotter.start()
        try:
            self.containerd.start()
        except BaseException:
            self.snapshotter.stop()
            raise
        return self

    def rpull(self, ref: str, *, index_digest: str | None = None, check: bool = True,
              timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
        """Lazily pull ``ref`` (plain HTTP) with the soci snapshotter;
        ``index_digest`` names the SOCI index (else the snapshotter looks
        it up).  stdout: the image's target digest."""
        c = self.containerd
        argv = [str(self.binaries.rpull), "--address", c.address, "--namespace", c.namespace,
                "--snapshotter", SNAPSHOTTER, "--plain-http"]
        if index_digest:
            argv += ["--soci-index-digest", index_digest]
        argv.append(ref)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr}\n"
                                 f"--- snapshotter log ---\n{self.snapshotter.log_tail()}")
        return p

    def run(self, ref: str, *cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT
            ) -> subprocess.CompletedProcess:
        """Run a throw-away container of ``ref`` on the soci snapshotter."""
        return self.containerd.run(ref, *cmd, snapshotter=SNAPSHOTTER, check=check,
                                   timeout=timeout)

    def mounted(self, ref: str, name: str = "rootfs") -> contextlib.AbstractContextManager[Path]:
        """``ref``'s root filesystem read-only at ``name`` below the puller's
        base; an image index (a SOCI-enabled image) is first pulled again
        by the digest of its platform manifest, which
        :func:`lazypull.mounted_image` needs (the layers are already there)."""
        target = platform_manifest(self.containerd, ref)
        by_digest = ref if "@" in ref else f"{ref.rpartition(':')[0]}@{target}"
        if by_digest != ref:
            self.rpull(by_digest)
        return mounted_image(self.containerd, by_digest, self.mounts_dir / name, SNAPSHOTTER)


def image_target(containerd: Containerd, ref: str) -> str:
    """The digest ``ref`` points at in ``containerd``'s image store."""
    rows = [line.split() for line in containerd.ctr("images", "ls").stdout.splitlines()[1:]]
    digests = [row[2] for row in rows if row and row[0] == ref]
    if not digests:
        raise AssertionError(f"image {ref} is not in containerd")
    return digests[0]


def platform_manifest(containerd: Containerd, ref: str) -> str:
    """The image manifest of ``ref`` for the host (linux/amd64 etc.):
    ``ref``'s own digest when it is a manifest, else the index entry with a
    matching platform that is not a SOCI index."""
    digest = image_target(containerd, ref)
    doc = json.loads(containerd.ctr("content", "get", digest).stdout)
    if doc.get("mediaType") not in _INDEX_TYPES and "manifests" not in doc:
        return digest
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    for m in doc["manifests"]:
        p = m.get("platform") or {}
        if (m.get("artifactType") not in (SOCI_INDEX_ARTIFACT_V1, SOCI_INDEX_ARTIFACT_V2)
                and p.get("os") == "linux" and p.get("architecture") == arch):
            return m["digest"]
    raise AssertionError(f"{ref}: no linux/{arch} image manifest in {doc}")


class Soci:
    """The ``soci`` CLI against ``containerd``; artifact database and
    content store below ``root``."""

    def __init__(self, containerd: Containerd, root: Path, binary: Path | None = None):
        self.containerd = containerd
        self.root = Path(root)
        self.binary = Path(binary) if binary else build_go("soci")

    def soci(self, *args: str, content_store: str = "containerd", check: bool = True,
             timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
        """``soci --address SOCK --namespace NS --root ROOT --content-store
        STORE ARGS``; text output.  The containerd content store (not soci's
        own) so that ``ctr images push`` finds the zTOCs of a converted image."""
        self.root.mkdir(parents=True, exist_ok=True)
        c = self.containerd
        argv = [str(self.binary), "--address", c.address, "--namespace", c.namespace,
                "--root", str(self.root), "--content-store", content_store, *map(str, args)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout}\n"
                                 f"{p.stderr}")
        return p

    def convert(self, src: str, dst: str, *args: str) -> subprocess.CompletedProcess:
        """``soci convert SRC DST`` (SOCI index manifest v2) of an image in containerd."""
        return self.soci("convert", *args, src, dst)

    def create(self, ref: str, *args: str) -> subprocess.CompletedProcess:
        """``soci create REF`` (SOCI index manifest v1) of an image in containerd."""
        return self.soci("create", *args, ref)

    def push(self, ref: str, *args: str) -> subprocess.CompletedProcess:
        """``soci push --plain-http REF``: the newest v1 index of ``ref``."""
        return self.soci("push", "--plain-http", *args, ref)

    def index_list(self) -> list[dict]:
        """``soci index list`` rows as dicts of its column titles."""
        lines = [line for line in self.soci("index", "list").stdout.splitlines() if line.strip()]
        if not lines:
            return []
        # Titles hold single spaces ("IMAGE REF"); columns are 2+ apart.
        starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", lines[0])]
        spans = list(zip(starts, [*starts[1:], None], strict=True))
        titles = [lines[0][a:b].strip() for a, b in spans]
        return [{t: line[a:b].strip() for t, (a, b) in zip(titles, spans, strict=True)}
                for line in lines[1:]]

    def index_info(self, digest: str) -> dict:
        """``soci index info DIGEST``: the SOCI index manifest."""
        return json.loads(self.soci("index", "info", digest).stdout)

    def ztoc_info(self, digest: str) -> dict:
        """``soci ztoc info DIGEST``: the zTOC's summary and file table."""
        return json.loads(self.soci("ztoc", "info", digest).stdout)


# --- benchmarks -----------------------------------------------------------------------

@dataclass(frozen=True)
class LazyStart:
    """What :func:`lazy_start` measured."""

    pull_seconds: float
    run_seconds: float
    stdout: str
    fuse_mounts: int


def lazy_start(base: Path, ref: str, *cmd: str, proxy_host: str | None = None,
               config: SociConfig = SociConfig(), index_digest: str | None = None,
               binaries: SociBinaries | None = None) -> LazyStart:
    """Cold start of ``ref`` (``HOST/REPO:TAG``) with the SOCI Snapshotter:
    fresh daemons below ``base``, lazy pull (through ``proxy_host`` instead
    of HOST if given), ``ctr run --rm`` of ``cmd``, then stop everything."""
    if proxy_host:
        ref = proxy_host + "/" + ref.split("/", 1)[1]
    with SociLazyPuller(base, config, binaries) as puller:
        t0 = time.monotonic()
        puller.rpull(ref, index_digest=index_digest)
        t1 = time.monotonic()
        mounts = len(puller.snapshotter.fuse_mounts())
        out = puller.run(ref, *cmd).stdout
        t2 = time.monotonic()
    return LazyStart(t1 - t0, t2 - t1, out, mounts)


# --- fixtures (pytest only) --------------------------------------------------------

@pytest.fixture(scope="session")
def soci_binaries() -> SociBinaries:
    """soci, soci-snapshotter-grpc, soci-rpull and containerd 2, built once."""
    _require_fuse()
    try:
        return SociBinaries.build()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture
def make_soci_puller(tmp_path_factory, soci_binaries: SociBinaries, host_dirs) -> Iterator:
    """A function ``(config=SociConfig()) -> SociLazyPuller`` starting a
    cold snapshotter + containerd; all are stopped after the test."""
    pullers: list[SociLazyPuller] = []

    def make(config: SociConfig = SociConfig()) -> SociLazyPuller:
        puller = SociLazyPuller(tmp_path_factory.mktemp("soci"), config, soci_binaries)
        pullers.append(puller.start())
        return puller

    try:
        yield make
    finally:
        for puller in pullers:
            puller.stop()


@pytest.fixture
def soci_puller(make_soci_puller) -> SociLazyPuller:
    """A cold SOCI Snapshotter + containerd (default config) for one test."""
    return make_soci_puller()
