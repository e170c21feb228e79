"""Errors as RFC 9457 problem details (`application/problem+json`), named by obdconv's error classes.

Every error answer of the API has the body

    {"type": "urn:obdconv:problem:UsageError", "title": "Invalid request", "status": 422,
     "detail": "what is wrong, in words", "error_class": "UsageError", "exit_code": 64, ...}

`error_class` and `exit_code` are those of obdconv/errors.py, so a client handles an API answer
the way it handles `obdconv submit`'s exit: BadInputError and its subclasses are the caller's to
fix, NetworkError/DatabaseError are worth retrying later. Problems with no class of their own use
the nearest one: a missing or wrong bearer token is an AuthError (401/403), a rate limit a
NetworkError (429, retry after `Retry-After` seconds), a conflict (cancel a finished request, an
Idempotency-Key reused for another body) a UsageError (409/422).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from obdconv import errors

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:obdconv:problem:"

# Most specific first: the first class an error is an instance of gives its HTTP status.
_STATUS_OF: tuple[tuple[type[errors.ObdconvError], int], ...] = (
    (errors.NotFoundError, 404),
    (errors.BadInputError, 422),  # UsageError, UnsupportedError, FormatError, IntegrityError, ...
    (errors.AuthError, 403),
    (errors.NetworkError, 503),
    (errors.DatabaseError, 503),
    (errors.ObdconvError, 500),
)

_TITLES = {
    "UsageError": "Invalid request",
    "NotFoundError": "Not found",
    "UnsupportedError": "Not supported",
    "AuthError": "Not authorized",
    "NetworkError": "Temporarily unavailable, retry later",
    "DatabaseError": "Database unavailable, retry later",
    "ObdconvError": "Internal error",
}


class Problem(Exception):
    """An error answer: raise it from any route or dependency."""

    def __init__(self, status: int, error_class: str, detail: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.error_class = error_class
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str = "") -> dict[str, Any]:
        cls = getattr(errors, self.error_class, errors.ObdconvError)
        out: dict[str, Any] = {
            "type": TYPE_PREFIX + self.error_class,
            "title": _TITLES.get(self.error_class, "Bad input"),
            "status": self.status,
            "detail": self.detail,
            "error_class": self.error_class,
            "exit_code": cls.exit_code,
        }
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out

    def response(self, instance: str = "") -> JSONResponse:
        return JSONResponse(self.body(instance), status_code=self.status, headers=self.headers,
                            media_type=PROBLEM_JSON)


def problem_of(error: errors.ObdconvError) -> Problem:
    """The problem for an obdconv error: its class name, the HTTP status of its nearest class."""
    status = next(code for cls, code in _STATUS_OF if isinstance(error, cls))
    return Problem(status, type(error).__name__, str(error))


def _validation_problem(error: RequestValidationError) -> Problem:
    """A body that is not JSON is a 400; JSON that does not fit the model (unknown field, wrong
    type, missing field) a 422. Each error names the field; the offending input is not echoed."""
    details = [{"loc": [str(p) for p in e.get("loc", ())],
                "msg": "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", ""),
                "type": e.get("type", "")}
               for e in error.errors()]
    if any(d["type"] == "json_invalid" for d in details):
        return Problem(400, "UsageError", "the request body is not valid JSON", errors=details)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    return Problem(422, "UsageError", f"{where}: {first['msg']}", errors=details)


def validation_problem(error: Any) -> Problem:
    """The same for a pydantic ValidationError raised while parsing a body by hand."""
    return _validation_problem(RequestValidationError(error.errors(include_input=False)))


def install_handlers(app: FastAPI) -> None:
    """Turn every error the app can meet into a problem response."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response(request.url.path)

    async def on_obdconv_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.ObdconvError)
        return problem_of(exc).response(request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_problem(exc).response(request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_class = {404: "NotFoundError", 401: "AuthError", 403: "AuthError"}.get(exc.status_code, "UsageError")
        if exc.status_code >= 500:
            error_class = "ObdconvError"
        detail = str(exc.detail) if exc.detail else "error"
        return Problem(exc.status_code, error_class, detail, headers=dict(exc.headers or {})).response(
            request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return Problem(500, "ObdconvError", f"internal error: {type(exc).__name__}").response(request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(errors.ObdconvError, on_obdconv_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
