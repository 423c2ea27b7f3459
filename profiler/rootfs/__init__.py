"""An image's root filesystem, assembled from its layers for profiling.

* :mod:`.layermap`: which layer provides each path (pure logic over
  :class:`LayerListing`, what one layer holds);
* :mod:`.dirfd`: reaching, creating and removing paths below a root
  without following symlinks;
* :mod:`.tree` and :mod:`.extract`: safe extraction of one hostile layer
  (:func:`extract_layer`), as an overlayfs lower directory or flat;
* :mod:`.overlay`: the read-write overlayfs mount (:class:`OverlayRoot`);
* :mod:`.image`: as root, a whole image fetched, extracted and mounted
  (:func:`assemble_image_rootfs`, or :func:`assemble_rootfs` from blobs
  at hand);
* :mod:`.flat`: without root, the layers merged into one plain tree
  (:func:`assemble_flat_rootfs`).
"""

from .dirfd import remove_tree
from .extract import extract_layer
from .flat import LAYER_SUBDIR, assemble_flat_rootfs, layer_usage, merge_layer
from .image import LAYER_MEDIA_TYPES, assemble_image_rootfs, assemble_rootfs, layer_blob
from .layermap import LayerListing, layer_for, link_targets, normalize, prioritized_lists, resolve
from .overlay import OVL_MAX_STACK, SCRATCH_BYTES, OverlayRoot, remove_scratch, scratch_full_note

__all__ = [
    "LAYER_MEDIA_TYPES", "LAYER_SUBDIR", "OVL_MAX_STACK", "SCRATCH_BYTES", "LayerListing",
    "OverlayRoot", "assemble_flat_rootfs", "assemble_image_rootfs", "assemble_rootfs",
    "extract_layer", "layer_blob", "layer_for", "layer_usage", "link_targets", "merge_layer",
    "normalize", "prioritized_lists", "remove_scratch", "remove_tree", "resolve",
    "scratch_full_note",
]
