"""Hostile command lines: option values out of range and special files as
inputs are refused in one line, promptly, before anything is written.

Out-of-range values are usage errors: exit 2 and one ``estargz: error:``
line naming the option (click's own several-line usage message is not
printed). Special files -- ``/dev/zero``, a FIFO nobody writes to, a
directory -- given as a layer, on standard input, as a list or record file
or as an archive are refused with exit 1 and one line, within seconds: the
type is checked before the file is opened, and a FIFO is opened without
blocking (``estargz.layer.inputfile``). These run the CLI in a subprocess
with a timeout, so that a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, write
from estargz import ConvertOptions, InvalidInput, convert_layer
from estargz.cli import main
from estargz.layer import inputfile
from estargz.layer.inputfile import FIFO_WAIT, open_input
from test_hostile_tar import one_file_tar

_runner = CliRunner()


def invoke(*args: object):
    result = _runner.invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def only_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("estargz: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- option values -----------------------------------------------------------

LAYER = ["layer", "convert", "{src}", "{dst}"]
IMAGE = ["convert", "oci:{src}", "oci:{dst}:x"]
OPTIMIZE = ["optimize", "oci:{src}", "oci:{dst}:x"]
BAD_OPTIONS = [
    (LAYER, ["--chunk-size", "1"], "'--chunk-size': 1 is not in the range x>=512"),
    (LAYER, ["--chunk-size", "511"], "--chunk-size"),
    (LAYER, ["--chunk-size", "-4096"], "--chunk-size"),
    (LAYER, ["--chunk-size", "4k"], "--chunk-size"),
    (IMAGE, ["--chunk-size", "0"], "--chunk-size"),
    (LAYER, ["--workers", "257"], "'--workers': 257 is not in the range 0<=x<=256"),
    (LAYER, ["--workers", "-1"], "--workers"),
    (IMAGE, ["--workers", "1000000000"], "--workers"),
    (LAYER, ["--compression-level", "10"], "--compression-level"),
    (LAYER, ["--compression-level", "-1"], "--compression-level"),
    (IMAGE, ["--dest-tls-verify", "maybe"], "'--dest-tls-verify': 'maybe' is not a boolean"),
    (IMAGE, ["--dest-tls-verify="], "'--dest-tls-verify': '' is not a boolean"),
    (IMAGE, ["--src-tls-verify", "2"], "'--src-tls-verify': '2' is not a boolean"),
    (["layer", "ls", "{src}"], ["--tls-verify", "yes please"], "'--tls-verify'"),
    (OPTIMIZE, ["--period", "nan"], "'--period': nan is not a number of seconds at least 0.1"),
    (OPTIMIZE, ["--period", "inf"], "'--period': inf"),
    (OPTIMIZE, ["--period", "-1"], "'--period'"),
    (OPTIMIZE, ["--period", "0.01"], "'--period'"),
    (OPTIMIZE, ["--period", "1e9"], "at most 86400"),
    (OPTIMIZE, ["--period", "soon"], "'--period': 'soon' is not a number of seconds"),
    (IMAGE, ["--timeout", "nan"], "'--timeout'"),
    (IMAGE, ["--nonexistent-option"], "No such option '--nonexistent-option'"),
]


@pytest.mark.parametrize("command, option, message", BAD_OPTIONS,
                         ids=[f"{c[0]}{''.join(o)}" for c, o, _ in BAD_OPTIONS])
def test_out_of_range_option_is_a_one_line_usage_error(tmp_path, command, option, message):
    src = write(tmp_path / "in.tar", one_file_tar())
    dst = tmp_path / "out"
    args = [a.format(src=src, dst=dst) for a in command] + option
    r = invoke(*args)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert message in only_line(r.stderr)
    assert r.stdout == ""
    assert not dst.exists()


@pytest.mark.parametrize("option", [["--chunk-size", "512"], ["--workers", "256"],
                                    ["--tls-verify", "FALSE"], ["--tls-verify", "0"],
                                    ["--tls-verify", "yes"]])
def test_values_at_the_edges_are_accepted(tmp_path, option):
    src = write(tmp_path / "in.tar", one_file_tar(data=b"x" * 2000))
    if option[0] == "--tls-verify":
        r = invoke("layer", "verify", src, *option)  # not a blob: exit 1, not 2
        assert r.exit_code == 1, r.stderr
        return
    r = invoke("layer", "convert", src, tmp_path / "out", "-q", *option)
    assert r.exit_code == 0, r.stderr


def test_a_usage_error_is_one_line_for_a_missing_argument():
    r = invoke("convert")
    assert r.exit_code == 2
    assert only_line(r.stderr) == "estargz: error: Missing argument 'SRC'."


# --- special files as inputs -------------------------------------------------

#: Slack for a CLI process to start on a busy 2-core machine.
MARGIN = 15.0


def run(*args: object, stdin=subprocess.DEVNULL) -> tuple[int, str, float]:
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "estargz", *map(str, args)], stdin=stdin,
                       capture_output=True, cwd=REPO, timeout=FIFO_WAIT + 2 * MARGIN)
    return p.returncode, p.stderr.decode(errors="replace"), time.monotonic() - started


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def special(kind: str, tmp_path: Path) -> Path:
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return path
    if kind == "directory":
        (tmp_path / "dir").mkdir()
        return tmp_path / "dir"
    return Path("/dev/zero")


EXPECTED = {"/dev/zero": "is a character device, not a regular file",
            "fifo": "is a FIFO that no process writes to",
            "directory": "is a directory, not a regular file"}


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory"])
@pytest.mark.parametrize("role", ["layer", "prioritized-files", "record-in", "docker-archive"])
def test_special_file_as_input_is_refused_promptly(tmp_path, kind, role):
    path = special(kind, tmp_path)
    layer = write(tmp_path / "in.tar", one_file_tar())
    dst = tmp_path / "out"
    if role == "layer":
        args = ["layer", "convert", path, dst]
    elif role == "prioritized-files":
        args = ["layer", "convert", layer, dst, "--prioritized-files", path]
    elif role == "record-in":
        args = ["convert", "--record-in", path, f"oci:{tmp_path}/none:x", f"oci:{dst}:x"]
    else:
        args = ["convert", f"docker-archive:{path}", f"oci:{dst}:x"]
    code, err, took = run(*args)
    line = only_line(err)
    expected = EXPECTED[kind]
    if role == "docker-archive" and kind == "fifo":  # an archive is read by seeking
        expected = "is a FIFO, which cannot be read more than once"
    if role in ("prioritized-files", "record-in") and kind == "directory":
        # click.Path(dir_okay=False) says so first: a usage error.
        assert code == 2, err
        expected = "is a directory"
    else:
        assert code == 1, err
    assert expected in line, line
    assert str(path) in line
    assert took < (FIFO_WAIT if kind == "fifo" else 0) + MARGIN, took
    assert not dst.exists()


@pytest.mark.parametrize("stdin", ["/dev/zero", "/dev/null"])
def test_special_file_on_stdin_is_refused(tmp_path, stdin):
    # (A directory on stdin never reaches us: Python refuses to start.)
    fd = os.open(stdin, os.O_RDONLY)
    try:
        code, err, _ = run("layer", "convert", "-", tmp_path / "out", stdin=fd)
    finally:
        os.close(fd)
    assert code == 1
    assert "input layer on standard input is a character device" in only_line(err)
    assert not (tmp_path / "out").exists()


def test_fifo_with_a_writer_is_read(tmp_path, fifo):
    tar = one_file_tar(data=b"through a FIFO\n")

    def writer() -> None:
        time.sleep(0.5)  # after the reader opened it: the reader must wait
        with open(fifo, "wb") as f:
            f.write(tar)

    t = threading.Thread(target=writer)
    t.start()
    code, err, _ = run("layer", "convert", "-q", fifo, tmp_path / "out")
    t.join()
    assert code == 0, err
    assert (tmp_path / "out").stat().st_size > 0


def test_fifo_writer_that_joins_late_is_waited_for_within_the_limit(fifo, monkeypatch):
    monkeypatch.setattr(inputfile, "FIFO_WAIT", 5.0)
    got: list[bytes] = []

    def writer() -> None:
        time.sleep(1.0)
        with open(fifo, "wb") as f:  # blocks until the reader is there
            f.write(b"abc")

    t = threading.Thread(target=writer)
    t.start()
    with open_input(str(fifo), "input") as f:
        got.append(f.read())
    t.join()
    assert got == [b"abc"]


def test_fifo_without_a_writer_is_refused_after_the_wait(fifo, monkeypatch):
    monkeypatch.setattr(inputfile, "FIFO_WAIT", 0.3)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"is a FIFO that no process writes to \(waited 0.3 s\)"):
        open_input(str(fifo), "input")
    assert time.monotonic() - started < 2


def test_fifo_whose_writer_has_written_and_left_is_read_whole(fifo):
    def writer() -> None:
        with open(fifo, "wb") as f:
            f.write(b"all of it")

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.3)  # the writer is blocked in open() until we open
    with open_input(str(fifo), "input") as f:
        data = f.read()
    t.join()
    assert data == b"all of it"


def test_a_chunk_size_too_small_for_the_layer_is_refused_before_writing(tmp_path):
    # 2 MiB in 1-byte chunks: a TOC of over 200 MB, which no reader accepts.
    src = write(tmp_path / "in.tar", one_file_tar(data=bytes(2 << 20)))
    dst = tmp_path / "out.esgz"
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"the TOC would be over \d+ bytes at a chunk size "
                                           r"of 1, more than the 134217728 bytes readers"):
        convert_layer(str(src), str(dst), ConvertOptions(chunk_size=1))
    assert time.monotonic() - started < 5
    assert not dst.exists()
    # At 512 bytes the same layer fits, and converts.
    convert_layer(str(src), str(dst), ConvertOptions(chunk_size=512, workers=1))
    assert dst.exists()


@pytest.mark.parametrize("kind, command", [
    ("fifo", ["layer", "verify"]), ("/dev/zero", ["layer", "verify"]),
    ("directory", ["layer", "verify"]), ("fifo", ["layer", "ls"]),
    ("fifo", ["layer", "toc"])])
def test_special_file_as_blob_is_refused_promptly(tmp_path, kind, command):
    # A blob is read by offset: no FIFO, however written to.
    path = special(kind, tmp_path)
    code, err, took = run(*command, path)
    assert code == 1, err
    line = only_line(err)
    assert f"blob {path} is " in line and "not a regular file" in line, line
    assert took < MARGIN, took
