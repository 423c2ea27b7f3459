"""OCI and Docker media types, content descriptors and platforms.

Pure records and their JSON form. Field names follow the OCI image spec;
unknown JSON fields of a descriptor are kept (``extra``) so that rewriting a
manifest never drops what we do not understand.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any

from .._exceptions import InvalidInput

# Manifests and indexes
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

# Configs
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

# Layers
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
CONVERTIBLE_LAYERS = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP,
                      "application/vnd.docker.image.rootfs.diff.tar")

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidInput(f"unsupported or malformed digest {digest!r}")
    return digest


@dataclass(frozen=True)
class Platform:
    """Where an image runs: ``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInput(f"platform {text!r} is not os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Platform:
        return cls(str(obj.get("os", "")), str(obj.get("architecture", "")),
                   str(obj.get("variant", "") or ""),
                   {k: v for k, v in obj.items() if k not in ("os", "architecture", "variant")})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        out.update(self.extra)
        return out

    def matches(self, other: Platform) -> bool:
        """True if ``other`` (from an index) satisfies this requested platform."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidInput("descriptor is not a JSON object")
        size = obj.get("size")
        if type(size) is not int or size < 0:
            raise InvalidInput(f"descriptor {obj.get('digest')!r} has no valid size")
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict):
            raise InvalidInput("descriptor annotations are not an object")
        plat = obj.get("platform")
        return cls(
            media_type=str(obj.get("mediaType", "")),
            digest=check_digest(obj.get("digest")),
            size=size,
            annotations=dict(ann),
            platform=Platform.from_json(plat) if isinstance(plat, dict) else None,
            extra={k: v for k, v in obj.items()
                   if k not in ("mediaType", "digest", "size", "annotations", "platform")},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        out.update(self.extra)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out

    def replace(self, **changes: Any) -> Descriptor:
        return _replace(self, **changes)
