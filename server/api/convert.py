"""Wire requests in, engine requests out; engine events in, wire dicts out.

Owns: the one conversion from an OpenAI request to `GenerationRequest`s
(prompt encoding, chat templating, defaults, the configured caps, the context
check, seeds per choice) and the OpenAI shapes of choices, logprobs and usage.
Every refusal here is an InvalidRequest naming the field, raised before any
request reaches the engine.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, cast

from ..config import ServerConfig
from ..engine.protocol import PromptTokenizer
from ..engine.types import GenerationEvent, GenerationRequest, SamplingParams, TokenLogprob
from ..errors import InvalidRequest
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from .tools import ToolPlan, parse

log = logging.getLogger("loraplex.api")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_MASK = 2**64 - 1


@dataclass
class Plan:
    """What one HTTP request becomes: engine requests, one per choice."""

    id: str
    requests: list[GenerationRequest]
    prompt_tokens: int               # counted once per prompt, not per choice
    echo: list[Echo] | None = None   # completions' echo: one per request
    vllm_prompt_logprobs: bool = False  # vLLM's prompt_logprobs field was asked: answer in its shape
    tools: ToolPlan | None = None    # chat: the tools offered and how they must be used


@dataclass(frozen=True)
class Echo:
    """What `echo` puts before a choice's text: the prompt, and the first prompt token's text (the
    one token without a logprob) for the logprobs."""

    text: str
    first_token: str


def _stops(stop: str | list[str] | None, cfg: ServerConfig) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > cfg.max_stop_sequences:
        raise InvalidRequest(f"at most {cfg.max_stop_sequences} stop sequences, got {len(stops)}", param="stop")
    for s in stops:
        if not s:
            raise InvalidRequest("stop sequences must not be empty", param="stop")
        if len(s) > cfg.max_stop_length:
            raise InvalidRequest(f"stop sequences may be at most {cfg.max_stop_length} characters, got {len(s)}",
                                 param="stop")
    return tuple(stops)


def _max_tokens(asked: int | None, default: int | None, prompt_len: int, context: int, cfg: ServerConfig,
                param: str, prompt_param: str) -> int:
    """max_tokens for the request: `param` names the field asked, `prompt_param` the prompt's."""
    if asked is not None and asked > cfg.max_tokens:
        raise InvalidRequest(f"{param} is {asked}; this server allows at most {cfg.max_tokens}", param=param)
    room = context - prompt_len
    if asked is None:
        asked = min(default if default is not None else cfg.default_max_tokens, cfg.max_tokens, room)
        if asked < 1:
            raise InvalidRequest(f"the prompt is {prompt_len} tokens; this model's context is {context} tokens, "
                                 "which leaves no room to generate", param=prompt_param)
    elif prompt_len + asked > context:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} in the completion).", param=param)
    return asked


def _check_prompt_len(n: int, context: int, cfg: ServerConfig, param: str) -> None:
    if n == 0:
        raise InvalidRequest("the prompt is empty", param=param)
    cap = min(cfg.max_prompt_tokens or context, context)
    if n > cap:
        raise InvalidRequest(f"the prompt is {n} tokens; the limit is {cap}", param=param)


def _token_ids(body: SamplingFields, vocab: int) -> tuple[tuple[tuple[int, float], ...], tuple[int, ...]]:
    """logit_bias as (id, bias) pairs and stop_token_ids, each id checked against the vocabulary."""
    bias = []
    for key, value in (body.logit_bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= tid < vocab:
            raise InvalidRequest(f"logit_bias token id {tid} is outside the vocabulary [0, {vocab})",
                                 param="logit_bias")
        bias.append((tid, float(value)))
    stops = tuple(body.stop_token_ids or ())
    if any(not 0 <= t < vocab for t in stops):
        raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
    return tuple(sorted(bias)), stops


def _bad_words(words: list[str] | None, tok: PromptTokenizer) -> tuple[tuple[int, ...], ...]:
    """Each word's token sequences, as vLLM bans them: the word alone and after a space."""
    seqs = {tuple(tok.encode(v, add_special_tokens=False)) for w in words or () for v in (w, " " + w)}
    return tuple(sorted(s for s in seqs if s))


def _params(body: SamplingFields, max_tokens: int, stops: tuple[str, ...], logprobs: int | None,
            seed: int | None, tok: PromptTokenizer, prompt_logprobs: int | None = None) -> SamplingParams:
    bias, stop_ids = _token_ids(body, tok.vocab_size)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=None if seed is None else seed & SEED_MASK,
        stop=stops,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
        min_p=body.min_p,
        logit_bias=bias,
        stop_token_ids=stop_ids,
        bad_words=_bad_words(body.bad_words, tok),
        prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else body.prompt_logprobs,
    )


def _check_common(body: SamplingFields, cfg: ServerConfig, logprobs: int | None) -> tuple[str, ...]:
    if body.max_tokens == 0 and not getattr(body, "echo", False):
        raise InvalidRequest("max_tokens must be at least 1 (0 is allowed with echo: the prompt is scored, "
                             "nothing is generated)", param="max_tokens")
    if body.prompt_logprobs is not None and body.prompt_logprobs > cfg.max_top_logprobs:
        raise InvalidRequest(f"at most {cfg.max_top_logprobs} prompt_logprobs alternatives, got "
                             f"{body.prompt_logprobs}", param="prompt_logprobs")
    if body.n > cfg.max_n:
        raise InvalidRequest(f"n is {body.n}; this server allows at most {cfg.max_n}", param="n")
    if logprobs is not None and logprobs > cfg.max_top_logprobs:
        raise InvalidRequest(f"at most {cfg.max_top_logprobs} logprobs alternatives, got {logprobs}", param="logprobs")
    if body.min_tokens and body.max_tokens is not None and body.min_tokens > body.max_tokens:
        raise InvalidRequest(f"min_tokens ({body.min_tokens}) is larger than max_tokens ({body.max_tokens})",
                             param="min_tokens")
    return _stops(body.stop, cfg)


def _choices(prompts: list[list[int]], body: SamplingFields, adapter: str | None, rid: str,
             params_for: Any) -> list[GenerationRequest]:
    reqs = []
    for p_index, ids in enumerate(prompts):
        for j in range(body.n):
            index = p_index * body.n + j
            seed = None if body.seed is None else body.seed + index
            reqs.append(GenerationRequest(f"{rid}-{index}", ids, params_for(ids, seed), adapter))
    return reqs


def plan_completion(body: CompletionRequest, tok: PromptTokenizer, context: int, cfg: ServerConfig,
                    adapter: str | None) -> Plan:
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequest("best_of other than n is not supported", param="best_of")
    stops = _check_common(body, cfg, body.logprobs)
    raw = body.prompt
    if isinstance(raw, str):
        prompts = [tok.encode(raw)]
    elif raw and all(isinstance(x, int) for x in raw):
        prompts = [list(cast("list[int]", raw))]
    elif raw and all(isinstance(x, str) for x in raw):
        prompts = [tok.encode(x) for x in cast("list[str]", raw)]
    elif raw and all(isinstance(x, list) for x in raw):
        prompts = [list(x) for x in cast("list[list[int]]", raw)]
    else:
        raise InvalidRequest("prompt must be a string, a list of strings, or token ids", param="prompt")
    if len(prompts) > cfg.max_prompts:
        raise InvalidRequest(f"at most {cfg.max_prompts} prompts in one request, got {len(prompts)}", param="prompt")
    for ids in prompts:
        _check_prompt_len(len(ids), context, cfg, "prompt")
        if any(not 0 <= t < tok.vocab_size for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")

    # echo with logprobs: the prompt tokens' logprobs too, from the prefill (vLLM's answer).
    echo_k = body.logprobs if body.echo and body.logprobs is not None else None
    wanted = [k for k in (echo_k, body.prompt_logprobs) if k is not None]

    def params_for(ids: list[int], seed: int | None) -> SamplingParams:
        mt = _max_tokens(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, len(ids), context, cfg, "max_tokens",
                         "prompt")
        return _params(body, mt, stops, body.logprobs, seed, tok, max(wanted) if wanted else None)

    rid = f"cmpl-{uuid.uuid4().hex}"
    echo = None
    if body.echo:  # a text prompt is echoed as sent, token ids as they decode
        texts = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw[0], str) else [
            tok.decode(ids) for ids in prompts]
        echo = [Echo(texts[p], tok.decode(prompts[p][:1], skip_special_tokens=False))
                for p in range(len(prompts)) for _ in range(body.n)]
    return Plan(rid, _choices(prompts, body, adapter, rid, params_for), sum(len(p) for p in prompts), echo,
                body.prompt_logprobs is not None)


# Message fields that carry meaning this server does not serve: refused, never dropped.
_MESSAGE_REFUSED = {"function_call": "the legacy function_call is not supported; use tool_calls",
                    "audio": "audio is not supported"}


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them; a field that would be dropped is refused."""
    out = []
    for i, m in enumerate(messages):
        for name, why in _MESSAGE_REFUSED.items():
            if (m.model_extra or {}).get(name):
                raise InvalidRequest(f"messages.{i}.{name}: {why}", param=f"messages.{i}.{name}")
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:  # arguments as objects, as chat templates expect them (vLLM does the same)
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def plan_chat(body: ChatCompletionRequest, tok: PromptTokenizer, context: int, cfg: ServerConfig,
              adapter: str | None, tools: ToolPlan | None = None) -> Plan:
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    stops = _check_common(body, cfg, top)
    ids = tok.apply_chat_template(message_dicts(body.messages), tools=tools.tools if tools is not None else None)
    _check_prompt_len(len(ids), context, cfg, "messages")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    mt = _max_tokens(asked, None, len(ids), context, cfg, param, "messages")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    reqs = _choices([ids], body, adapter, rid, lambda _ids, seed: _params(body, mt, stops, top, seed, tok))
    return Plan(rid, reqs, len(ids), vllm_prompt_logprobs=body.prompt_logprobs is not None, tools=tools)


# -- responses -------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0,
                        echo: tuple[Echo, list[TokenLogprob]] | None = None) -> dict[str, Any]:
    """The completions logprobs object; with `echo`, the prompt's tokens first (the first with
    null logprobs). As in vLLM, each top_logprobs dict also holds the token itself."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if echo is not None:
        first, prompt_lps = echo
        tokens.append(first.first_token)
        lps.append(None)
        tops.append(None)
        entries = list(prompt_lps) + list(entries)
    for e in entries:
        tokens.append(e.token)
        lps.append(e.logprob)
        top = {t: lp for _, t, lp in e.top}
        top.setdefault(e.token, e.logprob)
        tops.append(top)
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_choice(plan: Plan, i: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None,
                      prompt_lps: list[TokenLogprob] | None, with_logprobs: bool, *, first: bool = True,
                      offset: int = 0) -> dict[str, Any]:
    """One completions choice, or one stream chunk's (`first`: the choice's first chunk). With
    echo, the first carries the prompt text before the completion, and its tokens' logprobs."""
    echo = plan.echo[i] if plan.echo is not None and first else None
    lp = None
    if with_logprobs and (first or logprobs):
        lp = completion_logprobs(logprobs or [], offset, (echo, prompt_lps or []) if echo is not None else None)
    choice = {"index": i, "text": (echo.text if echo is not None else "") + text, "logprobs": lp,
              "finish_reason": finish}
    if plan.vllm_prompt_logprobs and first:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(prompt_lps or [])
    return choice


def chat_message(plan: Plan, text: str, finish: str | None) -> dict[str, Any]:
    """A chat choice's message and finish_reason: the reply, or the tool calls parsed from it."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if plan.tools is None or finish != "stop":  # a reply cut short is text, never a half call
        return {"message": message, "finish_reason": finish}
    content, calls = parse(plan.tools, text)
    message["content"] = content
    if calls:
        message["tool_calls"] = calls
        finish = "tool_calls"
    return {"message": message, "finish_reason": finish}


def vllm_prompt_logprobs(entries: list[TokenLogprob]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: null for the first prompt token, then per token its own logprob
    and rank and the top k's, keyed by token id."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for e in entries:
        d = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": text} for r, (t, text, lp) in enumerate(e.top)}
        d[str(e.token_id)] = {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token}
        out.append(d)
    return out


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top]}
                        for e in entries]}


@dataclass
class ChoiceAccumulator:
    """Collects one choice's events for a non-streaming response."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, ev: GenerationEvent) -> None:
        self.text += ev.text
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        self.completion_tokens = ev.completion_tokens
        if ev.logprobs:
            self.logprobs = (self.logprobs or []) + ev.logprobs
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
