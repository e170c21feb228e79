"""Fixtures for the registry tests: real docker-registry processes (plain, htpasswd, TLS, mutual TLS,
token auth with tests/services/token_server.py), each started once per session and stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services.registry import (
    RegistryService,
    TLSMaterial,
    TokenAuthConfig,
    make_tls,
    start_registry,
)
from tests.services.token_server import TokenServer, start_token_server

HELLO_WORLD = "hello-world"
TOKEN_USER = "tokenuser"
TOKEN_PASSWORD = "t0ken:pass-Word%"


@pytest.fixture(scope="session")
def hello_world_layout(fixtures_dir: Path) -> Path:
    return fixtures_dir / "oci" / HELLO_WORLD


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryService]:
    workdir = tmp_path_factory.mktemp("basic-registry")
    with start_registry(workdir, auth="htpasswd", name="registry-basic") as service:
        yield service


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory, tls_material: TLSMaterial) -> Iterator[RegistryService]:
    with start_registry(tmp_path_factory.mktemp("tls-registry"), tls=tls_material, name="registry-tls") as service:
        yield service


@pytest.fixture(scope="session")
def mtls_registry(tmp_path_factory: pytest.TempPathFactory, tls_material: TLSMaterial) -> Iterator[RegistryService]:
    workdir = tmp_path_factory.mktemp("mtls-registry")
    with start_registry(workdir, tls=tls_material, client_ca=True, name="registry-mtls") as service:
        yield service


@dataclass
class TokenSetup:
    registry: RegistryService
    token_server: TokenServer


@pytest.fixture(scope="session")
def token_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenSetup]:
    """Token auth. ACL: TOKEN_USER may pull+push+delete in team/*, only pull in shared/*; anonymous may
    pull public/*; nobody gets secret/*."""
    acl = [
        {"account": TOKEN_USER, "repository": "team/*", "actions": ["pull", "push", "delete"]},
        {"account": TOKEN_USER, "repository": "shared/*", "actions": ["pull"]},
        {"account": "", "repository": "public/*", "actions": ["pull"]},
        {"account": "*", "repository": "public/*", "actions": ["pull", "push"]},
    ]
    workdir = tmp_path_factory.mktemp("token")
    token_server = start_token_server(workdir / "server", {TOKEN_USER: TOKEN_PASSWORD}, acl)
    try:
        auth = TokenAuthConfig(token_server.realm, token_server.config["service"], token_server.config["issuer"],
                               Path(token_server.config["cert"]))
        with start_registry(workdir / "registry", auth=auth, name="registry-token") as service:
            yield TokenSetup(service, token_server)
    finally:
        token_server.stop()
