"""The error classes every obdconv module raises, and the CLI exit code of each.

Callers (the CLI, the Celery tasks) classify failures by class only: bad input is never retried,
network trouble is, and each maps to a distinct exit code.
"""

from __future__ import annotations


class ObdconvError(Exception):
    """Base class. `exit_code` is what `obdconv` exits with when this reaches the top."""

    exit_code = 70  # EX_SOFTWARE: an internal error
    retryable = False


class BadInputError(ObdconvError):
    """The input (image, layer, tar, flag) is wrong; retrying will not help."""

    exit_code = 65  # EX_DATAERR


class FormatError(BadInputError):
    """A blob or file does not follow the byte format it claims (bad magic, CRC, bounds, ...)."""


class IntegrityError(BadInputError):
    """Content does not match its digest."""


class UnsafePathError(BadInputError):
    """A tar entry tries to escape the root or has an unsupported type."""


class UnsupportedError(BadInputError):
    """A valid request this implementation does not support (e.g. `--fstype erofs`)."""

    exit_code = 69  # EX_UNAVAILABLE


class UsageError(BadInputError):
    """Wrong command-line flags."""

    exit_code = 64  # EX_USAGE


class NotFoundError(BadInputError):
    """A reference, blob or row does not exist."""

    exit_code = 66  # EX_NOINPUT


class AuthError(ObdconvError):
    """401/403 from a registry, naming registry and scope (never the secret)."""

    exit_code = 77  # EX_NOPERM


class NetworkError(ObdconvError):
    """Connection refused, timeout, 5xx: transient, retried with backoff within a budget."""

    exit_code = 75  # EX_TEMPFAIL
    retryable = True


class DatabaseError(ObdconvError):
    """The dedup database is unreachable or failed."""

    exit_code = 75
    retryable = True


class PartialResultError(ObdconvError):
    """A request delivered some of its output formats and not others, each missing one named with
    its own error in the result (e.g. turboOCI refused for a zstd layer while overlaybd was built).
    Raised by no stage: it gives `obdconv convert` (and `submit --wait`, `wait` on a PARTIAL
    request) its exit code, so a caller checking only the code cannot take a partial result for a
    whole one. `--all-or-nothing` turns such a request into a failure instead."""

    exit_code = 79  # obdconv's own, just past the sysexits range (64-78): partial result
