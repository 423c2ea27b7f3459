"""Registry credentials: found where docker, podman and skopeo keep them.

:func:`resolve_credentials` answers "which user and password for this
registry host?" by looking, in order, at:

1. credentials given explicitly (``--src-creds USER:PASS``, see :func:`parse_creds`);
2. the auth file named by the ``auth_file`` argument, else by ``REGISTRY_AUTH_FILE``;
3. containers' ``${XDG_RUNTIME_DIR}/containers/auth.json`` (podman/skopeo login);
4. containers' ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``;
5. Docker's ``${DOCKER_CONFIG:-~/.docker}/config.json`` (docker login).

The first source that knows the host wins; a file that does not mention it
passes the question on, as containers/image does. Within one file,
``credHelpers[host]`` comes first, then ``credsStore``, then ``auths[host]``
(a base64 ``"auth"`` of ``USER:PASS``, or ``"username"``/``"password"``).
Helpers are the ``docker-credential-NAME get`` programs of Docker's
credential-helper protocol.

Secrets never appear in a message, an exception or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import AuthenticationError, InvalidInput, StorageError
from ..layer.inputfile import open_input
from ..layer.jsondoc import MAX_JSON_SIZE, load_json_object

Credentials = tuple[str, str]

#: The key docker login (and credential helpers) use for Docker Hub.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
#: The key podman/skopeo login use for Docker Hub in auth.json.
DOCKER_HUB_CONTAINERS_KEY = "docker.io"
_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io",
                        "registry.hub.docker.com"})

#: A credential helper that hangs must not hang us.
HELPER_TIMEOUT = 60.0


@dataclass(frozen=True)
class FoundCredentials:
    """Credentials and where they came from (for error messages)."""

    username: str
    password: str = field(repr=False)
    #: Where they came from, worded to follow "the credentials": ``given
    #: explicitly``, ``from /root/.docker/config.json (credsStore 'pass')``.
    source: str

    @property
    def pair(self) -> Credentials:
        return (self.username, self.password)


def parse_creds(text: str, option: str = "credentials") -> Credentials:
    """Split ``USER:PASS`` (the password may itself contain ``:``).

    ``option`` names the flag in the error message, e.g. ``--src-creds``.
    The message never repeats ``text``: it holds a password.
    """
    user, sep, password = text.partition(":")
    if not sep:
        raise InvalidInput(f"{option} must be USER:PASS (no ':' found)")
    if not user:
        raise InvalidInput(f"{option} must be USER:PASS (the user name is empty)")
    return (user, password)


def resolve_credentials(host: str, *, explicit: Credentials | None = None,
                        auth_file: str | None = None) -> Credentials | None:
    """Credentials for registry ``host`` (``HOST[:PORT]``), or ``None`` for
    anonymous access. See the module docstring for the search order.

    Raises :class:`InvalidInput` for a malformed (or a missing explicitly
    named) auth file, naming it, and :class:`AuthenticationError` when a
    configured credential helper is missing or fails.
    """
    found = find_credentials(host, explicit=explicit, auth_file=auth_file)
    return found.pair if found else None


def find_credentials(host: str, *, explicit: Credentials | None = None,
                     auth_file: str | None = None) -> FoundCredentials | None:
    """Like :func:`resolve_credentials`, but also says where they came from."""
    if explicit is not None:
        return FoundCredentials(explicit[0], explicit[1], "given explicitly")
    for path, must_exist in _auth_file_paths(auth_file):
        config = _load_config(path, must_exist)
        if config is None:
            continue
        found = _lookup(config, path, host)
        if found is not None:
            return found
    return None


def _auth_file_paths(auth_file: str | None) -> list[tuple[str, bool]]:
    """Candidate files, best first, each with "must it exist?"."""
    paths: list[tuple[str, bool]] = []
    named = auth_file or os.environ.get("REGISTRY_AUTH_FILE")
    if named:
        # skopeo refuses an --authfile (or REGISTRY_AUTH_FILE) it cannot read;
        # silently going anonymous would hide a typo.
        paths.append((named, True))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        paths.append((os.path.join(runtime, "containers", "auth.json"), False))
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config")
    paths.append((os.path.join(config_home, "containers", "auth.json"), False))
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".docker")
    paths.append((os.path.join(docker_dir, "config.json"), False))
    seen: set[str] = set()
    unique = []
    for p, must in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append((p, must))
    return unique


def _load_config(path: str, must_exist: bool) -> dict[str, Any] | None:
    if not os.path.lexists(path):
        if must_exist:
            raise InvalidInput(f"auth file {path} does not exist")
        return None
    try:
        # Refuses devices and directories; never reads more than a JSON
        # document may hold (``--authfile /dev/zero`` would never end).
        with open_input(path, "auth file") as f:
            raw = f.read(MAX_JSON_SIZE + 1)
    except StorageError as e:
        raise InvalidInput(f"cannot read auth file {path}: {e}") from None
    except OSError as e:
        raise InvalidInput(f"cannot read auth file {path}: {e.strerror}") from None
    if not raw.strip():
        return {}  # an empty file is what some tools leave after logout
    config = load_json_object(raw, f"auth file {path}")
    for key in ("auths", "credHelpers"):
        if not isinstance(config.get(key, {}), dict):
            raise InvalidInput(f"auth file {path}: {key!r} is not a JSON object")
    if not isinstance(config.get("credsStore", ""), str):
        raise InvalidInput(f"auth file {path}: 'credsStore' is not a string")
    return config


def _is_hub(host: str) -> bool:
    return host in _HUB_HOSTS


def _key_host(key: str) -> str:
    """The registry host a config key means.

    ``https://index.docker.io/v1/`` and ``http://myreg:5000`` (Docker's
    older spellings) mean their host; a bare ``host/ns/repo`` key of
    containers' auth.json is scoped to a namespace and is kept whole, so it
    does not match the host alone.
    """
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            return key[len(scheme):].split("/", 1)[0]
    return key


def _lookup(config: dict[str, Any], path: str, host: str) -> FoundCredentials | None:
    hub = _is_hub(host)
    server_url = DOCKER_HUB_AUTH_KEY if hub else host

    helpers: dict[str, Any] = config.get("credHelpers") or {}
    helper = _pick(helpers, host)
    if helper is not None:
        if not isinstance(helper, str) or not helper:
            raise InvalidInput(f"auth file {path}: credHelpers entry for {host} "
                               "is not a helper name")
        found = _run_helper(helper, server_url, host,
                            f"from {path} (credHelpers {helper!r})")
        if found is not None:
            return found

    store = config.get("credsStore")
    if store:
        found = _run_helper(store, server_url, host, f"from {path} (credsStore {store!r})")
        if found is not None:
            return found

    entry = _pick(config.get("auths") or {}, host)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise InvalidInput(f"auth file {path}: auths entry for {host} is not an object")
    return _decode_entry(entry, path, host)


def _pick(table: dict[str, Any], host: str) -> Any:
    """The value for ``host`` in a table keyed by registry: an exact key
    first, then any key that normalises to the same host."""
    hub = _is_hub(host)
    exact = [host] + ([DOCKER_HUB_AUTH_KEY, DOCKER_HUB_CONTAINERS_KEY] if hub else [])
    for k in exact:
        if k in table:
            return table[k]
    for k, v in table.items():
        kh = _key_host(k)
        if kh == host or (hub and _is_hub(kh)):
            return v
    return None


def _decode_entry(entry: dict[str, Any], path: str, host: str) -> FoundCredentials | None:
    where = f"auth file {path}: auths entry for {host}"
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise InvalidInput(f"{where}: 'auth' is not a string")
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise InvalidInput(f"{where}: 'auth' is not base64 of USER:PASS") from None
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            raise InvalidInput(f"{where}: 'auth' does not decode to USER:PASS")
        return FoundCredentials(user, password, f"from {path}")
    name, secret = entry.get("username"), entry.get("password")
    if name or secret:
        if not isinstance(name, str) or not name or not isinstance(secret, str):
            raise InvalidInput(f"{where}: needs both 'username' and 'password' strings")
        return FoundCredentials(name, secret, f"from {path}")
    # An empty entry is what docker login leaves when a credsStore holds the
    # secret; an "identitytoken" needs an OAuth2 exchange we do not do yet.
    return None


def _run_helper(name: str, server_url: str, host: str,
                source: str) -> FoundCredentials | None:
    """Run ``docker-credential-NAME get`` with ``server_url`` on stdin."""
    program = f"docker-credential-{name}"
    exe = shutil.which(program)
    if exe is None:
        where = source.replace("from ", "in ", 1)
        raise AuthenticationError(f"credential helper {program} (named {where}) is not "
                                  "on PATH; install it or remove it from that file")
    try:
        proc = subprocess.run([exe, "get"], input=server_url.encode(),
                              capture_output=True, timeout=HELPER_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AuthenticationError(f"credential helper {program} did not answer within "
                                  f"{HELPER_TIMEOUT:.0f} s for {host}") from None
    except OSError as e:
        raise AuthenticationError(f"cannot run credential helper {program}: "
                                  f"{e.strerror}") from None
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        # The helpers' protocol (docker/docker-credential-helpers) reports a
        # missing entry as exit 1 with this text; that is "no credentials".
        if "credentials not found" in said.lower():
            return None
        first = said.splitlines()[0][:200] if said else f"exit status {proc.returncode}"
        raise AuthenticationError(f"credential helper {program} failed for {host}: {first}")
    try:
        reply = load_json_object(proc.stdout, "credential helper output")
        user, secret = reply["Username"], reply["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (InvalidInput, KeyError, TypeError):
        raise AuthenticationError(f"credential helper {program} returned malformed "
                                  f"output for {host} (expected JSON with "
                                  "Username and Secret)") from None
    if user == "<token>":
        # An identity token is an OAuth2 refresh token, not a password.
        raise AuthenticationError(
            f"credential helper {program} holds an identity token for {host}, which "
            "estargz cannot use; give USER:PASS credentials instead")
    if not user and not secret:
        return None
    return FoundCredentials(user, secret, source)
