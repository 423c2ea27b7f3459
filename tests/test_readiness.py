"""`estargz optimize --wait-on-port / --wait-on-http`: a server's profile ends
when it is ready, probed inside the sandbox's own network namespace.

Real servers from the Debian + python3 test image (`python3 -m http.server`,
which listens only after importing its modules), as root and as an ordinary
user (rootless); a port that never opens ends at the period with a note;
bad values are usage errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_readable, public_dir, run_cli
from profiler.errors import ProfilingError
from profiler.sandbox import parse_http_url

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="profiling as root")

#: Serves only after importing http.server, socketserver & co; reads
#: /etc/debian_version 8 s later, long after it is ready.
SERVER = ("python3 -m http.server 8080 & sleep 8; cat /etc/debian_version >/dev/null; "
          "wait")
SLOW_SERVER = "sleep 1; exec python3 -m http.server 8080"


def profile(image: Path, shell: str, *args: object, period: float = 20) -> tuple[dict, list]:
    """optimize --no-optimize with a shell command; the JSON output and the record."""
    record = image.parent / f"record-{time.monotonic_ns()}.jsonl"
    try:
        r = run_cli("optimize", f"oci:{image}:latest", "--no-optimize", "--record-out", record,
                    "--entrypoint", json.dumps(["sh", "-c", shell]), "--period", period,
                    "--json", *args)
        assert r.code == 0, r.err
        return r.json(), [json.loads(ln)["path"] for ln in record.read_text().splitlines()]
    finally:
        record.unlink(missing_ok=True)


def not_ready(out: dict) -> list[str]:
    """The readiness notes (rootless adds its own about cgroups)."""
    return [n for n in out["notes"] if "was not ready" in n]


STARTUP = ("usr/lib/python3.11/http/server.py", "usr/lib/python3.11/socketserver.py")


@root_only
def test_port_ends_the_profile_at_readiness(test_images):
    out, paths = profile(test_images.debian_python3, SERVER, "--wait-on-port", 8080)
    assert out["stopped_by"] == "ready" and not_ready(out) == []
    assert out["profile_seconds"] < 8
    for p in STARTUP:
        assert p in paths
    # Read 8 s after the server started: past readiness, so not recorded.
    assert "etc/debian_version" not in paths


@root_only
def test_http_waits_for_a_slow_start(test_images):
    out, paths = profile(test_images.debian_python3, SLOW_SERVER,
                         "--wait-on-http", "http://127.0.0.1:8080/")
    assert out["stopped_by"] == "ready" and not_ready(out) == []
    assert 1.0 <= out["profile_seconds"] < 10
    assert paths.index("usr/bin/sleep") < paths.index("usr/lib/python3.11/http/server.py")
    for p in STARTUP:
        assert p in paths


@root_only
def test_a_port_that_never_opens_ends_at_the_period(test_images):
    out, paths = profile(test_images.debian_python3, SLOW_SERVER, "--wait-on-port", 8081,
                         period=3)
    assert out["stopped_by"] == "period"
    assert not_ready(out) == ["port 8081 was not ready when the 3 s period ended "
                              "(last attempt: connection refused)"]
    assert "usr/lib/python3.11/http/server.py" in paths  # the run went on to the end


@root_only
def test_net_host_refuses_a_port_the_host_already_serves(test_images):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("optimize", f"oci:{test_images.debian_python3}:latest", "--no-optimize",
                    "--args", '["sleep", "30"]', "--net-host", "--wait-on-port", port)
    assert r.code == 1
    assert r.err.strip().splitlines()[-1] == (
        f"estargz: error: port {port} answers before the workload started: with --net-host "
        "another process on the host serves it")


@pytest.mark.parametrize("args, message", [
    (("--wait-on-port", "0"), "0 is not in the range 1<=x<=65535"),
    (("--wait-on-port", "70000"), "70000 is not in the range 1<=x<=65535"),
    (("--wait-on-http", "https://127.0.0.1:8443/"), "is not an http:// URL"),
    (("--wait-on-http", "ftp://127.0.0.1/"), "is not an http:// URL"),
    (("--wait-on-http", "http://127.0.0.1:99999/"), "is not a valid URL"),
    (("--wait-on-http", "http:///x"), "names no host"),
    (("--wait-on-port", "80", "--wait-on-http", "http://127.0.0.1/"), "not both"),
])
def test_bad_values_are_usage_errors(args, message):
    r = run_cli("optimize", "oci:/nonexistent", "--no-optimize", *args)
    assert r.code == 2, r.err
    [line] = r.err.strip().splitlines()
    assert line.startswith("estargz: error: ") and args[0] in line and message in line


def test_http_url_parsing():
    t = parse_http_url("http://localhost:8080/health?deep=1")
    assert (t.host, t.port, t.path) == ("localhost", 8080, "/health?deep=1")
    assert parse_http_url("http://127.0.0.1").port == 80
    with pytest.raises(ProfilingError, match="credentials"):
        parse_http_url("http://user:pw@127.0.0.1/")


@pytest.fixture
def public_image(test_images):
    d = public_dir("estargz-readiness-")
    shutil.copytree(test_images.debian_python3, d / "py")
    make_readable(d)
    yield d
    shutil.rmtree(d)


@root_only
def test_rootless_http_readiness(public_image, rootless_user, unprivileged):
    """Rootless: the container's network namespace belongs to the profiler's
    user namespace, where the probe thread may enter it."""
    out_dir = public_image / "out"
    out_dir.mkdir()
    os.chown(out_dir, rootless_user.uid, rootless_user.gid)
    record = out_dir / "record.jsonl"
    p = subprocess.run(rootless_user.argv(
        unprivileged, "optimize", f"oci:{public_image / 'py'}:latest", "--no-optimize",
        "--record-out", record, "--entrypoint", json.dumps(["sh", "-c", SERVER]),
        "--wait-on-http", "http://localhost:8080/", "--period", "20", "--json"),
        capture_output=True, text=True, cwd="/", timeout=300,
        env=rootless_user.env(TMPDIR=str(out_dir)))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["stopped_by"] == "ready" and not_ready(out) == []
    paths = [json.loads(ln)["path"] for ln in record.read_text().splitlines()]
    for path in STARTUP:
        assert path in paths
    assert "etc/debian_version" not in paths
    assert rootless_user.processes() == []
