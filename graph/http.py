"""The HTTP edge without Ray: the FastAPI app, request ids, body limits and error mapping.

Every error leaves as JSON in OpenAI's `{"error": {...}}` shape with the request id, and the
`X-Request-ID` header; bad input is 422 naming the field and its allowed range; nothing unexpected
leaks a traceback.
"""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from graph.auth import OPEN_CALLER, Caller
from graph.errors import PayloadTooLarge, PrismError

log = logging.getLogger("prism.http")

_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
DEFAULT_MAX_BODY_BYTES = 64 * 1024


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "unknown"


def error_response(err: PrismError, request_id: str) -> JSONResponse:
    """The JSON error response; X-Request-ID is added by the middleware (or Serve's proxy)."""
    return JSONResponse(status_code=err.status_code, content=err.body(request_id), headers=dict(err.headers))


def internal_error(exc: Exception, request_id: str) -> JSONResponse:
    """A bug's 500: logged with its traceback; the client gets the exception's class and the request id only."""
    log.error("unexpected error in request %s", request_id, exc_info=exc)
    return error_response(PrismError(f"internal error ({type(exc).__name__}); see the server log for this "
                                     "request id"), request_id)


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def validation_message(errors: list[dict]) -> tuple[str, str | None, list[dict]]:
    """(message, first field, details) for pydantic errors: each names its field and the rule it broke."""
    details, msgs = [], []
    for err in errors:
        if err.get("type") == "json_invalid":
            field, msg = "body", f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        elif err.get("type") == "model_attributes_type" or (
                err.get("loc") == ("body",) and err.get("type") != "missing"):
            field, msg = "body", "request body must be a JSON object"
        else:
            field = _field_of(tuple(err.get("loc", ())))
            msg = f"`{field}`: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}"
            if err.get("type") == "missing":
                msg = f"`{field}` is required"
            elif "input" in err and not isinstance(err["input"], dict | list) and len(repr(err["input"])) <= 80:
                msg += f" (got {err['input']!r})"
        msgs.append(msg)
        details.append({"field": field, "message": msg, "type": err.get("type")})
    return "; ".join(msgs), details[0]["field"] if details else None, details


class RequestIdAndLimits:
    """Request id and body limit, as plain ASGI: Starlette's BaseHTTPMiddleware costs a task group and a streamed
    copy of every response, which a flood of refusals pays per request (benchmarks/RESULTS.md, issue 16)."""

    def __init__(self, app, outer: FastAPI):
        self.app, self.outer = app, outer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        behind = self.outer.state.behind_serve_proxy
        request_id = rid if (behind and rid) or _RID_OK.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id  # what request.state.request_id reads
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not behind:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        length = headers.get(b"content-length", b"").decode("latin-1")
        limit = self.outer.state.max_body_bytes
        if length.isdigit() and int(length) > limit:
            response = error_response(PayloadTooLarge(
                f"request body is {length} bytes; the limit is {limit} bytes", param="body"), request_id)
            return await response(scope, receive, send_with_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a handler bug that escaped FastAPI's handlers: log it, never leak it
            if started:
                raise
            await internal_error(exc, request_id)(scope, receive, send_with_id)


class Authenticate:
    """The request's caller from its `Authorization: Bearer` key (graph/auth.py), before the body is read: a call
    without a valid key where one is required is a 401 however malformed its body. Handlers read
    `request.state.caller`. Until the ingress sets `outer.state.auth`, every caller is trusted (auth off)."""

    def __init__(self, app, outer: FastAPI):
        self.app, self.outer = app, outer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        auth = self.outer.state.auth
        state = scope.setdefault("state", {})
        if auth is None:
            state["caller"] = OPEN_CALLER
            return await self.app(scope, receive, send)
        root, path = scope.get("root_path") or "", scope.get("path") or "/"
        relative = path[len(root):] or "/" if root and path.startswith(root) else path
        header = dict(scope.get("headers") or ()).get(b"authorization")
        try:
            state["caller"] = auth.caller(header.decode("latin-1") if header else None, relative)
        except PrismError as err:
            return await error_response(err, state.get("request_id", "unknown"))(scope, receive, send)
        await self.app(scope, receive, send)


def caller_of(request: Request) -> Caller:
    return getattr(request.state, "caller", OPEN_CALLER)


def make_app(max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app with middleware and error handlers; routes are added by the ingress."""
    app = FastAPI(title="Prism", version="0.1.0",
                  description="Intent-routed image generation on Ray Serve. OpenAI Images API compatible.")
    app.state.max_body_bytes = max_body_bytes
    # Behind Ray Serve the proxy assigns X-Request-ID (the client's, or a new one), forwards it to the replica
    # and echoes it on every response; the ingress then takes that id verbatim and adds no header of its own.
    app.state.behind_serve_proxy = False

    app.state.auth = None  # graph.auth.Authenticator, set by the ingress from its profile
    # Starlette runs the last one added first: request id and body limit, then the caller.
    app.add_middleware(Authenticate, outer=app)
    app.add_middleware(RequestIdAndLimits, outer=app)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        from graph.errors import InvalidRequest

        msg, field, details = validation_message(list(exc.errors()))
        return error_response(InvalidRequest(msg, param=field, details=details), request_id_of(request))

    @app.exception_handler(PrismError)
    async def on_prism(request: Request, exc: PrismError):
        from graph.errors import CapacityError

        # A designed refusal is counted (prism_rejections_total), not logged: a flood would write a line per request.
        if exc.status_code >= 500 and not isinstance(exc, CapacityError):
            log.warning("request %s failed: %s %s", request_id_of(request), exc.status_code, exc.message)
        return error_response(exc, request_id_of(request))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        return internal_error(exc, request_id_of(request))

    return app
