"""The shaping proxy the start-up benchmark pulls through: it must pass range
requests through unchanged, pace bodies to the bandwidth, add the latency per
request, and count what it sent and when."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time

from services import registry  # noqa: F401  (fixture)
from shapingproxy import ShapingProxy


def push_blob(host: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("POST", "/v2/shaping/blobs/uploads/", headers={"Content-Length": "0"})
    r = conn.getresponse()
    r.read()
    assert r.status == 202, r.status
    location = r.getheader("Location")
    assert location is not None
    sep = "&" if "?" in location else "?"
    conn.request("PUT", f"{location}{sep}digest={digest}", body=data,
                 headers={"Content-Length": str(len(data)),
                          "Content-Type": "application/octet-stream"})
    r = conn.getresponse()
    r.read()
    assert r.status == 201, r.status
    return digest


def get(host: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(host, timeout=60)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def test_ranges_bandwidth_latency_and_counts(registry) -> None:  # noqa: F811
    data = os.urandom(1 << 20)
    digest = push_blob(registry.host, data)
    path = f"/v2/shaping/blobs/{digest}"
    # 8 Mbit/s = 1 MB/s; 0.2 s per request.
    with ShapingProxy(registry.host, bandwidth=8e6, latency=0.2) as proxy:
        t0 = time.monotonic()
        status, headers, body = get(proxy.host, path, {"Range": "bytes=1000-1999"})
        took = time.monotonic() - t0
        assert status == 206 and body == data[1000:2000]
        assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert 0.2 <= took < 1.0

        def logged(n: int) -> None:
            # The proxy counts a body's bytes and then logs its request after
            # the last one, so a client can be done before either: wait.
            deadline = time.monotonic() + 5
            while len(proxy.requests("GET", digest)) < n and time.monotonic() < deadline:
                time.sleep(0.01)

        logged(1)
        mid = time.monotonic()
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda: results.append(get(proxy.host, path)[2]))
                   for _ in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        assert results == [data, data]
        # 2 MiB through a shared 1 MB/s link: ~2.1 s plus the latency, not ~1 s.
        assert 2.0 <= took < 4.0, took

        logged(3)
        assert proxy.total_bytes == 1000 + 2 * len(data)
        assert proxy.bytes_until(mid) == 1000
        reqs = proxy.requests("GET", digest)
        assert [r.range for r in reqs].count("bytes=1000-1999") == 1
        assert sorted(r.sent for r in reqs) == [1000, len(data), len(data)]
        assert all(r.status in (200, 206) for r in reqs)
        proxy.reset()
        assert proxy.total_bytes == 0 and proxy.requests() == []
