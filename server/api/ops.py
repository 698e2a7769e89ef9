"""Operations routes: /health (liveness), /ready (readiness) and /metrics (Prometheus).

Owns: what each answers and when. /health and /ready are public; /metrics is
public by default and can require an API key or the admin token
(`server.metrics_access`). /ready is 503 while loading, draining, or when the
engine's watchdog says its loop has stalled.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import get_state, require_metrics
from .errors import body as error_body

router = APIRouter()


@router.get("/health")
async def health() -> Any:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Any:
    state = get_state(request)
    if state.ready:
        return {"status": "ready", "model": state.engine.model_id}
    message = state.load_error or ("the server is shutting down" if state.draining else
                                   "the engine loop is stalled" if state.engine.stalled else
                                   "the model is loading")
    return JSONResponse(error_body(message, "service_unavailable_error", None, "not_ready"), status_code=503)


@router.get("/metrics", dependencies=[Depends(require_metrics)])
async def metrics(request: Request) -> Any:
    return Response(get_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
