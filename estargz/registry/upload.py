"""Pushing a blob with the OCI distribution upload protocol: mounted from
another repository when the registry agrees, else one upload session sent
whole (POST, PUT) or in chunks (PATCH per chunk, then PUT).

The retries, deadline and the HEAD that skips a blob already there are the
caller's (:meth:`~estargz.registry.client.RegistryClient.upload_blob`): this
is one attempt.
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from .._progress import Meter, progress_meter
from .deadline import Deadline
from .http import Body, RegistryHTTP

__all__ = ["FileSlice", "upload_once"]


class FileSlice:
    """``length`` bytes of a file from ``offset``, as a request body; the
    bytes read (sent) are counted on ``sent``."""

    def __init__(self, path: str, offset: int, length: int, sent: Meter | None = None) -> None:
        self._f = open(path, "rb")  # noqa: SIM115  (a request body: requests closes it)
        self._f.seek(offset)
        self._left = length
        self._sent = sent

    def __len__(self) -> int:
        return self._left

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        if self._sent is not None:
            self._sent.add(len(data))
        return data

    def close(self) -> None:
        self._f.close()


def upload_once(client: RegistryHTTP, repo: str, digest: str, size: int, src_path: str,
                chunk_size: int | None, mount_from: str | None,
                scopes: list[str], dl: Deadline) -> None:
    """One attempt at pushing ``src_path`` as blob ``digest``: mount it from
    ``mount_from`` if the registry agrees, else POST an upload session and
    send the bytes in one PUT, or with ``chunk_size`` a PATCH per chunk."""
    what = f"upload of blob {digest} to {repo}"
    start = f"/v2/{repo}/blobs/uploads/"
    resp = None
    if mount_from:
        query = urlencode({"mount": digest, "from": mount_from})
        resp = client._request("POST", f"{start}?{query}", scopes=scopes, repo=repo,
                               what=f"mount of blob {digest} from {mount_from} into {repo}",
                               ok=(201, 202), body=b"", deadline=dl)
        resp.close()
        if resp.status_code == 201:
            return  # mounted: no bytes needed
    if resp is None:
        resp = client._request("POST", start, scopes=scopes, repo=repo, what=what,
                               ok=(202,), body=b"", deadline=dl)
        resp.close()
    location = client._location(resp, what)
    # Per attempt: a restarted upload counts from zero again. The whole
    # PUT's body is a FileSlice too, so that its bytes are counted as sent.
    sent = progress_meter("upload", size)
    if chunk_size is None:
        put_body: Body = lambda: FileSlice(src_path, 0, size, sent)  # noqa: E731
    else:
        # OCI distribution lets a registry demand a minimum chunk size.
        minimum = resp.headers.get("OCI-Chunk-Min-Length", "")
        if minimum.isdigit():
            chunk_size = max(chunk_size, int(minimum))
        offset = 0
        while offset < size:
            n = min(chunk_size, size - offset)
            resp = client._request(
                "PATCH", location, scopes=scopes, repo=repo, what=what, ok=(202,),
                deadline=dl,
                headers={"Content-Type": "application/octet-stream",
                           "Content-Range": f"{offset}-{offset + n - 1}"},
                body=lambda o=offset, n=n: FileSlice(src_path, o, n, sent))
            resp.close()
            location = client._location(resp, what)
            offset += n
        put_body = b""
    sep = "&" if urlsplit(location).query else "?"
    resp = client._request("PUT", f"{location}{sep}{urlencode({'digest': digest})}",
                           scopes=scopes, repo=repo, what=what, ok=(201, 204),
                           headers={"Content-Type": "application/octet-stream"},
                           body=put_body, deadline=dl)
    resp.close()
