"""Secrets stay out of reprs, error messages and logs of the objects that carry them."""

from __future__ import annotations

import logging

import pytest

from config.settings import Settings, load_settings
from obdconv.dedup.store import open_store
from obdconv.errors import DatabaseError
from obdconv.pipeline.runner import RunnerOptions
from obdconv.registry.options import RegistryOptions
from tests.services.base import free_port

SECRET = "s3cr3t-Pa55"


def test_settings_repr_hides_urls_and_dsn() -> None:
    settings = load_settings(env={"OBDCONV_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:6379/0",
                                  "OBDCONV_RESULT_BACKEND": f"redis://:{SECRET}@127.0.0.1:6379/1",
                                  "OBDCONV_DB_TYPE": "mysql", "OBDCONV_DB_STR": f"u:{SECRET}@tcp(h:3306)/d"})
    assert settings.broker_url.endswith("@127.0.0.1:6379/0")  # the values are there ...
    assert SECRET not in repr(settings) and SECRET not in str(settings)  # ... but not in the repr
    assert "db_type='mysql'" in repr(settings)
    assert Settings() == Settings()  # still a value type (equality covers the hidden fields)
    assert Settings(db_str="a") != Settings(db_str="b")


def test_runner_and_registry_options_repr_hide_passwords() -> None:
    options = RunnerOptions(registry=RegistryOptions.from_flags(f"alice:{SECRET}"), db_str=f"u:{SECRET}@tcp(h)/d")
    assert options.db_str.startswith("u:") and options.registry is not None
    assert options.registry.password == SECRET
    assert SECRET not in repr(options)
    assert "alice" in repr(options)


def test_unreachable_mysql_error_and_log_hide_password(caplog: pytest.LogCaptureFixture) -> None:
    dsn = f"obd:{SECRET}@tcp(127.0.0.1:{free_port()})/conversioncache?timeout=2s"
    with pytest.raises(DatabaseError) as caught:
        open_store("mysql", dsn, required=True)
    assert "127.0.0.1" in str(caught.value) and SECRET not in str(caught.value)
    with caplog.at_level(logging.DEBUG):
        store = open_store("mysql", dsn, required=False)  # warns and converts without dedup
    store.close()
    assert not store.available
    assert caplog.records and all(SECRET not in r.getMessage() for r in caplog.records)
