"""POST /v1/events/distribution and /v1/events/harbor against two real API replicas, with images
pushed by skopeo into a real docker-registry (no workers: queued requests stay queued). The real
registry's own notifications drive the end-to-end test (test_e2e_events.py); here the deliveries
are written by hand, in the documented formats, to reach every branch."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from obdconv.oci import mediatypes as mt
from obdconv.registry import open_repository
from obdconv.registry.options import RegistryOptions
from tests.api.conftest import DISTRIBUTION_SECRET, HARBOR_SECRET, Intake, problem
from tests.fleet.conftest import push_layout
from workers.sample_image import build_sample_image

pytestmark = pytest.mark.services

EVENTS = "/v1/events/distribution"
HARBOR = "/v1/events/harbor"
DIST = {"Authorization": DISTRIBUTION_SECRET}


@pytest.fixture(scope="module")
def pushed(intake: Intake, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Images in the registry: repository -> manifest digest (each tagged v1)."""
    layout = tmp_path_factory.mktemp("event-images") / "layout"
    out = {}
    for n, repo in enumerate(("team/app", "team/gone", "hb/app", "team/other")):
        out[repo] = build_sample_image(layout, f"img{n}", layers=1, file_bytes=16 << 10, seed=40 + n)
        push_layout(layout, f"img{n}", f"{intake.registry.host}/{repo}:v1")
    return out


def envelope(intake: Intake, repo: str, digest: str, tag: str = "v1", *, action: str = "push",
             media_type: str = mt.OCI_MANIFEST, **target: Any) -> dict[str, Any]:
    """One event as docker-registry 2.8 writes it (notifications/event.go)."""
    host = intake.registry.host
    return {"events": [{
        "id": str(uuid.uuid4()), "timestamp": "2024-05-01T10:00:00.123456789Z", "action": action,
        "target": {"mediaType": media_type, "size": 529, "digest": digest, "length": 529, "repository": repo,
                   "url": f"http://{host}/v2/{repo}/manifests/{digest}", "tag": tag, **target},
        "request": {"id": str(uuid.uuid4()), "addr": "127.0.0.1:50000", "host": host, "method": "PUT",
                    "useragent": "skopeo/1.9.3"},
        "actor": {}, "source": {"addr": "localhost:5000", "instanceID": str(uuid.uuid4())}}]}


def harbor_payload(intake: Intake, repo: str, digest: str, tag: str = "v1", kind: str = "PUSH_ARTIFACT") -> dict[str, Any]:
    namespace, name = repo.split("/", 1)
    return {"type": kind, "occur_at": 1714557600, "operator": "admin", "event_data": {
        "resources": [{"digest": digest, "tag": tag, "resource_url": f"{intake.registry.host}/{repo}:{tag}"}],
        "repository": {"date_created": 1714557500, "name": name, "namespace": namespace, "repo_full_name": repo,
                       "repo_type": "private"}}}


def post(intake: Intake, payload: Any, path: str = EVENTS, replica: int = 0,
         headers: dict[str, str] | None = None) -> requests.Response:
    headers = DIST if headers is None else headers
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return intake.apis[replica].request("POST", path, data=data,
                                        headers={**headers, "Content-Type": "application/vnd.docker.distribution.events.v2+json"})


def test_a_tagged_push_queues_one_request_however_often_it_is_delivered(intake: Intake, pushed: dict[str, str]) -> None:
    before = intake.queued()
    event = envelope(intake, "team/app", pushed["team/app"])
    first = post(intake, event)
    assert first.status_code == 202, first.text
    [accepted] = first.json()["accepted"]
    assert accepted["rule"] == "team" and accepted["outputs"] == {"overlaybd": "v1-obd", "turbo": "v1-turbo"}
    assert accepted["duplicate"] is False and intake.queued() == before + 1
    row = next(r for r in intake.rows() if r["request_id"] == accepted["request_id"])
    request = json.loads(row["request_json"])
    assert request["repository"] == f"{intake.registry.host}/team/app"
    assert (request["input_digest"], request["input_tag"]) == (pushed["team/app"], "")  # exactly what was pushed
    assert request["access"]["plain"] is True  # the registry's URL is http://
    # delivered again (a retry, another replica): the same request, nothing more queued
    event["events"][0]["id"] = str(uuid.uuid4())
    again = post(intake, event, replica=1)
    assert again.status_code == 200, again.text
    assert again.json()["accepted"][0]["request_id"] == accepted["request_id"]
    assert again.json()["accepted"][0]["duplicate"] is True
    assert intake.queued() == before + 1


def test_events_not_for_obdconv_are_ignored_not_refused(intake: Intake, pushed: dict[str, str]) -> None:
    digest = pushed["team/app"]
    cases = {
        "pull": envelope(intake, "team/app", digest, action="pull"),
        "delete": envelope(intake, "team/app", digest, action="delete"),
        "blob": envelope(intake, "team/app", "sha256:" + "b" * 64, media_type="application/octet-stream", tag=""),
        "untagged": envelope(intake, "team/app", digest, tag=""),
        "no rule": envelope(intake, "unruled/app", digest),
        "output tag": envelope(intake, "team/app", digest, tag="v1-obd"),
    }
    before, rows = intake.queued(), len(intake.rows())
    for what, event in cases.items():
        r = post(intake, event)
        assert r.status_code == 200, (what, r.text)
        assert r.json()["accepted"] == [] and len(r.json()["ignored"]) == 1, what
    reasons = [post(intake, event).json()["ignored"][0]["reason"] for event in cases.values()]
    assert "only pushes convert" in reasons[0] and "by digest alone" in reasons[3]
    assert "no rule matches" in reasons[4] and "is an obdconv output (rule 'team'" in reasons[5]
    assert (intake.queued(), len(intake.rows())) == (before, rows)


def test_a_manifest_with_overlaybd_annotations_is_never_converted(intake: Intake, pushed: dict[str, str]) -> None:
    """obdconv's own output pushed under a tag no template explains is recognised by its layers."""
    repo = open_repository(f"{intake.registry.host}/team/app", RegistryOptions(plain=True))
    source = json.loads(repo.get_manifest(pushed["team/app"]).data)
    for layer in source["layers"]:
        layer["annotations"] = {mt.ANNOTATION_BLOB_DIGEST: layer["digest"], mt.ANNOTATION_VERSION: "0.1.0"}
    digest = repo.put_manifest(json.dumps(source).encode(), mt.OCI_MANIFEST, "looks-ordinary")
    before = intake.queued()
    r = post(intake, envelope(intake, "team/app", digest, tag="looks-ordinary"))
    assert r.status_code == 200, r.text
    assert "overlaybd annotations" in r.json()["ignored"][0]["reason"]
    assert intake.queued() == before


def _deleted_manifest(intake: Intake, pushed: dict[str, str]) -> str:
    repo = open_repository(f"{intake.registry.host}/team/gone", RegistryOptions(plain=True))
    digest = pushed["team/gone"]
    if repo.head_manifest(digest) is not None:
        repo.delete_manifest(digest)
    return digest


@pytest.mark.parametrize("case", ["no secret", "wrong secret", "not json", "unknown field", "unknown target field",
                                  "not a repository", "invalid output tag", "deleted manifest", "bad digest",
                                  "one bad event spoils the delivery"])
def test_bad_deliveries_are_refused_whole_and_queue_nothing(intake: Intake, pushed: dict[str, str], case: str) -> None:
    good = envelope(intake, "team/app", pushed["team/app"], tag=f"fresh-{uuid.uuid4().hex[:8]}")
    payload: Any = good
    headers = DIST
    expected: tuple[int, str, str]
    if case == "no secret":
        headers, expected = {}, (401, "AuthError", "without the configured secret")
    elif case == "wrong secret":
        headers, expected = {"Authorization": DISTRIBUTION_SECRET + "x"}, (401, "AuthError", "secret")
    elif case == "not json":
        payload, expected = b'{"events": [', (400, "UsageError", "not valid JSON")
    elif case == "unknown field":
        payload, expected = {**good, "extra": 1}, (422, "UsageError", "extra: unknown field")
    elif case == "unknown target field":
        good["events"][0]["target"]["colour"] = "red"
        expected = (422, "UsageError", "colour: unknown field")
    elif case == "not a repository":
        payload = envelope(intake, "Team/App!!", pushed["team/app"])
        payload["events"][0]["target"]["repository"] = "team/Bad Name!!"
        expected = (422, "UsageError", "is not a repository")
    elif case == "invalid output tag":
        payload = envelope(intake, "long/app", pushed["team/app"], tag="t" * 110)
        expected = (422, "UsageError", "not a valid tag")
    elif case == "deleted manifest":
        payload = envelope(intake, "team/gone", _deleted_manifest(intake, pushed))
        expected = (422, "NotFoundError", "is not in the registry")
    elif case == "bad digest":
        payload = envelope(intake, "team/app", "sha256:1234")
        expected = (422, "UsageError", "invalid digest")
    else:
        bad = envelope(intake, "team/gone", _deleted_manifest(intake, pushed))
        payload = {"events": good["events"] + bad["events"]}
        expected = (422, "NotFoundError", "is not in the registry")
    before, rows = intake.queued(), len(intake.rows())
    r = post(intake, payload, headers=headers)
    assert r.status_code == expected[0], r.text
    found = problem(r)
    assert found["error_class"] == expected[1] and expected[2] in found["detail"]
    assert (intake.queued(), len(intake.rows())) == (before, rows)


def test_harbor_push_artifact_converts_and_other_payloads_do_not(intake: Intake, pushed: dict[str, str],
                                                                 tmp_path: Path) -> None:
    harbor = {"Authorization": HARBOR_SECRET}
    before = intake.queued()
    r = post(intake, harbor_payload(intake, "hb/app", pushed["hb/app"]), HARBOR, headers=harbor)
    assert r.status_code == 202, r.text
    [accepted] = r.json()["accepted"]
    assert accepted["rule"] == "harbor" and accepted["outputs"] == {"overlaybd": "v1-obd"}
    assert intake.queued() == before + 1
    again = post(intake, harbor_payload(intake, "hb/app", pushed["hb/app"]), HARBOR, replica=1, headers=harbor)
    assert again.json()["accepted"][0]["request_id"] == accepted["request_id"] and intake.queued() == before + 1
    r = post(intake, harbor_payload(intake, "hb/app", pushed["hb/app"], kind="PULL_ARTIFACT"), HARBOR, headers=harbor)
    assert r.status_code == 200 and "only PUSH_ARTIFACT" in r.json()["ignored"][0]["reason"]
    r = post(intake, harbor_payload(intake, "hb/app", pushed["hb/app"]), HARBOR, headers=DIST)
    assert r.status_code == 401
    cloud = {"specversion": "1.0", "type": "harbor.artifact.pushed", "data": {}}
    r = post(intake, cloud, HARBOR, headers=harbor)
    assert r.status_code == 422
    assert {"specversion", "data"} <= {e["loc"][-1] for e in problem(r)["errors"] if e["msg"] == "unknown field"}
    assert intake.queued() == before + 1


def test_a_sender_without_a_secret_is_refused_and_secrets_reload(intake: Intake, pushed: dict[str, str]) -> None:
    secrets = Path(intake.env["OBDCONV_API_EVENT_SECRETS_FILE"])
    original = secrets.read_text()
    secrets.write_text(f"distribution = {json.dumps(DISTRIBUTION_SECRET)}\n")  # harbor's secret removed
    try:
        time.sleep(1.2)  # files are looked at again at most once a second
        r = post(intake, harbor_payload(intake, "hb/app", pushed["hb/app"]), HARBOR,
                 headers={"Authorization": HARBOR_SECRET})
        assert r.status_code == 404 and "not configured" in problem(r)["detail"]
    finally:
        secrets.write_text(original)
        time.sleep(1.2)
    r = post(intake, harbor_payload(intake, "hb/app", pushed["hb/app"]), HARBOR, headers={"Authorization": HARBOR_SECRET})
    assert r.status_code == 200  # the secret is back (the push was queued by an earlier test: a duplicate)
    metrics = intake.api.request("GET", "/metrics").text
    assert 'obdconv_api_events_total{outcome="refused",sender="harbor"}' in metrics
