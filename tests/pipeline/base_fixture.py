"""The real overlaybd base layer (`--mkfs=false`) from the shared fixtures, for tests in any area.

Outside CI a missing fixture skips the test with the reason; in CI (CI=true) it fails it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import FIXTURES

BASE_LAYER = FIXTURES / "overlaybd" / "baselayers" / "ext4_64"
# The reference convertor's tar-wrapped base layer: `ExpectedOverlaybdBaseLayerDigest` begins so
# (spec reference-convertor.md §7.6, §11.2).
REFERENCE_NATIVE_PREFIX = "sha256:a8b5fca8"
TURBO_DIGEST = "sha256:c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9"


def base_layer_path() -> Path:
    if BASE_LAYER.is_file():
        return BASE_LAYER
    message = f"the overlaybd base layer fixture {BASE_LAYER} is missing (../shared/fixtures)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message + "; outside CI such tests are skipped")
