"""Issue 13 point 1: live progress on a terminal, one line per layer
elsewhere, nothing with -q, --json's stdout untouched.

The live display is checked the way a person sees it: the CLI runs with
stderr on a pseudo-terminal, and what it draws there is read as it comes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import estargz._progress as progress_module
from estargz import ImageResult, TransportOptions
from estargz._progress import progress_meter, reporting_to
from estargz.registry.client import client_for

ESTARGZ = [sys.executable, "-m", "estargz"]
# "12.6/50.9 MB": a byte count against the total, as rich's DownloadColumn draws it.
COUNT = re.compile(rb"(fetch|decompress|compress|upload)\s+\S*\s*([\d.]+)/([\d.]+) ([kMG]?B)")
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
LAYER_LINE = re.compile(r"^layer \d+ sha256:[0-9a-f]{12} +[\d,]+ -> +[\d,]+  converted \d+\.\ds$")


def _run_on_pty(args: list[str], timeout: float = 120.0,
                ) -> tuple[list[tuple[float, bytes]], bytes, int]:
    """Run ``args`` with stderr on a pseudo-terminal: the terminal's output
    in the pieces it arrived in (with their times), stdout, exit code."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})
    os.close(slave)
    assert proc.stdout is not None
    pieces: list[tuple[float, bytes]] = []
    out = bytearray()
    deadline = time.monotonic() + timeout
    open_fds = {master, proc.stdout.fileno()}
    try:
        while open_fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_fds), [], [], 0.5)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last writer is gone
                    data = b""
                if not data:
                    open_fds.discard(fd)
                elif fd == master:
                    pieces.append((time.monotonic(), data))
                else:
                    out += data
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        proc.stdout.close()
    return pieces, bytes(out), code


def test_convert_draws_live_progress_before_a_layer_finishes(tmp_path: Path,
                                                              test_images) -> None:
    src = test_images.debian_multilayer
    pieces, out, code = _run_on_pty(
        [*ESTARGZ, "convert", f"oci:{src}", f"oci:{tmp_path / 'out'}"])
    assert code == 0
    stream = ANSI.sub(b"", b"".join(p for _, p in pieces))
    first_done = stream.find(b"layer 0 sha256:")
    assert first_done > 0, stream[-2000:]
    before = stream[:first_done]
    # Counts strictly between nothing and everything, in more than one
    # frame: the display moved while the layer was being worked on.
    partial = {(m.group(1), m.group(2)) for m in COUNT.finditer(before)
               if 0 < float(m.group(2)) < float(m.group(3))}
    assert len(partial) >= 2, before[-3000:]
    phases = {m.group(1) for m in COUNT.finditer(before)}
    assert {b"decompress", b"compress"} <= phases
    assert b"MB/s" in before  # the rate
    # The final line still goes to stdout, alone.
    assert re.fullmatch(rb"oci:\S+: sha256:[0-9a-f]{64} \(2 layers, [\d.]+s\)\n", out), out


def test_layer_convert_draws_its_compress_phase(tmp_path: Path, debian_layer: Path) -> None:
    pieces, out, code = _run_on_pty(
        [*ESTARGZ, "layer", "convert", str(debian_layer), str(tmp_path / "out.esgz")])
    assert code == 0, out
    stream = ANSI.sub(b"", b"".join(p for _, p in pieces))
    assert re.search(rb"layer\s+compress\s", stream), stream[-2000:]
    assert out.startswith(b"blob digest:")


def _convert_busybox(test_images, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ESTARGZ, "convert", *flags, f"oci:{test_images.busybox}", f"oci:{tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120)


def test_without_a_terminal_one_line_per_layer(tmp_path: Path, test_images) -> None:
    p = _convert_busybox(test_images, tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert lines and all(LAYER_LINE.match(line) for line in lines), p.stderr
    assert "\x1b" not in p.stderr  # no terminal drawing where there is no terminal


def test_quiet_prints_nothing(tmp_path: Path, test_images) -> None:
    p = _convert_busybox(test_images, tmp_path, "-q")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_json_stdout_is_only_the_result(tmp_path: Path, test_images) -> None:
    p = _convert_busybox(test_images, tmp_path, "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    # Exactly ImageResult.to_dict(), and nothing else on stdout.
    assert set(result) == {f.name for f in dataclasses.fields(ImageResult)} | {"totals"}
    assert p.stdout == json.dumps(result, indent=2) + "\n"
    assert p.stderr == ""  # as before: no per-layer lines beside --json


def test_meter_reports_first_last_and_throttles() -> None:
    events: list[tuple[str, int, int | None]] = []
    with reporting_to(lambda *e: events.append(e)):
        m = progress_meter("compress", 1000)
        for _ in range(1000):
            m.add(1)
    assert events[0] == ("compress", 0, 1000)
    assert events[-1] == ("compress", 1000, 1000)
    assert len(events) < 50  # a thousand adds in far less than 5 s: throttled
    outside = progress_meter("fetch", 10)  # no sink in this thread: counted, not sent
    outside.add(10)
    assert len(events) < 50 and outside.done == 10


@pytest.mark.skipif(os.geteuid() != 0, reason="profiling needs root")
def test_optimize_shows_its_profile_phase(tmp_path: Path, test_images) -> None:
    pieces, out, code = _run_on_pty(
        [*ESTARGZ, "optimize", "--period", "1", "--args", '["sleep","5"]',
         f"oci:{test_images.busybox}", f"oci:{tmp_path / 'out'}"])
    stream = ANSI.sub(b"", b"".join(p for _, p in pieces))
    assert code == 0, stream[-2000:]
    # The spinner's row with the period, and its elapsed time ticking.
    assert re.search(rb"image profile \(1s\)", stream), stream[-2000:]
    assert b"layer 0 sha256:" in stream
    assert b"files accessed" in out


def test_registry_transfers_count_their_bytes(tmp_path: Path, test_images, registry,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Upload and download report bytes as they move, not once at the end."""
    # Every chunk reported: over loopback a 50 MB download can finish within
    # one throttle interval, which would leave nothing in between to see.
    monkeypatch.setattr(progress_module, "INTERVAL", 0.0)
    blob = max((test_images.debian_multilayer / "blobs" / "sha256").iterdir(),
               key=lambda p: p.stat().st_size)
    size = blob.stat().st_size
    digest = f"sha256:{blob.name}"
    events: list[tuple[str, int, int | None]] = []
    with client_for(registry.host, TransportOptions(tls_verify=False)) as client, \
            reporting_to(lambda *e: events.append(e)):
        client.upload_blob("progress/blob", digest, size, str(blob))
        with open(tmp_path / "back", "wb") as f:
            client.download_blob("progress/blob", digest, size, f)
    for phase in ("upload", "fetch"):
        done = [d for p, d, t in events if p == phase and t == size]
        assert done[0] == 0 and done[-1] == size, (phase, done)
        assert any(0 < d < size for d in done), (phase, done)  # counted on the way
        assert done == sorted(done)
