"""A hostile or broken registry cannot hold a run forever or take credentials
(issue 11, points 3 and 6).

Deadlines: a :class:`FaultProxy` in front of Debian's registry trickles an
answer's headers or body a byte at a time, each byte well within the read
timeout; the command must fail within its deadline with one line naming the
server and the request, and retries must not stretch the deadline.

Credentials: small fake registries (HTTPS with the test CA, or plain HTTP)
name a token realm, redirect a blob or place an upload elsewhere, and a
listener there records every request it gets: no credential may reach it
over plain HTTP, and an HTTPS registry may send nothing to plain HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import Spec, build_tar, run_cli
from estargz import Cancelled, RegistryError, TransportOptions, request_cancel, reset_cancel
from estargz.cli import main
from estargz.image import descriptor as media
from estargz.image.transport import parse_reference
from estargz.registry import RegistryClient
from estargz.registry.errors import DeadlineExceeded
from estargz.registry.http import DEFAULT_MIN_RATE, DEFAULT_READ_TIMEOUT, DEFAULT_TIMEOUT
from estargz.transports.docker import RegistrySource
from services import FaultProxy, TLSFiles, make_tls
from test_registry import client, no_ambient_credentials, push_blob, push_image  # noqa: F401

#: Slack on top of a deadline before a test calls it missed: start-up of a
#: CLI process and a busy 2-core machine; a behaviour check, not a benchmark.
MARGIN = 12.0
USER, PASSWORD = "alice", "pa55-never-in-clear"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("estargz: error: "), err
    return lines[0]


# --- deadlines -------------------------------------------------------------------

def test_default_deadlines_are_applied() -> None:
    c = RegistryClient("registry.example")
    assert (c.timeout, c.read_timeout, c.min_rate) == (
        DEFAULT_TIMEOUT, DEFAULT_READ_TIMEOUT, DEFAULT_MIN_RATE)
    # A transfer gets the request deadline plus its size at the minimum rate.
    assert c._deadline("x").seconds == DEFAULT_TIMEOUT
    assert c._deadline("x", 10 * DEFAULT_MIN_RATE).seconds == DEFAULT_TIMEOUT + 10
    # The docker:// transport: unset options are the client's defaults, set ones pass.
    ref = parse_reference("docker://registry.example/a/b:c")
    src = RegistrySource(ref, TransportOptions())
    assert (src.client.timeout, src.client.read_timeout, src.client.min_rate) == (
        DEFAULT_TIMEOUT, DEFAULT_READ_TIMEOUT, DEFAULT_MIN_RATE)
    src = RegistrySource(ref, TransportOptions(timeout=7, read_timeout=3,
                                               min_transfer_rate=1000))
    assert (src.client.timeout, src.client.read_timeout, src.client.min_rate) == (7, 3, 1000)
    with pytest.raises(Exception, match="timeout must be a positive number"):
        RegistryClient("registry.example", timeout=float("nan"))
    # The CLI's defaults are the client's, for convert and optimize alike.
    for name in ("convert", "optimize"):
        command = main.get_command(click.Context(main), name)
        assert command is not None
        params = {p.name: p for p in command.params}
        assert params["timeout"].default == DEFAULT_TIMEOUT
        assert params["read_timeout"].default == DEFAULT_READ_TIMEOUT
        rate = params["min_transfer_rate"]
        assert rate.type.convert(rate.default, rate, None) == DEFAULT_MIN_RATE


@pytest.mark.parametrize("args, option", [
    (["--timeout", "0"], "--timeout"), (["--timeout", "-3"], "--timeout"),
    (["--timeout", "nan"], "--timeout"), (["--timeout", "inf"], "--timeout"),
    (["--timeout", "soon"], "--timeout"), (["--read-timeout", "1e9"], "--read-timeout"),
    (["--min-transfer-rate", "0"], "--min-transfer-rate"),
    (["--min-transfer-rate", "fast"], "--min-transfer-rate"),
])
def test_bad_deadline_options_are_usage_errors(tmp_path: Path, args: list[str],
                                               option: str) -> None:
    # In process: click's parsing is all there is to check.
    r = CliRunner().invoke(main, ["convert", "docker://127.0.0.1:1/a/b:c",
                                  f"oci:{tmp_path}/out", *args])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if f"Invalid value for '{option}'" in line]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_image(registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``(repository, layer digest)`` of a one-layer image tagged v1 in ``registry``."""
    repo = "safety/small"
    c = client(registry.host)
    manifest, _, _ = push_image(c, repo, "v1", tmp_path_factory.mktemp("small-image"))
    return repo, json.loads(manifest)["layers"][0]["digest"]


def convert_through(proxy: FaultProxy, repo: str, dst: str, *extra: str):
    start = time.monotonic()
    r = run_cli("convert", f"docker://{proxy.host}/{repo}:v1", dst, "--src-tls-verify=false",
                "--dest-tls-verify=false", *extra)
    return r, time.monotonic() - start


@pytest.mark.parametrize("part", ["headers", "body"])
def test_trickled_manifest_fails_at_the_deadline(tampering_proxy: FaultProxy, small_image,
                                                 tmp_path: Path, part: str) -> None:
    repo, _ = small_image
    tampering_proxy.add_fault("GET", "/manifests/", trickle=part, times=100)
    r, took = convert_through(tampering_proxy, repo, f"oci:{tmp_path}/out",
                              "--timeout", "3", "--read-timeout", "2")
    assert r.code == RegistryError.exit_code, r.err
    line = one_error_line(r.err)
    assert (f"registry {tampering_proxy.host}: GET manifest {repo}:v1 exceeded the 3 s "
            f"deadline (") in line
    assert took < 3 + MARGIN, took
    # The deadline covers the retries: the trickled GET was not sent again.
    assert len(tampering_proxy.requests("GET", "/manifests/")) == 1


def test_trickled_blob_body_fails_at_the_deadline(tampering_proxy: FaultProxy, small_image,
                                                  tmp_path: Path) -> None:
    repo, layer = small_image
    tampering_proxy.add_fault("GET", f"/blobs/{layer}", trickle="body", times=100)
    r, took = convert_through(tampering_proxy, repo, f"oci:{tmp_path}/out",
                              "--timeout", "3", "--read-timeout", "2")
    assert r.code == RegistryError.exit_code, r.err
    line = one_error_line(r.err)
    # A few hundred bytes at 32 KiB/s add nothing visible to the 3 s.
    assert f"registry {tampering_proxy.host}: GET blob {layer} exceeded the 3 s deadline (" \
        in line
    # The bytes handed over so far (a trickle this slow fills no 64 KiB
    # read) and when the watchdog cut the transfer.
    m = re.search(r"\((\d+) bytes in (\d+\.\d) s\)$", line)
    assert m and int(m.group(1)) < 100 and 3.0 <= float(m.group(2)) < 3 + MARGIN, line
    assert took < 3 + MARGIN, took
    assert len(tampering_proxy.requests("GET", f"/blobs/{layer}")) == 1


@pytest.mark.parametrize("part", ["headers", "body"])
def test_trickled_blob_through_the_library(tampering_proxy: FaultProxy, tmp_path: Path,
                                           part: str) -> None:
    # 5000 bytes at a minimum of 10 000 B/s: the deadline is 2 + 0.5 s.
    c = client(tampering_proxy.host, timeout=2, read_timeout=1, min_rate=10_000, retries=5)
    digest, size = push_blob(c, "safety/lib", tmp_path, b"x" * 5000)
    tampering_proxy.add_fault("GET", f"/blobs/{digest}", trickle=part, trickle_interval=0.2,
                              times=100)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as e, open(tmp_path / "out", "wb") as out:
        c.download_blob("safety/lib", digest, size, out)
    took = time.monotonic() - start
    assert f"registry {tampering_proxy.host}: GET blob {digest} exceeded the 2.5 s deadline" \
        in str(e.value)
    assert 2.5 <= took < 2.5 + 3, took
    assert len(tampering_proxy.requests("GET", f"/blobs/{digest}")) == 1


def test_trickled_headers_over_tls_are_cut(tls: TLSFiles) -> None:
    # The watchdog shuts down a TLS socket under the reading thread too.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as s:
            s.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.is_set():
                    break
                s.sendall(bytes([byte]))
                time.sleep(0.2)

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    start = time.monotonic()
    try:
        with pytest.raises(DeadlineExceeded) as e:
            RegistryClient(host, cert_dir=str(tls.ca_dir), timeout=2,
                           read_timeout=1).head_blob("a/b", "sha256:" + "0" * 64)
        took = time.monotonic() - start
    finally:
        stop.set()
        listener.close()
    assert f"registry {host}: GET /v2/ exceeded the 2 s deadline" in str(e.value)
    assert 2 <= took < 2 + 3, took


def test_cancellation_cuts_a_trickled_transfer(tampering_proxy: FaultProxy,
                                               tmp_path: Path) -> None:
    # A long deadline: the watchdog must act on the cancellation, not on it.
    c = client(tampering_proxy.host, timeout=60, read_timeout=30)
    digest, size = push_blob(c, "safety/cancel", tmp_path, b"y" * 5000)
    tampering_proxy.add_fault("GET", f"/blobs/{digest}", trickle="headers", times=100)
    timer = threading.Timer(1.0, request_cancel)
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled), open(tmp_path / "out", "wb") as out:
            c.download_blob("safety/cancel", digest, size, out)
        took = time.monotonic() - start
    finally:
        timer.cancel()
        reset_cancel()
    assert 1.0 <= took < 1.0 + 2.0, took


def test_cancellation_ends_a_retry_back_off(tampering_proxy: FaultProxy) -> None:
    # The registry asks for the longest wait we honour; Ctrl-C must not wait it out.
    c = client(tampering_proxy.host, timeout=120, retries=5)
    c.head_blob("safety/backoff", "sha256:" + "0" * 64)  # pick the scheme first
    tampering_proxy.add_fault("GET", "/manifests/", status=503, headers={"Retry-After": "10"},
                              times=100)
    timer = threading.Timer(1.0, request_cancel)
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            c.get_manifest("safety/backoff", "v1", [media.OCI_MANIFEST])
        took = time.monotonic() - start
    finally:
        timer.cancel()
        reset_cancel()
    assert 1.0 <= took < 1.0 + 2.0, took
    assert len(tampering_proxy.requests("GET", "/manifests/")) == 1


def test_retries_stay_within_the_deadline(tampering_proxy: FaultProxy) -> None:
    c = client(tampering_proxy.host, timeout=2.5, retries=50)
    c.head_blob("safety/retry", "sha256:" + "0" * 64)  # pick the scheme first
    tampering_proxy.add_fault("GET", "/manifests/", status=503, headers={"Retry-After": "1"},
                              times=100)
    # The client's own back-off, really waited: the deadline must bound it.
    start = time.monotonic()
    with pytest.raises(RegistryError) as e:
        c.get_manifest("safety/retry", "v1", [media.OCI_MANIFEST])
    took = time.monotonic() - start
    assert "the 2.5 s deadline leaves no time for another" in str(e.value)
    assert took < 2.5 + 1, took
    assert 2 <= len(tampering_proxy.requests("GET", "/manifests/")) <= 3


def test_short_but_sufficient_deadlines_convert_and_push(tampering_proxy: FaultProxy,
                                                         small_image, tmp_path: Path) -> None:
    repo, _ = small_image
    limits = ("--timeout", "5", "--read-timeout", "2", "--min-transfer-rate", "1M")
    r, _ = convert_through(tampering_proxy, repo, f"oci:{tmp_path}/out:esgz", *limits)
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "out" / "index.json").read_text())["manifests"]
    # And back into the registry: uploads run under the same deadlines.
    r, _ = convert_through(tampering_proxy, repo,
                           f"docker://{tampering_proxy.host}/{repo}:v1-esgz", *limits)
    assert r.code == 0, r.err
    assert tampering_proxy.requests("PUT", "/manifests/v1-esgz")


# --- where credentials may go ------------------------------------------------------

Answer = Callable[[str, str, dict], tuple[int, dict, bytes]]


class FakeServer:
    """An HTTP(S) server on 127.0.0.1 answering with ``answer(method, path,
    headers)``; ``seen`` records every request with its headers."""

    def __init__(self, answer: Answer, tls: TLSFiles | None = None) -> None:
        self.seen: list[tuple[str, str, dict]] = []
        self.answer = answer
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.seen.append((self.command, self.path, headers))
                status, out, body = fake.answer(self.command, self.path, headers)
                self.send_response(status)
                for name, value in out.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_GET

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.cert, tls.key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def credentials_seen(self) -> list[str]:
        return [h["authorization"] for _, _, h in self.seen if "authorization" in h]


@pytest.fixture
def servers() -> Iterator[Callable[..., FakeServer]]:
    started: list[FakeServer] = []

    def start(answer: Answer, tls: TLSFiles | None = None) -> FakeServer:
        started.append(FakeServer(answer, tls))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("safety-tls"))


def recorder(method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
    """What a listener at a refused destination answers: a token, so that
    a client that did talk to it would go on."""
    return 200, {"Content-Type": "application/json"}, b'{"token": "stolen"}'


def bearer_to(realm: str) -> Answer:
    def answer(method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
        return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'}, b""
    return answer


@pytest.mark.parametrize("realm_host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("verify", ["true", "false"])
def test_https_registry_naming_an_http_realm_gets_no_credentials(
        servers, tls: TLSFiles, tmp_path: Path, realm_host: str, verify: str) -> None:
    listener = servers(recorder)
    realm = f"http://{realm_host}:{listener.port}/token"
    registry = servers(bearer_to(realm), tls)
    r = run_cli("convert", f"docker://{registry.host}/test/img:v1", f"oci:{tmp_path}/out",
                "--src-cert-dir", tls.ca_dir, f"--src-tls-verify={verify}",
                "--src-creds", f"{USER}:{PASSWORD}", "--timeout", "10")
    assert r.code == RegistryError.exit_code, r.err
    line = one_error_line(r.err)
    assert f"registry {registry.host} names the token realm '{realm}'" in line
    assert "plain HTTP while the registry is served over HTTPS" in line
    assert PASSWORD not in r.err
    assert listener.seen == []
    assert registry.credentials_seen() == []  # Bearer: the password was for the realm only


def test_plain_registry_realm_on_another_host_gets_no_credentials(servers) -> None:
    listener = servers(recorder)
    realm = f"http://localhost:{listener.port}/token"
    registry = servers(bearer_to(realm))
    c = RegistryClient(registry.host, tls_verify=False, credentials=(USER, PASSWORD),
                       retries=0, timeout=10)
    with pytest.raises(RegistryError) as e:
        c.head_blob("test/img", "sha256:" + "0" * 64)
    assert "plain HTTP on another host than the registry's (127.0.0.1)" in str(e.value)
    assert listener.seen == []
    # The same realm on the registry's own host (another port) is the user's
    # plain-HTTP choice, and the listener does record what it gets.
    same_host = servers(bearer_to(f"http://127.0.0.1:{listener.port}/token"))
    c = RegistryClient(same_host.host, tls_verify=False, credentials=(USER, PASSWORD),
                       retries=0, timeout=10)
    with pytest.raises(RegistryError):
        c.head_blob("test/img", "sha256:" + "0" * 64)
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert listener.credentials_seen() and set(listener.credentials_seen()) == {basic}


class FakeImageRegistry:
    """A one-layer image, served with Basic auth; the layer's GET answers
    ``layer_answer`` (a redirect, say) when it is set."""

    def __init__(self) -> None:
        layer = gzip.compress(build_tar([Spec("hello.txt", data=b"hello\n")]), mtime=0)
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(
                gzip.decompress(layer)).hexdigest()]}}).encode()
        self.layer, self.layer_digest = layer, _digest(layer)
        self.blobs = {_digest(config): config, self.layer_digest: layer}
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
            "config": {"mediaType": media.OCI_CONFIG, "digest": _digest(config),
                       "size": len(config)},
            "layers": [{"mediaType": media.OCI_LAYER_GZIP, "digest": self.layer_digest,
                        "size": len(layer)}]}).encode()
        self.layer_answer: tuple[int, dict, bytes] | None = None

    def __call__(self, method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if headers.get("authorization") != expected:
            return 401, {"WWW-Authenticate": 'Basic realm="fake"'}, b""
        if path == "/v2/":
            return 200, {}, b""
        if path.endswith("/manifests/v1"):
            return 200, {"Content-Type": media.OCI_MANIFEST,
                         "Docker-Content-Digest": _digest(self.manifest)}, self.manifest
        digest = path.rsplit("/", 1)[-1]
        if digest == self.layer_digest and self.layer_answer is not None:
            return self.layer_answer
        if digest in self.blobs:
            return 200, {"Content-Type": "application/octet-stream"}, self.blobs[digest]
        return 404, {}, b""


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def convert_from(registry: FakeServer, tls: TLSFiles, tmp_path: Path):
    return run_cli("convert", f"docker://{registry.host}/test/img:v1", f"oci:{tmp_path}/out",
                   "--src-cert-dir", tls.ca_dir, "--src-creds", f"{USER}:{PASSWORD}",
                   "--timeout", "10")


def test_https_to_http_blob_redirect_is_refused(servers, tls: TLSFiles,
                                                tmp_path: Path) -> None:
    image = FakeImageRegistry()
    listener = servers(lambda m, p, h: (200, {}, image.layer))
    target = f"http://127.0.0.1:{listener.port}/storage/{image.layer_digest}"
    image.layer_answer = (307, {"Location": target}, b"")
    registry = servers(image, tls)
    r = convert_from(registry, tls, tmp_path)
    assert r.code == RegistryError.exit_code, r.err
    line = one_error_line(r.err)
    assert (f"registry {registry.host} redirected GET blob {image.layer_digest} from HTTPS "
            f"to plain-HTTP 127.0.0.1:{listener.port}; refused") in line
    assert listener.seen == []


def test_https_redirect_to_storage_works_without_credentials(servers, tls: TLSFiles,
                                                             tmp_path: Path) -> None:
    image = FakeImageRegistry()
    storage = servers(lambda m, p, h: (200, {"Content-Type": "application/octet-stream"},
                                       image.layer), tls)
    # Another host name for the same CA's certificate: requests must drop
    # the registry's Authorization on the way.
    target = f"https://localhost:{storage.port}/storage/{image.layer_digest}?sig=abc"
    image.layer_answer = (307, {"Location": target}, b"")
    registry = servers(image, tls)
    r = convert_from(registry, tls, tmp_path)
    assert r.code == 0, r.err
    assert [p for m, p, _ in storage.seen] == [f"/storage/{image.layer_digest}?sig=abc"]
    assert storage.credentials_seen() == []
    assert registry.credentials_seen()  # the registry itself did get them


def test_upload_location_elsewhere_gets_no_credentials(servers, tmp_path: Path) -> None:
    elsewhere = servers(lambda m, p, h: (201, {}, b""))
    image = FakeImageRegistry()

    def registry_answer(method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
        if method == "POST" and headers.get("authorization"):
            return 202, {"Location": f"http://localhost:{elsewhere.port}/upload/1"}, b""
        return image(method, path, headers)

    registry = servers(registry_answer)
    c = RegistryClient(registry.host, tls_verify=False, credentials=(USER, PASSWORD),
                       retries=0, timeout=10)
    data = b"blob"
    (tmp_path / "blob").write_bytes(data)
    c.upload_blob("test/img", _digest(data), len(data), str(tmp_path / "blob"))
    assert [m for m, _, _ in elsewhere.seen] == ["PUT"]
    assert elsewhere.credentials_seen() == []
    assert registry.credentials_seen()
