"""What a whole-image conversion reports: one :class:`LayerReport` per layer
(holding the layer package's :class:`~estargz.LayerResult`), the
:class:`ImageResult` that ``--json`` prints, and the progress events
(:class:`LayerProgress`) a caller may follow while it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..layer.converter import LayerResult
from ..layer.toc import TOC_DIGEST_ANNOTATION
from .descriptor import Descriptor

__all__ = ["ImageResult", "LayerProgress", "LayerReport", "ProgressFn"]


@dataclass
class LayerReport:
    """One layer of a converted image: where it sits, its descriptor before
    and after, and what was done to it.

    The conversion itself is described once, by the layer package's
    :class:`LayerResult` (``result``; ``None`` when the layer was reused as
    it was); the figures below are read from it rather than copied."""

    manifest: str
    index: int
    old: Descriptor
    new: Descriptor
    #: ``"converted"``, ``"reused"`` or ``"shared"`` (the same source layer
    #: converted earlier in this run).
    action: str
    seconds: float
    result: LayerResult | None = None

    @property
    def old_digest(self) -> str:
        return self.old.digest

    @property
    def old_size(self) -> int:
        return self.old.size

    @property
    def new_digest(self) -> str:
        return self.new.digest

    @property
    def new_size(self) -> int:
        return self.new.size

    @property
    def toc_digest(self) -> str:
        """The TOC digest: of the conversion, or the verified annotation of a
        reused layer (a Docker-typed manifest cannot carry it in ``new``)."""
        if self.result is not None:
            return self.result.toc_digest
        return self.old.annotations.get(TOC_DIGEST_ANNOTATION, "")

    @property
    def prefetch_size(self) -> int:
        """Compressed bytes before ``.prefetch.landmark`` (0 if unknown)."""
        return self.result.prefetch_size if self.result else 0

    @property
    def toc_size(self) -> int:
        """Compressed bytes of the TOC and footer (0 if unknown)."""
        return self.result.toc_size if self.result else 0

    def to_dict(self) -> dict[str, Any]:
        """The flat record ``--json`` prints for the layer."""
        return {"manifest": self.manifest, "index": self.index,
                "old_digest": self.old_digest, "old_size": self.old_size,
                "new_digest": self.new_digest, "new_size": self.new_size,
                "toc_digest": self.toc_digest, "seconds": self.seconds,
                "action": self.action, "prefetch_size": self.prefetch_size,
                "toc_size": self.toc_size}


@dataclass
class ImageResult:
    """What :func:`convert_image` did, for people and pipelines."""

    source: str
    destination: str
    digest: str = ""
    media_type: str = ""
    platforms: list[str] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: With an external TOC: the "TOC image" written beside the image, and its digest.
    toc_image: str = ""
    toc_image_digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [layer.to_dict() for layer in self.layers]
        d["totals"] = {
            "layers": len(self.layers),
            "old_size": sum(layer.old_size for layer in self.layers),
            "new_size": sum(layer.new_size for layer in self.layers),
        }
        return d


@dataclass(frozen=True)
class LayerProgress:
    """A ``"bytes"`` progress event: source layer ``digest`` is in ``phase``
    (``fetch``, ``decompress``, ``compress``, ``upload``; see
    :mod:`estargz._progress`) with ``done`` of ``total`` bytes (``None``:
    unknown). Sent from the layer's worker thread, at most every 0.1 s per
    phase, so a callback must be thread-safe and cheap."""

    digest: str
    phase: str
    done: int
    total: int | None


#: ``progress("layer", LayerReport)`` when a layer is done (in the main
#: thread, in manifest order); ``progress("bytes", LayerProgress)`` while it
#: is worked on (from worker threads).
ProgressFn = Callable[[str, "LayerReport | LayerProgress"], None]
