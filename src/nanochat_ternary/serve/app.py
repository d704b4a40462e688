"""The FastAPI app: routes, the API key, the body limit, and OpenAI-style error bodies for everything.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``
and the chat page at ``/``. Every failure, including a 404 path, a wrong method, malformed JSON or a
bug, is answered as ``{"error": {"message", "type", "param", "code"}}``; nothing a client sends can
stop the server.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ApiError, ChatRequest, CompletionRequest, validation_error
from .service import Service

log = logging.getLogger("nanochat_ternary.serve")

MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt that fits a context of our models
_DRAIN_LIMIT = 16 * MAX_BODY  # read (and drop) at most this much of an oversized body before answering


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; 413 past ``limit`` bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"Request body too large: the limit is {limit} bytes.", param=None,
                       code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            if seen > _DRAIN_LIMIT:
                break
            continue  # keep reading so the client gets the 413, not a reset connection
        body += chunk
    if seen > limit:
        raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request ({e}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def _parse(model: type, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


class BearerAuth:
    """Pure ASGI middleware (no buffering of streamed responses): ``/v1/`` needs the bearer key."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = got.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                what = "no API key was given" if not got else "the API key is not valid"
                err = ApiError(401, f"Incorrect API key provided: {what}. Send 'Authorization: Bearer <key>' "
                                    f"with the key given to --api-key.", code="invalid_api_key")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: Service, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The app serving ``service``; with ``api_key`` every ``/v1/`` route needs ``Authorization: Bearer <key>``."""
    app = FastAPI(title="nanochat-ternary", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    try:
        page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    except FileNotFoundError:  # an install without the package data: the API still serves
        log.warning("serve/page.html is not installed; / answers with a note instead of the chat page")
        page = "<!doctype html><p>The chat page (serve/page.html) is not installed; the API at /v1/ works.</p>"

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(ApiError(e.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(ApiError(500, f"Internal error: {type(e).__name__}: {e}", type="server_error"))

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.name, "chat": service.template is not None,
                "context": service.context, "auth": api_key is not None, **service.engine.load()}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": created,
                                            "owned_by": "nanochat-ternary"}]}

    async def _answer(request: Request, chat: bool):  # type: ignore[no-untyped-def]
        data = await read_json(request, max_body)
        req = _parse(ChatRequest if chat else CompletionRequest, data)
        service.check_model(req)
        prompt, stop_ids, dropped = service.chat_prompt(req) if chat else (*service.completion_prompt(req), 0)
        extra = {"X-Truncated-Messages": str(dropped)} if dropped else {}
        if req.stream:
            lines = service.streamed(req, prompt, stop_ids, chat)
            return StreamingResponse(lines, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **extra})
        return JSONResponse(await service.whole(req, prompt, stop_ids, chat), headers=extra or None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # type: ignore[no-untyped-def]
        return await _answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):  # type: ignore[no-untyped-def]
        return await _answer(request, chat=False)

    return app
