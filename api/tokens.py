"""Bearer tokens of the API, from a TOML file the operator manages (settings `api_tokens_file`).

    [[tokens]]
    name = "ci"                                  # shown in logs and metrics, never the token
    sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    repositories = ["registry.example/team-a/*", "registry.example/shared/base"]

    [[tokens]]
    name = "dashboard"
    token = "the-token-itself"                   # allowed, but then the file must be mode 0600
    repositories = ["registry.example/*"]
    rate_limit = 600                             # optional: this token's requests per window
                                                 # (default: setting api_rate_limit; 0 = none)

`sha256` is the hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`): the file then holds no
secret. `repositories` are glob patterns (`*` any characters including '/', `?` one character)
over "host[:port]/name" (`oci:PATH` for a layout on the workers' disk): a token may submit, see and
cancel conversions whose source and output repositories all match one of its patterns.

A request's token is hashed and compared with every token's hash in constant time, so neither
timing nor logs reveal anything about the tokens. The file is re-read when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from api.files import WatchedToml, require_private
from obdconv.errors import UsageError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# `[...]` classes are not allowed: listing translates patterns into SQL LIKE prefixes (api/listing.py).
_PATTERN = re.compile(r"^[^\[\]\s]+$")


@dataclass(frozen=True)
class ApiToken:
    name: str
    digest: bytes  # sha256 of the token
    repositories: tuple[str, ...]
    rate_limit: int | None = None  # None: the setting api_rate_limit

    def allows(self, repository: str) -> bool:
        return any(fnmatchcase(repository, pattern) for pattern in self.repositories)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(data: dict[str, Any], path: Path, mode: int) -> tuple[ApiToken, ...]:
    unknown = set(data) - {"tokens"}
    if unknown:
        raise UsageError(f"tokens file {path}: unknown key(s) {sorted(unknown)}; expected [[tokens]] tables")
    entries = data.get("tokens", [])
    if not isinstance(entries, list):
        raise UsageError(f"tokens file {path}: `tokens` must be an array of tables ([[tokens]])")
    out: list[ApiToken] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for i, entry in enumerate(entries):
        where = f"tokens file {path}, token #{i + 1}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected a table")
        unknown = set(entry) - {"name", "sha256", "token", "repositories", "rate_limit"}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UsageError(f"{where}: `name` must be 1-64 letters, digits, '_', '.', '@' or '-'")
        where = f"tokens file {path}, token {name!r}"
        if name in names:
            raise UsageError(f"{where}: the name is used twice")
        if ("sha256" in entry) == ("token" in entry):
            raise UsageError(f"{where}: give exactly one of `sha256` (preferred) or `token`")
        if "token" in entry:
            require_private(path, mode, "tokens file")
            token = entry["token"]
            if not isinstance(token, str) or len(token) < 16:
                raise UsageError(f"{where}: `token` must be a string of at least 16 characters")
            digest = token_digest(token)
        else:
            hexdigest = entry["sha256"]
            if not isinstance(hexdigest, str) or not _HEX64.match(hexdigest):
                raise UsageError(f"{where}: `sha256` must be 64 lowercase hex digits")
            digest = bytes.fromhex(hexdigest)
        if digest in digests:
            raise UsageError(f"{where}: the same token as another entry")
        patterns = entry.get("repositories")
        if (not isinstance(patterns, list) or not patterns
                or not all(isinstance(p, str) and _PATTERN.match(p) for p in patterns)):
            raise UsageError(f"{where}: `repositories` must be a non-empty list of glob patterns "
                             "(`*` and `?` only, no spaces)")
        rate_limit = entry.get("rate_limit")
        if rate_limit is not None and (not isinstance(rate_limit, int) or isinstance(rate_limit, bool)
                                       or rate_limit < 0):
            raise UsageError(f"{where}: `rate_limit` must be a whole number >= 0")
        names.add(name)
        digests.add(digest)
        out.append(ApiToken(name, digest, tuple(patterns), rate_limit))
    return tuple(out)


def bearer_of(authorization: str) -> str | None:
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


class TokenStore:
    def __init__(self, path: str) -> None:
        self.file = WatchedToml(path, parse_tokens, (), "tokens file")

    def authenticate(self, authorization: str) -> ApiToken | None:
        """The token an `Authorization: Bearer ...` header names, or None."""
        presented = bearer_of(authorization)
        if presented is None:
            return None
        digest = token_digest(presented)
        found = None
        for token in self.file.get():  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(token.digest, digest):
                found = token
        return found

    def count(self) -> int:
        return len(self.file.get())
