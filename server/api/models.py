"""What a client asks about models without generating: /v1/models, /v1/models/{id}, and vLLM's
/tokenize, /detokenize and /tokenizer_info.

Owns: the model entries (the base, then each adapter and blend, then each alias, with `max_model_len` as vLLM's
carry), and vLLM's tokenizer routes with vLLM's request and response shapes. A `model` names the
base, an adapter, a blend or `BASE:ADAPTER`, as on every route; an unknown one is a 404. Every
adapter is served with the base's tokenizer (one that trains embeddings or tokens is refused at
load, server/lora/slots.py), so every name tokenizes with it. It changes nothing and submits nothing to the engine.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from ..errors import InvalidRequest
from ..registry import Entry
from .convert import message_dicts
from .deps import AppState, allowed_of, require_inference
from .schemas import ChatMessage, _Wire

router = APIRouter()


def _base_entry(state: AppState) -> dict[str, Any]:
    base = state.engine.model_id
    return {"id": base, "object": "model", "created": state.started_at, "owned_by": "loraplex", "parent": None,
            "root": base, "max_model_len": state.engine.context_length}


def _entry(state: AppState, e: Entry, id_: str | None = None) -> dict[str, Any]:
    return {"id": id_ or e.name, "object": "model", "created": int(e.created), "owned_by": "loraplex",
            "parent": state.engine.model_id, "root": str(e.path), "max_model_len": state.engine.context_length}


@router.get("/v1/models")
async def list_models(request: Request, state: AppState = Depends(require_inference)) -> Any:
    """What this API key may use: everything, or its scope's adapters (and the base if it matches)."""
    allowed = allowed_of(request)
    base = [_base_entry(state)] if allowed is None or allowed(state.engine.model_id) else []
    adapters = [_entry(state, e) for e in state.registry.entries() if allowed is None or allowed(e.name)]
    aliases = [{"id": a, "object": "model", "created": state.started_at, "owned_by": "loraplex",
                "parent": state.engine.model_id, "root": ",".join(m for m, _ in al.targets),
                "max_model_len": state.engine.context_length}
               for a, al in sorted(state.registry.aliases.items()) if allowed is None or allowed(a)]
    return {"object": "list", "data": base + adapters + aliases}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request, state: AppState = Depends(require_inference)) -> Any:
    e = state.registry.lookup(model_id, allowed_of(request))
    return _base_entry(state) if e is None else _entry(state, e, model_id)


class TokenizeRequest(_Wire):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None    # vLLM's defaults: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Wire):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def _check_model(request: Request, state: AppState, model: str | None) -> None:
    if model is not None:
        state.registry.resolve(model, allowed_of(request))  # 404 for a name nobody serves (or not this key's)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, state: AppState = Depends(require_inference)) -> Any:
    _check_model(request, state, body.model)
    tok = state.engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("give exactly one of prompt or messages", param="prompt")
    if body.prompt is not None:
        ids = tok.encode(body.prompt, add_special_tokens=True if body.add_special_tokens is None
                         else body.add_special_tokens)
    else:
        if body.add_special_tokens:
            raise InvalidRequest("chat prompts are encoded without extra special tokens", param="add_special_tokens")
        assert body.messages is not None, "the schema requires prompt or messages"
        ids = tok.apply_chat_template(message_dicts(body.messages), add_generation_prompt=body.add_generation_prompt)
    strs = [tok.decode([t], skip_special_tokens=False) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": state.engine.context_length, "tokens": ids, "token_strs": strs}


@router.get("/tokenizer_info")
async def tokenizer_info(state: AppState = Depends(require_inference)) -> Any:
    """vLLM's: the special tokens and limits (lm-evaluation-harness' remote tokenizer reads it)."""
    return {**state.engine.tokenizer.special_tokens(), "model_max_length": state.engine.context_length}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, state: AppState = Depends(require_inference)) -> Any:
    _check_model(request, state, body.model)
    tok = state.engine.tokenizer
    if any(not 0 <= t < tok.vocab_size for t in body.tokens):
        raise InvalidRequest(f"token ids must be in [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(body.tokens)}
