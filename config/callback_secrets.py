"""HMAC keys of completion callbacks, by reference: a request names its key with
`callback_secret_ref`; the worker that sends the callback resolves it from its OWN configuration,
so the key never travels through the broker, the result backend, Flower, logs or the status table.

Sources, first match wins (the same scheme as registry credentials, config/credentials.py):
* environment `OBDCONV_CALLBACK_SECRET_<REF>` (REF upper-cased, every non-alphanumeric character
  -> `_`), value the key itself;
* the callback secrets file (settings.callback_secrets_file), JSON `{"<ref>": "<key>", ...}`, which
  must not be readable by group or others (mode 0600 or stricter).
Keys are used as their UTF-8 bytes; at least 16 characters (a short key is refused: it would make
a signature anyone could forge by guessing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from config.credentials import read_private_json
from obdconv.errors import AuthError

ENV_PREFIX = "OBDCONV_CALLBACK_SECRET_"
MIN_KEY_LENGTH = 16


def env_name(ref: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", ref).upper()


def resolve_callback_secret(ref: str, secrets_file: str | os.PathLike[str] | None,
                            env: Mapping[str, str] | None = None) -> bytes:
    """The key named `ref`, or AuthError naming where it was looked for (never any key)."""
    env = os.environ if env is None else env
    key = env.get(env_name(ref))
    where = f"${env_name(ref)}"
    if key is None and secrets_file:
        data = read_private_json(secrets_file, "callback secrets file")
        if data is not None and not isinstance(data, dict):
            raise AuthError(f"callback secrets file {secrets_file}: expected an object of ref -> key")
        key = (data or {}).get(ref)
        where = f"callback secrets file {secrets_file}, ref {ref!r}"
        if key is not None and not isinstance(key, str):
            raise AuthError(f"{where}: the key must be a string")
    if key is None:
        raise AuthError(f"callback secret reference {ref!r} is not configured on this worker "
                        f"(set ${env_name(ref)} or add it to the callback secrets file)")
    if len(key) < MIN_KEY_LENGTH:
        raise AuthError(f"{where}: the key is shorter than {MIN_KEY_LENGTH} characters")
    return key.encode()
