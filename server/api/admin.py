"""Admin routes: adapters, blends and aliases on a live server, under /admin (and vLLM's routes).

Owns: the admin wire shapes and their mapping onto the registry's operations;
every route here sits behind the admin token (see `deps.require_admin`). The
inference API never changes the registry; only these routes do.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import Conflict, InvalidRequest
from ..lora.blend import BlendSpec
from ..registry import Entry
from .deps import AppState, require_admin

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadBody(_Body):
    name: str
    path: str
    pinned: bool = False
    replace: bool = False


class PinBody(_Body):
    pinned: bool


class BlendPart(_Body):
    name: str
    weight: float  # NaN and Inf get through the schema on purpose: the blend check answers 422


class BlendBody(_Body):
    name: str
    adapters: list[BlendPart] = Field(min_length=1, max_length=64)
    combination_type: str = "linear"
    density: float | None = None
    save: bool = False


class VllmLoad(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False      # vLLM's: replace an adapter already loaded under the name


class VllmUnload(BaseModel):
    lora_name: str


def entry_json(e: Entry) -> dict[str, Any]:
    return {
        "name": e.name, "kind": e.kind, "path": str(e.path) if e.path else None, "rank": e.info.rank,
        "alpha": e.info.alpha, "target_modules": list(e.info.target_modules), "size_bytes": e.info.size_bytes,
        "sha256": e.info.sha256, "version": e.version, "variants": list(e.info.variants), "pinned": e.pinned,
        "base_quantization": e.info.base_quantization,
        "loaded": e.loaded,
        "loaded_at": e.loaded_at,
        "last_used_at": e.last_used_at, "requests_total": e.requests_total, "inflight": e.inflight,
        "recipe": e.recipe.recipe() if e.recipe else None,
        "status": "unavailable" if e.error else "ok", "error": e.error,
    }


def _answer(entry: Entry, created: bool) -> JSONResponse:
    return JSONResponse(entry_json(entry), status_code=201 if created else 200)


@router.get("/admin/adapters")
async def list_adapters(state: AppState = Depends(require_admin)) -> Any:
    failed = [{"name": n, "path": p, "reason": why} for n, (p, why) in sorted(state.registry.failed.items())]
    return {"object": "list", "data": [entry_json(e) for e in state.registry.entries()], "failed": failed}


@router.get("/admin/adapters/{name}")
async def get_adapter(name: str, state: AppState = Depends(require_admin)) -> Any:
    return entry_json(state.registry.get(name))


@router.post("/admin/adapters")
async def load_adapter(body: LoadBody, state: AppState = Depends(require_admin)) -> Any:
    entry, created = await state.registry.register(body.name, body.path, pinned=body.pinned, replace=body.replace)
    return _answer(entry, created)


@router.delete("/admin/adapters/{name}")
async def unload_adapter(name: str, state: AppState = Depends(require_admin)) -> Any:
    entry = await state.registry.unregister(name)
    return {"name": entry.name, "deleted": True}


@router.patch("/admin/adapters/{name}")
async def pin_adapter(name: str, body: PinBody, state: AppState = Depends(require_admin)) -> Any:
    return entry_json(await state.registry.set_pinned(name, body.pinned))


@router.post("/admin/blends")
async def create_blend(body: BlendBody, state: AppState = Depends(require_admin)) -> Any:
    spec = BlendSpec(tuple((p.name, p.weight) for p in body.adapters), body.combination_type, body.density)
    entry, created = await state.registry.create_blend(body.name, spec, save=body.save)
    return _answer(entry, created)


class AliasBody(_Body):
    target: str | None = None                    # NAME or NAME@VERSION
    targets: list[dict[str, Any]] | None = None  # [{"model": ..., "weight": ...}] for a canary


@router.get("/admin/aliases")
async def list_aliases(state: AppState = Depends(require_admin)) -> Any:
    return {"object": "list", "data": [state.registry.alias_json(a) for a in sorted(state.registry.aliases)]}


@router.get("/admin/aliases/{alias}")
async def get_alias(alias: str, state: AppState = Depends(require_admin)) -> Any:
    return state.registry.alias_json(alias)


@router.put("/admin/aliases/{alias}")
async def set_alias(alias: str, body: AliasBody, state: AppState = Depends(require_admin)) -> Any:
    """Flip `alias` atomically: requests running finish on what they got, new ones get the new target."""
    answer, created = await state.registry.set_alias(alias, body.model_dump(exclude_none=True))
    return JSONResponse(answer, status_code=201 if created else 200)


@router.post("/admin/aliases/{alias}/rollback")
async def rollback_alias(alias: str, state: AppState = Depends(require_admin)) -> Any:
    return await state.registry.rollback_alias(alias)


@router.delete("/admin/aliases/{alias}")
async def delete_alias(alias: str, state: AppState = Depends(require_admin)) -> Any:
    await state.registry.delete_alias(alias)
    return {"alias": alias, "deleted": True}


# vLLM's routes answer as vLLM does where a script would notice: 200 with a line of text on
# success, 400 for a name already loaded with other content, 404 for unloading an unknown name.
@router.post("/v1/load_lora_adapter")
async def vllm_load(body: VllmLoad, state: AppState = Depends(require_admin)) -> Any:
    try:
        await state.registry.register(body.lora_name, body.lora_path, replace=body.load_inplace)
    except Conflict as e:
        raise InvalidRequest(e.message, param="lora_name", code=e.code) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def vllm_unload(body: VllmUnload, state: AppState = Depends(require_admin)) -> Any:
    await state.registry.unregister(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
