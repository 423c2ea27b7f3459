"""`estargz optimize` as an ordinary user: a dedicated account, created for the
tests, runs the CLI from a world-readable venv.

The image is flattened onto a tmpfs in a user namespace of the profiler's
own, the workload runs under runc in it, and fanotify (FID mode) records
what it reads.  The record must be the one root gets; the limits (memory,
user namespaces, the fanotify queue) must give one clear line; and an
interrupted run must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Account, make_readable, public_dir, run_cli, start_until
from profiler.errors import ProfilingError
from profiler.rootless import WRITE_ROOM, available_memory, check_memory
from profiler.sandbox import ProcessSpec, ResolvedUser, SandboxOptions, build_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates an account (root)")

#: The note of a rootless run where no cgroups are delegated to the user.
NO_LIMITS = ("no memory or pids limit on the workload: cgroups are not delegated to this user"
             " (our memory and pids cgroups are not writable, and no cgroup v2 one is delegated)")


@pytest.fixture(scope="module")
def public(test_images):
    """A directory the account can read, holding a copy of the Debian + python3
    image, and a writable ``out`` directory per test."""
    d = public_dir("estargz-rootless-")
    shutil.copytree(test_images.debian_python3, d / "py")
    make_readable(d)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def out(public, rootless_user):
    d = public / f"out-{time.monotonic_ns()}"
    d.mkdir()
    os.chown(d, rootless_user.uid, rootless_user.gid)
    yield d
    shutil.rmtree(d)


def as_user(user: Account, estargz: Path, *args: object, tmp: Path,
            timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(user.argv(estargz, *args), capture_output=True, text=True, cwd="/",
                          env=user.env(TMPDIR=str(tmp)), timeout=timeout, **popen)


def test_same_record_and_image_as_root(public, out, rootless_user, unprivileged, tmp_path):
    """debian-python3's own workload (python3 -c 'import json'): the rootless
    record is root's, file for file and in the same order, and so the
    optimized image is byte-identical."""
    image = f"oci:{public / 'py'}:latest"
    root_record = tmp_path / "root.jsonl"
    r = run_cli("optimize", image, f"oci:{tmp_path / 'root-out'}:opt", "--record-out",
                root_record, "--json")
    assert r.code == 0, r.err
    as_root = r.json()

    user_record = out / "user.jsonl"
    p = as_user(rootless_user, unprivileged, "optimize", image, f"oci:{out / 'img'}:opt",
                "--record-out", user_record, "--json", tmp=out)
    assert p.returncode == 0, p.stderr
    rootless = json.loads(p.stdout)

    root_lines = root_record.read_text().splitlines()
    user_lines = user_record.read_text().splitlines()
    assert len(root_lines) >= 40
    assert user_lines == root_lines
    assert [json.loads(ln)["path"] for ln in user_lines[:3]] == \
        ["etc/passwd", "etc/group", "usr/bin/python3.11"]
    # Same output format, same result.
    assert rootless.keys() == as_root.keys()
    assert rootless["image"]["digest"] == as_root["image"]["digest"]
    assert rootless["manifest"] == as_root["manifest"]
    assert [(a["path"], a["layer"], a["size"], a["kind"]) for a in rootless["accessed"]] == \
        [(a["path"], a["layer"], a["size"], a["kind"]) for a in as_root["accessed"]]
    # This machine delegates no cgroups to the account (cgroup v1, root's):
    # the one difference is the note that says so (tests/test_sandbox_limits.py).
    assert as_root["notes"] == []
    assert rootless["notes"] == [NO_LIMITS]
    # The output belongs to the user; nothing is left in its TMPDIR.
    assert (out / "img" / "index.json").stat().st_uid == rootless_user.uid
    assert sorted(p.name for p in out.iterdir()) == ["img", "user.jsonl"]
    assert rootless_user.processes() == []


def test_dynamic_loader_and_exec_are_recorded(public, out, rootless_user, unprivileged):
    """Every access counts from the first instruction: after what the runtime
    reads (etc/passwd, etc/group), the binary (exec), the dynamic loader the
    kernel maps, then libc, in that order."""
    p = as_user(rootless_user, unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                "--no-optimize", "--record-out", out / "r.jsonl", "--entrypoint", '["/bin/true"]',
                tmp=out)
    assert p.returncode == 0, p.stderr
    paths = [json.loads(ln)["path"] for ln in (out / "r.jsonl").read_text().splitlines()]
    assert paths[:2] == ["etc/passwd", "etc/group"]
    assert paths[2] == "usr/bin/true"
    assert paths[3] == "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert "usr/lib/x86_64-linux-gnu/libc.so.6" in paths[4:6]


def test_the_sandbox_holds(public, out, rootless_user, unprivileged):
    """The workload is root only inside: its uid 0 is the account outside, it
    sees its own processes only, may not mount, and what it writes stays on
    the throw-away tmpfs."""
    script = ("cat /proc/self/uid_map; ls /proc 2>/dev/null | grep -cE '^[0-9]+$'; "
              "mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo mount-refused; "
              "echo x > /escape-marker && echo wrote; id -u")
    p = as_user(rootless_user, unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                "--no-optimize", "--entrypoint", '["/bin/sh", "-c"]',
                "--args", json.dumps([script]), tmp=out)
    assert p.returncode == 0, p.stderr
    lines = [ln.removeprefix("workload: ").strip() for ln in p.stderr.splitlines()
             if ln.startswith("workload: ")]
    assert lines[0].split() == ["0", str(rootless_user.uid), "1"]
    assert int(lines[1]) <= 3          # sh, ls, grep: nothing of the host
    assert lines[2] == "mount-refused"
    assert lines[3:] == ["wrote", "0"]
    found = subprocess.run(["find", "/tmp", "/var/tmp", str(out), "-name", "escape-marker"],
                           capture_output=True, text=True)
    assert found.stdout == ""
    assert rootless_user.processes() == []


def masked_proc(argv: list[str]) -> list[str]:
    """``argv`` run in a mount namespace whose /proc is masked as Docker masks
    it (the sandbox's own lists are Docker's), made by root before the
    account's user namespace copies it: there, as in a container started
    without ``systempaths=unconfined``, the kernel refuses a new procfs."""
    docker = build_spec("/r", ProcessSpec(["/bin/true"]), SandboxOptions(), ResolvedUser(0, 0),
                        "id")["linux"]
    steps = []
    for path in (p for p in docker["maskedPaths"] if p.startswith("/proc/") and os.path.exists(p)):
        steps.append(f"mount -t tmpfs -o ro tmpfs {path}" if os.path.isdir(path)
                     else f"mount --bind /dev/null {path}")
    for path in (p for p in docker["readonlyPaths"] if os.path.exists(p)):
        steps.append(f"mount --bind {path} {path} && mount -o remount,bind,ro {path}")
    assert steps
    return ["unshare", "--mount", "--propagation", "private", "sh", "-euc",
            " && ".join(steps) + ' && exec "$@"', "sh", *argv]


def test_masked_proc_same_record_as_root(public, out, rootless_user, unprivileged, tmp_path):
    """Under a masked /proc the profile runs in the caller's PID namespace
    with its /proc, bound into the container: the record is still root's,
    byte for byte."""
    image = f"oci:{public / 'py'}:latest"
    root_record = tmp_path / "root.jsonl"
    r = run_cli("optimize", image, "--no-optimize", "--record-out", root_record)
    assert r.code == 0, r.err
    argv = rootless_user.argv(unprivileged, "optimize", image, "--no-optimize",
                              "--record-out", out / "user.jsonl")
    p = subprocess.run(masked_proc(argv), capture_output=True, text=True, cwd="/",
                       env=rootless_user.env(TMPDIR=str(out)), timeout=300)
    assert p.returncode == 0, p.stderr
    assert (out / "user.jsonl").read_bytes() == root_record.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["user.jsonl"]
    assert rootless_user.processes() == []


def test_masked_proc_what_the_workload_sees(public, out, rootless_user, unprivileged):
    """What differs under a masked /proc (docs/profiling.md): the workload's
    /proc lists the caller's processes; it still may not mount, Docker's
    masks stay, /proc/sys stays read-only, and its writes stay on the tmpfs."""
    # The caller's processes that hold the secret in their environment (the
    # CLI, the namespace helper and its child; the patterns do not match this
    # script): is it read (0), or is environ closed (2)?
    peek = ("for d in /proc/[0-9]*; do (tr '\\0' ' ' < $d/cmdline) 2>/dev/null"
            " | grep -q -e 'bin/estarg[z] optimize' -e 'profiler[.]rootless' || continue;"
            " grep -qa TOKEN $d/environ 2>/dev/null; echo $?; done | sort | uniq -c")
    script = (peek + "; ls /proc 2>/dev/null | grep -cE '^[0-9]+$'; wc -c < /proc/keys; "
              "(echo 1 > /proc/sys/kernel/printk) 2>/dev/null && echo sys-writable"
              " || echo sys-read-only; "
              "umount /proc/keys 2>/dev/null && echo unmounted || echo umount-refused; "
              "mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo mount-refused; "
              "echo x > /escape-marker && echo wrote; id -u")
    argv = rootless_user.argv(unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                              "--no-optimize", "--entrypoint", '["/bin/sh", "-c"]',
                              "--args", json.dumps([script]))
    p = subprocess.run(masked_proc(argv), capture_output=True, text=True, cwd="/",
                       env=rootless_user.env(TMPDIR=str(out), SECRET="TOKEN"), timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [ln.removeprefix("workload: ").strip() for ln in p.stderr.splitlines()
             if ln.startswith("workload: ")]
    # Seen, but closed: the CLI is in the parent user namespace, the helper
    # holds capabilities the workload lacks (the kernel's ptrace access check).
    count, status = lines.pop(0).split()
    assert status == "2" and int(count) >= 3
    assert int(lines[0]) > 3           # the caller's processes too
    assert lines[1:] == ["0", "sys-read-only", "umount-refused", "mount-refused", "wrote", "0"]
    found = subprocess.run(["find", "/tmp", "/var/tmp", str(out), "-name", "escape-marker"],
                           capture_output=True, text=True)
    assert found.stdout == ""
    assert rootless_user.processes() == []


def test_sigint_leaves_nothing(public, out, rootless_user, unprivileged):
    tmp = out / "tmp"
    tmp.mkdir()
    os.chown(tmp, rootless_user.uid, rootless_user.gid)
    p, lines = start_until(
        rootless_user.argv(unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                           f"oci:{out / 'o'}", "--entrypoint", '["/bin/sh", "-c"]',
                           "--args", '["echo started; sleep 1000"]', "--period", "60"),
        cwd="/", env=rootless_user.env(TMPDIR=str(tmp)))
    assert any("workload: started" in ln for ln in lines), lines
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130
    assert rest.strip().splitlines() == ["estargz: error: interrupted"]
    assert not (out / "o").exists()
    assert list(tmp.iterdir()) == []
    assert rootless_user.processes() == []


def test_wait_on_signal_ends_the_profile_normally(public, out, rootless_user, unprivileged):
    """--wait-on-signal: SIGINT reaches the sandbox through the namespace helper
    and ends the run with a record, not an interruption."""
    p, lines = start_until(
        rootless_user.argv(unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                           "--no-optimize", "--wait-on-signal", "--record-out", out / "r.jsonl",
                           "--entrypoint", '["/bin/sh", "-c"]',
                           "--args", '["cat /etc/os-release; echo started; sleep 1000"]'),
        cwd="/", env=rootless_user.env(TMPDIR=str(out)))
    assert "workload: started" in lines[-1]
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 0, rest
    paths = [json.loads(ln)["path"] for ln in (out / "r.jsonl").read_text().splitlines()]
    assert "usr/lib/os-release" in paths
    assert rootless_user.processes() == []


def test_sigkill_of_the_cli_leaves_no_process(public, out, rootless_user, unprivileged):
    """Even killed outright, the CLI takes the namespace and workload with it."""
    p, lines = start_until(
        rootless_user.argv(unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                           "--no-optimize", "--entrypoint", '["/bin/sh", "-c"]',
                           "--args", '["echo started; sleep 1000"]', "--period", "60"),
        cwd="/", env=rootless_user.env(TMPDIR=str(out)))
    assert "workload: started" in lines[-1]
    p.kill()
    p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while rootless_user.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rootless_user.processes() == []


def test_image_user_that_cannot_be_mapped(public, out, rootless_user, unprivileged):
    p = as_user(rootless_user, unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                f"oci:{out / 'o'}", "--user", "nobody", tmp=out)
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "estargz: error: the workload runs as uid 65534, gid 65534, but without root only "
        "root can be mapped into the sandbox's user namespace; run as root, or give --user 0")
    assert not (out / "o").exists()


@pytest.fixture
def sysctl():
    """Set sysctls for one test; restored after, whatever happens."""
    saved: dict[Path, str] = {}

    def set_(name: str, value: str) -> None:
        knob = Path("/proc/sys") / name.replace(".", "/")
        saved.setdefault(knob, knob.read_text())
        knob.write_text(value + "\n")
    yield set_
    for knob, value in saved.items():
        knob.write_text(value)


# Runs argv as UID:GID in a user namespace (identity-mapped, so the account is
# itself) whose user.max_user_namespaces is 0: no user namespace can be made
# below it, as on a machine where the administrator disabled them.  (The host's
# own sysctl may be read-only, as it is here; this one is the namespace's.)
_NO_USERNS = """
import ctypes, os, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
uid, gid, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:
        os._exit(90)
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.execvp(argv[0], argv)
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 4294967295")
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_user_namespaces_disabled(public, out, rootless_user, unprivileged):
    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _NO_USERNS, str(rootless_user.uid),
                               str(rootless_user.gid), str(unprivileged), *map(str, args)],
                              capture_output=True, text=True, cwd="/",
                              env=rootless_user.env(TMPDIR=str(out)), timeout=120)
    p = run("optimize", f"oci:{public / 'py'}:latest", f"oci:{out / 'o'}")
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == (
        "estargz: error: cannot profile without root here: user namespaces are disabled "
        "(sysctl user.max_user_namespaces = 0); run as root, or give --prefetch-list to "
        "prioritize files without a run")
    assert not (out / "o").exists()
    d = run("doctor")
    assert "rootless: not supported" in d.stdout
    assert "  missing: user namespaces are disabled (sysctl user.max_user_namespaces = 0)" \
        in d.stdout.splitlines()


def test_fanotify_queue_overflow_is_reported(public, out, rootless_user, unprivileged, sysctl):
    """An unprivileged group has a bounded queue (max_queued_events, here made
    16).  The profiler is stopped while the workload reads 175 files, so the
    queue overflows for sure; the result must say the record may be short."""
    sysctl("fs.fanotify.max_queued_events", "16")
    p = subprocess.Popen(
        rootless_user.argv(unprivileged, "optimize", f"oci:{public / 'py'}:latest",
                           "--no-optimize", "--record-out", out / "r.jsonl", "--json",
                           "--entrypoint", '["/bin/sh", "-c"]', "--args",
                           '["echo ready >&2; sleep 1; cat /usr/lib/python3.11/*.py >/dev/null"]'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        env=rootless_user.env(TMPDIR=str(out)))
    try:
        def pgrep(pattern: str) -> list[str]:
            return subprocess.run(["pgrep", "-u", str(rootless_user.uid), "-f", "--", pattern],
                                  capture_output=True, text=True).stdout.split()

        # Stop the profiler only once the workload runs (its `sleep 1` comes
        # before the reads): a fixed delay was too short on a loaded machine.
        deadline = time.monotonic() + 120
        while not pgrep("^sleep 1$") and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        helpers = pgrep("-m profiler.rootless")
        assert helpers, "the user-namespace helper is not running"
        for pid in helpers:
            os.kill(int(pid), signal.SIGSTOP)
        time.sleep(3)
        for pid in helpers:
            os.kill(int(pid), signal.SIGCONT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["notes"] == [NO_LIMITS,
                               "the fanotify queue overflowed: the record may be incomplete"]
    # What did arrive is still recorded, in order, from the entrypoint on.
    paths = [json.loads(ln)["path"] for ln in (out / "r.jsonl").read_text().splitlines()]
    assert paths[:3] == ["etc/passwd", "etc/group", "usr/bin/dash"]


def test_not_enough_memory_for_the_tmpfs(public, out, rootless_user, unprivileged):
    """In a memory cgroup too small for the image plus room for writes, it
    refuses before extracting anything."""
    cg = Path("/sys/fs/cgroup/memory") / f"estargz-rootless-{os.getpid()}"
    if not cg.parent.is_dir():
        pytest.skip("needs the cgroup v1 memory controller")
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(192 << 20))
        enter = f"echo $$ > {cg}/cgroup.procs && exec \"$@\""
        p = subprocess.run(["sh", "-c", enter, "sh",
                            *rootless_user.argv(unprivileged, "optimize",
                                                f"oci:{public / 'py'}:latest", f"oci:{out / 'o'}")],
                           capture_output=True, text=True, cwd="/",
                           env=rootless_user.env(TMPDIR=str(out)), timeout=120)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(rootless_user.uid)], check=False)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert p.returncode == 1, p.stderr
    line = p.stderr.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("estargz: error: rootless profiling holds the root filesystem in "
                           "memory: it needs ")
    assert "MiB for the workload's writes) but only " in line
    assert line.endswith("is available; free memory, or run as root (overlayfs, nothing copied)")
    assert not (out / "o").exists()
    assert [p.name for p in out.iterdir()] == []


# --- the pieces, without running anything ---------------------------------------

def test_check_memory_sizes_the_tmpfs_or_refuses():
    assert check_memory(100 << 20, available=1 << 30) == (100 << 20) + WRITE_ROOM
    with pytest.raises(ProfilingError) as e:
        check_memory(900 << 20, available=1 << 30)
    assert str(e.value) == (
        "rootless profiling holds the root filesystem in memory: it needs 1156 MiB (layers "
        "900 MiB + 256 MiB for the workload's writes) but only 1024 MiB is available; free "
        "memory, or run as root (overlayfs, nothing copied)")


def test_available_memory_is_bounded_by_meminfo():
    with open("/proc/meminfo") as f:
        total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    avail = available_memory()
    assert avail is not None and 0 < avail <= total


def test_rootless_spec_differs_only_where_a_user_namespace_requires():
    args = ("/r", ProcessSpec(["/bin/true"]), SandboxOptions(), ResolvedUser(0, 0), "id")
    root, rootless = build_spec(*args), build_spec(*args, rootless=True)
    assert "resources" not in rootless["linux"] and "cgroupsPath" not in rootless["linux"]
    mounts = {m["destination"]: m for m in rootless["mounts"]}
    assert "/sys/fs/cgroup" not in mounts
    assert mounts["/sys"] == {"destination": "/sys", "type": "none", "source": "/sys",
                              "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
    assert "gid=5" not in mounts["/dev/pts"]["options"]
    # Everything else is the root spec's: process, namespaces, masked paths.
    assert rootless["process"] == root["process"]
    for key in ("namespaces", "devices", "maskedPaths", "readonlyPaths"):
        assert rootless["linux"][key] == root["linux"][key]


def test_soci_index_and_optimize_soci_without_root(public, out, rootless_user, unprivileged,
                                                   tmp_path):
    """``soci create`` and ``optimize --soci`` need no daemon and no root:
    as the account, the same SOCI index as root's, and from the same
    profile the same prefetch artifacts (issue 14, point 1 and 3)."""
    image = f"oci:{public / 'py'}:latest"
    for args in (("soci", "create"), ("optimize", "--soci")):
        r = run_cli(*args, image, f"oci:{tmp_path / 'root'}:{args[0]}", "--json")
        assert r.code == 0, r.err
        p = as_user(rootless_user, unprivileged, *args, image, f"oci:{out / 'img'}:{args[0]}",
                    "--json", tmp=out)
        assert p.returncode == 0, p.stderr
        mine = json.loads(p.stdout)
        theirs = r.json()
        if args[0] == "optimize":
            mine, theirs = mine["soci"], theirs["soci"]
            assert all(x["prefetch"] for x in mine["indexes"][0]["layers"])
        assert mine["digest"] == theirs["digest"]
    assert (out / "img" / "index.json").stat().st_uid == rootless_user.uid
    assert rootless_user.processes() == []


def test_bind_proc_changes_only_the_proc_mount():
    """Under a masked /proc the runtime gets the caller's /proc, recursively
    (Docker's masks are locked mounts below it), never a new procfs."""
    args = ("/r", ProcessSpec(["/bin/true"]))
    plain = build_spec(*args, SandboxOptions(), ResolvedUser(0, 0), "id", rootless=True)
    bound = build_spec(*args, SandboxOptions(bind_proc=True), ResolvedUser(0, 0), "id",
                       rootless=True)
    changed = [(a, b) for a, b in zip(plain["mounts"], bound["mounts"], strict=True) if a != b]
    assert changed == [({"destination": "/proc", "type": "proc", "source": "proc",
                         "options": ["nosuid", "noexec", "nodev"]},
                        {"destination": "/proc", "type": "bind", "source": "/proc",
                         "options": ["rbind", "nosuid", "noexec", "nodev"]})]
    assert {k: v for k, v in bound.items() if k != "mounts"} == \
        {k: v for k, v in plain.items() if k != "mounts"}
