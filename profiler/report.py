"""What profiling found, for people: a terminal summary and an HTML page.

The page is rendered with jinja2 from ``templates/report.html.j2``: the
accessed files in first-access order (time, size, layer) and, per layer, a
bar of the bytes prefetched against the layer's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2

from estargz import LayerReport, atomic_output

from .record import Access


@dataclass
class Report:
    """Everything the summary and the page show.

    ``layers`` are the profiled manifest's converted layers as the image
    conversion reports them (one result type per layer: the report adds no
    copy of its own); what profiling adds per layer, the number of accessed
    files, comes from ``accesses`` (:meth:`files`)."""

    image: str
    workload: list[str]
    accesses: list[Access]
    layers: list[LayerReport]
    seconds: float = 0.0
    exit_status: int | None = None
    timed_out: bool = False
    notes: list[str] = field(default_factory=list)

    def files(self, layer: int) -> int:
        """Accessed files that layer ``layer`` provides."""
        return sum(1 for a in self.accesses if a.layer == layer)

    @staticmethod
    def share(layer: LayerReport) -> float:
        """Fraction of the layer prefetched at start, 0..1."""
        return layer.prefetch_size / layer.new_size if layer.new_size else 0.0

    @property
    def full_pull(self) -> int:
        return sum(layer.new_size for layer in self.layers)

    @property
    def lazy_start(self) -> int:
        """Bytes a lazy puller fetches before the workload starts: each
        layer's TOC and footer, and what precedes its landmark."""
        return sum(layer.prefetch_size + layer.toc_size for layer in self.layers)


def human(n: float) -> str:
    """``n`` bytes in B, KiB, MiB or GiB, as a person reads them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_text(report: Report) -> str:
    """A summary a person reads at a glance on a terminal."""
    lines = [f"{report.image}: {len(report.accesses)} files accessed by "
             f"{' '.join(report.workload)} in {report.seconds:.2f}s"
             + (" (period ended)" if report.timed_out else "")]
    for layer in report.layers:
        lines.append(f"  layer {layer.index}: {report.files(layer.index):>5} files, prefetch "
                     f"{human(layer.prefetch_size):>10} of {human(layer.new_size):>10} "
                     f"({report.share(layer):6.1%})")
    full = report.full_pull
    lazy = report.lazy_start
    ratio = lazy / full if full else 0.0
    lines.append(f"  before start: {human(lazy)} fetched lazily vs {human(full)} "
                 f"for a full pull ({ratio:.1%})")
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines)


_ENV = jinja2.Environment(loader=jinja2.PackageLoader("profiler", "templates"),
                          autoescape=jinja2.select_autoescape(["html", "j2"]),
                          undefined=jinja2.StrictUndefined)
_ENV.filters["human"] = human


def render_html(report: Report) -> str:
    """The page, as one HTML document."""
    return _ENV.get_template("report.html.j2").render(r=report)


def write_html(report: Report, path: str) -> None:
    """Write the page to ``path``, whole or not at all."""
    with atomic_output(path) as f:
        f.write(render_html(report).encode())
