"""/v1/conversions: enqueue, read, list and cancel conversion requests (bearer token required).

POST answers 202 with the request id and its status URL as soon as the request is queued (the
PENDING status row is written first, as `obdconv submit` does). With an `Idempotency-Key` header a
retried POST gets the first POST's request id (api/idempotency.py). Reading and cancelling are
limited to requests whose source repository the token's patterns allow (others are 404).
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from api.auth import authenticated, require_repository
from api.idempotency import fingerprint
from api.listing import list_visible, parse_since, status_of, visible_row
from api.models import Accepted, ConversionIn, ConversionList, ConversionStatusOut
from api.problems import Problem
from api.service import Service, enqueue, normalize_repository
from api.tokens import ApiToken

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/conversions", tags=["conversions"])

TokenDep = Annotated[ApiToken, Depends(authenticated)]


def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


def _submit(service: Service, token: ApiToken, body: ConversionIn, idempotency_key: str | None) -> tuple[str, bool]:
    repository = normalize_repository(body.repository, "repository")
    require_repository(token, repository, "repository")
    output_repository = ""
    if body.output_repository:
        output_repository = normalize_repository(body.output_repository, "output_repository")
        require_repository(token, output_repository, "output_repository")
    request = body.to_request(repository, output_repository)
    request_id = str(uuid.uuid4())
    body_fingerprint = fingerprint(body.model_dump())
    if idempotency_key is not None:
        earlier = service.idempotency.reserve(token.name, idempotency_key, body_fingerprint, request_id)
        if earlier is not None:
            return earlier, True
    try:
        enqueue(service, request, request_id)
    except BaseException:
        if idempotency_key is not None:
            service.idempotency.release(token.name, idempotency_key, body_fingerprint, request_id)
        raise
    service.metrics.accepted.labels("api").inc()
    log.info("token %s queued %s: %s -> %s", token.name, request_id, repository,
             {k: v for k, v in (("overlaybd", request.overlaybd_tag), ("turbo", request.turbo_tag)) if v})
    return request_id, False


@router.post("", status_code=202, response_model=Accepted,
             summary="Enqueue a conversion (the request `obdconv submit` sends)")
def create_conversion(body: ConversionIn, request: Request, response: Response, token: TokenDep,
                      idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> Accepted:
    request_id, replay = _submit(_service(request), token, body, idempotency_key)
    response.headers["Location"] = f"/v1/conversions/{request_id}"
    return Accepted(request_id=request_id, status_url=f"/v1/conversions/{request_id}", idempotent_replay=replay)


@router.get("", response_model=ConversionList, summary="List requests (newest first)")
def list_conversions(request: Request, token: TokenDep,
                     state: Annotated[list[str] | None, Query(description="repeat or comma-separate")] = None,
                     repository: Annotated[str | None, Query(description="source repository, exactly")] = None,
                     since: Annotated[str | None, Query(description="submitted at or after: Unix seconds or RFC 3339")] = None,
                     limit: Annotated[int, Query(ge=1, le=500)] = 50,
                     cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
                     ) -> dict[str, Any]:
    states = [s.strip().upper() for value in state or [] for s in value.split(",") if s.strip()]
    repo = normalize_repository(repository, "repository") if repository else ""
    items, next_cursor = list_visible(_service(request), token, states=states, repository=repo,
                                      since=parse_since(since) if since else None, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{request_id}", response_model=ConversionStatusOut,
            summary="State, stage, progress per manifest and layer, outputs, error")
def get_conversion(request_id: str, request: Request, token: TokenDep) -> dict[str, Any]:
    return status_of(_service(request), token, request_id)


@router.post("/{request_id}/cancel", response_model=ConversionStatusOut,
             summary="Cancel: revoke its tasks, release its claims, end it CANCELLED (no tag moved)")
def cancel_conversion(request_id: str, request: Request, token: TokenDep) -> dict[str, Any]:
    from tasks.cancel import cancel_request

    service = _service(request)
    visible_row(service, token, request_id)
    outcome = cancel_request(service.celery, request_id)
    if not outcome.cancelled:
        if outcome.reason == "final":
            raise Problem(409, "UsageError", f"request {request_id} already ended {outcome.state}; nothing to cancel",
                          state=outcome.state)
        if outcome.reason == "committing":
            raise Problem(409, "UsageError", f"request {request_id} is tagging its outputs; it can no longer be "
                                             "cancelled (its result follows shortly)", state=outcome.state)
        raise Problem(404, "NotFoundError", f"no conversion request {request_id!r}")
    log.info("token %s cancelled %s (%d task message(s) revoked, %d claim(s) released)", token.name, request_id,
             outcome.revoked, outcome.claims_released)
    return status_of(service, token, request_id)

