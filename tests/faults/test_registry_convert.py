"""Registry faults against `obdconv convert`: a real docker-registry behind the fault proxy.

Transient faults (one failing answer, a reset, a broken or stalled body, a slow answer) are retried
within the documented budget (RegistryOptions: `retry_budget` per request, counted from its first
failure; a blob body broken mid-transfer is resumed / re-sent at most `resume_attempts` times) and
the conversion gives the undisturbed run's digest. Persistent faults exit 75 (NetworkError) naming
the registry and the request, leave the output tag where it was, no manifest referencing a missing
blob and no upload session open.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from obdconv.errors import NetworkError
from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.registry import RegistryOptions
from obdconv.request import ConversionRequest, RegistryAccess
from tests.faults import storage
from tests.faults.conftest import layer_digests, root_digest, run_cli
from tests.fleet.conftest import push_layout
from tests.services.fault_proxy import FaultProxy
from tests.services.registry import RegistryService
from workers.sample_image import build_sample_image

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(300)]

REPO = "faults/convert"
KEEP = "keep"  # an output tag that already points at another conversion: persistent faults must not move it
PART = 64 << 10  # bytes of a blob body that get through before a mid-body fault
BROKEN_BEFORE: set[str] = set()  # broken sessions of earlier tests (they share the repository)


@pytest.fixture(scope="module")
def source(registry: RegistryService, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    layout = tmp_path_factory.mktemp("convert-src") / "layout"
    build_sample_image(layout, "img", layers=2, file_bytes=256 << 10, seed=61)
    build_sample_image(layout, "other", layers=1, file_bytes=64 << 10, seed=62)
    push_layout(layout, "img", f"{registry.host}/{REPO}:src")
    push_layout(layout, "other", f"{registry.host}/{REPO}:other")
    return {"layers": layer_digests(layout, "img")}


@pytest.fixture(scope="module")
def baseline(proxy: FaultProxy, source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The undisturbed conversion's digest; also points KEEP at a conversion of another image."""
    proxy.clear()
    work = tmp_path_factory.mktemp("baseline")
    code, result, err = convert_cli(proxy, "baseline", work)
    assert code == 0, err
    code, _, err = convert_cli(proxy, KEEP, work, src="other")
    assert code == 0, err
    return root_digest(result)


def convert_cli(proxy: FaultProxy, tag: str, work: Path, *extra: str, src: str = "src") -> tuple[int, Any, str]:
    return run_cli("convert", "-r", f"{proxy.host}/{REPO}", "-i", src, "--overlaybd", tag, "--plain", "--json",
                   "-d", str(work / "work"), "--workers", "1", *extra)


def broken_sessions(proxy: FaultProxy) -> set[str]:
    """Upload sessions whose PATCH the proxy broke mid-body. docker-registry keeps writing such a
    body after the client is gone and then refuses to cancel the session (its offset moved: 404
    to our DELETE), so only its upload purging removes them: the client cannot."""
    return {e["path"].split("/blobs/uploads/")[1].split("?")[0] for e in proxy.log()
            if e["method"] == "PATCH" and e["action"] == "reset_request_after"}


@pytest.fixture(autouse=True)
def _remember_broken_sessions(proxy: FaultProxy) -> Iterator[None]:
    yield
    BROKEN_BEFORE.update(broken_sessions(proxy))


def assert_clean(registry: RegistryService, work: Path, proxy: FaultProxy) -> None:
    assert storage.dangling_references(registry, REPO) == []
    assert set(storage.open_uploads(registry, REPO)) <= BROKEN_BEFORE | broken_sessions(proxy)
    # (empty directories may stay: #13 defect 8, fixed elsewhere)
    assert [p for p in (work / "work").rglob("*") if not p.is_dir()] == []


# (id, rule) — each rule acts on the first matching request only.
TRANSIENT: list[tuple[str, dict[str, Any]]] = [
    ("500-get-manifest", {"action": "status", "status": 500, "method": "GET", "path": "/manifests/src$"}),
    ("502-get-blob", {"action": "status", "status": 502, "method": "GET", "path": "/blobs/{layer1}$"}),
    ("503-head-blob", {"action": "status", "status": 503, "method": "HEAD", "path": "/blobs/sha256:"}),
    ("503-post-upload", {"action": "status", "status": 503, "method": "POST", "path": "/blobs/uploads/$"}),
    ("503-patch-upload", {"action": "status", "status": 503, "method": "PATCH", "path": "/blobs/uploads/."}),
    ("502-put-commit", {"action": "status", "status": 502, "method": "PUT", "path": "/blobs/uploads/.*digest="}),
    ("500-put-manifest", {"action": "status", "status": 500, "method": "PUT", "path": "/manifests/"}),
    ("429-get-blob", {"action": "status", "status": 429, "retry_after": 1, "method": "GET", "path": "/blobs/{layer0}$"}),
    ("reset-get-manifest", {"action": "reset", "method": "GET", "path": "/manifests/src$"}),
    ("reset-put-commit", {"action": "reset", "method": "PUT", "path": "/blobs/uploads/.*digest="}),
    ("reset-mid-download", {"action": "reset_response_after", "bytes": PART, "method": "GET", "path": "/blobs/{layer1}$"}),
    ("reset-mid-upload", {"action": "reset_request_after", "bytes": PART, "method": "PATCH", "path": "/blobs/uploads/."}),
    ("lost-answer-put-commit", {"action": "drop_response", "method": "PUT", "path": "/blobs/uploads/.*digest="}),
    ("lost-answer-put-manifest", {"action": "drop_response", "method": "PUT", "path": "/manifests/"}),
    ("slow-download", {"action": "throttle", "rate": 1 << 20, "method": "GET", "path": "/blobs/{layer1}$"}),
]


@pytest.mark.parametrize("rule", [r for _, r in TRANSIENT], ids=[i for i, _ in TRANSIENT])
def test_transient_fault_is_retried_and_gives_the_same_digest(
        faults: FaultProxy, registry: RegistryService, source: dict[str, Any], baseline: str, rule: dict[str, Any],
        tmp_path: Path) -> None:
    layers = {f"layer{i}": digest for i, digest in enumerate(source["layers"])}
    rule_id = faults.add(times=1, **{**rule, "path": rule["path"].format(**layers)})
    code, result, err = convert_cli(faults, "transient", tmp_path)
    assert faults.hits(rule_id) == 1, faults.log()
    assert code == 0, err
    assert root_digest(result) == baseline
    assert storage.tag_target(registry, REPO, "transient") == baseline
    assert_clean(registry, tmp_path, faults)


def test_retry_after_is_honoured(faults: FaultProxy, baseline: str, tmp_path: Path) -> None:
    """A 429 asking for 1 s is retried after 1 s, not at once (a rate-limited registry is not
    hammered); one asking for longer than the budget fails at once, saying so."""
    faults.add("status", "/manifests/src$", method="GET", times=1, status=429, retry_after=1)
    code, result, err = convert_cli(faults, "after", tmp_path)
    assert code == 0 and root_digest(result) == baseline, err
    asks = [e["time"] for e in faults.log() if e["method"] == "GET" and e["path"].endswith("/manifests/src")]
    assert asks[1] - asks[0] >= 0.95, asks

    faults.add("status", "/manifests/src$", method="GET", status=429, retry_after=30)
    started = time.monotonic()
    code, _, err = convert_cli(faults, "after-30", tmp_path)
    assert code == NetworkError.exit_code, err
    assert time.monotonic() - started < 2.5
    assert "429" in err and "retry after 30 s" in err and f"registry {faults.host}" in err, err


def _api_convert(proxy: FaultProxy, tag: str, work: Path, **registry_options: Any) -> str:
    request = ConversionRequest(f"{proxy.host}/{REPO}", input_tag="src", overlaybd_tag=tag, workdir=str(work),
                                access=RegistryAccess(plain=True))
    options = RunnerOptions(registry=RegistryOptions(plain=True, **registry_options), workers=1)
    return convert(request, options=options).output("native").root_digest


def test_read_timeout_is_retried_although_it_outlasted_the_budget(
        faults: FaultProxy, baseline: str, tmp_path: Path) -> None:
    """A registry that answers late once: the read timeout (here 1.5 s, like the default 60 s) is
    longer than the retry budget (1 s, like the default 3 s), and the request is still retried:
    the budget counts from the first failure, not from the first attempt."""
    rule_id = faults.add("delay", "/manifests/src$", method="GET", times=1, seconds=3)
    assert _api_convert(faults, "late", tmp_path, read_timeout=1.5, retry_budget=1.0) == baseline
    assert faults.hits(rule_id) == 1


def test_stalled_download_is_resumed_after_the_read_timeout(
        faults: FaultProxy, source: dict[str, Any], baseline: str, tmp_path: Path) -> None:
    """A blob body that stops flowing mid-way: the read times out and the rest is asked for with a
    Range request (the digest is still checked over the whole blob)."""
    rule_id = faults.add("stall_response_after", f"/blobs/{source['layers'][1]}$", method="GET", times=1,
                         bytes=PART, seconds=10)
    assert _api_convert(faults, "stalled", tmp_path, read_timeout=1.0) == baseline
    ranges = [e for e in faults.log() if e["path"].endswith(source["layers"][1]) and e["rule"] != rule_id]
    assert ranges and ranges[0]["status"] == 206, faults.log()


# Persistent faults: (id, rule, what the error names, --workers)
PERSISTENT: list[tuple[str, dict[str, Any], str, str]] = [
    ("503-download", {"action": "status", "status": 503, "method": "GET", "path": "/blobs/sha256:"},
     "GET /v2/faults/convert/blobs/sha256:", "1"),
    ("reset-every-upload", {"action": "reset_request_after", "bytes": PART, "method": "PATCH",
                            "path": "/blobs/uploads/."}, "PATCH /v2/faults/convert/blobs/uploads/", "2"),
    ("502-manifest-push", {"action": "status", "status": 502, "method": "PUT", "path": f"/manifests/{KEEP}$"},
     f"PUT /v2/faults/convert/manifests/{KEEP}", "1"),
]


@pytest.mark.parametrize("rule, names, workers", [p[1:] for p in PERSISTENT], ids=[p[0] for p in PERSISTENT])
def test_persistent_fault_fails_cleanly_and_moves_no_tag(
        faults: FaultProxy, registry: RegistryService, baseline: str, rule: dict[str, Any], names: str,
        workers: str, tmp_path: Path) -> None:
    kept = storage.tag_target(registry, REPO, KEEP)
    history = storage.tag_history(registry, REPO, KEEP)
    assert kept is not None and kept != baseline
    faults.add(times=-1, **rule)
    code, _, err = convert_cli(faults, KEEP, tmp_path, "--workers", workers)
    assert code == NetworkError.exit_code == 75, err
    assert f"registry {faults.host}" in err and names in err, err
    assert storage.tag_target(registry, REPO, KEEP) == kept
    assert storage.tag_history(registry, REPO, KEEP) == history
    assert_clean(registry, tmp_path, faults)
