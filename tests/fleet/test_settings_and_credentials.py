"""Settings (defaults <- TOML file <- environment) and credential references."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from config.credentials import auth_for_host, credentials_resolver_for, env_name, resolve_ref
from config.settings import Settings, load_settings
from obdconv.errors import AuthError, UsageError
from obdconv.registry.options import RegistryOptions
from obdconv.request import RegistryAccess


def test_defaults_are_documented_values() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.db_type == "sqlite"
    assert s.visibility_timeout == s.lease_seconds


def test_file_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "obdconv.toml"
    f.write_text('[obdconv]\nbroker_url = "redis://file:1/0"\nlease_seconds = 11\nspool_dir = "/file/spool"\n')
    s = load_settings(env={"OBDCONV_CONFIG_FILE": str(f), "OBDCONV_SPOOL_DIR": "/env/spool"})
    assert (s.broker_url, s.lease_seconds, s.spool_dir) == ("redis://file:1/0", 11, "/env/spool")


@pytest.mark.parametrize("content, message", [
    ("nope = 1\n", "unknown setting"),
    ("lease_seconds = 'x'\n", "expected an integer"),
    ("broken = [\n", "not valid TOML"),
])
def test_bad_settings_file(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "s.toml"
    f.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_settings(f, env={})


def test_bad_environment_value() -> None:
    with pytest.raises(UsageError, match="lease_seconds"):
        load_settings(env={"OBDCONV_LEASE_SECONDS": "soon"})


def _cred_file(tmp_path: Path, data: object, mode: int = 0o600) -> Path:
    f = tmp_path / "credentials.json"
    f.write_text(json.dumps(data))
    os.chmod(f, mode)
    return f


def test_credentials_file_per_host_and_any_host(tmp_path: Path) -> None:
    f = _cred_file(tmp_path, {"team": {"reg.example:5000": "u:p:w"}, "all": "x:y"})
    assert auth_for_host("team", "reg.example:5000", f, env={}) == "u:p:w"
    assert auth_for_host("team", "other.example", f, env={}) == ""  # configured ref, anonymous here
    assert auth_for_host("all", "anything", f, env={}) == "x:y"
    assert resolve_ref("", f, env={}) == {}


def test_credentials_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = _cred_file(tmp_path, {"team": "u:p"}, mode=0o644)
    with pytest.raises(AuthError, match="0600"):
        auth_for_host("team", "h", f, env={})


def test_environment_wins_and_unknown_ref_is_an_auth_error(tmp_path: Path) -> None:
    f = _cred_file(tmp_path, {"team": "file:pw"})
    env = {env_name("team"): json.dumps({"h": "env:pw"})}
    assert env_name("my-team.prod") == "OBDCONV_CRED_MY_TEAM_PROD"
    assert auth_for_host("team", "h", f, env=env) == "env:pw"
    with pytest.raises(AuthError, match="'ghost' is not configured") as e:
        auth_for_host("ghost", "h", f, env={})
    assert "file:pw" not in str(e.value)


def test_resolver_feeds_registry_options(tmp_path: Path) -> None:
    f = _cred_file(tmp_path, {"team": {"127.0.0.1:5000": "alice:s3:cret"}})
    options = RegistryOptions.from_access(RegistryAccess(credential_ref="team"),
                                          credentials_resolver_for("127.0.0.1:5000", f, env={}))
    assert (options.username, options.password) == ("alice", "s3:cret")
    assert "s3:cret" not in repr(options)


def test_lease_must_outlast_celerys_chord_dispatch_claim() -> None:
    """The lease floor rests on our copy of Celery's claim estimate: check it against Celery's own
    (a private method of its Redis backend; if Celery changes it, this test says so)."""
    from celery import signature

    from workers.app import chord_dispatch_claim_seconds, create_app, min_lease_seconds

    app = create_app(load_settings(env={"OBDCONV_LEASE_SECONDS": str(min_lease_seconds())}))
    initial = max(5, int(app.conf.result_chord_join_timeout * 2))
    assert app.backend._chord_publish_claim_expires(initial, signature("x", app=app)) <= chord_dispatch_claim_seconds()
    assert min_lease_seconds() * 2 / 3 > chord_dispatch_claim_seconds()
    with pytest.raises(UsageError, match=f"lease_seconds {min_lease_seconds() - 1} is too short"):
        create_app(load_settings(env={"OBDCONV_LEASE_SECONDS": str(min_lease_seconds() - 1)}))
