"""HTTP for one registry host: the session (TLS from :mod:`.tls`, no
``~/.netrc`` or proxy guessing), the scheme chosen once by ``GET /v2/``,
authenticated requests (:mod:`.challenge`), bounded retries with back-off
within a deadline (:mod:`.deadline`), and reading bodies.
:class:`~.client.RegistryClient` adds the API.

Where credentials may go: the ``Authorization`` header is sent only to the
registry's own origin (scheme, host and port it answered ``GET /v2/`` on),
never to an upload location or a redirect elsewhere; nothing goes from an
HTTPS registry to a plain-HTTP URL (redirects, upload locations, token
realms are refused); a token realm is checked in :mod:`.challenge`.
"""

from __future__ import annotations

import ipaddress
import math
import random
import re
import threading
import warnings
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
import urllib3

from .._cancel import sleep_or_cancel
from .._exceptions import EstargzError, InvalidInput, NotFound, RegistryError, StorageError
from .._version import __version__
from ..image.reference import DOCKER_HUB, DOCKER_HUB_API
from .challenge import Authenticator, parse_challenge
from .credentials import Credentials
from .deadline import Deadline, WatchedAdapter
from .errors import (
    TLS_HINT,
    Transient,
    Unreachable,
    error_codes,
    error_detail,
    reason_text,
)
from .tls import ContextAdapter, ssl_context

#: Deadline of one small request (``GET /v2/``, a token, a manifest, a HEAD,
#: an upload session call), its retries and back-off included, in seconds.
#: Long enough for a few read-timeout retries, short enough that a stuck
#: registry fails a pipeline step in minutes, not hours.
DEFAULT_TIMEOUT = 120.0
#: Longest wait for a connection or for the next bytes of an answer, in
#: seconds. An attempt that waits longer is retried (within the deadline).
DEFAULT_READ_TIMEOUT = 30.0
#: Slowest average rate, in bytes per second, a blob transfer may run at:
#: it gets ``timeout + size / min_rate`` seconds. A fixed deadline cannot fit
#: both a 1 KiB config and a 5 GiB layer; scaled this way a layer of 1 GiB
#: may take up to 9 hours (256 kbit/s, with several layers sharing a link),
#: and a trickling server is still cut off in bounded time.
DEFAULT_MIN_RATE = 32 << 10
#: Largest accepted ``timeout``/``read_timeout`` (about 11.5 days).
MAX_TIMEOUT = 1e6

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

_T = TypeVar("_T")
Body = Any | None  # bytes, or a zero-argument callable returning a fresh readable


def parse_content_range(value: str | None) -> tuple[int, int] | None:
    """``bytes START-END/TOTAL`` -> ``(START, END)`` (inclusive)."""
    if not value:
        return None
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RegistryHTTP:
    """Requests to one registry host (``HOST[:PORT]``), safe to share
    between threads; see :class:`~.client.RegistryClient` for the options."""

    def __init__(self, host: str, *, tls_verify: bool = True, cert_dir: str | None = None,
                 credentials: Credentials | None = None, auth_file: str | None = None,
                 retries: int = 5, timeout: float = DEFAULT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 min_rate: float = DEFAULT_MIN_RATE, backoff: float = 0.25) -> None:
        if not host or "/" in host or host.strip() != host:
            raise InvalidInput(f"invalid registry host {host!r} (expected HOST[:PORT])")
        self.host = host
        #: Where the API is served: Docker Hub's lives on another name.
        self.api_host = DOCKER_HUB_API if host == DOCKER_HUB else host
        self.tls_verify = tls_verify
        self.retries = max(0, retries)
        self.timeout = _positive("timeout", timeout, MAX_TIMEOUT)
        self.read_timeout = _positive("read timeout", read_timeout, MAX_TIMEOUT)
        self.min_rate = _positive("minimum transfer rate", min_rate, math.inf)
        self.backoff = backoff
        self._auth = Authenticator(host, self._exchange, credentials=credentials,
                                   auth_file=auth_file)
        self._base: str | None = None
        self._lock = threading.Lock()
        #: Replaceable in tests, to observe back-off without waiting. Ctrl-C
        #: ends a back-off at once (a Retry-After may ask for a minute).
        self._sleep: Callable[[float], None] = sleep_or_cancel

        context = ssl_context(self.api_host, tls_verify, cert_dir)
        if not tls_verify:
            # The user asked for unverified TLS; urllib3 would warn on every request.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self._session = _Session()
        # No ~/.netrc credentials, REQUESTS_CA_BUNDLE or proxy guessing behind
        # our back: proxies are applied explicitly in _proxies().
        self._session.trust_env = False
        self._session.headers["User-Agent"] = f"estargz/{__version__}"
        self._session.mount("https://", ContextAdapter(context, pool_maxsize=16))
        self._session.mount("http://", WatchedAdapter(pool_maxsize=16))

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def __enter__(self) -> RegistryHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def scheme(self) -> str | None:
        """``https`` or ``http`` once the registry has been reached, else ``None``."""
        return self._base.split(":", 1)[0] if self._base else None

    def _deadline(self, what: str, size: int = 0) -> Deadline:
        """The deadline of one operation moving about ``size`` body bytes:
        ``timeout``, plus ``size / min_rate`` for a transfer."""
        return Deadline(self.timeout + size / self.min_rate, f"registry {self.host}", what)

    def _retrying(self, attempt: Callable[[], _T], deadline: Deadline) -> _T:
        """Run ``attempt`` until it does not raise :class:`Transient`, at most
        ``1 + retries`` times, backing off in between, and only while
        ``deadline`` leaves time: the deadline bounds all the attempts
        together, and one that expired is never retried."""
        n = 0
        while True:
            try:
                return attempt()
            except Transient as e:
                self._retry_or_raise(e, n, deadline)
                n += 1
            except Unreachable as e:
                raise RegistryError(str(e)) from None  # callers see the public type

    def _retry_or_raise(self, e: Transient, n: int, deadline: Deadline,
                        message: str | None = None) -> None:
        """After attempt ``n`` (from 0) failed with ``e``: back off, or raise
        if the retries or the deadline are used up."""
        deadline.check()  # the watchdog cut the connection, or the run is cancelled
        if n >= self.retries:
            raise RegistryError(message or f"{e} (gave up after {n + 1} attempts)") from None
        delay = self._delay(n, e.retry_after)
        if delay >= deadline.remaining():
            raise RegistryError(
                f"{message or e} (gave up after {n + 1} attempts: {deadline.label} "
                f"leaves no time for another)") from None
        self._sleep(delay)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and 0 <= retry_after <= MAX_RETRY_AFTER:
            return retry_after
        base = min(self.backoff * (2 ** attempt), MAX_BACKOFF)
        return float(base * random.uniform(1.0, 1.25))  # jitter: many clients, one registry

    def _ensure_ready(self, deadline: Deadline) -> None:
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
                                          what="GET /v2/", deadline=deadline)
                except Unreachable as e:
                    failures.append(str(e))
                    continue
                with resp:
                    if resp.status_code == 401:
                        self._auth.challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
                    elif not 200 <= resp.status_code < 300:
                        raise RegistryError(
                            f"{self.host} does not look like a registry: GET {base}/v2/ "
                            f"answered {resp.status_code} {resp.reason}")
                self._base = self._auth.registry_url = base
                return
            if len(failures) == 2 and failures[0] != failures[1]:
                raise Unreachable(f"{failures[0]}; over plain HTTP: "
                                   f"{failures[1].split(': ', 1)[-1]}")
            raise Unreachable(failures[-1])

    def _request(self, method: str, url: str, *, scopes: list[str], what: str,
                 deadline: Deadline, repo: str | None = None,
                 headers: dict[str, str] | None = None, body: Body = None,
                 stream: bool = False, ok: Collection[int] = (200,),
                 missing: str | None = None,
                 transient_codes: frozenset[str] = frozenset()) -> requests.Response:
        """One registry request, authenticated; returns a response whose
        status is in ``ok`` or raises (:class:`Transient` for what is worth
        retrying). ``url`` is an API path or an absolute URL (upload
        locations). ``missing`` names what a 404 means. An answer whose
        error body holds every code of ``transient_codes`` (when given) is
        :class:`Transient` too: a registry's passing state, not a refusal."""
        self._ensure_ready(deadline)
        assert self._base is not None
        full = url if "://" in url else self._base + url
        # Credentials and tokens go to the registry's own origin only, not
        # to an upload location the registry names elsewhere.
        own = _origin(full) == _origin(self._base)
        scopes = list(scopes)
        reauthenticated = False
        while True:
            hdrs = dict(headers or {})
            if own:
                hdrs.update(self._auth.headers(scopes, deadline))
            resp = self._exchange(method, full, hdrs, body, stream=stream, what=what,
                                  deadline=deadline)
            status = resp.status_code
            if status in ok:
                return resp
            if (status == 401 and own and not reauthenticated
                    and self._auth.learn(resp, scopes)):
                resp.close()
                reauthenticated = True
                continue
            with resp:
                raise self._status_error(resp, method, what, repo, missing, transient_codes)

    def _exchange(self, method: str, url: str, headers: dict[str, str], body: Body, *,
                  stream: bool, what: str, deadline: Deadline) -> requests.Response:
        """Send once, within ``deadline``. Transport failures and 429/5xx
        raise :class:`Transient` (or :class:`Unreachable`); a passed deadline
        :class:`DeadlineExceeded`; any other answer is returned."""
        who = self._who(url)
        if self.scheme == "https" and urlsplit(url).scheme != "https":
            raise RegistryError(f"registry {self.host} is served over HTTPS but sent {what} "
                                f"to plain-HTTP {who}; refused, so that nothing (credentials, "
                                f"tokens, data) leaves unencrypted")
        deadline.note(who, what)
        deadline.check()
        # Each wait is also bounded by what is left, so the last one cannot
        # outlast the deadline even where the watchdog cannot reach.
        wait = max(min(self.read_timeout, deadline.remaining()), 0.001)
        try:
            data = body() if callable(body) else body
        except OSError as e:  # the file being uploaded went away
            raise StorageError(f"cannot read {e.filename or 'the upload'}: "
                               f"{e.strerror or e}") from None
        try:
            with deadline.active():
                resp = self._session.request(method, url, headers=headers, data=data,
                                             stream=stream, timeout=(wait, wait),
                                             allow_redirects=True, proxies=self._proxies(url))
        except _Downgrade as e:
            raise RegistryError(f"{who} redirected {what} from HTTPS to plain-HTTP "
                                f"{urlsplit(e.target).netloc}; refused, so that nothing "
                                f"(credentials, tokens, data) leaves unencrypted") from None
        except requests.RequestException as e:
            if deadline.expired:
                raise deadline.error() from None
            raise self._transport_error(e, url) from None
        finally:
            close = getattr(data, "close", None)
            if close is not None:
                close()
        if resp.status_code == 429 or resp.status_code >= 500:
            with resp:
                detail = error_detail(self._error_body(resp))
                retry_after = resp.headers.get("Retry-After", "")
                raise Transient(
                    f"{self._who(resp.url or url)} answered {resp.status_code} {resp.reason} "
                    f"to {what}" + (f": {detail}" if detail else ""),
                    float(retry_after) if re.fullmatch(r"\d+(\.\d+)?", retry_after) else None)
        return resp

    def _proxies(self, url: str) -> dict[str, str]:
        host = urlsplit(url).hostname or ""
        if is_loopback(host):
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
        reason = reason_text(e)
        if isinstance(e, requests.exceptions.SSLError):
            if re.search(r"certificate verify failed|doesn't match|mismatch", str(e), re.I):
                return Unreachable(f"cannot verify the TLS certificate of {who}: {reason}; "
                                    f"{TLS_HINT}")
            hint = ""
            if re.search(r"wrong version number|record layer failure|packet length too long",
                         str(e), re.I):
                hint = (" (it may serve plain HTTP: disable TLS verification, e.g. "
                        "--src-tls-verify=false/--dest-tls-verify=false, to allow that)")
            return Unreachable(f"cannot reach {who}: TLS handshake failed: {reason}{hint}")
        if isinstance(e, requests.exceptions.Timeout):
            if isinstance(e, requests.exceptions.ConnectTimeout):
                return Transient(f"cannot reach {who}: no connection within "
                                  f"{self.read_timeout:g} s")
            return Transient(f"{who} sent nothing for {self.read_timeout:g} s")
        if isinstance(e, requests.exceptions.ConnectionError):
            cause = e.args[0] if e.args else None
            inner = getattr(cause, "reason", cause)
            if isinstance(inner, urllib3.exceptions.NewConnectionError):
                return Unreachable(f"cannot reach {who}: {reason}")
            return Transient(f"connection to {who} broke: {reason}")
        if isinstance(e, (requests.exceptions.ChunkedEncodingError,
                          requests.exceptions.ContentDecodingError)):
            return Transient(f"connection to {who} broke: {reason}")
        return RegistryError(f"request to {who} failed: {reason}")

    def _status_error(self, resp: requests.Response, method: str, what: str,
                      repo: str | None, missing: str | None,
                      transient_codes: frozenset[str] = frozenset()) -> EstargzError:
        status = resp.status_code
        body = self._error_body(resp) if method != "HEAD" else b""
        detail = error_detail(body)
        if transient_codes and transient_codes <= error_codes(body):
            return Transient(f"registry {self.host} answered {status} {resp.reason} to {what}: "
                             f"{detail}")
        if status in (401, 403):
            return self._auth.error(status, detail, repo)
        if status == 404 and missing:
            where = f" (repository {repo})" if repo and repo not in missing else ""
            return NotFound(f"{missing} not found in registry {self.host}{where}")
        return RegistryError(f"registry {self.host} answered {status} {resp.reason} to {what}"
                             + (f": {detail}" if detail else ""))

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

    def _iter_body(self, resp: requests.Response, what: str,
                   deadline: Deadline) -> Iterator[bytes]:
        """The body in pieces, counted against ``deadline`` and checked
        against it after each one."""
        it = resp.iter_content(_PIECE)
        while True:
            try:
                piece = next(it)
            except StopIteration:
                # A body the watchdog cut can end like a whole one.
                deadline.check()
                return
            except requests.RequestException as e:
                deadline.check()
                err = self._transport_error(e, resp.url)
                # Mid-body, even a TLS or connection error is a dropped stream.
                raise Transient(str(err)) from None
            except (urllib3.exceptions.HTTPError, OSError) as e:
                deadline.check()
                raise Transient(f"connection to registry {self.host} broke while reading "
                                 f"{what}: {reason_text(e)}") from None
            if piece:
                deadline.received += len(piece)
                deadline.check()
                yield piece

    def _read_body(self, resp: requests.Response, limit: int, what: str,
                   deadline: Deadline) -> bytes:
        out = bytearray()
        for piece in self._iter_body(resp, what, deadline):
            out += piece
            if len(out) >= limit:
                break
        return bytes(out)

    def _read_span(self, resp: requests.Response, skip: int, length: int, what: str,
                   deadline: Deadline) -> bytes:
        """Skip ``skip`` bytes of the body, then return up to ``length``; the
        rest of the body is not read (closing the response drops it)."""
        out = bytearray()
        consumed = 0
        for piece in self._iter_body(resp, what, deadline):
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
            raise Transient(f"registry {self.host} closed the connection early while "
                             f"sending {what}")
        return bytes(out)


def _positive(name: str, value: float, limit: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= limit):
        raise InvalidInput(f"{name} must be a positive number"
                           + (f" up to {limit:g}" if math.isfinite(limit) else "")
                           + f", not {value!r}")
    return float(value)


def _origin(url: str) -> tuple[str, str]:
    """``(scheme, host:port)`` of ``url``, the port made explicit."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number: no origin of ours
        return parts.scheme, parts.netloc
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


class _Downgrade(Exception):
    """A redirect from HTTPS to plain HTTP (raised inside requests)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


class _Session(requests.Session):
    """A session that refuses to follow a redirect from HTTPS to plain HTTP.

    requests follows it, and drops ``Authorization`` on the way only when
    the host, port or scheme changes; the request itself, its URL's tokens
    and the answer would still travel unencrypted. Redirects from HTTPS to
    HTTPS (a registry sending a blob GET to its storage) are followed, and
    requests drops ``Authorization`` when they change host or port.
    """

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None and urlsplit(resp.url).scheme == "https":
            absolute = urljoin(resp.url, target)
            if urlsplit(absolute).scheme != "https":
                resp.close()
                raise _Downgrade(absolute)
        return target
