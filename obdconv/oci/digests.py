"""Digests, OCI chain ids and the LSMT uuid derived from them (spec reference-convertor §3.1)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from obdconv.errors import BadInputError

SHA256_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX_RE = re.compile(r"^[0-9a-f]+$")


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """`sha256:<hex>` of `data`."""
    return SHA256_PREFIX + hashlib.sha256(data).hexdigest()


def ranges_sha256(ranges: Iterable[Sequence[Any]]) -> tuple[str, int]:
    """(`sha256:<hex>`, size) of the `[path, offset, length]` ranges of files one after the other,
    read into one reused buffer (the GIL is released while hashing); a range past its file's end
    counts only the bytes there are."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    size = 0
    for path, offset, length in ranges:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            left = length
            while left > 0 and (n := f.readinto(view[:min(left, len(buf))])):
                h.update(view[:n])
                size += n
                left -= n
    return SHA256_PREFIX + h.hexdigest(), size


def parse_digest(digest: str) -> tuple[str, str]:
    """Split and validate an OCI digest -> (algorithm, encoded). BadInputError if malformed.

    Registered algorithms (sha256/384/512) must be lowercase hex of the right length (OCI image-spec
    "Digests"); other well-formed algorithms are accepted as opaque.
    """
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise BadInputError(f"malformed digest {digest!r}")
    algorithm, _, encoded = digest.partition(":")
    expected = _HEX_LENGTHS.get(algorithm)
    if expected is not None and (len(encoded) != expected or not _HEX_RE.match(encoded)):
        raise BadInputError(f"malformed {algorithm} digest {digest!r}: need {expected} lowercase hex digits")
    return algorithm, encoded


def validate_sha256(digest: str) -> str:
    """Return the 64-hex part of a `sha256:` digest; BadInputError for anything else."""
    algorithm, encoded = parse_digest(digest)
    if algorithm != "sha256":
        raise BadInputError(f"unsupported digest algorithm in {digest!r}: only sha256 is supported")
    return encoded


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI ChainID of every prefix: id0 = diff0; id_i = sha256(id_{i-1} + " " + diff_i) (image-spec identity)."""
    out: list[str] = []
    for diff_id in diff_ids:
        validate_sha256(diff_id)
        if not out:
            out.append(diff_id)
        else:
            out.append(sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def chain_id_to_uuid(chain_id: str) -> str:
    """First 32 hex chars of the chain id as 8-4-4-4-12, lowercase (the reference's `chainIDtoUUID`)."""
    h = validate_sha256(chain_id)
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
