"""A client of the OCI distribution API (registry v2), one per registry host.

:class:`RegistryClient` fetches and pushes manifests and blobs: blobs are
streamed and checked against their digest and size, read by HTTP range for
lazy access (:meth:`RegistryClient.blob_source` gives a
:class:`~estargz.source.RangeSource`, so :class:`~estargz.LayerReader` reads
a remote layer's TOC and single files without pulling the blob), and pushed
monolithically or in chunks, mounted from another repository when possible.

What it does the way skopeo / containers-image do, so it behaves like the
tools people know:

* **Transport.** HTTPS, trusting the system's CAs plus the ``*.crt`` files of
  a certificate directory (``client.cert``/``client.key`` pairs are presented
  as a client certificate). With ``tls_verify=False`` certificates are not
  checked, and a registry that does not speak TLS at all is tried over plain
  HTTP. The choice is made once, by ``GET /v2/``, which also tells how the
  registry wants to be authenticated.
* **Auth.** Anonymous, ``Basic``, or the ``Bearer`` token flow: a token per
  set of scopes (``repository:NAME:pull`` or ``:pull,push``), fetched from
  the realm the registry names and cached until it expires. Credentials come
  from the caller or, only when a registry asks for them, from
  :func:`estargz.auth.find_credentials`.
* **Retries.** 429, 5xx, timeouts and dropped connections are retried with a
  bounded exponential back-off (a short ``Retry-After`` is honoured); a
  download that breaks resumes where it stopped with a ``Range`` request.
  Other 4xx answers are final.
* **Errors.** Every failure is one :class:`~estargz.EstargzError` line naming
  the registry: :class:`AuthenticationError` (401/403, with how to give
  credentials), :class:`NotFound` (404), :class:`DigestMismatch`, or
  :class:`RegistryError` with the status and the registry's own error code.
  No message ever holds a password or a token.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import random
import re
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Collection, Iterator, Optional, Sequence, TypeVar
from urllib.parse import quote, urlencode, urljoin, urlsplit

import requests
import requests.adapters
import urllib3

from . import __version__
from ._exceptions import (AuthenticationError, DigestMismatch, EstargzError, InvalidBlob,
                          InvalidInput, NotFound, RegistryError, StorageError)
from .auth import Credentials, FoundCredentials, find_credentials
from .descriptor import check_digest, sha256_digest
from .reference import DOCKER_HUB, DOCKER_HUB_API
from .source import _check_range

__all__ = ["RegistryClient", "RegistryBlobSource", "parse_challenge", "Challenge"]

#: Largest manifest accepted (containers/image uses the same limit).
MANIFEST_LIMIT = 4 << 20
#: When a registry ignores ``Range`` and sends the whole blob, a read that
#: ends within this many bytes of the start is served by skipping; beyond it,
#: reading lazily would silently mean downloading the blob, so it is an error.
RANGE_SKIP_LIMIT = 1 << 20
#: A ``Retry-After`` longer than this is not waited for; the usual back-off is.
MAX_RETRY_AFTER = 10.0
#: Longest single back-off sleep.
MAX_BACKOFF = 8.0
#: Size of each read of a streamed body. Small enough that a dropped
#: connection loses little: urllib3 discards a partly filled read when the
#: connection breaks, so a download resumes from the last whole piece.
_PIECE = 64 << 10
#: How much of an error body is read to find the registry's error code.
_ERROR_BODY_LIMIT = 64 << 10

#: How to give credentials (the CLI's options are named here, in one place).
AUTH_HINT = ("give credentials with --src-creds/--dest-creds USER:PASS, run "
             "`docker login {host}`, or name an auth file with --authfile or "
             "REGISTRY_AUTH_FILE")
#: How to fix an untrusted certificate.
TLS_HINT = ("put its CA certificate (*.crt) in a directory and pass it with --cert-dir, "
            "or disable verification with --src-tls-verify=false/--dest-tls-verify=false")

#: Per-host certificate directories containers/image and Docker read when
#: no directory is given (``HOST`` is replaced by ``host[:port]``).
DEFAULT_CERT_DIRS = ("~/.config/containers/certs.d/HOST", "/etc/containers/certs.d/HOST",
                     "/etc/docker/certs.d/HOST")

_T = TypeVar("_T")
Body = Optional[Any]  # bytes, or a zero-argument callable returning a fresh readable


# --- errors that steer the retry loop -----------------------------------------

class _Transient(RegistryError):
    """A failure worth another attempt (429, 5xx, a dropped connection, a
    timeout). Caught by :meth:`RegistryClient._retrying`; should one escape,
    it is still a :class:`RegistryError` with a readable message."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Unreachable(RegistryError):
    """No connection could be made (refused, unknown host, TLS refused).
    Not retried, but the HTTPS-to-HTTP fallback catches it."""


# --- the authentication challenge ---------------------------------------------

@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: scheme (lower case) and parameters."""

    scheme: str
    params: dict = field(default_factory=dict, hash=False)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> list[str]:
        """Scopes the registry asked for (space-separated in the header)."""
        return self.params.get("scope", "").split()


_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


def parse_challenge(header: Optional[str]) -> Optional[Challenge]:
    """Parse ``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``.

    Only the first challenge of the header is used (registries send one).
    """
    if not header:
        return None
    m = re.match(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*(.*)", header, re.S)
    if not m:
        return None
    scheme, rest = m.group(1).lower(), m.group(2)
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        pm = _CHALLENGE_PARAM.match(rest, pos)
        if not pm or pm.end() == pos:
            break  # a second challenge or junk: stop at what we understood
        value = pm.group(2) if pm.group(2) is not None else pm.group(3)
        params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = pm.end()
    return Challenge(scheme, params)


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()


# --- TLS ----------------------------------------------------------------------

class _ContextAdapter(requests.adapters.HTTPAdapter):
    """An adapter that uses our own :class:`ssl.SSLContext`.

    requests otherwise trusts certifi's bundle *or* a file given as
    ``verify``, never "the system's CAs plus these", and it has no way to take
    a client key from the certificate directory layout; a context does both.
    How requests passes TLS settings to urllib3 changed within 2.32.x, so the
    connection is chosen here, from pools that were given the context.
    """

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        self._context = context
        # urllib3 sets the context's verify_mode from cert_reqs on each connect.
        self._cert_reqs = "CERT_NONE" if context.verify_mode == ssl.CERT_NONE else "CERT_REQUIRED"
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        pool_kwargs.update(ssl_context=self._context, cert_reqs=self._cert_reqs)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.update(ssl_context=self._context, cert_reqs=self._cert_reqs)
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def get_connection_with_tls_context(self, request: Any, verify: Any,
                                        proxies: Any = None,
                                        cert: Any = None) -> Any:
        proxy = requests.utils.select_proxy(request.url, proxies)
        if proxy:
            proxy = requests.utils.prepend_scheme_if_needed(proxy, "http")
            return self.proxy_manager_for(proxy).connection_from_url(request.url)
        return self.poolmanager.connection_from_url(request.url)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # The context already holds the trust anchors and the client key;
        # requests would otherwise point the connection at certifi's bundle.
        return None


def _ssl_context(host: str, tls_verify: bool, cert_dir: Optional[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ctx.cert_store_stats().get("x509_ca", 0) == 0:
        try:  # a system without a CA bundle: fall back to certifi's, as requests would
            import certifi
            ctx.load_verify_locations(certifi.where())
        except (ImportError, OSError, ssl.SSLError):
            pass
    if not tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif urllib3.__version__.startswith("1."):
        # urllib3 1.x sends no SNI to an IP address, which OpenSSL's own host
        # check refuses; it matches the hostname itself when the context does not.
        ctx.check_hostname = False
    if cert_dir is not None:
        if not os.path.isdir(cert_dir):
            raise InvalidInput(f"certificate directory {cert_dir} does not exist")
        dirs = [cert_dir]
    else:
        dirs = [os.path.expanduser(d.replace("HOST", host)) for d in DEFAULT_CERT_DIRS]
        dirs = [d for d in dirs if os.path.isdir(d)]
    for d in dirs:
        _load_cert_dir(ctx, d)
    return ctx


def _load_cert_dir(ctx: ssl.SSLContext, directory: str) -> None:
    """Load a containers-style ``certs.d`` directory: ``*.crt`` are CAs,
    ``NAME.cert`` + ``NAME.key`` a client certificate (the first pair)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise InvalidInput(f"cannot read certificate directory {directory}: {e.strerror}") from None
    client_loaded = False
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".crt"):
                ctx.load_verify_locations(cafile=path)
            elif name.endswith(".cert"):
                key = path[:-len(".cert")] + ".key"
                if not os.path.exists(key):
                    raise InvalidInput(f"client certificate {path} has no matching key {key}")
                if not client_loaded:
                    ctx.load_cert_chain(path, key)
                    client_loaded = True
            elif name.endswith(".key"):
                if not os.path.exists(path[:-len(".key")] + ".cert"):
                    raise InvalidInput(f"client key {path} has no matching certificate "
                                       f"{path[:-len('.key')]}.cert")
        except (ssl.SSLError, OSError, ValueError) as e:
            raise InvalidInput(f"cannot load {path}: {_reason_text(e)}") from None


# --- small helpers ------------------------------------------------------------

def _reason_text(exc: BaseException) -> str:
    """The useful part of a transport error, without the urllib3 wrapping."""
    text = str(exc)
    for pattern in (r"certificate verify failed: ([^(')\"]+)",
                    r"\[SSL: [A-Z0-9_]+\] ([^(')\"]+)",
                    r"\[Errno -?\d+\] ([^'\")\]]+)",
                    r"(Read timed out)", r"(Connection aborted)",
                    r"(Remote end closed connection[^'\")]*)",
                    r"(Connection broken: [^'\"]+?)(?:'|\"|\)|$)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip().rstrip(".,")
    text = re.sub(r"\s+", " ", text).strip()
    return text[:200] if text else type(exc).__name__


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _error_detail(body: bytes) -> str:
    """``CODE: message`` from a registry's JSON error body, or ``""``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return ""
    first = errors[0]
    parts = [str(first.get(k)) for k in ("code", "message") if first.get(k)]
    text = ": ".join(parts)
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return _one_line(text, 200)


def _parse_content_range(value: Optional[str]) -> Optional[tuple[int, int]]:
    """``bytes START-END/TOTAL`` -> ``(START, END)`` (inclusive)."""
    if not value:
        return None
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_repo(repo: str) -> str:
    if (not repo or repo.startswith("/") or repo.endswith("/") or "//" in repo
            or ".." in repo.split("/") or not re.fullmatch(r"[a-z0-9._/-]+", repo)):
        raise InvalidInput(f"invalid repository name {repo!r}")
    return repo


def _is_digest(reference: str) -> bool:
    return ":" in reference


class _FileSlice:
    """``length`` bytes of a file from ``offset``, as a request body."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = length

    def __len__(self) -> int:
        return self._left

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


# --- the client ---------------------------------------------------------------

class RegistryClient:
    """A client of one registry host (``HOST[:PORT]``), safe to share
    between threads.

    ``tls_verify=False`` skips certificate checks and allows plain HTTP;
    ``cert_dir`` is a containers-style certificate directory (``*.crt`` CAs,
    ``client.cert``/``client.key``); ``credentials`` is ``(user, password)``,
    else they are looked up (honouring ``auth_file``) when the registry asks.
    ``retries`` bounds the extra attempts of one operation; ``backoff`` is
    the first delay between them, doubled each time; ``timeout`` is in
    seconds, for connecting and between received bytes.
    """

    def __init__(self, host: str, *, tls_verify: bool = True, cert_dir: Optional[str] = None,
                 credentials: Optional[Credentials] = None, auth_file: Optional[str] = None,
                 retries: int = 5, timeout: float = 60, backoff: float = 0.25) -> None:
        if not host or "/" in host or host.strip() != host:
            raise InvalidInput(f"invalid registry host {host!r} (expected HOST[:PORT])")
        self.host = host
        #: Where the API is served: Docker Hub's lives on another name.
        self.api_host = DOCKER_HUB_API if host == DOCKER_HUB else host
        self.tls_verify = tls_verify
        self.retries = max(0, retries)
        self.timeout = timeout
        self.backoff = backoff
        self._auth_file = auth_file
        self._found: Optional[FoundCredentials] = (
            FoundCredentials(credentials[0], credentials[1], "given explicitly")
            if credentials is not None else None)
        self._creds_resolved = credentials is not None
        self._base: Optional[str] = None
        self._challenge: Optional[Challenge] = None
        self._tokens: dict[tuple, _Token] = {}
        self._lock = threading.RLock()
        self._token_lock = threading.Lock()
        #: Replaceable in tests, to observe back-off without waiting.
        self._sleep: Callable[[float], None] = time.sleep

        context = _ssl_context(self.api_host, tls_verify, cert_dir)
        if not tls_verify:
            # The user asked for unverified TLS; urllib3 would warn on every request.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self._session = requests.Session()
        # No ~/.netrc credentials, REQUESTS_CA_BUNDLE or proxy guessing behind
        # our back: proxies are applied explicitly in _proxies().
        self._session.trust_env = False
        self._session.headers["User-Agent"] = f"estargz/{__version__}"
        self._session.mount("https://", _ContextAdapter(context, pool_maxsize=16))
        self._session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))

    # -- lifecycle --

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RegistryClient({self.host!r})"

    @property
    def scheme(self) -> Optional[str]:
        """``https`` or ``http`` once the registry has been reached, else ``None``."""
        return self._base.split(":", 1)[0] if self._base else None

    # -- manifests --

    def get_manifest(self, repo: str, reference: str,
                     accept: Sequence[str]) -> tuple[bytes, str, str]:
        """Fetch a manifest (or index) by tag or digest.

        Returns ``(raw bytes, media type, digest)``: the media type from
        ``Content-Type`` (from the JSON ``mediaType`` if the registry sends a
        generic one), the digest the sha256 of the bytes. A manifest asked
        for by digest must match it, else :class:`DigestMismatch`.
        """
        _check_repo(repo)
        if _is_digest(reference):
            check_digest(reference)
        name = f"{repo}@{reference}" if _is_digest(reference) else f"{repo}:{reference}"
        url = f"/v2/{repo}/manifests/{quote(reference, safe=':')}"

        def attempt() -> tuple[bytes, str]:
            resp = self._request("GET", url, scopes=self._pull(repo), repo=repo,
                                 what=f"GET manifest {name}", missing=f"manifest {name}",
                                 headers={"Accept": ", ".join(accept)}, stream=True)
            with resp:
                data = self._read_body(resp, MANIFEST_LIMIT + 1, f"manifest {name}")
                if len(data) > MANIFEST_LIMIT:
                    raise RegistryError(f"manifest {name} from registry {self.host} is larger "
                                        f"than the {MANIFEST_LIMIT}-byte limit")
                return data, resp.headers.get("Content-Type", "")

        data, content_type = self._retrying(attempt)
        digest = sha256_digest(data)
        if _is_digest(reference) and digest != reference:
            raise DigestMismatch(f"manifest {name} from registry {self.host} has digest "
                                 f"{digest}")
        media_type = content_type.split(";", 1)[0].strip()
        if media_type in ("", "application/json", "text/plain", "application/octet-stream"):
            try:  # some registries and proxies send a generic type
                declared = json.loads(data).get("mediaType")
            except (ValueError, AttributeError, UnicodeDecodeError):
                declared = None
            if isinstance(declared, str) and declared:
                media_type = declared
        return data, media_type, digest

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag (or its digest); returns its digest."""
        _check_repo(repo)
        digest = sha256_digest(data)
        if _is_digest(reference) and reference != digest:
            raise InvalidInput(f"manifest pushed as {reference} has digest {digest}")
        name = f"{repo}@{reference}" if _is_digest(reference) else f"{repo}:{reference}"
        url = f"/v2/{repo}/manifests/{quote(reference, safe=':')}"

        def attempt() -> Optional[str]:
            resp = self._request("PUT", url, scopes=self._push(repo), repo=repo,
                                 what=f"PUT manifest {name}", ok=(200, 201, 202),
                                 headers={"Content-Type": media_type}, body=data)
            with resp:
                return resp.headers.get("Docker-Content-Digest")

        answered = self._retrying(attempt)
        if answered and answered.startswith("sha256:") and answered != digest:
            raise DigestMismatch(f"registry {self.host} stored manifest {name} as {answered}, "
                                 f"but its digest is {digest}")
        return digest

    # -- blobs: reading --

    def head_blob(self, repo: str, digest: str) -> Optional[int]:
        """The size of blob ``digest`` in ``repo``, or ``None`` if it is absent."""
        _check_repo(repo)
        check_digest(digest)
        return self._retrying(lambda: self._head(repo, digest, self._pull(repo)))

    def download_blob(self, repo: str, digest: str, size: int, dst: BinaryIO) -> None:
        """Stream blob ``digest`` (of ``size`` bytes) into ``dst``.

        Checks size and sha256 before returning (:class:`DigestMismatch`
        otherwise: ``dst`` then holds bad bytes, so write to a temporary
        file). A dropped connection resumes from the last byte received.
        """
        _check_repo(repo)
        check_digest(digest)
        url = f"/v2/{repo}/blobs/{digest}"
        h = hashlib.sha256()
        got = 0
        failures = 0       # consecutive failures without progress
        total_failures = 0  # bounded even when every attempt makes some progress
        while True:
            headers = {"Accept-Encoding": "identity"}
            if got:
                headers["Range"] = f"bytes={got}-"
            before = got
            try:
                resp = self._request("GET", url, scopes=self._pull(repo), repo=repo,
                                     what=f"GET blob {digest}", missing=f"blob {digest}",
                                     headers=headers, stream=True, ok=(200, 206))
                with resp:
                    skip, expected_end = self._resume_position(resp, got, digest)
                    for piece in self._iter_body(resp, f"blob {digest}"):
                        if skip:
                            drop = min(skip, len(piece))
                            piece, skip = piece[drop:], skip - drop
                            if not piece:
                                continue
                        if got + len(piece) > size:
                            raise self._blob_mismatch(repo, digest,
                                                      f"has more than the expected {size} bytes")
                        h.update(piece)
                        _write(dst, piece, digest)
                        got += len(piece)
                    if expected_end is not None and got < expected_end:
                        # The connection closed early without urllib3 noticing.
                        raise _Transient(f"registry {self.host} closed the connection "
                                         f"{expected_end - got} bytes before the end of blob "
                                         f"{digest}")
                break
            except _Transient as e:
                if got >= size:
                    break  # everything arrived; only the end of the answer was lost
                failures = 1 if got > before else failures + 1
                total_failures += 1
                if failures > self.retries or total_failures > 10 * (self.retries + 1):
                    raise RegistryError(f"download of blob {digest} from registry {self.host} "
                                        f"(repository {repo}) failed: {e} (gave up after "
                                        f"{total_failures} attempts)") from None
                self._sleep(self._delay(failures - 1, e.retry_after))
            except _Unreachable as e:
                raise RegistryError(str(e)) from None
        if got != size:
            raise self._blob_mismatch(repo, digest, f"has {got} bytes, not {size}")
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            raise self._blob_mismatch(repo, digest, f"does not match its digest: got {actual}")

    def read_blob_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of blob ``digest`` from ``offset``, by HTTP Range.

        A registry that ignores ``Range`` is tolerated for reads near the
        start of a blob (the prefix is skipped); otherwise that is a
        :class:`RegistryError`, since lazy reading would silently become a
        full download. Bytes read this way cannot be checked against the
        blob digest; :class:`~estargz.LayerReader` checks them against the
        TOC's digests.
        """
        _check_repo(repo)
        check_digest(digest)
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range: {length} bytes at offset {offset}")
        if length == 0:
            return b""
        end = offset + length - 1
        url = f"/v2/{repo}/blobs/{digest}"

        def attempt() -> bytes:
            resp = self._request("GET", url, scopes=self._pull(repo), repo=repo,
                                 what=f"GET bytes {offset}-{end} of blob {digest}",
                                 missing=f"blob {digest}", stream=True, ok=(200, 206),
                                 headers={"Range": f"bytes={offset}-{end}",
                                          "Accept-Encoding": "identity"})
            with resp:
                if resp.status_code == 206:
                    got_range = _parse_content_range(resp.headers.get("Content-Range"))
                    if got_range is None or got_range[0] != offset or got_range[1] > end:
                        raise RegistryError(
                            f"registry {self.host} answered a request for bytes "
                            f"{offset}-{end} of blob {digest} with Content-Range "
                            f"{resp.headers.get('Content-Range')!r}")
                    skip, want = 0, got_range[1] - offset + 1
                else:
                    if offset + length > RANGE_SKIP_LIMIT:
                        raise RegistryError(
                            f"registry {self.host} ignores HTTP range requests (it answered "
                            f"a request for {length} bytes at offset {offset} of blob "
                            f"{digest} with the whole blob); reading a layer lazily needs them")
                    skip, want = offset, length
                data = self._read_span(resp, skip, want, f"blob {digest}")
            if len(data) < length:
                raise InvalidBlob(f"blob {digest} in registry {self.host} ends before byte "
                                  f"{end} (read {len(data)} of {length} bytes)", offset=offset)
            return data

        return self._retrying(attempt)

    def blob_source(self, repo: str, digest: str, size: int) -> "RegistryBlobSource":
        """A :class:`~estargz.source.RangeSource` reading the blob by ranges."""
        _check_repo(repo)
        check_digest(digest)
        return RegistryBlobSource(self, repo, digest, size)

    # -- blobs: writing --

    def upload_blob(self, repo: str, digest: str, size: int, src_path: str, *,
                    chunk_size: Optional[int] = None, mount_from: Optional[str] = None) -> None:
        """Push the file ``src_path`` as blob ``digest`` of ``size`` bytes.

        Nothing is sent if the repository already has the blob. With
        ``mount_from``, the registry is first asked to mount the blob from
        that repository (no bytes move); if it declines, the upload session
        it opened is used. The upload is monolithic (POST, then one PUT),
        or with ``chunk_size`` a PATCH per chunk, then a PUT. A failed
        attempt restarts the upload: the registry's session state after a
        broken request is unknown.
        """
        _check_repo(repo)
        check_digest(digest)
        if mount_from is not None:
            _check_repo(mount_from)
        if chunk_size is not None and chunk_size <= 0:
            raise InvalidInput(f"chunk size must be positive, not {chunk_size}")
        try:
            actual = os.stat(src_path).st_size
        except OSError as e:
            raise StorageError(f"cannot read {src_path}: {e.strerror}") from None
        if actual != size:
            raise InvalidInput(f"{src_path} holds {actual} bytes, not the {size} bytes "
                               f"of blob {digest}")
        scopes = self._push(repo)
        if mount_from and mount_from != repo:
            scopes = scopes + self._pull(mount_from)
        else:
            mount_from = None

        def attempt() -> None:
            # Before every attempt: a previous one may have landed even though
            # its answer was lost, and the blob may be there already anyway.
            if self._head(repo, digest, scopes) is not None:
                return
            self._upload_once(repo, digest, size, src_path, chunk_size, mount_from, scopes)

        self._retrying(attempt)

    def _upload_once(self, repo: str, digest: str, size: int, src_path: str,
                     chunk_size: Optional[int], mount_from: Optional[str],
                     scopes: list[str]) -> None:
        what = f"upload of blob {digest} to {repo}"
        start = f"/v2/{repo}/blobs/uploads/"
        resp = None
        if mount_from:
            query = urlencode({"mount": digest, "from": mount_from})
            resp = self._request("POST", f"{start}?{query}", scopes=scopes, repo=repo,
                                 what=f"mount of blob {digest} from {mount_from} into {repo}",
                                 ok=(201, 202), body=b"")
            resp.close()
            if resp.status_code == 201:
                return  # mounted: no bytes needed
        if resp is None:
            resp = self._request("POST", start, scopes=scopes, repo=repo, what=what,
                                 ok=(202,), body=b"")
            resp.close()
        location = self._location(resp, what)
        if chunk_size is None:
            put_body: Body = lambda: open(src_path, "rb")  # noqa: E731
        else:
            # OCI distribution lets a registry demand a minimum chunk size.
            minimum = resp.headers.get("OCI-Chunk-Min-Length", "")
            if minimum.isdigit():
                chunk_size = max(chunk_size, int(minimum))
            offset = 0
            while offset < size:
                n = min(chunk_size, size - offset)
                resp = self._request(
                    "PATCH", location, scopes=scopes, repo=repo, what=what, ok=(202,),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{offset}-{offset + n - 1}"},
                    body=lambda o=offset, n=n: _FileSlice(src_path, o, n))
                resp.close()
                location = self._location(resp, what)
                offset += n
            put_body = b""
        sep = "&" if urlsplit(location).query else "?"
        resp = self._request("PUT", f"{location}{sep}{urlencode({'digest': digest})}",
                             scopes=scopes, repo=repo, what=what, ok=(201, 204),
                             headers={"Content-Type": "application/octet-stream"},
                             body=put_body)
        resp.close()

    # -- internals: requests, auth, retries --

    @staticmethod
    def _pull(repo: str) -> list[str]:
        return [f"repository:{repo}:pull"]

    @staticmethod
    def _push(repo: str) -> list[str]:
        return [f"repository:{repo}:pull,push"]

    def _head(self, repo: str, digest: str, scopes: list[str]) -> Optional[int]:
        resp = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", scopes=scopes, repo=repo,
                             what=f"HEAD blob {digest}", ok=(200, 404))
        with resp:
            if resp.status_code == 404:
                return None
            length = resp.headers.get("Content-Length", "")
            return int(length) if length.isdigit() else 0

    def _retrying(self, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt`` until it does not raise :class:`_Transient`, at most
        ``1 + retries`` times, backing off in between."""
        n = 0
        while True:
            try:
                return attempt()
            except _Transient as e:
                if n >= self.retries:
                    raise RegistryError(f"{e} (gave up after {n + 1} attempts)") from None
                self._sleep(self._delay(n, e.retry_after))
                n += 1
            except _Unreachable as e:
                raise RegistryError(str(e)) from None  # callers see the public type

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None and 0 <= retry_after <= MAX_RETRY_AFTER:
            return retry_after
        base = min(self.backoff * (2 ** attempt), MAX_BACKOFF)
        return base * random.uniform(1.0, 1.25)  # jitter: many clients, one registry

    def _ensure_ready(self) -> None:
        """Pick the scheme and learn the auth challenge, once, by ``GET /v2/``."""
        if self._base is not None:
            return
        with self._lock:
            if self._base is not None:
                return
            schemes = ["https"] + ([] if self.tls_verify else ["http"])
            failures: list[str] = []
            for scheme in schemes:
                base = f"{scheme}://{self.api_host}"
                try:
                    resp = self._exchange("GET", base + "/v2/", {}, None, stream=False,
                                          what="GET /v2/")
                except _Unreachable as e:
                    failures.append(str(e))
                    continue
                with resp:
                    if resp.status_code == 401:
                        self._challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
                    elif not 200 <= resp.status_code < 300:
                        raise RegistryError(
                            f"{self.host} does not look like a registry: GET {base}/v2/ "
                            f"answered {resp.status_code} {resp.reason}")
                self._base = base
                return
            if len(failures) == 2 and failures[0] != failures[1]:
                raise _Unreachable(f"{failures[0]}; over plain HTTP: "
                                   f"{failures[1].split(': ', 1)[-1]}")
            raise _Unreachable(failures[-1])

    def _request(self, method: str, url: str, *, scopes: list[str], what: str,
                 repo: Optional[str] = None, headers: Optional[dict] = None,
                 body: Body = None, stream: bool = False, ok: Collection[int] = (200,),
                 missing: Optional[str] = None) -> requests.Response:
        """One registry request, authenticated; returns a response whose
        status is in ``ok`` or raises (:class:`_Transient` for what is worth
        retrying). ``url`` is an API path or an absolute URL (upload
        locations). ``missing`` names what a 404 means."""
        self._ensure_ready()
        assert self._base is not None
        full = url if "://" in url else self._base + url
        scopes = list(scopes)
        reauthenticated = False
        while True:
            hdrs = dict(headers or {})
            hdrs.update(self._auth_headers(scopes))
            resp = self._exchange(method, full, hdrs, body, stream=stream, what=what)
            status = resp.status_code
            if status in ok:
                return resp
            if status == 401 and not reauthenticated and self._learn(resp, scopes):
                resp.close()
                reauthenticated = True
                continue
            with resp:
                raise self._status_error(resp, method, what, repo, missing)

    def _exchange(self, method: str, url: str, headers: dict, body: Body, *,
                  stream: bool, what: str) -> requests.Response:
        """Send once. Transport failures and 429/5xx raise :class:`_Transient`
        (or :class:`_Unreachable`); any other answer is returned."""
        try:
            data = body() if callable(body) else body
        except OSError as e:  # the file being uploaded went away
            raise StorageError(f"cannot read {e.filename or 'the upload'}: "
                               f"{e.strerror or e}") from None
        try:
            resp = self._session.request(method, url, headers=headers, data=data,
                                         stream=stream, timeout=self.timeout,
                                         allow_redirects=True, proxies=self._proxies(url))
        except requests.RequestException as e:
            raise self._transport_error(e, url) from None
        finally:
            close = getattr(data, "close", None)
            if close is not None:
                close()
        if resp.status_code == 429 or resp.status_code >= 500:
            with resp:
                detail = _error_detail(self._error_body(resp))
                retry_after = resp.headers.get("Retry-After", "")
                raise _Transient(
                    f"{self._who(resp.url or url)} answered {resp.status_code} {resp.reason} "
                    f"to {what}" + (f": {detail}" if detail else ""),
                    float(retry_after) if re.fullmatch(r"\d+(\.\d+)?", retry_after) else None)
        return resp

    def _proxies(self, url: str) -> dict:
        host = urlsplit(url).hostname or ""
        if _is_loopback(host):
            return {}  # as Go's ProxyFromEnvironment: never proxy loopback
        return requests.utils.get_environ_proxies(url)

    def _who(self, url: str) -> str:
        """The server behind ``url``, for messages: the registry, or a token
        server or storage it sent us to."""
        netloc = urlsplit(url).netloc
        return (f"registry {self.host}" if netloc == self.api_host
                else f"{netloc} (for registry {self.host})")

    def _transport_error(self, e: requests.RequestException, url: str) -> RegistryError:
        who = self._who(url)
        reason = _reason_text(e)
        if isinstance(e, requests.exceptions.SSLError):
            if re.search(r"certificate verify failed|doesn't match|mismatch", str(e), re.I):
                return _Unreachable(f"cannot verify the TLS certificate of {who}: {reason}; "
                                    f"{TLS_HINT}")
            hint = ""
            if re.search(r"wrong version number|record layer failure|packet length too long",
                         str(e), re.I):
                hint = (" (it may serve plain HTTP: disable TLS verification, e.g. "
                        "--src-tls-verify=false/--dest-tls-verify=false, to allow that)")
            return _Unreachable(f"cannot reach {who}: TLS handshake failed: {reason}{hint}")
        if isinstance(e, requests.exceptions.Timeout):
            if isinstance(e, requests.exceptions.ConnectTimeout):
                return _Transient(f"cannot reach {who}: no connection within "
                                  f"{self.timeout:g} s")
            return _Transient(f"{who} did not answer within {self.timeout:g} s")
        if isinstance(e, requests.exceptions.ConnectionError):
            cause = e.args[0] if e.args else None
            inner = getattr(cause, "reason", cause)
            if isinstance(inner, urllib3.exceptions.NewConnectionError):
                return _Unreachable(f"cannot reach {who}: {reason}")
            return _Transient(f"connection to {who} broke: {reason}")
        if isinstance(e, (requests.exceptions.ChunkedEncodingError,
                          requests.exceptions.ContentDecodingError)):
            return _Transient(f"connection to {who} broke: {reason}")
        return RegistryError(f"request to {who} failed: {reason}")

    def _credentials(self) -> Optional[FoundCredentials]:
        with self._lock:
            if not self._creds_resolved:
                # Only now, when a registry asks: a credential helper may prompt
                # or be slow, and anonymous registries should never run one.
                self._found = find_credentials(self.host, auth_file=self._auth_file)
                self._creds_resolved = True
            return self._found

    def _auth_headers(self, scopes: list[str]) -> dict:
        ch = self._challenge
        if ch is None:
            return {}
        if ch.scheme == "basic":
            found = self._credentials()
            return {"Authorization": _basic(found.pair)} if found else {}
        if ch.scheme == "bearer" and ch.realm:
            return {"Authorization": f"Bearer {self._token(ch, scopes)}"}
        return {}

    def _learn(self, resp: requests.Response, scopes: list[str]) -> bool:
        """After a 401: adopt its challenge and say whether a retry can help."""
        ch = parse_challenge(resp.headers.get("WWW-Authenticate"))
        if ch is None:
            return False
        if ch.scheme == "basic":
            if self._challenge is not None and self._challenge.scheme == "basic":
                return False  # we sent what we have; it was refused
            self._challenge = ch
            return self._credentials() is not None
        if ch.scheme == "bearer":
            self._challenge = Challenge("bearer", {**ch.params, "scope": ""})
            for s in ch.scopes:
                if s not in scopes:
                    scopes.append(s)
            with self._token_lock:  # a cached token was refused (expired, or too narrow)
                self._tokens.pop(self._token_key(ch, scopes), None)
            return True
        return False

    @staticmethod
    def _token_key(ch: Challenge, scopes: list[str]) -> tuple:
        return (ch.realm, ch.service, tuple(sorted(set(scopes))))

    def _token(self, ch: Challenge, scopes: list[str]) -> str:
        key = self._token_key(ch, scopes)
        with self._token_lock:
            tok = self._tokens.get(key)
            if tok is not None and tok.expires > time.monotonic():
                return tok.value
            tok = self._fetch_token(ch, key[2])
            self._tokens[key] = tok
            return tok.value

    def _fetch_token(self, ch: Challenge, scopes: tuple) -> _Token:
        found = self._credentials()
        params: list[tuple[str, str]] = []
        if ch.service:
            params.append(("service", ch.service))
        params.extend(("scope", s) for s in scopes)
        headers = {}
        if found is not None:
            params.append(("account", found.username))
            headers["Authorization"] = _basic(found.pair)
        sep = "&" if urlsplit(ch.realm).query else "?"
        url = f"{ch.realm}{sep}{urlencode(params)}" if params else ch.realm
        if urlsplit(url).scheme not in ("http", "https"):
            raise RegistryError(f"registry {self.host} names an unusable token realm "
                                f"{ch.realm!r}")
        resp = self._exchange("GET", url, headers, None, stream=False,
                              what=f"token request for {' '.join(scopes) or 'access'}")
        with resp:
            if resp.status_code in (401, 403):
                raise self._auth_error(resp.status_code, _error_detail(resp.content),
                                       None, via=urlsplit(ch.realm).netloc)
            if resp.status_code != 200:
                raise RegistryError(f"token server {urlsplit(ch.realm).netloc} for registry "
                                    f"{self.host} answered {resp.status_code} {resp.reason}")
            try:
                doc = resp.json()
                value = doc.get("token") or doc.get("access_token")
                if not isinstance(value, str) or not value:
                    raise ValueError
            except (ValueError, AttributeError):
                raise RegistryError(f"token server {urlsplit(ch.realm).netloc} for registry "
                                    f"{self.host} sent no token") from None
            expires_in = doc.get("expires_in")
            if not isinstance(expires_in, (int, float)) or expires_in <= 0:
                expires_in = 60  # the default the token spec gives
            # Renew a little early, so a token does not expire in flight.
            return _Token(value, time.monotonic() + max(expires_in - 10, expires_in * 0.5))

    def _status_error(self, resp: requests.Response, method: str, what: str,
                      repo: Optional[str], missing: Optional[str]) -> EstargzError:
        status = resp.status_code
        detail = _error_detail(self._error_body(resp)) if method != "HEAD" else ""
        if status in (401, 403):
            return self._auth_error(status, detail, repo)
        if status == 404 and missing:
            where = f" (repository {repo})" if repo and repo not in missing else ""
            return NotFound(f"{missing} not found in registry {self.host}{where}")
        return RegistryError(f"registry {self.host} answered {status} {resp.reason} to {what}"
                             + (f": {detail}" if detail else ""))

    def _auth_error(self, status: int, detail: str, repo: Optional[str],
                    via: Optional[str] = None) -> AuthenticationError:
        found = self._found if self._creds_resolved else None
        target = f"repository {repo}" if repo else "access"
        answer = f"{status}" + (f" {detail}" if detail else "")
        who = f"registry {self.host}" + (f" (token server {via})" if via else "")
        hint = AUTH_HINT.format(host=self.host)
        if found is None:
            return AuthenticationError(f"{who} requires credentials for {target} ({answer}); "
                                       f"{hint}")
        if status == 401:
            return AuthenticationError(f"{who} refused the credentials {found.source} for "
                                       f"{target} ({answer}); check them, or {hint}")
        return AuthenticationError(f"{who} denied {target} to the credentials {found.source} "
                                   f"({answer}); they lack the permission")

    @staticmethod
    def _error_body(resp: requests.Response) -> bytes:
        out = bytearray()
        try:
            for piece in resp.iter_content(16 << 10):
                out += piece
                if len(out) >= _ERROR_BODY_LIMIT:
                    break
        except Exception:  # an error body is a nicety; never fail over it
            pass
        return bytes(out)

    def _location(self, resp: requests.Response, what: str) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"registry {self.host} gave no Location for {what}")
        return urljoin(resp.url, loc)

    def _resume_position(self, resp: requests.Response, got: int,
                         digest: str) -> tuple[int, Optional[int]]:
        """For a (resumed) download: bytes to skip, and where the body should end."""
        length = resp.headers.get("Content-Length", "")
        if resp.status_code == 206:
            rng = _parse_content_range(resp.headers.get("Content-Range"))
            if rng is None or rng[0] != got:
                raise RegistryError(f"registry {self.host} answered a request for blob "
                                    f"{digest} from byte {got} with Content-Range "
                                    f"{resp.headers.get('Content-Range')!r}")
            return 0, rng[1] + 1
        # A 200 is the whole blob again: skip what we already have.
        return got, int(length) if length.isdigit() else None

    def _iter_body(self, resp: requests.Response, what: str) -> Iterator[bytes]:
        it = resp.iter_content(_PIECE)
        while True:
            try:
                piece = next(it)
            except StopIteration:
                return
            except requests.RequestException as e:
                err = self._transport_error(e, resp.url)
                # Mid-body, even a TLS or connection error is a dropped stream.
                raise _Transient(str(err)) from None
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise _Transient(f"connection to registry {self.host} broke while reading "
                                 f"{what}: {_reason_text(e)}") from None
            if piece:
                yield piece

    def _read_body(self, resp: requests.Response, limit: int, what: str) -> bytes:
        out = bytearray()
        for piece in self._iter_body(resp, what):
            out += piece
            if len(out) >= limit:
                break
        return bytes(out)

    def _read_span(self, resp: requests.Response, skip: int, length: int, what: str) -> bytes:
        """Skip ``skip`` bytes of the body, then return up to ``length``; the
        rest of the body is not read (closing the response drops it)."""
        out = bytearray()
        consumed = 0
        for piece in self._iter_body(resp, what):
            consumed += len(piece)
            if skip:
                drop = min(skip, len(piece))
                piece, skip = piece[drop:], skip - drop
            out += piece
            if len(out) >= length:
                return bytes(out[:length])
        expected = resp.headers.get("Content-Length", "")
        if expected.isdigit() and consumed < int(expected):
            # The body ended before its Content-Length: a dropped connection.
            raise _Transient(f"registry {self.host} closed the connection early while "
                             f"sending {what}")
        return bytes(out)

    def _blob_mismatch(self, repo: str, digest: str, why: str) -> DigestMismatch:
        return DigestMismatch(f"blob {digest} from registry {self.host} (repository {repo}) "
                              f"{why}")


def _basic(creds: Credentials) -> str:
    raw = f"{creds[0]}:{creds[1]}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _write(dst: BinaryIO, data: bytes, digest: str) -> None:
    try:
        dst.write(data)
    except OSError as e:
        raise StorageError(f"cannot write blob {digest}: {e.strerror or e}") from None


class RegistryBlobSource:
    """A registry blob as a :class:`~estargz.source.RangeSource`: every
    ``read_at`` is one HTTP range request."""

    def __init__(self, client: RegistryClient, repo: str, digest: str, size: int) -> None:
        self.client = client
        self.repo = repo
        self.digest = digest
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        _check_range(self._size, offset, length)
        return self.client.read_blob_range(self.repo, self.digest, offset, length)

    def __repr__(self) -> str:
        return f"RegistryBlobSource({self.client.host}/{self.repo}@{self.digest})"
