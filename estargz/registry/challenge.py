"""Registry authentication: the ``WWW-Authenticate`` challenge, and an
:class:`Authenticator` that answers it -- anonymous, ``Basic``, or the
``Bearer`` token flow (a token per set of scopes, fetched from the realm the
registry names and cached until it expires). Credentials come from the
caller or, only when a registry asks for them, from
:func:`~estargz.registry.credentials.find_credentials`.

A token realm is used over HTTPS, or over plain HTTP only on the registry's
own host name when the registry itself is plain HTTP (which only a user
turning TLS verification off allows): :func:`realm_refusal`. Any other
realm is refused before a credential is looked up or a request is sent.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import requests

from .._exceptions import AuthenticationError, InvalidInput, RegistryError
from ..layer.jsondoc import load_json_object
from .credentials import Credentials, FoundCredentials, find_credentials
from .deadline import Deadline
from .errors import AUTH_HINT, error_detail

#: A cached token's key: realm, service and the sorted scopes.
TokenKey = tuple[str, str, tuple[str, ...]]
#: Sends one request: ``(method, url, headers, body, *, stream, what, deadline)``.
Send = Callable[..., requests.Response]


def realm_refusal(realm: str, registry_url: str | None) -> str | None:
    """Why the token realm ``realm`` must not be used by the registry at
    ``registry_url`` (``SCHEME://HOST[:PORT]``), or ``None`` if it may.

    HTTPS anywhere is fine (Docker Hub's realm is on another host). Plain
    HTTP only on the registry's own host name, any port, and only when the
    registry is plain HTTP too: the user chose to send to that machine in
    clear, and another port there crosses the same network; another host
    (compared by name, not resolved) would receive the credentials in clear.
    """
    r = urlsplit(realm)
    if r.scheme == "https":
        return None
    if r.scheme != "http" or not r.hostname:
        return "it is not an http(s) URL"
    g = urlsplit(registry_url or "")
    if g.scheme != "http":
        return "it is plain HTTP while the registry is served over HTTPS"
    if r.hostname != g.hostname:
        return (f"it is plain HTTP on another host than the registry's ({g.hostname}), "
                f"which would receive the credentials in clear")
    return None


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: scheme (lower case) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict, hash=False)

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


def parse_challenge(header: str | None) -> Challenge | None:
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
class Token:
    value: str
    expires: float  # time.monotonic()


class Authenticator:
    """The authentication state of one registry host, shared by threads:
    the challenge it answered ``GET /v2/`` with, the credentials (looked up
    once, on first need) and the cached tokens. ``send`` makes the token
    requests."""

    def __init__(self, host: str, send: Send, *, credentials: Credentials | None = None,
                 auth_file: str | None = None) -> None:
        self.host = host
        self._send = send
        self._auth_file = auth_file
        self._found: FoundCredentials | None = (
            FoundCredentials(credentials[0], credentials[1], "given explicitly")
            if credentials is not None else None)
        self._creds_resolved = credentials is not None
        #: What the registry asked for; ``None`` until known, or if nothing.
        self.challenge: Challenge | None = None
        #: ``SCHEME://HOST[:PORT]`` the registry answers on, once known.
        self.registry_url: str | None = None
        self._tokens: dict[TokenKey, Token] = {}
        self._creds_lock = threading.Lock()
        self._token_lock = threading.Lock()

    def credentials(self) -> FoundCredentials | None:
        """The credentials for this host, looked up on the first call."""
        with self._creds_lock:
            if not self._creds_resolved:
                # Only now, when a registry asks: a credential helper may prompt
                # or be slow, and anonymous registries should never run one.
                self._found = find_credentials(self.host, auth_file=self._auth_file)
                self._creds_resolved = True
            return self._found

    def headers(self, scopes: list[str], deadline: Deadline) -> dict[str, str]:
        """The ``Authorization`` header answering the challenge for ``scopes``
        (a token is fetched within the operation's ``deadline``)."""
        ch = self.challenge
        if ch is None:
            return {}
        if ch.scheme == "basic":
            found = self.credentials()
            return {"Authorization": _basic(found.pair)} if found else {}
        if ch.scheme == "bearer" and ch.realm:
            return {"Authorization": f"Bearer {self._token(ch, scopes, deadline)}"}
        return {}

    def learn(self, resp: requests.Response, scopes: list[str]) -> bool:
        """After a 401: adopt its challenge and say whether a retry can help."""
        ch = parse_challenge(resp.headers.get("WWW-Authenticate"))
        if ch is None:
            return False
        if ch.scheme == "basic":
            if self.challenge is not None and self.challenge.scheme == "basic":
                return False  # we sent what we have; it was refused
            self.challenge = ch
            return self.credentials() is not None
        if ch.scheme == "bearer":
            self.challenge = Challenge("bearer", {**ch.params, "scope": ""})
            for s in ch.scopes:
                if s not in scopes:
                    scopes.append(s)
            with self._token_lock:  # a cached token was refused (expired, or too narrow)
                self._tokens.pop(self._token_key(ch, scopes), None)
            return True
        return False

    @staticmethod
    def _token_key(ch: Challenge, scopes: list[str]) -> TokenKey:
        return (ch.realm, ch.service, tuple(sorted(set(scopes))))

    def _token(self, ch: Challenge, scopes: list[str], deadline: Deadline) -> str:
        key = self._token_key(ch, scopes)
        with self._token_lock:
            tok = self._tokens.get(key)
            if tok is not None and tok.expires > time.monotonic():
                return tok.value
            tok = self._fetch_token(ch, key[2], deadline)
            self._tokens[key] = tok
            return tok.value

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...], deadline: Deadline) -> Token:
        # Before credentials are even looked up: a refused realm gets nothing.
        refusal = realm_refusal(ch.realm, self.registry_url)
        if refusal is not None:
            raise RegistryError(f"registry {self.host} names the token realm {ch.realm!r}: "
                                f"{refusal}; refused, no request sent")
        found = self.credentials()
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
        resp = self._send("GET", url, headers, None, stream=False,
                          what=f"token request for {' '.join(scopes) or 'access'}",
                          deadline=deadline)
        with resp:
            if resp.status_code in (401, 403):
                raise self.error(resp.status_code, error_detail(resp.content),
                                       None, via=urlsplit(ch.realm).netloc)
            if resp.status_code != 200:
                raise RegistryError(f"token server {urlsplit(ch.realm).netloc} for registry "
                                    f"{self.host} answered {resp.status_code} {resp.reason}")
            try:
                doc = load_json_object(resp.content, "token response")
                value = doc.get("token") or doc.get("access_token")
                if not isinstance(value, str) or not value:
                    raise ValueError
            except (InvalidInput, ValueError):
                raise RegistryError(f"token server {urlsplit(ch.realm).netloc} for registry "
                                    f"{self.host} sent no token") from None
            expires_in = doc.get("expires_in")
            if not isinstance(expires_in, (int, float)) or expires_in <= 0:
                expires_in = 60  # the default the token spec gives
            # Renew a little early, so a token does not expire in flight.
            return Token(value, time.monotonic() + max(expires_in - 10, expires_in * 0.5))

    def error(self, status: int, detail: str, repo: str | None,
              via: str | None = None) -> AuthenticationError:
        """A refusal (401/403) as one line: what was asked, and how to fix it."""
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


def _basic(creds: Credentials) -> str:
    raw = f"{creds[0]}:{creds[1]}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")
