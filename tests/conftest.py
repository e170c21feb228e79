"""Shared pytest configuration. Service fixtures live in tests/<area>/conftest.py and build on
tests/services/base.py; each starts the real program on 127.0.0.1 and stops it by pid."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Session fixtures for the real services (each starts its program on first use only).
pytest_plugins = ["tests.services.fixtures", "tests.services.mariadb", "tests.services.redis"]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"


def have_root_and_loop() -> bool:
    return os.geteuid() == 0 and Path("/dev/loop-control").exists() and shutil.which("mount") is not None


requires_root = pytest.mark.skipif(
    not have_root_and_loop(), reason="needs root and a loop device (mount -o loop); CI runs as root"
)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (expected ../shared beside the checkout)")
    return FIXTURES
