"""Transports by name, as containers/image has them: each transport module
registers a :class:`Transport` that parses its own ``NAME:...`` references
and opens sources and destinations for them.

This module only knows the registry; the transports themselves live in
:mod:`estargz.transports`, one module each, and register themselves when
imported. The built-in ones are imported on first use, by name (as plugins
are): ``import estargz`` then needs only the standard library -- the
rootless profiling helper runs it under a bare ``python3`` without
``requests`` -- and this layer has no import of the layers above it.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod

from .._exceptions import InvalidInput
from .reference import ImageRef
from .store import ImageDestination, ImageSource, TransportOptions

#: The transport of a reference that names none: a bare OCI layout path.
DEFAULT_TRANSPORT = "oci"

_TRANSPORTS: dict[str, Transport] = {}
#: Transport name -> the module that registers it, imported on first use.
_BUILTIN = {
    "oci": "estargz.transports.oci",
    "oci-archive": "estargz.transports.oci_archive",
    "docker-archive": "estargz.transports.docker_archive",
    "docker": "estargz.transports.docker",
    "docker-daemon": "estargz.transports.docker_daemon",
}
_DEFAULT_OPTIONS = TransportOptions()


class Transport(ABC):
    """One way of storing images (``oci``, ``docker``, ...)."""

    #: The prefix before the first ``:`` of a reference.
    name: str = ""

    @abstractmethod
    def parse(self, rest: str, text: str) -> ImageRef:
        """Parse ``rest``, what follows ``NAME:`` in the reference ``text``."""

    @abstractmethod
    def open_source(self, ref: ImageRef, options: TransportOptions) -> ImageSource:
        """The :class:`ImageSource` for ``ref``."""

    @abstractmethod
    def open_destination(self, ref: ImageRef, options: TransportOptions) -> ImageDestination:
        """The :class:`ImageDestination` for ``ref``."""


def register_transport(transport: Transport) -> Transport:
    """Make ``transport`` known by its name (the last registration wins)."""
    _TRANSPORTS[transport.name] = transport
    return transport


def transport_names() -> tuple[str, ...]:
    """The names of the known transports (registered or built in), sorted."""
    return tuple(sorted(set(_TRANSPORTS) | set(_BUILTIN)))


def _lookup(name: str) -> Transport | None:
    if name not in _TRANSPORTS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])  # registers it
    return _TRANSPORTS.get(name)


def get_transport(name: str) -> Transport:
    """The transport registered as ``name``; raises :class:`InvalidInput`."""
    transport = _lookup(name)
    if transport is None:
        raise InvalidInput(f"unknown transport {name!r}")
    return transport


def parse_reference(text: str) -> ImageRef:
    """Parse an image reference; a string without a known transport is an OCI
    layout path. Raises :class:`InvalidInput` naming what is wrong."""
    name, sep, rest = text.partition(":")
    if not sep:
        return get_transport(DEFAULT_TRANSPORT).parse(text, text)
    transport = _lookup(name)
    if transport is None:
        if os.path.isdir(name) or "/" in name:
            # A bare OCI layout path with a tag: ``./layout:v1``.
            return get_transport(DEFAULT_TRANSPORT).parse(text, text)
        raise InvalidInput(f"unknown transport {name!r} in {text!r} "
                           f"(known: {', '.join(t + ':' for t in transport_names())})")
    return transport.parse(rest, text)


def open_source(ref: ImageRef, options: TransportOptions = _DEFAULT_OPTIONS) -> ImageSource:
    """The :class:`ImageSource` for ``ref``."""
    return get_transport(ref.transport).open_source(ref, options)


def open_destination(ref: ImageRef,
                     options: TransportOptions = _DEFAULT_OPTIONS) -> ImageDestination:
    """The :class:`ImageDestination` for ``ref``."""
    return get_transport(ref.transport).open_destination(ref, options)
