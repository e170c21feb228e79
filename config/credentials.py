"""Registry credentials by reference: requests carry `access.credential_ref`, a worker resolves it
from its OWN configuration, so secrets never travel through the broker, the result backend or
Flower.

Sources, first match wins:
* environment `OBDCONV_CRED_<REF>` (REF upper-cased, every non-alphanumeric character -> `_`),
  value a JSON object `{"registry-host[:port]": "user:password", ...}`;
* the credentials file (settings.credentials_file), JSON
  `{"<ref>": {"registry-host[:port]": "user:password", ...}, ...}`, which must not be readable by
  group or others (mode 0600 or stricter), like ssh keys.
In both, a ref's value may also be a plain "user:password" string: the same login for every host.

An empty ref means anonymous access. A ref that is configured but has no entry for the host also
means anonymous for that host (a request may touch public and private registries).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from obdconv.errors import AuthError

ENV_PREFIX = "OBDCONV_CRED_"

HostAuth = dict[str, str]


def env_name(ref: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", ref).upper()


ANY_HOST = "*"


def _parse_host_map(where: str, data: object) -> HostAuth:
    if isinstance(data, str):
        return {ANY_HOST: data}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise AuthError(f"{where}: expected an object of registry host -> \"user:password\"")
    return dict(data)


def read_private_json(path: str | os.PathLike[str], what: str) -> object:
    """The JSON document in the secrets file `path` (None if it does not exist). Refuses a file
    others can read; errors name `what` and the path, never the content."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(f"{what} {p} has mode {stat.S_IMODE(st.st_mode):o}; it must be 0600 "
                        "(readable by its owner only)")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise AuthError(f"{what} {p} is not readable JSON: {type(e).__name__}") from None


def read_credentials_file(path: str | os.PathLike[str]) -> dict[str, HostAuth]:
    """All refs in the file; {} if it does not exist. Refuses a file others can read."""
    p = Path(path)
    data = read_private_json(p, "credentials file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AuthError(f"credentials file {p}: expected an object of ref -> hosts")
    return {ref: _parse_host_map(f"credentials file {p}, ref {ref!r}", v) for ref, v in data.items()}


def resolve_ref(ref: str, credentials_file: str | os.PathLike[str] | None,
                env: Mapping[str, str] | None = None) -> HostAuth:
    """Map of registry host -> "user:password" for `ref` ({} for the empty ref)."""
    if not ref:
        return {}
    env = os.environ if env is None else env
    raw = env.get(env_name(ref))
    if raw is not None:
        try:
            return _parse_host_map(f"${env_name(ref)}", json.loads(raw))
        except ValueError:
            raise AuthError(f"${env_name(ref)} is not JSON") from None
    if credentials_file:
        found = read_credentials_file(credentials_file)
        if ref in found:
            return found[ref]
    raise AuthError(f"credential reference {ref!r} is not configured on this worker "
                    f"(set ${env_name(ref)} or add it to the credentials file)")


def auth_for_host(ref: str, host: str, credentials_file: str | os.PathLike[str] | None,
                  env: Mapping[str, str] | None = None) -> str:
    """"user:password" for `host` under `ref`, or "" (anonymous)."""
    hosts = resolve_ref(ref, credentials_file, env)
    return hosts.get(host, hosts.get(ANY_HOST, ""))


def credentials_resolver_for(host: str, credentials_file: str | os.PathLike[str] | None,
                             env: Mapping[str, str] | None = None) -> Callable[[str], str | None]:
    """A resolver in the shape obdconv.registry.options.CredentialsResolver expects (ref ->
    "user:password"), bound to the registry `host` being opened."""

    def resolve(ref: str) -> str | None:
        return auth_for_host(ref, host, credentials_file, env)

    return resolve
