"""What `estargz optimize` leaves when it is killed, and what its workload may
use: issue 11, points 4 (the sandbox part) and 7.

* SIGKILL of the CLI as root, mid-profile: the container's processes die at
  once (the profile runs in a PID namespace whose init dies with the CLI),
  nothing stays mounted (the overlay and its tmpfs live in a mount
  namespace that dies with it), and the next run removes the runtime's
  state, the cgroups and the work directory, and succeeds.
* The workload's writes land on a tmpfs of `--scratch-size` MiB, never on
  the host's disk; filling it gives ENOSPC and a note in the report.
* Without root, a memory and pids limit where the user has cgroups
  delegated (here: cgroup v1 directories given to the account, as
  `cgcreate -a -t` does), else a note that there is none.
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

from conftest import REPO, make_readable, public_dir, start_until
from daemons import mounts_under
from profiler.linux import MS_NODEV, MS_NOSUID, filesystem_full, mount, umount
from test_rootless import NO_LIMITS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="profiling as root, cgroups")


def estargz(*args: object) -> list[str]:
    return [sys.executable, "-m", "estargz", *map(str, args)]


def pids_running(marker: str) -> list[int]:
    """Pids whose command line is exactly ``sleep MARKER``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def cgroup_of(pid: int, controller: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    raise AssertionError(f"no {controller} cgroup for {pid}")


def until(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- SIGKILL as root ------------------------------------------------------------------

def test_sigkill_as_root_leaves_no_process_or_mount_and_the_next_run_sweeps(
        tmp_path, test_images):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    p, lines = start_until(estargz("optimize", f"oci:{test_images.busybox}:latest",
                                   "--no-optimize", "--period", "60",
                                   "--entrypoint", '["/bin/sh", "-c"]',
                                   "--args", '["echo started; exec sleep 10451"]'),
                           cwd=REPO, env=env)
    try:
        assert any("workload: started" in ln for ln in lines), lines
        assert until(lambda: pids_running("10451"))
        [sleeper] = pids_running("10451")
        pids_cgroup = Path("/sys/fs/cgroup/pids") / cgroup_of(sleeper, "pids").lstrip("/")
        [work] = tmp.iterdir()
        [state] = work.glob("estargz-profile-*/state/estargz-profile-*")
        assert (pids_cgroup / "cgroup.procs").read_text().split() == [str(sleeper)]
    finally:
        p.kill()
        p.wait(timeout=10)
    # Within seconds, whatever we look at: the workload, the helper, the mounts.
    assert until(lambda: not pids_running("10451"))
    assert until(lambda: (pids_cgroup / "cgroup.procs").read_text() == "")
    helpers = subprocess.run(["pgrep", "-f", "-m", "profiler.rootless"],
                             capture_output=True, text=True)
    assert helpers.stdout == ""
    assert mounts_under(tmp) == []
    # What the kernel does not remove: the runtime's state, the emptied cgroup
    # and the work directory ...
    assert state.is_dir() and pids_cgroup.is_dir()
    # ... the next run does, and succeeds.
    r = subprocess.run(estargz("optimize", f"oci:{test_images.busybox}:latest",
                               "--no-optimize", "--args", '["true"]', "--json"),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["notes"] == []
    assert not pids_cgroup.exists()
    assert list(tmp.iterdir()) == []


def test_a_live_run_is_not_swept(tmp_path, test_images):
    """Two runs at once in one TMPDIR: the second leaves the first's
    directory alone (it holds its lock), and the first ends normally."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    first, lines = start_until(
        estargz("optimize", f"oci:{test_images.busybox}:latest", "--no-optimize",
                "--period", "3", "--entrypoint", '["/bin/sh", "-c"]',
                "--args", '["echo started; exec sleep 10452"]'), cwd=REPO, env=env)
    assert any("workload: started" in ln for ln in lines), lines
    second = subprocess.run(estargz("optimize", f"oci:{test_images.busybox}:latest",
                                    "--no-optimize", "--args", '["true"]'),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert pids_running("10452")
    rest = first.stderr.read()
    assert first.wait(timeout=60) == 0, rest
    assert list(tmp.iterdir()) == []


# --- what the workload may write, as root ---------------------------------------------

def test_filling_the_scratch_space_gives_enospc_and_a_note(tmp_path, test_images):
    """64 MiB written into a 16 MiB scratch space: the writes stop at 16 MiB
    with ENOSPC, in a tmpfs (nothing reaches the host's disk), and the run
    still ends with its record and a note saying what happened."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    record = tmp_path / "r.jsonl"
    script = ("dd if=/dev/zero of=/fill bs=1M count=64; stat -c 'size %s' /fill;"
              " echo started; exec sleep 10453")
    p, lines = start_until(estargz("optimize", f"oci:{test_images.busybox}:latest",
                                   "--no-optimize", "--scratch-size", "16", "--period", "60",
                                   "--record-out", record, "--entrypoint", '["/bin/sh", "-c"]',
                                   "--args", json.dumps([script])),
                           cwd=REPO, env={**os.environ, "TMPDIR": str(tmp)})
    try:
        assert any("No space left on device" in ln for ln in lines), lines
        size = int(next(ln for ln in lines if "workload: size " in ln).split()[-1])
        assert 15 << 20 <= size <= 16 << 20
        # The file is in the container's tmpfs, not on our disk.
        du = subprocess.run(["du", "-s", "-B1", str(tmp)], capture_output=True, text=True)
        assert int(du.stdout.split()[0]) < 8 << 20, du.stdout
        [sleeper] = pids_running("10453")
        st = os.statvfs(f"/proc/{sleeper}/root/")
        assert st.f_blocks * st.f_frsize == 16 << 20
    finally:
        p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    assert p.returncode == 130  # interrupted: the record is not written
    r = subprocess.run(estargz("optimize", f"oci:{test_images.busybox}:latest",
                               "--no-optimize", "--scratch-size", "16", "--record-out", record,
                               "--entrypoint", '["/bin/sh", "-c"]',
                               "--args", '["dd if=/dev/zero of=/fill bs=1M count=64"]'),
                       cwd=REPO, env={**os.environ, "TMPDIR": str(tmp)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "workload: dd: error writing '/fill': No space left on device" in r.stderr
    assert ("note: the workload filled the 16 MiB it may write (--scratch-size): its writes"
            " failed with ENOSPC from then on, so it may have read less than it would have"
            in r.stdout)
    assert "bin/busybox" in record.read_text()
    assert list(tmp.iterdir()) == []


def test_filesystem_full_on_a_real_tmpfs(tmp_path):
    mnt = tmp_path / "t"
    mnt.mkdir()
    mount("tmpfs", str(mnt), "tmpfs", MS_NOSUID | MS_NODEV, "size=4m")
    try:
        (mnt / "some").write_bytes(b"x" * (1 << 20))
        assert not filesystem_full(str(mnt))
        with pytest.raises(OSError) as e, open(mnt / "fill", "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
        assert e.value.strerror == "No space left on device"
        assert filesystem_full(str(mnt))
    finally:
        umount(str(mnt))


# --- without root: cgroup limits where delegated ----------------------------------------

@pytest.fixture(scope="module")
def busybox_public(test_images):
    d = public_dir("estargz-limits-")
    shutil.copytree(test_images.busybox, d / "bb")
    make_readable(d)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def user_tmp(busybox_public, rootless_user):
    d = busybox_public / f"tmp-{time.monotonic_ns()}"
    d.mkdir()
    os.chown(d, rootless_user.uid, rootless_user.gid)
    yield d
    shutil.rmtree(d)


def test_rootless_without_delegation_says_there_are_no_limits(
        busybox_public, user_tmp, rootless_user, unprivileged):
    """No cgroups delegated: a note says there are no limits.  And the room
    for writes on the tmpfs is --scratch-size: 32 MiB into 8 fail, noted."""
    r = subprocess.run(rootless_user.argv(
        unprivileged, "optimize", f"oci:{busybox_public / 'bb'}:latest", "--no-optimize",
        "--scratch-size", "8", "--entrypoint", '["/bin/sh", "-c"]',
        "--args", '["dd if=/dev/zero of=/fill bs=1M count=32"]'),
                       capture_output=True, text=True, cwd="/",
                       env=rootless_user.env(TMPDIR=str(user_tmp)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "workload: dd: error writing '/fill': No space left on device" in r.stderr
    notes = [ln.removeprefix("  note: ") for ln in r.stdout.splitlines()
             if ln.startswith("  note: ")]
    assert notes == [NO_LIMITS, "the workload filled the 8 MiB it may write (--scratch-size):"
                     " its writes failed with ENOSPC from then on, so it may have read less"
                     " than it would have"]


@pytest.fixture
def delegated(rootless_user):
    """A memory and a pids cgroup (v1) owned by the account, as `cgcreate -a
    USER -t USER` makes them."""
    name = f"estargz-delegated-{os.getpid()}"
    dirs = [Path("/sys/fs/cgroup") / c / name for c in ("memory", "pids")]
    if not all(d.parent.is_dir() for d in dirs):
        pytest.skip("needs the cgroup v1 memory and pids controllers")
    for d in dirs:
        d.mkdir()
        for path in (d, d / "cgroup.procs", d / "tasks"):
            os.chown(path, rootless_user.uid, rootless_user.gid)
    yield dirs
    subprocess.run(["pkill", "-KILL", "-u", str(rootless_user.uid)], check=False)
    for d in dirs:
        # Deepest first: what a failed test left, runc's cgroups nested in ours.
        for sub in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                until(lambda c=sub: not _rmdir(c))
        until(lambda d=d: not _rmdir(d))


def _rmdir(d: Path) -> bool:
    """rmdir; True while it fails (still busy)."""
    try:
        d.rmdir()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


def test_rootless_limits_where_cgroups_are_delegated_and_a_sigkill_is_swept(
        busybox_public, user_tmp, rootless_user, unprivileged, delegated):
    """In cgroups delegated to it, the run makes one of its own with the
    workload's memory and pids limits (plus the tmpfs and a little for the
    runtime), runs in it, and removes it; a SIGKILL'd run's cgroup is
    removed by the next run."""
    enter = "".join(f"echo $$ > {d}/cgroup.procs && " for d in delegated) + 'exec "$@"'
    argv = ["sh", "-c", enter, "sh", *rootless_user.argv(
        unprivileged, "optimize", f"oci:{busybox_public / 'bb'}:latest", "--no-optimize",
        "--period", "60", "--entrypoint", '["/bin/sh", "-c"]',
        "--args", '["echo started; exec sleep 10454"]')]
    p, lines = start_until(argv, cwd="/", env=rootless_user.env(TMPDIR=str(user_tmp)))
    try:
        assert any("workload: started" in ln for ln in lines), lines
        # The echo runs before the exec: wait for the sleep itself.
        assert until(lambda: pids_running("10454"))
        [sleeper] = pids_running("10454")
        # Ours, in the delegated one; the runtime's nested in it.
        mem, pids = (Path("/sys/fs/cgroup", c, *cgroup_of(sleeper, c).split("/")[1:3])
                     for c in ("memory", "pids"))
        assert mem.parent == delegated[0] and pids.parent == delegated[1]
        assert mem.name.startswith("estargz-optimize-") and pids.name == mem.name
        assert (pids / "pids.max").read_text().strip() == str(4096 + 64)
        limit = int((mem / "memory.limit_in_bytes").read_text())
        assert 4 << 30 < limit < (4 << 30) + (512 << 20)
    finally:
        p.kill()
        p.wait(timeout=10)
    assert until(lambda: not pids_running("10454"))
    assert mem.is_dir()  # empty now; the next run removes it
    again = subprocess.run(["sh", "-c", enter, "sh", *rootless_user.argv(
        unprivileged, "optimize", f"oci:{busybox_public / 'bb'}:latest", "--no-optimize",
        "--args", '["true"]', "--json")], capture_output=True, text=True, cwd="/",
        env=rootless_user.env(TMPDIR=str(user_tmp)), timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["notes"] == []
    assert not mem.exists() and not pids.exists()
    assert [c.name for d in delegated for c in d.iterdir() if c.is_dir()] == []
    assert list(user_tmp.iterdir()) == []
