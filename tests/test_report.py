"""The profiling report: terminal summary and the HTML page, as a browser shows it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from estargz import (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    TOC_DIGEST_ANNOTATION,
    Descriptor,
    LayerReport,
    LayerResult,
)
from profiler.record import Access
from profiler.report import Report, render_text, write_html


def layer(index: int, digest: str, size: int, prefetch_size: int, toc_size: int) -> LayerReport:
    """A converted layer as the image conversion reports it."""
    result = LayerResult(blob_digest=digest, blob_size=size, diff_id="sha256:" + "d" * 64,
                         toc_digest="sha256:" + "t" * 64, uncompressed_size=2 * size,
                         entries=10, prioritized=3, prefetch_size=prefetch_size,
                         toc_size=toc_size)
    return LayerReport(manifest="sha256:" + "m" * 64, index=index,
                       old=Descriptor(OCI_LAYER, "sha256:" + "0" * 64, size),
                       new=Descriptor(OCI_LAYER_GZIP, digest, size,
                                      {TOC_DIGEST_ANNOTATION: result.toc_digest}),
                       action="converted", seconds=0.1, result=result)


def sample() -> Report:
    return Report(
        image="oci:app:latest", workload=["python3", "-c", "import json"],
        accesses=[Access("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 0, 0.001, 210_000),
                  Access("usr/bin/python3.11", 1, 0.004, 6_000_000),
                  Access("usr/lib/python3.11/json/__init__.py", 1, 0.05, 14_000)],
        layers=[layer(0, "sha256:" + "a" * 64, 30 << 20, 1 << 20, 100_000),
                layer(1, "sha256:" + "b" * 64, 20 << 20, 5 << 20, 50_000)],
        seconds=1.25, exit_status=0)


def test_terminal_summary_gives_the_figures():
    text = render_text(sample())
    assert text.splitlines()[0] == ("oci:app:latest: 3 files accessed by python3 -c import json "
                                    "in 1.25s")
    assert "layer 0:     1 files, prefetch    1.0 MiB of   30.0 MiB (  3.3%)" in text
    assert "layer 1:     2 files, prefetch    5.0 MiB of   20.0 MiB ( 25.0%)" in text
    assert "before start: 6.1 MiB fetched lazily vs 50.0 MiB for a full pull (12.3%)" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_browser_shows_the_figures(tmp_path):
    page = tmp_path / "report.html"
    write_html(sample(), str(page))
    p = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    assert '<strong id="files-accessed">3</strong>' in dom
    assert '<strong id="lazy-bytes">6.1 MiB</strong>' in dom
    assert '<strong id="full-bytes">50.0 MiB</strong>' in dom
    assert 'style="width: 25.00%"' in dom and 'style="width: 3.33%"' in dom
    assert dom.index("ld-linux-x86-64.so.2") < dom.index("/usr/bin/python3.11") \
        < dom.index("json/__init__.py")
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1000,700", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
