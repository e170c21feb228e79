"""Completion callbacks, pub/sub events and Prometheus metrics on a real fleet: Redis, two workers
(each with its own /metrics port), SQLite status rows, a docker-registry for dedup, and a webhook
receiver process on 127.0.0.1 that checks the HMAC signature itself."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from obdconv.request import ConversionRequest, RegistryAccess
from tests.fleet.conftest import Fleet, push_layout, running_fleet, wait_until
from tests.services.base import free_port
from tests.services.registry import RegistryService
from tests.services.webhook_receiver import WebhookReceiver
from workers.sample_image import build_sample_image

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(300)]

RECEIVER_KEY = "receiver-key-0123456789abcdef"  # what the receiver checks; the workers hold it as ref "good"
OTHER_KEY = "another-key-0123456789abcdefgh"  # ref "wrong": signs, but not with the receiver's key
CALLBACK_RETRIES = 2
EVENTS_CHANNEL = "obdconv:events"  # documented in tasks/README.md


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nimages") / "layout"
    build_sample_image(path, "small", layers=2, file_bytes=64 << 10, seed=51)
    build_sample_image(path, "measured", layers=3, file_bytes=128 << 10, seed=52)
    return path


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookReceiver]:
    service = WebhookReceiver(tmp_path_factory.mktemp("receiver"), RECEIVER_KEY).start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def nfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, dict[str, int]]]:
    workdir = tmp_path_factory.mktemp("nfleet")
    secrets = workdir / "callback-secrets.json"
    secrets.write_text(json.dumps({"wrong": OTHER_KEY}))
    os.chmod(secrets, 0o600)
    ports = {"w1": free_port(), "w2": free_port()}
    per_worker = {name: {"OBDCONV_METRICS_PORT": str(port), "OBDCONV_METRICS_DIR": str(workdir / "metrics")}
                  for name, port in ports.items()}
    with running_fleet(workdir, {}, flower=False, worker_env=per_worker,
                       OBDCONV_CALLBACK_SECRETS_FILE=str(secrets), OBDCONV_CALLBACK_SECRET_GOOD=RECEIVER_KEY,
                       OBDCONV_CALLBACK_RETRIES=str(CALLBACK_RETRIES), OBDCONV_CALLBACK_BACKOFF="1",
                       OBDCONV_CALLBACK_TIMEOUT="3", OBDCONV_METRICS_ADDRESS="127.0.0.1") as fleet:
        yield fleet, ports


def callback_of(fleet: Fleet, request_id: str, state: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        cb = fleet.status(request_id).get("callback")
        return cb if cb and cb["state"] == state else None

    return wait_until(done, 60, f"callback of {request_id} to become {state}")  # type: ignore[no-any-return]


def posts_for(receiver: WebhookReceiver, request_id: str) -> list[dict[str, Any]]:
    return [r for r in receiver.received() if r["headers"].get("X-Obdconv-Request-Id") == request_id]


def next_event(pubsub: Any, request_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            event = json.loads(message["data"])
            if event["request_id"] == request_id:
                return event  # type: ignore[no-any-return]
    raise AssertionError(f"no event for {request_id} on {EVENTS_CHANNEL}")


def test_success_is_posted_signed_once_and_published(nfleet: tuple[Fleet, dict[str, int]], layout: Path,
                                                     receiver: WebhookReceiver) -> None:
    fleet, _ = nfleet
    pubsub = fleet.redis.client(0).pubsub()
    pubsub.subscribe(EVENTS_CHANNEL)
    request = ConversionRequest(f"oci:{layout}", input_tag="small", overlaybd_tag="small-obd",
                                callback_url=receiver.url("/hooks/obdconv?team=a"), callback_secret_ref="good")
    request_id = fleet.submit(request)
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS", final
    callback = callback_of(fleet, request_id, "DELIVERED")
    assert callback == {"state": "DELIVERED", "attempts": 1, "error": ""}

    posts = posts_for(receiver, request_id)
    assert len(posts) == 1 and posts[0]["valid"], posts
    post = posts[0]
    assert post["path"] == "/hooks/obdconv?team=a"
    assert post["content_type"] == "application/json"
    assert post["headers"]["X-Obdconv-Event"] == "conversion.finished"
    assert post["headers"]["X-Obdconv-Delivery"] == f"{request_id}/SUCCESS"
    body = json.loads(post["body"])
    assert body["request_id"] == request_id and body["state"] == "SUCCESS" and body["error"] is None
    assert body["source"] == f"oci:{layout}:small"
    assert body["outputs"]["native"]["digest"] == final["outputs"]["native"]["digest"]
    assert body["outputs"]["native"]["tag"] == "small-obd"
    assert body["submitted_at"] <= body["started_at"] <= body["finished_at"]

    event = next_event(pubsub, request_id)
    assert event == body  # the same summary, for in-cluster listeners
    pubsub.close()
    time.sleep(1.5)  # a duplicate (e.g. a second announcement of the same final state) would show by now
    assert len(posts_for(receiver, request_id)) == 1
    assert RECEIVER_KEY not in fleet.logs_text()


def test_wrong_signature_is_rejected_and_recorded(nfleet: tuple[Fleet, dict[str, int]], layout: Path,
                                                  receiver: WebhookReceiver) -> None:
    fleet, _ = nfleet
    request = ConversionRequest(f"oci:{layout}", input_tag="small", overlaybd_tag="small-wrong",
                                callback_url=receiver.url(), callback_secret_ref="wrong")
    request_id = fleet.submit(request)
    assert fleet.wait(request_id)["state"] == "SUCCESS"
    callback = callback_of(fleet, request_id, "FAILED")
    # 401 is the receiver's final word: not retried.
    assert callback["attempts"] == 1 and "HTTP 401" in callback["error"], callback
    assert [p["valid"] for p in posts_for(receiver, request_id)] == [False]
    assert fleet.status(request_id)["state"] == "SUCCESS"


def test_receiver_down_is_retried_then_recorded(nfleet: tuple[Fleet, dict[str, int]], layout: Path) -> None:
    fleet, _ = nfleet
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    request = ConversionRequest(f"oci:{layout}", input_tag="small", overlaybd_tag="small-down",
                                callback_url=down, callback_secret_ref="good")
    request_id = fleet.submit(request)
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS", final
    callback = callback_of(fleet, request_id, "FAILED")
    assert callback["attempts"] == CALLBACK_RETRIES + 1, callback
    assert "cannot reach http://127.0.0.1" in callback["error"] and "Connection refused" in callback["error"], callback
    after = fleet.status(request_id)
    assert after["state"] == "SUCCESS" and after["outputs"] == final["outputs"]


def test_failed_conversion_is_posted_with_its_error(nfleet: tuple[Fleet, dict[str, int]], layout: Path,
                                                    receiver: WebhookReceiver) -> None:
    fleet, _ = nfleet
    pubsub = fleet.redis.client(0).pubsub()
    pubsub.subscribe(EVENTS_CHANNEL)
    request = ConversionRequest(f"oci:{layout}", input_tag="no-such-tag", overlaybd_tag="x",
                                callback_url=receiver.url(), callback_secret_ref="good")
    request_id = fleet.submit(request)
    final = fleet.wait(request_id)
    assert final["state"] == "FAILURE" and final["error"]["class"] == "NotFoundError", final
    callback_of(fleet, request_id, "DELIVERED")
    (post,) = posts_for(receiver, request_id)
    body = json.loads(post["body"])
    assert post["valid"] and body["state"] == "FAILURE"
    assert body["error"] == final["error"] and body["outputs"] == {}
    assert next_event(pubsub, request_id)["state"] == "FAILURE"
    pubsub.close()


# --- metrics ------------------------------------------------------------------------------------------


def scrape(ports: dict[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of every worker's /metrics, summed over the workers."""
    total: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for port in ports.values():
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                total[key] = total.get(key, 0.0) + sample.value
    return total


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


COUNTED = [
    ("obdconv_conversions_total", {"state": "SUCCESS", "format": "native"}),
    ("obdconv_stage_duration_seconds_count", {"stage": "prepare"}),
    ("obdconv_stage_duration_seconds_count", {"stage": "metadata"}),
    ("obdconv_stage_duration_seconds_count", {"stage": "assemble"}),
    ("obdconv_stage_duration_seconds_count", {"stage": "push"}),
    ("obdconv_bytes_read_total", {"stage": "prepare"}),
    ("obdconv_bytes_written_total", {"format": "native"}),
    ("obdconv_dedup_total", {"level": "manifest_hit"}),
    ("obdconv_dedup_total", {"level": "layer_hit"}),
    ("obdconv_dedup_total", {"level": "cross_repo_mount"}),
    ("obdconv_dedup_total", {"level": "claim_wait"}),
    ("obdconv_failures_total", {"error_class": "NotFoundError"}),
]


def moved(ports: dict[str, int], before: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    after = scrape(ports)
    return {f"{name}{sorted(labels.items())}": value(after, name, **labels) - value(before, name, **labels)
            for name, labels in COUNTED}


def manifest_of(ref: str) -> dict[str, Any]:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(raw)  # type: ignore[no-any-return]


def convert_and_measure(fleet: Fleet, ports: dict[str, int], request: ConversionRequest) -> dict[str, float]:
    before = scrape(ports)
    final = fleet.wait(fleet.submit(request))
    assert final["state"] == "SUCCESS", final
    # The final state is counted right after the status row is written: give the scrape a moment.
    wait_until(lambda: value(scrape(ports), "obdconv_conversions_total", state="SUCCESS", format="native")
               > value(before, "obdconv_conversions_total", state="SUCCESS", format="native"), 10, "the count")
    return moved(ports, before)


def key(name: str, **labels: str) -> str:
    return f"{name}{sorted(labels.items())}"


def test_metrics_move_by_exactly_one_conversion(nfleet: tuple[Fleet, dict[str, int]], layout: Path,
                                                registry: RegistryService) -> None:
    fleet, ports = nfleet
    push_layout(layout, "measured", f"{registry.host}/notify/a:src")
    source = manifest_of(f"{registry.host}/notify/a:src")
    layers = len(source["layers"])

    def request(repo: str, tag: str) -> ConversionRequest:
        return ConversionRequest(f"{registry.host}/{repo}", input_tag="src", overlaybd_tag=tag,
                                 access=RegistryAccess(plain=True))

    first = convert_and_measure(fleet, ports, request("notify/a", "obd"))
    converted = manifest_of(f"{registry.host}/notify/a:obd")
    expected = dict.fromkeys(first, 0.0)
    expected.update({
        key("obdconv_conversions_total", format="native", state="SUCCESS"): 1,
        key("obdconv_stage_duration_seconds_count", stage="prepare"): layers,
        key("obdconv_stage_duration_seconds_count", stage="metadata"): 1,
        key("obdconv_stage_duration_seconds_count", stage="assemble"): layers,
        key("obdconv_stage_duration_seconds_count", stage="push"): 1,
        key("obdconv_bytes_read_total", stage="prepare"): sum(x["size"] for x in source["layers"]),
        key("obdconv_bytes_written_total", format="native"): sum(x["size"] for x in converted["layers"]),
    })
    assert first == expected

    # The same image again, another tag: a manifest hit, nothing read or written.
    again = convert_and_measure(fleet, ports, request("notify/a", "obd-again"))
    expected = dict.fromkeys(again, 0.0)
    expected.update({key("obdconv_conversions_total", format="native", state="SUCCESS"): 1,
                     key("obdconv_dedup_total", level="manifest_hit"): 1})
    assert again == expected

    # Into another repository of the same registry: the converted manifest's config and layers are
    # mounted from the first one (one per blob), then the manifest is pushed there.
    push_layout(layout, "measured", f"{registry.host}/notify/b:src")
    mounted = convert_and_measure(fleet, ports, request("notify/b", "obd"))
    expected = dict.fromkeys(mounted, 0.0)
    expected.update({key("obdconv_conversions_total", format="native", state="SUCCESS"): 1,
                     key("obdconv_dedup_total", level="manifest_hit"): 1,
                     key("obdconv_dedup_total", level="cross_repo_mount"): 1 + layers})
    assert mounted == expected


def test_fleet_gauges_are_read_at_scrape_time(nfleet: tuple[Fleet, dict[str, int]]) -> None:
    _, ports = nfleet
    samples = scrape({"w1": ports["w1"]})
    assert value(samples, "obdconv_live_workers") == 2
    assert value(samples, "obdconv_fleet_scrape_ok", source="redis") == 1
    assert value(samples, "obdconv_fleet_scrape_ok", source="database") == 1
    for queue in ("control", "prepare", "metadata", "assemble"):
        assert ("obdconv_queue_depth", (("queue", queue),)) in samples
