"""One way to write an error, OpenAI's ``{"error": {...}}`` envelope, used by every app."""

from __future__ import annotations

from starlette.responses import JSONResponse

from ..errors import HubError


def error_json(
    status: int,
    message: str,
    error_type: str,
    code: str | int | None,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: HubError) -> JSONResponse:
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else None
    return error_json(
        exc.status,
        exc.message,
        exc.error_type,
        exc.code,
        param="model" if exc.model else None,
        headers=headers,
    )
