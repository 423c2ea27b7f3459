"""Memory and clean-up guarantees of `estargz layer convert`.

* Peak RSS stays under 200 MiB converting a 2 GiB layer of 50 000 files, and
  no file is ever held whole in memory: a single 2 GiB file converts within
  the same bound (also when the layer arrives gzip-compressed on stdin and
  is spooled to an anonymous temporary file). ``layer verify`` of the
  results stays under the bound too.
* Temporary files are removed on success, on error and on Ctrl-C: every
  conversion runs with TMPDIR set to a fresh empty directory, which must be
  empty afterwards, and its output directory must then hold OUT alone (on
  success) or nothing (on failure).

The layers come from testdata/make_synthetic_layer.py and are cached under
${ESTARGZ_CACHE:-~/.cache/estargz-dev}/testdata/, not in the repository.
Conversions run at --compression-level 1: memory behaviour does not depend on
the level, and it keeps the run time down.

Peak RSS is ``ru_maxrss`` from ``os.wait4``, taken by a tiny fork/exec
trampoline rather than by pytest itself. Linux folds the peak RSS of the
memory a process had before exec() into its ``ru_maxrss``, and subprocess
spawns with vfork(), where that memory is the *parent's*: measured directly,
every child would report at least pytest's own lifetime peak. After the
trampoline's real fork() it is a copy of the trampoline's few MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CACHE, REPO

MiB = 1 << 20
RSS_LIMIT_KIB = 200 * 1024
LEVEL = "1"
SYNTH = REPO / "testdata" / "make_synthetic_layer.py"


# --- input layers, cached outside the repository ---------------------------

def _cached_layer(shape: str, size_mib: int) -> Path:
    path = CACHE / "testdata" / f"synthetic-{shape}-{size_mib}.tar"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # The generator writes OUT.tmp-<pid> and renames: safe to race.
        subprocess.run([sys.executable, str(SYNTH), str(path), "--shape", shape,
                        "--size-mib", str(size_mib)], check=True, stdout=subprocess.DEVNULL)
    return path


@pytest.fixture(scope="session")
def many_small() -> Path:
    """2 GiB in 50 000 files (the generator's many-small default)."""
    return _cached_layer("many-small", 2048)


@pytest.fixture(scope="session")
def one_large() -> Path:
    """A single 2 GiB file, data/large.bin."""
    return _cached_layer("one-large", 2048)


@pytest.fixture(scope="session")
def one_large_gz(one_large: Path) -> Path:
    """The one-large layer gzip-compressed (for the stdin case), cached too."""
    path = one_large.with_name(one_large.name + ".gz")
    if not path.exists():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tool = ["pigz", "-1", "-c"] if shutil.which("pigz") else ["gzip", "-1", "-c"]
        try:
            with open(one_large, "rb") as src, open(tmp, "wb") as dst:
                subprocess.run(tool, stdin=src, stdout=dst, check=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def small_layer(tmp_path_factory) -> Path:
    """A 16 MiB layer holding one file, for the quick error cases."""
    path = tmp_path_factory.mktemp("small") / "small.tar"
    subprocess.run([sys.executable, str(SYNTH), str(path), "--shape", "one-large",
                    "--size-mib", "16"], check=True, stdout=subprocess.DEVNULL)
    return path


def data_span(tar: Path) -> tuple[int, int]:
    """(offset, size) of the payload of the largest file in ``tar``."""
    with tarfile.open(tar) as tf:
        m = max(tf.getmembers(), key=lambda m: m.size)
    return m.offset_data, m.size


# --- running the CLI and measuring it --------------------------------------

# The fork/exec trampoline that makes os.wait4 report the child's own peak.
from blobcraft import TRAMPOLINE as _TRAMPOLINE  # noqa: E402


@dataclass
class Measured:
    code: int
    rss_kib: int
    out: str
    err: str
    seconds: float

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024


def run_measured(args: list, *, env: dict, stdin: Path | None = None,
                 scratch: Path) -> Measured:
    """Run ``python -m estargz ARGS``; return its exit code and peak RSS."""
    res = scratch / "rusage"
    argv = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(res),
            sys.executable, "-m", "estargz", *map(str, args)]
    started = time.monotonic()
    with open(stdin or os.devnull, "rb") as si:
        p = subprocess.run(argv, stdin=si, capture_output=True, cwd=REPO,
                           env={**os.environ, **env})
    seconds = time.monotonic() - started
    assert p.returncode == 0 and res.exists(), p.stderr.decode(errors="replace")
    code, rss = map(int, res.read_text().split())
    res.unlink()
    return Measured(code, rss, p.stdout.decode(errors="replace"),
                    p.stderr.decode(errors="replace"), seconds)


@dataclass
class Dirs:
    out: Path     # the output directory: OUT and the converter's temp file
    tmp: Path     # TMPDIR of the conversion
    scratch: Path

    @property
    def dst(self) -> Path:
        return self.out / "layer.esgz"

    @property
    def env(self) -> dict:
        return {"TMPDIR": str(self.tmp)}

    def temp_outputs(self, pid: int) -> list[str]:
        """Paths to the temp outputs process ``pid`` writes: named
        ``.OUT.*.tmp`` files or, where ``atomic_output`` uses O_TMPFILE,
        its descriptors of unnamed files in the output directory."""
        named = [str(self.out / n) for n in os.listdir(self.out)
                 if n.startswith(f".{self.dst.name}.") and n.endswith(".tmp")]
        fds = f"/proc/{pid}/fd"
        unnamed = []
        try:
            open_fds = os.listdir(fds)
        except FileNotFoundError:  # the process is gone; the caller sees it exit
            open_fds = []
        for fd in open_fds:
            try:
                target = os.readlink(f"{fds}/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith(f"{self.out}/") and target.endswith(" (deleted)"):
                unnamed.append(f"{fds}/{fd}")
        return named + unnamed


@pytest.fixture
def dirs(tmp_path):
    d = Dirs(tmp_path / "out", tmp_path / "tmpdir", tmp_path / "scratch")
    for p in (d.out, d.tmp, d.scratch):
        p.mkdir()
    yield d
    # The outputs are GiB-sized: don't leave them to pytest's kept basetemps.
    shutil.rmtree(tmp_path, ignore_errors=True)


def assert_nothing_left(d: Dirs) -> None:
    assert os.listdir(d.out) == [], "output directory not cleaned up"
    assert os.listdir(d.tmp) == [], "TMPDIR not cleaned up"


# --- peak RSS ---------------------------------------------------------------

@pytest.mark.parametrize("case", ["many-small", "one-large", "one-large-gzip-stdin"])
def test_converting_2gib_stays_under_200mib(case, dirs, request):
    layer = request.getfixturevalue("many_small" if case == "many-small" else "one_large")
    stdin = request.getfixturevalue("one_large_gz") if case.endswith("stdin") else None
    src = "-" if stdin else layer

    conv = run_measured(["layer", "convert", src, dirs.dst, "--compression-level", LEVEL,
                         "--json"], env=dirs.env, stdin=stdin, scratch=dirs.scratch)
    assert conv.code == 0, conv.err
    print(f"\n{case}: convert {conv.seconds:.1f} s, peak RSS {conv.rss_mib:.1f} MiB")
    assert conv.rss_kib < RSS_LIMIT_KIB, f"convert peak RSS {conv.rss_mib:.1f} MiB"
    # Temporary files: the spool (stdin) and spilled units are anonymous, the
    # temp output was renamed to OUT.
    assert os.listdir(dirs.out) == [dirs.dst.name]
    assert os.listdir(dirs.tmp) == []
    result = json.loads(conv.out)
    assert result["blob_size"] == dirs.dst.stat().st_size
    assert result["uncompressed_size"] > 2048 * MiB

    ver = run_measured(["layer", "verify", dirs.dst, "--toc-digest", result["toc_digest"],
                        "--json"], env=dirs.env, scratch=dirs.scratch)
    assert ver.code == 0, ver.err
    print(f"{case}: verify {ver.seconds:.1f} s, peak RSS {ver.rss_mib:.1f} MiB")
    assert ver.rss_kib < RSS_LIMIT_KIB, f"verify peak RSS {ver.rss_mib:.1f} MiB"
    report = json.loads(ver.out)
    assert report["ok"] is True
    # Plus the one-byte .no.prefetch.landmark file every blob carries.
    assert report["files"] == (50_000 if case == "many-small" else 1) + 1
    assert report["uncompressed_size"] == result["uncompressed_size"]
    assert os.listdir(dirs.tmp) == []


# --- Ctrl-C ------------------------------------------------------------------

def _start(args: list, d: Dirs, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "estargz", *map(str, args)],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env={**os.environ, **d.env})


def _wait_for_temp_output(p: subprocess.Popen, d: Dirs, timeout: float = 120) -> None:
    """Wait until the converter is writing its temp output (and has written
    something to it), so the signal or error hits a conversion mid-way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, f"converter exited early: {p.communicate()[1]!r}"
        temps = d.temp_outputs(p.pid)
        if temps:
            try:
                if os.stat(temps[0]).st_size > 0:
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.005)
    p.kill()
    pytest.fail("no temp output appeared")


def _assert_interrupted(p: subprocess.Popen, d: Dirs) -> None:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.decode().splitlines() == ["estargz: error: interrupted"]
    assert not d.dst.exists()
    assert_nothing_left(d)


def test_ctrl_c_mid_conversion_removes_temp_files(one_large, dirs):
    p = _start(["layer", "convert", one_large, dirs.dst, "--compression-level", LEVEL], dirs)
    _wait_for_temp_output(p, dirs)
    p.send_signal(signal.SIGINT)
    _assert_interrupted(p, dirs)


def test_ctrl_c_while_spooling_stdin(one_large_gz, dirs):
    """Interrupted while decompressing stdin into the anonymous spool file."""
    p = _start(["layer", "convert", "-", dirs.dst, "--compression-level", LEVEL], dirs,
               stdin=subprocess.PIPE)
    with open(one_large_gz, "rb") as f:
        p.stdin.write(f.read(8 * MiB))  # returns once the converter took most of it
        p.stdin.flush()
    time.sleep(0.2)
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    _assert_interrupted(p, dirs)
    p.stdin.close()


# --- errors --------------------------------------------------------------------

def _assert_failed(code: int, err: str, d: Dirs, *, contains: str) -> None:
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("estargz: error: "), err
    assert contains in lines[0], err
    assert not d.dst.exists()
    assert_nothing_left(d)


def test_input_truncated_in_file_data(small_layer, dirs):
    offset, size = data_span(small_layer)
    cut = dirs.scratch / "cut.tar"
    with open(small_layer, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(offset + size // 2))
    r = run_measured(["layer", "convert", cut, dirs.dst, "--compression-level", LEVEL],
                     env=dirs.env, scratch=dirs.scratch)
    _assert_failed(r.code, r.err, dirs, contains="truncated")


def test_gzip_stdin_truncated_in_file_data(small_layer, dirs):
    offset, size = data_span(small_layer)
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    gz = z.compress(small_layer.read_bytes()) + z.flush()
    # Cut the gzip stream where it holds the middle of the file's data.
    cut = dirs.scratch / "cut.tar.gz"
    cut.write_bytes(gz[:len(gz) * (offset + size // 2) // small_layer.stat().st_size])
    r = run_measured(["layer", "convert", "-", dirs.dst, "--compression-level", LEVEL],
                     env=dirs.env, stdin=cut, scratch=dirs.scratch)
    _assert_failed(r.code, r.err, dirs, contains="truncated")


def test_input_shrinking_mid_conversion(dirs):
    """The input file is truncated while the converter is writing the blob:
    the error surfaces mid-way, and the temp output must still go."""
    layer = dirs.scratch / "shrinking.tar"
    subprocess.run([sys.executable, str(SYNTH), str(layer), "--shape", "one-large",
                    "--size-mib", "256"], check=True, stdout=subprocess.DEVNULL)
    offset, size = data_span(layer)
    p = _start(["layer", "convert", layer, dirs.dst, "--compression-level", LEVEL], dirs)
    _wait_for_temp_output(p, dirs)
    os.truncate(layer, offset + size // 2)
    _, err = p.communicate(timeout=120)
    _assert_failed(p.returncode, err.decode(errors="replace"), dirs, contains="truncated")
