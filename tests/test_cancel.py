"""Ctrl-C and SIGTERM stop work promptly, in every phase, and leave nothing
half-written (issue 11, point 2).

Each case starts a real `estargz` process, waits until the phase under test
is running (slowed down by tests/slowphase.py so that it would otherwise go
on for minutes), sends the signal and measures how long the process takes to
exit. The bound is the one the tool promises (2 s); the work the signal
interrupts runs in worker threads that only a cancellation check stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import estargz
import estargz.layer.converter as converter
import estargz.layer.layerinput as layerinput
import slowphase as SLOWPHASE_MODULE
from conftest import REPO

SLOWPHASE = REPO / "tests" / "slowphase.py"
#: What the tool promises: stopped within this many seconds of the signal.
STOP_WITHIN = 2.0


def start(phase: str, tmp_path: Path, *args: object) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"{phase}.started"
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    p = subprocess.Popen([sys.executable, str(SLOWPHASE), phase, str(marker), "--",
                          *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, cwd=REPO)
    return p, marker


def wait_for(marker: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(f"exited {p.returncode} before the phase: "
                                 f"{p.stderr.read().decode() if p.stderr else ''}")
        assert time.monotonic() < deadline, "the phase never started"
        time.sleep(0.02)
    time.sleep(0.3)  # well inside it


def interrupt(p: subprocess.Popen, signum: int) -> tuple[float, str]:
    """Send ``signum``; return the seconds until exit and stderr."""
    t0 = time.monotonic()
    p.send_signal(signum)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return time.monotonic() - t0, err.decode()


def assert_interrupted(p: subprocess.Popen, seconds: float, err: str) -> None:
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "estargz: error: interrupted", err
    assert "Traceback" not in err, err
    assert seconds < STOP_WITHIN, f"stopped {seconds:.2f} s after the signal"


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "tmp").rglob("*"))


@pytest.mark.parametrize("phase", ["decompress", "compress"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_conversion_to_a_new_layout(tmp_path, test_images, phase, signum):
    out = tmp_path / "out"
    p, marker = start(phase, tmp_path, "convert", "-q",
                      f"oci:{test_images.debian_python3}:latest", f"oci:{out}:v1")
    wait_for(marker, p)
    seconds, err = interrupt(p, signum)
    assert_interrupted(p, seconds, err)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def snapshot(layout: Path) -> dict[str, bytes]:
    return {str(f.relative_to(layout)): f.read_bytes()
            for f in sorted(layout.rglob("*")) if f.is_file()}


def test_interrupted_conversion_leaves_an_existing_layout_as_it_was(tmp_path, test_images):
    layout = tmp_path / "layout"
    shutil.copytree(test_images.busybox, layout)
    before = snapshot(layout)
    p, marker = start("compress", tmp_path, "convert", "-q",
                      f"oci:{test_images.debian_python3}:latest", f"oci:{layout}:python")
    wait_for(marker, p)
    seconds, err = interrupt(p, signal.SIGINT)
    assert_interrupted(p, seconds, err)
    assert snapshot(layout) == before
    assert json.loads((layout / "index.json").read_bytes())  # still whole


def test_a_second_signal_does_not_cut_the_cleanup_short(tmp_path, test_images):
    out = tmp_path / "out"
    p, marker = start("compress", tmp_path, "convert", "-q",
                      f"oci:{test_images.debian_python3}:latest", f"oci:{out}:v1")
    wait_for(marker, p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    seconds, err = interrupt(p, signal.SIGINT)
    assert_interrupted(p, seconds, err)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_check_cancelled_raises_once_requested():
    estargz.check_cancelled()  # nothing asked: nothing raised
    estargz.request_cancel()
    try:
        assert estargz.cancel_requested()
        with pytest.raises(estargz.Cancelled) as e:
            estargz.check_cancelled()
        assert e.value.exit_code == 130 and str(e.value) == "interrupted"
        assert isinstance(e.value, estargz.EstargzError)
    finally:
        estargz.reset_cancel()
    estargz.check_cancelled()


# --- the checks themselves, in the library -------------------------------------------

def largest_layer(layout: Path) -> Path:
    return max((layout / "blobs" / "sha256").iterdir(), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("phase", ["decompress", "compress"])
def test_cancel_stops_a_layer_conversion_in_its_threads(tmp_path, test_images, monkeypatch, phase):
    """convert_layer runs its compression in worker threads; without the
    checks the slowed phase would run for minutes after the request."""
    # Registered first, so that the slowed functions are put back after.
    monkeypatch.setattr(layerinput, "_decompress_into", layerinput._decompress_into)
    monkeypatch.setattr(converter, "read_payload", converter.read_payload)
    SLOWPHASE_MODULE.PHASES[phase](tmp_path / "started")
    out = tmp_path / "layer.esgz"
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            estargz.convert_layer(str(largest_layer(test_images.debian_python3)), str(out),
                                  tmpdir=str(tmp_path))
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)
    t = threading.Thread(target=run)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and t.is_alive(), "the phase never started"
            time.sleep(0.02)
        time.sleep(0.3)
        estargz.request_cancel()
        t.join(STOP_WITHIN)
        assert not t.is_alive(), f"{phase} went on after the request"
    finally:
        estargz.request_cancel()
        t.join()
        estargz.reset_cancel()
    assert isinstance(outcome[0], estargz.Cancelled), outcome
    assert not out.exists()
    assert [f.name for f in tmp_path.iterdir()] == ["started"]


# --- profiling ------------------------------------------------------------------------

def pids_of(argv: list[str]) -> list[int]:
    """Processes whose command line is exactly ``argv``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                continue
            if [c.decode(errors="replace") for c in cmd] == argv:
                found.append(int(d.name))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="profiling as root")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_profile_and_its_container(tmp_path, test_images, signum):
    workload = ["/bin/sleep", str(4000 + os.getpid() % 1000)]  # ours alone
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "estargz", "optimize", "-q", "--period", "120",
                          "--entrypoint", json.dumps(workload[:1]),
                          "--args", json.dumps(workload[1:]),
                          f"oci:{test_images.busybox}:latest", f"oci:{tmp_path / 'out'}:v1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.monotonic() + 120
    while not pids_of(workload):
        assert p.poll() is None, p.communicate()[1].decode()
        assert time.monotonic() < deadline, "the workload never started"
        time.sleep(0.05)
    seconds, err = interrupt(p, signum)
    assert_interrupted(p, seconds, err)
    assert pids_of(workload) == []
    assert not (tmp_path / "out").exists()
    with open("/proc/self/mountinfo") as f:
        assert str(tmp) not in f.read()
    assert leftovers(tmp_path) == []


# --- the network: fetch and upload ----------------------------------------------------

def push(image: Path, registry_host: str, repo: str) -> str:
    ref = f"{registry_host}/{repo}:v1"
    p = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{image}:latest", f"docker://{ref}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return ref


def test_signal_stops_a_fetch_from_a_trickling_registry(tmp_path, test_images, registry,
                                                        tampering_proxy):
    push(test_images.busybox, registry.host, "cancel/fetch")
    # Every blob answer dribbles a byte at a time: the fetch never ends by itself.
    tampering_proxy.add_fault("GET", r"/blobs/sha256:", trickle="body", times=50)
    out = tmp_path / "out"
    (tmp_path / "tmp").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "estargz", "convert", "-q",
                          "--src-tls-verify", "false", "--timeout", "600",
                          f"docker://{tampering_proxy.host}/cancel/fetch:v1", f"oci:{out}:v1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.monotonic() + 60
    while not tampering_proxy.requests("GET", "/blobs/sha256:"):
        assert p.poll() is None, p.communicate()[1].decode()
        assert time.monotonic() < deadline, "no blob was fetched"
        time.sleep(0.02)
    time.sleep(0.5)
    seconds, err = interrupt(p, signal.SIGINT)
    assert_interrupted(p, seconds, err)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_signal_stops_an_upload(tmp_path, test_images, registry):
    repo = f"cancel/upload{os.getpid()}"
    p, marker = start("upload", tmp_path, "convert", "-q", "--dest-tls-verify", "false",
                      f"oci:{test_images.busybox}:latest", f"docker://{registry.host}/{repo}:v1")
    wait_for(marker, p)
    seconds, err = interrupt(p, signal.SIGINT)
    assert_interrupted(p, seconds, err)
    assert leftovers(tmp_path) == []
    # Nothing was tagged: the manifest goes last, after every blob.
    r = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                        f"docker://{registry.host}/{repo}:v1"], capture_output=True, text=True)
    assert r.returncode != 0


def extracting(top: Path) -> bool:
    """Whether a root filesystem is being extracted under ``top`` (its
    ``usr/lib`` has appeared)."""
    return any(d.endswith("/usr") and "lib" in subdirs for d, subdirs, _ in os.walk(top))


@pytest.mark.skipif(os.geteuid() != 0, reason="profiling as root")
def test_signal_stops_the_extraction_of_the_root_filesystem(tmp_path, test_images):
    """Extraction runs in the sandbox's helper process (profiler.rootful):
    the signal must end it too, not just the CLI."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "estargz", "optimize", "-q", "--period", "5",
                          f"oci:{test_images.debian_python3}:latest", f"oci:{tmp_path / 'out'}:v1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                         env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.monotonic() + 120
    while not extracting(tmp):
        assert p.poll() is None, p.communicate()[1].decode()
        assert time.monotonic() < deadline, "no extraction seen"
        time.sleep(0.01)
    seconds, err = interrupt(p, signal.SIGINT)
    assert_interrupted(p, seconds, err)
    assert not (tmp_path / "out").exists()
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    assert leftovers(tmp_path) == []
