"""Fixtures for the formats tests: the reference files of /work/shared/fixtures/overlaybd."""

from __future__ import annotations

from pathlib import Path

import pytest

AAAA_UUID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@pytest.fixture(scope="session")
def obd_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "overlaybd"


@pytest.fixture(scope="session")
def ref_layer_dir(obd_dir: Path) -> Path:
    return obd_dir / "reference-layer"
