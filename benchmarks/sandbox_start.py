"""How long a rootless sandbox takes to start, per candidate (docs/profiling.md).

Run as an ordinary user, with this repository importable::

    python3 benchmarks/sandbox_start.py [--runs 20]

Everything happens in a user namespace made by ``profiler.userns`` with a
busybox root filesystem on a tmpfs, as rootless profiling has it.  Each
candidate runs ``/bin/true`` ``--runs`` times; the median wall time from
"start" to "gone" is printed in milliseconds, with the ratio to the
estargz sandbox (runc, as ``estargz optimize`` drives it: bundle, create,
fanotify FID mark, start, wait, delete):

* ``runc (estargz sandbox)``: ``profiler.sandbox.run_profiled``;
* ``crun (estargz sandbox)``: the same with ``--runtime crun``;
* ``bwrap``: bubblewrap with new namespaces (if installed);
* ``direct``: fork, unshare(mount, pid, ipc, uts, net), chroot, exec: the
  least any sandbox can cost, with none of the OCI set-up (no /proc, /dev,
  capabilities, no-new-privileges...).

A candidate that fails prints why instead of a time.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tempfile

from profiler.linux import mount  # noqa: E402
from profiler.rootless import call_in_userns  # noqa: E402
from profiler.sandbox import ProcessSpec, SandboxOptions, run_profiled


def _rootfs(work: str) -> str:
    root = os.path.join(work, "tmpfs")
    os.mkdir(root)
    mount("tmpfs", root, "tmpfs", 0, "mode=0755,size=64m")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy("/usr/bin/busybox", os.path.join(root, "bin", "busybox"))
    for name in ("true", "sh"):
        os.symlink("busybox", os.path.join(root, "bin", name))
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/:/bin/sh\n")
    return root


def _time(fn, runs: int) -> float:
    fn()  # warm-up: page cache, first exec
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def _direct(root: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pid = os.fork()
    if pid == 0:
        try:
            # mount, pid, ipc, uts, net
            if libc.unshare(0x20000 | 0x20000000 | 0x8000000 | 0x4000000 | 0x40000000):
                os._exit(2)
            inner = os.fork()
            if inner == 0:
                os.chroot(root)
                os.chdir("/")
                os.execv("/bin/true", ["true"])
            _, status = os.waitpid(inner, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"direct sandbox failed ({status})")


def _measure(work: str, runs: int) -> list[tuple[str, object]]:
    root = _rootfs(work)
    results: list[tuple[str, object]] = []

    def estargz(runtime: str):
        def run() -> None:
            r = run_profiled(root, ProcessSpec(["/bin/true"]),
                             SandboxOptions(runtime=runtime, workdir=work, quiet=True))
            if r.exit_code != 0 or not r.accesses:
                raise RuntimeError(f"exit {r.exit_code}, {len(r.accesses)} accesses")
        return run

    def bwrap() -> None:
        subprocess.run(["bwrap", "--bind", root, "/", "--proc", "/proc", "--dev", "/dev",
                        "--unshare-all", "--die-with-parent", "/bin/true"], check=True,
                       capture_output=True)

    candidates = [("runc (estargz sandbox)", estargz("runc")),
                  ("crun (estargz sandbox)", estargz("crun")),
                  ("bwrap", bwrap if shutil.which("bwrap") else None),
                  ("direct", lambda: _direct(root))]
    for name, fn in candidates:
        if fn is None:
            results.append((name, "not installed"))
            continue
        try:
            results.append((name, _time(fn, runs)))
        except Exception as e:  # report, go on with the others
            text = str(e).strip().splitlines()
            results.append((name, f"fails: {text[-1] if text else type(e).__name__}"[:160]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() == 0:
        sys.exit("run this as an ordinary user: it measures rootless sandboxes")
    # By module name, not __main__: the helper unpickles the function.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, here)
    import sandbox_start
    with tempfile.TemporaryDirectory(prefix="estargz-sandbox-bench-") as work:
        results = call_in_userns(sandbox_start._measure, work, args.runs)
    base = next((v for n, v in results if n.startswith("runc") and isinstance(v, float)), None)
    print(f"{'candidate':26} {'median ms':>10} {'vs runc':>8}   (runs: {args.runs})")
    for name, value in results:
        if isinstance(value, float):
            ratio = f"{value / base:.2f}x" if base else "-"
            print(f"{name:26} {value:10.1f} {ratio:>8}")
        else:
            print(f"{name:26} {value}")


if __name__ == "__main__":
    main()
