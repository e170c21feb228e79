"""The dedup tests' database fixtures (SQLite and a real MariaDB) serve the status-table tests too."""

from tests.dedup.conftest import fresh_backend  # noqa: F401  (fixture)
