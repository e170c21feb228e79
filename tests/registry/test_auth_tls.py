"""Basic auth (htpasswd), bearer tokens (token server), Docker config fallback, TLS and mutual TLS,
against real docker-registry processes. Secrets must never show in errors, reprs or logs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from obdconv.errors import AuthError, UsageError
from obdconv.registry import RegistryOptions, open_repository
from obdconv.registry.copy import copy_image
from tests.registry.conftest import TOKEN_PASSWORD, TOKEN_USER, TokenSetup
from tests.services.registry import BASIC_PASSWORD, BASIC_USER, RegistryService, TLSMaterial


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's included


def _assert_secret_absent(secret: str, *texts: str) -> None:
    encoded = base64.b64encode(secret.encode()).decode()
    for text in texts:
        assert secret not in text
        assert encoded not in text


def _blob() -> tuple[bytes, str]:
    data = os.urandom(20_000)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


# ---- basic auth ------------------------------------------------------------------------------------------

def test_basic_auth_push_and_pull(basic_registry: RegistryService, hello_world_layout: Path) -> None:
    options = RegistryOptions.from_flags(f"{BASIC_USER}:{BASIC_PASSWORD}", plain=True)  # password has a ':'
    repo = open_repository(f"{basic_registry.host}/basic/hello", options)
    source = open_repository(f"oci:{hello_world_layout}")
    manifest = copy_image(source, repo, "amd64")
    assert repo.get_manifest("amd64") == manifest
    assert repo.list_tags() == ["amd64"]
    _assert_secret_absent(BASIC_PASSWORD, repr(repo), repr(options))


def test_basic_auth_wrong_password(basic_registry: RegistryService, caplog: pytest.LogCaptureFixture) -> None:
    secret = "wrong-Secret-123"
    repo = open_repository(f"{basic_registry.host}/basic/hello",
                           RegistryOptions(plain=True, username=BASIC_USER, password=secret))
    with pytest.raises(AuthError) as info:
        repo.get_manifest("amd64")
    message = str(info.value)
    assert basic_registry.host in message and "repository:basic/hello:pull" in message
    _assert_secret_absent(secret, message, repr(info.value), caplog.text, repr(repo))


def test_basic_auth_without_credentials(basic_registry: RegistryService) -> None:
    repo = open_repository(f"{basic_registry.host}/basic/hello", RegistryOptions(plain=True, docker_config=""))
    with pytest.raises(AuthError, match="requires credentials"):
        repo.list_tags()


def test_docker_config_fallback(basic_registry: RegistryService, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.json"
    auth = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {f"http://{basic_registry.host}": {"auth": auth}}}))
    repo = open_repository(f"{basic_registry.host}/basic/config",
                           RegistryOptions(plain=True, docker_config=str(config)))
    data, digest = _blob()
    assert repo.upload_blob([data]) == (digest, len(data))
    assert repo.read_blob(digest) == data
    _assert_secret_absent(BASIC_PASSWORD, caplog.text, repr(repo))


# ---- token auth ------------------------------------------------------------------------------------------

def _token_repo(setup: TokenSetup, name: str, password: str | None = TOKEN_PASSWORD):
    options = RegistryOptions(plain=True, docker_config="")
    if password is not None:
        options = RegistryOptions(plain=True, username=TOKEN_USER, password=password, docker_config="")
    return open_repository(f"{setup.registry.host}/{name}", options)


def test_token_pull_then_push_gets_a_new_scope(token_setup: TokenSetup, hello_world_layout: Path) -> None:
    source = open_repository(f"oci:{hello_world_layout}")
    seed = _token_repo(token_setup, "team/app")
    manifest = copy_image(source, seed, "amd64")
    repo = _token_repo(token_setup, "team/app")  # fresh client: first a pull ...
    assert repo.get_manifest("amd64") == manifest
    grants_before = len(token_setup.token_server.grants_logged())
    data, digest = _blob()
    repo.push_blob(io.BytesIO(data), digest, len(data))  # ... then a push on the same client
    assert repo.read_blob(digest) == data
    new_grants = token_setup.token_server.grants_logged()[grants_before:]
    assert any("repository:team/app:pull,push" in line and '"push"' in line for line in new_grants)


def test_token_insufficient_scope_is_refreshed(token_setup: TokenSetup) -> None:
    """Cancelling an upload session needs `delete` on distribution; the client holds a pull,push token,
    gets 401 insufficient_scope, asks for the challenged scope and succeeds."""
    repo = _token_repo(token_setup, "team/scopes")
    absent = "sha256:" + hashlib.sha256(b"absent").hexdigest()
    assert repo.mount_blob(absent, "team/app") is False  # 202 -> DELETE of the session
    log = token_setup.registry.process.log_path.read_text()
    cancels = [line for line in log.splitlines() if '"DELETE /v2/team/scopes/blobs/uploads/' in line]
    assert [line for line in cancels if '" 401 ' in line] and [line for line in cancels if '" 204 ' in line]
    assert "insufficient scope" in log
    assert any("delete" in line and "team/scopes" in line for line in token_setup.token_server.grants_logged())


def test_token_mounts(token_setup: TokenSetup) -> None:
    source = _token_repo(token_setup, "team/mount-src")
    data, digest = _blob()
    source.upload_blob([data])
    target = _token_repo(token_setup, "team/mount-dst")
    assert target.mount_blob(digest, "team/mount-src") is True
    assert target.head_blob(digest) == len(data)
    # No pull granted on secret/*: not mounted, and the upload fallback works.
    fallback = _token_repo(token_setup, "team/mount-fallback")
    assert fallback.mount_blob(digest, "secret/vault") is False
    fallback.push_blob(io.BytesIO(data), digest, len(data))
    assert fallback.read_blob(digest) == data


def test_token_anonymous_pull(token_setup: TokenSetup) -> None:
    data, digest = _blob()
    _token_repo(token_setup, "public/base").upload_blob([data])
    anonymous = _token_repo(token_setup, "public/base", password=None)
    assert anonymous.read_blob(digest) == data
    with pytest.raises(AuthError, match="public/base"):
        anonymous.upload_blob([b"anonymous may not push"])


def test_token_denied_scope_is_named(token_setup: TokenSetup, caplog: pytest.LogCaptureFixture) -> None:
    repo = _token_repo(token_setup, "shared/readonly")
    with pytest.raises(AuthError) as info:
        repo.upload_blob([b"not allowed"])
    message = str(info.value)
    assert token_setup.registry.host in message and "repository:shared/readonly:pull,push" in message
    _assert_secret_absent(TOKEN_PASSWORD, message, caplog.text)


def test_token_wrong_password(token_setup: TokenSetup, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Not-The-Password-42"
    repo = _token_repo(token_setup, "team/app", password=secret)
    with pytest.raises(AuthError) as info:
        repo.get_manifest("amd64")
    message = str(info.value)
    assert token_setup.token_server.realm in message and TOKEN_USER in message
    assert "repository:team/app:pull" in message
    _assert_secret_absent(secret, message, repr(info.value), caplog.text, repr(repo))
    _assert_secret_absent(secret, token_setup.token_server.process.tail(1 << 20))


# ---- TLS -------------------------------------------------------------------------------------------------

def test_tls_with_root_ca(tls_registry: RegistryService, tls_material: TLSMaterial) -> None:
    repo = open_repository(f"{tls_registry.host}/tls/app", RegistryOptions(root_ca=[str(tls_material.ca_cert)]))
    data, digest = _blob()
    assert repo.upload_blob([data]) == (digest, len(data))
    assert repo.read_blob(digest) == data


def test_tls_with_cert_dir(tls_registry: RegistryService, tls_material: TLSMaterial, tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    certs.mkdir()
    shutil.copy(tls_material.ca_cert, certs / "test-ca.crt")
    options = RegistryOptions(cert_dir=[str(tmp_path / "missing-dir-is-skipped"), str(certs)])
    repo = open_repository(f"{tls_registry.host}/tls/app", options)
    data, digest = _blob()
    repo.upload_blob([data])
    assert repo.head_blob(digest) == len(data)


def test_tls_untrusted_and_insecure(tls_registry: RegistryService) -> None:
    untrusted = open_repository(f"{tls_registry.host}/tls/app", RegistryOptions())
    with pytest.raises(UsageError, match="--root-ca"):
        untrusted.list_tags()
    insecure = open_repository(f"{tls_registry.host}/tls/app", RegistryOptions(insecure=True))
    data, digest = _blob()
    insecure.upload_blob([data])
    assert insecure.read_blob(digest) == data


def test_mutual_tls(mtls_registry: RegistryService, tls_material: TLSMaterial, tmp_path: Path) -> None:
    ca = str(tls_material.ca_cert)
    without = open_repository(f"{mtls_registry.host}/mtls/app", RegistryOptions(root_ca=[ca]))
    with pytest.raises(UsageError):
        without.list_tags()
    flag = f"{tls_material.client_cert}:{tls_material.client_key}"
    repo = open_repository(f"{mtls_registry.host}/mtls/app", RegistryOptions(root_ca=[ca], client_cert=[flag]))
    data, digest = _blob()
    repo.upload_blob([data])
    assert repo.read_blob(digest) == data
    # The same through --cert-dir: *.crt CA plus a client.cert/client.key pair.
    certs = tmp_path / "certs.d"
    certs.mkdir()
    shutil.copy(tls_material.ca_cert, certs / "ca.crt")
    shutil.copy(tls_material.client_cert, certs / "client.cert")
    shutil.copy(tls_material.client_key, certs / "client.key")
    via_dir = open_repository(f"{mtls_registry.host}/mtls/app", RegistryOptions(cert_dir=[str(certs)]))
    assert via_dir.head_blob(digest) == len(data)
