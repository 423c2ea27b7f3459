"""The CLI's progress display on stderr: live per-layer bars (phase, bytes
done of total, rate, elapsed) drawn by rich when stderr is a terminal; one
plain line per finished layer otherwise; nothing when quiet.

The library only sends events (:mod:`estargz._progress`,
:class:`~estargz.LayerProgress`); everything about drawing is here.
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from .. import LayerProgress, LayerReport, ProgressSink

__all__ = ["ProgressDisplay", "layer_line"]

#: Redraws a second: enough to look live, few enough to cost nothing
#: against compression (rich redraws from its own thread).
REFRESH_PER_SECOND = 8


class _BytesColumn(DownloadColumn):
    """Bytes done of the total; blank for a phase that counts none (profile)."""

    def render(self, task: Task) -> Text:
        if task.total is None and not task.completed:
            return Text("")
        return super().render(task)


def layer_line(report: LayerReport) -> str:
    """The one line a finished layer gets."""
    return (f"layer {report.index} {report.old_digest[:19]} "
            f"{report.old_size:>12,} -> {report.new_size:>12,}  "
            f"{report.action} {report.seconds:.1f}s")


class ProgressDisplay:
    """A ``ProgressFn`` (and ``ProgressSink`` via :meth:`sink`) for the CLI.

    ``live`` draws rich bars on stderr (a terminal); ``lines`` prints one
    line per finished layer; neither: silent. Thread-safe: layer events
    come from the layer threads.
    """

    def __init__(self, *, live: bool, lines: bool, labels: dict[str, str] | None = None,
                 ) -> None:
        self.live = live
        self.lines = lines
        #: What a phase is shown as, when not its name (``profile (10s)``).
        self.labels = labels or {}
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskID] = {}
        self._phase: dict[str, str] = {}
        # Keys of :meth:`sink` tasks (optimize's staging and profile): shown
        # until the conversion's layers take over, hidden after.
        self._own: set[str] = set()
        self._hidden: set[str] = set()
        self._progress: Progress | None = None
        if live:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TextColumn("{task.fields[phase]:<10}"),
                BarColumn(),
                _BytesColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                refresh_per_second=REFRESH_PER_SECOND,
            )

    @classmethod
    def for_stderr(cls, *, quiet: bool, as_json: bool,
                   labels: dict[str, str] | None = None) -> ProgressDisplay:
        """Live on a terminal, lines elsewhere, nothing when ``quiet``;
        ``as_json`` keeps stderr as it was (no per-layer lines)."""
        tty = sys.stderr.isatty()
        return cls(live=not quiet and tty, lines=not quiet and not as_json and not tty,
                   labels=labels)

    def echo(self, line: str) -> None:
        """Print ``line`` on stderr, above the bars when they are drawn."""
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            click.echo(line, err=True)

    def __enter__(self) -> ProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, _event: str, payload: LayerReport | LayerProgress) -> None:
        if self._progress is not None and self._own:
            # The conversion's layers take over from optimize's staging and
            # profile row; from now on that row is drawn hidden.
            with self._lock:
                self._hidden |= self._own
                for key in self._own:
                    self._progress.update(self._tasks[key], visible=False)
                self._own = set()
        if isinstance(payload, LayerProgress):
            self.update(payload.digest[7:19], payload.phase, payload.done, payload.total)
        elif isinstance(payload, LayerReport):
            self.finished(payload)

    def sink(self, key: str) -> ProgressSink:
        """A ``reporting_to`` sink drawing one task labelled ``key``."""
        def sink(phase: str, done: int, total: int | None) -> None:
            if self.update(key, phase, done, total) and key not in self._hidden:
                with self._lock:
                    self._own.add(key)
        return sink

    def _start(self, key: str, phase: str, total: int | None) -> TaskID:
        """A fresh task for ``key`` in ``phase`` (its own count, rate and
        elapsed time), in place of the one it had. Under ``_lock``."""
        assert self._progress is not None
        old = self._tasks.get(key)
        if old is not None:
            self._progress.remove_task(old)
        self._phase[key] = phase
        task = self._tasks[key] = self._progress.add_task(
            key, total=total, phase=self.labels.get(phase, phase),
            visible=key not in self._hidden)
        return task

    def update(self, key: str, phase: str, done: int, total: int | None) -> bool:
        """Task ``key`` is in ``phase`` with ``done`` of ``total`` bytes;
        whether the task is new."""
        progress = self._progress
        if progress is None:
            return False
        with self._lock:
            new = key not in self._tasks
            if new or self._phase[key] != phase:
                # (A new task rather than reset(), which cannot unset a total.)
                task = self._start(key, phase, total)
            else:
                task = self._tasks[key]
            progress.update(task, completed=done)
        return new

    def finished(self, report: LayerReport) -> None:
        """Layer ``report`` is done: its line above the bars, or on its own."""
        if self._progress is not None:
            key = report.old_digest[7:19]
            with self._lock:
                task = self._tasks.get(key)
                if task is not None:
                    self._progress.update(task, visible=False)
            self._progress.console.print(layer_line(report), highlight=False, markup=False)
        elif self.lines:
            click.echo(layer_line(report), err=True)

