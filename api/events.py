"""POST /v1/events/distribution and /v1/events/harbor: registry pushes become conversions.

For each delivery, in this order, and nothing is queued unless every step passed for every push
in it (a bad delivery is refused whole, with a problem naming the cause):
1. the sender's secret (api/secrets.py), compared in constant time: 401 without it; 404 when that
   sender has no secret configured (events are never taken unauthenticated);
2. the body parsed strictly (api/event_payloads.py): 400 not JSON, 422 an unknown field;
3. per tagged manifest push: the first matching rule (api/rules.py; none: ignored); a tag an
   output template could have made is ignored (obdconv's own push coming back); the source must
   be a repository, templates must give valid tags, the request must pass `validate_request`: 422;
4. the pushed manifest is read from the registry (with the rule's credential_ref from the API's
   credentials file): gone since (deleted) -> 422 NotFoundError; carrying overlaybd layer
   annotations (an obdconv output) -> ignored; registry unreachable -> 503, so the sender retries;
5. queued under a deterministic request id (uuid5 of registry, repository, digest, tag and rule):
   `obdconv:api:event:<id>` is set with SET NX (`api_event_dedup_ttl`), so the same push delivered
   again, to any replica, answers the same request id and queues nothing.

Answer: 202 when something was queued, else 200: {"accepted": [{request_id, status_url, source,
rule, outputs, duplicate}], "ignored": [{event, reason}]}. Valid events that are not for obdconv
(pulls, blobs, deletes, untagged pushes, no rule) are "ignored", never refused: the distribution
registry re-sends a refused delivery until it succeeds and sends nothing else to that endpoint
meanwhile.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from api.event_payloads import (
    DistributionEnvelope,
    HarborPayload,
    Push,
    Skipped,
    distribution_pushes,
    harbor_pushes,
)
from api.problems import Problem, validation_problem
from api.rules import Rule, render
from api.service import Service, enqueue, normalize_repository
from obdconv.errors import AuthError, BadInputError, NotFoundError, ObdconvError, UsageError
from obdconv.oci import mediatypes as mt
from obdconv.pipeline.validate import validate_request
from obdconv.registry.reference import check_digest, check_tag
from obdconv.request import ConversionRequest, RegistryAccess

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/events", tags=["registry events"])

EVENT_KEY_PREFIX = "obdconv:api:event:"
REQUEST_ID_NAMESPACE = uuid.UUID("6f2b6f0e-2d7c-5b8e-9a51-0bd0c0e0a001")  # obdconv event requests


@dataclass
class Planned:
    push: Push
    rule: Rule
    request: ConversionRequest
    request_id: str
    source: str


def event_request_id(source: str, digest: str, tag: str, rule: str) -> str:
    """The same push (delivered any number of times, to any replica) gets the same request id."""
    return str(uuid.uuid5(REQUEST_ID_NAMESPACE, f"{source}@{digest}#{tag}#{rule}"))


def _plan(service: Service, push: Push) -> Planned | Skipped:
    """Step 3 for one push: a request ready to queue, skipped, or a Problem (refused)."""
    rules = service.rule_set()
    rule = rules.match(push.repository)
    if rule is None:
        return Skipped(push.event, f"no rule matches repository {push.repository!r}")
    produced_by = rules.output_template_of(push.tag)
    if produced_by is not None:
        return Skipped(push.event, f"tag {push.tag!r} is an obdconv output (rule {produced_by[0].name!r}, "
                                   f"template {produced_by[1]!r})")
    registry = rule.registry or push.registry
    if not registry:
        raise Problem(422, "UsageError", f"event {push.event}: it names no registry host; set `registry` "
                                         f"in rule {rule.name!r}")
    try:
        source = normalize_repository(f"{registry}/{push.repository}", "pushed repository")
        check_digest(push.digest)
    except BadInputError as e:
        raise Problem(422, "UsageError", f"event {push.event}: {e}") from None
    values = {"tag": push.tag, "repository": push.repository, "name": push.repository.rsplit("/", 1)[-1],
              "registry": registry}
    tags = {}
    for field, template in (("overlaybd_tag", rule.overlaybd_tag), ("turbo_tag", rule.turbo_tag)):
        if not template:
            continue
        tag = render(template, values)
        try:
            check_tag(tag)
        except BadInputError:
            raise Problem(422, "UsageError", f"event {push.event}: rule {rule.name!r}: {field} template "
                                             f"{template!r} gives {tag!r} for tag {push.tag!r}, which is not "
                                             "a valid tag (at most 128 letters, digits, '_', '.', '-')") from None
        tags[field] = tag
    output_repository = ""
    if rule.output_repository:
        try:
            output_repository = normalize_repository(render(rule.output_repository, values), "output_repository")
        except UsageError as e:
            raise Problem(422, "UsageError", f"event {push.event}: rule {rule.name!r}: {e}") from None
    plain = rule.plain if rule.plain is not None else push.scheme == "http"
    request = ConversionRequest(
        repository=source, input_digest=push.digest, output_repository=output_repository,
        platforms=list(rule.platforms), oci=rule.oci, referrer=rule.referrer, algorithm=rule.algorithm,
        block_size=rule.block_size, vsize_gb=rule.vsize_gb, callback_url=rule.callback_url,
        callback_secret_ref=rule.callback_secret_ref,
        access=RegistryAccess(plain=plain, insecure=rule.insecure, credential_ref=rule.credential_ref), **tags)
    try:
        validate_request(request)
    except BadInputError as e:
        raise Problem(422, type(e).__name__, f"event {push.event}: rule {rule.name!r}: {e}") from None
    return Planned(push, rule, request, event_request_id(source, push.digest, push.tag, rule.name), source)


def _is_obdconv_output(repo: Any, manifest: Any) -> bool:
    """A manifest whose layers carry overlaybd annotations (for an index: its first child's)."""
    data = json.loads(manifest.data)
    if manifest.media_type in mt.INDEX_TYPES:
        children = [d for d in data.get("manifests", []) if d.get("mediaType") in mt.MANIFEST_TYPES]
        if not children:
            return False
        data = json.loads(repo.get_manifest(children[0]["digest"]).data)
    return any(key.startswith(mt.ANNOTATION_PREFIX)
               for layer in data.get("layers", []) for key in (layer.get("annotations") or {}))


def _check_registry(service: Service, planned: Planned) -> Skipped | None:
    """Step 4: the pushed manifest still exists and is not an obdconv output."""
    from tasks.context import open_repository

    where = f"{planned.source}@{planned.push.digest}"
    try:
        repo = open_repository(planned.source, planned.request.access, service.settings.credentials_file)
        try:
            manifest = repo.get_manifest(planned.push.digest)
            output = _is_obdconv_output(repo, manifest)
        finally:
            repo.close()
    except NotFoundError:
        raise Problem(422, "NotFoundError", f"event {planned.push.event}: {where} is not in the registry "
                                            "(deleted since it was pushed?)") from None
    except AuthError as e:
        raise Problem(422, "AuthError", f"event {planned.push.event}: cannot read {where}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise Problem(422, "FormatError", f"event {planned.push.event}: {where} is not a readable manifest: "
                                          f"{type(e).__name__}") from None
    if output:
        return Skipped(planned.push.event, f"{where} is an obdconv output (overlaybd annotations)")
    return None


def _queue(service: Service, planned: Planned, via: str) -> dict[str, Any]:
    """Step 5: queue once per push, whatever the number of deliveries."""
    key = EVENT_KEY_PREFIX + planned.request_id
    duplicate = not service.redis.set(key, "queued", nx=True, ex=max(1, service.settings.api_event_dedup_ttl))
    if not duplicate:
        try:
            enqueue(service, planned.request, planned.request_id)
        except BaseException:
            service.redis.delete(key)  # not queued: let the sender's retry queue it
            raise
        service.metrics.accepted.labels(via).inc()
        log.info("%s event %s: queued %s for %s@%s (rule %s)", via, planned.push.event, planned.request_id,
                 planned.source, planned.push.digest, planned.rule.name)
    outputs = {fmt: tag for fmt, tag in (("overlaybd", planned.request.overlaybd_tag),
                                         ("turbo", planned.request.turbo_tag)) if tag}
    return {"event": planned.push.event, "request_id": planned.request_id,
            "status_url": f"/v1/conversions/{planned.request_id}", "source": f"{planned.source}:{planned.push.tag}",
            "digest": planned.push.digest, "rule": planned.rule.name, "outputs": outputs, "duplicate": duplicate}


def handle_pushes(service: Service, via: str, pushes: list[Push | Skipped]) -> JSONResponse:
    """Steps 3-5 for every push of one delivery (blocking: run in the thread pool)."""
    ignored: list[Skipped] = [p for p in pushes if isinstance(p, Skipped)]
    planned: list[Planned] = []
    for push in pushes:
        if isinstance(push, Push):
            outcome = _plan(service, push)
            if isinstance(outcome, Skipped):
                ignored.append(outcome)
            else:
                planned.append(outcome)
    checked = []
    for item in planned:
        skipped = _check_registry(service, item)
        if skipped is not None:
            ignored.append(skipped)
        else:
            checked.append(item)
    accepted = [_queue(service, item, via) for item in checked]
    for item in ignored:
        log.info("%s event %s ignored: %s", via, item.event, item.reason)
    service.metrics.events.labels(via, "accepted").inc(len(accepted))
    service.metrics.events.labels(via, "ignored").inc(len(ignored))
    body = {"accepted": accepted, "ignored": [{"event": s.event, "reason": s.reason} for s in ignored]}
    return JSONResponse(body, status_code=202 if any(not a["duplicate"] for a in accepted) else 200)


async def _authenticated_body(request: Request, sender: str, header: str) -> bytes:
    service: Service = request.app.state.service
    secrets = service.event_secrets()
    if not secrets.configured(sender):
        raise Problem(404, "NotFoundError", f"{sender} events are not configured on this API "
                                            "(no secret for them in the event secrets file)")
    if not secrets.matches(sender, request.headers.get(header)):
        raise Problem(401, "AuthError", f"{sender} event without the configured secret in the {header} header")
    return await request.body()


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_problem(e) from None


async def _handle(request: Request, via: str, pushes_of: Any, model: type[BaseModel], header: str) -> JSONResponse:
    service: Service = request.app.state.service
    try:
        body = await _authenticated_body(request, via, header)
        pushes = pushes_of(_parse(model, body))
        return await run_in_threadpool(handle_pushes, service, via, pushes)
    except (Problem, ObdconvError):
        service.metrics.events.labels(via, "refused").inc()
        raise


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.post("/distribution", summary="CNCF distribution registry notifications",
             openapi_extra=_body_doc(DistributionEnvelope), status_code=202)
async def distribution_events(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    return await _handle(request, "distribution", distribution_pushes, DistributionEnvelope,
                         service.settings.api_distribution_header)


@router.post("/harbor", summary="Harbor webhook (PUSH_ARTIFACT, payload format Default)",
             openapi_extra=_body_doc(HarborPayload), status_code=202)
async def harbor_events(request: Request) -> JSONResponse:
    return await _handle(request, "harbor", harbor_pushes, HarborPayload, "Authorization")
