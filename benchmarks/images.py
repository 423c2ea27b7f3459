#!/usr/bin/env python3
"""Build the start-up benchmark's images, from Debian packages, into the cache.

Usage: benchmarks/images.py [--force] IMAGE...
       benchmarks/images.py [--force] all

Each IMAGE is an OCI layout with two gzip layers, in the style of HelloBench:
layer 1 is the Debian bookworm minbase root filesystem
(testdata/build-debian-rootfs.sh; the same blob as the test images
debian-multilayer and debian-python3), layer 2 what installing the
application adds and changes, as `docker build` would write it (changed
files, their parent directories, whiteouts), plus the workload's own files:

  python   python3; Cmd imports json, email and http.client, prints a line
  gcc      gcc and libc6-dev; Cmd compiles /usr/local/src/hello.c and runs it
  jvm      openjdk-17-jre-headless; Cmd runs a class compiled here with javac
  server   nginx; Cmd runs it in the foreground, logging to stderr at notice
           level; it is ready when it logs "start worker process"

READY (below) holds each image's ready line, the text the benchmark and the
profiler (`estargz optimize --wait-on-line`) wait for.

Output: ${ESTARGZ_CACHE:-$HOME/.cache/estargz-dev}/images/bench-IMAGE/oci
(tag "latest") and build-info.json, cached and keyed like the test images
(testdata/images/build.py, whose machinery this reuses); the directory's path
is printed as the last line on stdout.

Needs root, debootstrap, umoci, skopeo, and javac (openjdk-17-jdk-headless)
for the jvm image.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import posixpath
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testdata" / "images"))
import build as tb  # noqa: E402  (testdata/images/build.py: Layout, ensure, ...)

#: image -> (build-debian-rootfs.sh flag, Cmd, ready line)
SPECS: dict[str, tuple[str, list[str], str]] = {
    "python": ("--with-python3",
               ["python3", "-c", "import json, email, http.client; print('python ready')"],
               "python ready"),
    "gcc": ("--with-gcc",
            ["sh", "-c", "gcc -O2 -o /tmp/hello /usr/local/src/hello.c && /tmp/hello"],
            "hello from gcc"),
    "jvm": ("--with-jre", ["java", "-cp", "/usr/local/lib/hello", "Hello"], "hello from java"),
    "server": ("--with-nginx", ["nginx", "-g", "daemon off; error_log stderr notice;"],
               "start worker process"),
}
IMAGES = list(SPECS)
READY = {name: spec[2] for name, spec in SPECS.items()}

HELLO_C = b"""#include <stdio.h>
#include <string.h>

int main(void) {
    char msg[64];
    strcpy(msg, "hello from gcc");
    puts(msg);
    return 0;
}
"""

HELLO_JAVA = """public class Hello {
    public static void main(String[] args) {
        System.out.println("hello from java " + System.getProperty("java.version"));
    }
}
"""


def image_dir(name: str) -> Path:
    """The cache directory of benchmark image ``name`` (built or not)."""
    return tb.IMAGES / f"bench-{name}"


def workload_files(name: str, tmp: Path) -> dict[str, bytes]:
    """Files the workload of ``name`` brings besides the packages."""
    files: dict[str, bytes] = {}
    if name == "gcc":
        files["usr/local/src/hello.c"] = HELLO_C
    elif name == "jvm":
        tb.need("javac", "openjdk-17-jdk-headless")
        src = tmp / "Hello.java"
        src.write_text(HELLO_JAVA)
        tb.run("javac", "--release", "17", "-d", str(tmp), str(src))
        files["usr/local/lib/hello/Hello.class"] = (tmp / "Hello.class").read_bytes()
    return files


def _data(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    assert f is not None, member.name
    return f.read()


def diff_with_parents(base: Path, new: Path, extra: dict[str, bytes]) -> tuple[bytes, dict]:
    """The diff layer from ``base`` to ``new`` (tb.rootfs_diff) with every
    parent directory of its members copied from ``new`` (as Docker writes
    layers, and as ctr-remote's converter needs), plus regular files
    ``extra`` (name -> content, 0644, owned by root)."""
    diff, summary = tb.rootfs_diff(base, new, tb.EPOCH + 86400)
    with tarfile.open(fileobj=io.BytesIO(diff)) as tf:
        members = [(m, _data(tf, m) if m.isreg() else None) for m in tf]
    names = {m.name.rstrip("/") for m, _ in members} | set(extra)
    wanted = set(names)
    for n in names:
        parent = posixpath.dirname(n)
        while parent:
            wanted.add(parent)
            parent = posixpath.dirname(parent)
    # New's own order (parents first, sorted), members taken from the diff.
    by_name = {m.name.rstrip("/"): (m, d) for m, d in members}
    out = io.BytesIO()
    present = set()
    with tarfile.open(new) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            n = m.name.rstrip("/")
            if n in by_name:
                mm, data = by_name[n]
                dst.addfile(mm, io.BytesIO(data) if data is not None else None)
            elif n in wanted and m.isdir():
                dst.addfile(m)
            else:
                continue
            present.add(n)
        for n in sorted(wanted - present - set(extra)):
            if posixpath.basename(n).startswith(".wh."):
                mm, _ = by_name[n]
                dst.addfile(mm, io.BytesIO(b""))
                present.add(n)
        # Directories only the workload's files need (usr/local/lib/hello).
        for n in sorted(wanted - present - set(extra), key=lambda n: n.split("/")):
            ti = tarfile.TarInfo(n + "/")
            ti.type, ti.mode, ti.mtime, ti.uname, ti.gname = \
                tarfile.DIRTYPE, 0o755, tb.EPOCH + 86400, "", ""
            dst.addfile(ti)
            present.add(n)
        for n, data in sorted(extra.items()):
            ti = tarfile.TarInfo(n)
            ti.mode, ti.mtime, ti.size = 0o644, tb.EPOCH + 86400, len(data)
            ti.uname = ti.gname = ""
            dst.addfile(ti, io.BytesIO(data))
            present.add(n)
    summary["parents"] = len(present - names)
    return out.getvalue(), summary


def bench_inputs(name: str) -> Callable[[], tuple[dict, Callable[[Path], None]]]:
    flag, cmd, _ = SPECS[name]

    def inputs() -> tuple[dict, Callable[[Path], None]]:
        multi = tb.ensure("debian-multilayer")
        new = tb.debian_rootfs_tar(flag)
        st = new.stat()
        inp = {"images.py": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
               "debian-multilayer": json.loads((multi / "build-info.json").read_text())["key"],
               "rootfs": str(new), "rootfs.size": st.st_size, "rootfs.mtime_ns": st.st_mtime_ns,
               "python": "{}.{}".format(*sys.version_info[:2])}
        if name == "jvm":
            inp["javac"] = tb.run("javac", "-version", capture=True).strip()

        def build(out: Path) -> None:
            src = multi / "oci"
            _, desc = tb.read_layout(src)
            manifest = json.loads(tb.blob_path(src, desc["digest"]).read_bytes())
            base_config = json.loads(tb.blob_path(src, manifest["config"]["digest"]).read_bytes())
            base_layer, base_diff_id = manifest["layers"][0], base_config["rootfs"]["diff_ids"][0]
            base = Path(json.loads((multi / "build-info.json").read_text())["inputs"]["base"])
            if tb.file_sha256(base) != base_diff_id:
                raise tb.BuildError(f"{base} is not debian-multilayer's layer 1 any more; "
                                    "rebuild debian-multilayer (--force)")
            tmp = Path(tempfile.mkdtemp(prefix=f"estargz-bench-{name}-"))
            try:
                extra = workload_files(name, tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            tb.log(f"diffing {new.name} against minbase")
            diff, summary = diff_with_parents(base, new, extra)
            tb.log(f"{name} diff layer: {summary['added']} added, {len(summary['changed'])} "
                   f"changed, {summary['parents']} parent directories, "
                   f"{len(summary['whiteouts'])} whiteouts, {len(diff) >> 20} MiB")
            layout = tb.Layout(out / "oci")
            layers = [layout.blob(tb.blob_path(src, base_layer["digest"]).read_bytes(),
                                  base_layer["mediaType"]),
                      layout.blob(tb.gzip_bytes(diff), tb.OCI_LAYER_GZIP)]
            t0, t1 = tb.iso(tb.EPOCH), tb.iso(tb.EPOCH + 86400)
            config = {
                "created": t1, **tb.host_platform(),
                "config": {"Env": [tb.ENV_PATH], "Cmd": cmd},
                "rootfs": {"type": "layers", "diff_ids": [base_diff_id, tb.sha256(diff)]},
                "history": [
                    {"created": t0, "created_by": "debootstrap --variant=minbase bookworm "
                     "(testdata/build-debian-rootfs.sh)"},
                    {"created": t1, "created_by": f"testdata/build-debian-rootfs.sh {flag}: "
                     "the diff, and the workload's files (benchmarks/images.py)"},
                ],
            }
            cfg = layout.blob(tb.canonical_json(config), tb.OCI_CONFIG)
            m = layout.blob(tb.canonical_json(
                {"schemaVersion": 2, "mediaType": tb.OCI_MANIFEST, "config": cfg,
                 "layers": layers}), tb.OCI_MANIFEST)
            layout.tag(m, tb.TAG)
            layout.finish()
            tb.validate(out / "oci", tb.TAG)

        return inp, build

    return inputs


for _name in SPECS:
    tb.BUILDERS[f"bench-{_name}"] = bench_inputs(_name)


def ensure(name: str) -> Path:
    """Build benchmark image ``name`` unless cached; return its directory."""
    return tb.ensure(f"bench-{name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="images.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("image", nargs="+", metavar="IMAGE", choices=[*SPECS, "all"])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    names = list(SPECS) if "all" in args.image else list(dict.fromkeys(args.image))
    if args.force:
        tb.FORCE.update(f"bench-{n}" for n in names)
    return tb.build_and_print(ensure, names)


if __name__ == "__main__":
    sys.exit(main())
