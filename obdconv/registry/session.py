"""The HTTP side of a registry connection: oras-py's `Registry` with obdconv's request loop (auth
challenges and token scopes, retries within a time budget, Retry-After, fast failure on a dead
registry, TLS trust errors named as such) and the small helpers reading registry error answers.
`RegistryRepository` (client.py) builds the registry API on top of it."""

from __future__ import annotations

import email.utils
import json
import logging
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

import oras.provider
import requests
from requests.adapters import HTTPAdapter

from obdconv.errors import AuthError, BadInputError, NetworkError, NotFoundError, UsageError
from obdconv.registry.auth import (
    Authenticator,
    Credentials,
    ScopeAtom,
    docker_config_credentials,
    docker_config_path,
    format_scopes,
    repository_scope,
)
from obdconv.registry.options import RegistryOptions
from obdconv.registry.reference import DOCKER_HUB_HOST
from obdconv.registry.tls import build_ssl_context

log = logging.getLogger(__name__)

DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
POOL_SIZE = 32  # connections kept per host (the reference convertor's MaxConnsPerHost)
_REPOSITORY_PATH_MARKERS = ("/manifests/", "/blobs/", "/tags/")
# OpenSSL reasons that mean "not trusted" (by us or by the server), as opposed to a broken connection.
_TLS_TRUST_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA",
                       "certificate required", "bad certificate")


class TLSAdapter(HTTPAdapter):
    """requests takes a CA bundle path, not an SSLContext; this adapter hands our context (system CAs +
    extra CAs + client cert) to urllib3's pool manager."""

    def __init__(self, ssl_context: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(pool_connections=4, pool_maxsize=POOL_SIZE)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)


def registry_error_text(response: requests.Response) -> str:
    """ "CODE: message" from a distribution error body, else the HTTP reason."""
    try:
        errors = json.loads(response.content[:65536]).get("errors") or []
        parts: list[str] = []
        for e in errors:
            if not isinstance(e, dict):
                continue
            detail = e.get("detail")
            text = f"{e.get('code', '?')}: {e.get('message', '')}" + (f" ({detail})" if isinstance(detail, str) else "")
            if text not in parts:
                parts.append(text)
        if parts:
            return "; ".join(parts[:5])
    except (ValueError, RecursionError, AttributeError, requests.RequestException):
        pass
    return f"{response.status_code} {response.reason or ''}".strip()


def retry_after_seconds(response: requests.Response) -> float:
    """The wait a Retry-After header asks for (seconds or an HTTP date), 0 without one."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return 0.0
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


def scopes_for(method: str, url: str) -> set[ScopeAtom]:
    """The scope a request needs, inferred from its /v2/<name>/... path (a 401 challenge may add more)."""
    path = urllib.parse.urlparse(url).path
    if not path.startswith("/v2/"):
        return set()
    rest = path[len("/v2/"):]
    cut = min((i for i in (rest.rfind(m) for m in _REPOSITORY_PATH_MARKERS) if i >= 0), default=-1)
    if cut < 0:
        return set()
    name = rest[:cut]
    if method in ("GET", "HEAD"):
        return repository_scope(name, "pull")
    if method == "DELETE":
        return repository_scope(name, "delete")
    return repository_scope(name, "pull", "push")


class ObdRegistry(oras.provider.Registry):
    """oras' `Registry` with a request loop that fits a converter fleet.

    Gaps in oras' `do_request` it replaces: its `@retry` sleeps 2+3**n seconds five times (~2 minutes against
    a registry that is down) and retries 4xx answers too; its auth keeps one token and answers only one 401;
    it has no timeouts; its session honours proxy variables and ~/.netrc.
    """

    def __init__(self, host: str, options: RegistryOptions) -> None:
        endpoint = DOCKER_HUB_ENDPOINT if host == DOCKER_HUB_HOST else host
        # auth_backend="basic": oras' backend is never consulted (see `do_request`); "basic" is the one
        # whose constructor has no side effects beyond reading ORAS_USER/ORAS_PASS.
        super().__init__(hostname=endpoint, insecure=options.plain, tls_verify=not options.insecure,
                         auth_backend="basic")
        self.host = host
        self.options = options
        # Proxy variables and ~/.netrc must not redirect traffic or inject credentials (the reference
        # convertor's Go transport ignores proxies too).
        self.session.trust_env = False
        # requests overrides the SSLContext's verify mode from `verify`, so --insecure must be set here too.
        self.session.verify = not options.insecure
        if options.plain:
            # requests' default pool keeps 10 connections; pipeline threads share one repository.
            self.session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE))
        else:
            self.session.mount("https://", TLSAdapter(build_ssl_context(options)))
        self._timeout = (options.connect_timeout, options.read_timeout)
        credentials: Credentials | None = None
        if options.username:
            credentials = Credentials(options.username, options.password)
        else:
            found = docker_config_credentials(host, docker_config_path(options.docker_config))
            if found is not None:
                credentials = Credentials(*found)
        self.authenticator = Authenticator(host, self.session, credentials, self._timeout)

    def __str__(self) -> str:
        return f"[obdconv-registry {self.host}]"

    def do_request(  # type: ignore[override]
        self,
        url: str,
        method: str = "GET",
        data: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        stream: bool = False,
        *,
        scopes: set[ScopeAtom] | None = None,
        retry: bool = True,
    ) -> requests.Response:
        """One request: auth challenges answered, transient failures retried within the budget.

        Returns any response that is not 401/403/5xx (the caller interprets 404 etc.); raises AuthError or
        NetworkError naming the registry and the request. Only bytes bodies are resent (retries, auth).
        """
        wanted = scopes if scopes is not None else scopes_for(method, url)
        deadline: float | None = None  # the budget runs from the first failure (a timeout may outlast it)
        attempt = 0
        auth_rounds = 0
        auth_override: dict[str, str] | None = None
        path = urllib.parse.urlparse(url).path
        # A streamed body (an iterator) is consumed by the first attempt and cannot be sent again.
        replayable = data is None or isinstance(data, bytes | bytearray)
        retry = retry and replayable
        while True:
            request_headers = dict(headers or {})
            request_headers.update(auth_override if auth_override is not None
                                   else self.authenticator.headers_for(wanted))
            failure: str
            wait_asked = 0.0  # Retry-After of a 429/503
            try:
                response = self.session.request(method, url, data=data, json=json, headers=request_headers,
                                                stream=stream, timeout=self._timeout)
            except requests.exceptions.SSLError as e:
                if any(marker in str(e) for marker in _TLS_TRUST_FAILURES):
                    # Retrying cannot fix trust: the CA or client certificate flags are wrong.
                    raise UsageError(f"registry {self.host}: TLS verification failed on {method} {path} "
                                     f"(check --root-ca, --cert-dir, --client-cert or --insecure): {e}") from None
                failure = f"TLS error: {e}"
            except (requests.ConnectionError, requests.Timeout) as e:
                failure = f"{type(e).__name__}: {e}"
            else:
                status = response.status_code
                if status in (401, 403):
                    if auth_rounds < 2 and replayable and "WWW-Authenticate" in response.headers:
                        response.close()
                        auth_override = self.authenticator.respond(response, wanted)
                        auth_rounds += 1
                        continue
                    scope_text = " ".join(format_scopes(wanted)) or "registry access"
                    text = registry_error_text(response)
                    response.close()
                    raise AuthError(f"registry {self.host} denied {method} {path} (scope {scope_text}): {text}")
                if status < 500 and status != 429:
                    return response
                failure = f"{status} {registry_error_text(response)}"
                wait_asked = retry_after_seconds(response)
                response.close()
            if deadline is None:
                deadline = time.monotonic() + self.options.retry_budget
            remaining = deadline - time.monotonic()
            if not retry or remaining <= 0:
                raise NetworkError(f"registry {self.host}: {method} {path} failed: {failure}")
            if wait_asked > remaining:
                # Waiting less than asked would only be refused again.
                raise NetworkError(f"registry {self.host}: {method} {path} failed: {failure}; it asks to retry "
                                   f"after {wait_asked:g} s, beyond the {self.options.retry_budget:g} s retry budget")
            delay = min(max(0.1 * (2 ** attempt), wait_asked), remaining)
            log.info("registry %s: %s %s failed (%s); retrying in %.1fs", self.host, method, path, failure, delay)
            time.sleep(delay)
            attempt += 1

    def _check_200_response(self, response: requests.Response) -> None:
        """Used by oras' tag pagination: map failures to obdconv errors instead of ValueError."""
        path = urllib.parse.urlparse(response.request.url or "").path
        if response.status_code == 404:
            raise NotFoundError(f"registry {self.host}: {path}: {registry_error_text(response)}")
        if response.status_code != 200:
            raise BadInputError(f"registry {self.host}: unexpected {registry_error_text(response)}")
