#!/usr/bin/env python3
"""Benchmark `estargz layer convert` against the reference and against pigz.

    python3 benchmarks/run.py [--level 9] [--repeat 1] [--layers debian,mixed]
                              [--backends zlib-ng,zlib,isal] [--json FILE]
                              [--markdown FILE] [--idle-wait 120] [--retries 2]
                              [--check]

For every layer (the Debian rootfs layer from testdata/build-debian-rootfs.sh
and a synthetic ~1 GiB "mixed" layer from testdata/make_synthetic_layer.py,
both cached under ${ESTARGZ_CACHE:-~/.cache/estargz-dev}/testdata/), this
runs, one after the other and never overlapping:

* our CLI, once per back-end: ``python3 -m estargz layer convert IN OUT
  --compression-level L --backend B --json``;
* the reference, ``goref build IN OUT --level L`` (Go's estargz.Build) with
  GOMAXPROCS = the number of cores;
* ``pigz -p CORES -L`` of the same tar (plain gzip: the floor for any
  gzip-based format).

Each tool is a child process, started through a tiny fork/exec trampoline
(see ``_TRAMPOLINE``); its wall time is measured from fork to ``os.wait4``,
and its peak RSS is ``ru_maxrss`` from ``os.wait4``. Values include the
trampoline's own ~6-7 MiB (reported as the RSS floor). Before
every measurement the input is read once in full, so every tool runs with the
input in the page cache, and (``--idle-wait``) the runner waits for other
processes to leave the CPUs alone. It also records how much CPU other
processes used during each run and warns when that makes a wall time suspect.
With ``--repeat N`` the runs are interleaved (tool A, B, C, A, B, C, ...) and
the median is reported.

Targets (checked for the default back-end, defined at level 9):
wall <= 0.6 x reference, wall <= 1.15 x pigz, output size <= reference.
The exit code is 0 whatever the targets say unless ``--check`` is given.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import importlib.metadata as md
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from estargz import BACKENDS, DEFAULT_BACKEND, InvalidInput, get_backend  # noqa: E402

CACHE = Path(os.environ.get("ESTARGZ_CACHE") or Path.home() / ".cache" / "estargz-dev")
TESTDATA = CACHE / "testdata"
MIXED_MIB = 1024

# Targets for the default back-end at level 9: (key, description, limit).
TARGETS = [
    ("wall_vs_reference", "wall <= 0.6x reference", 0.6),
    ("wall_vs_pigz", "wall <= 1.15x pigz", 1.15),
    ("size_vs_reference", "size <= reference", 1.0),
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- inputs ----------------------------------------------------------------

def last_line(cmd: list[str]) -> Path:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def debian_layer() -> Path:
    log("preparing the Debian rootfs layer (testdata/build-debian-rootfs.sh)")
    return last_line([str(REPO / "testdata" / "build-debian-rootfs.sh")])


def mixed_layer() -> Path:
    path = TESTDATA / f"synthetic-mixed-{MIXED_MIB}.tar"
    if not path.exists():
        log(f"generating {path}")
        TESTDATA.mkdir(parents=True, exist_ok=True)
        last_line([sys.executable, str(REPO / "testdata" / "make_synthetic_layer.py"),
                   str(path), "--shape", "mixed", "--size-mib", str(MIXED_MIB)])
    return path


LAYERS = {"debian": debian_layer, "mixed": mixed_layer}


def goref_binary() -> Path:
    log("building the Go reference harness (scripts/build-go.sh goref)")
    return last_line([str(REPO / "scripts" / "build-go.sh"), "goref"])


def compile_bytecode() -> None:
    """Compile our modules' bytecode, as ``pip install`` does, before any
    run is timed. Without it an environment with PYTHONDONTWRITEBYTECODE
    (this one sets it) compiles every module from source on every start:
    0.2 s of each conversion, which no installed copy pays."""
    for package in ("estargz", "profiler"):
        if not compileall.compile_dir(REPO / package, quiet=1):
            sys.exit(f"bench: cannot compile {package}'s bytecode")


def warm(path: Path) -> None:
    """Read ``path`` once so it is in the page cache for the next tool."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


# --- measuring one child ---------------------------------------------------

# Every tool is started through this tiny trampoline, run as ``python3 -I -S
# -c``: it fork()s, exec()s the tool and reports os.wait4's ru_maxrss and the
# wall time from fork to reaping. Why not wait4 the tool straight from this
# process: Linux folds the peak RSS of the mm a process had before exec()
# into its ru_maxrss. subprocess spawns with vfork(), so that mm is *this*
# process's, and every child would report at least our own lifetime peak.
# After a real fork() it is a copy of the trampoline's (about 6-7 MiB),
# which is the floor of every number we report (see rss_floor()).
_TRAMPOLINE = r"""
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, ("%d %d %.6f %.6f" % (os.waitstatus_to_exitcode(st), ru.ru_maxrss, wall,
                                   ru.ru_utime + ru.ru_stime)).encode())
os.close(fd)
os._exit(0)
"""


def busy_seconds() -> float:
    """CPU seconds spent not idle by the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(limit: float) -> float:
    """Wait (up to ``limit`` s) until other processes use under 5 % of one
    core over a second. Returns the last busy figure seen (in cores)."""
    started = time.monotonic()
    said = -1e9
    while True:
        b0 = busy_seconds()
        time.sleep(1)
        busy = busy_seconds() - b0
        waited = time.monotonic() - started
        if busy < 0.05:
            if waited > 2:
                log(f"  machine idle after {waited:.0f} s")
            return busy
        if waited >= limit:
            log(f"  warning: machine still busy ({busy:.2f} cores in use by other "
                "processes); measuring anyway")
            return busy
        if waited - said >= 30:
            log(f"  waiting for the machine to go idle ({busy:.2f} cores busy)")
            said = waited
        time.sleep(2)


def spawn_measured(argv: list[str], workdir: Path, **popen) -> tuple[int, int, float, float]:
    """Run ``argv`` through the trampoline; return (exit code, peak RSS in
    KiB, wall seconds, CPU seconds) of the tool itself."""
    res = workdir / "child.rusage"
    p = subprocess.run([sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(res), *argv],
                       **popen)
    if p.returncode != 0 or not res.exists():
        sys.exit(f"bench: the measuring trampoline failed for {argv[0]}")
    code, rss, wall, cpu = res.read_text().split()
    res.unlink()
    return int(code), int(rss), float(wall), float(cpu)


@dataclass
class Run:
    wall: float
    rss_kib: int
    size: int
    cpu: float = 0.0      # user + system seconds of the tool
    foreign: float = 0.0  # CPU seconds used by other processes meanwhile
    disturbed: bool = False  # foreign > 10 % of wall even after the retries


def measure(argv: list[str], out: Path, *, stdin: Path | None = None,
            stdout_to_out: bool = False, env: dict | None = None,
            workdir: Path) -> tuple[Run, str]:
    """Run ``argv`` to completion; return its wall time, peak RSS and the size
    of ``out``, plus its stdout. Fails loudly if the child fails."""
    so_path, se_path = workdir / "child.stdout", workdir / "child.stderr"
    with open(so_path if not stdout_to_out else out, "wb") as so, \
            open(se_path, "wb") as se, \
            open(stdin or os.devnull, "rb") as si:
        b0 = busy_seconds()
        code, rss, wall, cpu = spawn_measured(argv, workdir, stdin=si, stdout=so, stderr=se,
                                              cwd=REPO, env={**os.environ, **(env or {})})
        foreign = busy_seconds() - b0 - cpu
    stderr = se_path.read_text(errors="replace")
    if code != 0:
        sys.exit(f"bench: {' '.join(map(str, argv))} exited {code}:\n{stderr[-2000:]}")
    stdout = "" if stdout_to_out else so_path.read_text(errors="replace")
    # ru_maxrss is in KiB on Linux.
    return Run(wall, rss, out.stat().st_size, cpu, max(0.0, foreign)), stdout


def rss_floor(workdir: Path) -> int:
    """Peak RSS (KiB) reported for ``true``: the trampoline's own share."""
    return spawn_measured(["true"], workdir)[1]


# --- the tools -------------------------------------------------------------

@dataclass
class Tool:
    key: str      # "ours:zlib-ng", "reference", "pigz"
    label: str
    level: int    # the level actually used (isal caps at 3)
    runs: list = field(default_factory=list)

    def median(self) -> dict:
        return {
            "wall": statistics.median(r.wall for r in self.runs),
            "rss_kib": statistics.median(r.rss_kib for r in self.runs),
            "size": statistics.median(r.size for r in self.runs),
            "cpu": statistics.median(r.cpu for r in self.runs),
            "foreign_cpu": max(r.foreign for r in self.runs),
            "disturbed_runs": sum(r.disturbed for r in self.runs),
        }


def backend_level(name: str, level: int) -> int | None:
    """The level back-end ``name`` really uses for ``level`` (isal caps it
    at 3), or None when its Python package is not installed."""
    try:
        return get_backend(name, level).level
    except InvalidInput:
        return None


def run_one(tool: Tool, layer: Path, workdir: Path, goref: Path, n: int,
            idle_wait: float) -> Run:
    out = workdir / "out.bin"
    if out.exists():
        out.unlink()
    warm(layer)
    if idle_wait > 0:
        wait_for_idle(idle_wait)
    if tool.key.startswith("ours:"):
        backend = tool.key.split(":", 1)[1]
        run, stdout = measure([sys.executable, "-m", "estargz", "layer", "convert",
                               str(layer), str(out), "--compression-level",
                               str(tool.level), "--backend", backend, "--json"],
                              out, workdir=workdir)
        reported = json.loads(stdout)["blob_size"]
        if reported != run.size:
            sys.exit(f"bench: {tool.label} reported blob_size {reported}, "
                     f"file has {run.size} bytes")
    elif tool.key == "reference":
        run, stdout = measure([str(goref), "build", str(layer), str(out),
                               "--level", str(tool.level)], out,
                              env={"GOMAXPROCS": str(n)}, workdir=workdir)
        reported = json.loads(stdout)["blobSize"]
        if reported != run.size:
            sys.exit(f"bench: reference reported blobSize {reported}, "
                     f"file has {run.size} bytes")
    elif tool.key == "pigz":
        run, _ = measure(["pigz", "-p", str(n), f"-{tool.level}", "-c"], out,
                         stdin=layer, stdout_to_out=True, workdir=workdir)
    else:
        raise AssertionError(tool.key)
    out.unlink()
    return run


# --- environment -----------------------------------------------------------

def cmd_out(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
    except OSError:
        return ""
    return (p.stdout or p.stderr).strip()


def environment() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": cores(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "os": cmd_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "pigz": cmd_out(["pigz", "--version"]),
        "go": cmd_out(["/usr/lib/go-1.19/bin/go", "version"]),
        "reference": cmd_out(["dpkg-query", "-W", "-f", "${Version}",
                              "golang-github-containerd-stargz-snapshotter-dev"]),
        "default_backend": DEFAULT_BACKEND,
    }
    try:
        from zlib_ng import zlib_ng
        env["zlib_ng"] = (f"{zlib_ng.ZLIBNG_RUNTIME_VERSION} "
                          f"(python zlib-ng {md.version('zlib-ng')})")
    except ImportError:
        env["zlib_ng"] = None
    try:
        import isal
        env["isal"] = f"ISA-L {getattr(isal, 'ISAL_VERSION', '?')} (python isal {isal.__version__})"
    except ImportError:
        env["isal"] = None
    return env


# --- reporting -------------------------------------------------------------

def fmt_size(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def layer_report(name: str, path: Path, tools: list[Tool], level: int) -> dict:
    med = {t.key: t.median() for t in tools}
    ref, pigz = med.get("reference"), med.get("pigz")
    ratios = {}
    for t in tools:
        if not t.key.startswith("ours:"):
            continue
        m = med[t.key]
        r = {}
        if ref:
            r["wall_vs_reference"] = m["wall"] / ref["wall"]
            r["size_vs_reference"] = m["size"] / ref["size"]
            r["rss_vs_reference"] = m["rss_kib"] / ref["rss_kib"]
        if pigz:
            r["wall_vs_pigz"] = m["wall"] / pigz["wall"]
            r["size_vs_pigz"] = m["size"] / pigz["size"]
        ratios[t.key.split(":", 1)[1]] = r
    targets = {}
    default = ratios.get(DEFAULT_BACKEND, {})
    for key, desc, limit in TARGETS:
        if key in default:
            targets[key] = {"target": desc, "limit": limit, "value": default[key],
                            "pass": default[key] <= limit}
    return {
        "layer": name,
        "path": str(path),
        "input_bytes": path.stat().st_size,
        "level": level,
        "tools": [{"key": t.key, "label": t.label, "level": t.level,
                   "runs": [asdict(r) for r in t.runs], "median": med[t.key]}
                  for t in tools],
        "ratios": ratios,
        "targets": targets,
    }


def table_lines(rep: dict, markdown: bool) -> list[str]:
    base = {t["key"]: t["median"] for t in rep["tools"]}
    ref = base.get("reference")
    inp = rep["input_bytes"]
    head = ["tool", "level", "wall (s)", "CPU (s)", "peak RSS (MiB)", "output",
            "% of input", "wall / ref", "size / ref"]
    rows = []
    for t in rep["tools"]:
        m = t["median"]
        rows.append([
            t["label"], str(t["level"]),
            f"{m['wall']:.2f}" + (" *" if m.get("disturbed_runs") else ""),
            f"{m['cpu']:.2f}",
            f"{m['rss_kib'] / 1024:.1f}",
            f"{m['size']:,} B", f"{100 * m['size'] / inp:.2f} %",
            f"{m['wall'] / ref['wall']:.3f}" if ref else "-",
            f"{m['size'] / ref['size']:.5f}" if ref else "-",
        ])
    note = (["", "\\* one of its runs was disturbed by other processes (their CPU use "
             "exceeded 10 % of its wall time) even after the retries"]
            if any(t["median"].get("disturbed_runs") for t in rep["tools"]) else [])
    if markdown:
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out + note
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    line = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(r, widths, strict=False)))
    return ([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
            + [x.replace("\\", "") for x in note])


def ratio_lines(rep: dict, markdown: bool) -> list[str]:
    head = ["backend", "wall / reference", "wall / pigz", "size / reference",
            "size / pigz", "RSS / reference"]
    rows = []
    for backend, r in rep["ratios"].items():
        g = lambda k, p=3, r=r: f"{r[k]:.{p}f}" if k in r else "-"  # noqa: E731
        rows.append([backend + (" (default)" if backend == DEFAULT_BACKEND else ""),
                     g("wall_vs_reference"), g("wall_vs_pigz"), g("size_vs_reference", 5),
                     g("size_vs_pigz", 5), g("rss_vs_reference", 2)])
    if markdown:
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        return out + ["| " + " | ".join(x) + " |" for x in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    line = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(r, widths, strict=False)))
    return [line(head), line(["-" * w for w in widths])] + [line(x) for x in rows]


def target_lines(rep: dict, markdown: bool) -> list[str]:
    out = []
    for key, t in rep["targets"].items():
        verdict = "PASS" if t["pass"] else "FAIL"
        value = f"{t['value']:.5f}" if key.startswith("size") else f"{t['value']:.3f}"
        if markdown:
            out.append(f"| {t['target']} | {value} | **{verdict}** |")
        else:
            out.append(f"  {verdict}  {t['target']:<26} actual {value}")
    if markdown and out:
        out = ["| target | actual | result |", "|---|---:|---|"] + out
    return out


def print_report(results: dict) -> None:
    env = results["environment"]
    print(f"\nestargz benchmark, level {results['level']}, median of "
          f"{results['repeat']} run(s); {env['cores']} cores, {env['cpu']}, "
          f"Python {env['python']}; RSS floor (trampoline) "
          f"{env.get('rss_floor_kib', 0) / 1024:.1f} MiB")
    for rep in results["layers"]:
        print(f"\n== {rep['layer']}: {rep['path']} ({fmt_size(rep['input_bytes'])})")
        print("\n".join(table_lines(rep, False)))
        print()
        print("\n".join(ratio_lines(rep, False)))
        print(f"\ntargets ({DEFAULT_BACKEND}"
              + ("" if results["level"] == 9 else
                 f"; defined at level 9, this run is level {results['level']}") + "):")
        print("\n".join(target_lines(rep, False)))
    verdict = "PASS" if results["all_targets_pass"] else "FAIL"
    print(f"\noverall: {verdict}")


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"## Results (level {results['level']}, median of {results['repeat']} run(s))",
             "",
             f"Measured {env['date']} on {env['cores']} cores ({env['cpu']}), "
             f"{env['memory_gib']} GiB RAM, {env['os']}, kernel {env['kernel']}; "
             f"Python {env['python']}, zlib {env['zlib']}, zlib-ng {env['zlib_ng']}, "
             f"{env['isal']}, {env['pigz']}, {env['go']}, reference package "
             f"{env['reference']}. Peak RSS includes a floor of "
             f"{env.get('rss_floor_kib', 0) / 1024:.1f} MiB from the measuring trampoline "
             "(what `true` reports).", ""]
    for rep in results["layers"]:
        lines += [f"### {rep['layer']} ({fmt_size(rep['input_bytes'])} tar)", ""]
        lines += table_lines(rep, True) + [""]
        lines += ratio_lines(rep, True) + [""]
        lines += [f"Targets for the default back-end ({DEFAULT_BACKEND}):", ""]
        lines += target_lines(rep, True) + [""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", type=int, default=9, choices=range(0, 10), metavar="0-9",
                    help="gzip level for every tool (default 9)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; median reported")
    ap.add_argument("--layers", default="debian,mixed",
                    help="comma-separated subset of: " + ", ".join(LAYERS))
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated back-ends of ours to run")
    ap.add_argument("--json", metavar="FILE", help="write the raw results as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write a Markdown results section")
    ap.add_argument("--idle-wait", type=float, default=120, metavar="SECONDS",
                    help="before each run, wait up to this long for other processes to "
                         "stop using the CPU (0: don't; default 120)")
    ap.add_argument("--retries", type=int, default=2,
                    help="measure a run again when other processes used over 10 %% of "
                         "its wall time in CPU (default 2)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a target of the default back-end fails")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    layers = [x for x in a.layers.split(",") if x]
    backends = [x for x in a.backends.split(",") if x]
    for x in layers:
        if x not in LAYERS:
            ap.error(f"unknown layer {x!r}")
    for b in backends:
        if b not in BACKENDS:
            ap.error(f"unknown backend {b!r}")
    if shutil.which("pigz") is None:
        sys.exit("bench: pigz not found (apt-get install pigz)")
    # A plain kill must still remove the temporary outputs (the with-block below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n = cores()
    goref = goref_binary()
    compile_bytecode()
    paths = {name: LAYERS[name]() for name in layers}

    results = {"level": a.level, "repeat": a.repeat, "environment": environment(),
               "layers": []}
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=CACHE) as tmp:
        workdir = Path(tmp)
        results["environment"]["rss_floor_kib"] = rss_floor(workdir)
        for name, path in paths.items():
            tools = []
            for b in backends:
                level = backend_level(b, a.level)
                if level is None:
                    log(f"skipping backend {b}: its Python package is not installed")
                    continue
                tools.append(Tool(f"ours:{b}", f"estargz ({b})", level))
            tools.append(Tool("reference", f"reference (Go, GOMAXPROCS={n})", a.level))
            tools.append(Tool("pigz", f"pigz -p {n}", a.level))
            for i in range(a.repeat):
                for t in tools:
                    log(f"{name} run {i + 1}/{a.repeat}: {t.label} level {t.level} ...")
                    for attempt in range(a.retries + 1):
                        r = run_one(t, path, workdir, goref, n, a.idle_wait)
                        log(f"  {r.wall:.2f} s wall, {r.cpu:.2f} s CPU, "
                            f"{r.rss_kib / 1024:.1f} MiB RSS, {r.size:,} B; others used "
                            f"{r.foreign:.2f} CPU s meanwhile")
                        r.disturbed = r.foreign > 0.1 * r.wall
                        if not r.disturbed:
                            break
                        log("  warning: other processes were busy during this run; "
                            + ("measuring again" if attempt < a.retries else
                               "keeping it, but its wall time is suspect"))
                    t.runs.append(r)
            results["layers"].append(layer_report(name, path, tools, a.level))

    results["all_targets_pass"] = all(t["pass"] for rep in results["layers"]
                                      for t in rep["targets"].values())
    print_report(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    if a.markdown:
        Path(a.markdown).write_text(markdown(results) + "\n")
    if a.check and not results["all_targets_pass"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
