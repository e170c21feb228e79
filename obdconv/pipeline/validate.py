"""Request validation shared by the local runner, the CLI and `obdconv submit` (no heavy imports)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from obdconv.errors import BadInputError, UnsupportedError, UsageError
from obdconv.registry.reference import check_tag
from obdconv.request import ConversionProfile, ConversionRequest

ALGORITHMS = ("lz4", "zstd")
MAX_CALLBACK_URL = 2048
SECRET_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_request(request: ConversionRequest) -> list[ConversionProfile]:
    """The reference's checks and messages, plus obdconv's own limits."""
    if not request.repository:
        raise UsageError("repository is required (-r)")
    if not (request.input_tag or request.input_digest):
        raise UsageError("one of input-tag [-i] or input-digest [-g] is required")
    profiles = request.profiles()
    if not profiles:
        raise UsageError("output-tag is required, you can specify it by [-o|--overlaybd|--turboOCI]")
    # A bad output tag would otherwise fail only at the final push, after every layer was converted
    # and uploaded.
    for flag, tag in (("--overlaybd/-o", request.overlaybd_tag), ("--turboOCI", request.turbo_tag)):
        try:
            if tag:
                check_tag(tag)
        except BadInputError:
            raise UsageError(f"{flag} {tag!r}: not a valid tag (letters, digits, '_', '.', '-'; "
                             "at most 128, not starting with '.' or '-')") from None
    if request.mkfs and (request.base_layer or request.base_layer_digest):
        raise UsageError("--base-layer is used only with --mkfs=false (with mkfs, layer 0 makes the filesystem)")
    if request.flatten and request.turbo_tag:
        raise UsageError("--flatten with --turboOCI: a turboOCI image cannot be flattened (its layers read file "
                         "data from the original layer blobs, one per layer); flatten --overlaybd only")
    if request.turbo_tag and request.fstype not in ("", "ext4"):
        raise UnsupportedError(f"--fstype {request.fstype} is not supported: only ext4")
    if request.algorithm not in ALGORITHMS:
        raise UsageError(f"--algorithm {request.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    bs = request.block_size
    if bs < 4096 or bs > 32768 or bs & (bs - 1):
        # 64 KiB is what overlaybd-commit accepts, but the runtime's 64 KiB read buffer cannot
        # read a 64 KiB block that does not compress (stored length > 65536; format spec §2.3).
        raise UsageError(f"--bs {bs // 1024 if bs % 1024 == 0 else bs / 1024} KiB: ZFile block size must be a "
                         "power of two from 4 to 32 KiB")
    if request.vsize_gb <= 0:
        raise UsageError(f"--vsize {request.vsize_gb}: must be a positive number of GB")
    validate_callback(request.callback_url, request.callback_secret_ref)
    return profiles


def validate_callback(url: str, secret_ref: str) -> None:
    """A completion callback is an absolute http(s) URL with a host and no credentials in it, signed
    with the key the workers hold under `secret_ref` (never sent in the request)."""
    if not url and not secret_ref:
        return
    if not url:
        raise UsageError("--callback-secret-ref without --callback-url: there is nothing to sign")
    validate_callback_url(url)
    if not secret_ref:
        raise UsageError("--callback-url needs --callback-secret-ref: callbacks are signed with a key the "
                         "workers hold under that name")
    if not SECRET_REF.fullmatch(secret_ref):
        raise UsageError(f"--callback-secret-ref {secret_ref[:130]!r}: a name of letters, digits, '.', '_', '-' "
                         "(at most 128), not the secret itself")


def validate_callback_url(url: str) -> None:
    """An absolute http(s) URL with a host and no user or password in it."""
    shown = url if len(url) <= 200 else url[:200] + "..."
    if len(url) > MAX_CALLBACK_URL or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise UsageError(f"--callback-url {shown!r}: not a URL (longer than {MAX_CALLBACK_URL} characters, "
                         "or has spaces or control characters)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise UsageError(f"--callback-url {shown!r}: not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"--callback-url {shown!r}: the scheme must be http or https, not "
                         f"{parts.scheme or 'missing'!r}")
    if not parts.hostname:
        raise UsageError(f"--callback-url {shown!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise UsageError("--callback-url: must not carry a user or password (user:password@host); the "
                         "receiver checks the HMAC signature made with the key named by --callback-secret-ref")
