"""How to reach registries: TLS, plain HTTP, credentials, retry budget and timeouts (spec §1 flags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from obdconv.errors import UsageError
from obdconv.request import RegistryAccess

# Resolves a credential reference (RegistryAccess.credential_ref) to "user:password" on the worker.
CredentialsResolver = Callable[[str], str | None]


def split_user_password(value: str) -> tuple[str, str]:
    """`-u user:password`: split at the FIRST ':' only if its index > 0 (spec §1); else anonymous."""
    index = value.find(":")
    if index <= 0:
        return "", ""
    return value[:index], value[index + 1:]


def split_client_cert(value: str) -> tuple[str, str]:
    """`--client-cert cert:key`: exactly two parts (spec §1)."""
    parts = value.split(":")
    if len(parts) != 2 or not all(parts):
        # The value is a pair of file paths (no secret), so it may be named.
        raise UsageError(f"client cert {value}: invalid format (expected certfile:keyfile)")
    return parts[0], parts[1]


@dataclass(slots=True)
class RegistryOptions:
    """Options shared by every repository opened with them. The password is kept out of repr."""

    plain: bool = False  # http:// for every host
    insecure: bool = False  # no TLS verification
    root_ca: list[str] = field(default_factory=list)
    cert_dir: list[str] = field(default_factory=list)
    client_cert: list[str] = field(default_factory=list)  # "certfile:keyfile"
    username: str = ""
    password: str = field(default="", repr=False)
    # Docker config.json consulted when no username is given; None = $DOCKER_CONFIG/config.json or
    # ~/.docker/config.json, "" = none at all.
    docker_config: str | None = None
    # Seconds spent retrying transient failures (connection refused or reset, timeout, 5xx, 429) of
    # one request, counted from its first failure; a Retry-After longer than what is left fails at once.
    retry_budget: float = 3.0
    # A blob body broken mid-transfer: a download is resumed from the byte reached, an upload sent
    # again in a new session, at most this many times per blob.
    resume_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    upload_chunk_size: int = 8 << 20  # largest piece of an upload held in memory (and per PATCH in "chunks")
    upload_mode: str = "stream"  # "stream": one PATCH with a chunked body; "chunks": PATCH per chunk

    def __post_init__(self) -> None:
        if self.upload_mode not in ("stream", "chunks"):
            raise UsageError(f"upload mode {self.upload_mode!r}: expected 'stream' or 'chunks'")
        if self.upload_chunk_size <= 0 or self.retry_budget < 0 or self.resume_attempts < 0:
            raise UsageError("upload chunk size must be > 0, the retry budget and resume attempts >= 0")

    @classmethod
    def from_flags(cls, username_flag: str = "", **kwargs: object) -> RegistryOptions:
        """Build from the CLI: `username_flag` is the raw `-u user:password` value."""
        username, password = split_user_password(username_flag)
        return cls(username=username, password=password, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_access(cls, access: RegistryAccess, credentials_resolver: CredentialsResolver | None = None,
                    **kwargs: object) -> RegistryOptions:
        """Build from a request's RegistryAccess; the worker resolves `credential_ref` to "user:password"."""
        username = password = ""
        if access.credential_ref:
            if credentials_resolver is None:
                raise UsageError(f"credential reference {access.credential_ref!r} given but no resolver configured")
            resolved = credentials_resolver(access.credential_ref)
            if resolved is None:
                raise UsageError(f"credential reference {access.credential_ref!r} is not configured on this worker")
            username, password = split_user_password(resolved)
        return cls(plain=access.plain, insecure=access.insecure, root_ca=list(access.root_ca),
                   cert_dir=list(access.cert_dir), client_cert=list(access.client_cert),
                   username=username, password=password, **kwargs)  # type: ignore[arg-type]
