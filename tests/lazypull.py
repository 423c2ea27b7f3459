"""Lazy pulling with a real Stargz Snapshotter: the daemons and the client steps.

Importable by tests and by benchmarks (put ``tests/`` on ``sys.path``); the
pytest fixtures are at the bottom and only used by tests.  Needs root,
/dev/fuse, containerd and runc (apt), ``ctr-remote`` (apt
``stargz-snapshotter``) and a snapshotter binary built by
``scripts/build-go.sh``.

API
---

``VERSIONS``: the snapshotter versions we build, ``("v0.18", "debian")``.

``build_snapshotter(version) -> Path``
    Builds target ``stargz-snapshotter-v018`` or ``-debian`` of ``scripts/build-go.sh``
    (:func:`gobuild.build_go`, cached) and returns the binary.

``SnapshotterConfig(prefetch=True, prefetch_timeout_sec=30,
background_fetch=False, extra="")``
    The filesystem part of the snapshotter's config.toml.  Background fetch
    is off by default so that every registry request after the prefetch is
    an on-demand read a test (or benchmark) can attribute.

``StargzSnapshotter(base, version, config=..., binary=None)``
    A :class:`daemons.Daemon`: ``start()``, ``stop()`` (unmounts every layer,
    leaves no mount or process), its own ``root``, ``address`` (unix socket)
    and JSON ``log`` below ``base``.  Log readers:
    ``log_records()`` (parsed JSON lines), ``verified_mountpoints()``,
    ``prepared_remote_snapshots()`` (``{snapshot key: True|False}``: mounted
    lazily or fell back to a normal pull), ``prefetch_sizes()`` (``{layer
    digest: bytes}`` once each layer's prefetch finished) and
    ``wait_prefetched(digests)``; ``fuse_mounts()`` lists its FUSE mounts.

``LazyPuller(base, version, config=..., binary=None)``
    A snapshotter plus a containerd whose config has
    ``[proxy_plugins.stargz] type = "snapshot"`` pointing at it; both on
    fresh state below ``base`` (a cold start, as a benchmark run wants).
    ``start()``/``stop()`` or use as a context manager.  ``.snapshotter``,
    ``.containerd`` (:class:`daemons.Containerd`, for ``ctr(...)``).
    ``rpull(ref)``: ``ctr-remote images rpull --plain-http`` (lazy);
    ``pull(ref)``: ``ctr images pull --plain-http`` with overlayfs (a full
    pull, the "original" baseline); ``run(ref, *cmd)``: ``ctr run --rm`` with
    the stargz snapshotter; ``mounted(ref, name)``: a context manager
    mounting the image's root filesystem read-only below ``base`` (overlayfs
    over the FUSE layers, as a container sees it), unmounted after.

``mounted_image(containerd, ref, target, snapshotter)`` and
``chain_id(containerd, ref)`` do the same for any :class:`daemons.Containerd`
(e.g. the overlayfs-unpacked original of an image, to compare trees).

``parse_ranges(header, size) -> [(start, end_exclusive)]`` reads an HTTP
``Range`` header; ``ranges_overlap(a, b)`` tests two half-open ranges.

Fixtures: ``snapshotter_version`` (session, parametrized over ``VERSIONS``),
``snapshotter_binary`` (session), ``lazy_puller`` (function: a cold
:class:`LazyPuller` per test, ``host_dirs`` cleans what containerd leaves in
/run), ``make_lazy_puller`` (function: ``make(config)`` for pullers with
another :class:`SnapshotterConfig`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from daemons import CMD_TIMEOUT, Containerd, Daemon, _env, _need, _require_root, unmount_all_under
from gobuild import build_go

REPO = Path(__file__).resolve().parent.parent
VERSIONS = ("v0.18", "debian")
#: The proxy plugin's name in containerd's config, and ctr-remote's default.
SNAPSHOTTER = "stargz"


def build_snapshotter(version: str) -> Path:
    """Build (or reuse) the snapshotter daemon for ``version``; its path."""
    return build_go(f"stargz-snapshotter-{version.replace('.', '')}")  # v0.18: ...-v018


@dataclass(frozen=True)
class SnapshotterConfig:
    """Filesystem settings written to the snapshotter's config.toml (the
    keys of stargz-snapshotter's fs/config.Config)."""

    prefetch: bool = True
    #: How long a container start waits for a layer's prefetch.
    prefetch_timeout_sec: int = 30
    #: Fetch whole layers in the background after mounting (the daemon's
    #: default); off here so registry requests are prefetch or on demand.
    background_fetch: bool = False
    #: Further TOML, appended as is.
    extra: str = ""

    def toml(self) -> str:
        lines = [f"noprefetch = {str(not self.prefetch).lower()}",
                 f"prefetch_timeout_sec = {int(self.prefetch_timeout_sec)}",
                 f"no_background_fetch = {str(not self.background_fetch).lower()}",
                 # Metrics would need a TCP listener; we only read the log.
                 "no_prometheus = true",
                 self.extra, ""]
        return "\n".join(lines)


def fuse_mounts_under(path: os.PathLike | str) -> list[str]:
    """FUSE mount points at or below ``path`` (from /proc/self/mountinfo)."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            # mountinfo escapes space, tab, newline and backslash as \ooo
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if fstype.split(".")[0] in ("fuse", "fuseblk") and (
                    mp == root or mp.startswith(root + "/")):
                found.append(mp)
    return sorted(found)


class ProxySnapshotter(Daemon):
    """A containerd proxy snapshotter daemon (FUSE-based) on a private root
    and socket, started with its config.toml and a JSON log; subclasses
    name the binary and write the config (:meth:`config_toml`)."""

    def __init__(self, base: Path, binary: Path, socket_name: str, log_level: str = "debug"):
        super().__init__(base)
        self.binary = binary
        self.log_level = log_level
        self.root = self.base / "root"
        self.address = str(self.base / socket_name)
        if len(self.address) >= 108:
            raise RuntimeError(f"socket path too long for AF_UNIX: {self.address}")
        self.config = self.base / "config.toml"
        self.state_dirs = [self.root]

    def config_toml(self) -> str:
        """The daemon's config.toml."""
        raise NotImplementedError

    def start(self) -> ProxySnapshotter:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.write_text(self.config_toml())
        self._spawn([str(self.binary), "--root", str(self.root), "--address", self.address,
                     "--config", str(self.config), "--log-level", self.log_level])
        self._wait_ready()
        return self

    def _ready(self) -> bool:
        if not os.path.exists(self.address):
            return False
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.address)
        except OSError:
            return False
        return True

    def fuse_mounts(self) -> list[str]:
        """The layers this snapshotter has mounted (FUSE mount points)."""
        return fuse_mounts_under(self.root)

    def log_records(self) -> list[dict]:
        """The daemon's log, one dict per JSON line (other lines skipped)."""
        out: list[dict] = []
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class StargzSnapshotter(ProxySnapshotter):
    """The Stargz Snapshotter daemon on a private socket; see the module docstring."""

    name = "stargz-snapshotter"

    def __init__(self, base: Path, version: str, config: SnapshotterConfig = SnapshotterConfig(),
                 binary: Path | None = None, log_level: str = "debug"):
        super().__init__(base, Path(binary) if binary else build_snapshotter(version),
                         "stargz.sock", log_level)
        self.version = version
        self.settings = config

    def config_toml(self) -> str:
        return self.settings.toml()

    def verified_mountpoints(self) -> list[str]:
        """Mount points whose layer matched the TOC digest of its annotation
        (the ``verified`` debug line of fs.Mount)."""
        return [r["mountpoint"] for r in self.log_records()
                if r.get("msg") == "verified" and "mountpoint" in r]

    def prepared_remote_snapshots(self) -> dict[str, bool]:
        """Snapshot key -> True when it was mounted as a remote (lazy)
        snapshot, False when preparing it remotely failed and containerd
        was left to pull and unpack the layer itself."""
        out = {}
        for r in self.log_records():
            if "remote-snapshot-prepared" in r and "key" in r:
                out[r["key"]] = r["remote-snapshot-prepared"] == "true"
        return out

    def remote_snapshot_errors(self) -> list[str]:
        """Why preparing remote snapshots failed (the ``error`` fields)."""
        return [r.get("error", "") for r in self.log_records()
                if r.get("remote-snapshot-prepared") == "false"]

    def prefetch_sizes(self) -> dict[str, int]:
        """Layer digest -> bytes prefetched, for each layer whose prefetch
        has ended (``prefetch_total`` metric line; 0 for a layer with
        ``.no.prefetch.landmark``)."""
        out = {}
        for r in self.log_records():
            if r.get("operation") == "prefetch_total" and "layer_sha" in r:
                m = re.search(r"prefetch_size=(\d+) bytes", r.get("msg", ""))
                if m:
                    out[r["layer_sha"]] = int(m.group(1))
        return out

    def wait_prefetched(self, digests: Iterable[str], timeout: float = 60) -> dict[str, int]:
        """Wait until every layer of ``digests`` has finished its prefetch;
        return :meth:`prefetch_sizes`."""
        want = set(digests)
        deadline = time.monotonic() + timeout
        while True:
            sizes = self.prefetch_sizes()
            if want <= sizes.keys():
                return sizes
            if time.monotonic() > deadline:
                raise TimeoutError(f"no prefetch end logged for {sorted(want - sizes.keys())} "
                                   f"after {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)


def proxy_plugin_config(address: str, name: str = SNAPSHOTTER) -> str:
    """containerd config TOML registering a proxy snapshotter at ``address``."""
    return "\n".join([f"[proxy_plugins.{name}]", '  type = "snapshot"',
                      f"  address = {json.dumps(address)}"])


def parse_ranges(header: str | None, size: int) -> list[tuple[int, int]]:
    """``bytes=a-b,c-`` -> ``[(a, b + 1), (c, size)]``; no header: the whole
    ``size``-byte resource."""
    if not header:
        return [(0, size)]
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes":
        raise ValueError(f"not a byte range: {header!r}")
    out = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if first == "":  # suffix range: the last N bytes
            out.append((max(0, size - int(last)), size))
        else:
            out.append((int(first), min(size, int(last) + 1) if last else size))
    return out


def ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether half-open byte ranges ``a`` and ``b`` share a byte."""
    return a[0] < b[1] and b[0] < a[1]


_Pair = TypeVar("_Pair", bound="DaemonPair")


class DaemonPair:
    """A snapshotter and the containerd using it, stopped together: the
    stop and context-manager half of :class:`LazyPuller` and
    ``socilazy.SociLazyPuller``, which define ``start`` and ``parts``."""

    def parts(self) -> tuple[Path, Daemon, Daemon]:
        """The mounts directory, the containerd and the snapshotter."""
        raise NotImplementedError

    def start(self: _Pair) -> _Pair:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop containerd (removing its containers), then the snapshotter
        (unmounting every layer); raises if a mount or process is left."""
        mounts_dir, containerd, snapshotter = self.parts()
        errors = []
        # Views mounted by mounted() that a failed test left behind.
        unmount_all_under(mounts_dir)
        for daemon in (containerd, snapshotter):
            try:
                daemon.stop()
            except Exception as e:  # stop the other one anyway
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self: _Pair) -> _Pair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LazyPuller(DaemonPair):
    """A Stargz Snapshotter and a containerd using it as proxy snapshotter
    ``stargz``, on fresh state below ``base``; see the module docstring."""

    def __init__(self, base: Path, version: str, config: SnapshotterConfig = SnapshotterConfig(),
                 binary: Path | None = None):
        base = Path(base)
        self.base = base
        self.ctr_remote = _need("ctr-remote", "stargz-snapshotter")
        self.snapshotter = StargzSnapshotter(base / "sn", version, config, binary)
        self.containerd = Containerd(base / "ctd",
                                     extra_config=proxy_plugin_config(self.snapshotter.address))
        self.mounts_dir = base / "mnt"

    def parts(self) -> tuple[Path, Daemon, Daemon]:
        return self.mounts_dir, self.containerd, self.snapshotter

    def start(self) -> LazyPuller:
        self.snapshotter.start()
        try:
            self.containerd.start()
        except BaseException:
            self.snapshotter.stop()
            raise
        return self

    def ctr_remote_cmd(self, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT
                       ) -> subprocess.CompletedProcess:
        """``ctr-remote --address SOCK --namespace NS ARGS``; text output."""
        c = self.containerd
        argv = [self.ctr_remote, "--address", c.address, "--namespace", c.namespace,
                *map(str, args)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr}\n"
                                 f"--- snapshotter log ---\n{self.snapshotter.log_tail()}")
        return p

    def rpull(self, ref: str, *, check: bool = True) -> subprocess.CompletedProcess:
        """Lazily pull ``ref`` (plain HTTP) with the stargz snapshotter."""
        return self.ctr_remote_cmd("images", "rpull", "--plain-http",
                                   "--snapshotter", SNAPSHOTTER, ref, check=check)

    def pull(self, ref: str, *, snapshotter: str = "overlayfs",
             check: bool = True) -> subprocess.CompletedProcess:
        """Pull and unpack ``ref`` the ordinary way (plain HTTP)."""
        return self.containerd.ctr("images", "pull", "--plain-http", "--snapshotter",
                                   snapshotter, ref, check=check)

    def run(self, ref: str, *cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT
            ) -> subprocess.CompletedProcess:
        """Run a throw-away container of ``ref`` on the stargz snapshotter."""
        return self.containerd.run(ref, *cmd, snapshotter=SNAPSHOTTER, check=check,
                                   timeout=timeout)

    def chain_id(self, ref: str) -> str:
        """The chain ID (top snapshot name) of ``ref``; see :func:`chain_id`."""
        return chain_id(self.containerd, ref)

    def mounted(self, ref: str, name: str = "rootfs",
                snapshotter: str = SNAPSHOTTER) -> contextlib.AbstractContextManager[Path]:
        """:func:`mounted_image` of ``ref`` at ``name`` below the puller's base."""
        return mounted_image(self.containerd, ref, self.mounts_dir / name, snapshotter)


def chain_id(containerd: Containerd, ref: str) -> str:
    """The chain ID of ``ref``'s layers (the name of its top snapshot),
    from the manifest and config in ``containerd``'s content store."""
    c = containerd
    rows = [line.split() for line in c.ctr("images", "ls").stdout.splitlines()[1:]]
    digests = [row[2] for row in rows if row and row[0] == ref]
    if not digests:
        raise AssertionError(f"image {ref} is not in containerd")
    manifest = json.loads(c.ctr("content", "get", digests[0]).stdout)
    if "config" not in manifest:
        raise AssertionError(f"{ref} is not a single-platform image manifest")
    config = json.loads(c.ctr("content", "get", manifest["config"]["digest"]).stdout)
    chain = ""
    for diff_id in config["rootfs"]["diff_ids"]:
        chain = diff_id if not chain else \
            "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


_view_ids = itertools.count()


@contextlib.contextmanager
def mounted_image(containerd: Containerd, ref: str, target: Path,
                  snapshotter: str = SNAPSHOTTER) -> Iterator[Path]:
    """Mount ``ref``'s root filesystem (already pulled into ``containerd``
    with ``snapshotter``) read-only at ``target`` and yield it: a view
    snapshot of its chain ID (for the stargz snapshotter overlayfs over the
    FUSE layers, or a bind mount of a single layer), mounted as ``ctr
    snapshots view --mounts`` says; unmounted and removed after.  (``ctr images
    mount`` of containerd 1.6 reads --snapshotter as a global flag, so it
    always unpacks with overlayfs and cannot be used here.)"""
    c = containerd
    target.mkdir(parents=True, exist_ok=True)
    key = f"view-{target.name}-{os.getpid()}-{next(_view_ids)}"
    # One call creates the view and prints its mounts: no lease holds the
    # view, so containerd's garbage collector may remove it at any moment
    # after (which does not disturb a mount already made of its parents).
    mounts = json.loads(c.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts",
                              key, chain_id(c, ref)).stdout)
    try:
        for m in mounts:  # Go's mount.Mount, JSON without tags
            options = [o for o in m.get("Options") or [] if o != "rbind"]
            if m["Type"] == "bind":
                argv = ["mount", "--rbind", "-o", ",".join(options), m["Source"], str(target)]
            else:
                argv = ["mount", "-t", m["Type"], "-o", ",".join(options), m["Source"],
                        str(target)]
            p = subprocess.run(argv, capture_output=True, text=True)
            if p.returncode != 0:
                raise AssertionError(f"{' '.join(argv)} failed: {p.stderr}")
        yield target
    finally:
        unmount_all_under(target)
        c.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)


# --- fixtures (pytest only) --------------------------------------------------------

def _require_fuse() -> None:
    _require_root()
    if not os.path.exists("/dev/fuse"):
        pytest.skip("lazy pulling needs /dev/fuse")


@pytest.fixture(scope="session", params=VERSIONS)
def snapshotter_version(request) -> str:
    """Each snapshotter version in turn."""
    return request.param


@pytest.fixture(scope="session")
def snapshotter_binary(snapshotter_version: str) -> Path:
    _require_fuse()
    try:
        return build_snapshotter(snapshotter_version)
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture
def make_lazy_puller(tmp_path_factory, snapshotter_version: str, snapshotter_binary: Path,
                     host_dirs) -> Iterator:
    """A function ``(config=SnapshotterConfig()) -> LazyPuller`` starting a
    cold snapshotter + containerd; all are stopped after the test."""
    pullers: list[LazyPuller] = []

    def make(config: SnapshotterConfig = SnapshotterConfig()) -> LazyPuller:
        puller = LazyPuller(tmp_path_factory.mktemp("lazy"), snapshotter_version, config,
                            binary=snapshotter_binary)
        pullers.append(puller.start())
        return puller

    try:
        yield make
    finally:
        for puller in pullers:
            puller.stop()


@pytest.fixture
def lazy_puller(make_lazy_puller) -> LazyPuller:
    """A cold snapshotter + containerd (default config) for one test."""
    return make_lazy_puller()
