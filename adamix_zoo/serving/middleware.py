"""ASGI middleware of the server: every body is JSON whatever its content type, bearer-key auth,
and the one error response both the middleware and the server's handlers send.

Errors on the OpenAI-compatible routes (``/v1/models``, ``/v1/completions``, ``/v1/classify``)
have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so that OpenAI clients read
them; the other routes answer ``{"detail": message}``.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/classify")
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error"}  # fmt: skip
OPEN_PATHS = ("/healthz",)  # served without the API key (liveness probes)


def error_response(path: str, status: int, message: str, param: str | None = None) -> JSONResponse:
    """``{"detail": message}``, or OpenAI's error object on the OpenAI-compatible routes."""
    if not path.startswith(OPENAI_PATHS):
        return JSONResponse(status_code=status, content={"detail": message})
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": status}
    return JSONResponse(status_code=status, content={"error": body})


class JsonBodyMiddleware:
    """Read every request body as JSON, whatever content type the client sent.

    ``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``; the server takes only JSON
    bodies, so it says so to FastAPI (a body that is not JSON still gets a 400 "malformed JSON").
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class BearerAuthMiddleware:
    """Refuse (401) every request but ``OPEN_PATHS`` without ``Authorization: Bearer <api_key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
        response = error_response(scope["path"], 401, message)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
