"""An image's root filesystem for profiling as root: its layers fetched,
extracted and stacked with overlayfs (:func:`assemble_image_rootfs`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

from estargz import (
    CONVERTIBLE_LAYERS,
    DOCKER_FOREIGN_LAYER,
    OCI_LAYER_NONDIST_GZIP,
    Descriptor,
    ImageSource,
    InvalidInput,
    StorageError,
)

from ..linux import add_note, deferred_signals
from .extract import extract_layer
from .layermap import LayerListing
from .overlay import OverlayRoot, remove_scratch

#: Layer media types whose blobs are tar, tar+gzip or tar+zstd.
LAYER_MEDIA_TYPES = frozenset({
    *CONVERTIBLE_LAYERS, DOCKER_FOREIGN_LAYER, OCI_LAYER_NONDIST_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})


def _make_scratch(scratch: str) -> None:
    try:
        os.mkdir(scratch, 0o700)
    except FileExistsError:
        if os.path.islink(scratch) or not os.path.isdir(scratch) or os.listdir(scratch):
            raise StorageError(f"scratch directory {scratch} must be empty "
                               "(or not exist)") from None
    except OSError as e:
        raise StorageError(f"cannot create {scratch}: {e.strerror}") from None


def layer_blob(source: ImageSource, desc: Descriptor, index: int,
               blobs_dir: str) -> tuple[str, bool]:
    """A readable file holding layer ``index``'s blob, and whether it is a
    copy in ``blobs_dir`` (the caller's to delete) rather than the source's
    own file.  The copy is fetched (verified) once per digest and appears
    whole or not at all.  Raises InvalidInput for a layer that is not a tar."""
    if desc.media_type not in LAYER_MEDIA_TYPES:
        raise InvalidInput(f"layer {index} ({desc.digest}) has media type "
                           f"{desc.media_type!r}, not a tar layer")
    path = source.local_blob_path(desc)
    if path is not None:
        return path, False
    path = os.path.join(blobs_dir, desc.digest.split(":", 1)[1])
    if not os.path.exists(path):
        try:
            os.makedirs(blobs_dir, 0o700, exist_ok=True)
            with open(path + ".part", "wb") as f:
                source.fetch_blob(desc, f)
            os.rename(path + ".part", path)
        except OSError as e:
            raise StorageError(f"cannot store layer {desc.digest}: {e.strerror or e}") from None
    return path, True


#: Layer ``i``'s blob as ``(path, ours)``: a readable file, and whether it
#: is a copy the caller deletes after its last use.
BlobGetter = Callable[[int], tuple[str, bool]]


def _extract_layers(blob: BlobGetter, keys: Sequence[str],
                    scratch: str) -> tuple[list[str], list[LayerListing]]:
    """Extract each layer (``blob(i)``; ``keys[i]`` tells copies of one blob
    apart) into ``scratch/layers/N``."""
    layers_dir = os.path.join(scratch, "layers")
    os.mkdir(layers_dir, 0o700)
    last_use = {k: i for i, k in enumerate(keys)}
    dirs: list[str] = []
    listings: list[LayerListing] = []
    for i, key in enumerate(keys):
        path, ours = blob(i)
        # Per occurrence, not per digest: a layer that comes twice must sit
        # at both places of the overlayfs stack.
        dest = os.path.join(layers_dir, str(i))
        listings.append(extract_layer(path, dest, lowers=list(zip(dirs, listings, strict=True)),
                                      spool_dir=scratch))
        dirs.append(dest)
        if last_use[key] == i and ours:
            os.unlink(path)
    return dirs, listings


@contextlib.contextmanager
def assemble_image_rootfs(source: ImageSource, manifest_layers: Sequence[Descriptor],
                          scratch: str, upper_bytes: int | None = None
                          ) -> Iterator[tuple[str, list[LayerListing]]]:
    """Mount the root filesystem of an image; yield ``(mountpoint, listings)``.

    ``manifest_layers`` are the manifest's layer descriptors (bottom first);
    each blob is read from ``source`` (verified against its descriptor),
    extracted into ``scratch/layers/N`` and the lot stacked by
    :class:`OverlayRoot` under ``scratch``, read-write: the workload's writes
    land in ``scratch/upper``. ``listings[N]`` is layer N's
    :class:`~profiler.rootfs.layermap.LayerListing`. ``scratch`` must not exist or
    be empty; on leaving the block it is unmounted and deleted, as it is if
    anything fails before.

    An opaque marker at the top of a layer (``.wh..wh..opq``) hides every
    layer below; overlayfs ignores opacity on a layer's root directory, so
    those layers are left out of the mount instead.

    ``upper_bytes`` bounds the workload's writes (:class:`OverlayRoot`).
    """
    blobs_dir = os.path.join(os.path.abspath(scratch), "blobs")
    with assemble_rootfs(lambda i: layer_blob(source, manifest_layers[i], i, blobs_dir),
                         [d.digest for d in manifest_layers], scratch,
                         upper_bytes) as (mountpoint, listings, _):
        yield mountpoint, listings


@contextlib.contextmanager
def assemble_rootfs(blob: BlobGetter, keys: Sequence[str], scratch: str,
                    upper_bytes: int | None = None
                    ) -> Iterator[tuple[str, list[LayerListing], OverlayRoot]]:
    """:func:`assemble_image_rootfs` from layer blobs already at hand
    (``blob(i)``, one key per layer telling copies of one blob apart);
    yields the :class:`OverlayRoot` too."""
    scratch = os.path.abspath(scratch)
    _make_scratch(scratch)
    overlay: OverlayRoot | None = None
    try:
        try:
            dirs, listings = _extract_layers(blob, keys, scratch)
            blobs_dir = os.path.join(scratch, "blobs")
            if os.path.isdir(blobs_dir):
                os.rmdir(blobs_dir)
        except OSError as e:
            raise StorageError(f"cannot extract the layers into {scratch}: "
                               f"{e.strerror or e}") from None
        first = max((i for i, lst in enumerate(listings) if "" in lst.opaque_dirs), default=0)
        overlay = OverlayRoot(dirs[first:], scratch, upper_bytes)
        with overlay as mountpoint:
            yield mountpoint, listings, overlay
    except BaseException as e:
        # Once entered, OverlayRoot has cleaned up itself.
        if overlay is None or not overlay._entered:
            with deferred_signals():
                problem = remove_scratch(scratch)
            if problem:
                add_note(e, problem)
        raise
