"""Real daemons for tests: Debian's ``docker-registry`` and helpers around it.

Fixtures (import them into a test module, or register them for every
module with ``from services import *  # noqa`` in conftest.py):

* ``registry``: the distribution registry over plain HTTP, anonymous.
* ``tls_registry``: the same over HTTPS with a CA made here, and htpasswd
  Basic auth (``.ca_dir`` holds ``ca.crt``; ``.user``/``.password``).
* ``mtls_registry``: HTTPS that demands a client certificate (``.ca_dir``
  holds ``ca.crt``, ``client.cert`` and ``client.key``).
* ``token_registry``: the registry in ``auth: token`` mode, with a small
  token server in this process that signs JWTs the registry verifies
  (``.token_server`` records every token request).
* ``tampering_proxy``: a :class:`FaultProxy` in front of ``registry`` that
  corrupts, delays, cuts or refuses chosen requests, and logs them all.
* ``referrers_registry``: go-containerregistry's registry (``pkg/registry``,
  built by ``scripts/build-go.sh referrers-registry``) over plain HTTP,
  anonymous, with the OCI 1.1 referrers API that Debian's registry lacks;
  its ``.log`` has a line for every request.

Everything binds 127.0.0.1 only, lives in pytest's temporary directories,
and is stopped at the end of its scope. Needs ``docker-registry`` (apt), the
``cryptography`` package, and for htpasswd one of: the ``bcrypt`` package,
Python's ``crypt`` module (3.12 and older), or ``htpasswd`` (apt
``apache2-utils``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from gobuild import build_go

__all__ = ["registry", "tls_registry", "mtls_registry", "token_registry", "tampering_proxy",
           "referrers_registry", "running_referrers_registry",
           "RegistryDaemon", "LoopbackProxy", "ProxyHandler", "FaultProxy", "Fault", "Exchange",
           "TokenServer",
           "free_port", "wait_for_port", "stop_process", "running_registry",
           "make_tls", "bcrypt_hash"]

REGISTRY_BIN = "docker-registry"
LOOPBACK = "127.0.0.1"
_SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


# --- processes and ports -----------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, *, proc: subprocess.Popen | None = None,
                  log: Path | None = None, timeout: float = 20.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``;
    fail early, with the log's tail, if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening "
                               f"on port {port}: {_tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:g} s: {_tail(log)}")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


# --- TLS material ------------------------------------------------------------

@dataclass
class TLSFiles:
    ca_cert: Path
    #: A certificate directory holding only ``ca.crt`` (for ``cert_dir``).
    ca_dir: Path
    cert: Path
    key: Path
    #: A certificate directory with ``ca.crt`` and a client certificate
    #: (``client.cert``/``client.key``) signed by the same CA.
    client_dir: Path = Path()


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        pytest.fail("the registry tests need the 'cryptography' package "
                    "(pip install cryptography, or the test extras)")
    return x509, hashes, serialization, ec, padding, rsa, ExtendedKeyUsageOID, NameOID


def _self_signed(common_name: str, key, *, ca: bool):
    x509, hashes, _, _, _, _, _, NameOID = _crypto()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(key, hashes.SHA256())


def make_tls(directory: Path, hosts: tuple[str, ...] = ("localhost", LOOPBACK)) -> TLSFiles:
    """A CA, and a server certificate for ``hosts`` (names or IP addresses)
    and a client certificate, both signed by it."""
    x509, hashes, serialization, ec, _, _, EKU, NameOID = _crypto()
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _self_signed("estargz test CA", ca_key, ca=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def leaf(name: str, usage, sans: list):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    pem = serialization.Encoding.PEM

    def key_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def san(host: str):
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    cert, key = leaf(hosts[0], EKU.SERVER_AUTH, [san(h) for h in hosts])
    client_cert, client_key = leaf("estargz test client", EKU.CLIENT_AUTH, [])
    files = TLSFiles(ca_cert=directory / "ca.pem", ca_dir=directory / "certs.d",
                     cert=directory / "server.crt", key=directory / "server.key",
                     client_dir=directory / "client-certs.d")
    files.ca_cert.write_bytes(ca.public_bytes(pem))
    for d in (files.ca_dir, files.client_dir):
        d.mkdir(exist_ok=True)
        (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(key_pem(key))
    (files.client_dir / "client.cert").write_bytes(client_cert.public_bytes(pem))
    (files.client_dir / "client.key").write_bytes(key_pem(client_key))
    return files


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd file (the registry accepts only bcrypt).

    Cost 4, the minimum: the registry checks the hash on every request.
    """
    try:
        import bcrypt
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # Python <= 3.12; libxcrypt (Debian) does bcrypt
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        if hashed and hashed.startswith("$2"):
            return hashed
    except (ImportError, AttributeError, ValueError):
        pass
    exe = shutil.which("htpasswd")
    if exe:
        out = subprocess.run([exe, "-nbBC", "4", "user", password], check=True,
                             capture_output=True, text=True).stdout
        return out.strip().split(":", 1)[1]
    pytest.fail("cannot make a bcrypt hash: install the 'bcrypt' package (pip) "
                "or 'apache2-utils' (apt) for htpasswd")


# --- the registry ------------------------------------------------------------

@dataclass
class RegistryDaemon:
    """A running ``docker-registry``."""

    host: str
    port: int
    root: Path
    log: Path
    proc: subprocess.Popen = field(repr=False)
    #: TLS only: directory with the CA as ``ca.crt`` (for ``cert_dir``).
    ca_dir: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token_server: TokenServer | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.ca_dir else "http"

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)


@contextlib.contextmanager
def running_registry(workdir: Path, *, tls: TLSFiles | None = None,
                     client_certs: bool = False, htpasswd: Path | None = None,
                     token: dict | None = None) -> Iterator[RegistryDaemon]:
    """Start ``docker-registry serve`` on a free 127.0.0.1 port; stop it after.

    ``client_certs`` (with ``tls``) makes the registry demand a client
    certificate signed by the test CA (``tls.client_dir`` has one).
    """
    exe = shutil.which(REGISTRY_BIN)
    if exe is None:
        pytest.fail(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry; "
                    "scripts/install-test-deps.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    log = workdir / "registry.log"
    # The registry reads REGISTRY_* variables as configuration overrides; a
    # REGISTRY_AUTH_FILE meant for skopeo would break it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    for attempt in range(3):  # the free port may be taken by the time we bind it
        port = free_port()
        config: dict = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(root)},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"{LOOPBACK}:{port}", "secret": "estargz-tests"},
        }
        if tls is not None:
            config["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
            if client_certs:
                config["http"]["tls"]["clientcas"] = [str(tls.ca_cert)]
        if htpasswd is not None:
            config["auth"] = {"htpasswd": {"realm": "estargz-tests", "path": str(htpasswd)}}
        if token is not None:
            config["auth"] = {"token": token}
        cfg = workdir / "config.yml"
        cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
        with open(log, "ab") as out:
            proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, env=env)
        try:
            wait_for_port(port, proc=proc, log=log)
            break
        except RuntimeError:
            stop_process(proc)
            if attempt == 2 or "address already in use" not in _tail(log):
                raise
    try:
        yield RegistryDaemon(host=f"{LOOPBACK}:{port}", port=port, root=root, log=log,
                             proc=proc, ca_dir=tls.ca_dir if tls else None)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def running_referrers_registry(workdir: Path, *,
                               oci_subject: bool = False) -> Iterator[RegistryDaemon]:
    """Start go-containerregistry's registry, referrers API on, on a free
    127.0.0.1 port (it binds port 0 and prints the address: no race for the
    port); blobs under ``workdir/blobs``, manifests in its memory.  Stopped
    (SIGTERM) after.  ``oci_subject``: it answers ``OCI-Subject`` to the
    push of a manifest with a subject, as the spec has it (the registry
    itself does not)."""
    exe = str(build_go("referrers-registry"))
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "blobs"
    log = workdir / "registry.log"
    with open(log, "ab") as err:
        argv = [exe, "-addr", f"{LOOPBACK}:0", "-blobs", str(root)]
        proc = subprocess.Popen([*argv, "-oci-subject"] if oci_subject else argv,
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                text=True)
    try:
        assert proc.stdout is not None
        # Its one line of stdout, once it listens; EOF if it died first.
        address = proc.stdout.readline().strip()
        if not address:
            proc.wait(10)
            raise RuntimeError(f"referrers registry exited with {proc.returncode} "
                               f"before listening: {_tail(log)}")
        host, _, port = address.rpartition(":")
        assert host == LOOPBACK, address
        yield RegistryDaemon(host=address, port=int(port), root=root, log=log, proc=proc)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# --- a token server for the registry's "auth: token" mode ----------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The token endpoint of the Docker registry token spec, in a thread.

    Grants what is asked to ``user``:``password``, and ``anonymous_actions``
    to anyone else; signs RS256 JWTs with a certificate in ``x5c`` that the
    registry trusts through its ``rootcertbundle``. Answers with the field
    named by ``reply_field`` (``token`` or ``access_token``).
    """

    issuer = "estargz-test-issuer"
    service = "estargz-test-registry"

    def __init__(self, directory: Path, user: str, password: str) -> None:
        x509, hashes, serialization, _, padding, rsa, _, _ = _crypto()
        self.user, self.password = user, password
        self.anonymous_actions: set[str] = set()
        self.reply_field = "token"
        self.expires_in = 300
        #: Every request: {"scopes": [...], "account": ..., "authenticated": bool}.
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _self_signed("estargz test token signer", self._key, ca=False)
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._sign = lambda data: self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        directory.mkdir(parents=True, exist_ok=True)
        self.bundle = directory / "token-signer.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self._httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self._httpd.server_address[1]}/token"

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def registry_config(self) -> dict:
        return {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                "rootcertbundle": str(self.bundle)}

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        scopes = query.get("scope", [])
        account = (query.get("account") or [""])[0]
        auth = h.headers.get("Authorization", "")
        authenticated = False
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                user, password = "", ""
            if (user, password) != (self.user, self.password):
                with self._lock:
                    self.requests.append({"scopes": scopes, "account": account,
                                          "authenticated": False, "refused": True})
                return self._reply(h, 401, {"errors": [{"code": "UNAUTHORIZED",
                                                        "message": "bad credentials"}]})
            authenticated = True
        with self._lock:
            self.requests.append({"scopes": scopes, "account": account,
                                  "authenticated": authenticated})
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if authenticated else [a for a in wanted
                                                    if a in self.anonymous_actions]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": self.user if authenticated else "",
                  "aud": (query.get("service") or [""])[0], "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        token = signing_input + "." + _b64url(self._sign(signing_input.encode()))
        self._reply(h, 200, {self.reply_field: token, "expires_in": self.expires_in})

    @staticmethod
    def _reply(h: http.server.BaseHTTPRequestHandler, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


# --- a fault-injecting proxy -----------------------------------------------------

@dataclass
class Fault:
    """What to do to requests whose method matches and whose path matches
    ``pattern`` (a regex, searched), for the next ``times`` of them."""

    method: str
    pattern: str
    #: Answer with this status instead of forwarding (None: forward).
    status: int | None = None
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    #: Wait this long (at most 5 s) before doing anything.
    stall: float = 0.0
    #: Forward, but cut the connection after this many body bytes.
    drop_after: int | None = None
    #: Forward, but send the answer one byte every ``trickle_interval``
    #: seconds (for at most a minute): ``"headers"`` from its status line on,
    #: ``"body"`` after whole headers. A deadline, not a read timeout, ends it.
    trickle: str | None = None
    trickle_interval: float = 0.5
    times: int = 1


@dataclass
class Exchange:
    """One request the proxy saw."""

    method: str
    path: str
    status: int
    #: The request's Range header, if any.
    range: str | None
    #: Response body bytes sent to the client.
    sent: int
    fault: Fault | None = None


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
               "te", "trailers", "transfer-encoding", "upgrade", "content-length"}
_MAX_BODY = 256 << 20
_BLOB_OR_MANIFEST = re.compile(r"/(?:blobs|manifests)/(sha256:[0-9a-f]{64})(?:\?|$)")


class LoopbackProxy:
    """A threaded HTTP server on 127.0.0.1, served from a background thread,
    with at most ``max_threads`` handler threads at once: the body of both
    test proxies (:class:`FaultProxy`, ``shapingproxy.ShapingProxy``).
    ``handler`` gets a ``proxy`` class attribute pointing here."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], max_threads: int,
                 request_queue_size: int = 5) -> None:
        slots = threading.BoundedSemaphore(max_threads)

        class Handler(handler):  # type: ignore[valid-type,misc]
            proxy = self

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                slots.acquire()
                super().process_request(request, client_address)

            def process_request_thread(self, request, client_address):
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

            def handle_error(self, request, client_address) -> None:
                pass  # clients hang up (timeouts, cancelled pulls): part of the tests

        Server.request_queue_size = request_queue_size
        self._httpd = Server((LOOPBACK, 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` to talk to."""
        return f"{LOOPBACK}:{self._httpd.server_address[1]}"

    def start(self: _P) -> _P:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self: _P) -> _P:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_P = TypeVar("_P", bound=LoopbackProxy)


class FaultProxy(LoopbackProxy):
    """A reverse proxy (127.0.0.1, one thread per connection, at most
    ``max_threads``) in front of a registry, that can break things on purpose.

    * ``corrupt``: digests whose GET responses (blob or manifest) get one byte flipped;
    * ``ignore_range``: drop the Range header, so the registry sends whole blobs;
    * :meth:`add_fault`: answer a status, stall, cut a body short, or trickle
      the headers or the body a byte at a time;
    * ``log``: every request, with its status and the body bytes sent.

    The registry builds upload URLs from the Host header, which the proxy
    passes on, so clients keep talking through the proxy.
    """

    def __init__(self, upstream: str, max_threads: int = 32) -> None:
        self.upstream = upstream
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.faults: list[Fault] = []
        self.log: list[Exchange] = []
        self._lock = threading.Lock()
        super().__init__(_ProxyHandler, max_threads)

    def add_fault(self, method: str, pattern: str, **kwargs) -> Fault:
        fault = Fault(method.upper(), pattern, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str | None = None, contains: str = "") -> list[Exchange]:
        """Logged requests, filtered by method and a substring of the path."""
        with self._lock:
            return [e for e in self.log
                    if (method is None or e.method == method) and contains in e.path]

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and f.method == method and re.search(f.pattern, path):
                    f.times -= 1
                    return f
        return None

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self.log.append(exchange)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """The request handler of a :class:`LoopbackProxy`: HTTP/1.1, silent,
    every method passed to :meth:`_handle`."""

    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as Go's and nginx's servers set it. Without it a body
    # written in several pieces stalls on Nagle's algorithm until the
    # client's delayed ACK (40 ms): that was about 45 ms added to every
    # range request of a lazy pull, and it made the start-up benchmark
    # measure the proxy (docs/benchmarks.md, issue 9 point 7).
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        raise NotImplementedError


class _ProxyHandler(ProxyHandler):
    timeout = 30  # a silent client cannot hold a thread for long
    proxy: FaultProxy

    def _handle(self) -> None:
        proxy = self.proxy
        method = self.command
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._answer(411, {}, b"chunked requests are not supported by this proxy")
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            return self._answer(413, {}, b"too large for the test proxy")
        body = self.rfile.read(length) if length else b""
        fault = proxy._take_fault(method, self.path)
        if fault is not None and fault.stall:
            time.sleep(min(fault.stall, 5.0))
        if fault is not None and fault.status is not None:
            # Logged before answering: the client may look at the log as soon
            # as it has its answer.
            proxy._record(Exchange(method, self.path, fault.status,
                                   self.headers.get("Range"), len(fault.body), fault))
            self._answer(fault.status, fault.headers, fault.body)
            return
        up_host, _, up_port = proxy.upstream.rpartition(":")
        conn = http.client.HTTPConnection(up_host, int(up_port), timeout=30)
        try:
            conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() in _HOP_BY_HOP:
                    continue
                if name.lower() == "range" and proxy.ignore_range:
                    continue
                conn.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            up = conn.getresponse()
            data = bytearray(up.read(_MAX_BODY) if method != "HEAD" else b"")
            m = _BLOB_OR_MANIFEST.search(self.path)
            if method == "GET" and m and m.group(1) in proxy.corrupt and data:
                data[len(data) // 2] ^= 0x01
            cut = fault.drop_after if fault is not None else None
            sent = len(data) if cut is None else min(len(data), cut)
            # Logged before answering: the client may read the log as soon as
            # it has the headers of its answer.
            proxy._record(Exchange(method, self.path, up.status,
                                   self.headers.get("Range"), sent, fault))
            if fault is not None and fault.trickle:
                return self._trickle(fault, up, bytes(data))
            self.send_response(up.status, up.reason)
            for name, value in up.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            if method == "HEAD":
                self.send_header("Content-Length", up.getheader("Content-Length", "0"))
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if cut is not None:
                self.wfile.write(bytes(data[:sent]))
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
            elif data:
                self.wfile.write(bytes(data))
        finally:
            conn.close()

    def _trickle(self, fault: Fault, up: http.client.HTTPResponse, body: bytes) -> None:
        """Answer like the upstream did, a byte every ``fault.trickle_interval``
        seconds: the whole answer, or its body only."""
        head = [f"HTTP/1.1 {up.status} {up.reason}\r\n"]
        head += [f"{n}: {v}\r\n" for n, v in up.getheaders() if n.lower() not in _HOP_BY_HOP]
        head += [f"Content-Length: {len(body)}\r\n", "Connection: close\r\n", "\r\n"]
        raw = "".join(head).encode("latin-1")
        if fault.trickle == "body":
            self.wfile.write(raw)
            raw = b""
        slow = raw + (body if self.command != "HEAD" else b"")
        self.close_connection = True
        end = time.monotonic() + 60  # a client that never gives up cannot hold a thread
        for i in range(len(slow)):
            if time.monotonic() > end:
                break
            self.wfile.write(slow[i:i + 1])  # OSError when the client hangs up: done
            time.sleep(fault.trickle_interval)

    def _answer(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


# --- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryDaemon]:
    """An anonymous registry over plain HTTP (clients need ``tls_verify=False``)."""
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryDaemon]:
    """A registry over HTTPS (CA in ``.ca_dir``) with htpasswd Basic auth."""
    work = tmp_path_factory.mktemp("tls-registry")
    tls = make_tls(work / "tls")
    user, password = "alice", "s3cret:with-colon"
    htpasswd = work / "htpasswd"
    htpasswd.write_text(f"{user}:{bcrypt_hash(password)}\n")
    with running_registry(work, tls=tls, htpasswd=htpasswd) as reg:
        reg.user, reg.password = user, password
        yield reg


@pytest.fixture(scope="session")
def mtls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryDaemon]:
    """A registry over HTTPS that demands a client certificate; ``.ca_dir``
    holds ``ca.crt`` and ``client.cert``/``client.key`` (containers' layout)."""
    work = tmp_path_factory.mktemp("mtls-registry")
    tls = make_tls(work / "tls")
    with running_registry(work, tls=tls, client_certs=True) as reg:
        reg.ca_dir = tls.client_dir
        yield reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryDaemon]:
    """A plain-HTTP registry that wants Bearer tokens from ``.token_server``."""
    work = tmp_path_factory.mktemp("token-registry")
    server = TokenServer(work / "token", "bob", "hunter2").start()
    try:
        with running_registry(work, token=server.registry_config()) as reg:
            reg.user, reg.password, reg.token_server = server.user, server.password, server
            yield reg
    finally:
        server.stop()


@pytest.fixture
def tampering_proxy(registry: RegistryDaemon) -> Iterator[FaultProxy]:
    """A fresh :class:`FaultProxy` in front of the session's plain registry."""
    with FaultProxy(registry.host) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def referrers_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryDaemon]:
    """go-containerregistry's registry with the OCI 1.1 referrers API, plain
    HTTP, anonymous (clients need ``tls_verify=False``)."""
    with running_referrers_registry(tmp_path_factory.mktemp("referrers-registry")) as reg:
        yield reg
