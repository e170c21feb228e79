"""Pure logic of the API: error classes -> problem responses (FastAPI's TestClient on a bare app),
the request model against ConversionRequest, and reading registry payloads into pushes."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from api.event_payloads import (
    DistributionEnvelope,
    HarborPayload,
    Push,
    Skipped,
    distribution_pushes,
    harbor_pushes,
)
from api.models import ConversionIn, known_request_fields
from api.problems import Problem, install_handlers
from obdconv import errors
from obdconv.request import ConversionRequest, RegistryAccess


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


def app_raising() -> TestClient:
    app = FastAPI()
    install_handlers(app)

    @app.get("/raise/{name}")
    def raise_error(name: str) -> None:
        raise getattr(errors, name)(f"{name} happened")

    @app.get("/problem")
    def problem() -> None:
        raise Problem(429, "NetworkError", "slow down", headers={"Retry-After": "7"}, token="ci")

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("secret internals")

    @app.post("/strict")
    def strict(body: Strict) -> dict[str, str]:
        return {"name": body.name}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(("name", "status", "exit_code"), [
    ("UsageError", 422, 64), ("UnsupportedError", 422, 69), ("FormatError", 422, 65), ("IntegrityError", 422, 65),
    ("UnsafePathError", 422, 65), ("BadInputError", 422, 65), ("NotFoundError", 404, 66), ("AuthError", 403, 77),
    ("NetworkError", 503, 75), ("DatabaseError", 503, 75), ("ObdconvError", 500, 70),
])
def test_each_error_class_is_a_problem_with_its_cli_name_and_exit_code(name: str, status: int, exit_code: int) -> None:
    r = app_raising().get(f"/raise/{name}")
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == {"type": f"urn:obdconv:problem:{name}", "title": r.json()["title"], "status": status,
                        "detail": f"{name} happened", "error_class": name, "exit_code": exit_code,
                        "instance": f"/raise/{name}"}


def test_other_failures_are_problems_too() -> None:
    client = app_raising()
    r = client.get("/problem")
    assert (r.status_code, r.headers["Retry-After"], r.json()["token"]) == (429, "7", "ci")
    r = client.get("/bug")
    assert r.status_code == 500 and r.json()["error_class"] == "ObdconvError"
    assert "secret internals" not in r.text  # the message of an unexpected error is not shown
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error_class"] == "NotFoundError"
    r = client.post("/strict", json={"name": "a", "nmae": "b"})
    assert r.status_code == 422 and r.json()["detail"] == "nmae: unknown field"
    r = client.post("/strict", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"] == "the request body is not valid JSON"


def test_the_request_model_is_conversion_request_without_worker_only_fields() -> None:
    access = {f.name for f in dataclasses.fields(RegistryAccess)}
    modelled = set(ConversionIn.model_fields)
    assert modelled <= known_request_fields() | access  # nothing the fleet would not understand
    worker_only = {"workdir", "reserve", "db_type", "db_str_ref", "db_required", "no_upload", "disable_sparse", "access",
                   "base_layer_digest"}  # pinned by the fleet when it plans the request
    assert known_request_fields() - modelled == worker_only
    body = ConversionIn(repository="reg.example/app", input_digest="sha256:" + "a" * 64, turbo_tag="t", plain=True,
                        credential_ref="team", callback_url="https://hooks.example/x", flatten=True)
    request = body.to_request("reg.example/app", "reg.example/out")
    assert isinstance(request, ConversionRequest)
    assert (request.output_repository, request.turbo_tag, request.flatten) == ("reg.example/out", "t", True)
    assert request.access == RegistryAccess(plain=True, credential_ref="team")
    assert request.callback_url == "https://hooks.example/x"


DIGEST = "sha256:" + "c" * 64


def test_distribution_envelopes_become_tagged_pushes() -> None:
    envelope = DistributionEnvelope.model_validate({"events": [
        {"id": "e1", "action": "push", "target": {"mediaType": "application/vnd.oci.image.index.v1+json",
                                                    "digest": DIGEST, "repository": "apps/web", "tag": "1.0",
                                                    "url": "https://reg.example/v2/apps/web/manifests/" + DIGEST},
         "request": {"host": "ignored.example", "method": "PUT"}},
        {"id": "e2", "action": "push", "target": {"mediaType": "application/octet-stream", "digest": DIGEST,
                                                    "repository": "apps/web"}},
        {"id": "e3", "action": "pull", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                    "digest": DIGEST, "repository": "apps/web", "tag": "1.0"}},
        {"id": "e4", "action": "push", "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                                    "digest": DIGEST, "repository": "apps/web"},
         "request": {"host": "reg.example:5000"}},
        {"id": "e5", "action": "push", "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                                    "digest": DIGEST, "repository": "apps/web", "tag": "2"},
         "request": {"host": "reg.example:5000"}},
    ]})
    pushes = distribution_pushes(envelope)
    assert pushes[0] == Push("e1", "reg.example", "https", "apps/web", DIGEST, "1.0")
    assert [type(p) for p in pushes[1:4]] == [Skipped, Skipped, Skipped]
    assert pushes[4] == Push("e5", "reg.example:5000", "", "apps/web", DIGEST, "2")  # no URL: the request's host


def test_harbor_payloads_become_tagged_pushes() -> None:
    payload = HarborPayload.model_validate({"type": "PUSH_ARTIFACT", "occur_at": 1586922308, "operator": "admin",
                                            "event_data": {"resources": [
                                                {"digest": DIGEST, "tag": "latest",
                                                 "resource_url": "hub.harbor.com/test-webhook/debian:latest"},
                                                {"digest": DIGEST, "tag": "", "resource_url": "hub.harbor.com/x@" + DIGEST}],
                                                "repository": {"date_created": 1586922308, "name": "debian",
                                                               "namespace": "test-webhook",
                                                               "repo_full_name": "test-webhook/debian",
                                                               "repo_type": "private"}}})
    pushes = harbor_pushes(payload)
    assert pushes[0] == Push("PUSH_ARTIFACT:0", "hub.harbor.com", "", "test-webhook/debian", DIGEST, "latest")
    assert isinstance(pushes[1], Skipped)
    other = HarborPayload.model_validate({"type": "SCANNING_COMPLETED", "event_data": {}})
    assert isinstance(harbor_pushes(other)[0], Skipped)
