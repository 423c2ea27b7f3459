"""estargz: convert container image layers to eStargz, and read and verify them.

The public API is re-exported here; the modules behind it are private to
the package layout, not to callers::

    import estargz
    result = estargz.convert_layer("layer.tar", "layer.esgz",
                                   estargz.ConvertOptions(prioritized_files=["bin/sh"]))
    estargz.verify_blob(estargz.FileSource("layer.esgz"), result.toc_digest)
"""

__version__ = "0.1.0"

from ._exceptions import (AuthenticationError, DigestMismatch, EstargzError, FooterError,
                          InvalidBlob, InvalidInput, MissingPrioritizedFiles, NotFound,
                          RegistryError, StorageError, TOCError, UnsupportedEntry)
from .converter import ConvertOptions, LayerResult, convert_layer
from .footer import FOOTER_SIZE, footer_bytes, parse_footer
from .reader import LayerReader
from .source import BytesSource, CountingSource, FileSource, RangeSource
from .toc import (NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC, TOC_DIGEST_ANNOTATION,
                  TOC_TAR_NAME, UNCOMPRESSED_SIZE_ANNOTATION, TOCEntry, clean_name,
                  decode_toc)
from .verify import VerifyReport, verify_blob

__all__ = [
    "AuthenticationError", "RegistryError", "BytesSource", "ConvertOptions", "CountingSource", "DigestMismatch", "EstargzError",
    "FOOTER_SIZE", "FileSource", "FooterError", "InvalidBlob", "InvalidInput",
    "LayerReader", "LayerResult", "MissingPrioritizedFiles", "NO_PREFETCH_LANDMARK",
    "NotFound", "PREFETCH_LANDMARK", "RangeSource", "StorageError", "TOC",
    "TOCEntry", "TOCError", "TOC_DIGEST_ANNOTATION", "TOC_TAR_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION", "UnsupportedEntry", "VerifyReport", "clean_name",
    "convert_layer", "decode_toc", "footer_bytes", "parse_footer", "verify_blob",
]
