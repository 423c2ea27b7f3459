"""estargz: convert container image layers to eStargz, and read and verify them.

The public API is re-exported here; the modules behind it are private to
the package layout, not to callers (``profiler`` included)::

    import estargz
    result = estargz.convert_layer("layer.tar", "layer.esgz",
                                   estargz.ConvertOptions(prioritized_files=["bin/sh"]))
    estargz.verify_blob(estargz.FileSource("layer.esgz"), result.toc_digest)

The layers, bottom up (see docs/design.md): :mod:`estargz.layer` (the blob
format), :mod:`estargz.image` (images, transports by name, conversion),
:mod:`estargz.registry` (the registry client), :mod:`estargz.transports`
(one module per transport, each loaded when its name is first used) and
:mod:`estargz.cli`, which nothing imports. Importing this package needs only
the standard library.
"""

from ._cancel import (
    cancel_requested,
    check_cancelled,
    interrupt_on_signals,
    request_cancel,
    reset_cancel,
)
from ._exceptions import (
    AuthenticationError,
    Cancelled,
    DigestMismatch,
    EstargzError,
    FooterError,
    InvalidBlob,
    InvalidInput,
    MissingPrioritizedFiles,
    NotFound,
    RegistryError,
    StorageError,
    TOCError,
    UnsupportedEntry,
)
from ._fsutil import OwnedTempDir, atomic_output, stale_tempdirs
from ._progress import ProgressSink, progress_meter, reporting_to
from ._version import __version__
from .image.convert import (
    ImageConvertOptions,
    convert_image,
    convert_source,
    host_platform_default,
)
from .image.descriptor import (
    CONVERTIBLE_LAYERS,
    DOCKER_CONFIG,
    DOCKER_FOREIGN_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    sha256_digest,
)
from .image.loadorder import (
    LoadOrder,
    dump_load_order,
    load_order_from_record,
    parse_load_order,
)
from .image.records import read_records
from .image.reference import ImageRef
from .image.results import ImageResult, LayerProgress, LayerReport, ProgressFn
from .image.socicreate import (
    SociOptions,
    SociResult,
    create_soci_index,
    soci_index_source,
)
from .image.staged import StagedSource
from .image.store import ImageDestination, ImageSource, TransportOptions, copy_verified
from .image.transport import (
    Transport,
    open_destination,
    open_source,
    parse_reference,
    register_transport,
    transport_names,
)
from .layer.compression import BACKENDS, DEFAULT_BACKEND, get_backend
from .layer.converter import ConvertOptions, LayerResult, convert_layer
from .layer.footer import FOOTER_SIZE, footer_bytes, parse_footer
from .layer.jsondoc import MAX_JSON_SIZE, load_json, load_json_object
from .layer.layerinput import open_tar
from .layer.reader import LayerReader
from .layer.source import BytesSource, CountingSource, FileSource, RangeSource
from .layer.tarstream import PeekableStream, check_member, iter_headers, printable
from .layer.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
    TOCEntry,
    clean_name,
    decode_toc,
)
from .layer.verify import VerifyReport, verify_blob

__all__ = [
    "__version__",
    # errors
    "AuthenticationError", "Cancelled", "DigestMismatch", "EstargzError", "FooterError",
    "InvalidBlob", "InvalidInput", "MissingPrioritizedFiles", "NotFound", "RegistryError",
    "StorageError", "TOCError", "UnsupportedEntry",
    # cancellation (Ctrl-C): one signal guard, checks in every long loop
    "cancel_requested", "check_cancelled", "interrupt_on_signals", "request_cancel",
    "reset_cancel",
    # progress: per-thread sinks fed by the same loops, at chunk granularity
    "ProgressSink", "progress_meter", "reporting_to",
    # layer format: conversion, reading, verifying
    "BACKENDS", "DEFAULT_BACKEND", "get_backend",
    "ConvertOptions", "LayerResult", "convert_layer",
    "FOOTER_SIZE", "footer_bytes", "parse_footer",
    "LayerReader", "VerifyReport", "verify_blob",
    "NO_PREFETCH_LANDMARK", "PREFETCH_LANDMARK", "TOC", "TOCEntry", "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME", "UNCOMPRESSED_SIZE_ANNOTATION", "clean_name", "decode_toc",
    # range sources
    "BytesSource", "CountingSource", "FileSource", "RangeSource",
    # tar input: the one checked tar walk
    "PeekableStream", "check_member", "iter_headers", "open_tar", "printable",
    # JSON from outside: bounded in depth and size
    "MAX_JSON_SIZE", "load_json", "load_json_object",
    # files
    "atomic_output",
    # temporary directories a killed run's successor finds (flock-ed by their owner)
    "OwnedTempDir", "stale_tempdirs",
    # images
    "CONVERTIBLE_LAYERS", "DOCKER_CONFIG", "DOCKER_FOREIGN_LAYER", "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "INDEX_TYPES", "MANIFEST_TYPES", "OCI_CONFIG",
    "OCI_INDEX", "OCI_LAYER", "OCI_LAYER_GZIP", "OCI_LAYER_NONDIST_GZIP", "OCI_LAYER_ZSTD",
    "OCI_MANIFEST", "Descriptor", "Platform", "sha256_digest",
    "ImageRef", "parse_reference",
    "ImageDestination", "ImageSource", "StagedSource", "Transport", "TransportOptions",
    "copy_verified",
    "open_destination", "open_source", "register_transport", "transport_names",
    "ImageConvertOptions", "ImageResult", "LayerProgress", "LayerReport", "ProgressFn",
    "convert_image",
    # SOCI indexes and workload load orders (images left unchanged)
    "LoadOrder", "SociOptions", "SociResult", "create_soci_index", "dump_load_order",
    "load_order_from_record", "parse_load_order", "soci_index_source",
    "convert_source",
    "host_platform_default", "read_records",
]
