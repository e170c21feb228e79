"""DSN parsing: the reference's go-sql-driver form, unix sockets, params, mysql:// URLs; secrets hidden."""

from __future__ import annotations

import pytest

from obdconv.dedup.db import parse_db_config
from obdconv.errors import UsageError

SECRET = "p:a@ss:w@rd"


def test_go_dsn_with_colon_and_at_in_password() -> None:
    cfg = parse_db_config("mysql", f"conv:{SECRET}@tcp(db.example:3307)/conversioncache")
    assert (cfg.user, cfg.password, cfg.host, cfg.port, cfg.database) == ("conv", SECRET, "db.example", 3307,
                                                                          "conversioncache")
    assert cfg.unix_socket == ""


def test_go_dsn_reference_sample() -> None:
    cfg = parse_db_config("mysql", "user:pass@tcp(127.0.0.1:3306)/conversioncache")
    assert (cfg.user, cfg.password, cfg.host, cfg.port, cfg.database) == ("user", "pass", "127.0.0.1", 3306,
                                                                          "conversioncache")


def test_go_dsn_unix_socket_and_no_password() -> None:
    cfg = parse_db_config("mysql", "root@unix(/run/mysqld/mysqld.sock)/cache")
    assert (cfg.user, cfg.password, cfg.unix_socket, cfg.database) == ("root", "", "/run/mysqld/mysqld.sock", "cache")


def test_go_dsn_default_address_and_port() -> None:
    cfg = parse_db_config("mysql", "u:p@/cache")
    assert (cfg.host, cfg.port, cfg.user, cfg.password, cfg.database) == ("127.0.0.1", 3306, "u", "p", "cache")
    cfg = parse_db_config("mysql", "u:p@tcp(dbhost)/cache")
    assert (cfg.host, cfg.port) == ("dbhost", 3306)
    cfg = parse_db_config("mysql", "u:p@tcp([::1]:3310)/cache")
    assert (cfg.host, cfg.port) == ("::1", 3310)


def test_go_dsn_params() -> None:
    cfg = parse_db_config("mysql", f"u:{SECRET}@tcp(h:1)/cache?charset=utf8mb4,utf8&parseTime=true&loc=Asia/Shanghai"
                                   "&timeout=1500ms&readTimeout=7s")
    assert cfg.charset == "utf8mb4"
    assert cfg.connect_timeout == pytest.approx(1.5)
    assert cfg.read_timeout == pytest.approx(7.0)
    assert (cfg.password, cfg.database, cfg.host, cfg.port) == (SECRET, "cache", "h", 1)


def test_mysql_url_with_percent_encoded_secret() -> None:
    cfg = parse_db_config("mysql", "mysql://conv:p%3Aa%40ss%3Aw%40rd@db:3308/cache?charset=utf8")
    assert (cfg.user, cfg.password, cfg.host, cfg.port, cfg.database, cfg.charset) == (
        "conv", SECRET, "db", 3308, "cache", "utf8")
    sock = parse_db_config("mysql", "mysql://conv@localhost/cache?unix_socket=/tmp/m.sock")
    assert sock.unix_socket == "/tmp/m.sock"


def test_sqlite_path() -> None:
    cfg = parse_db_config("sqlite", "/var/lib/obdconv/dedup.db")
    assert (cfg.db_type, cfg.path) == ("sqlite", "/var/lib/obdconv/dedup.db")


def test_secret_never_in_repr_or_describe() -> None:
    for dsn in (f"conv:{SECRET}@tcp(db:3307)/cache", "mysql://conv:p%3Aa%40ss%3Aw%40rd@db:3308/cache"):
        cfg = parse_db_config("mysql", dsn)
        assert cfg.password == SECRET
        for text in (repr(cfg), str(cfg), cfg.describe()):
            assert "a@ss" not in text and "w@rd" not in text and "%40" not in text
        assert "conv@" in cfg.describe()


@pytest.mark.parametrize(("db_type", "db_str"), [
    ("postgres", "x"), ("mysql", ""), ("sqlite", ""), ("mysql", f"u:{SECRET}@tcp(h:1)"),
    ("mysql", f"u:{SECRET}@tcp(h:notaport)/db"), ("mysql", f"u:{SECRET}@tcp(h:1)/db?timeout=soon"),
])
def test_bad_flags_are_usage_errors_without_the_secret(db_type: str, db_str: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_db_config(db_type, db_str)
    assert "a@ss" not in str(info.value)
