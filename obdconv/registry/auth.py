"""Registry authentication: anonymous, Basic, and Bearer tokens per scope, with credentials from
`-u` or Docker's config.json.

Why not oras' auth backends: `TokenAuth` keeps a single token (so the first push after a pull fails with
401 insufficient_scope until a new token is fetched, which it does not do for 401), `BasicAuth` must be
chosen up front, and both parse only realm/service/scope from the challenge (not `error`). This module
keeps a token per scope set, re-requests one with the scope named by an insufficient_scope challenge, and
picks Basic or Bearer from the challenge itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import oras.auth.utils
import oras.utils
import requests

from obdconv.errors import AuthError, NetworkError

log = logging.getLogger(__name__)

# (resource, action), e.g. ("repository:library/redis", "pull")
ScopeAtom = tuple[str, str]

_CHALLENGE_TOKEN = re.compile(r'\s*([A-Za-z0-9_.!#$%&\'*+^`|~-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?\s*,?')
TOKEN_EXPIRY_MARGIN = 10.0  # seconds before `expires_in` at which a cached token is no longer used
DEFAULT_TOKEN_LIFETIME = 60.0  # distribution's token spec: assume 60 s when `expires_in` is absent


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercase: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate header (possibly several challenges) into scheme + parameters."""
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        match = _CHALLENGE_TOKEN.match(header, position)
        if not match or match.end() == position:
            break
        position = match.end()
        name, value = match.group(1), match.group(2)
        if value is None:
            # A bare token starts a new challenge ("Bearer realm=..., Basic realm=...").
            challenges.append(Challenge(name.lower(), {}))
            continue
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if challenges:
            challenges[-1].params[name.lower()] = value
    return challenges


def challenges_from(response: requests.Response) -> list[Challenge]:
    return parse_challenges(response.headers.get("WWW-Authenticate", ""))


def parse_scope(scope: str) -> set[ScopeAtom]:
    """ "repository:a/b:pull,push repository:c:pull" -> {(repository:a/b, pull), ...} """
    atoms: set[ScopeAtom] = set()
    for item in scope.split():
        resource, sep, actions = item.rpartition(":")
        if not sep:
            continue
        atoms.update((resource, action) for action in actions.split(",") if action)
    return atoms


def format_scopes(atoms: Iterable[ScopeAtom]) -> list[str]:
    """Group atoms back into one scope string per resource, sorted so cache keys are stable."""
    by_resource: dict[str, set[str]] = {}
    for resource, action in atoms:
        by_resource.setdefault(resource, set()).add(action)
    return [f"{resource}:{','.join(sorted(actions))}" for resource, actions in sorted(by_resource.items())]


def repository_scope(repository: str, *actions: str) -> set[ScopeAtom]:
    return {(f"repository:{repository}", action) for action in actions}


def _config_key_host(key: str) -> str:
    """config.json keys may be "host", "https://host" or "https://index.docker.io/v1/"."""
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def docker_config_path(explicit: str | None) -> Path | None:
    if explicit is not None:
        return Path(explicit) if explicit else None
    base = os.environ.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    default = oras.utils.find_docker_config(exists=False)
    return Path(default) if default else None


def docker_config_credentials(host: str, config_path: Path | None) -> tuple[str, str] | None:
    """(user, password) from `auths[host].auth` (base64 "user:password") of a Docker config.json."""
    if config_path is None or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        log.warning("cannot read Docker config %s: %s", config_path, type(e).__name__)
        return None
    wanted = set(oras.utils.iter_localhosts(host))
    if host == "docker.io":
        wanted |= {"index.docker.io", "registry-1.docker.io"}
    for key, entry in (config.get("auths") or {}).items():
        if _config_key_host(key) not in wanted or not isinstance(entry, dict) or not entry.get("auth"):
            continue
        try:
            decoded = base64.b64decode(entry["auth"]).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            log.warning("Docker config %s: auth entry for %s is not base64 user:password", config_path, key)
            return None
        user, sep, password = decoded.partition(":")
        if sep and user:
            return user, password
    return None


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    expires_at: float


class Credentials:
    """A user and password that never show in repr or str."""

    __slots__ = ("_password", "username")

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password

    def basic_header(self) -> str:
        return "Basic " + oras.auth.utils.get_basic_auth(self.username, self._password)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***)"

    __str__ = __repr__


class Authenticator:
    """Per-host auth state: which scheme the registry wants, and bearer tokens cached per scope set."""

    def __init__(self, host: str, session: requests.Session, credentials: Credentials | None,
                 timeout: tuple[float, float]) -> None:
        self.host = host
        self._session = session
        self._credentials = credentials
        self._timeout = timeout
        self._lock = threading.Lock()
        self._basic = False  # the registry asked for Basic once: send it up front from now on
        self._bearer: Challenge | None = None  # the last Bearer challenge (realm, service)
        self._tokens: dict[frozenset[ScopeAtom], _Token] = {}

    def headers_for(self, wanted: set[ScopeAtom]) -> dict[str, str]:
        """The Authorization header to send up front, if we already know one that should work."""
        if self._basic and self._credentials is not None:
            return {"Authorization": self._credentials.basic_header()}
        now = time.monotonic()
        with self._lock:
            for scopes, token in self._tokens.items():
                if token.expires_at > now and wanted <= scopes:
                    return {"Authorization": f"Bearer {token.value}"}
        return {}

    def respond(self, response: requests.Response, wanted: set[ScopeAtom]) -> dict[str, str]:
        """Headers answering a 401 challenge; AuthError if nothing we have can answer it."""
        challenges = challenges_from(response)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            scopes = frozenset(wanted | parse_scope(bearer.params.get("scope", "")))
            token = self._fetch_token(bearer, scopes)
            return {"Authorization": f"Bearer {token}"}
        if any(c.scheme == "basic" for c in challenges):
            if self._credentials is None:
                raise AuthError(f"registry {self.host} requires credentials (basic auth) for "
                                f"{' '.join(format_scopes(wanted)) or 'this request'}")
            self._basic = True
            return {"Authorization": self._credentials.basic_header()}
        raise AuthError(f"registry {self.host} refused access ({response.status_code}) without a usable "
                        f"challenge for {' '.join(format_scopes(wanted)) or 'this request'}")

    def _fetch_token(self, challenge: Challenge, scopes: frozenset[ScopeAtom]) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"registry {self.host} sent a Bearer challenge without a realm")
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        scope_strings = format_scopes(scopes)
        params.extend(("scope", s) for s in scope_strings)
        headers = {}
        if self._credentials is not None:
            headers["Authorization"] = self._credentials.basic_header()
        try:
            reply = self._session.get(realm, params=params, headers=headers, timeout=self._timeout)
        except requests.RequestException as e:
            raise NetworkError(f"token server {realm} for registry {self.host} unreachable: "
                               f"{type(e).__name__}") from None
        scope_text = " ".join(scope_strings) or "(no scope)"
        if reply.status_code in (401, 403):
            who = f"user {self._credentials.username!r}" if self._credentials else "anonymous"
            raise AuthError(f"token server {realm} refused {who} for registry {self.host} scope {scope_text} "
                            f"({reply.status_code})")
        if reply.status_code >= 500:
            raise NetworkError(f"token server {realm} for registry {self.host} failed ({reply.status_code})")
        if reply.status_code != 200:
            raise AuthError(f"token server {realm} answered {reply.status_code} for registry {self.host} "
                            f"scope {scope_text}")
        try:
            body = reply.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            value, lifetime = None, 0.0
        if not value:
            raise AuthError(f"token server {realm} for registry {self.host} returned no token")
        with self._lock:
            self._tokens[scopes] = _Token(value, time.monotonic() + max(lifetime - TOKEN_EXPIRY_MARGIN, 1.0))
        self._bearer = challenge
        log.debug("registry %s: token for %s", self.host, scope_text)
        return value

    def __repr__(self) -> str:
        return f"Authenticator(host={self.host!r}, credentials={self._credentials!r})"
