"""OpenAI wire types for requests (pydantic). Responses are built as dicts in
`convert` and `streaming`, the shapes the `openai` client parses.

Owns: field names, types and ranges that a request must satisfy before any
work. Undeclared fields are kept (`extra="allow"`) so that `fields.py`, the one
table of honoured, refused and ignored fields, can judge each by name. Caps that come from the configuration
(max n, max_tokens, stop counts) are checked in `convert`, which has it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..lora.blend import MAX_WEIGHT

Float = Annotated[float, Field(allow_inf_nan=False)]


def _has_lone_surrogate(value: Any) -> bool:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"); no tokenizer can encode it."""
    if isinstance(value, str):
        if value.isascii():
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _no_lone_surrogates(self) -> _Wire:
        # Nested wire models check their own fields; this walks this model's plain values.
        values = [v for v in self.__dict__.values() if not isinstance(v, BaseModel)]
        if _has_lone_surrogate(values) or _has_lone_surrogate(self.model_extra or {}):
            raise ValueError("text holds a lone UTF-16 surrogate, which is not a character")
        return self


class StreamOptions(_Wire):
    include_usage: bool = False


class AdapterWeight(_Wire):
    name: str
    weight: Float = Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)


class JsonSchemaFormat(_Wire):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Wire):
    """vLLM's `structured_outputs` (the successor of its `guided_*` fields)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


class SamplingFields(_Wire):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (convert checks)
    temperature: Float | None = Field(None, ge=0.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM extensions (sent through `extra_body`)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # past the vocabulary = all of it
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: Float = Field(1.0, gt=0.0, le=10.0)
    min_p: Float = Field(0.0, ge=0.0, le=1.0)
    prompt_logprobs: int | None = Field(None, ge=0)   # vLLM's: each prompt token's logprob and top k
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    bad_words: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, max_length=64)
    # OpenAI's: token id (as a string key) -> a bias added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = Field(
        None, max_length=1024)
    # structured outputs: OpenAI's field and vLLM's (see server/api/structured.py)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    # loraplex extension: a per-request linear blend of loaded adapters (model = the base id)
    adapters: list[AdapterWeight] | None = Field(None, min_length=1, max_length=8)


PromptField = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptField
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class FunctionCall(_Wire):
    name: str
    arguments: str = "{}"           # JSON text, as OpenAI sends it


class ToolCall(_Wire):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None     # an assistant's earlier calls
    tool_call_id: str | None = None              # a tool message: the call it answers


class FunctionDef(_Wire):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
