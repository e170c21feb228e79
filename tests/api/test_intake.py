"""POST/GET /v1/conversions, cancel, auth, limits and health against two real API replicas (uvicorn
processes) sharing a real Redis and SQLite; no workers, so everything queued stays in `control`."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest

from obdconv.status import open_status_database, record_success
from tests.api.conftest import (
    LIMITED_RATE,
    RATE_WINDOW,
    TOKEN_LIMITED,
    TOKEN_OTHER,
    TOKEN_TEAM,
    Intake,
    problem,
)

pytestmark = pytest.mark.services

HOST = "127.0.0.1:5999"  # POST never contacts the registry: any host the token's patterns allow


def body(repo: str = f"{HOST}/team/app", **extra: Any) -> dict[str, Any]:
    return {"repository": repo, "input_tag": "v1", "overlaybd_tag": "v1-obd", **extra}


def queued_ids(intake: Intake) -> list[str]:
    """Task ids of the messages waiting in the `control` queue (kombu's Redis message JSON)."""
    return [json.loads(raw)["headers"]["id"] for raw in intake.redis.client(0).lrange("control", 0, -1)]


def test_submit_answers_202_and_the_request_reads_back(intake: Intake) -> None:
    r = intake.api.request("POST", "/v1/conversions", TOKEN_TEAM, json=body(turbo_tag="v1-turbo", platforms=["linux/amd64"]))
    assert r.status_code == 202, r.text
    accepted = r.json()
    request_id = accepted["request_id"]
    assert accepted["status_url"] == r.headers["Location"] == f"/v1/conversions/{request_id}"
    assert request_id in queued_ids(intake)  # obdconv.convert, task id = request id
    # any replica reads it back: the PENDING row was written before the message was sent
    got = intake.apis[1].request("GET", f"/v1/conversions/{request_id}", TOKEN_TEAM)
    assert got.status_code == 200, got.text
    status = got.json()
    assert (status["state"], status["source"]) == ("PENDING", f"{HOST}/team/app:v1")
    assert status["progress"] == {"manifests": [], "other": []}
    row = next(r for r in intake.rows() if r["request_id"] == request_id)
    sent = json.loads(row["request_json"])
    assert (sent["overlaybd_tag"], sent["turbo_tag"], sent["platforms"]) == ("v1-obd", "v1-turbo", ["linux/amd64"])


def test_no_token_a_wrong_token_or_a_foreign_repository_is_refused(intake: Intake) -> None:
    before = intake.queued()
    r = intake.api.request("POST", "/v1/conversions", json=body())
    assert r.status_code == 401 and problem(r)["error_class"] == "AuthError"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = intake.api.request("POST", "/v1/conversions", TOKEN_TEAM + "x", json=body())
    assert r.status_code == 401
    r = intake.api.request("GET", "/v1/conversions", headers={"Authorization": f"Basic {TOKEN_TEAM}"})
    assert r.status_code == 401
    r = intake.api.request("POST", "/v1/conversions", TOKEN_OTHER, json=body())
    assert r.status_code == 403 and "team/app" in problem(r)["detail"]
    r = intake.api.request("POST", "/v1/conversions", TOKEN_TEAM, json=body(output_repository=f"{HOST}/other/app"))
    assert r.status_code == 403 and "output_repository" in problem(r)["detail"]
    assert intake.queued() == before


@pytest.mark.parametrize(("payload", "status", "error_class", "says"), [
    (b'{"repository": "x", ', 400, "UsageError", "not valid JSON"),
    (body(colour="blue"), 422, "UsageError", "colour: unknown field"),
    (body(input_tag=5), 422, "UsageError", "input_tag"),
    (body(block_size="4096"), 422, "UsageError", "block_size"),
    (body(repo="Not A Repository!"), 422, "UsageError", "is not a repository"),
    (body(repo=f"{HOST}/team/app:v1"), 422, "UsageError", "names a tag or digest"),
    ({"repository": f"{HOST}/team/app", "input_tag": "v1"}, 422, "UsageError", "give an output tag"),
    (body(overlaybd_tag="-bad"), 422, "UsageError", "not a valid tag"),
    (body(block_size=5000), 422, "UsageError", "power of two"),
    (body(turbo_tag="t", fstype="erofs"), 422, "UnsupportedError", "erofs"),
    (body(callback_url="ftp://hooks.example/done"), 422, "UsageError", "must be http or https"),
    (body(callback_url="https://user:pw@hooks.example/done"), 422, "UsageError", "user or password"),
    (body(callback_url="not a url"), 422, "UsageError", "callback_url"),
])
def test_bad_requests_are_clear_problems_and_queue_nothing(intake: Intake, payload: Any, status: int,
                                                           error_class: str, says: str) -> None:
    before, rows = intake.queued(), len(intake.rows())
    kwargs = {"data": payload, "headers": {"Content-Type": "application/json"}} if isinstance(payload, bytes) \
        else {"json": payload}
    r = intake.api.request("POST", "/v1/conversions", TOKEN_TEAM, **kwargs)
    assert r.status_code == status, r.text
    found = problem(r)
    assert found["error_class"] == error_class
    assert says in found["detail"]
    assert (intake.queued(), len(intake.rows())) == (before, rows)


def test_idempotency_key_gives_the_same_request_on_any_replica(intake: Intake) -> None:
    key = {"Idempotency-Key": "deploy-42-attempt"}
    first = intake.apis[0].request("POST", "/v1/conversions", TOKEN_TEAM, json=body(f"{HOST}/team/idem"), headers=key)
    assert first.status_code == 202
    before = intake.queued()
    again = intake.apis[1].request("POST", "/v1/conversions", TOKEN_TEAM, json=body(f"{HOST}/team/idem"), headers=key)
    assert again.status_code == 202
    assert again.json()["request_id"] == first.json()["request_id"] and again.json()["idempotent_replay"]
    assert intake.queued() == before  # nothing queued the second time
    changed = intake.apis[1].request("POST", "/v1/conversions", TOKEN_TEAM,
                                     json=body(f"{HOST}/team/idem", overlaybd_tag="v2-obd"), headers=key)
    assert changed.status_code == 422 and "different request body" in problem(changed)["detail"]
    assert intake.queued() == before
    # keys are per token: the same key from another client is another request
    other = intake.apis[0].request("POST", "/v1/conversions", TOKEN_OTHER, json=body(f"{HOST}/other/idem"),
                                   headers=key)
    assert other.status_code == 202 and other.json()["request_id"] != first.json()["request_id"]
    bad = intake.api.request("POST", "/v1/conversions", TOKEN_TEAM, json=body(), headers={"Idempotency-Key": "a b"})
    assert bad.status_code == 400


def test_rate_limit_is_per_token_and_shared_by_replicas(intake: Intake) -> None:
    if RATE_WINDOW - time.time() % RATE_WINDOW < 10:  # do not straddle a window boundary
        time.sleep(RATE_WINDOW - time.time() % RATE_WINDOW + 0.5)
    codes = [intake.apis[i % 2].request("GET", "/v1/conversions", TOKEN_LIMITED).status_code
             for i in range(LIMITED_RATE)]
    assert codes == [200] * LIMITED_RATE
    refused = intake.apis[1].request("GET", "/v1/conversions", TOKEN_LIMITED)
    assert refused.status_code == 429
    assert problem(refused)["error_class"] == "NetworkError"
    assert 0 < int(refused.headers["Retry-After"]) <= RATE_WINDOW
    assert intake.apis[0].request("GET", "/v1/conversions", TOKEN_TEAM).status_code == 200  # others unaffected
    metrics = intake.apis[1].request("GET", "/metrics").text
    assert 'obdconv_api_rate_limited_total{token="limited"} 1.0' in metrics


def test_list_filters_paginates_and_shows_each_token_its_own(intake: Intake) -> None:
    mine = []
    for n in range(7):
        r = intake.apis[n % 2].request("POST", "/v1/conversions", TOKEN_TEAM,
                                       json=body(f"{HOST}/team/list{n % 2}", input_tag=f"v{n}"))
        mine.append(r.json()["request_id"])
    theirs = [intake.api.request("POST", "/v1/conversions", TOKEN_OTHER, json=body(f"{HOST}/other/list")).json()
              ["request_id"] for _ in range(2)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, "since": time.time() - 300}
        if cursor:
            params["cursor"] = cursor
        page = intake.api.request("GET", "/v1/conversions", TOKEN_TEAM, params=params).json()
        assert len(page["items"]) <= 3
        seen += [item["request_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(mine) <= set(seen) and not set(theirs) & set(seen)
    assert len(seen) == len(set(seen))  # no item twice across pages
    assert seen.index(mine[-1]) < seen.index(mine[0])  # newest first
    r = intake.api.request("GET", "/v1/conversions", TOKEN_TEAM, params={"repository": f"{HOST}/team/list1"})
    assert [i["request_id"] for i in r.json()["items"]] == mine[1::2][::-1]
    r = intake.api.request("GET", "/v1/conversions", TOKEN_OTHER, params={"state": "PENDING,RUNNING"})
    assert {i["request_id"] for i in r.json()["items"]} >= set(theirs)
    assert all(i["source"].startswith(f"{HOST}/other/") for i in r.json()["items"])
    r = intake.api.request("GET", "/v1/conversions", TOKEN_TEAM, params={"since": "2999-01-01T00:00:00Z"})
    assert r.json() == {"items": [], "next_cursor": None}
    assert intake.api.request("GET", f"/v1/conversions/{theirs[0]}", TOKEN_TEAM).status_code == 404
    for params, says in (({"state": "DONE"}, "state 'DONE'"), ({"cursor": "garbage!"}, "cursor"),
                         ({"since": "yesterday"}, "since"), ({"limit": 0}, "limit")):
        r = intake.api.request("GET", "/v1/conversions", TOKEN_TEAM, params=params)
        assert r.status_code == 422 and says in problem(r)["detail"], r.text


def test_cancel_ends_a_request_cancelled_and_refuses_a_finished_one(intake: Intake) -> None:
    request_id = intake.api.request("POST", "/v1/conversions", TOKEN_TEAM, json=body(f"{HOST}/team/cancel")).json()[
        "request_id"]
    r = intake.apis[1].request("POST", f"/v1/conversions/{request_id}/cancel", TOKEN_TEAM)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "CANCELLED" and r.json()["finished_at"]
    assert intake.redis.client(1).get(f"obdconv:fate:{request_id}") == b"cancelled"  # what tasks check
    assert intake.api.request("GET", f"/v1/conversions/{request_id}", TOKEN_TEAM).json()["state"] == "CANCELLED"
    again = intake.api.request("POST", f"/v1/conversions/{request_id}/cancel", TOKEN_TEAM)
    assert again.status_code == 200 and again.json()["state"] == "CANCELLED"
    assert intake.api.request("POST", f"/v1/conversions/{request_id}/cancel", TOKEN_OTHER).status_code == 404
    assert intake.api.request("POST", "/v1/conversions/no-such-request/cancel", TOKEN_TEAM).status_code == 404

    done_id = intake.api.request("POST", "/v1/conversions", TOKEN_TEAM, json=body(f"{HOST}/team/done")).json()[
        "request_id"]
    open_status_database("sqlite", intake.env["OBDCONV_DB_STR"])
    record_success(done_id, {"native": {"tag": "v1-obd", "digest": "sha256:" + "a" * 64}})
    refused = intake.api.request("POST", f"/v1/conversions/{done_id}/cancel", TOKEN_TEAM)
    assert refused.status_code == 409
    found = problem(refused)
    assert found["state"] == "SUCCESS" and "already ended SUCCESS" in found["detail"]
    assert intake.redis.client(1).get(f"obdconv:fate:{done_id}") is None


def test_health_readiness_metrics_and_openapi(intake: Intake) -> None:
    assert intake.api.request("GET", "/healthz").json() == {"status": "ok"}
    ready = intake.api.request("GET", "/readyz")
    assert ready.status_code == 503  # no worker in this fleet
    checks = problem(ready)["checks"]
    assert checks["broker"] == checks["result_backend"] == checks["database"] == "ok"
    assert checks["workers"].startswith("no live worker")
    spec = intake.api.request("GET", "/openapi.json").json()
    assert {"/v1/conversions", "/v1/conversions/{request_id}", "/v1/conversions/{request_id}/cancel",
            "/v1/events/distribution", "/v1/events/harbor", "/healthz", "/readyz"} <= set(spec["paths"])
    schema = spec["components"]["schemas"]["ConversionIn"]
    assert schema["additionalProperties"] is False and "callback_url" in schema["properties"]
    accepted = len(intake.rows())  # every row here was accepted by one of the two replicas (POST or event)
    totals = 0.0
    for api in intake.apis:
        for line in api.request("GET", "/metrics").text.splitlines():
            if line.startswith("obdconv_api_conversions_accepted_total{"):
                totals += float(line.split()[-1])
    assert totals == accepted
    assert 'route="/v1/conversions/{request_id}"' in intake.api.request("GET", "/metrics").text


def test_tokens_never_reach_logs_status_rows_or_task_messages(intake: Intake) -> None:
    intake.api.request("POST", "/v1/conversions", TOKEN_TEAM, json=body(f"{HOST}/team/secret"))
    intake.api.request("GET", "/v1/conversions", TOKEN_OTHER)
    places = {"API logs": "\n".join(api.log_text() for api in intake.apis),
              "status rows": json.dumps(intake.rows()),
              "Redis (task messages, ledger, results, API keys)": intake.redis_dump()}
    for token in (TOKEN_TEAM, TOKEN_OTHER, TOKEN_LIMITED):
        for where, text in places.items():
            assert token not in text, f"token found in {where}"
    # the Redis keys name tokens by name only: the hash of a token is not stored either
    assert hashlib.sha256(TOKEN_TEAM.encode()).hexdigest() not in places["Redis (task messages, ledger, results, API keys)"]
