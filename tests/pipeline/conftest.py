"""Pipeline test fixtures: a real docker-registry on 127.0.0.1 for this package's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services.registry import RegistryService, start_registry


@pytest.fixture(scope="module")
def pipeline_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryService]:
    with start_registry(tmp_path_factory.mktemp("pipeline-registry")) as service:
        yield service
