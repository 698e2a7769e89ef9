"""The one seam between the HTTP layer and generation.

Owns: the `Engine` and `PromptTokenizer` protocols. The API and the registry
depend on these and nothing else of the engine; `TorchEngine` (real model)
and `FakeEngine` (deterministic, for tests) implement them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..lora.blend import BlendSpec
from ..lora.weights import AdapterInfo
from .grammar import Structured
from .types import EngineStats, GenerationEvent, GenerationRequest


@runtime_checkable
class PromptTokenizer(Protocol):
    """What the API needs to turn a request into token ids before submitting."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render messages (and tools) with the model's own template and the assistant's
        generation prompt; InvalidRequest for a template that would drop the tools."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def special_tokens(self) -> dict[str, Any]:
        """tokenizer_class and the eos / bos / pad / unk token texts (None where there is none)."""
        ...


class Engine(Protocol):
    model_id: str

    @property
    def ready(self) -> bool:
        """True once the model is loaded and the engine loop runs."""
        ...

    @property
    def stalled(self) -> bool:
        """True when the engine loop has not come round for `engine.stall_timeout_s` (a watchdog)."""
        ...

    @property
    def tokenizer(self) -> PromptTokenizer:
        """Raises NotReady before the model is loaded."""
        ...

    @property
    def context_length(self) -> int: ...

    def start(self) -> None:
        """Begin loading the model in the background; returns at once."""
        ...

    async def wait_ready(self) -> None:
        """Return once ready; raise the load error if loading failed."""
        ...

    def submit(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Submit a request; yield its events as tokens are produced.

        Leaving the iterator early (client gone) aborts the request. Raises
        Overloaded when the waiting queue is full, NotReady when not serving.
        """
        ...

    def abort(self, request_id: str) -> None: ...

    async def compile_structured(self, s: Structured) -> Any:
        """Compile a structured-output constraint for `GenerationRequest.grammar`;
        InvalidRequest (naming `s.param`) for one that does not compile."""
        ...

    def stats(self) -> EngineStats:
        """Cheap, thread-safe snapshot; read at every metrics scrape."""
        ...

    async def load_adapter(self, name: str, path: Path, *, check_rank: bool = True) -> AdapterInfo:
        """Validate a PEFT folder and attach it to the model under `name`.
        Raises InvalidAdapter (nothing attached) when it is refused."""
        ...

    async def create_blend(self, name: str, spec: BlendSpec, folder: Path) -> AdapterInfo:
        """Blend attached adapters into a new one named `name`, written to `folder`, and load it."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    def shutdown(self) -> None: ...
