#!/usr/bin/env python3
"""Per-file read latency through a lazily pulling Stargz Snapshotter, by --min-chunk-size.

    sudo python3 benchmarks/filelatency.py [--rounds 3] [--files 200] [--max-size 65536]
        [--min-chunk-sizes 0,16384,65536,262144] [--layouts external,embedded]
        [--network 0/0ms 0/20ms] [--json docs/filelatency.json] [--markdown FILE]

What a shared gzip member costs a lazy reader (issue 12, point 4; the
reference's pull request measured 5.8 ms per file read rising to 10.7 ms).
The image is testdata/images/build.py's ``debian-python3`` (the Debian rootfs
layer and the python layer), converted by ``estargz convert --oci
--min-chunk-size M`` for each M, with ``--external-toc`` (the TOC image
beside it, as issue 12 pairs them) and/or without (TOC inside the layer),
and pushed to Debian's registry (tests/services.py). Each variant is then
read through a shaping proxy (tests/shapingproxy.py; ``BANDWIDTH/LATENCY``,
0 = unlimited) by a cold Stargz Snapshotter v0.18 and containerd on fresh
state (tests/lazypull.py, prefetch and background fetch off, so every
registry request after the mount is an on-demand read):

1. ``ctr-remote images rpull`` (fetches the TOCs; not timed here),
2. the image's root filesystem mounted as a container sees it (overlayfs
   over the FUSE layers, ``LazyPuller.mounted``),
3. the same seeded sample of ``--files`` regular files of 1 to
   ``--max-size`` bytes (from the image's own layers, in the same order for
   every variant) opened and read whole one at a time, each timed with
   time.perf_counter; the registry requests and body bytes that started
   during each read are attributed to it (the proxy's log).

Variants are interleaved in every round (a slow spell of the shared machine
hits all of them) and each round reads with fresh daemons. Prints, per
network and variant (and pooled over the two TOC layouts, which read the
same layer bytes), the mean, median and p90 per-file latency over all
rounds, the median of the reads that went to the registry, the registry
bytes and requests per read, and the share of reads that needed no request
(a neighbour's fetch had brought the file already); writes the raw per-read
numbers to --json (``--report JSON`` prints them again).

Needs root, /dev/fuse, containerd, runc, docker-registry, skopeo, ctr-remote
(apt stargz-snapshotter) and Go to build the snapshotter
(``scripts/build-go.sh stargz-snapshotter-v018``).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import posixpath
import random
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

import images  # noqa: E402  (benchmarks/images.py; images.tb is testdata/images/build.py)
from startup import RUN_ERRORS, BenchError, Network, estargz_cli, puller_running, sh  # noqa: E402

from gobuild import build_go  # noqa: E402
from lazypull import LazyPuller, SnapshotterConfig, build_snapshotter  # noqa: E402
from services import running_registry  # noqa: E402
from shapingproxy import ShapingProxy  # noqa: E402

IMAGE = "debian-python3"
SNAPSHOTTER_VERSION = "v0.18"
LAYOUTS = ("external", "embedded")
#: The reference's pull request (stargz-snapshotter #1087 era): per-file
#: read latency without and with its min-chunk-size.
REFERENCE_CLAIM_MS = (5.8, 10.7)


def log(msg: str) -> None:
    print(f"[filelatency] {msg}", file=sys.stderr, flush=True)


@dataclass
class Read:
    """One file read through the lazy mount."""

    path: str
    size: int
    seconds: float
    requests: int
    bytes: int


@dataclass
class Run:
    """One cold snapshotter reading the sample of one variant."""

    network: str
    variant: str
    round: int
    pull_seconds: float = 0.0
    reads: list[Read] = field(default_factory=list)
    error: str = ""


# --- the sample ------------------------------------------------------------------------

def small_files(layout: Path, max_size: int) -> dict[str, int]:
    """Regular files of 1..``max_size`` bytes in the image's root filesystem
    (its layers applied in order, whiteouts honoured): path -> size."""
    _, desc = images.tb.read_layout(layout)
    manifest = json.loads(images.tb.blob_path(layout, desc["digest"]).read_bytes())
    tree: dict[str, int | None] = {}  # path -> size of a regular file, None otherwise
    for layer in manifest["layers"]:
        with gzip.open(images.tb.blob_path(layout, layer["digest"]), "rb") as raw, \
                tarfile.open(fileobj=raw, mode="r|") as tar:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                path = posixpath.normpath(name.strip("/") or ".")
                parent, base = posixpath.split(path)
                if base == ".wh..wh..opq":
                    for p in [p for p in tree if p.startswith(parent + "/")]:
                        del tree[p]
                    continue
                if base.startswith(".wh."):
                    gone = posixpath.join(parent, base[4:])
                    for p in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                        del tree[p]
                    continue
                tree[path] = m.size if m.isreg() else None
    return {p: s for p, s in tree.items() if s is not None and 0 < s <= max_size}


def sample(files: dict[str, int], n: int, seed: int) -> list[str]:
    """``n`` paths drawn with a fixed seed, in the order they will be read."""
    if len(files) < n:
        raise BenchError(f"only {len(files)} files fit --max-size; ask for fewer --files")
    return random.Random(seed).sample(sorted(files), n)


# --- the variants ---------------------------------------------------------------------

def variant_name(tool: str, m: int, layout: str) -> str:
    return f"{tool}-m{m}-{layout}"


def parse_variant(v: str) -> tuple[str, int, str]:
    """``ours-m65536-external`` -> ("ours", 65536, "external")."""
    tool, m, layout = v.split("-")
    return tool, int(m[1:]), layout


def publish(layout: Path, host: str, sizes: list[int], layouts: list[str]) -> dict[str, str]:
    """Convert with ``estargz convert`` and push every variant;
    ``{variant: repo:tag}`` (no host)."""
    refs = {}
    for lay in layouts:
        for m in sizes:
            v = variant_name("ours", m, lay)
            ref = f"filelatency:{v}"
            args = ["--min-chunk-size", str(m)] + (["--external-toc"] if lay == "external" else [])
            t0 = time.monotonic()
            sh(*estargz_cli(), "convert", "--oci", "-q", *args, "--dest-tls-verify", "false",
               f"oci:{layout}:latest", f"docker://{host}/{ref}")
            refs[v] = ref
            log(f"{v}: converted and pushed in {time.monotonic() - t0:.1f} s")
    return refs


def write_image(root: Path, config: bytes, layers: list[dict]) -> None:
    """Finish the OCI layout ``root`` (its layer blobs stored already) with
    one image of ``config`` and ``layers``, tagged ``latest``."""
    tb = images.tb
    out = tb.Layout(root)
    cdesc = out.blob(config, tb.OCI_CONFIG)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": tb.OCI_MANIFEST, "config": cdesc,
                           "layers": layers}).encode()
    out.tag(out.blob(manifest, tb.OCI_MANIFEST), "latest")
    out.finish()


def publish_reference(layout: Path, host: str, sizes: list[int], layouts: list[str],
                      work: Path) -> dict[str, str]:
    """The same image with every layer converted by the reference v0.18
    (``goref-v018 build-v018``: estargz.Build with WithMinChunkSize,
    and externaltoc's compressor for --external-toc, level 9 as ctr-remote),
    its manifest and config as the reference's converter writes them (the
    TOC digest and uncompressed-size annotations, new diff_ids) and, for an
    external TOC, the TOC image ``TAG-esgztoc`` (one layer per TOC blob named
    by its layer's digest, an empty config); ``{variant: repo:tag}``."""
    tb = images.tb
    goref = str(build_go("goref-v018"))
    _, desc = images.tb.read_layout(layout)
    manifest = json.loads(images.tb.blob_path(layout, desc["digest"]).read_bytes())
    config = json.loads(images.tb.blob_path(layout, manifest["config"]["digest"]).read_bytes())
    tars = []
    for i, layer in enumerate(manifest["layers"]):
        tar = work / f"layer{i}.tar"
        with gzip.open(images.tb.blob_path(layout, layer["digest"]), "rb") as src, \
                open(tar, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tars.append(tar)
    refs = {}
    for lay in layouts:
        for m in sizes:
            v = variant_name("ref", m, lay)
            t0 = time.monotonic()
            img, toc_img = work / f"{v}.oci", work / f"{v}-esgztoc.oci"
            layers, diff_ids, toc_layers = [], [], []
            for i, tar in enumerate(tars):
                out, toc = work / f"{v}-{i}.esgz", work / f"{v}-{i}.toc"
                argv = [goref, "build-v018", tar, out, "--level", "9"]
                if m:
                    argv += ["--min-chunk-size", str(m)]
                if lay == "external":
                    argv += ["--external-toc", toc]
                res = json.loads(sh(*argv))
                with gzip.open(out, "rb") as f:
                    usize = sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
                layers.append(tb.Layout(img).blob(out.read_bytes(), tb.OCI_LAYER_GZIP, annotations={
                    "containerd.io/snapshot/stargz/toc.digest": res["tocDigest"],
                    "io.containers.estargz.uncompressed-size": str(usize)}))
                diff_ids.append(res["diffID"])
                if lay == "external":
                    toc_layers.append(tb.Layout(toc_img).blob(
                        toc.read_bytes(), tb.OCI_LAYER_GZIP, annotations={
                            "containerd.io/snapshot/stargz/layer.digest": layers[-1]["digest"]}))
                    toc.unlink()
                out.unlink()
            rootfs = {"type": "layers", "diff_ids": diff_ids}
            write_image(img, json.dumps({**config, "rootfs": rootfs}).encode(), layers)
            ref = f"filelatency:{v}"
            sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{img}:latest",
               f"docker://{host}/{ref}")
            if lay == "external":
                write_image(toc_img, b"{}", sorted(toc_layers, key=lambda d: d["digest"]))
                sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                   f"oci:{toc_img}:latest", f"docker://{host}/{ref}-esgztoc")
            shutil.rmtree(img)
            shutil.rmtree(toc_img, ignore_errors=True)
            refs[v] = ref
            log(f"{v}: converted by the reference and pushed in {time.monotonic() - t0:.1f} s")
    for tar in tars:
        tar.unlink()
    return refs


# --- one cold read of the sample ----------------------------------------------------

def read_sample(run: Run, ref: str, paths: list[str], binary: Path, proxy: ShapingProxy,
                work: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix=f"{run.variant}-", dir=work))
    # Prefetch and background fetch off: every request after the mount is
    # one of our reads.
    puller = LazyPuller(base, SNAPSHOTTER_VERSION,
                        SnapshotterConfig(prefetch=False, background_fetch=False), binary)
    try:
        with puller_running(run, puller, (*RUN_ERRORS, OSError)):
            t0 = time.monotonic()
            puller.rpull(ref)
            run.pull_seconds = time.monotonic() - t0
            prepared = puller.snapshotter.prepared_remote_snapshots()
            if not prepared or not all(prepared.values()):
                raise BenchError(f"not every layer was mounted lazily: {prepared}")
            with puller.mounted(ref, "root") as root:
                proxy.reset()
                windows = []
                for p in paths:
                    start = time.monotonic()
                    t = time.perf_counter()
                    with open(root / p, "rb") as f:
                        data = f.read()
                    seconds = time.perf_counter() - t
                    windows.append((start, time.monotonic()))
                    run.reads.append(Read(p, len(data), seconds, 0, 0))
                # The proxy logs a request when its answer is sent; give the
                # last one time to land before reading the log.
                time.sleep(0.2)
                for r in proxy.requests():
                    for i, (a, b) in enumerate(windows):
                        if a <= r.start <= b:
                            run.reads[i].requests += 1
                            run.reads[i].bytes += r.sent
                            break
                    else:
                        log(f"{run.variant}: a request outside every read: {r.method} {r.path} "
                            f"{r.range}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- summary --------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def summarize(runs: list[dict], expected: dict[str, int], pooled: bool = False) -> list[dict]:
    """Per network and variant (``pooled``: per network, tool and
    min-chunk-size, both TOC layouts together, whose layer blobs a read
    fetches the same way) over every read of every round."""
    def key(r: dict) -> tuple[str, str]:
        tool, m, lay = parse_variant(r["variant"])
        return r["network"], variant_name(tool, m, "pooled" if pooled else lay)

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if not r["error"]:
            groups.setdefault(key(r), []).append(r)
    out = []
    for (net, v) in sorted(groups, key=lambda k: (k[0], *reversed(parse_variant(k[1])))):
        rs = groups[(net, v)]
        reads = [x for r in rs for x in r["reads"]]
        ms = [x["seconds"] * 1e3 for x in reads]
        missed = [x for x in reads if x["requests"]]
        out.append({
            "network": net, "variant": v, "runs": len(rs), "reads": len(reads),
            "wrong_size": sum(1 for x in reads if x["size"] != expected[x["path"]]),
            "mean_ms": round(statistics.fmean(ms), 2),
            "median_ms": round(statistics.median(ms), 2), "p90_ms": round(pct(ms, 0.9), 2),
            "run_means_ms": [round(statistics.fmean([x["seconds"] * 1e3 for x in r["reads"]]),
                                   2) for r in rs],
            "bytes_per_read": round(statistics.fmean([x["bytes"] for x in reads])),
            "requests_per_read": round(statistics.fmean([x["requests"] for x in reads]), 2),
            "no_request_share": round(1 - len(missed) / len(reads), 3),
            "median_ms_when_fetched": round(statistics.median(
                [x["seconds"] * 1e3 for x in missed]), 2) if missed else None,
        })
    return out


def table(summary: list[dict]) -> str:
    lines = ["| network | tool | min-chunk-size | TOC | per-file read: mean | median / p90 "
             "| median of reads that fetched | reads with no request | registry bytes / read "
             "| requests / read |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        tool, m, lay = parse_variant(s["variant"])
        net = s["network"]
        if net.startswith("0/"):  # unlimited bandwidth: say what the latency is
            net = "unshaped" if net == "0/0ms" else f"+{net[2:]} per request"
        lines.append(
            f"| {net} | {tool} | {m} | {lay} | {s['mean_ms']:.1f} ms "
            f"| {s['median_ms']:.1f} / {s['p90_ms']:.1f} ms "
            f"| {s['median_ms_when_fetched'] or 0:.1f} ms | {s['no_request_share'] * 100:.0f} % "
            f"| {s['bytes_per_read']:,} | {s['requests_per_read']:.2f} |")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------

def benchmark(a: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("needs root (containerd, FUSE mounts)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("needs /dev/fuse")
    binary = build_snapshotter(SNAPSHOTTER_VERSION)
    layout = images.tb.ensure(IMAGE) / "oci"
    files = small_files(layout, a.max_size)
    paths = sample(files, a.files, a.seed)
    log(f"{len(files)} regular files of 1..{a.max_size} bytes in {IMAGE}; reading {len(paths)}")
    sizes = [int(s) for s in a.min_chunk_sizes.split(",")]
    layouts = a.layouts.split(",")
    tools = a.tools.split(",")
    if not set(tools) <= {"ours", "ref"}:
        raise BenchError(f"unknown tool in {a.tools!r}; choose from ours, ref")
    for lay in layouts:
        if lay not in LAYOUTS:
            raise BenchError(f"unknown layout {lay!r}; choose from {', '.join(LAYOUTS)}")
    doc: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                 "image": IMAGE, "snapshotter": SNAPSHOTTER_VERSION, "rounds": a.rounds,
                 "files": a.files, "max_size": a.max_size, "seed": a.seed,
                 "candidates": len(files), "networks": [n.name for n in a.network],
                 "min_chunk_sizes": sizes, "layouts": layouts, "tools": tools,
                 "loadavg_start": os.getloadavg(), "cores": len(os.sched_getaffinity(0)),
                 "reference_claim_ms": REFERENCE_CLAIM_MS},
        "paths": paths, "runs": []}
    work = Path(tempfile.mkdtemp(prefix="filelatency-", dir=a.workdir))
    try:
        with running_registry(work / "registry") as reg:
            refs = publish(layout, reg.host, sizes, layouts) if "ours" in tools else {}
            if "ref" in tools:
                refs.update(publish_reference(layout, reg.host, sizes, layouts, work))
            for net in a.network:
                with ShapingProxy(reg.host, bandwidth=net.bandwidth or None,
                                  latency=net.latency) as proxy:
                    for i in range(a.rounds):
                        order = list(refs)
                        # Interleaved, and in a different order each round, so
                        # neither a slow spell nor a position favours a variant.
                        random.Random(a.seed + i).shuffle(order)
                        for v in order:
                            run = Run(net.name, v, i)
                            read_sample(run, f"{proxy.host}/{refs[v]}", paths, binary, proxy,
                                        work)
                            if run.error:
                                log(f"{net.name} {v} #{i}: FAILED: {run.error}")
                            else:
                                ms = [x.seconds * 1e3 for x in run.reads]
                                log(f"{net.name} {v} #{i}: median {statistics.median(ms):.2f} "
                                    f"ms, p90 {pct(ms, 0.9):.2f} ms, "
                                    f"{sum(x.bytes for x in run.reads):,} B in "
                                    f"{sum(x.requests for x in run.reads)} requests "
                                    f"(rpull {run.pull_seconds:.1f} s)")
                            doc["runs"].append(asdict(run))
    finally:
        doc["meta"]["loadavg_end"] = os.getloadavg()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    add_summaries(doc, files)
    return doc


def add_summaries(doc: dict[str, Any], files: dict[str, int]) -> None:
    doc["summary"] = summarize(doc["runs"], files)
    doc["summary_pooled"] = summarize(doc["runs"], files, pooled=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="filelatency.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=200, help="files read per run")
    ap.add_argument("--max-size", type=int, default=65536, help="largest file sampled (bytes)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--min-chunk-sizes", default="0,16384,65536,262144")
    ap.add_argument("--layouts", default="external,embedded",
                    help="external (--external-toc) and/or embedded (TOC in the layer)")
    ap.add_argument("--tools", default="ours,ref",
                    help="ours (estargz convert) and/or ref (the reference v0.18's estargz.Build)")
    ap.add_argument("--network", nargs="+", type=Network.parse,
                    default=[Network.parse("0/0ms"), Network.parse("0/20ms")],
                    help="BANDWIDTH/LATENCY per setting, 0 = unlimited (default: 0/0ms 0/20ms)")
    ap.add_argument("--json", dest="json_out", type=Path, help="write the raw runs here")
    ap.add_argument("--markdown", type=Path, help="write the summary table here")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="summarize an earlier --json file again instead of running")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.files < 1:
        ap.error("--rounds and --files must be at least 1")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwind: daemons stopped, mounts gone
    signal.signal(signal.SIGTERM, on_term)
    try:
        if a.workdir:
            a.workdir.mkdir(parents=True, exist_ok=True)
        if a.report:
            doc = json.loads(a.report.read_text())
            add_summaries(doc, small_files(images.tb.ensure(IMAGE) / "oci",
                                           doc["meta"]["max_size"]))
        else:
            doc = benchmark(a)
    except (BenchError, images.tb.BuildError, RuntimeError, OSError, ValueError) as e:
        log(f"error: {str(e).splitlines()[0] if str(e) else repr(e)}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    text = table(doc["summary_pooled"]) + "\n\n" + table(doc["summary"])
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    if a.json_out:
        # One line per run: 200 reads each, readable by grep, 1/3 the size.
        runs = ",\n".join(json.dumps(r, separators=(",", ":")) for r in doc["runs"])
        head = json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1)
        a.json_out.write_text(head[:-2] + ',\n "runs": [\n' + runs + "\n]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
