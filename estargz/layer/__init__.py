"""The eStargz layer format: one blob, no images, no network.

Converting a tar to an eStargz blob (:mod:`.converter`, with :mod:`.order`,
:mod:`.compression` and :mod:`.layerinput`), its parts (:mod:`.footer`,
:mod:`.toc`, :mod:`.gzipstream`), the one checked tar walk
(:mod:`.tarstream`), random access to a blob (:mod:`.source`) and reading and
verifying one (:mod:`.reader`, :mod:`.verify`); and SOCI zTOCs, which index
an unmodified gzip layer instead (:mod:`.ztoc`, its checkpoints in
:mod:`.zinfo`). Imports only
``estargz._exceptions`` and ``estargz._fsutil`` from outside; public names are
re-exported by :mod:`estargz`.
"""

from . import zstdchunked as zstdchunked  # registers the zstd:chunked format
