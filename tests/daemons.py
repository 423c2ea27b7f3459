"""Real containerd and dockerd for tests, and the cached test images.

Fixtures (all session-scoped; import them into a test module, e.g.
``from daemons import containerd, dockerd, test_images``):

``test_images`` -> :class:`ImageSet`
    Runs ``testdata/images/build.py all`` (cached under
    ``${ESTARGZ_CACHE:-~/.cache/estargz-dev}/images/``) and returns the paths.

``containerd`` -> :class:`Containerd`
    A containerd of its own: generated config, root/state under a pytest tmp
    dir, gRPC on a private unix socket (no TCP), CRI and the unused
    snapshotters disabled.  ``containerd.ctr(*args)`` runs
    ``ctr --address SOCK --namespace estargz-test ARGS``;
    ``containerd.run(image, *cmd)`` runs a throw-away container with the
    overlayfs snapshotter and runc (``runtime="crun"`` for crun).

``dockerd`` -> :class:`Dockerd`
    A dockerd on ``unix://TMP/docker.sock`` (no TCP), ``--iptables=false
    --bridge=none``, own data-root/exec-root/pidfile/daemon.json, using the
    ``containerd`` fixture's daemon (namespace ``moby``) through
    ``--containerd``.  ``dockerd.host`` is the DOCKER_HOST value,
    ``dockerd.env`` an environment for the docker CLI,
    ``dockerd.docker(*args)`` runs the CLI against it.

Shutdown (also usable directly, see :meth:`Daemon.stop`): remove what is left
(docker containers; containerd tasks and containers in every namespace),
SIGTERM and wait, SIGKILL on timeout, SIGKILL leftover processes that refer to
the daemon's directory (runc shims and their children), unmount everything
still mounted below it (deepest first, lazily if busy), remove the state
directories (logs and configs stay for post-mortems), and remove the empty
host directories the daemons create outside it (``/run/containerd/s``,
``/run/docker/plugins``, per-namespace cgroups) when they did not exist
before.  A session fixture raises at teardown if a mount or a process is left.

Needs root and the Debian packages containerd, runc, docker.io (and crun for
the crun runtime).  Without root the fixtures skip; a missing binary fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from profiler.linux import mounts_under as _mounts_under

REPO = Path(__file__).resolve().parent.parent
BUILD_IMAGES = REPO / "testdata" / "images" / "build.py"
NAMESPACE = "estargz-test"
STOP_TIMEOUT = 20.0
START_TIMEOUT = 60.0
CMD_TIMEOUT = 300.0

# Daemons must not inherit a client's or another daemon's settings.
_SCRUB_ENV = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH",
              "CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER",
              "XDG_RUNTIME_DIR", "NOTIFY_SOCKET")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
    env.update(extra)
    return env


# --- what a daemon can leave behind ---------------------------------------------

def mounts_under(path: os.PathLike | str) -> list[str]:
    """Mount points at or below ``path``, from /proc/self/mountinfo."""
    return _mounts_under(os.path.realpath(path))


def _all_processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) for every process we can read."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # The command name in parentheses may contain spaces: split after it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        procs[int(entry)] = (ppid, cmd)
    return procs


def processes_under(path: os.PathLike | str) -> list[tuple[int, str]]:
    """Processes whose command line names ``path`` (daemons, shims, runc)
    and all their descendants (container processes), excluding this process
    and its ancestors."""
    root = os.path.realpath(path)
    procs = _all_processes()
    # Never ourselves or an ancestor (pytest may be run from a path below root).
    me, pid = set(), os.getpid()
    while pid > 1 and pid not in me:
        me.add(pid)
        pid = procs.get(pid, (0, ""))[0]
    # root itself or a path below it, but not a sibling like root + "1"
    names_root = re.compile(re.escape(root) + r"(?=/|\s|$|[\"',;:])").search
    hits = {pid for pid, (_, cmd) in procs.items() if names_root(cmd) and pid not in me}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(hits)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in hits and c not in me:
                hits.add(c)
                stack.append(c)
    return sorted((pid, procs[pid][1]) for pid in hits)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2


def unmount_all_under(path: os.PathLike | str) -> list[str]:
    """Unmount everything at or below ``path``, deepest first; returns what
    was unmounted.  Busy mounts are detached (MNT_DETACH)."""
    done = []
    for _ in range(5):  # stacked mounts on one mount point need several passes
        mps = sorted(set(mounts_under(path)), key=lambda p: p.count("/"), reverse=True)
        if not mps:
            break
        for mp in mps:
            b = os.fsencode(mp)
            if _libc.umount2(b, 0) == 0 or _libc.umount2(b, MNT_DETACH) == 0:
                done.append(mp)
    return done


def kill_processes_under(path: os.PathLike | str) -> list[tuple[int, str]]:
    """SIGKILL every process :func:`processes_under` finds; wait for them."""
    procs = processes_under(path)
    for pid, _ in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid, _ in procs):
        time.sleep(0.05)
    return procs


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rmtree(path: Path) -> None:
    """Remove a daemon state tree, never crossing into a mount."""
    if path.exists():
        if mounts_under(path):
            raise RuntimeError(f"refusing to remove {path}: still mounted {mounts_under(path)}")
        shutil.rmtree(path, ignore_errors=True)


class HostDirs:
    """Directories outside the tmp dir that containerd and dockerd create by
    themselves (hard-coded paths): remembers which existed before, and
    removes the new ones once they are empty again."""

    def __init__(self, names: Sequence[str]):
        self.paths = [Path(p) for p in ("/run/containerd/s", "/run/containerd",
                                        "/run/docker/plugins", "/run/docker")]
        cg = Path("/sys/fs/cgroup")
        for name in names:
            self.paths.append(cg / name)  # cgroup v2
            if cg.is_dir():
                self.paths += [d / name for d in cg.iterdir() if d.is_dir() and not d.is_symlink()]
        self.existed = {p for p in self.paths if p.exists()}

    def cleanup(self) -> None:
        """rmdir, bottom-up, the new directories and everything below them.
        rmdir only ever removes an empty directory (for cgroupfs: a cgroup
        with no process and no child), so nothing in use can go."""
        for p in sorted(self.paths, key=lambda p: len(p.parts), reverse=True):
            if p in self.existed or not p.is_dir():
                continue
            for dirpath, _, _ in os.walk(p, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)


# --- daemons -----------------------------------------------------------------------

def _need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: apt-get install {package}")
    return path


def _set_pdeathsig() -> None:
    # If the test process dies without tearing down, the daemon is told to
    # stop too (PR_SET_PDEATHSIG = 1).
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)


class Daemon:
    """A daemon process with its own directory, log and graceful stop."""

    name = "daemon"

    def __init__(self, base: Path):
        self.base = Path(os.path.realpath(base))
        self.base.mkdir(parents=True, exist_ok=True)
        self.log = self.base / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.state_dirs: list[Path] = []
        self.leftovers: dict[str, list] = {}

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=_env(),
                                         start_new_session=True, preexec_fn=_set_pdeathsig)

    def _ready(self) -> bool:
        raise NotImplementedError

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self.proc is not None, "started"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} at start-up:\n"
                                   + self.log_tail())
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT:.0f} s:\n"
                           + self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _remove_objects(self) -> None:
        """Remove containers etc. through the daemon's own API before it stops."""

    def stop(self) -> dict[str, list]:
        """Stop the daemon and clean up after it (idempotent).

        Returns what had to be cleaned up by force: processes killed and
        paths unmounted after the daemon exited.  Raises if a mount or a
        process is left after that."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._remove_objects()
            except Exception as e:  # the daemon may be wedged; go on stopping it
                print(f"{self.name}: cleanup before stop failed: {e}", file=sys.stderr)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name}: no exit {STOP_TIMEOUT:.0f} s after SIGTERM; SIGKILL",
                      file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.leftovers = {"killed": kill_processes_under(self.base),
                          "unmounted": unmount_all_under(self.base)}
        left_mounts, left_procs = mounts_under(self.base), processes_under(self.base)
        if left_mounts or left_procs:
            raise RuntimeError(f"{self.name} left mounts {left_mounts} and processes {left_procs}")
        for d in self.state_dirs:
            _rmtree(d)
        return self.leftovers


class Containerd(Daemon):
    """containerd on a private socket; see the module docstring."""

    name = "containerd"
    _ids = itertools.count()

    def __init__(self, base: Path, namespace: str = NAMESPACE, extra_config: str = ""):
        """``extra_config``: TOML appended to the generated config (after
        its last table), e.g. a ``[proxy_plugins.NAME]`` table."""
        super().__init__(base)
        self.extra_config = extra_config
        self.binary = _need("containerd", "containerd")
        self.ctr_binary = _need("ctr", "containerd")
        self.namespace = namespace
        self.address = str(self.base / "containerd.sock")
        if len(self.address) + len(".ttrpc") >= 108:
            raise RuntimeError(f"socket path too long for AF_UNIX: {self.address}")
        self.root, self.state = self.base / "root", self.base / "state"
        self.runc_root, self.fifo_dir = self.base / "runc", self.base / "fifo"
        self.state_dirs = [self.root, self.state, self.runc_root, self.fifo_dir]
        self.config = self.base / "config.toml"

    def start(self) -> Containerd:
        for d in self.state_dirs:
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
        disabled = ["io.containerd.grpc.v1.cri",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    # would create /opt/containerd
                    "io.containerd.internal.v1.opt"]
        self.config.write_text("\n".join([
            "version = 2",
            f"root = {json.dumps(str(self.root))}",
            f"state = {json.dumps(str(self.state))}",
            f"disabled_plugins = {json.dumps(disabled)}",
            "[grpc]",
            f"  address = {json.dumps(self.address)}",
            "[ttrpc]",
            f"  address = {json.dumps(self.address + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            "[metrics]",
            '  address = ""',
            self.extra_config,
            "",
        ]))
        self._spawn([self.binary, "--config", str(self.config)])
        self._wait_ready()
        return self

    def _ready(self) -> bool:
        if not os.path.exists(self.address):
            return False
        p = subprocess.run([self.ctr_binary, "--address", self.address, "version"],
                           capture_output=True, timeout=30)
        return p.returncode == 0

    def ctr(self, *args: str, namespace: str | None = None, check: bool = True,
            timeout: float = CMD_TIMEOUT, input: bytes | None = None
            ) -> subprocess.CompletedProcess:
        """``ctr --address SOCK --namespace NS ARGS``; text output."""
        argv = [self.ctr_binary, "--address", self.address,
                "--namespace", namespace or self.namespace, *map(str, args)]
        p = subprocess.run(argv, capture_output=True, timeout=timeout, env=_env(),
                           input=input.decode() if input is not None else None, text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr}\n"
                                 f"--- containerd log ---\n{self.log_tail()}")
        return p

    def run(self, image: str, *cmd: str, runtime: str = "runc", check: bool = True,
            timeout: float = CMD_TIMEOUT, snapshotter: str = "overlayfs"
            ) -> subprocess.CompletedProcess:
        """``ctr run --rm`` a container with ``snapshotter`` (overlayfs, or a
        proxy snapshotter of ``extra_config``) and ``runtime`` (runc or crun,
        through containerd's runc shim)."""
        cid = f"t{os.getpid()}-{next(self._ids)}"
        return self.ctr("run", "--rm", "--snapshotter", snapshotter,
                        "--runc-binary", _need(runtime, runtime),
                        "--runc-root", str(self.runc_root / runtime),
                        "--fifo-dir", str(self.fifo_dir),
                        image, cid, *cmd, check=check, timeout=timeout)

    def _remove_objects(self) -> None:
        def quiet(*args: str, ns: str) -> str:
            try:
                return self.ctr(*args, namespace=ns, check=False, timeout=10).stdout
            except subprocess.TimeoutExpired:
                return ""

        for ns in self.ctr("namespaces", "ls", "-q", timeout=30).stdout.split():
            # TASK PID STATUS
            tasks = [item.split() for item in quiet("tasks", "ls", ns=ns).splitlines()[1:]]
            for task, pid, status in (t[:3] for t in tasks if len(t) >= 3):
                if status == "STOPPED":
                    continue
                # `ctr tasks kill` fails when the runc state of the task is
                # gone (a client such as dockerd was killed and its exec-root
                # removed): the task's init process is then killed directly.
                if self.ctr("tasks", "kill", "--signal", "SIGKILL", task, namespace=ns,
                            check=False, timeout=10).returncode != 0 and int(pid) > 0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                deadline = time.monotonic() + 5
                while int(pid) > 0 and _alive(int(pid)) and time.monotonic() < deadline:
                    time.sleep(0.05)
            for t in tasks:
                quiet("tasks", "delete", t[0], ns=ns)
            for c in quiet("containers", "ls", "-q", ns=ns).split():
                quiet("containers", "delete", c, ns=ns)

    def stop(self) -> dict[str, list]:
        leftovers = super().stop()
        # A killed shim leaves its socket in /run/containerd/s (a path fixed
        # in containerd 1.6), named sha256("ADDRESS/NAMESPACE/ID").
        for _, cmd in leftovers["killed"]:
            argv = cmd.split()
            if "containerd-shim" not in argv[0]:
                continue
            opts = dict(zip(argv[1::2], argv[2::2], strict=False))
            if {"-namespace", "-id", "-address"} <= opts.keys():
                key = f"{opts['-address']}/{opts['-namespace']}/{opts['-id']}"
                sock = Path("/run/containerd/s") / hashlib.sha256(key.encode()).hexdigest()
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
        return leftovers


class Dockerd(Daemon):
    """dockerd on a private unix socket; see the module docstring."""

    name = "dockerd"

    def __init__(self, base: Path, containerd: Containerd):
        super().__init__(base)
        self.binary = _need("dockerd", "docker.io")
        self.cli = os.environ.get("ESTARGZ_DOCKER_CLI") or _need("docker", "docker.io")
        self.containerd = containerd
        self.socket = str(self.base / "docker.sock")
        if len(self.socket) >= 108:
            raise RuntimeError(f"socket path too long for AF_UNIX: {self.socket}")
        self.host = "unix://" + self.socket
        self.data_root, self.exec_root = self.base / "data", self.base / "exec"
        self.state_dirs = [self.data_root, self.exec_root]
        self.config = self.base / "daemon.json"
        # The CLI's own config (contexts, auth) stays in the tmp dir too.
        self.env = _env(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.base / "cli"))

    def start(self) -> Dockerd:
        for d in self.state_dirs:
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
        # dockerd 20.10 would create /etc/docker/key.json otherwise.
        self.config.write_text(json.dumps({"deprecated-key-path": str(self.base / "key.json")}))
        self._spawn([
            self.binary, "--config-file", str(self.config),
            "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.base / "docker.pid"), "-H", self.host,
            "--containerd", self.containerd.address,
            "--iptables=false", "--ip-masq=false", "--bridge=none",
        ])
        self._wait_ready()
        return self

    def _ready(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(self.socket)
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]

    def docker(self, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT
               ) -> subprocess.CompletedProcess:
        """Run the docker CLI against this daemon; text output."""
        argv = [self.cli, *map(str, args)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr}\n"
                                 f"--- dockerd log ---\n{self.log_tail()}")
        return p

    def _remove_objects(self) -> None:
        ids = self.docker("ps", "-aq", timeout=30).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=60)


# --- fixtures ------------------------------------------------------------------------

def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("containerd and dockerd need root")


def _finish(daemon: Daemon) -> None:
    """Session teardown: stop, and make a leftover an error of the session."""
    leftovers = daemon.stop()
    if leftovers["killed"] or leftovers["unmounted"]:
        print(f"\n{daemon.name}: cleaned up by force: {leftovers}", file=sys.stderr)


@pytest.fixture(scope="session")
def host_dirs():
    """Removes, at the end of the session, the empty host directories the
    daemons made outside their tmp dirs (if they were not there before)."""
    dirs = HostDirs([NAMESPACE, "docker"])
    yield dirs
    dirs.cleanup()


@pytest.fixture(scope="session")
def containerd(tmp_path_factory, host_dirs) -> Iterator[Containerd]:
    _require_root()
    d = Containerd(tmp_path_factory.mktemp("containerd")).start()
    try:
        yield d
    finally:
        _finish(d)


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory, containerd, host_dirs) -> Iterator[Dockerd]:
    _require_root()
    d = Dockerd(tmp_path_factory.mktemp("dockerd"), containerd).start()
    try:
        yield d
    finally:
        _finish(d)


@dataclass(frozen=True)
class ImageSet:
    """Paths of the images built by testdata/images/build.py."""

    busybox: Path              # OCI layout, tag latest
    busybox_oci_archive: Path  # the same as an oci-archive tar (ref "latest")
    debian_multilayer: Path    # OCI layout, tag latest (umoci, 2 layers)
    debian_python3: Path       # OCI layout, tag latest (minbase + python3 diff layer)
    two_platform: Path         # OCI layout, tags latest and platforms-only (indexes)
    docker_media_types: Path   # OCI layout, tag latest, Docker schema 2 media types
    docker_archive: Path       # `docker save` tar of busybox, RepoTags busybox:latest
    lazy_kinds: Path           # OCI layout, tag latest: busybox + 2 layers of every entry kind
    lazy_kinds_oci_archive: Path  # the same as an oci-archive tar (ref "latest")
    dirs: dict                 # image name -> its cache directory


def build_images(*names: str, env: dict | None = None) -> dict[str, Path]:
    """Run build.py for ``names``; image name -> cache directory."""
    p = subprocess.run([sys.executable, str(BUILD_IMAGES), *names], capture_output=True,
                       text=True, timeout=3600, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        pytest.fail(f"testdata/images/build.py {' '.join(names)} failed:\n{p.stderr[-4000:]}")
    paths = [Path(item) for item in p.stdout.strip().splitlines()]
    return {path.name: path for path in paths}


@pytest.fixture(scope="session")
def test_images() -> ImageSet:
    dirs = build_images("all")
    return ImageSet(
        busybox=dirs["busybox"] / "oci",
        busybox_oci_archive=dirs["busybox"] / "oci-archive.tar",
        debian_multilayer=dirs["debian-multilayer"] / "oci",
        debian_python3=dirs["debian-python3"] / "oci",
        two_platform=dirs["two-platform"] / "oci",
        docker_media_types=dirs["docker-media-types"] / "oci",
        docker_archive=dirs["docker-media-types"] / "docker-archive.tar",
        lazy_kinds=dirs["lazy-kinds"] / "oci",
        lazy_kinds_oci_archive=dirs["lazy-kinds"] / "oci-archive.tar",
        dirs=dirs,
    )
