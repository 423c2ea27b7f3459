"""A client of the OCI distribution API (registry v2): HTTP with retries
(:mod:`.http`), TLS (:mod:`.tls`), authentication challenges and tokens
(:mod:`.challenge`), credentials from auth files, Docker's config and
credential helpers (:mod:`.credentials`), and the API with the blob range
source (:mod:`.client`). Builds on :mod:`estargz.image` and
:mod:`estargz.layer`; used by the ``docker://`` transport.
"""

from .challenge import Challenge, parse_challenge
from .client import RANGE_SKIP_LIMIT, RegistryBlobSource, RegistryClient

__all__ = ["Challenge", "RANGE_SKIP_LIMIT", "RegistryBlobSource", "RegistryClient",
           "parse_challenge"]
