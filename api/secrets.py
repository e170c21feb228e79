"""The secrets registry event senders authenticate with (settings `api_event_secrets_file`).

    # mode 0600
    distribution = "Bearer 0d1f..."     # the value of the header `api_distribution_header` (default
                                        # Authorization) that the registry's `notifications` endpoint sends
    harbor = "Bearer 9a7c..."           # Harbor's webhook "Auth Header" (sent as Authorization)

Each value is compared with the whole header value, in constant time. A sender with no secret
configured is refused (its endpoint answers 404): events are never taken unauthenticated.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.files import WatchedToml, require_private
from obdconv.errors import UsageError

SENDERS = ("distribution", "harbor")
MIN_SECRET_LENGTH = 16


@dataclass(frozen=True)
class EventSecrets:
    secrets: dict[str, str]

    def configured(self, sender: str) -> bool:
        return bool(self.secrets.get(sender))

    def matches(self, sender: str, presented: str | None) -> bool:
        expected = self.secrets.get(sender, "")
        if not expected or presented is None:
            return False
        return hmac.compare_digest(expected.encode(), presented.encode())


def parse_secrets(data: dict[str, Any], path: Path, mode: int) -> EventSecrets:
    require_private(path, mode, "event secrets file")
    unknown = set(data) - set(SENDERS)
    if unknown:
        raise UsageError(f"event secrets file {path}: unknown key(s) {sorted(unknown)}; expected {list(SENDERS)}")
    for sender, value in data.items():
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
            raise UsageError(f"event secrets file {path}: `{sender}` must be a string of at least "
                             f"{MIN_SECRET_LENGTH} characters")
    return EventSecrets(dict(data))


def secrets_file(path: str) -> WatchedToml[EventSecrets]:
    return WatchedToml(path, parse_secrets, EventSecrets({}), "event secrets file")
