"""One signed completion-callback POST (the HTTP part of tasks/notify.py; no Celery here).

Wire format (documented for receivers in tasks/README.md):
* body: UTF-8 JSON, compact, keys sorted (what `summary_body` returns), `Content-Type: application/json`;
* `X-Obdconv-Timestamp`: Unix seconds when this attempt was sent;
* `X-Obdconv-Signature: sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>`;
* `X-Obdconv-Request-Id`, `X-Obdconv-Event: conversion.finished`, and `X-Obdconv-Delivery`
  (the same for every attempt of one notification, so a receiver can drop repeats).

Outbound hygiene (the URL comes from whoever submitted the request): connect and read timeouts;
redirects are followed only when 307/308 (the POST is repeated as is) to the same scheme, host
and port, at most 3; a 2xx answer's body is never read, another answer's at most 512 bytes (for
the error message); no .netrc or cookie is ever sent (proxies from the environment still apply).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

TIMESTAMP_HEADER = "X-Obdconv-Timestamp"
SIGNATURE_HEADER = "X-Obdconv-Signature"
REQUEST_ID_HEADER = "X-Obdconv-Request-Id"
EVENT_HEADER = "X-Obdconv-Event"
DELIVERY_HEADER = "X-Obdconv-Delivery"
EVENT = "conversion.finished"
MAX_REDIRECTS = 3
MAX_ERROR_BODY = 512
RETRYABLE_STATUSES = frozenset({408, 425, 429})  # and every 5xx


class CallbackError(Exception):
    """A POST that did not get a 2xx; `retryable` says whether trying again later may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def summary_body(summary: dict[str, Any]) -> bytes:
    """The exact bytes that are signed and sent."""
    return json.dumps(summary, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """The `X-Obdconv-Signature` value."""
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _where(url: str) -> str:
    """Scheme, host and port only: a URL's path or query may carry a token of the receiver's."""
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


def _reason(error: BaseException) -> str:
    """The socket-level cause of a requests/urllib3 connection error ("Connection refused"), without
    the URL the wrappers quote."""
    cause: BaseException = error
    for _ in range(6):
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException) and cause.args and isinstance(cause.args[0], BaseException):
            inner = cause.args[0]
        if not isinstance(inner, BaseException):
            break
        cause = inner
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(cause))
    return found.group(1).strip() if found else type(cause).__name__


def _error_text(response: requests.Response, deadline: float) -> str:
    data = b""
    for chunk in response.iter_content(chunk_size=128):
        data += chunk
        if len(data) >= MAX_ERROR_BODY or time.monotonic() > deadline:
            break
    text = data[:MAX_ERROR_BODY].decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def post_callback(url: str, body: bytes, key: bytes, *, request_id: str, delivery: str, timeout: float,
                  clock: Callable[[], float] = time.time) -> int:
    """POST `body` signed with `key`; returns the 2xx status, or raises CallbackError."""
    timestamp = str(int(clock()))
    headers = {
        "Content-Type": "application/json", "User-Agent": "obdconv-callback/1",
        TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(key, timestamp, body),
        REQUEST_ID_HEADER: request_id, EVENT_HEADER: EVENT, DELIVERY_HEADER: delivery,
    }
    session = requests.Session()
    session.trust_env = False  # never .netrc credentials; proxies are taken explicitly below
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = session.post(current, data=body, headers=headers, timeout=(timeout, timeout),
                                        allow_redirects=False, stream=True,
                                        proxies=requests.utils.get_environ_proxies(current))
            except requests.Timeout:
                raise CallbackError(f"{_where(current)}: no answer within {timeout:g}s", retryable=True) from None
            except requests.ConnectionError as e:
                raise CallbackError(f"cannot reach {_where(current)}: {_reason(e)}", retryable=True) from None
            except requests.RequestException as e:
                raise CallbackError(f"cannot POST to {_where(current)}: {type(e).__name__}: {e}",
                                    retryable=False) from None
            with response:
                code = response.status_code
                if 200 <= code < 300:
                    return code
                if response.is_redirect:
                    target = urljoin(current, response.headers.get("Location", ""))
                    if code in (307, 308) and _origin(target) == _origin(url):
                        current = target
                        continue
                    raise CallbackError(f"HTTP {code} from {_where(current)}: redirect to {_where(target)} not "
                                        "followed (only 307/308 to the same host)", retryable=False)
                text = _error_text(response, time.monotonic() + timeout)
                retryable = code >= 500 or code in RETRYABLE_STATUSES
                raise CallbackError(f"HTTP {code} from {_where(current)}" + (f": {text}" if text else ""),
                                    retryable=retryable)
        raise CallbackError(f"more than {MAX_REDIRECTS} redirects from {_where(url)}", retryable=False)
    finally:
        session.close()
