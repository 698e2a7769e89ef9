"""What every route shares: the app's state, auth, and the body-size cap.

Owns: `AppState` (config, engine, registry, start time), the inference-key
check (constant-time comparison), the readiness guard, and an ASGI middleware
that refuses bodies over `server.max_body_bytes` with 413, whether or not the
client sent a Content-Length.
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Config
from ..engine.protocol import Engine
from ..errors import Forbidden, LoraplexError, NotReady, Unauthorized
from ..jobs import JobManager
from ..metrics import Metrics
from ..registry import Allowed, Registry
from ..scopes import Scope as KeyScope
from .errors import body as error_body


@dataclass
class AppState:
    config: Config
    engine: Engine
    registry: Registry
    api_keys: list[str]
    metrics: Metrics
    admin_token: str = ""
    started_at: int = field(default_factory=lambda: int(time.time()))
    adapters_ready: bool = False    # the store has been scanned at start-up
    load_error: str | None = None
    draining: bool = False          # SIGTERM received: not ready, new requests 503, running ones finish
    jobs: JobManager | None = None  # background training and exports
    key_scopes: dict[str, KeyScope | None] = field(default_factory=dict)  # api key -> adapters it may use

    @property
    def ready(self) -> bool:
        return not self.draining and self.engine.ready and self.adapters_ready


def allowed_of(request: Request) -> Allowed | None:
    """The adapters this request's API key may use (None: all); set by `require_inference`."""
    allowed: Allowed | None = getattr(request.state, "allowed", None)
    return allowed


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.loraplex
    return state


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    # Compare against every key, whatever matches, so timing says nothing.
    found = False
    for k in keys:
        found |= hmac.compare_digest(token.encode(), k.encode())
    return found


def _matching(token: str, keys: list[str]) -> str | None:
    """The key equal to `token`, comparing against every key so timing says nothing."""
    found = None
    for k in keys:
        if hmac.compare_digest(token.encode(), k.encode()):
            found = k
    return found


def require_inference(request: Request) -> AppState:
    """Dependency of every /v1 inference route: API key (when configured), then readiness.
    The key's scope goes in `request.state.allowed` for `allowed_of`."""
    state = get_state(request)
    request.state.allowed = None
    if state.api_keys:
        token = bearer(request)
        key = _matching(token, state.api_keys) if token is not None else None
        if key is None:
            raise Unauthorized("a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")
        scope = state.key_scopes.get(key)
        request.state.allowed = scope.allows if scope is not None else None
    if not state.ready:
        raise NotReady("the model is loading or the server is shutting down", code="not_ready")
    return state


LOOPBACK = {"127.0.0.1", "::1", "localhost"}

# Every route belongs to one class; a route in none is a build failure (tests/api/test_routes.py).
PUBLIC_PATHS = {"/health", "/ready", "/openapi.json"}
ADMIN_ALIASES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
INFERENCE_ROOT = {"/tokenize", "/detokenize", "/tokenizer_info"}   # vLLM serves these outside /v1


def route_class(path: str) -> str | None:
    """public | metrics | admin | inference, or None for a path no class covers (deny)."""
    if path in PUBLIC_PATHS or path == "/ui" or path.startswith("/ui/"):   # the console's static files
        return "public"
    if path == "/metrics":
        return "metrics"
    if path in ADMIN_ALIASES or path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if path.startswith("/v1/") or path in INFERENCE_ROOT:
        return "inference"
    return None


def require_metrics(request: Request) -> None:
    """/metrics: public, or behind an API key or the admin token (server.metrics_access)."""
    state = get_state(request)
    access = state.config.server.metrics_access
    if access == "public":
        return
    token = bearer(request)
    allowed = [state.admin_token] if state.admin_token else []
    if access == "inference":  # not a scoped key: the metrics name every adapter
        allowed += [k for k in state.api_keys if state.key_scopes.get(k) is None]
    if not allowed:
        return  # nothing configured to check against: same as the routes it mirrors
    if token is None or not _matches(token, allowed):
        raise Unauthorized(f"/metrics needs {'an API key or ' if access == 'inference' else ''}the admin token",
                           code="invalid_api_key")


def admin_refusal(token: str | None, admin_token: str, api_keys: list[str], client_host: str) -> LoraplexError | None:
    """None when these credentials may use admin routes, else the error to answer: the admin token,
    or (with none configured) a loopback client. Shared with the Ray router's own admin views."""
    if admin_token:
        if token is not None and _matches(token, [admin_token]):
            return None
        if token is not None and api_keys and _matches(token, api_keys):
            return Forbidden("an inference API key cannot use admin routes", code="admin_only")
        return Unauthorized("the admin token is required: Authorization: Bearer ADMIN_TOKEN",
                            code="invalid_admin_token")
    if client_host not in LOOPBACK and not client_host.startswith("127."):
        return Forbidden("no admin token is configured, so admin routes answer loopback clients only",
                         code="admin_loopback_only")
    return None


def require_admin(request: Request) -> AppState:
    """Dependency of every admin route: `admin_refusal`, then readiness."""
    state = get_state(request)
    refused = admin_refusal(bearer(request), state.admin_token, state.api_keys,
                            request.client.host if request.client else "")
    if refused is not None:
        raise refused
    if not state.ready:
        raise NotReady("the model is loading or the server is shutting down", code="not_ready")
    return state


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestIdMiddleware:
    """Every request gets an id: the client's `x-request-id` when it is sane, else a new one.
    It is put in `request.state.request_id` and sent back in the response's `x-request-id`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPException from body reading; our handler shapes it.
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return msg

        await self.app(scope, limited, send)

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps(error_body(f"request body over {self.max_bytes} bytes", "invalid_request_error",
                                        None, "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
