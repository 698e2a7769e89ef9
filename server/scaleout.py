"""Scale-out on Ray Serve: N replicas of the loraplex app behind a thin router with adapter affinity.

Owns: the three Ray Serve deployments and how they cooperate.
- `Replica` (N of them): the very app `loraplex serve` runs (`create_app`, its
  lifespan, engine and registry), driven in-process through ASGI. Its
  `@serve.multiplexed` loader makes Ray route every request whose multiplexed
  id names an adapter to a replica that already has it, with Ray's per-replica
  LRU on top of the registry's own.
- `Router` (the HTTP ingress): OpenAI clients put the adapter in the JSON
  `model`, not in a header, so it reads `model` and forwards with
  `handle.options(multiplexed_model_id=...)`, streaming through a Ray
  streaming handle. Admin writes are applied on one replica; when they
  succeed they are appended to the directory's log and every other replica
  replays them before its next request (and within half a second otherwise):
  registrations, unloads, pins and blends are cluster-wide and `/v1/models`
  is the same everywhere, while adapter *weights* load lazily per replica
  from the shared store, only where requests for them land. Why not load
  everywhere: memory per replica would have to hold every adapter, which is
  what affinity routing exists to avoid.
- `Directory` (one): the admin log, and each replica's report (what it holds,
  what it served, hits and loads, where its /metrics listens), which
  `GET /cluster` shows and `GET /metrics/targets` exposes as Prometheus
  HTTP service discovery.
Background jobs (/admin/train, /admin/exports) are refused at the router: a
job's id and result live on one replica. Train with `loraplex train --register
--server ROUTER_URL`, which registers cluster-wide.

Ray is imported only inside `build_app` (the `loraplex[ray]` extra); the
default install never needs it. It does not know the engine or the registry's
internals; replicas speak to their app over ASGI.
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

# Not postponed (no `from __future__ import annotations`): FastAPI must see the router's `Request`
# annotation as a class, and Ray's class-based view resolves string annotations elsewhere.
from fastapi import Request

log = logging.getLogger("loraplex.scaleout")

ADMIN_WRITE_PREFIXES = ("/admin/adapters", "/admin/blends", "/admin/aliases", "/v1/load_lora_adapter",
                        "/v1/unload_lora_adapter")
JOB_PREFIXES = ("/admin/train", "/admin/exports", "/admin/jobs")
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
FORWARDED_HEADERS = ("content-type", "retry-after", "x-request-id", "cache-control")
# Never kept in the directory's log: a replay carries the replica's own admin credentials.
SECRET_HEADERS = ("authorization", "cookie", "proxy-authorization", "x-api-key")
SYNC_INTERVAL_S = 0.5


def affinity_key(body: bytes, known: set[str]) -> str:
    """The adapter a completion request is for, or "" (base model, per-request mix, unknown name)."""
    try:
        req = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(req, dict) or not isinstance(req.get("model"), str) or req.get("adapters"):
        return ""
    model = req["model"]
    name = model.split(":", 1)[1] if ":" in model else model
    return name if name in known else ""


def is_admin_write(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "PATCH", "DELETE") and path.startswith(ADMIN_WRITE_PREFIXES)


async def asgi_call(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                    client: str) -> AsyncIterator[Any]:
    """Run one HTTP request through an ASGI app; yield {"status", "headers"} first, then body chunks.

    Closing the iterator early (the caller went away) tells the app the client disconnected.
    """
    sent: asyncio.Queue[Any] = asyncio.Queue()
    done = asyncio.Event()
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": (client, 0), "server": ("loraplex-replica", 0)}

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            done.set()
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            msg = await sent.get()
            if msg is None:
                break
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"],
                       "headers": {k.decode(): v.decode() for k, v in msg.get("headers", [])}}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body"):
                    break
    finally:
        gone.set()
        if not done.is_set():
            await asyncio.wait_for(asyncio.shield(task), 30)


async def collect(chunks: AsyncIterator[Any]) -> dict:
    head, body = None, b""
    async for item in chunks:
        if isinstance(item, dict):
            head = item
        else:
            body += item
    return {**(head or {"status": 500, "headers": {}}), "body": body}


class ReplicaServer:
    """One loraplex app in a Ray Serve replica. The multiplexed loader is added by `build_app`."""

    # Set by build_app's subclass: Ray's @serve.multiplexed loader for one adapter.
    adapter: Callable[[str], Awaitable[Any]]

    async def __init__(self, config_path: str | None, env: dict[str, str],  # type: ignore[misc]
                       directory: Any):  # Ray awaits an async actor constructor
        from ray import serve

        from .app import create_app
        from .config import load_config

        cfg = load_config(config_path, environ={**os.environ, **env})
        ctx = serve.get_replica_context()
        self.id = str(getattr(ctx, "replica_tag", None) or ctx.replica_id.unique_id)
        # Announced before the app reads the store's state file: the directory keeps every
        # operation from here on until this replica has applied it (see Directory).
        await directory.report.remote(self.id, {"applied": 0, "held": [], "loads": {}, "hits": {}, "registered": [],
                                                "base": "", "metrics": "", "at": time.time()})
        self.app = create_app(cfg)
        self.state = self.app.state.loraplex
        self.directory = directory
        self._stack = AsyncExitStack()
        await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))
        deadline = time.monotonic() + 900
        while not self.state.ready:
            if self.state.load_error or time.monotonic() > deadline:
                raise RuntimeError(self.state.load_error or "the replica's model did not load in time")
            await asyncio.sleep(0.1)
        self.applied = 0
        self.held: set[str] = set()                # adapters in Ray's multiplex cache here
        self.loads: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self._sync_lock = asyncio.Lock()           # one replay of the admin log at a time
        self.metrics_url = self._start_metrics()
        self._poller = asyncio.create_task(self._poll())

    def _start_metrics(self) -> str:
        """This replica's /metrics on its own port, so Prometheus scrapes replicas one by one: on
        `server.host`, and only where `server.metrics_access` is public (prometheus_client's server
        has no auth; otherwise scrape the router's replicas through an authenticated proxy)."""
        import socket

        from prometheus_client import start_http_server

        cfg = self.state.config.server
        if cfg.metrics_access != "public":
            log.info("replica %s: no per-replica /metrics (server.metrics_access = %s)", self.id, cfg.metrics_access)
            return ""
        with socket.socket() as s:
            s.bind((cfg.host, 0))
            port = s.getsockname()[1]
        start_http_server(port, addr=cfg.host, registry=self.state.metrics.registry)
        import ray

        host = ray.util.get_node_ip_address() if cfg.host in ("0.0.0.0", "::") else cfg.host
        return f"{host}:{port}"

    async def _load_adapter(self, name: str) -> "_Held":
        """Called by Ray's multiplex wrapper when `name` is not cached on this replica: load it here."""
        self.loads[name] = self.loads.get(name, 0) + 1
        try:
            lease = await self.state.registry.acquire(name)
            self.state.registry.release(lease)
        except Exception as e:  # unknown or refused: the request itself gets the app's own 4xx
            log.info("replica %s: %s not loaded: %s", self.id, name, e)
        self.held.add(name)
        return _Held(name, self.held)

    async def _poll(self) -> None:
        while True:
            try:
                await self._sync()
            except Exception:
                log.exception("replica %s: sync with the directory failed", getattr(self, "id", "?"))
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def _sync(self) -> None:
        """Replay admin writes other replicas applied, then report what this replica holds."""
        async with self._sync_lock:
            for op in await self.directory.since.remote(self.applied):
                if op["origin"] != self.id:
                    # The log holds no credentials: the replay is this replica's own admin call.
                    token = self.state.admin_token
                    headers = op["headers"] + ([("authorization", f"Bearer {token}")] if token else [])
                    out = await collect(asgi_call(self.app, op["method"], op["path"], "", headers,
                                                  op["body"].encode(), "127.0.0.1"))
                    if out["status"] >= 400:
                        log.info("replica %s: replaying %s %s gave %s", self.id, op["method"], op["path"],
                                 out["status"])
                self.applied = op["seq"]
            await self.directory.report.remote(self.id, self.report())

    def report(self) -> dict:
        return {"applied": self.applied, "held": sorted(self.held), "loads": dict(self.loads),
                "hits": dict(self.hits), "registered": [e.name for e in self.state.registry.entries()],
                "base": self.state.registry.base_id, "metrics": self.metrics_url, "at": time.time()}

    async def _prepare(self, seq: int) -> None:
        """Before a request: replay the log only if the router has seen writes this replica has
        not (`seq`), so a request costs no directory call otherwise; the timer catches up the rest."""
        from ray import serve

        if seq > self.applied:
            await self._sync()
        name = serve.get_multiplexed_model_id()
        if name:
            if name in self.held:
                self.hits[name] = self.hits.get(name, 0) + 1
            await self.adapter(name)

    async def handle(self, req: dict) -> dict:
        await self._prepare(req.get("seq", 0))
        out = await collect(asgi_call(self.app, req["method"], req["path"], req["query"], req["headers"],
                                      req["body"], req["client"]))
        return {**out, "replica": self.id}

    async def handle_stream(self, req: dict) -> AsyncIterator[Any]:
        await self._prepare(req.get("seq", 0))
        async for item in asgi_call(self.app, req["method"], req["path"], req["query"], req["headers"],
                                    req["body"], req["client"]):
            yield item

    async def __del__(self):
        await self._stack.aclose()


class _Held:
    """What the multiplex cache holds per adapter; dropping it (Ray's LRU) forgets the affinity."""

    def __init__(self, name: str, held: set[str]):
        self.name, self._held = name, held

    def __del__(self):
        self._held.discard(self.name)


class Directory:
    """The cluster's admin log and the replicas' reports (one instance).

    The log stays bounded: an operation every live replica has applied is dropped, since each
    replica applied it to the shared store's state file, which a replica that starts later reads
    first. A replica silent for REPORT_STALE_S is not waited for (it replays what is left, or
    restarts from the state file)."""

    REPORT_STALE_S = 60.0

    def __init__(self):
        self.ops: list[dict] = []
        self.last_seq = 0
        self.replicas: dict[str, dict] = {}

    def append(self, op: dict) -> int:
        self.last_seq += 1
        self.ops.append({**op, "seq": self.last_seq})
        return self.last_seq

    def since(self, seq: int) -> list[dict]:
        return [op for op in self.ops if op["seq"] > seq]

    def report(self, replica: str, status: dict) -> None:
        self.replicas[replica] = status
        now = time.time()
        live = [r["applied"] for r in self.replicas.values() if now - r.get("at", now) < self.REPORT_STALE_S]
        if live:
            floor = min(live)
            self.ops = [op for op in self.ops if op["seq"] > floor]

    def view(self) -> dict:
        return {"version": self.last_seq, "log_length": len(self.ops), "replicas": self.replicas}

    def known(self) -> list[str]:
        names: set[str] = set()
        for r in self.replicas.values():
            names.update(r["registered"])
        return sorted(names)


def build_app(args: dict) -> Any:
    """The Ray Serve application (also an application builder: `serve run server.scaleout:build_app
    config=config.toml replicas=2`). Keys: config, replicas, cpus_per_replica, max_adapters_per_replica, env."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from ray import serve

    config_path = args.get("config")
    config_path = str(Path(config_path).resolve()) if config_path else None
    replicas = int(args.get("replicas", 2))
    per_replica = int(args.get("max_adapters_per_replica", 8))
    env = dict(args.get("env") or {})

    class Replica(ReplicaServer):
        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def adapter(self, name: str):
            return await self._load_adapter(name)

    router_app = FastAPI(title="loraplex (Ray Serve router)")

    @serve.ingress(router_app)
    class Router:
        def __init__(self, replica: Any, directory: Any, config_path: str | None, env: dict[str, str]):
            from .config import load_config

            self.replica, self.directory = replica, directory
            self.cfg = load_config(config_path, environ={**os.environ, **env})
            self.admin_token, self.api_keys = self.cfg.admin_token(), self.cfg.api_keys()
            self.seq = 0   # the directory's last write this router made: replicas behind it replay first

        @router_app.get("/cluster")
        async def cluster(self, request: Request):
            if (denied := _admin_denied(request, self.admin_token, self.api_keys)) is not None:
                return denied
            return await self.directory.view.remote()

        @router_app.get("/metrics/targets")
        async def targets(self, request: Request):
            if (denied := _admin_denied(request, self.admin_token, self.api_keys)) is not None:
                return denied
            view = await self.directory.view.remote()
            return [{"targets": [r["metrics"]], "labels": {"replica": rid}} for rid, r in view["replicas"].items()
                    if r.get("metrics")]

        @router_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def forward(self, path: str, request: Request):
            path = "/" + path
            if path.startswith(JOB_PREFIXES):
                # Credentials first, as the app would: the refusal says nothing to a caller who may not ask.
                if (denied := _admin_denied(request, self.admin_token, self.api_keys)) is not None:
                    return denied
                return JSONResponse({"error": {
                    "message": "background jobs are not served through the Ray router (a job lives on one "
                               "replica); run `loraplex train --register --server ROUTER_URL` instead",
                    "type": "invalid_request_error", "param": None, "code": "not_supported_in_cluster"}},
                    status_code=400)
            body = await _capped_body(request, self.cfg.server.max_body_bytes)
            if body is None:
                return JSONResponse({"error": {"message": f"the body is larger than server.max_body_bytes "
                                               f"({self.cfg.server.max_body_bytes})", "type": "invalid_request_error",
                                               "param": None, "code": "body_too_large"}}, status_code=413)
            req: dict[str, Any] = {"method": request.method, "path": path, "query": request.url.query, "body": body,
                   "headers": [(k, v) for k, v in request.headers.items() if k.lower() != "host"],
                   "client": request.client.host if request.client else "127.0.0.1", "seq": self.seq}
            mid = ""
            if path in INFERENCE_PATHS:
                mid = affinity_key(body, set(await self.directory.known.remote()))
                if _wants_stream(body):
                    chunks = self.replica.options(stream=True, multiplexed_model_id=mid).handle_stream.remote(req)
                    head = await chunks.__anext__()
                    return StreamingResponse(_bytes(chunks), status_code=head["status"],
                                             headers=_headers(head["headers"]))
            out = await self.replica.options(multiplexed_model_id=mid).handle.remote(req)
            if is_admin_write(request.method, path) and out["status"] < 300:
                self.seq = await self.directory.append.remote({
                    "method": req["method"], "path": path,
                    "headers": [(k, v) for k, v in req["headers"] if k.lower() not in SECRET_HEADERS],
                    "body": body.decode(errors="replace"), "origin": out["replica"]})
            return Response(out["body"], status_code=out["status"], headers=_headers(out["headers"]))

    directory = serve.deployment(name="directory", ray_actor_options={"num_cpus": 0})(Directory).bind()
    replica = serve.deployment(name="replica", num_replicas=replicas, max_ongoing_requests=256,
                               ray_actor_options={"num_cpus": float(args.get("cpus_per_replica", 0))}
                               )(Replica).bind(config_path, env, directory)
    return serve.deployment(name="router", max_ongoing_requests=1024,
                            ray_actor_options={"num_cpus": 0})(Router).bind(replica, directory, config_path, env)


def _admin_denied(request: Request, token: str, api_keys: list[str]) -> Any:
    """None when the caller may see the cluster's admin views, else the error response: the very
    rule and answer of the app's admin routes (`admin_refusal`), so the router is no weaker."""
    from .api.deps import admin_refusal, bearer
    from .api.errors import error_response

    refused = admin_refusal(bearer(request), token, api_keys, request.client.host if request.client else "")
    return None if refused is None else error_response(refused)


async def _capped_body(request: Request, cap: int) -> bytes | None:
    """The body, or None past `cap` bytes (read no further than that)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _wants_stream(body: bytes) -> bool:
    try:
        req = json.loads(body)
    except ValueError:
        return False
    return isinstance(req, dict) and req.get("stream") is True


def _headers(h: dict) -> dict:
    return {k: v for k, v in h.items() if k.lower() in FORWARDED_HEADERS}


async def _bytes(chunks: Any) -> AsyncIterator[bytes]:
    async for item in chunks:
        if isinstance(item, (bytes, bytearray)):
            yield bytes(item)
