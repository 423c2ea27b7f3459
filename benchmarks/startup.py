#!/usr/bin/env python3
"""Container start-up benchmark in the style of HelloBench (docs/benchmarks.md).

For each image of benchmarks/images.py and each variant

  original         the gzip image, full pull and unpack (`ctr images pull`, overlayfs)
  estargz          `estargz convert --oci`
  estargz-opt      `estargz optimize --oci --wait-on-line READY`
  ref-estargz      `ctr-remote image convert --estargz --oci` (Debian's 0.12)
  ref-estargz-opt  `ctr-remote image optimize --oci`
  soci             the unchanged image with a SOCI index made by the real
                   `soci convert --standalone` (v0.16.1), pushed with
                   `skopeo copy --all`; no prefetch artifact, and the SOCI
                   Snapshotter's `[prefetch]` off (soci's defaults)
  soci-opt         the unchanged image with the SOCI index of
                   `estargz optimize --soci --wait-on-line READY` (the
                   workload's spans as prefetch artifacts), loaded with
                   `[prefetch] enable = true`

it measures cold starts through a real Stargz Snapshotter (tests/lazypull.py:
a fresh snapshotter and containerd for every run), or for the soci variants
a real SOCI Snapshotter with containerd 2 (tests/socilazy.py), pulling from
Debian's registry behind a shaping proxy (tests/shapingproxy.py: bandwidth
shared by all connections, latency per request; `unshaped`: neither):

  pull    `ctr images pull` (original), `ctr-remote images rpull` (eStargz)
          or `soci-rpull` (soci; the layers are mounted, and soci-opt's
          prefetch done, within it)
  create  `ctr containers create`
  run     `ctr tasks start` until the workload prints its ready line

and the registry bytes sent before ready and in total (until the container
is stopped, right after ready; both snapshotters' background fetch is off
unless asked for).
It prints medians of --runs runs per network setting, and ratios measured
in the same run (optimized/original, optimized/unoptimized,
ours/reference), writes results.json and draws startup.png (stacked
pull/create/run bars per image and variant; needs matplotlib, the `bench`
extra).

    sudo python3 benchmarks/startup.py --runs 3 --out out/startup
    sudo python3 benchmarks/startup.py --images python gcc --network 20M/50ms \
        --variants original estargz estargz-opt soci soci-opt --out out/soci
    python3 benchmarks/startup.py --chart-only out/startup/results.json

Needs root, /dev/fuse, containerd, runc, docker-registry, skopeo, ctr-remote
(apt stargz-snapshotter), Go to build the snapshotter
(scripts/build-go.sh), for the soci variants what
scripts/build-go.sh builds (soci, soci-snapshotter-grpc, soci-rpull,
containerd 2) and what benchmarks/images.py needs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

import images  # noqa: E402  (benchmarks/images.py)

import socilazy  # noqa: E402
from daemons import NAMESPACE, Containerd, HostDirs, _env  # noqa: E402
from gobuild import build_go  # noqa: E402
from lazypull import SNAPSHOTTER, LazyPuller, SnapshotterConfig, build_snapshotter  # noqa: E402
from services import running_registry  # noqa: E402
from shapingproxy import ShapingProxy  # noqa: E402
from socilazy import SociBinaries, SociConfig, SociLazyPuller  # noqa: E402

try:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as _pyplot
    plt: Any = _pyplot
except ImportError:  # the `bench` extra; only the chart needs it
    plt = None

VARIANTS = ("original", "estargz", "estargz-opt", "ref-estargz", "ref-estargz-opt",
            "soci", "soci-opt")
#: What a run does when --variants is not given (the soci variants need the
#: SOCI tools scripts/build-go.sh builds; ask for them by name).
DEFAULT_VARIANTS = VARIANTS[:5]
#: Variants loaded by the SOCI Snapshotter (all others: Stargz Snapshotter).
SOCI_VARIANTS = ("soci", "soci-opt")
#: soci's default span size (uncompressed bytes between two checkpoints).
SOCI_SPAN_SIZE = 4 << 20
#: The ``snapshotter`` of the soci variants' runs (scripts/build-go.sh).
SOCI_SNAPSHOTTER = "soci-v0.16.1"
LABELS = {"original": "original", "estargz": "eStargz", "estargz-opt": "eStargz optimized",
          "ref-estargz": "ref eStargz", "ref-estargz-opt": "ref optimized",
          "soci": "SOCI", "soci-opt": "SOCI + our prefetch"}
DEFAULT_NETWORKS = ("20M/50ms", "100M/20ms")


class BenchError(Exception):
    """A one-line reason the benchmark cannot go on."""


def log(msg: str) -> None:
    print(f"[startup] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Network:
    """A shaping setting: bandwidth in bit/s and latency per request in s."""

    name: str
    #: None: unlimited.
    bandwidth: float | None
    latency: float

    @classmethod
    def parse(cls, text: str) -> Network:
        """``20M/50ms``: 20 Mbit/s and 50 ms per request (K, M, G; ms or s);
        ``unshaped``: the proxy only counts."""
        if text.strip() == "unshaped":
            return cls("unshaped", None, 0.0)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)/(\d+(?:\.\d+)?)(ms|s)", text.strip())
        if not m:
            raise argparse.ArgumentTypeError(f"bad network {text!r}; e.g. 20M/50ms or unshaped")
        bw = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
        lat = float(m.group(3)) / (1000 if m.group(4) == "ms" else 1)
        return cls(text.strip(), bw, lat)


@dataclass
class Run:
    """One cold start."""

    network: str
    snapshotter: str
    image: str
    variant: str
    index: int
    pull: float = 0.0
    create: float = 0.0
    run: float = 0.0
    #: pull + create + run: from the pull's start to the ready line.
    total: float = 0.0
    bytes_before_ready: int = 0
    bytes_total: int = 0
    requests_before_ready: int = 0
    requests_total: int = 0
    #: layer digest -> bytes the snapshotter prefetched (lazy variants).
    prefetch: dict = field(default_factory=dict)
    #: False if a layer fell back to a full pull (lazy variants).
    lazy: bool | None = None
    error: str = ""


# --- command helpers -------------------------------------------------------------

def sh(*argv: object, timeout: float = 1800, env: dict | None = None) -> str:
    """Run a command; its stdout, or BenchError with the end of its stderr."""
    cmd = [str(a) for a in argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=env or _env())
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd[:4])}... timed out after {timeout:g} s") from None
    if p.returncode != 0:
        tail = " | ".join(p.stderr.strip().splitlines()[-6:])
        raise BenchError(f"{' '.join(cmd[:5])}... exited {p.returncode}: {tail}")
    return p.stdout


def estargz_cli() -> list[str]:
    """How to run this checkout's ``estargz`` (the one next to our Python)."""
    exe = Path(sys.executable).with_name("estargz")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "estargz"]


# --- publishing the variants --------------------------------------------------------

def publish(image: str, variants: list[str], registry: str, work: Path,
            info: dict | None = None, span_size: int = SOCI_SPAN_SIZE) -> dict[str, str]:
    """Push each variant of ``image`` to ``registry``; ``{variant: repo:tag}``
    (missing: the variant could not be made, logged).  ``info`` gets
    ``{variant: {"seconds": ..., ...}}``: how long making and pushing took
    and, for the soci variants, what their SOCI index holds (zTOCs with
    ``span_size``-byte spans)."""
    info = {} if info is None else info
    src = images.ensure(image) / "oci"
    repo = f"{registry}/bench-{image}"
    est = estargz_cli()
    refs: dict[str, str] = {}
    ready = images.READY[image]
    makers = {
        "original": lambda dst: sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                                   f"oci:{src}:latest", f"docker://{dst}"),
        "estargz": lambda dst: sh(*est, "convert", "--oci", "-q", "--dest-tls-verify", "false",
                                  f"oci:{src}:latest", f"docker://{dst}"),
        "estargz-opt": lambda dst: sh(*est, "optimize", "--oci", "-q", "--period", "60",
                                      "--wait-on-line", ready, "--dest-tls-verify", "false",
                                      f"oci:{src}:latest", f"docker://{dst}"),
        "soci": lambda dst: publish_soci(src, dst, work, span_size),
        # The image's own Cmd is the workload; the ready line ends the profile.
        "soci-opt": lambda dst: sh(*est, "optimize", "--soci", "-q", "--period", "60",
                                   "--span-size", span_size,
                                   "--wait-on-line", ready, "--dest-tls-verify", "false",
                                   f"oci:{src}:latest", f"docker://{dst}"),
    }
    for v in variants:
        if v in makers:
            t0 = time.monotonic()
            try:
                makers[v](f"{repo}:{v}")
                took = time.monotonic() - t0
                info[v] = {"seconds": round(took, 2)}
                if v in SOCI_VARIANTS:
                    info[v]["soci_index"] = soci_index_summary(registry, f"bench-{image}", v)
            except BenchError as e:
                log(f"{image} {v}: cannot make it: {e}")
                continue
            refs[v] = f"bench-{image}:{v}"
            log(f"{image} {v}: pushed in {took:.1f} s {info[v].get('soci_index', '')}")
    ref_variants = [v for v in variants if v.startswith("ref-")]
    if ref_variants:
        refs.update(publish_reference(image, src, ref_variants, repo, work))
    return refs


def publish_soci(src: Path, dst: str, work: Path, span_size: int = SOCI_SPAN_SIZE) -> None:
    """``src`` (an OCI layout) with a SOCI index (v2) by soci's own CLI,
    daemonless (``soci convert --standalone``, soci's defaults: 4 MiB
    spans, layers under 10 MiB not indexed, no prefetch files), pushed to
    ``dst`` byte for byte with ``oras cp`` (the new image index, its image
    manifest annotated with the index, and the index with its zTOCs).
    Not skopeo: Debian's 1.9 drops ``artifactType`` from the image index's
    descriptors, so the SOCI index would look like a second linux/amd64
    image to a client choosing a platform."""
    soci = build_go("soci")
    oras = build_go("oras")
    base = Path(tempfile.mkdtemp(prefix="soci-convert-", dir=work))
    try:
        layout = base / "layout"
        sh(soci, "--root", base / "root", "convert", "--standalone", "--format", "oci-dir",
           "--span-size", span_size, src, layout)
        # soci writes the new image index as index.json's only, untagged, entry.
        (top,) = json.loads((layout / "index.json").read_text())["manifests"]
        sh(oras, "cp", "--from-oci-layout", f"{layout}@{top['digest']}", "--to-plain-http",
           dst)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def registry_get(registry: str, path: str, accept: str) -> bytes:
    """GET ``path`` from the plain-HTTP ``registry``; the body, or BenchError."""
    host, _, port = registry.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise BenchError(f"GET {path}: HTTP {resp.status}")
        return body
    finally:
        conn.close()


def soci_index_summary(registry: str, repo: str, tag: str) -> dict:
    """What the SOCI Snapshotter will find for ``repo:tag``: the pushed
    image index must still list the SOCI index (v2, bound by the image
    manifest's ``com.amazon.soci.index-digest`` annotation, which is how
    soci v0.16.1 finds it); the numbers of zTOCs and prefetch artifacts and
    their bytes.  BenchError when the binding did not survive the push."""
    oci_index = json.loads(registry_get(registry, f"/v2/{repo}/manifests/{tag}",
                                        "application/vnd.oci.image.index.v1+json"))
    entries = oci_index.get("manifests") or []
    socis = [m for m in entries if m.get("artifactType") == socilazy.SOCI_INDEX_ARTIFACT_V2]
    images_ = [m for m in entries if m not in socis]
    if len(socis) != 1 or len(images_) != 1:
        raise BenchError(f"{repo}:{tag}: expected one image and one SOCI v2 index in the "
                         f"pushed image index, found {len(images_)} and {len(socis)}")
    manifest = json.loads(registry_get(registry, f"/v2/{repo}/manifests/{images_[0]['digest']}",
                                       images_[0]["mediaType"]))
    bound = (manifest.get("annotations") or {}).get(socilazy.SOCI_INDEX_ANNOTATION)
    if bound != socis[0]["digest"]:
        raise BenchError(f"{repo}:{tag}: the image manifest names SOCI index {bound}, "
                         f"the image index lists {socis[0]['digest']}")
    index = json.loads(registry_get(registry, f"/v2/{repo}/manifests/{socis[0]['digest']}",
                                    socis[0]["mediaType"]))
    ztocs = [x for x in index["layers"] if x["mediaType"] == "application/octet-stream"]
    prefetch = [x for x in index["layers"] if x["mediaType"] != "application/octet-stream"]
    spans = 0
    for x in prefetch:
        doc = json.loads(registry_get(registry, f"/v2/{repo}/blobs/{x['digest']}", x["mediaType"]))
        spans += sum(r["end_span"] - r["start_span"] + 1 for r in doc["prefetch_spans"])
    return {"index": socis[0]["digest"], "ztocs": len(ztocs),
            "ztoc_bytes": sum(x["size"] for x in ztocs),
            "indexed_layers": [x["annotations"]["com.amazon.soci.image-layer-digest"]
                               for x in ztocs],
            "prefetch_artifacts": len(prefetch),
            "prefetch_artifact_bytes": sum(x["size"] for x in prefetch),
            "prefetch_spans": spans}


def publish_reference(image: str, src: Path, variants: list[str], repo: str,
                      work: Path) -> dict[str, str]:
    """Convert with Debian's ``ctr-remote`` on a containerd of its own (as
    tests/test_optimize.py does) and push; ``{variant: repo:tag}``."""
    ctr_remote = shutil.which("ctr-remote")
    if ctr_remote is None:
        log("ctr-remote not found (apt-get install stargz-snapshotter): no reference variants")
        return {}
    out: dict[str, str] = {}
    base = Path(tempfile.mkdtemp(prefix=f"ref-{image}-", dir=work))
    archive = base / "src.tar"
    sh("skopeo", "copy", "--quiet", f"oci:{src}:latest", f"oci-archive:{archive}:latest")
    c = Containerd(base / "ctd").start()
    try:
        name = f"bench/{image}"
        c.ctr("images", "import", "--base-name", name, "--digests", str(archive))
        digest = next(ref for ref in c.ctr("images", "ls", "-q").stdout.split()
                      if ref.startswith(f"{name}@"))
        c.ctr("images", "tag", "--force", digest, f"{name}:src")
        remote = [ctr_remote, "--address", c.address, "--namespace", c.namespace, "images"]
        for v in variants:
            local = f"{name}:{v}"
            if v == "ref-estargz":
                argv = [*remote, "convert", "--estargz", "--oci", f"{name}:src", local]
            else:
                # Records for --period seconds or until the workload exits.
                argv = [*remote, "optimize", "--oci", "--period", "10", f"{name}:src", local]
            t0 = time.monotonic()
            try:
                sh(*argv)
                c.ctr("images", "push", "--plain-http", f"{repo}:{v}", local)
            except (BenchError, AssertionError) as e:
                log(f"{image} {v}: ctr-remote cannot make it: {str(e).splitlines()[0][:300]}")
                continue
            out[v] = f"bench-{image}:{v}"
            log(f"{image} {v}: pushed in {time.monotonic() - t0:.1f} s")
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)
    return out


# --- one cold start ---------------------------------------------------------------

class Output:
    """Reads a process's output lines in a thread; notes when ``ready`` appears."""

    def __init__(self, proc: subprocess.Popen, ready: str) -> None:
        self.proc, self.ready_text = proc, ready
        self.lines: list[str] = []
        self.ready_at: float | None = None
        self.event = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None  # started with stdout=PIPE
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if self.ready_at is None and self.ready_text in line:
                self.ready_at = time.monotonic()
                self.event.set()
        self.event.set()  # EOF: the workload is gone


def cold_start(run: Run, ref: str, puller: LazyPuller | SociLazyPuller, proxy: ShapingProxy,
               timeout: float) -> None:
    """Pull, create and start ``ref`` on ``puller``; fill in ``run``."""
    c = puller.containerd
    lazy = run.variant != "original"
    if isinstance(puller, SociLazyPuller):
        snapshotter = socilazy.SNAPSHOTTER
    else:
        snapshotter = SNAPSHOTTER if lazy else "overlayfs"
    cid = f"bench-{run.image}-{run.index}"
    proxy.reset()
    t0 = time.monotonic()
    if isinstance(puller, LazyPuller) and not lazy:
        puller.pull(ref)
    else:
        puller.rpull(ref)
    t1 = time.monotonic()
    c.ctr("containers", "create", "--snapshotter", snapshotter, ref, cid)
    t2 = time.monotonic()
    argv = [c.ctr_binary, "--address", c.address, "--namespace", c.namespace,
            "tasks", "start", "--fifo-dir", str(c.fifo_dir), cid]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_env())
    try:
        out = Output(proc, images.READY[run.image])
        out.event.wait(timeout)
        if out.ready_at is None:
            tail = "".join(out.lines[-5:]).strip().replace("\n", " | ")
            raise BenchError(f"no ready line {images.READY[run.image]!r} after "
                             f"{time.monotonic() - t2:.0f} s: {tail or '(no output)'}")
        t3 = out.ready_at
    finally:
        if proc.poll() is None:
            c.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    c.ctr("tasks", "delete", cid, check=False)
    c.ctr("containers", "delete", cid, check=False)
    run.pull, run.create, run.run, run.total = t1 - t0, t2 - t1, t3 - t2, t3 - t0
    run.bytes_before_ready = proxy.bytes_until(t3)
    run.bytes_total = proxy.total_bytes
    run.requests_before_ready = len(proxy.requests(until=t3))
    run.requests_total = len(proxy.requests())
    if lazy:
        prepared = puller.snapshotter.prepared_remote_snapshots()
        # soci: a layer without a zTOC (under --min-layer-size) is pulled
        # whole by design; lazy means every layer with a zTOC was mounted.
        run.lazy = bool(prepared) and (any(prepared.values())
                                       if isinstance(puller, SociLazyPuller)
                                       else all(prepared.values()))
        if isinstance(puller, LazyPuller):
            run.prefetch = puller.snapshotter.prefetch_sizes()


# --- is the proxy itself fast? ----------------------------------------------------------

def request_times(host: str, repo: str, n: int = 30) -> float:
    """Median seconds per 50 000-byte range GET of ``repo``'s first layer on
    one keep-alive connection to ``host``: the snapshotter's on-demand
    pattern, which sees every fixed per-request delay of the proxy."""
    h, _, port = host.rpartition(":")
    conn = http.client.HTTPConnection(h, int(port), timeout=60)
    try:
        conn.request("GET", f"/v2/{repo}/manifests/estargz", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        layer = json.loads(conn.getresponse().read())["layers"][0]
        times = []
        for i in range(n):
            start = (i * 50_000) % max(layer["size"] - 50_000, 1)
            t0 = time.monotonic()
            conn.request("GET", f"/v2/{repo}/blobs/{layer['digest']}",
                         headers={"Range": f"bytes={start}-{start + 49_999}"})
            conn.getresponse().read()
            times.append(time.monotonic() - t0)
        return statistics.median(times)
    finally:
        conn.close()


def check_proxy(upstream: str, repo: str) -> dict:
    """Per-request time direct and through an unshaped proxy, printed and
    kept in results.json: the proxy must add (almost) nothing but the
    shaping, or every on-demand read pays it (a missing TCP_NODELAY once
    added 45 ms to each; docs/benchmarks.md)."""
    with ShapingProxy(upstream) as proxy:
        via = request_times(proxy.host, repo)
    direct = request_times(upstream, repo)
    log(f"range GET of 50 000 bytes: {direct * 1e3:.1f} ms direct, "
        f"{via * 1e3:.1f} ms through the unshaped proxy")
    if via - direct > 0.005:
        log("warning: the proxy adds more than 5 ms per request; results measure the proxy")
    return {"direct_ms": round(direct * 1e3, 2), "proxy_ms": round(via * 1e3, 2)}


# --- the whole benchmark --------------------------------------------------------------

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[Run]) -> list[dict]:
    """Medians per (network, snapshotter, image, variant) over good runs."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.network, r.snapshotter, r.image, r.variant), []).append(r)
    out = []
    for (net, sn, img, var), rs in groups.items():
        ok = [r for r in rs if not r.error]
        row = {"network": net, "snapshotter": sn, "image": img, "variant": var,
               "runs": len(ok), "failed": len(rs) - len(ok)}
        for k in ("pull", "create", "run", "total", "bytes_before_ready", "bytes_total",
                  "requests_before_ready", "requests_total"):
            row[k] = median([getattr(r, k) for r in ok])
        row["lazy"] = None if var == "original" else all(r.lazy for r in ok) if ok else None
        out.append(row)
    return out


#: Ratios reported, numerator/denominator variant.
PAIRS = [("estargz-opt", "original"), ("estargz-opt", "estargz"),
         ("estargz", "ref-estargz"), ("estargz-opt", "ref-estargz-opt"),
         ("soci", "original"), ("soci-opt", "original"), ("soci-opt", "soci"),
         ("soci", "estargz"), ("soci-opt", "estargz-opt")]


def ratios(summary: list[dict]) -> list[dict]:
    """Ratios of median totals and bytes before ready within one run.  A
    soci variant is compared with the other variants of every Stargz
    Snapshotter version measured (snapshotter ``SOCI / STARGZ``)."""
    out = []
    for s in summary:
        for a, b in PAIRS:
            if s["variant"] != a:
                continue
            for o in summary:
                if (o["network"], o["image"], o["variant"]) != (s["network"], s["image"], b):
                    continue
                if (a in SOCI_VARIANTS) == (b in SOCI_VARIANTS) and \
                        o["snapshotter"] != s["snapshotter"]:
                    continue
                if not s["runs"] or not o["runs"]:
                    continue
                net, img = s["network"], s["image"]
                sn = s["snapshotter"] if o["snapshotter"] == s["snapshotter"] else \
                    f"{s['snapshotter']} / {o['snapshotter']}"
                out.append({"network": net, "snapshotter": sn, "image": img, "ratio": f"{a}/{b}",
                            "time": s["total"] / o["total"],
                            "bytes_before_ready": (
                                s["bytes_before_ready"] / o["bytes_before_ready"]
                                if o["bytes_before_ready"] else float("nan"))})
    return out


def targets(summary: list[dict]) -> list[dict]:
    """The targets of issue 9 at 20 Mbit/s (recorded, not enforced)."""
    by = {(s["network"], s["snapshotter"], s["image"], s["variant"]): s for s in summary}
    out = []
    for (net, sn, img, var), s in sorted(by.items()):
        if var != "estargz-opt" or not net.startswith("20M") or not s["runs"]:
            continue
        orig, ref = by.get((net, sn, img, "original")), by.get((net, sn, img, "ref-estargz-opt"))
        if img in ("python", "gcc") and orig and orig["runs"]:
            out.append({"network": net, "snapshotter": sn, "image": img,
                        "target": "optimized >= 5x sooner than original",
                        "value": f"{orig['total'] / s['total']:.1f}x",
                        "met": orig["total"] >= 5 * s["total"]})
        if ref and ref["runs"]:
            out.append({"network": net, "snapshotter": sn, "image": img,
                        "target": "optimized no later than reference optimized",
                        "value": f"{s['total']:.2f} s vs {ref['total']:.2f} s",
                        "met": s["total"] <= ref["total"]})
            out.append({"network": net, "snapshotter": sn, "image": img,
                        "target": "no more bytes before ready than reference optimized",
                        "value": f"{s['bytes_before_ready'] / 1e6:.2f} MB vs "
                                 f"{ref['bytes_before_ready'] / 1e6:.2f} MB",
                        "met": s["bytes_before_ready"] <= ref["bytes_before_ready"]})
    return out


def table(summary: list[dict]) -> str:
    """The summary as a Markdown table."""
    lines = ["| network | snapshotter | image | variant | pull s | create s | run s | total s "
             "| MB before ready | MB total | requests before ready |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    img_order = {v: i for i, v in enumerate(images.IMAGES)}
    # soci rows beside the stargz rows of the same image.
    for s in sorted(summary, key=lambda s: (s["network"], img_order.get(s["image"], 99),
                                            order.get(s["variant"], 99), s["snapshotter"])):
        if not s["runs"]:
            lines.append(f"| {s['network']} | {s['snapshotter']} | {s['image']} | "
                         f"{s['variant']} | failed | | | | | | |")
            continue
        note = "" if s["lazy"] in (None, True) else " (fell back to a full pull)"
        lines.append(
            f"| {s['network']} | {s['snapshotter']} | {s['image']} | {s['variant']}{note} | "
            f"{s['pull']:.2f} | {s['create']:.2f} | {s['run']:.2f} | {s['total']:.2f} | "
            f"{s['bytes_before_ready'] / 1e6:.1f} | {s['bytes_total'] / 1e6:.1f} | "
            f"{s['requests_before_ready']:.0f} |")
    return "\n".join(lines)


def chart(summary: list[dict], path: Path) -> None:
    """Stacked pull/create/run bars per image and variant, one panel per
    network setting and snapshotter."""
    if plt is None:
        raise BenchError("the chart needs matplotlib: pip install '.[bench]'")
    # In the order measured (20M first by default); the soci variants'
    # bars join every Stargz Snapshotter panel of their network.
    panels = list(dict.fromkeys((s["network"], s["snapshotter"]) for s in summary
                                if s["variant"] not in SOCI_VARIANTS))
    panels += [(s["network"], s["snapshotter"]) for s in summary
               if not any(n == s["network"] for n, _ in panels)]
    panels = list(dict.fromkeys(panels))
    imgs = [i for i in images.IMAGES if any(s["image"] == i for s in summary)]
    variants = [v for v in VARIANTS if any(s["variant"] == v for s in summary)]
    soci = any(v in SOCI_VARIANTS for v in variants)
    by = {(s["network"], s["snapshotter"], s["image"], s["variant"]): s for s in summary}
    for (net, _sn, img, var), s in list(by.items()):
        if var in SOCI_VARIANTS:
            for pnet, psn in panels:
                if pnet == net:
                    by.setdefault((pnet, psn, img, var), s)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    colors = {"pull": "#4c72b0", "create": "#dd8452", "run": "#55a868"}
    width = 0.8 / max(1, len(variants))
    for ax, (net, sn) in zip(axes[:, 0], panels, strict=True):
        for vi, v in enumerate(variants):
            for ii, img in enumerate(imgs):
                cell = by.get((net, sn, img, v))
                x = ii + (vi - (len(variants) - 1) / 2) * width
                if cell is None or not cell["runs"]:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                    continue
                bottom = 0.0
                for part in ("pull", "create", "run"):
                    ax.bar(x, cell[part], width * 0.92, bottom=bottom, color=colors[part],
                           label=part if vi == 0 and ii == 0 else None)
                    bottom += cell[part]
                # The bar stacks the parts' medians; the label is the
                # median of the totals, as in the table.
                ax.text(x, bottom, f"{LABELS[v]}  {cell['total']:.1f}", ha="center", va="bottom",
                        fontsize=6, rotation=90)
        ax.set_xticks(range(len(imgs)))
        ax.set_xticklabels(imgs)
        ax.set_ylabel("seconds to ready")
        bw = next(s for s in summary if s["network"] == net)
        snapshotters = f"Stargz Snapshotter {sn}" if sn != SOCI_SNAPSHOTTER else ""
        if soci:
            snapshotters += (", " if snapshotters else "") + \
                f"SOCI Snapshotter {SOCI_SNAPSHOTTER.removeprefix('soci-')}"
        ax.set_title(f"{net} (bandwidth/latency per request), {snapshotters}: "
                     f"median of {bw['runs']} cold starts", fontsize=9)
        top = max((by[k]["total"] for k in by if k[:2] == (net, sn) and by[k]["runs"]),
                  default=1)
        ax.set_ylim(0, top * 1.45)
        # Upper right: the original image's tall bar is the leftmost.
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(doc: dict, out: Path) -> None:
    """Print the table, ratios and targets; write results.json and the chart."""
    summary = summarize([Run(**r) for r in doc["runs"]])
    doc["summary"], doc["ratios"], doc["targets"] = summary, ratios(summary), targets(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(table(summary))
    print()
    for r in doc["ratios"]:
        print(f"{r['network']:>10} {r['snapshotter']:>6} {r['image']:>7} {r['ratio']:>28}: "
              f"time {r['time']:.2f}  bytes before ready {r['bytes_before_ready']:.2f}")
    print()
    for t in doc["targets"]:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['network']} {t['snapshotter']} "
              f"{t['image']}: {t['target']} ({t['value']})")
    try:
        chart(summary, out / "startup.png")
        log(f"chart: {out / 'startup.png'}")
    except BenchError as e:
        log(str(e))


@contextlib.contextmanager
def registry_with_variants(names: list[str], variants: list[str], work: Path,
                           info: dict | None = None,
                           span_size: int = SOCI_SPAN_SIZE) -> Iterator[tuple[str, dict]]:
    """A registry holding every variant of every image: (host, {image: {variant: ref}});
    ``info[image]`` gets :func:`publish`'s ``info``."""
    info = {} if info is None else info
    with running_registry(work / "registry") as reg:
        refs = {}
        for name in names:
            refs[name] = publish(name, variants, reg.host, work, info.setdefault(name, {}),
                                 span_size)
        yield reg.host, refs


def benchmark(args: argparse.Namespace) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root (containerd, FUSE mounts)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("needs /dev/fuse")
    stargz_variants = [v for v in args.variants if v not in SOCI_VARIANTS]
    soci_variants = [v for v in args.variants if v in SOCI_VARIANTS]
    binaries = {v: build_snapshotter(v) for v in args.snapshotter} if stargz_variants else {}
    try:
        soci_binaries = SociBinaries.build() if soci_variants else None
    except RuntimeError as e:
        raise BenchError(str(e).splitlines()[0]) from None
    for name in args.images:
        images.ensure(name)
    work = Path(tempfile.mkdtemp(prefix="startup-", dir=args.workdir))
    config = SnapshotterConfig(prefetch_timeout_sec=args.prefetch_timeout,
                               background_fetch=args.background_fetch)
    # soci's default [prefetch] is off: only soci-opt, whose index carries
    # prefetch artifacts, turns it on.
    soci_configs = {v: SociConfig(background_fetch=args.background_fetch,
                                  prefetch=v == "soci-opt") for v in soci_variants}
    # (snapshotter, variant) per image and run: the soci variants once,
    # on the SOCI Snapshotter, whatever --snapshotter says.
    cells = [(sn, v) for sn in args.snapshotter for v in stargz_variants] + \
        [(SOCI_SNAPSHOTTER, v) for v in soci_variants]
    published: dict[str, dict] = {}
    runs: list[dict] = []
    doc: dict[str, Any] = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"),
                    "runs": args.runs, "networks": [n.name for n in args.network],
                    "snapshotters": args.snapshotter, "images": args.images,
                    "variants": args.variants, "prefetch_timeout_sec": args.prefetch_timeout,
                    "background_fetch": args.background_fetch,
                    "soci_config": {v: c.toml() for v, c in soci_configs.items()},
                    "soci_span_size": args.soci_span_size,
                    "load_average": os.getloadavg(), "published": published},
           "runs": runs}
    # containerd 2 leaves empty shim directories in /run/containerd.
    host_dirs = HostDirs([NAMESPACE])
    try:
        with registry_with_variants(args.images, args.variants, work, published,
                                    args.soci_span_size) as (upstream, refs):
            probe = next((f"bench-{n}" for n in args.images if "estargz" in refs[n]), None)
            if probe:
                doc["meta"]["proxy_check"] = check_proxy(upstream, probe)
            for net in args.network:
                with ShapingProxy(upstream, bandwidth=net.bandwidth,
                                  latency=net.latency) as proxy:
                    for i in range(args.runs):
                        # Interleaved: a slow spell of the machine hits
                        # every variant, not one.
                        for name in args.images:
                            for sn, v in cells:
                                if v not in refs[name]:
                                    continue
                                run = Run(net.name, sn, name, v, i)
                                base = Path(tempfile.mkdtemp(prefix=f"{name}-{v}-", dir=work))
                                puller: LazyPuller | SociLazyPuller
                                if v in SOCI_VARIANTS:
                                    assert soci_binaries is not None  # built for soci_variants
                                    puller = SociLazyPuller(base, soci_configs[v], soci_binaries)
                                else:
                                    puller = LazyPuller(base, sn, config, binaries[sn])
                                one(run, f"{proxy.host}/{refs[name][v]}", puller, proxy,
                                    args.timeout)
                                shutil.rmtree(base, ignore_errors=True)
                                runs.append(asdict(run))
                                report_partial(doc, args.out)
    finally:
        host_dirs.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return doc


#: What a failed run raises: recorded on the run, the benchmark goes on.
RUN_ERRORS: tuple[type[BaseException], ...] = (
    BenchError, AssertionError, RuntimeError, subprocess.TimeoutExpired)


@contextlib.contextmanager
def puller_running(run: Any, puller: LazyPuller | SociLazyPuller,
                   errors: tuple[type[BaseException], ...] = RUN_ERRORS) -> Iterator[None]:
    """``puller`` started for one run and stopped after; an error of
    ``errors`` in the run, or a failed stop, becomes ``run.error`` (its first
    line) instead of ending the benchmark."""
    try:
        puller.start()
        yield
    except errors as e:
        run.error = str(e).strip().splitlines()[0][:500] if str(e).strip() else repr(e)
    finally:
        try:
            puller.stop()
        except Exception as e:  # a leftover mount or process: say so, go on
            run.error = run.error or f"cleanup: {e}"


def one(run: Run, ref: str, puller: LazyPuller | SociLazyPuller, proxy: ShapingProxy,
        timeout: float) -> None:
    """One cold start of ``ref`` on ``puller`` (started here, stopped after)."""
    with puller_running(run, puller):
        cold_start(run, ref, puller, proxy, timeout)
    if run.error:
        log(f"{run.network} {run.snapshotter} {run.image} {run.variant} #{run.index}: "
            f"FAILED: {run.error}")
    else:
        log(f"{run.network} {run.snapshotter} {run.image} {run.variant} #{run.index}: "
            f"pull {run.pull:.2f} create {run.create:.2f} run {run.run:.2f} = {run.total:.2f} s, "
            f"{run.bytes_before_ready / 1e6:.1f} MB before ready "
            f"({run.requests_before_ready} requests), {run.bytes_total / 1e6:.1f} MB total")


def report_partial(doc: dict, out: Path) -> None:
    """Keep results.json current while the benchmark runs (marked partial)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({**doc, "partial": True}, indent=1) + "\n")
    os.replace(tmp, out / "results.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="startup.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--images", nargs="+", choices=images.IMAGES, default=list(images.IMAGES))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                    help="what to measure (default: %(default)s; soci and soci-opt need "
                         "the SOCI tools scripts/build-go.sh builds)")
    ap.add_argument("--network", nargs="+", type=Network.parse,
                    default=[Network.parse(n) for n in DEFAULT_NETWORKS],
                    help="BANDWIDTH/LATENCY settings, e.g. 20M/50ms, or unshaped "
                         "(default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="cold starts per cell (median)")
    ap.add_argument("--snapshotter", nargs="+", choices=("v0.18", "debian"), default=["v0.18"],
                    help="Stargz Snapshotter version(s) (default: v0.18)")
    ap.add_argument("--soci-span-size", type=int, default=SOCI_SPAN_SIZE, metavar="BYTES",
                    help="span size of the soci variants' zTOCs (default: soci's, %(default)s)")
    ap.add_argument("--prefetch-timeout", type=int, default=10,
                    help="seconds a start waits for prefetch (the daemon's default: 10)")
    ap.add_argument("--background-fetch", action="store_true",
                    help="let the snapshotters fetch whole layers in the background")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for ready")
    ap.add_argument("--out", type=Path, default=Path("out/startup"),
                    help="directory for results.json and startup.png")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where daemons keep their state (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--chart-only", type=Path, metavar="RESULTS_JSON",
                    help="print and draw an earlier results.json instead of running")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.soci_span_size < 1:
        ap.error("--soci-span-size must be at least 1")

    def on_term(signum: int, frame: object) -> None:
        # Unwind through the finally blocks: daemons stopped, mounts gone.
        raise KeyboardInterrupt
    # A background job's SIGINT is ignored; SIGTERM stops it cleanly.
    signal.signal(signal.SIGTERM, on_term)
    try:
        if args.chart_only:
            doc = json.loads(args.chart_only.read_text())
            out = args.chart_only.parent
        else:
            if args.workdir:
                args.workdir.mkdir(parents=True, exist_ok=True)
            doc, out = benchmark(args), args.out
        report(doc, out)
    except BenchError as e:
        log(f"error: {e}")
        return 1
    except images.tb.BuildError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
