"""HTTP errors of the API: RFC 9457 ``application/problem+json`` bodies with a stable ``code``.

Routes raise :class:`Problem`; :func:`install_handlers` turns it (and FastAPI's own 404/405/422)
into a problem document. DICOMweb routes answer with DICOM JSON where PS3.18 says so and use
problem+json for the rest. Details never carry patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An HTTP error answered as problem+json: ``status``, a stable machine ``code``, a ``detail``."""

    def __init__(self, status: int, code: str, detail: str = "", *, headers: dict[str, str] | None = None,
                 repeated: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(detail or code)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.repeated = tuple(repeated)
        """Headers that may occur more than once (several ``WWW-Authenticate`` challenges)."""


def problem_response(status: int, code: str, detail: str = "", headers: dict[str, str] | None = None,
                     repeated: Sequence[tuple[str, str]] = ()) -> JSONResponse:
    body = {"type": f"about:blank#{code}", "title": HTTPStatus(status).phrase, "status": status, "code": code}
    if detail:
        body["detail"] = detail
    response = JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)
    for name, value in repeated:
        response.headers.append(name, value)
    return response


_CODES = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "method-not-allowed",
          406: "not-acceptable", 409: "conflict", 413: "too-large", 415: "unsupported-media-type",
          422: "invalid-parameters", 503: "unavailable"}


def install_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem+json."""

    async def on_problem(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc.status, exc.code, exc.detail, exc.headers, exc.repeated)

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != HTTPStatus(exc.status_code).phrase else ""
        return problem_response(exc.status_code, _CODES.get(exc.status_code, "error"), detail,
                                dict(exc.headers) if exc.headers else None)

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem_response(400, "invalid-parameters", where)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
