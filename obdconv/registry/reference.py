"""Image references: `host[:port]/path[:tag][@digest]` and `oci:PATH[:tag][@digest]` (an OCI layout dir).

Grammar follows distribution's `reference` package: the first path component is a registry host when it
contains '.' or ':' or is `localhost`; otherwise the host is docker.io and single names get `library/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from obdconv.errors import BadInputError

OCI_LAYOUT_PREFIX = "oci:"
DOCKER_HUB_HOST = "docker.io"

# distribution/reference grammar (lowercase path components joined by separators).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])"
                      r"(?::[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference. For `oci:PATH`, `layout` is True, `host` is "" and `repository` is PATH."""

    host: str
    repository: str
    tag: str = ""
    digest: str = ""
    layout: bool = False

    @property
    def name(self) -> str:
        """What `open_repository` takes: "host/repository" or "oci:PATH"."""
        return f"{OCI_LAYOUT_PREFIX}{self.repository}" if self.layout else f"{self.host}/{self.repository}"

    @property
    def ref(self) -> str:
        """The tag or digest to resolve (tag wins when both are given, like the reference convertor)."""
        return self.tag or self.digest

    def with_ref(self, tag: str = "", digest: str = "") -> Reference:
        return Reference(self.host, self.repository, tag, digest, self.layout)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_digest(ref: str) -> bool:
    return bool(_DIGEST_RE.match(ref))


def check_digest(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise BadInputError naming it."""
    if not _SHA256_RE.match(digest):
        raise BadInputError(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def check_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise BadInputError(f"invalid tag {tag!r}")
    return tag


def _split_digest(s: str) -> tuple[str, str]:
    if "@" not in s:
        return s, ""
    rest, digest = s.rsplit("@", 1)
    if not _DIGEST_RE.match(digest):
        raise BadInputError(f"invalid digest {digest!r} in reference")
    return rest, digest


def _split_tag(s: str) -> tuple[str, str]:
    """The tag is after the last ':' that follows the last '/', so host ports are not taken for tags."""
    slash = s.rfind("/")
    colon = s.rfind(":")
    if colon > slash:
        tag = s[colon + 1:]
        if not _TAG_RE.match(tag):
            raise BadInputError(f"invalid tag {tag!r} in reference {s!r}")
        return s[:colon], tag
    return s, ""


def parse_reference(s: str) -> Reference:
    """Parse a registry or `oci:PATH` reference; BadInputError names what is wrong."""
    if not s or s != s.strip():
        raise BadInputError(f"invalid reference {s!r}: empty or surrounded by whitespace")
    if s.startswith(OCI_LAYOUT_PREFIX):
        rest, digest = _split_digest(s[len(OCI_LAYOUT_PREFIX):])
        path, tag = _split_tag(rest)
        if not path:
            raise BadInputError(f"invalid reference {s!r}: oci: needs a directory path")
        return Reference("", path, tag, digest, layout=True)
    rest, digest = _split_digest(s)
    remainder, tag = _split_tag(rest)
    first, sep, path = remainder.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host = first
        if not _HOST_RE.match(host):
            raise BadInputError(f"invalid registry host {host!r} in reference {s!r}")
    else:
        host, path = DOCKER_HUB_HOST, remainder
        if "/" not in path:
            path = f"library/{path}"
    if not _REPOSITORY_RE.match(path):
        raise BadInputError(
            f"invalid repository name {path!r} in reference {s!r}: lowercase letters, digits and separators only")
    return Reference(host, path, tag, digest)
