"""The one table of request fields: which are honoured, which are refused, which are ignored.

Owns: for each route, every field a client may send that this server knows of — the OpenAI
client's request types and vLLM's extensions — with its treatment:
- honoured: a field of the route's pydantic schema (`schemas.py`) that changes the output as it
  says (tests check each honoured name is declared there);
- refused: a field that would change what the request means and that this server does not
  compute; any value other than the neutral ones in `neutral` is a 400 naming the field;
- ignored: a field with no effect on the tokens returned (billing, storage, routing hints,
  reasoning settings of a model without reasoning); logged, never refused.
A field in none of them is not one this server knows; it is ignored with a log line, as the
contract says (README, "Request fields"). `check` applies the table before a request is converted.

It knows field names and values only, nothing of tokenizers or engines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest

log = logging.getLogger("loraplex.api")


@dataclass(frozen=True)
class Refused:
    why: str
    neutral: Callable[[Any], bool] = lambda v: v is None or v is False or v == [] or v == {} or v == ""
    example: Any = True             # a value that is refused (the field-table test sends it)


def _eq(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v in values


HONOURED = "honoured"
IGNORED_WHY = {
    "metadata": "stored-completion tags; nothing is stored here",
    "store": "OpenAI's storage of completions; nothing is stored here",
    "service_tier": "a billing tier",
    "reasoning_effort": "the served models do not reason",
    "verbosity": "a reasoning models' setting; the served models do not reason",
    "prompt_cache_key": "a routing hint for OpenAI's prompt cache; the prefix cache here needs none",
    "prompt_cache_options": "OpenAI's prompt cache settings; the prefix cache here is automatic",
    "prompt_cache_retention": "OpenAI's prompt cache settings; the prefix cache here is automatic",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "moderation": "OpenAI's moderation service; none runs here",
    "priority": "vLLM's scheduling priority (requests here are served first come, first served)",
    "request_id": "vLLM's caller-chosen request id; logs here use the server's own",
    "reasoning": "reasoning settings; the served models do not reason",
    "stream_options": "on /v1/responses: stream obfuscation settings, which change no token",
}

_SAMPLING: dict[str, Any] = {
    **{f: HONOURED for f in (
        "model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
        "presence_penalty", "frequency_penalty", "logit_bias",
        # vLLM's extensions (through extra_body)
        "top_k", "min_p", "min_tokens", "ignore_eos", "repetition_penalty", "stop_token_ids", "prompt_logprobs",
        "bad_words",
        # loraplex's: a per-request blend
        "adapters")},
    "use_beam_search": Refused("beam search is not supported"),
    "length_penalty": Refused("length_penalty applies to beam search, which is not supported", _eq(1, 1.0), 0.5),
    "allowed_token_ids": Refused("allowed_token_ids is not supported; use logit_bias", example=[1]),
    "include_stop_str_in_output": Refused("the stop string is never included in the output"),
    "skip_special_tokens": Refused("special tokens are always skipped in the text", _eq(True), False),
    "spaces_between_special_tokens": Refused("special tokens are always skipped in the text", _eq(True), False),
    "truncate_prompt_tokens": Refused("prompts are never truncated; a prompt that is too long is refused",
                                      example=8),
    "logits_processors": Refused("custom logits processors are not supported", example=["x"]),
    "return_tokens_as_token_ids": Refused("logprob tokens are returned as text"),
    **{f: HONOURED for f in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                             "guided_choice", "guided_grammar")},
    "guided_decoding_backend": Refused("structured outputs always use xgrammar", _eq("xgrammar", "auto"),
                                       "outlines"),
    "guided_whitespace_pattern": Refused("a custom whitespace pattern is not supported; structured_outputs."
                                         "disable_any_whitespace chooses free or no whitespace", example=" "),
    "kv_transfer_params": Refused("disaggregated serving is not supported", example={"a": 1}),
    "vllm_xargs": Refused("vLLM's extra arguments are not supported", example={"a": 1}),
    "user": HONOURED,  # seeds a weighted alias's choice (a canary), so one user stays on one side
    **{f: "ignored" for f in ("priority", "request_id")},
}

COMPLETIONS: dict[str, Any] = {
    **_SAMPLING,
    **{f: HONOURED for f in ("prompt", "logprobs", "echo")},
    "suffix": Refused("suffix (insertion) is not supported", example="end"),
    "best_of": HONOURED,            # equal to n; convert refuses any other value
    "add_special_tokens": Refused("prompts are encoded with the tokenizer's special tokens", _eq(True), False),
}

CHAT: dict[str, Any] = {
    **_SAMPLING,
    **{f: HONOURED for f in ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                             "tool_choice", "parallel_tool_calls")},
    **{f: "ignored" for f in ("metadata", "store", "service_tier", "reasoning_effort", "verbosity",
                               "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
                               "safety_identifier", "moderation")},
    "functions": Refused("the legacy functions field is not supported; use tools", example=[{"name": "f"}]),
    "function_call": Refused("the legacy function_call field is not supported; use tool_choice",
                             _eq("none"), "auto"),
    "audio": Refused("audio output is not supported", example={"voice": "alloy", "format": "wav"}),
    "modalities": Refused("only text output is supported", lambda v: v is None or v == ["text"], ["text", "audio"]),
    "prediction": Refused("predicted outputs are not supported", example={"type": "content", "content": "x"}),
    "web_search_options": Refused("web search is not supported", lambda v: v is None, {}),
    "echo": Refused("echo is not supported on chat"),
    "add_generation_prompt": Refused("the generation prompt is always added", _eq(True), False),
    "continue_final_message": Refused("continuing the final message is not supported"),
    "add_special_tokens": Refused("chat prompts are encoded without extra special tokens", _eq(False), True),
    "chat_template": Refused("the model's own chat template is always used", example="{{ messages }}"),
    "chat_template_kwargs": Refused("chat template arguments are not supported", example={"x": 1}),
    "documents": Refused("documents for the chat template are not supported", example=[{"text": "x"}]),
    "mm_processor_kwargs": Refused("multimodal inputs are not supported", example={"x": 1}),
}

RESPONSES: dict[str, Any] = {
    **{f: HONOURED for f in ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text",
                             "tools", "tool_choice", "parallel_tool_calls", "stream")},
    "user": HONOURED,
    **{f: "ignored" for f in ("metadata", "service_tier", "prompt_cache_key", "prompt_cache_options",
                               "prompt_cache_retention", "safety_identifier", "moderation", "stream_options")},
    "reasoning": "ignored",         # the served models do not reason
    "store": Refused("nothing is stored on this server (send store: false)", example=True),
    "previous_response_id": Refused("no response is stored on this server; send the whole conversation in input",
                                    example="resp_1"),
    "conversation": Refused("no conversation is stored on this server; send it in input", example="conv_1"),
    "background": Refused("background responses are not supported", example=True),
    "background_options": Refused("background responses are not supported", example={"a": 1}),
    "prompt": Refused("stored prompt templates are not supported", example={"id": "pmpt_1"}),
    "include": Refused("extra outputs (include) are not supported", example=["message.output_text.logprobs"]),
    "top_logprobs": Refused("logprobs are not supported on /v1/responses; use /v1/chat/completions", example=2),
    "max_tool_calls": Refused("max_tool_calls is not supported; use parallel_tool_calls: false for one call",
                              example=2),
    "truncation": Refused("the input is never truncated", _eq("disabled"), "auto"),
    "context_management": Refused("context management (compaction) is not supported", example=[{"type": "x"}]),
    "image": Refused("image generation is not supported", example={"size": "1024x1024"}),
    "access_programs": Refused("OpenAI access programs are not supported here", example={"a": 1}),
}

TABLES = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT, "/v1/responses": RESPONSES}


def _sent(body: Any) -> dict[str, Any]:
    """The fields the client sent, declared or not, with their values."""
    out = {name: getattr(body, name) for name in body.model_fields_set}
    out.update(body.model_extra or {})
    return out


def check(body: Any, route: str) -> None:
    """Refuse a field this server would not honour; log the ignored and the unknown ones."""
    table = TABLES[route]
    ignored, unknown = [], []
    for name, value in sorted(_sent(body).items()):
        rule = table.get(name)
        if rule is None:
            unknown.append(name)
        elif rule == "ignored":
            if value is not None:
                ignored.append(name)
        elif isinstance(rule, Refused) and not rule.neutral(_plain(value)):
            raise InvalidRequest(f"{name} is not supported: {rule.why}", param=name, code="unsupported_field")
    if ignored:
        log.info("%s: ignoring fields with no effect on the output: %s", route,
                 "; ".join(f"{n} ({IGNORED_WHY.get(n, 'no effect')})" for n in ignored))
    if unknown:
        log.info("%s: ignoring unknown fields %s", route, unknown)


def _plain(value: Any) -> Any:
    """A declared field's pydantic value as plain JSON data, so `neutral` sees what was sent."""
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
