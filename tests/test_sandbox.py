"""The profiling sandbox (profiler/sandbox) and its fanotify binding.

Sandbox tests run real containers with runc on a tiny root filesystem: a
static busybox, plus the host's dynamically linked ``cat`` with its ld.so and
libc, assembled as an overlay mount like the profiler's caller makes.  They
need root (fanotify mount marks, rootful runc) and skip without it.  After
each one, nothing may be left: no process rooted in the overlay, no bundle,
no cgroup.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from daemons import mounts_under
from estargz import EstargzError
from profiler import fanotify
from profiler.errors import ProfilingError
from profiler.fanotify import (
    FAN_ACCESS,
    FAN_OPEN,
    FAN_OPEN_EXEC,
    FAN_Q_OVERFLOW,
    Event,
    Kind,
    MarkKind,
    Watcher,
    pack_event,
    parse_events,
)
from profiler.sandbox import (
    DOCKER_DEFAULT_CAPABILITIES,
    BindMount,
    ProcessSpec,
    SandboxOptions,
    StopReason,
    accesses_from_events,
    build_spec,
    find_runtime,
    path_in_root,
    resolve_user,
    run_profiled,
)

REPO = Path(__file__).resolve().parent.parent

def _is_root() -> bool:
    """Root with CAP_SYS_ADMIN (fanotify mount marks need it, not just uid 0)."""
    with open("/proc/self/status") as f:
        cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return os.geteuid() == 0 and bool(cap_eff & (1 << 21))


needs_root = pytest.mark.skipif(not _is_root(), reason="needs root (fanotify, rootful runc)")

#: Docker's default set as the kernel prints it in /proc/PID/status.
_CAP_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4,
                "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
                "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13, "CAP_SYS_CHROOT": 18,
                "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31}
DOCKER_CAP_MASK = sum(1 << _CAP_NUMBERS[c] for c in DOCKER_DEFAULT_CAPABILITIES)

HOSTNAME = "profiled-host"
BUSYBOX_APPLETS = ("sh", "cat", "sleep", "echo", "id", "grep", "head", "ls", "tail", "true")


# --- the test root filesystem --------------------------------------------------------

def _ldd(binary: str) -> list[str]:
    """The shared objects (ld.so included) ``binary`` loads, as host paths."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths = []
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            paths.append(m.group(1))
    return paths


@pytest.fixture(scope="session")
def lower(tmp_path_factory) -> Path:
    """A tiny image tree: busybox with applet links in /bin, the host's
    dynamically linked cat as /usr/bin/cat with its libraries at the same
    paths, and /etc files for user resolution."""
    busybox = shutil.which("busybox")
    if busybox is None or "statically linked" not in subprocess.run(
            ["file", "-L", busybox], capture_output=True, text=True, check=False).stdout:
        pytest.fail("a static busybox is needed: apt-get install busybox-static")
    root = tmp_path_factory.mktemp("rootfs-lower")
    for d in ("bin", "etc", "proc", "dev", "sys", "usr/bin", "root", "home/app"):
        (root / d).mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    host_cat = os.path.realpath(shutil.which("cat") or "/bin/cat")
    shutil.copy2(host_cat, root / "usr" / "bin" / "cat")
    for lib in _ldd(host_cat):
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)
    (root / "etc" / "hostname").write_text(HOSTNAME + "\n")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "app:x:1000:1000:app:/home/app:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
    (root / "etc" / "group").write_text(
        "root:x:0:\nstaff:x:50:app\napp:x:1000:\nnogroup:x:65534:\n")
    return root


@pytest.fixture
def rootfs(lower: Path, tmp_path: Path):
    """The assembled root filesystem: an overlay of ``lower``, unmounted after."""
    upper, work, merged = tmp_path / "upper", tmp_path / "ovl-work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    dev = os.stat(merged).st_dev
    try:
        yield merged
    finally:
        leftovers = _processes_rooted_on(dev)
        subprocess.run(["umount", str(merged)], check=True)
    assert not leftovers, f"container processes left: {leftovers}"
    assert not mounts_under(tmp_path)


@pytest.fixture
def workdir(tmp_path: Path):
    """Where bundles go; must be empty again after every run."""
    d = tmp_path / "bundles"
    d.mkdir()
    yield d
    assert list(d.iterdir()) == [], "bundle or runtime state left behind"
    assert _profile_cgroups() == [], "container cgroup left behind"


@pytest.fixture(scope="session")
def runc() -> str:
    path = shutil.which("runc")
    if path is None:
        pytest.fail("runc not found: apt-get install runc")
    return path


def _processes_rooted_on(dev: int) -> list[tuple[int, str]]:
    """Processes whose root directory is on the filesystem ``dev`` (the overlay):
    exactly the container's processes, seen from the host."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/root").st_dev != dev:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found.append((int(entry), f.read().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


def _profile_cgroups() -> list[str]:
    """Container cgroups (estargz-profile-*) below our own, in every hierarchy."""
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            names = [c.removeprefix("name=") for c in controllers.split(",") if c] or ["unified"]
            for name in names + ([""] if not controllers else []):
                base = Path("/sys/fs/cgroup") / name / path.lstrip("/")
                if base.is_dir():
                    found += [str(p) for p in base.glob("estargz-profile-*")]
    return found


def _processes_named(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text in f.read().replace(b"\0", b" ").decode(errors="replace"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def profile(rootfs: Path, workdir: Path, args: list[str], *, user: str = "",
            env: list[str] | None = None, **options) -> tuple:
    """run_profiled with the workload's output collected; (run, lines)."""
    lines: list[str] = []
    options.setdefault("period", 20.0)
    run = run_profiled(str(rootfs), ProcessSpec(args, env or [], user, "/"),
                       SandboxOptions(output=lines.append, workdir=str(workdir), **options))
    return run, [line.removeprefix("workload: ") for line in lines]


# --- sandbox: what is recorded ----------------------------------------------------------

@needs_root
def test_dynamic_binary_records_loader_libc_and_binary_in_order(rootfs, workdir, runc, lower):
    run, lines = profile(rootfs, workdir, ["/usr/bin/cat", "/etc/hostname"])
    assert run.exit_code == 0 and run.stopped_by is StopReason.EXITED
    assert lines == [HOSTNAME]
    libs = ["/" + os.path.relpath(p, lower) for p in
            (str(x) for x in lower.rglob("*.so*")) if not os.path.islink(p)]
    ld = next(p for p in libs if "ld-linux" in p)
    libc = next(p for p in libs if os.path.basename(p).startswith("libc.so"))
    paths = run.paths
    # execve opens the binary, then the kernel opens its interpreter: both
    # before the first user-space instruction, both seen.
    assert paths[:2] in (["/usr/bin/cat", ld], [ld, "/usr/bin/cat"]), paths
    assert paths.index(libc) > max(paths.index(ld), paths.index("/usr/bin/cat"))
    assert paths.index("/etc/hostname") > paths.index(libc)
    assert paths == ["/usr/bin/cat", ld, libc, "/etc/hostname"]
    kinds = {a.path: a.kind for a in run.accesses}
    assert kinds["/usr/bin/cat"] is Kind.EXEC and kinds[ld] is Kind.EXEC
    assert kinds[libc] is Kind.OPEN and kinds["/etc/hostname"] is Kind.OPEN
    times = [a.seconds for a in run.accesses]
    assert times == sorted(times) and 0 <= times[0] < run.duration < 10
    assert not run.overflowed


@needs_root
def test_proc_dev_sys_and_bind_mounts_are_dropped(rootfs, workdir, runc, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "file").write_text("from the host\n")
    script = ("cat /proc/self/status /proc/version >/dev/null; head -c 4 /dev/zero >/dev/null;"
              " cat /sys/class/net/lo/mtu >/dev/null; cat /mnt/data/file;"
              " echo x > /mnt/data/new || echo read-only; cat /etc/hostname")
    run, lines = profile(rootfs, workdir, ["/bin/sh", "-c", script],
                         mounts=[BindMount.parse(f"type=bind,src={data},dst=/mnt/data,options=ro")])
    assert lines[0] == "from the host" and lines[-1] == HOSTNAME
    assert any("read-only" in line for line in lines)
    assert not (data / "new").exists()
    assert run.paths == ["/bin/busybox", "/etc/hostname"]
    assert run.events >= 2


@needs_root
def test_files_written_by_the_workload_are_recorded_as_read_back(rootfs, workdir, runc):
    # The caller filters by what the image holds; the sandbox just records.
    run, _ = profile(rootfs, workdir, ["/bin/sh", "-c", "echo hi > /tmp/new; cat /tmp/new"])
    assert run.paths == ["/bin/busybox", "/tmp/new"]


@needs_root
def test_exit_code(rootfs, workdir, runc):
    run, _ = profile(rootfs, workdir, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert run.exit_code == 3 and run.stopped_by is StopReason.EXITED and not run.timed_out


@needs_root
def test_quiet_hides_output(rootfs, workdir, runc):
    run, lines = profile(rootfs, workdir, ["/usr/bin/cat", "/etc/hostname"], quiet=True)
    assert lines == [] and "/etc/hostname" in run.paths


# --- sandbox: when it stops -------------------------------------------------------------

@needs_root
def test_period_kills_the_workload_and_its_children(rootfs, workdir, runc):
    dev = os.stat(rootfs).st_dev
    t0 = time.monotonic()
    run, _ = profile(rootfs, workdir, ["/bin/sh", "-c", "sleep 1001 & sleep 1002"], period=1.0)
    assert run.timed_out and run.stopped_by is StopReason.PERIOD and run.exit_code is None
    assert 1.0 <= run.duration < 2.0 and time.monotonic() - t0 < 5
    assert _processes_rooted_on(dev) == []
    assert _processes_named("sleep 1001") == [] and _processes_named("sleep 1002") == []


@needs_root
def test_wait_on_line_stops_early(rootfs, workdir, runc):
    run, lines = profile(rootfs, workdir,
                         ["/bin/sh", "-c", "echo starting; echo server is READY now; sleep 1000"],
                         wait_on_line="READY", period=30.0)
    assert run.stopped_by is StopReason.LINE and not run.timed_out and run.exit_code is None
    assert run.duration < 5
    assert lines == ["starting", "server is READY now"]


@needs_root
def test_wait_on_line_on_stderr_and_period_still_bounds_it(rootfs, workdir, runc):
    run, _ = profile(rootfs, workdir, ["/bin/sh", "-c", "echo go >&2; sleep 1000"],
                     wait_on_line="go")
    assert run.stopped_by is StopReason.LINE
    run, _ = profile(rootfs, workdir, ["/bin/sh", "-c", "sleep 1000"],
                     wait_on_line="never", period=0.5)
    assert run.timed_out


# --- sandbox: isolation -----------------------------------------------------------------

@needs_root
def test_network_namespace_has_only_loopback_and_it_is_up(rootfs, workdir, runc):
    run, lines = profile(rootfs, workdir, ["/bin/sh", "-c",
                                           "tail -n +3 /proc/net/dev; cat /sys/class/net/lo/flags"])
    assert run.exit_code == 0
    interfaces = [line.split(":")[0].strip() for line in lines[:-1]]
    assert interfaces == ["lo"]
    assert int(lines[-1], 16) & 0x1, "lo is down (IFF_UP not set)"


@needs_root
def test_net_host_shares_the_host_interfaces(rootfs, workdir, runc):
    with open("/proc/net/dev") as f:
        host = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    run, lines = profile(rootfs, workdir, ["/bin/sh", "-c", "tail -n +3 /proc/net/dev"],
                         net_host=True)
    assert run.exit_code == 0
    assert sorted(line.split(":")[0].strip() for line in lines) == host


@needs_root
def test_capabilities_no_new_privileges_and_cgroup_limits(rootfs, workdir, runc):
    script = ("grep -E '^(CapEff|CapBnd|CapPrm|CapInh|CapAmb|NoNewPrivs):' /proc/self/status;"
              " cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max"
              "     /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null;"
              " hostname 2>/dev/null || cat /proc/sys/kernel/hostname")
    run, lines = profile(rootfs, workdir, ["/bin/sh", "-c", script],
                         memory_bytes=256 << 20, pids_limit=99)
    assert run.exit_code == 0
    status = dict(line.split(":\t") for line in lines if ":\t" in line)
    assert int(status["CapEff"], 16) == DOCKER_CAP_MASK == 0xA80425FB
    assert int(status["CapBnd"], 16) == DOCKER_CAP_MASK == int(status["CapPrm"], 16)
    assert int(status["CapInh"], 16) == 0 == int(status["CapAmb"], 16)
    assert status["NoNewPrivs"] == "1"
    rest = [line for line in lines if ":\t" not in line]
    assert rest == [str(256 << 20), "99", "estargz-profile"]


@needs_root
@pytest.mark.parametrize("user, uid, gids, home", [
    ("nobody", 65534, "65534", "/nonexistent"),
    ("65534:65534", 65534, "65534", "/nonexistent"),
    ("app", 1000, "1000 50", "/home/app"),
    ("app:staff", 1000, "50", "/home/app"),
    ("4242", 4242, "0", "/"),
])
def test_user_switch(rootfs, workdir, runc, user, uid, gids, home):
    run, lines = profile(rootfs, workdir, ["/bin/sh", "-c", "id -u; id -G; echo $HOME"],
                         user=user)
    assert run.exit_code == 0
    assert lines == [str(uid), gids, home]


@needs_root
def test_non_root_user_gets_no_capabilities(rootfs, workdir, runc):
    _, lines = profile(rootfs, workdir, ["/bin/sh", "-c", "grep CapEff /proc/self/status"],
                       user="nobody")
    assert lines == ["CapEff:\t0000000000000000"]


# --- sandbox: failures and interruptions ------------------------------------------------

def test_missing_runtime_is_a_clean_error(tmp_path):
    with pytest.raises(ProfilingError, match="'no-such-runtime' not found on PATH"):
        run_profiled(str(tmp_path), ProcessSpec(["/bin/true"]),
                     SandboxOptions(runtime="no-such-runtime"))
    with pytest.raises(ProfilingError, match="not an executable file"):
        find_runtime(str(tmp_path / "missing"))
    assert issubclass(ProfilingError, EstargzError)


@needs_root
def test_crun_is_selectable(rootfs, workdir):
    """crun works, or fails with its own reason (here: cgroups in hybrid mode),
    and leaves nothing behind either way."""
    if shutil.which("crun") is None:
        pytest.skip("crun not installed")
    try:
        run, lines = profile(rootfs, workdir, ["/usr/bin/cat", "/etc/hostname"], runtime="crun")
    except ProfilingError as e:
        assert str(e).startswith("crun create failed: ") and len(str(e)) > 20, str(e)
    else:
        assert lines == [HOSTNAME] and "/usr/bin/cat" in run.paths


@needs_root
def test_create_failure_is_a_clean_error(rootfs, workdir, runc):
    with pytest.raises(ProfilingError, match=r"runc create failed: .*no-such-program"):
        profile(rootfs, workdir, ["/no-such-program"])
    with pytest.raises(ProfilingError, match="no matching entry in the image's /etc/passwd"):
        profile(rootfs, workdir, ["/bin/true"], user="nosuchuser")


_INTERRUPTED_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    from profiler.sandbox import (ProcessSpec, SandboxOptions, interrupt_on_sigterm,
                                  run_profiled)
    lower, tmp, wait_on_signal = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    merged = os.path.join(tmp, "merged")
    for d in ("upper", "ovl-work", "merged", "bundles"):
        os.makedirs(os.path.join(tmp, d))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={tmp}/upper,workdir={tmp}/ovl-work", merged],
                   check=True)
    try:
        print("go", flush=True)
        with interrupt_on_sigterm():
            run = run_profiled(merged, ProcessSpec(["/bin/sh", "-c",
                                                    "echo started; exec sleep 98761"]),
                               SandboxOptions(period=60, wait_on_signal=wait_on_signal,
                                              workdir=os.path.join(tmp, "bundles"),
                                              output=lambda l: print(l, flush=True)))
        print(json.dumps({"stopped_by": run.stopped_by.value, "paths": run.paths}), flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    finally:
        subprocess.run(["umount", merged], check=True)
""")


def _run_and_signal(lower: Path, tmp: Path, sig: int, wait_on_signal: bool,
                    trigger: str = "workload: started", delay: float = 0.2
                    ) -> tuple[int, list[str]]:
    """Run the sandbox in a child Python; ``delay`` s after it prints
    ``trigger``, send it ``sig``."""
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_SCRIPT, str(lower), str(tmp),
                             "1" if wait_on_signal else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    try:
        lines = []
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.strip() == trigger:
                time.sleep(delay)
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, lines + out.splitlines() + [f"stderr: {err}"]


def assert_nothing_left(tmp_path) -> None:
    """No mount, workload process, bundle or cgroup outlives an interrupted run."""
    assert mounts_under(tmp_path) == []
    assert _processes_named("sleep 98761") == []
    assert list((tmp_path / "bundles").iterdir()) == []
    assert _profile_cgroups() == []


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_the_middle_of_a_run_leaves_nothing(lower, tmp_path, runc, sig):
    code, lines = _run_and_signal(lower, tmp_path, sig, wait_on_signal=False)
    assert code == 130 and "interrupted" in lines, lines
    assert_nothing_left(tmp_path)


@needs_root
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15])
def test_interrupt_at_any_point_leaves_nothing(lower, tmp_path, runc, delay):
    """SIGINT while the bundle is written, runc create runs, the mark is placed
    or runc start runs (the child reaches the run loop about 0.1 s after "go")."""
    code, lines = _run_and_signal(lower, tmp_path, signal.SIGINT, wait_on_signal=False,
                                  trigger="go", delay=delay)
    assert code == 130 and "interrupted" in lines, lines
    assert_nothing_left(tmp_path)


@needs_root
def test_wait_on_signal_ends_the_profile_on_sigint(lower, tmp_path, runc):
    code, lines = _run_and_signal(lower, tmp_path, signal.SIGINT, wait_on_signal=True)
    assert code == 0, lines
    result = json.loads(next(line for line in lines if line.startswith("{")))
    assert result == {"stopped_by": "signal", "paths": ["/bin/busybox"]}
    assert mounts_under(tmp_path) == [] and _processes_named("sleep 98761") == []
    assert list((tmp_path / "bundles").iterdir()) == []


# --- the spec, users, paths (no root) ------------------------------------------------------

def test_build_spec():
    opts = SandboxOptions(mounts=[BindMount.parse("type=bind,src=/etc,dst=/host-etc")],
                          memory_bytes=1 << 30, pids_limit=100)
    user = resolve_user("/nonexistent-rootfs", "")
    spec = build_spec("/", ProcessSpec(["/app", "-x"], ["A=1"], "", "/srv"), opts, user, "cg")
    p = spec["process"]
    assert p["args"] == ["/app", "-x"] and p["cwd"] == "/srv" and p["noNewPrivileges"] is True
    assert p["env"][0] == "A=1" and any(e.startswith("PATH=/usr/local/sbin:") for e in p["env"])
    assert "HOME=/" in p["env"]
    assert p["user"] == {"uid": 0, "gid": 0}
    caps = p["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    assert all(sorted(v) == sorted(DOCKER_DEFAULT_CAPABILITIES) for v in caps.values())
    assert len(DOCKER_DEFAULT_CAPABILITIES) == 14
    linux = spec["linux"]
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert linux["resources"]["memory"] == {"limit": 1 << 30}
    assert linux["resources"]["pids"] == {"limit": 100}
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert sorted(d["path"] for d in linux["devices"]) == [
        "/dev/full", "/dev/null", "/dev/random", "/dev/tty", "/dev/urandom", "/dev/zero"]
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"} <= set(mounts)
    assert "ro" in mounts["/sys"]["options"]
    assert mounts["/host-etc"] == {"destination": "/host-etc", "type": "bind", "source": "/etc",
                                   "options": ["rbind", "ro"]}
    host = build_spec("/", ProcessSpec(["/app"]), SandboxOptions(net_host=True,
                      memory_bytes=None, pids_limit=None), user, "cg")
    assert "network" not in [n["type"] for n in host["linux"]["namespaces"]]
    assert "memory" not in host["linux"]["resources"] and "pids" not in host["linux"]["resources"]


def test_bind_mount_parse():
    assert BindMount.parse("type=bind,src=/a,dst=/b,options=ro") == \
        BindMount("/a", "/b", ("rbind", "ro"))
    assert BindMount.parse("source=/a,target=/b,options=rw:bind").options == ("rw", "bind")
    for bad in ("type=tmpfs,dst=/x", "src=/a", "src=/a,dst=/b,colour=red", "src"):
        with pytest.raises(ProfilingError):
            BindMount.parse(bad)


def test_resolve_user(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                             "app:x:1000:1000::/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("app:x:1000:\nstaff:x:50:app,other\nwheel:x:10:root\n")
    r = str(tmp_path)
    assert resolve_user(r, "").uid == 0 and resolve_user(r, "").additional_gids == (10,)
    app = resolve_user(r, "app")
    assert (app.uid, app.gid, app.additional_gids, app.home) == (1000, 1000, (50,), "/home/app")
    assert resolve_user(r, "1000").home == "/home/app"
    assert (resolve_user(r, "app:staff").gid, resolve_user(r, "app:7").gid) == (50, 7)
    assert (resolve_user(r, "5000").uid, resolve_user(r, "5000").gid) == (5000, 0)
    with pytest.raises(ProfilingError, match="passwd"):
        resolve_user(r, "ghost")
    with pytest.raises(ProfilingError, match="group"):
        resolve_user(r, "app:ghosts")


def test_user_files_are_read_inside_the_rootfs(tmp_path):
    # An absolute symlink in the image must not lead to the host's /etc/passwd.
    (tmp_path / "etc").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "passwd").write_text("svc:x:77:77::/:/bin/sh\n")
    (tmp_path / "etc" / "passwd").symlink_to("/real/passwd")
    (tmp_path / "real" / "group").write_text("svc:x:77:\n")
    (tmp_path / "etc" / "group").symlink_to("../../../../../../real/group")
    (tmp_path / "etc" / "loop").symlink_to("../../../etc/loop")
    assert path_in_root(str(tmp_path), "/etc/passwd") == str(tmp_path / "real" / "passwd")
    assert path_in_root(str(tmp_path), "/etc/group") == str(tmp_path / "real" / "group")
    with pytest.raises(ProfilingError, match="too many levels of symbolic links"):
        path_in_root(str(tmp_path), "/etc/loop")
    assert resolve_user(str(tmp_path), "svc").uid == 77
    with pytest.raises(ProfilingError):
        resolve_user(str(tmp_path), "root")  # the host has root; the image does not


def test_accesses_from_events_dedupes_filters_and_keeps_order():
    def ev(path: str | None, mask: int = FAN_OPEN, t: float = 1.0, **kw) -> Event:
        return Event(path, mask, 1, t, **kw)

    events = [ev("/bin/app", FAN_OPEN | FAN_OPEN_EXEC, 1.5), ev("/lib/libc.so", t=1.6),
              ev("/bin/app", FAN_ACCESS, 1.7), ev("/dev/null", t=1.8),
              ev("/data/x", t=1.9), ev("/etc/conf", FAN_ACCESS, 2.0),
              ev("/etc/fifo", regular=False), ev(None, FAN_Q_OVERFLOW), ev("relative")]
    out = accesses_from_events(events, 1.0, ["/dev", "/data/"])
    assert [(a.path, a.kind, round(a.seconds, 3)) for a in out] == [
        ("/bin/app", Kind.EXEC, 0.5), ("/lib/libc.so", Kind.OPEN, 0.6),
        ("/etc/conf", Kind.ACCESS, 1.0)]


# --- fanotify ---------------------------------------------------------------------------

def test_parse_events_and_overflow_record():
    buf = pack_event(FAN_OPEN, 7, 100) + pack_event(FAN_Q_OVERFLOW) + pack_event(FAN_ACCESS, 8, 101)
    raws = parse_events(buf)
    assert [(r.mask, r.fd, r.pid) for r in raws] == [(FAN_OPEN, 7, 100), (FAN_Q_OVERFLOW, -1, 0),
                                                     (FAN_ACCESS, 8, 101)]
    with pytest.raises(ProfilingError, match="truncated"):
        parse_events(buf[:-3])
    bad_version = bytearray(pack_event(FAN_OPEN, 7, 1))
    bad_version[4] = 2
    with pytest.raises(ProfilingError, match="version 2"):
        parse_events(bytes(bad_version))
    assert fanotify.kind_of(FAN_OPEN | FAN_OPEN_EXEC | FAN_ACCESS) is Kind.EXEC
    assert fanotify.kind_of(FAN_OPEN | FAN_ACCESS) is Kind.OPEN


def test_watcher_reports_a_synthetic_overflow(tmp_path):
    """A FAN_Q_OVERFLOW record is yielded and sets ``overflowed``; the event
    fds of the records are resolved and closed.  The kernel side is a pipe."""
    f = tmp_path / "file"
    f.write_text("x")
    r, w = os.pipe()
    os.set_blocking(r, False)
    fd = os.open(f, os.O_RDONLY)
    os.write(w, pack_event(FAN_OPEN, fd, 42) + pack_event(FAN_Q_OVERFLOW))
    watcher = Watcher(str(tmp_path))
    watcher._fd = r  # what open() would have set: feed the pipe instead
    try:
        events = watcher.read_events()
    finally:
        watcher.close()
        os.close(w)
    assert [(e.path, e.pid, e.overflow) for e in events] == [(str(f), 42, False), (None, 0, True)]
    assert watcher.overflowed
    with pytest.raises(OSError) as info:
        os.fstat(fd)  # closed by the watcher
    assert info.value.errno == errno.EBADF


@needs_root
def test_real_queue_overflow_is_detected(tmp_path):
    """With a bounded queue (max_queued_events lowered for the group's
    creation only) the kernel's overflow event is seen, never silently lost."""
    knob = Path("/proc/sys/fs/fanotify/max_queued_events")
    old = knob.read_text()
    files = []
    for i in range(64):
        files.append(tmp_path / f"f{i}")
        files[-1].write_text("x")
    watcher = Watcher(str(tmp_path), mark=MarkKind.INODE,
                      mask=FAN_OPEN | fanotify.FAN_EVENT_ON_CHILD, unlimited_queue=False)
    try:
        knob.write_text("8\n")
        try:
            watcher.open()  # the group's queue size is fixed here
        finally:
            knob.write_text(old)
        for f in files:
            f.read_text()
        events = watcher.read_events()
    finally:
        watcher.close()
    assert watcher.overflowed
    assert len(events) == 9 and events[-1].overflow and events[-1].path is None
    assert [e.path for e in events[:8]] == [str(f) for f in files[:8]]


@needs_root
def test_watcher_sees_opens_in_order_with_unlimited_queue():
    """More events than the default queue holds (16384), none lost, in order.
    On a tmpfs: creating 17 000 files on the disk takes seconds."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        files = [os.path.join(d, f"f{i}") for i in range(17000)]
        for f in files:
            os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o600))
        with Watcher(d, mark=MarkKind.INODE,
                     mask=FAN_OPEN | fanotify.FAN_EVENT_ON_CHILD) as watcher:
            for f in files:
                os.close(os.open(f, os.O_RDONLY))
            events = list(watcher.events(timeout=0.2))
    assert not watcher.overflowed
    assert [e.path for e in events] == files
    assert {e.pid for e in events} == {os.getpid()}


def test_fanotify_errors_are_clean():
    if not _is_root():
        with pytest.raises(ProfilingError, match="needs root"):
            fanotify.fanotify_init(fanotify.FAN_CLASS_NOTIF, os.O_RDONLY)
        return
    with pytest.raises(ProfilingError, match="not supported by this kernel"):
        fanotify.fanotify_init(0x4000_0000, os.O_RDONLY)  # no such flag: EINVAL
    if True:
        with Watcher("/") as w, pytest.raises(ProfilingError, match="no such file"):
            fanotify.fanotify_mark(w.fileno(), fanotify.FAN_MARK_ADD, FAN_OPEN, "/no/such/path")


@needs_root
def test_fanotify_without_privileges_says_what_is_needed():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that gives up root, then tries
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                Watcher("/", mark=MarkKind.MOUNT).open()
                os.write(w, b"no error")
            except ProfilingError as e:
                os.write(w, str(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        message = f.read()
    os.waitpid(pid, 0)
    assert "needs root" in message and "CAP_SYS_ADMIN" in message, message
