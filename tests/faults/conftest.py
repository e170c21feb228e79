"""Fault matrix fixtures: a fault-injecting proxy (tests/services/fault_proxy.py, its own process) in
front of the session's real docker-registry; conversions talk to the proxy's address, the checks
read the registry's storage directly (tests/faults/storage.py)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from obdconv.cli.main import main
from tests.services.fault_proxy import FaultProxy, start_fault_proxy
from tests.services.registry import RegistryService


@pytest.fixture(scope="module")
def proxy(registry: RegistryService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultProxy]:
    service = start_fault_proxy(tmp_path_factory.mktemp("fault-proxy"), registry.host)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def faults(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy with no rules and an empty log, cleared again afterwards (holds end)."""
    proxy.clear()
    proxy.clear_log()
    try:
        yield proxy
    finally:
        proxy.clear()


def layer_digests(layout: Path, tag: str) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    digest = next(m["digest"] for m in index["manifests"]
                  if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


def run_cli(*argv: str) -> tuple[int, Any, str]:
    """`obdconv ARGV` in this process: (exit code, the --json result or None, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    result = json.loads(out.getvalue()) if code == 0 and "--json" in argv else None
    return code, result, err.getvalue()


def root_digest(result: Any, fmt: str = "native") -> str:
    return next(o["root_digest"] for o in result["outputs"] if o["format"] == fmt)
