"""Shared fixtures: layer builders, the CLI runner and the reference harness."""

from __future__ import annotations

import io
import json
import os
import pwd
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gobuild import build_go

# Real daemons (registries, containerd, dockerd) as session fixtures.
pytest_plugins = ("services", "daemons", "lazypull", "socilazy")

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ESTARGZ_CACHE", Path.home() / ".cache" / "estargz-dev"))


# --- building input layers -------------------------------------------------

@dataclass
class Spec:
    """One tar entry to write with tarfile: enough to cover every kind."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = "root"
    gname: str = "root"
    mtime: float = 1_700_000_000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict = field(default_factory=dict)


def build_tar(specs: list[Spec], fmt: int = tarfile.PAX_FORMAT,
              pax_global: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt,
                      pax_headers=pax_global or {}) as tf:
        for s in specs:
            ti = tarfile.TarInfo(s.name)
            ti.type = s.type
            ti.mode, ti.uid, ti.gid = s.mode, s.uid, s.gid
            ti.uname, ti.gname, ti.mtime = s.uname, s.gname, s.mtime
            ti.linkname = s.linkname
            ti.devmajor, ti.devminor = s.devmajor, s.devminor
            ti.pax_headers = dict(s.pax)
            if s.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                ti.size = len(s.data)
                tf.addfile(ti, io.BytesIO(s.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` deterministic, partly compressible bytes."""
    rnd = random.Random(seed)
    words = [bytes(rnd.randrange(97, 123) for _ in range(rnd.randrange(2, 9)))
             for _ in range(200)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
        if rnd.random() < 0.05:
            out += rnd.randbytes(32)
    return bytes(out[:n])


CHUNK = 1000  # small chunk size used by the format tests


def every_kind_specs() -> list[Spec]:
    """Every entry kind the converter must carry, per the format issue."""
    long_dir = "deep/" + "/".join(f"segment{i:02d}" for i in range(12))
    return [
        Spec("./", tarfile.DIRTYPE, mode=0o755),
        Spec("etc/", tarfile.DIRTYPE, mode=0o755),
        Spec("etc/empty", data=b""),
        Spec("etc/small", data=b"hello, world\n", mode=0o600, uid=1000, gid=1000,
             uname="alice", gname="staff"),
        Spec("etc/exact", data=pattern(CHUNK, 2)),
        Spec("etc/multiple", data=pattern(3 * CHUNK, 3)),
        Spec("etc/larger", data=pattern(5 * CHUNK + 17, 4), mode=0o4755),
        Spec("etc/symlink", tarfile.SYMTYPE, linkname="small", mode=0o777),
        Spec("etc/hardlink", tarfile.LNKTYPE, linkname="etc/small"),
        Spec("dev/", tarfile.DIRTYPE, mode=0o755),
        Spec("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        Spec("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660),
        Spec("dev/fifo", tarfile.FIFOTYPE, mode=0o644),
        Spec(long_dir + "/", tarfile.DIRTYPE, mode=0o755),
        Spec(long_dir + "/file-with-a-long-name.txt", data=b"long name\n"),
        Spec("etc/long-link", tarfile.SYMTYPE, linkname="../" + long_dir + "/x" * 5),
        Spec("etc/xattr", data=b"x", pax={"SCHILY.xattr.user.comment": "hi",
                                           "SCHILY.xattr.security.capability":
                                           b"\x01\x00\x00\x02\xff".decode("utf-8",
                                                                       "surrogateescape")}),
        Spec("etc/bigid", data=b"id", uid=3_000_000, gid=4_000_000, uname="", gname=""),
        Spec("etc/ünïcødé-名前", data=b"unicode\n", uname="ユーザー", gname="グループ"),
        Spec("etc/.wh.removed", data=b""),
        Spec("etc/sub/", tarfile.DIRTYPE, mode=0o755),
        Spec("etc/sub/.wh..wh..opq", data=b""),
        Spec("etc/old-mtime", data=b"epoch", mtime=0),
        Spec("etc/fraction", data=b"frac", mtime=1_600_000_000.75),
    ]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- running the CLI -------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def member_data(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The contents of regular file ``member`` of ``tf``."""
    f = tf.extractfile(member)
    assert f is not None, f"{member.name} is not a regular file"
    return f.read()


def run_cli(*args: object, stdin: bytes | None = None, check: bool = False,
            env: dict | None = None) -> Result:
    p = subprocess.run([sys.executable, "-m", "estargz", *map(str, args)], input=stdin,
                       capture_output=True, cwd=REPO, env={**os.environ, **(env or {})})
    r = Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
    if check and r.code != 0:
        raise AssertionError(f"estargz {' '.join(map(str, args))} exited {r.code}: {r.err}")
    return r


@pytest.fixture
def cli():
    return run_cli


# --- the reference implementation ------------------------------------------

@pytest.fixture(scope="session")
def goref() -> Path:
    """Path of our Go harness built against Debian's reference package."""
    return build_go("goref")


@pytest.fixture(scope="session")
def goref_v018() -> Path:
    """The same harness built against the reference v0.18 (module proxy),
    with its min-chunk-size, external-TOC and zstd:chunked subcommands."""
    return build_go("goref-v018")


@pytest.fixture(scope="session")
def debian_layer() -> Path:
    """A real Debian root filesystem layer, built by testdata/ and cached."""
    p = subprocess.run([str(REPO / "testdata" / "build-debian-rootfs.sh")],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"cannot build the Debian rootfs layer: {p.stderr.strip()[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


# --- running as an ordinary user ---------------------------------------------

def make_readable(top: Path) -> None:
    """World-readable (and traversable) from ``top`` down."""
    for p in [top, *top.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))


def public_dir(prefix: str = "estargz-public-") -> Path:
    """A new directory every user can read (tmp_path lives under root's 0700 dirs)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[Path]:
    """``estargz`` in a world-readable venv built from Debian's python3, for
    running the CLI as another user (root's own interpreter lives under
    /root, mode 0700)."""
    base = shutil.which("python3", path="/usr/bin")
    if base is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's /usr/bin/python3 (python3-venv)")
    public = public_dir("estargz-venv-")
    venv = public / "venv"
    subprocess.run([base, "-m", "venv", venv], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check",
                    str(REPO)], check=True)
    make_readable(public)
    yield venv / "bin" / "estargz"
    shutil.rmtree(public)


@dataclass(frozen=True)
class Account:
    """An ordinary user account: name, ids, and how to run a command as it."""

    name: str
    uid: int
    gid: int

    def argv(self, *args: object) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                *map(str, args)]

    def env(self, **extra: str) -> dict[str, str]:
        # An ordinary user's PATH: no sbin (runc is /usr/sbin/runc).
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent",
                "LANG": "C.UTF-8", **extra}

    def processes(self) -> list[str]:
        p = subprocess.run(["pgrep", "-a", "-u", str(self.uid)], capture_output=True,
                           text=True)
        return p.stdout.splitlines()


@pytest.fixture(scope="session")
def rootless_user() -> Iterator[Account]:
    """A dedicated unprivileged account, created for the tests and deleted after."""
    if os.geteuid() != 0:
        pytest.skip("creating an account needs root")
    name = "estargz-rootless"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                       check=True)
    entry = pwd.getpwnam(name)
    yield Account(name, entry.pw_uid, entry.pw_gid)
    subprocess.run(["pkill", "-KILL", "-u", str(entry.pw_uid)], check=False)
    subprocess.run(["userdel", name], check=False)


def start_until(argv: list, marker: str = "started", timeout: float = 120,
                **popen) -> tuple[subprocess.Popen, list[str]]:
    """Start ``argv`` with stderr piped; return once a stderr line contains
    ``marker`` (or stderr ends, or ``timeout`` passes), with the lines read."""
    p = subprocess.Popen(list(map(str, argv)), stderr=subprocess.PIPE, text=True, **popen)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert p.stderr is not None  # piped
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        lines.append(line)
        if marker in line or not line:
            break
    return p, lines


def sparse_content(size: int) -> bytes:
    """What ``sparse`` in :func:`sparse_tar` holds: holes but for two runs."""
    data = bytearray(size)
    data[5 << 20:(5 << 20) + 18] = b"data in the middle"
    data[size - 3:] = b"end"
    return bytes(data)


def sparse_tar(where: Path, size: int = 16 << 20) -> bytes:
    """A PAX tar (GNU sparse 1.0, as GNU tar writes it) of ``sparse``, ``size``
    bytes of :func:`sparse_content` with real holes, and ``plain``; built in a
    scratch directory under ``where``, removed after."""
    src = Path(tempfile.mkdtemp(prefix="sparse-src-", dir=where))
    try:
        with open(src / "sparse", "wb") as fh:
            fh.truncate(size)
            fh.seek(5 << 20)
            fh.write(b"data in the middle")
            fh.seek(size - 3)
            fh.write(b"end")
        (src / "plain").write_bytes(b"plain\n" * 1000)
        for name in ("sparse", "plain"):
            os.utime(src / name, (1_600_000_000, 1_600_000_000))
        return subprocess.run(["tar", "--sparse", "--format=pax", "--numeric-owner", "-cf", "-",
                               "-C", str(src), "sparse", "plain"], check=True,
                              capture_output=True).stdout
    finally:
        shutil.rmtree(src)
