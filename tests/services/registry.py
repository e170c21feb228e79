"""Real docker-registry (distribution v2, Debian's /usr/bin/docker-registry) on 127.0.0.1 for tests.

`start_registry(workdir)` starts a plain-HTTP registry with filesystem storage and deletes enabled.
Variants: `auth="htpasswd"` (basic auth from `htpasswd -Bbn`), `auth=TokenAuthConfig` (bearer tokens
from tests/services/token_server.py), `tls=make_tls(dir)` (a self-signed CA made with openssl; with
`client_ca=True` the registry also demands a client certificate signed by that CA), `notifications=`
the registry's `notifications` block (endpoints it POSTs its events to, e.g. the HTTP API's).
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.services.base import LOCAL, ManagedProcess, Place, ServiceError, free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"

# Basic-auth test account for the htpasswd variant; the password has a colon on purpose (`-u` splits at the
# first ':' only) and characters that would show up if leaked.
BASIC_USER = "alice"
BASIC_PASSWORD = "s3cr3t:Pa55-w0rd!"


@dataclass(frozen=True)
class TLSMaterial:
    """PEM files made by openssl: a CA, a server cert for 127.0.0.1/localhost, a client cert; all signed by the CA."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class TokenAuthConfig:
    """What the registry needs to trust a token server: its realm URL, service, issuer and signing cert."""

    realm: str
    service: str
    issuer: str
    signing_cert: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"openssl {' '.join(args[:2])} failed: {result.stderr[-1000:]}")


def make_tls(directory: Path) -> TLSMaterial:
    """Create a throwaway CA and a server + client certificate with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
             "-subj", "/CN=obdconv test CA", "-keyout", "ca.key", "-out", "ca.crt",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    # Go (distribution) ignores the CN: the server name must be in subjectAltName.
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n")
    (directory / "client.ext").write_text(
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n")
    for who, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=obdconv test client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{who}.key",
                 "-out", f"{who}.csr", cwd=directory)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "3", "-sha256", "-extfile", f"{who}.ext", "-out", f"{who}.crt", cwd=directory)
    return TLSMaterial(directory, directory / "ca.crt", directory / "server.crt", directory / "server.key",
                       directory / "client.crt", directory / "client.key")


def make_signing_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed RSA certificate + key the token server signs JWTs with (registry: rootcertbundle)."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
             "-subj", "/CN=obdconv test token issuer", "-keyout", "token.key", "-out", "token.crt", cwd=directory)
    return directory / "token.crt", directory / "token.key"


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    lines = []
    for user, password in users.items():
        result = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True)
        lines.append(result.stdout.strip())
    path.write_text("\n".join(lines) + "\n")


class RegistryService:
    """A running docker-registry. `.url` ("http://127.0.0.1:PORT" or https), `.host` ("127.0.0.1:PORT")."""

    def __init__(self, process: ManagedProcess, port: int, storage_dir: Path, scheme: str,
                 tls: TLSMaterial | None, address: str = "127.0.0.1") -> None:
        self.process = process
        self.port = port
        self.storage_dir = storage_dir
        self.scheme = scheme
        self.tls = tls
        self.address = address

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def blob_data_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (tests corrupt it on purpose)."""
        algorithm, hexdigest = digest.split(":", 1)
        return (self.storage_dir / "docker" / "registry" / "v2" / "blobs" / algorithm / hexdigest[:2]
                / hexdigest / "data")

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> RegistryService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready_check(url: str, tls: TLSMaterial | None, client_ca: bool):
    context: ssl.SSLContext | None = None
    if tls is not None:
        context = ssl.create_default_context(cafile=str(tls.ca_cert))
        if client_ca:
            context.load_cert_chain(str(tls.client_cert), str(tls.client_key))

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=1, context=context) as response:
                return response.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, and asking for credentials
        except OSError:
            return False

    return ready


def start_registry(
    workdir: Path,
    auth: str | TokenAuthConfig | None = None,
    tls: TLSMaterial | None = None,
    client_ca: bool = False,
    name: str = "registry",
    port: int | None = None,
    notifications: dict[str, object] | None = None,
    place: Place = LOCAL,
    data_dir: str = "",
) -> RegistryService:
    """Write a config YAML into `workdir`, start docker-registry on a free port, wait for GET /v2/.
    `place`: another host (tests/services/netns.py; plain HTTP, no auth), its files in `data_dir` there."""
    if shutil.which(REGISTRY_BINARY) is None:
        raise ServiceError(f"{REGISTRY_BINARY} not installed (Debian package docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = workdir
    if place is not LOCAL:
        if auth is not None or tls is not None:
            raise ServiceError("a registry on a netns host is plain HTTP without auth here")
        workdir = Path(data_dir or "/var/lib/registry-test")
    port = port or (free_port() if place is LOCAL else 5000)
    storage_dir = workdir / "storage"
    if place is LOCAL:
        storage_dir.mkdir(exist_ok=True)
    http: dict[str, object] = {"addr": f"{place.address}:{port}", "secret": "obdconv-test-secret"}
    if tls is not None:
        http["tls"] = {"certificate": str(tls.server_cert), "key": str(tls.server_key)}
        if client_ca:
            http["tls"]["clientcas"] = [str(tls.ca_cert)]  # type: ignore[index]
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
            # No background purge of upload sessions while tests run.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http,
    }
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        write_htpasswd(htpasswd, {BASIC_USER: BASIC_PASSWORD})
        config["auth"] = {"htpasswd": {"realm": "obdconv-test", "path": str(htpasswd)}}
    elif isinstance(auth, TokenAuthConfig):
        config["auth"] = {"token": {"realm": auth.realm, "service": auth.service, "issuer": auth.issuer,
                                    "rootcertbundle": str(auth.signing_cert)}}
    elif auth is not None:
        raise ValueError(f"unknown registry auth mode {auth!r}")
    if notifications is not None:
        config["notifications"] = notifications
    # YAML is a superset of JSON, so the config is written as JSON (no YAML library needed).
    config_path = workdir / "config.yml"
    place.write_file(str(config_path), json.dumps(config, indent=2).encode())
    scheme = "https" if tls is not None else "http"
    url = f"{scheme}://{place.address}:{port}"
    # REGISTRY_* variables in the environment would override the config file: blank the usual ones.
    env = {"REGISTRY_HTTP_ADDR": f"{place.address}:{port}", "OTEL_TRACES_EXPORTER": "none"}
    ready = _ready_check(url, tls, client_ca) if place is LOCAL else _ready_at(place, url)
    logs = workdir if place is LOCAL else log_dir
    process = ManagedProcess(name, place.command([REGISTRY_BINARY, "serve", str(config_path)]), logs,
                             ready=ready, env=env, timeout=30.0)
    process.start()
    return RegistryService(process, port, storage_dir, scheme, tls, place.address)


def _ready_at(place: Place, url: str) -> Callable[[], bool]:
    def ready() -> bool:
        result = place.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url + "/v2/"], check=False)
        return result.stdout == b"200"

    return ready
