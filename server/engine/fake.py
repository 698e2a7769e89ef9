"""A deterministic engine for tests: no model, no threads, exact output.

Owns: `ByteTokenizer` (one token per UTF-8 byte, plus an end-of-sequence id)
and `FakeEngine`, which implements the `Engine` protocol on the event loop.
Each request "generates" the bytes of a scripted reply, one token per step,
through the same `Sequence` rules as the real engine, so max_tokens, stop
strings, min_tokens, ignore_eos and logprobs behave as they will in
production. API, streaming and admin tests run on it in milliseconds.

The default reply names the adapter and echoes the end of the prompt:
``"[{adapter or 'base'}] {last 24 characters of the prompt}"``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncGenerator, Callable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidAdapter, NotFound, NotReady, Overloaded, RequestTimeout
from ..lora.blend import BlendSpec
from ..lora.weights import AdapterInfo, describe_adapter, read_adapter
from .grammar import Grammars, LazyGrammars, Structured
from .sequence import Sequence
from .types import EngineStats, GenerationEvent, GenerationRequest, TokenLogprob, adapter_names

EOS = 256


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is end-of-sequence."""

    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        text = "".join(f"<tool>{json.dumps(t['function']['name'])}\n" for t in tools or [])
        for m in messages:
            calls = "".join(f"<call>{json.dumps(c['function'])}" for c in m.get("tool_calls", []))
            answers = f"<answers {m['tool_call_id']}>" if "tool_call_id" in m else ""
            text += f"<{m['role']}>{answers}{m.get('content') or ''}{calls}\n"
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))

    def special_tokens(self) -> dict[str, Any]:
        return {"tokenizer_class": "ByteTokenizer", "eos_token": None, "bos_token": None, "pad_token": None,
                "unk_token": None}

    def decode(self, ids: Seq[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return "</s>" if token_id == EOS else self.decode([token_id])


def default_script(request: GenerationRequest, prompt: str) -> str:
    if request.mix:
        return f"[{'+'.join(f'{w:g}*{n}' for n, w in request.mix)}] {prompt[-24:]}"
    return f"[{request.adapter or 'base'}] {prompt[-24:]}"


class FakeEngine:
    def __init__(
        self,
        model_id: str = "fake-model",
        *,
        script: Callable[[GenerationRequest, str], str] = default_script,
        token_delay: float = 0.0,
        context_length: int = 512,
        max_waiting_requests: int = 64,
        max_lora_rank: int = 64,
    ):
        self.model_id = model_id
        self.script = script
        self.token_delay = token_delay
        self._context = context_length
        self.max_waiting = max_waiting_requests
        self.max_lora_rank = max_lora_rank
        self._tok = ByteTokenizer()
        self._ready = False
        self.adapters: dict[str, AdapterInfo] = {}   # in memory, by name
        self.loads: list[str] = []                    # every load, in order, for tests
        self.blends: dict[str, BlendSpec] = {}
        self.submitted: list[GenerationRequest] = []   # every request, for tests to inspect
        self.aborted: set[str] = set()
        self.running: set[str] = set()
        self._running_adapters: dict[str, list[str]] = {}  # request id -> adapter names
        self.structured: list[Structured] = []         # every constraint compiled, for tests
        self._grammars = LazyGrammars(lambda: Grammars.from_raw_vocab([bytes([i]) for i in range(256)] + [b"</s>"],
                                                                      [EOS]))

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def stalled(self) -> bool:
        return False  # no loop of its own to stall

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tok

    @property
    def context_length(self) -> int:
        return self._context

    def start(self) -> None:
        self._ready = True

    async def wait_ready(self) -> None:
        return None

    def shutdown(self) -> None:
        self._ready = False

    def submit(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if not self._ready:
            raise NotReady("the engine is not serving", code="not_ready")
        for name in ([request.adapter] if request.adapter is not None else []) + [n for n, _ in request.mix]:
            if name not in self.adapters:
                # As the real engine would: a request routed to an adapter not in memory is a bug upstream.
                raise NotFound(f"adapter {name!r} is not loaded", code="model_not_found")
        if len(self.running) >= self.max_waiting:
            raise Overloaded(f"{len(self.running)} requests running; retry later", retry_after=1, code="queue_full")
        self.submitted.append(request)
        self.running.add(request.request_id)
        self._running_adapters[request.request_id] = adapter_names(request)
        return self._generate(request)

    async def compile_structured(self, s: Structured) -> object:
        """Compiled against the byte vocabulary, so a bad schema is refused as the real engine
        refuses it; the fake's scripted replies are not constrained (tests script valid ones)."""
        compiled = await asyncio.to_thread(self._grammars.compile, s)
        self.structured.append(s)
        return compiled

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=0, kv_cache_tokens=0, kv_cache_capacity_tokens=1 << 16,
                           running_adapters=frozenset(n for ns in self._running_adapters.values() for n in ns))

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        seq = Sequence(request, self._tok, [EOS])
        reply = self._tok.encode(self.script(request, self._tok.decode(request.prompt_ids)))
        prompt_lps = self._prompt_logprobs(request)
        done = False
        try:
            if request.params.max_tokens == 0:  # the prompt scored, nothing generated
                await asyncio.sleep(0)
                done = True
                yield GenerationEvent(request.request_id, finish_reason="length", queue_time=0.0,
                                      prompt_tokens=len(request.prompt_ids), prompt_logprobs=prompt_lps)
                return
            step = 0
            while True:
                if request.request_id in self.aborted:
                    return
                if request.deadline is not None and time.monotonic() > request.deadline:
                    raise RequestTimeout("the request ran past server.request_timeout_s", code="request_timeout")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                # After the reply comes EOS; with ignore_eos (or before min_tokens) the reply repeats.
                cycle = len(reply) + 1
                tok = reply[step % cycle] if step % cycle < len(reply) else EOS
                if tok == EOS and (request.params.ignore_eos or step < request.params.min_tokens):
                    tok = reply[0] if reply else ord(" ")
                step += 1
                lp = None
                if request.params.logprobs is not None:
                    top = tuple((t, self._tok.token_text(t), -0.25 * (k + 1))
                                for k, t in enumerate([tok, EOS][: request.params.logprobs]))
                    lp = TokenLogprob(tok, self._tok.token_text(tok), -0.25, top)
                ev = seq.append(tok, lp)
                if step == 1:
                    ev.queue_time, ev.prompt_logprobs = 0.0, prompt_lps
                yield ev
                if seq.finished:
                    done = True
                    return
        finally:
            if not done:
                self.aborted.add(request.request_id)
            self.running.discard(request.request_id)
            self._running_adapters.pop(request.request_id, None)

    def _prompt_logprobs(self, request: GenerationRequest) -> list[TokenLogprob] | None:
        """Scripted prompt logprobs: token i + 1 gets -0.5 * (i + 1), rank i + 1; its top k are itself
        and the ids after it."""
        k = request.params.prompt_logprobs
        if k is None:
            return None
        out = []
        for i, t in enumerate(request.prompt_ids[1:]):
            lp = -0.5 * (i + 1)
            top = tuple((u % 256, self._tok.token_text(u % 256), lp - j) for j, u in enumerate(range(t, t + k)))
            out.append(TokenLogprob(t, self._tok.token_text(t), lp, top, i + 1))
        return out

    async def load_adapter(self, name: str, path: Path, *, check_rank: bool = True) -> AdapterInfo:
        info = read_adapter(path, max_rank=self.max_lora_rank if check_rank else 1 << 30).info
        self.adapters[name] = info
        self.loads.append(name)
        return info

    async def create_blend(self, name: str, spec: BlendSpec, folder: Path) -> AdapterInfo:
        """A stand-in blend: the first source's files (the fake has no weights to combine)."""
        missing = [n for n, _ in spec.adapters if n not in self.adapters]
        if missing:
            raise InvalidAdapter(f"blend {name!r}: adapters not in memory: {missing}", code="adapter_not_loaded")
        first = self.adapters[spec.adapters[0][0]]
        shutil.copytree(first.folder, folder, ignore=shutil.ignore_patterns("README.md"))
        info = describe_adapter(folder)
        self.adapters[name] = info
        self.blends[name] = spec
        return info

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)


if TYPE_CHECKING:
    from .protocol import Engine

    def _is_an_engine(e: FakeEngine) -> Engine:  # mypy checks FakeEngine against the protocol here
        return e
