"""The ``docker-daemon:`` transport, through the Docker Engine API.

Reading is ``docker save`` (``GET /images/NAME/get``) spooled to a temporary
file and read as a docker-archive; writing builds a docker-archive and hands
it to ``docker load`` (``POST /images/load``). The ``docker`` package finds
the engine as the docker CLI does (``DOCKER_HOST``, else the default socket);
this module, and so ``docker``, is imported only when the transport is used.
"""

from __future__ import annotations

import os
from typing import Any

import docker
from docker.errors import APIError, DockerException
from docker.errors import NotFound as DockerNotFound

from .._exceptions import InvalidInput, NotFound, RegistryError, StorageError
from .._fsutil import owned_tempdir
from ..image.descriptor import Descriptor
from ..image.reference import ImageRef, parse_docker_name
from ..image.store import ImageDestination, ImageSource, TransportOptions
from ..image.transport import Transport, register_transport
from ..layer.jsondoc import load_json_object
from .docker_archive import DockerArchiveDestination, DockerArchiveSource, _short_name


def _client(options: TransportOptions) -> Any:
    try:
        if options.docker_host:
            return docker.DockerClient(base_url=options.docker_host)
        return docker.from_env()
    except DockerException as e:
        raise RegistryError(f"cannot reach the Docker daemon: {e}") from None


class DaemonSource(DockerArchiveSource):
    """An image in the Docker daemon, read as ``docker save`` output."""

    def __init__(self, ref: ImageRef, options: TransportOptions) -> None:
        assert ref.name is not None
        name = _short_name(ref.name)
        self._spool = owned_tempdir("daemon")
        path = os.path.join(self._spool.path, "image.tar")
        try:
            client = _client(options)
            try:
                stream = client.api.get_image(name)
                with open(path, "wb") as f:
                    for piece in stream:
                        f.write(piece)
            except DockerNotFound:
                raise NotFound(f"image {name} is not in the Docker daemon") from None
            except (APIError, DockerException) as e:
                raise RegistryError(f"docker save {name} failed: {e}") from None
            except OSError as e:
                raise StorageError(f"cannot spool docker save output: {e.strerror}") from None
            finally:
                client.close()
            super().__init__(path, ref.name)
        except BaseException:
            self._spool.cleanup()
            raise
        self.name = f"docker-daemon:{name}"

    def close(self) -> None:
        super().close()
        self._spool.cleanup()


class DaemonDestination(DockerArchiveDestination):
    """Load the converted image into the Docker daemon, tagged as named."""

    def __init__(self, ref: ImageRef, options: TransportOptions) -> None:
        self._options = options
        self._spool = owned_tempdir("daemon")
        try:
            super().__init__(os.path.join(self._spool.path, "image.tar"), ref.name)
        except BaseException:
            self._spool.cleanup()
            raise
        self.name = f"docker-daemon:{_short_name(ref.name)}" if ref.name else "docker-daemon:"

    def commit(self, root: Descriptor, root_data: bytes) -> None:
        super().commit(root, root_data)
        client = _client(self._options)
        try:
            with open(self.path, "rb") as f:
                out = client.api.load_image(f)
            for line in out or []:
                msg = line if isinstance(line, dict) else _json(line)
                if msg.get("error") or msg.get("errorDetail"):
                    raise RegistryError(f"docker load failed: {msg.get('error') or msg}")
        except (APIError, DockerException) as e:
            raise RegistryError(f"docker load failed: {e}") from None
        finally:
            client.close()

    def close(self) -> None:
        super().close()
        self._spool.cleanup()

    def abort(self) -> None:
        super().abort()
        self._spool.cleanup()


def _json(line: Any) -> dict[str, Any]:
    if not isinstance(line, (bytes, str)):
        return {}
    try:
        return load_json_object(line, "Docker daemon message")
    except InvalidInput:
        return {}


class DockerDaemonTransport(Transport):
    """``docker-daemon:NAME[:TAG]``."""

    name = "docker-daemon"

    def parse(self, rest: str, text: str) -> ImageRef:
        if not rest:
            raise InvalidInput("docker-daemon: reference lacks an image name")
        return ImageRef(self.name, name=parse_docker_name(rest))

    def open_source(self, ref: ImageRef, options: TransportOptions) -> ImageSource:
        return DaemonSource(ref, options)

    def open_destination(self, ref: ImageRef, options: TransportOptions) -> ImageDestination:
        return DaemonDestination(ref, options)


register_transport(DockerDaemonTransport())
