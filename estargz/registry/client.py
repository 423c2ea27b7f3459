"""A client of the OCI distribution API (registry v2), one per registry host.

:class:`RegistryClient` fetches and pushes manifests and blobs: blobs are
streamed and checked against their digest and size, read by HTTP range for
lazy access (:meth:`RegistryClient.blob_source` gives a
:class:`~estargz.RangeSource`, so :class:`~estargz.LayerReader` reads
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
  :func:`estargz.registry.credentials.find_credentials`.
* **Retries.** 429, 5xx, timeouts and dropped connections are retried with a
  bounded exponential back-off (a short ``Retry-After`` is honoured); a
  download that breaks resumes where it stopped with a ``Range`` request.
  Other 4xx answers are final.
* **Deadlines.** Every operation (a manifest, a token, a HEAD, a blob
  transfer with its resumes, an upload with its restarts) ends within
  ``timeout`` seconds, plus ``size / min_rate`` for the bytes it moves, all
  attempts and back-off included; ``read_timeout`` bounds each wait for
  bytes. A server that trickles its headers or body is cut off at the
  deadline (:mod:`.deadline`), which is never retried.
* **Errors.** Every failure is one :class:`~estargz.EstargzError` line naming
  the registry: :class:`AuthenticationError` (401/403, with how to give
  credentials), :class:`NotFound` (404), :class:`DigestMismatch`, or
  :class:`RegistryError` with the status and the registry's own error code.
  No message ever holds a password or a token.
"""


from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import BinaryIO
from urllib.parse import quote, urlencode, urljoin

import requests

from .._exceptions import (
    DigestMismatch,
    InvalidBlob,
    InvalidInput,
    NotFound,
    RegistryError,
    StorageError,
)
from .._progress import progress_meter
from ..image.descriptor import MANIFEST_TYPES, OCI_INDEX, check_digest, sha256_digest
from ..image.records import OCI_EMPTY
from ..image.reference import DockerName
from ..image.store import TransportOptions
from ..layer.jsondoc import load_json_object
from ..layer.source import check_range
from .credentials import Credentials
from .deadline import Deadline
from .errors import Transient, Unreachable
from .http import (
    DEFAULT_MIN_RATE,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_TIMEOUT,
    RegistryHTTP,
    parse_content_range,
)
from .upload import upload_once

__all__ = ["RegistryClient", "RegistryBlobSource", "client_for", "open_registry_blob"]

#: Largest manifest accepted (containers/image uses the same limit).
MANIFEST_LIMIT = 4 << 20
#: When a registry ignores ``Range`` and sends the whole blob, a read that
#: ends within this many bytes of the start is served by skipping; beyond it,
#: reading lazily would silently mean downloading the blob, so it is an error.
RANGE_SKIP_LIMIT = 1 << 20
#: Pages of a referrers answer followed (``Link: <…>; rel="next"``).
_REFERRER_PAGES = 16
#: Referrers of one answer whose listed ``artifactType`` cannot be trusted
#: (see :meth:`RegistryClient._of_artifact_type`) checked against their
#: manifest, one GET each; the rest are dropped.
_REFERRER_CHECKS = 32
#: A manifest PUT refused with both codes is retried. Distribution's
#: filesystem storage rewrites a repository's blob link in place (truncate,
#: then write), so while another client mounts the same blob into the same
#: repository, the manifest's blob check can read an empty link: it answers
#: DIGEST_INVALID for the unparsable link and MANIFEST_BLOB_UNKNOWN for the
#: blob (registry/storage/schema2manifesthandler.go, v2.8.2; empty links are
#: distribution/distribution#4489). A wrong manifest digest gives
#: DIGEST_INVALID alone, a blob truly missing MANIFEST_BLOB_UNKNOWN alone.
_LINK_RACE = frozenset({"DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN"})


def _check_repo(repo: str) -> str:
    if (not repo or repo.startswith("/") or repo.endswith("/") or "//" in repo
            or ".." in repo.split("/") or not re.fullmatch(r"[a-z0-9._/-]+", repo)):
        raise InvalidInput(f"invalid repository name {repo!r}")
    return repo


def _is_digest(reference: str) -> bool:
    return ":" in reference


def _is_sha256(value: object) -> bool:
    """Whether ``value`` is a well-formed sha256 digest (a registry's answer
    may hold anything)."""
    try:
        check_digest(value)
    except InvalidInput:
        return False
    return True


class RegistryClient(RegistryHTTP):
    """A client of one registry host (``HOST[:PORT]``), safe to share
    between threads.

    ``tls_verify=False`` skips certificate checks and allows plain HTTP;
    ``cert_dir`` is a containers-style certificate directory (``*.crt`` CAs,
    ``client.cert``/``client.key``); ``credentials`` is ``(user, password)``,
    else they are looked up (honouring ``auth_file``) when the registry asks.
    ``retries`` bounds the extra attempts of one operation; ``backoff`` is
    the first delay between them, doubled each time. ``timeout`` is the
    deadline of one operation in seconds, retries included; a transfer of
    N bytes gets ``timeout + N / min_rate`` (``min_rate`` in bytes per
    second); ``read_timeout`` bounds connecting and each wait for bytes.
    """

    def __repr__(self) -> str:
        return f"RegistryClient({self.host!r})"

    def __enter__(self) -> RegistryClient:
        return self

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
                                 headers={"Accept": ", ".join(accept)}, stream=True,
                                 deadline=dl)
            with resp:
                data = self._read_body(resp, MANIFEST_LIMIT + 1, f"manifest {name}", dl)
                if len(data) > MANIFEST_LIMIT:
                    raise RegistryError(f"manifest {name} from registry {self.host} is larger "
                                        f"than the {MANIFEST_LIMIT}-byte limit")
                return data, resp.headers.get("Content-Type", "")

        with self._deadline(f"GET manifest {name}") as dl:
            data, content_type = self._retrying(attempt, dl)
        digest = sha256_digest(data)
        if _is_digest(reference) and digest != reference:
            raise DigestMismatch(f"manifest {name} from registry {self.host} has digest "
                                 f"{digest}")
        media_type = content_type.split(";", 1)[0].strip()
        if media_type in ("", "application/json", "text/plain", "application/octet-stream"):
            try:  # some registries and proxies send a generic type
                declared = load_json_object(data, "manifest").get("mediaType")
            except InvalidInput:
                declared = None
            if isinstance(declared, str) and declared:
                media_type = declared
        return data, media_type, digest

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag (or its digest); returns its digest."""
        return self._put_manifest(repo, reference, data, media_type)[0]

    def put_referrer(self, repo: str, data: bytes, media_type: str) -> tuple[str, bool]:
        """Store a manifest that has a ``subject``, by its digest: ``(digest,
        indexed)``, ``indexed`` when the registry answered ``OCI-Subject``
        (OCI distribution 1.1: it lists the manifest in its referrers API;
        otherwise the client keeps the ``sha256-HEX`` tag index itself)."""
        digest, headers = self._put_manifest(repo, sha256_digest(data), data, media_type)
        return digest, bool(headers.get("OCI-Subject"))

    def get_referrers(self, repo: str, digest: str,
                      artifact_type: str | None = None) -> list[dict[str, object]] | None:
        """The descriptors of the manifests whose ``subject`` is ``digest``
        (OCI distribution 1.1 referrers API, ``Link`` pages followed), only
        those of ``artifact_type`` if given; ``None`` when the registry has
        no referrers API (404), for the caller to use the tag schema."""
        _check_repo(repo)
        check_digest(digest)
        url: str | None = f"/v2/{repo}/referrers/{digest}"
        if artifact_type:
            url = f"{url}?{urlencode({'artifactType': artifact_type})}"
        found: list[dict[str, object]] = []
        for _ in range(_REFERRER_PAGES):
            if url is None:
                break
            data, url = self._referrers_page(repo, digest, url)
            if data is None:  # no API (a later page that vanished ends the list)
                return found or None
            manifests = load_json_object(
                data, f"the referrers of {digest} from registry {self.host}",
                error=RegistryError).get("manifests") or []
            if not isinstance(manifests, list):
                raise RegistryError(f"registry {self.host} answered the referrers of {digest} "
                                    "with something that is not an image index")
            found += [m for m in manifests if isinstance(m, dict)]
        if artifact_type:  # a registry may ignore the filter (no OCI-Filters-Applied)
            found = self._of_artifact_type(repo, found, artifact_type)
        return found

    def _of_artifact_type(self, repo: str, found: list[dict[str, object]],
                          wanted: str) -> list[dict[str, object]]:
        """The entries of a referrers answer that are of type ``wanted``.

        The spec has the registry list a manifest's own ``artifactType``,
        else its config's media type; go-containerregistry's registry
        (v0.22.1) always lists the config's.  An artifact with the empty
        config must carry an ``artifactType`` (image-spec), so an entry that
        says ``OCI_EMPTY``, or nothing, hides the real one: up to
        ``_REFERRER_CHECKS`` such manifests are read, and the entries of
        type ``wanted`` kept with their ``artifactType`` corrected."""
        kept: list[dict[str, object]] = []
        checks = _REFERRER_CHECKS
        for entry in found:
            listed = entry.get("artifactType")
            digest = entry.get("digest")
            if listed == wanted:
                kept.append(entry)
            elif (listed in (None, "", OCI_EMPTY) and checks > 0 and _is_sha256(digest)
                  and entry.get("mediaType") in MANIFEST_TYPES):
                checks -= 1
                if self._manifest_artifact_type(repo, str(digest)) == wanted:
                    kept.append({**entry, "artifactType": wanted})
        return kept

    def _manifest_artifact_type(self, repo: str, digest: str) -> str | None:
        """The artifact type of manifest ``digest``: its ``artifactType``,
        else its config's media type; ``None`` if it is gone."""
        try:
            data, _, _ = self.get_manifest(repo, digest, MANIFEST_TYPES)
        except NotFound:  # deleted since it was listed
            return None
        manifest = load_json_object(data, f"referrer {self.host}/{repo}@{digest}",
                                    error=RegistryError)
        config = manifest.get("config")
        actual = manifest.get("artifactType") or (
            config.get("mediaType") if isinstance(config, dict) else None)
        return actual if isinstance(actual, str) else None

    def _referrers_page(self, repo: str, digest: str,
                        url: str) -> tuple[bytes | None, str | None]:
        """One page of referrers: ``(index bytes or None on 404, next page URL)``."""
        what = f"GET referrers of {digest}"

        def attempt() -> tuple[bytes | None, str | None]:
            resp = self._request("GET", url, scopes=self._pull(repo), repo=repo, what=what,
                                 ok=(200, 404), headers={"Accept": OCI_INDEX}, stream=True,
                                 deadline=dl)
            with resp:
                if resp.status_code == 404:
                    return None, None
                data = self._read_body(resp, MANIFEST_LIMIT + 1, "referrers", dl)
                nxt = resp.links.get("next", {}).get("url")
                return data, urljoin(resp.url, nxt) if nxt else None

        with self._deadline(what) as dl:
            return self._retrying(attempt, dl)

    def _put_manifest(self, repo: str, reference: str, data: bytes,
                      media_type: str) -> tuple[str, requests.structures.CaseInsensitiveDict[str]]:
        _check_repo(repo)
        digest = sha256_digest(data)
        if _is_digest(reference) and reference != digest:
            raise InvalidInput(f"manifest pushed as {reference} has digest {digest}")
        name = f"{repo}@{reference}" if _is_digest(reference) else f"{repo}:{reference}"
        url = f"/v2/{repo}/manifests/{quote(reference, safe=':')}"

        def attempt() -> requests.structures.CaseInsensitiveDict[str]:
            resp = self._request("PUT", url, scopes=self._push(repo), repo=repo,
                                 what=f"PUT manifest {name}", ok=(200, 201, 202),
                                 headers={"Content-Type": media_type}, body=data,
                                 deadline=dl, transient_codes=_LINK_RACE)
            with resp:
                return resp.headers

        with self._deadline(f"PUT manifest {name}", len(data)) as dl:
            headers = self._retrying(attempt, dl)
        answered = headers.get("Docker-Content-Digest")
        if answered and answered.startswith("sha256:") and answered != digest:
            raise DigestMismatch(f"registry {self.host} stored manifest {name} as {answered}, "
                                 f"but its digest is {digest}")
        return digest, headers

    def head_blob(self, repo: str, digest: str) -> int | None:
        """The size of blob ``digest`` in ``repo``, or ``None`` if it is absent."""
        _check_repo(repo)
        check_digest(digest)
        with self._deadline(f"HEAD blob {digest}") as dl:
            return self._retrying(lambda: self._head(repo, digest, self._pull(repo), dl), dl)

    def download_blob(self, repo: str, digest: str, size: int, dst: BinaryIO) -> None:
        """Stream blob ``digest`` (of ``size`` bytes) into ``dst``.

        Checks size and sha256 before returning (:class:`DigestMismatch`
        otherwise: ``dst`` then holds bad bytes, so write to a temporary
        file). A dropped connection resumes from the last byte received.
        """
        _check_repo(repo)
        check_digest(digest)
        url = f"/v2/{repo}/blobs/{digest}"
        with self._deadline(f"GET blob {digest}", size) as dl:
            got, actual = self._download(repo, digest, size, dst, url, dl)
        if got != size:
            raise self._blob_mismatch(repo, digest, f"has {got} bytes, not {size}")
        if actual != digest:
            raise self._blob_mismatch(repo, digest, f"does not match its digest: got {actual}")

    def _download(self, repo: str, digest: str, size: int, dst: BinaryIO, url: str,
                  dl: Deadline) -> tuple[int, str]:
        """The transfer of :meth:`download_blob`: ``(bytes got, their digest)``."""
        h = hashlib.sha256()
        got = 0
        failures = 0       # consecutive failures without progress
        total_failures = 0  # bounded even when every attempt makes some progress
        fetched = progress_meter("fetch", size)
        while True:
            headers = {"Accept-Encoding": "identity"}
            if got:
                headers["Range"] = f"bytes={got}-"
            before = got
            try:
                resp = self._request("GET", url, scopes=self._pull(repo), repo=repo,
                                     what=f"GET blob {digest}", missing=f"blob {digest}",
                                     headers=headers, stream=True, ok=(200, 206), deadline=dl)
                with resp:
                    skip, expected_end = self._resume_position(resp, got, digest)
                    for piece in self._iter_body(resp, f"blob {digest}", dl):
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
                        fetched.add(len(piece))
                    if expected_end is not None and got < expected_end:
                        # The connection closed early without urllib3 noticing.
                        raise Transient(f"registry {self.host} closed the connection "
                                         f"{expected_end - got} bytes before the end of blob "
                                         f"{digest}")
                break
            except Transient as e:
                if got >= size:
                    break  # everything arrived; only the end of the answer was lost
                failures = 1 if got > before else failures + 1
                total_failures += 1
                message = (f"download of blob {digest} from registry {self.host} (repository "
                           f"{repo}) failed: {e} (gave up after {total_failures} attempts)")
                if total_failures > 10 * (self.retries + 1):
                    raise RegistryError(message) from None
                self._retry_or_raise(e, failures - 1, dl, message)
            except Unreachable as e:
                raise RegistryError(str(e)) from None
        return got, "sha256:" + h.hexdigest()

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
                                 what=what, missing=f"blob {digest}", stream=True,
                                 ok=(200, 206), deadline=dl,
                                 headers={"Range": f"bytes={offset}-{end}",
                                          "Accept-Encoding": "identity"})
            with resp:
                if resp.status_code == 206:
                    got_range = parse_content_range(resp.headers.get("Content-Range"))
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
                data = self._read_span(resp, skip, want, f"blob {digest}", dl)
            if len(data) < length:
                raise InvalidBlob(f"blob {digest} in registry {self.host} ends before byte "
                                  f"{end} (read {len(data)} of {length} bytes)", offset=offset)
            return data

        what = f"GET bytes {offset}-{end} of blob {digest}"
        with self._deadline(what, length) as dl:
            return self._retrying(attempt, dl)

    def blob_source(self, repo: str, digest: str, size: int) -> RegistryBlobSource:
        """A :class:`~estargz.source.RangeSource` reading the blob by ranges."""
        _check_repo(repo)
        check_digest(digest)
        return RegistryBlobSource(self, repo, digest, size)

    def upload_blob(self, repo: str, digest: str, size: int, src_path: str, *,
                    chunk_size: int | None = None, mount_from: str | None = None) -> None:
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
            if self._head(repo, digest, scopes, dl) is not None:
                return
            upload_once(self, repo, digest, size, src_path, chunk_size, mount_from,
                        scopes, dl)

        with self._deadline(f"upload of blob {digest} to {repo}", size) as dl:
            self._retrying(attempt, dl)

    @staticmethod
    def _pull(repo: str) -> list[str]:
        return [f"repository:{repo}:pull"]

    @staticmethod
    def _push(repo: str) -> list[str]:
        return [f"repository:{repo}:pull,push"]

    def _head(self, repo: str, digest: str, scopes: list[str], dl: Deadline) -> int | None:
        resp = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", scopes=scopes, repo=repo,
                             what=f"HEAD blob {digest}", ok=(200, 404), deadline=dl)
        with resp:
            if resp.status_code == 404:
                return None
            length = resp.headers.get("Content-Length", "")
            return int(length) if length.isdigit() else 0

    def _resume_position(self, resp: requests.Response, got: int,
                         digest: str) -> tuple[int, int | None]:
        """For a (resumed) download: bytes to skip, and where the body should end."""
        length = resp.headers.get("Content-Length", "")
        if resp.status_code == 206:
            rng = parse_content_range(resp.headers.get("Content-Range"))
            if rng is None or rng[0] != got:
                raise RegistryError(f"registry {self.host} answered a request for blob "
                                    f"{digest} from byte {got} with Content-Range "
                                    f"{resp.headers.get('Content-Range')!r}")
            return 0, rng[1] + 1
        # A 200 is the whole blob again: skip what we already have.
        return got, int(length) if length.isdigit() else None

    def _blob_mismatch(self, repo: str, digest: str, why: str) -> DigestMismatch:
        return DigestMismatch(f"blob {digest} from registry {self.host} (repository {repo}) "
                              f"{why}")


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
        check_range(self._size, offset, length)
        return self.client.read_blob_range(self.repo, self.digest, offset, length)

    def __repr__(self) -> str:
        return f"RegistryBlobSource({self.client.host}/{self.repo}@{self.digest})"


@contextlib.contextmanager
def open_registry_blob(name: DockerName, *, tls_verify: bool = True,
                       cert_dir: str | None = None,
                       credentials: Credentials | None = None,
                       auth_file: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                       read_timeout: float = DEFAULT_READ_TIMEOUT,
                       min_rate: float = DEFAULT_MIN_RATE) -> Iterator[RegistryBlobSource]:
    """Blob ``name`` (``HOST/REPO@DIGEST``) as a range source, read only by
    HTTP range requests; :class:`NotFound` if the registry lacks it. The
    deadlines are :class:`RegistryClient`'s."""
    if not name.digest:
        raise InvalidInput(f"{name}: a registry blob is named by digest")
    with RegistryClient(name.registry, tls_verify=tls_verify, cert_dir=cert_dir,
                        credentials=credentials, auth_file=auth_file, timeout=timeout,
                        read_timeout=read_timeout, min_rate=min_rate) as client:
        size = client.head_blob(name.repository, name.digest)
        if size is None:
            raise NotFound(f"blob {name.digest} is not in {name.registry}/{name.repository}")
        yield client.blob_source(name.repository, name.digest, size)


def client_for(host: str, options: TransportOptions) -> RegistryClient:
    """A client of ``host`` with one side's connection settings (TLS,
    credentials, deadlines; unset deadlines are the client's defaults)."""
    o = options
    return RegistryClient(
        host, tls_verify=o.tls_verify, cert_dir=o.cert_dir, credentials=o.credentials,
        auth_file=o.auth_file, timeout=DEFAULT_TIMEOUT if o.timeout is None else o.timeout,
        read_timeout=DEFAULT_READ_TIMEOUT if o.read_timeout is None else o.read_timeout,
        min_rate=DEFAULT_MIN_RATE if o.min_transfer_rate is None else o.min_transfer_rate)
