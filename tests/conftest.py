"""Shared pytest configuration. Service fixtures live in tests/<area>/conftest.py and build on
tests/services/base.py; each starts the real program on 127.0.0.1 and stops it by pid."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Session fixtures for the real services (each starts its program on first use only).
pytest_plugins = ["tests.services.fixtures", "tests.services.mariadb", "tests.services.redis"]

# The reference files (/work/shared: spec and fixtures) beside the checkout; OBDCONV_SHARED_DIR
# points elsewhere (e.g. at a missing directory, to check what runs without them).
SHARED = Path(os.environ.get("OBDCONV_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
FIXTURES = SHARED / "fixtures"
SHARED_MISSING = (f"reference fixtures not found at {FIXTURES} (the shared/ directory beside the checkout, "
                  "or OBDCONV_SHARED_DIR)")


def have_root_and_loop() -> bool:
    return os.geteuid() == 0 and Path("/dev/loop-control").exists() and shutil.which("mount") is not None


requires_root = pytest.mark.skipif(
    not have_root_and_loop(), reason="needs root and a loop device (mount -o loop); CI runs as root"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require_shared() -> Path:
    """The fixtures directory; without it a test skips (one reason for all), or fails in CI (CI=true),
    where the fixtures are always laid out and their absence is a broken setup."""
    if not FIXTURES.is_dir():
        if in_ci():
            pytest.fail(f"{SHARED_MISSING}; CI must have them", pytrace=False)
        pytest.skip(SHARED_MISSING)
    return FIXTURES


requires_shared = pytest.mark.shared  # for tests reading the fixtures without the `fixtures_dir` fixture


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("shared") is not None:
        require_shared()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require_shared()
