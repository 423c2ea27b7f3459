#!/usr/bin/env python3
"""Build the estargz tool's container image from the repository's Dockerfile, cached.

Usage: scripts/build-tool-image.py [--force] [--base IMAGE]

Builds the image the Dockerfile at the repository's root describes, tagged
estargz:VERSION (VERSION from estargz/_version.py), in the Docker daemon that
DOCKER_HOST names (the docker CLI is $ESTARGZ_DOCKER_CLI or `docker`), and
prints the tag as the last line on stdout; progress goes to stderr.

The base (the Dockerfile's BASE) is, unless --base names another (e.g. Docker
Hub's debian:bookworm-slim), made here without any registry: the Debian
bookworm minbase root filesystem of testdata/build-debian-rootfs.sh (cached),
trimmed the way Debian's -slim images are (no documentation other than
copyright files, man pages or translations, and dpkg told to keep it so), with
bookworm, bookworm-updates and bookworm-security as its apt sources, imported
with `docker import` as estargz-base:bookworm-KEY.  The build then fetches only
Debian packages (apt) and Python packages (PyPI), over the host's network.

Cache: the built image is saved (`docker save`) to
${ESTARGZ_CACHE:-$HOME/.cache/estargz-dev}/images/tool-image/image.tar with
build-info.json, keyed like the test images (testdata/images/build.py, whose
machinery this reuses) by a hash of: this script, the Dockerfile,
.dockerignore, every file of the build context (setup.cfg, pyproject.toml,
README.md, container/, estargz/, profiler/), the Debian rootfs tar and the base's name.
When the key matches, the image is loaded from there (`docker load`, a few
seconds) instead of built; when the daemon already holds it, nothing is done.
--force rebuilds anyway.

Needs: a Docker daemon and its CLI, root and debootstrap for the base rootfs.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testdata" / "images"))
import build as tb  # noqa: E402  (testdata/images/build.py: ensure, run, log, ...)

NAME = "tool-image"
REPOSITORY = "estargz"
#: The build context, as .dockerignore admits it.
CONTEXT_FILES = ("setup.cfg", "pyproject.toml", "README.md", "container/entrypoint.sh",
                 "container/seccomp.json")
CONTEXT_DIRS = ("estargz", "profiler")
#: What Debian's -slim images leave out (their dpkg.cfg.d file, as paths
#: below the root); copyright files stay.
SLIM_EXCLUDES = ("usr/share/doc/", "usr/share/groff/", "usr/share/info/", "usr/share/linda/",
                 "usr/share/lintian/", "usr/share/locale/", "usr/share/man/")
SLIM_DPKG_CFG = b"""# As in Debian's -slim images: packages installed later leave these out too.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""
APT_SOURCES = b"""Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def version() -> str:
    """The package version, read from estargz/_version.py without importing it."""
    text = (REPO / "estargz" / "_version.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if m is None:
        raise tb.BuildError("no __version__ in estargz/_version.py")
    return m.group(1)


def tag() -> str:
    """The image's name: estargz:VERSION."""
    return f"{REPOSITORY}:{version()}"


def docker_cli() -> str:
    return os.environ.get("ESTARGZ_DOCKER_CLI") or "docker"


def docker(*args: str, capture: bool = False) -> str:
    """The docker CLI; the legacy builder, which needs no buildx plugin."""
    return tb.run(docker_cli(), *args, capture=capture, env={"DOCKER_BUILDKIT": "0"})


def image_id(name: str) -> str | None:
    """The ID of image ``name`` in the daemon, or None."""
    p = subprocess.run([docker_cli(), "image", "inspect", "--format", "{{.Id}}", name],
                       capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def context_digest() -> str:
    """A hash of every file of the build context: names, executable bits, bytes."""
    h = hashlib.sha256()
    paths = [REPO / f for f in CONTEXT_FILES]
    for d in CONTEXT_DIRS:
        paths += [p for p in (REPO / d).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    for p in sorted(paths, key=lambda p: p.relative_to(REPO).as_posix()):
        h.update(p.relative_to(REPO).as_posix().encode() + b"\0")
        h.update(b"x" if os.access(p, os.X_OK) else b"-")
        h.update(tb.file_sha256(p).encode() + b"\0")
    return "sha256:" + h.hexdigest()


def requirements() -> list[str]:
    """install_requires of setup.cfg, and what building the wheel needs."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    toml = (REPO / "pyproject.toml").read_text()
    m = re.search(r"^requires = \[(.*)\]", toml, re.M)
    if m is None:
        raise tb.BuildError("no [build-system] requires in pyproject.toml")
    return reqs + re.findall(r'"([^"]+)"', m.group(1))


def make_context(ctx: Path) -> None:
    """The build context in ``ctx``: what .dockerignore admits from the
    repository, and wheels/ with the dependencies, downloaded here by pip for
    the image's Python (bookworm's 3.11, this machine's architecture) so
    that the build fetches nothing from PyPI itself."""
    for f in ("Dockerfile", ".dockerignore", *CONTEXT_FILES):
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, ctx / f)
    for d in CONTEXT_DIRS:
        shutil.copytree(REPO / d, ctx / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    machine = platform.machine()
    platforms = [f"manylinux_2_{v}_{machine}" for v in range(36, 4, -1)]
    platforms += [f"manylinux{t}_{machine}" for t in ("2014", "2010", "1")]
    tb.log("downloading the dependencies' wheels for Python 3.11")
    tb.run(sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(ctx / "wheels"),
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
           "--abi", "cp311", *(a for p in platforms for a in ("--platform", p)),
           *requirements())


def slim_rootfs(src: Path, out: IO[bytes]) -> None:
    """Write ``src`` (a rootfs layer tar) to ``out`` as the -slim base: the
    excluded documentation dropped, the dpkg exclusions and apt sources added."""
    def keep(name: str) -> bool:
        name = name.lstrip("./")
        if name.startswith("usr/share/doc/") and name.endswith("/copyright"):
            return True
        return not any(name.startswith(x) and name != x for x in SLIM_EXCLUDES)

    added = {"etc/dpkg/dpkg.cfg.d/slim": SLIM_DPKG_CFG,
             "etc/apt/sources.list.d/debian.sources": APT_SOURCES}
    with tarfile.open(src) as tin, tarfile.open(fileobj=out, mode="w|",
                                                 format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            if not keep(m.name) or m.name.lstrip("./") == "etc/apt/sources.list":
                continue
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
        for name, data in added.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, tb.EPOCH
            tout.addfile(info, io.BytesIO(data))


def import_base(rootfs: Path, key: str) -> str:
    """Our Debian base in the daemon (imported unless there); its name."""
    name = f"estargz-base:bookworm-{key[:12]}"
    if image_id(name) is not None:
        return name
    tb.log(f"importing {rootfs} (trimmed) as {name}")
    proc = subprocess.Popen([docker_cli(), "import", "--change", f"ENV {ENV_PATH}",
                             "--change", 'CMD ["bash"]', "-", name],
                            stdin=subprocess.PIPE, stdout=sys.stderr, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        slim_rootfs(rootfs, proc.stdin)
    except BrokenPipeError:
        pass
    finally:
        proc.stdin.close()
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait() != 0:
        raise tb.BuildError(f"docker import exited {proc.returncode}: {err}")
    return name


def tool_inputs(base: str | None) -> Callable[[], tuple[dict, Callable[[Path], None]]]:
    """The cache inputs and the builder of the tool image, for tb.ensure."""
    def inputs() -> tuple[dict, Callable[[Path], None]]:
        files = {f: tb.file_sha256(REPO / f) for f in ("Dockerfile", ".dockerignore")}
        inp: dict = {"build-tool-image.py": tb.file_sha256(Path(__file__)), **files,
                     "context": context_digest(), "version": version(), "base": base,
                     "machine": platform.machine()}
        rootfs = None
        if base is None:
            rootfs = tb.debian_rootfs_tar()
            st = rootfs.stat()
            inp.update({"rootfs": str(rootfs), "rootfs.size": st.st_size,
                        "rootfs.mtime_ns": st.st_mtime_ns})
        base_key = hashlib.sha256(tb.canonical_json(
            {k: inp.get(k) for k in ("build-tool-image.py", "rootfs", "rootfs.size",
                                     "rootfs.mtime_ns")})).hexdigest()

        def build(out: Path) -> None:
            from_ = base if rootfs is None else import_base(rootfs, base_key)
            tb.log(f"docker build {tag()} from {from_}")
            with tempfile.TemporaryDirectory(prefix="ctx-", dir=out) as ctx:
                make_context(Path(ctx))
                docker("build", "--network", "host", "--pull=false", "--build-arg",
                       f"BASE={from_}", "--build-arg", f"VERSION={version()}", "-t", tag(),
                       ctx)
            docker("save", "-o", str(out / "image.tar"), tag())
            (out / "image-id").write_text((image_id(tag()) or "") + "\n")
            size = int(docker("image", "inspect", "--format", "{{.Size}}", tag(),
                              capture=True))
            (out / "size").write_text(f"{size}\n")
            tb.log(f"{tag()}: {size / 1e6:.1f} MB")

        return inp, build
    return inputs


def ensure_loaded(base: str | None = None) -> str:
    """Build (or take from the cache) the tool image and make sure the daemon
    holds it; its tag."""
    tb.BUILDERS[NAME] = tool_inputs(base)
    out = tb.ensure(NAME)
    want = (out / "image-id").read_text().strip()
    if image_id(tag()) != want:
        tb.log(f"loading {tag()} from {out / 'image.tar'}")
        docker("load", "-q", "-i", str(out / "image.tar"))
        if image_id(tag()) != want:
            raise tb.BuildError(f"{out / 'image.tar'} did not load as {tag()} ({want})")
    return tag()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="build-tool-image.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--base", metavar="IMAGE",
                    help="a Debian bookworm image to build on (default: made here)")
    args = ap.parse_args(argv)
    if args.force:
        tb.FORCE.add(NAME)

    def on_term(signum: int, frame: object) -> None:
        tb.log("terminated")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    try:
        name = ensure_loaded(args.base)
    except tb.BuildError as e:
        tb.log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        tb.log("interrupted")
        return 130
    print(name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
