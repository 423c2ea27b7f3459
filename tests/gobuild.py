"""The Go programs the tests and benchmarks run, built by ``scripts/build-go.sh``.

Importable by tests and by benchmarks (put ``tests/`` on ``sys.path``).

``build_go(target) -> Path``
    Builds (or reuses, cached under ``${ESTARGZ_CACHE:-~/.cache/estargz-dev}/bin``)
    the program ``target`` names and returns the binary's path; the targets
    are listed at the top of the script.  Raises :class:`GoBuildError`,
    with the end of the script's output, when it fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-go.sh"


class GoBuildError(RuntimeError):
    """``scripts/build-go.sh`` failed."""


def build_go(target: str) -> Path:
    """The path of ``target`` (see :mod:`gobuild`), built first if needed."""
    # A first build downloads modules and compiles containerd: allow for it.
    p = subprocess.run(["sh", str(SCRIPT), target], capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise GoBuildError(f"cannot build {target}: {p.stderr.strip()[-3000:]}")
    return Path(p.stdout.strip().splitlines()[-1])
