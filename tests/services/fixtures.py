"""pytest plugin with service fixtures other areas reuse (load from tests/conftest.py with
`pytest_plugins = ["tests.services.fixtures"]`).

`registry`: one plain-HTTP docker-registry for the whole session (`.url`, `.host`, `.storage_dir`);
tests share it, so each should push to its own repository name.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services.registry import RegistryService, start_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryService]:
    with start_registry(tmp_path_factory.mktemp("registry")) as service:
        yield service
