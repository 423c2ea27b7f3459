"""`profiler.capabilities.probe` and `estargz doctor`, as root and as nobody."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import profiler.capabilities as caps
from conftest import REPO, make_readable, public_dir, run_cli
from profiler.capabilities import Mode, probe

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}


@pytest.fixture(scope="module")
def nobody_profiler():
    """profiler's fanotify modules copied where nobody can read them, with a
    stub ``errors`` so Debian's stdlib-only /usr/bin/python3 can import them."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs Debian's /usr/bin/python3")
    public = public_dir()
    (public / "profiler" / "fanotify").mkdir(parents=True)
    for name in ("__init__.py", "linux.py", "capabilities.py", "fanotify/__init__.py",
                 "fanotify/events.py", "fanotify/classic.py", "fanotify/fid.py"):
        shutil.copy(REPO / "profiler" / name, public / "profiler" / name)
    (public / "profiler" / "errors.py").write_text(
        "class ProfilingError(Exception):\n    pass\n")
    make_readable(public)
    yield public
    shutil.rmtree(public)


def _by_name(modes: list) -> dict:
    return {m["name"] if isinstance(m, dict) else m.name: m for m in modes}


def test_probe_shape_and_speed():
    started = time.monotonic()
    modes = probe()
    assert time.monotonic() - started < 1.0
    assert [m.name for m in modes] == ["root", "rootless"]
    for m in modes:
        assert isinstance(m, Mode) and m.checks
        assert m.supported == (not m.reasons)
        for name, ok, detail in m.checks:
            assert isinstance(name, str) and isinstance(ok, bool) and detail
        if not m.supported:
            assert any(not c.ok for c in m.checks)
        json.dumps(m.to_dict())


@root_only
def test_probe_as_root_supports_root_mode():
    modes = _by_name(probe())
    root = modes["root"]
    assert root.supported, root.reasons
    assert [c.name for c in root.checks] == ["privileges", "fanotify", "overlayfs",
                                             "OCI runtime"]
    assert all(c.ok for c in root.checks)
    # As root the rootless probe answers for an unprivileged user, and on this
    # machine (user namespaces allowed, kernel >= 5.13) it works.
    rootless = modes["rootless"]
    assert rootless.supported, rootless.reasons
    names = [c.name for c in rootless.checks]
    assert "drop to nobody" in names and names[-2:] == ["event on read", "OCI runtime"]


@root_only
def test_probe_as_nobody(nobody_profiler):
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]);"
              "from profiler.capabilities import probe;"
              "print(json.dumps([m.to_dict() for m in probe()]))")
    p = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", script, nobody_profiler],
                       capture_output=True, text=True, cwd="/", env=ENV, timeout=30)
    assert p.returncode == 0, p.stderr
    modes = _by_name(json.loads(p.stdout))
    root = modes["root"]
    assert not root["supported"]
    assert any("root" in r and "CAP_SYS_ADMIN" in r for r in root["reasons"]), root
    checks = {c["name"]: c for c in root["checks"]}
    assert not checks["privileges"]["ok"] and not checks["fanotify"]["ok"]
    rootless = modes["rootless"]
    assert rootless["supported"], rootless["reasons"]
    assert [c["name"] for c in rootless["checks"]][-7:] == [
        "uid_map/gid_map", "/proc", "mount tmpfs", "fanotify_init(FAN_REPORT_FID)",
        "fanotify_mark(FAN_MARK_MOUNT)", "event on read", "OCI runtime"]
    assert rootless["checks"][-1]["detail"].startswith("runc (")
    assert "drop to nobody" not in [c["name"] for c in rootless["checks"]]
    # The probe cleans up its mount point.
    assert not list(Path(tempfile.gettempdir()).glob("estargz-probe-*"))


def test_rootless_reports_disabled_user_namespaces(monkeypatch):
    real = caps._sysctl
    monkeypatch.setattr(caps, "_sysctl", lambda path: 0 if "max_user_namespaces" in path
                        else real(path))
    mode = caps.probe_rootless()
    assert not mode.supported
    assert mode.reasons[0] == ("user namespaces are disabled (sysctl "
                               "user.max_user_namespaces = 0)")
    assert mode.checks[-1].name == "namespace probe" and not mode.checks[-1].ok


def test_probe_never_raises(monkeypatch):

    def boom():
        raise RuntimeError("kaput")
    monkeypatch.setattr(caps, "probe_root", boom)
    modes = caps.probe()
    assert modes[0].name == "root" and not modes[0].supported
    assert modes[0].reasons == ["the probe failed: kaput"]
    assert modes[1].name == "rootless"


def test_doctor_json_shape():
    r = run_cli("doctor", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert [m["name"] for m in out["modes"]] == ["root", "rootless"]
    for m in out["modes"]:
        assert set(m) == {"name", "supported", "used_by_optimize", "reasons", "checks"}
        assert isinstance(m["supported"], bool)
        assert all(set(c) == {"name", "ok", "detail"} for c in m["checks"])
    # This machine's /proc is not masked: a profile mounts a procfs of its own
    # (tests/test_tool_image.py sees the masked case, in a container).
    proc = [c for c in out["modes"][1]["checks"] if c["name"] == "/proc"]
    assert proc == [{"name": "/proc", "ok": True,
                     "detail": "a new procfs mounts: the workload gets a /proc of its own"}]
    # optimize profiles as root when it can, rootless otherwise.
    expected = [True, False] if os.geteuid() == 0 else [False, True]
    assert [m["used_by_optimize"] for m in out["modes"]] == expected


def test_doctor_human():
    r = run_cli("doctor")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("root: ")
    assert any(ln.startswith("rootless: ") for ln in lines)
    assert any(ln.startswith("  [ok] ") or ln.startswith("  [no] ") for ln in lines)


@root_only
def test_doctor_require_as_root():
    assert run_cli("doctor", "--require", "root").code == 0
    assert run_cli("doctor", "--require", "rootless", "--json").code == 0


@root_only
def test_doctor_require_root_as_nobody(unprivileged):
    def doctor(*args):
        return subprocess.run([*NOBODY, unprivileged, "doctor", *args], capture_output=True,
                              text=True, cwd="/", env=ENV, timeout=60)
    r = doctor("--require", "root")
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("estargz: error: profiling mode root is not supported: "
                               "not root and no CAP_SYS_ADMIN (running as uid 65534)")
    assert r.stderr.strip().endswith("; run as root")
    assert "root: not supported\n" in r.stdout
    assert "rootless: supported (what estargz optimize uses for this user)" in r.stdout
    r = doctor("--require", "rootless", "--json")
    assert r.returncode == 0, r.stderr
    assert _by_name(json.loads(r.stdout)["modes"])["rootless"]["supported"]
