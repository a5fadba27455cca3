"""One way to turn a hub error into an HTTP response, used by every app."""

from __future__ import annotations

from starlette.responses import JSONResponse

from ..errors import HubError


def error_response(exc: HubError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(int(exc.retry_after))
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=headers)
