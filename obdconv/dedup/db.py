"""Connection settings for the dedup database: DSN parsing and the peewee database handle.

`--db-type mysql --db-str DSN` accepts
  * the reference convertor's go-sql-driver form `user:pass@tcp(host:port)/db?param=value`
    (also `user@unix(/path/to.sock)/db`, `tcp6(...)`, and `user:pass@/db` for the default address);
    the password may contain ':' and '@': user info ends at the LAST '@' before the address and the
    user name at the FIRST ':' (as go-sql-driver does);
  * a URL `mysql://user:pass@host:port/db?unix_socket=/path` (percent-encoded user and password).
Params: `charset` (first of a comma list), `timeout`, `readTimeout`, `writeTimeout` (Go durations like
`5s`, `500ms`) are honoured; any other go-sql-driver param (`parseTime`, `loc`, `tls`, ...) has no
meaning for pymysql and is ignored with a debug log.
`--db-type sqlite --db-str PATH` opens (and creates) an SQLite file.

Secrets: `DatabaseConfig.password` is excluded from repr; `describe()` names the database without it;
parse errors never echo the DSN.

`database` is a peewee `DatabaseProxy` every dedup model binds to; `open_store` points it at the real
database. Other areas (fleet status records) bind their own models to it too and call
`register_model(Model)` so `obdconv db init` creates their tables. One open store per process.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee
import pymysql
from playhouse.shortcuts import ReconnectMixin

from obdconv.errors import UsageError

log = logging.getLogger(__name__)

DB_TYPES = ("mysql", "sqlite")
DEFAULT_MYSQL_PORT = 3306
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_IO_TIMEOUT = 30.0
SQLITE_BUSY_TIMEOUT = 30.0

database = peewee.DatabaseProxy()

_extra_models: list[type[peewee.Model]] = []


def register_model(model: type[peewee.Model]) -> type[peewee.Model]:
    """Have `obdconv db init` (and `open_store`) create `model`'s table too. Usable as a decorator.
    The model must bind to `obdconv.dedup.db.database`."""
    if model not in _extra_models:
        _extra_models.append(model)
    return model


def registered_models() -> list[type[peewee.Model]]:
    return list(_extra_models)


@dataclass(frozen=True)
class DatabaseConfig:
    """Where the dedup database is. Never logs or prints `password`."""

    db_type: str
    database: str = ""  # MySQL database name
    host: str = "127.0.0.1"
    port: int = DEFAULT_MYSQL_PORT
    user: str = ""
    password: str = field(default="", repr=False)
    unix_socket: str = ""
    path: str = ""  # SQLite file
    charset: str = "utf8mb4"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_IO_TIMEOUT
    write_timeout: float = DEFAULT_IO_TIMEOUT

    def describe(self) -> str:
        """A human name for logs and errors, without the password."""
        if self.db_type == "sqlite":
            return f"sqlite:{self.path}"
        where = f"unix({self.unix_socket})" if self.unix_socket else f"{self.host}:{self.port}"
        return f"mysql://{self.user + '@' if self.user else ''}{where}/{self.database}"


def parse_db_config(db_type: str, db_str: str) -> DatabaseConfig:
    """Parse `--db-type`/`--db-str`. Raises UsageError (without echoing the DSN) when malformed."""
    if db_type == "sqlite":
        path = db_str.removeprefix("sqlite://") if db_str.startswith("sqlite://") else db_str
        if not path:
            raise UsageError("--db-type sqlite needs --db-str PATH (the database file)")
        return DatabaseConfig("sqlite", path=path)
    if db_type != "mysql":
        raise UsageError(f"--db-type must be one of {', '.join(DB_TYPES)} (got {db_type!r})")
    if not db_str:
        raise UsageError("--db-type mysql needs --db-str (e.g. user:pass@tcp(host:3306)/conversioncache)")
    if db_str.startswith("mysql://"):
        return _parse_mysql_url(db_str)
    return _parse_go_dsn(db_str)


_GO_ADDRESS = re.compile(r"(?:^|@)(tcp6?|unix)\(([^()]*)\)/")


def _parse_go_dsn(dsn: str) -> DatabaseConfig:
    # go-sql-driver grammar: [user[:password]@][net[(addr)]]/dbname[?param=value&...]
    matches = list(_GO_ADDRESS.finditer(dsn))
    if matches:
        m = matches[-1]
        userinfo = dsn[: m.start()] if dsn[m.start()] == "@" else ""
        net, addr, rest = m.group(1), m.group(2), dsn[m.end():]
    else:
        # No "net(addr)": `user:pass@/db` or `/db` (default address). Cut params first so a '/' or
        # '@' inside a param value cannot be mistaken for the separators.
        head, _, query = dsn.partition("?")
        slash = head.rfind("/")
        if slash < 0:
            raise UsageError("--db-str is not a go-sql-driver DSN: no '/dbname' part "
                             "(expected user:pass@tcp(host:port)/dbname)")
        before = head[:slash]
        at = before.rfind("@")
        userinfo, net = (before[:at], before[at + 1:]) if at >= 0 else ("", before)
        if net not in ("", "tcp", "tcp6", "unix"):
            raise UsageError("--db-str: unsupported network in DSN (use tcp(host:port) or unix(/path))")
        addr, rest = "", head[slash + 1:] + ("?" + query if query else "")
    user, _, password = userinfo.partition(":")
    dbname, _, query = rest.partition("?")
    if "/" in dbname:
        raise UsageError("--db-str: database name must not contain '/'")
    params = dict(parse_qsl(query, keep_blank_values=True))
    host, port, sock = "127.0.0.1", DEFAULT_MYSQL_PORT, ""
    if net == "unix":
        sock = addr or "/run/mysqld/mysqld.sock"
    elif addr:
        host, port = _split_host_port(addr)
    return _with_params(DatabaseConfig("mysql", database=dbname, host=host, port=port, user=user,
                                       password=password, unix_socket=sock), params)


def _parse_mysql_url(url: str) -> DatabaseConfig:
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_MYSQL_PORT
    except ValueError:
        raise UsageError("--db-str: invalid port in mysql:// URL") from None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    sock = params.pop("unix_socket", "") or params.pop("socket", "")
    dbname = unquote(parts.path.lstrip("/"))
    if "/" in dbname:
        raise UsageError("--db-str: database name must not contain '/'")
    return _with_params(DatabaseConfig(
        "mysql", database=dbname, host=parts.hostname or "127.0.0.1", port=port,
        user=unquote(parts.username or ""), password=unquote(parts.password or ""), unix_socket=sock,
    ), params)


def _split_host_port(addr: str) -> tuple[str, int]:
    if addr.startswith("["):  # [v6]:port
        host, _, rest = addr[1:].partition("]")
        port_s = rest.removeprefix(":")
    elif addr.count(":") == 1:
        host, _, port_s = addr.partition(":")
    else:
        host, port_s = addr, ""
    try:
        port = int(port_s) if port_s else DEFAULT_MYSQL_PORT
    except ValueError:
        raise UsageError("--db-str: invalid port in tcp(host:port)") from None
    return host or "127.0.0.1", port


_GO_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")


def _go_duration(value: str, name: str) -> float:
    m = _GO_DURATION.match(value)
    if not m:
        raise UsageError(f"--db-str: param {name} must be a duration like 5s or 500ms")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]


def _with_params(cfg: DatabaseConfig, params: dict[str, str]) -> DatabaseConfig:
    changes: dict[str, object] = {}
    for name, value in params.items():
        if name == "charset" and value:
            changes["charset"] = value.split(",")[0]
        elif name == "timeout":
            changes["connect_timeout"] = _go_duration(value, name)
        elif name == "readTimeout":
            changes["read_timeout"] = _go_duration(value, name)
        elif name == "writeTimeout":
            changes["write_timeout"] = _go_duration(value, name)
        else:
            log.debug("ignoring DSN param %s (no pymysql equivalent)", name)
    if not changes:
        return cfg
    return replace(cfg, **changes)  # type: ignore[arg-type]


class ReconnectingMySQLDatabase(ReconnectMixin, peewee.MySQLDatabase):  # type: ignore[misc]
    """peewee's reconnect mixin: a connection dropped by the server (idle timeout, restart) is
    re-opened once instead of failing every later query of a long-lived worker."""

    def _reconnect(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        # The mixin's close() + connect() reset peewee's stack of open `connection_context()`s, and
        # the enclosing context's exit then fails with IndexError (pop from empty list), hiding the
        # database error (a server restarted or killed mid-run): keep the stack across it.
        contexts = list(self._state.ctx)
        try:
            return super()._reconnect(func, *args, **kwargs)
        finally:
            if contexts and not self._state.ctx:
                self._state.ctx = contexts


def connect_database(cfg: DatabaseConfig) -> peewee.Database:
    """A peewee database for `cfg` (not yet connected)."""
    if cfg.db_type == "sqlite":
        # WAL + busy timeout: several processes (local runner pool) claim and write concurrently.
        return peewee.SqliteDatabase(cfg.path, timeout=SQLITE_BUSY_TIMEOUT, pragmas={
            "journal_mode": "wal", "busy_timeout": int(SQLITE_BUSY_TIMEOUT * 1000), "synchronous": "normal",
        })
    kwargs: dict[str, object] = {
        "user": cfg.user, "password": cfg.password, "charset": cfg.charset,
        "connect_timeout": cfg.connect_timeout, "read_timeout": cfg.read_timeout,
        "write_timeout": cfg.write_timeout,
        # FOUND_ROWS: an UPDATE reports rows *matched*, not rows changed, so "did my claim/heartbeat
        # match" is answered correctly even when no value changed.
        "client_flag": pymysql.constants.CLIENT.FOUND_ROWS,
    }
    if cfg.unix_socket:
        kwargs["unix_socket"] = cfg.unix_socket
    else:
        kwargs["host"], kwargs["port"] = cfg.host, cfg.port
    return ReconnectingMySQLDatabase(cfg.database, **kwargs)


def dialect(db: peewee.Database) -> str:
    """'mysql' or 'sqlite' for a real database or the proxy pointing at one."""
    target = db.obj if isinstance(db, peewee.DatabaseProxy) else db
    if isinstance(target, peewee.MySQLDatabase):
        return "mysql"
    if isinstance(target, peewee.SqliteDatabase):
        return "sqlite"
    raise TypeError(f"unsupported database {type(target).__name__}")
