"""FID-mode fanotify: record parsing, and a real rootless watch as nobody."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO
from profiler.errors import ProfilingError
from profiler.fanotify import FAN_ACCESS, FAN_OPEN, FAN_Q_OVERFLOW, pack_event
from profiler.fanotify.fid import (
    FAN_EVENT_INFO_TYPE_DFID_NAME,
    FAN_EVENT_INFO_TYPE_FID,
    FidInfo,
    HandleTable,
    RawFidEvent,
    name_to_handle_at,
    pack_fid_event,
    parse_fid_events,
)

FID = FidInfo(FAN_EVENT_INFO_TYPE_FID, (7, 9), 1, b"\x01\x02\x03\x04\x05\x06\x07\x08")
DFID = FidInfo(FAN_EVENT_INFO_TYPE_DFID_NAME, (7, 9), 1, b"\xaa" * 8, "héllo.py")


def test_parse_fid_record():
    (e,) = parse_fid_events(pack_fid_event(FAN_OPEN, (FID,), pid=42))
    assert e == RawFidEvent(FAN_OPEN, 42, (FID,))
    assert e.info(FAN_EVENT_INFO_TYPE_FID).key == (1, FID.handle)


def test_parse_dfid_name_and_fid_in_one_event_then_another():
    buf = pack_fid_event(FAN_OPEN | FAN_ACCESS, (DFID, FID)) + pack_fid_event(FAN_ACCESS, (FID,))
    a, b = parse_fid_events(buf)
    assert a.infos == (DFID, FID) and a.info(FAN_EVENT_INFO_TYPE_DFID_NAME).name == "héllo.py"
    assert b.mask == FAN_ACCESS and b.infos == (FID,)


def test_unknown_info_types_are_skipped():
    raw = bytearray(pack_fid_event(FAN_OPEN, (FID,)))
    pidfd = bytes([4, 0, 8, 0]) + (5).to_bytes(4, "little")  # a FAN_EVENT_INFO_TYPE_PIDFD
    raw[0:4] = (len(raw) + len(pidfd)).to_bytes(4, "little")
    (e,) = parse_fid_events(bytes(raw) + pidfd)
    assert e.infos == (FID,)


def test_overflow_event():
    (e,) = parse_fid_events(pack_event(FAN_Q_OVERFLOW))
    assert e.mask == FAN_Q_OVERFLOW and e.infos == ()


@pytest.mark.parametrize("cut", [10, 30, 40])
def test_truncated_records_are_errors(cut):
    with pytest.raises(ProfilingError):
        parse_fid_events(pack_fid_event(FAN_OPEN, (DFID,))[:cut])


def test_bad_handle_size_is_an_error():
    raw = bytearray(pack_fid_event(FAN_OPEN, (FID,)))
    raw[24 + 4 + 8:24 + 4 + 8 + 4] = (200).to_bytes(4, "little")
    with pytest.raises(ProfilingError, match="handle size"):
        parse_fid_events(bytes(raw))


def test_handle_table_walks_without_following_symlinks(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    (tmp_path / "g").write_text("y")
    os.link(tmp_path / "g", tmp_path / "h")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    table = HandleTable(str(tmp_path))
    key, _ = name_to_handle_at(str(tmp_path / "a" / "b" / "f"))
    assert table.lookup(key) == "a/b/f"
    assert table.lookup(name_to_handle_at(str(tmp_path / "h"))[0]) == "g"  # first in order
    assert table.lookup(name_to_handle_at(str(tmp_path))[0]) == "."
    followed, _ = name_to_handle_at(str(tmp_path / "link"), follow=True)
    assert table.lookup(followed) == "a"
    assert table.resolve(RawFidEvent(FAN_OPEN, 0, (FidInfo(
        FAN_EVENT_INFO_TYPE_DFID_NAME, (0, 0), key[0], name_to_handle_at(
            str(tmp_path / "a"))[0][1], "new"),))) == "a/new"


SCRIPT = r'''
import json, os, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
from profiler.fanotify import FidWatcher
from profiler.errors import ProfilingError
out = {"uid": os.getuid()}
d = tempfile.mkdtemp(dir=sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "estargz-test", d], check=True)
os.makedirs(f"{d}/usr/lib/python3")
for n in ["usr/bin-python", "usr/lib/python3/json.py", "usr/lib/python3/os.py", "etc"]:
    with open(f"{d}/{n}", "w") as f:
        f.write(n)
for report_name in (False, True):
    with FidWatcher(d, report_name=report_name) as w:
        for n in ["etc", "usr/lib/python3/os.py", "usr/bin-python", "usr/lib/python3/json.py",
                  "etc"]:
            with open(f"{d}/{n}") as f:
                f.read()
        with open(f"{d}/created-later", "w") as f:
            f.write("x")
        with open(f"{d}/created-later") as f:
            f.read()
        out[str(report_name)] = [[e.path, e.mask, e.kind.value] for e in w.events(timeout=0.3)]
        out["overflowed"] = w.overflowed
# Overlay mounted in the namespace refuses mount marks: the error says so.
os.makedirs(f"{d}/lo"); os.makedirs(f"{d}/up"); os.makedirs(f"{d}/wk"); os.makedirs(f"{d}/ov")
r = subprocess.run(["mount", "-t", "overlay", "ov", "-o",
                    f"lowerdir={d}/lo,upperdir={d}/up,workdir={d}/wk", f"{d}/ov"])
if r.returncode == 0:
    try:
        FidWatcher(f"{d}/ov").open()
        out["overlay"] = "accepted"
    except ProfilingError as e:
        out["overlay"] = str(e)
print(json.dumps(out))
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_rootless_watch_resolves_paths_in_order():
    if not os.path.exists("/usr/bin/python3") or not shutil.which("unshare"):
        pytest.skip("needs Debian's /usr/bin/python3 and unshare")
    public = Path(tempfile.mkdtemp(prefix="estargz-nobody-"))
    try:
        public.chmod(0o777)
        (public / "profiler" / "fanotify").mkdir(parents=True)
        for name in ("__init__.py", "linux.py", "fanotify/__init__.py", "fanotify/events.py",
                     "fanotify/classic.py", "fanotify/fid.py"):
            shutil.copy(REPO / "profiler" / name, public / "profiler" / name)
        (public / "profiler" / "errors.py").write_text(
            "class ProfilingError(Exception):\n    pass\n")
        (public / "s.py").write_text(SCRIPT)
        for p in [public, *public.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "unshare", "-Urm", "/usr/bin/python3", public / "s.py", public],
                           capture_output=True, text=True, cwd="/", timeout=60,
                           env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/nonexistent"})
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
    finally:
        shutil.rmtree(public)
    assert out["uid"] == 0  # root in its own namespace, nobody outside
    expected = ["etc", "usr/lib/python3/os.py", "usr/bin-python", "usr/lib/python3/json.py"]
    by_handle = [path for path, _, _ in out["False"]]
    # Repeated reads of etc merge into its first event: first-access order.
    assert by_handle[:4] == expected
    assert all(kind == "open" and mask & FAN_OPEN for _, mask, kind in out["False"])
    # A file created after the walk has no handle in the table...
    assert by_handle[4:] and all(p is None for p in by_handle[4:])
    # ... but with FAN_REPORT_DFID_NAME its directory and name resolve it.
    by_name = [path for path, _, _ in out["True"]]
    assert by_name[:4] == expected and set(by_name[4:]) == {"created-later"}
    assert out["overflowed"] is False
    if "overlay" in out:  # mounting overlay in a user namespace needs Linux 5.11
        assert "Operation not supported" in out["overlay"] and "overlayfs" in out["overlay"]


def test_a_root_without_file_handles_is_an_error_not_an_empty_table():
    """procfs has no file handles, as every file is under a seccomp profile
    that refuses name_to_handle_at: the profile would record nothing."""
    with pytest.raises(ProfilingError, match="cannot get file handles"):
        HandleTable("/proc/sys/kernel")
