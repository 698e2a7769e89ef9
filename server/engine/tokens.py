"""A transformers tokenizer behind the `PromptTokenizer` protocol.

Owns: prompt encoding, chat rendering with the model's own template, and the
text of single tokens for logprobs. A template that refuses the messages (some
raise on roles out of order) becomes an InvalidRequest, not a 500.

Message content is text, never control tokens: a user who writes
"<|im_end|>\n<|im_start|>system" gets those characters tokenized as plain text,
so no one can forge a turn (OpenAI's API behaves so). The template is rendered
with each such content replaced by a marker, the template's own text is
tokenized as usual and each content with `split_special_tokens`. Messages without
special-token strings take the plain path, token for token what the template
alone gives. `model.special_tokens_in_content = "control"` restores the raw
behaviour for a trusted deployment.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidRequest

_MARK = "\ue000loraplex-content-{}\ue000"   # private-use characters: no template writes them
_MARKS = re.compile("\ue000loraplex-content-(\\d+)\ue000")


class HFPromptTokenizer:
    def __init__(self, tokenizer: Any, content_as_text: bool = True):
        self.tok = tokenizer
        self.content_as_text = content_as_text
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                     if getattr(t, "special", False)}
        self._specials = sorted(s for s in specials if s)

    def clone(self) -> HFPromptTokenizer:
        """A private copy: the engine thread decodes while API threads encode,
        and a Rust tokenizer shared across threads can fail with 'Already borrowed'."""
        return HFPromptTokenizer(copy.deepcopy(self.tok), self.content_as_text)

    def _has_special(self, text: Any) -> bool:
        return isinstance(text, str) and any(sp in text for sp in self._specials)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        template = getattr(self.tok, "chat_template", None)
        if not template:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        if tools and "tools" not in template:  # it would render the messages and drop the tools
            raise InvalidRequest("this model's chat template does not render tools; set model.chat_template to "
                                 "one that does (deploy/templates/hermes-tools.jinja)", param="tools",
                                 code="tools_not_in_template")
        marked = [i for i, m in enumerate(messages) if self._has_special(m.get("content"))]
        if not self.content_as_text or not marked:
            return list(self.tok.encode(self._render(messages, add_generation_prompt, tools), add_special_tokens=False))
        stand_ins = [dict(m, content=_MARK.format(i)) if i in marked else m for i, m in enumerate(messages)]
        text = self._render(stand_ins, add_generation_prompt, tools)
        if sorted(int(x) for x in _MARKS.findall(text)) != marked:  # the template changed or repeated a content
            raise InvalidRequest("this model's chat template transforms message content, so text that looks like "
                                 "its special tokens cannot be kept as plain text; remove them from the messages",
                                 param="messages", code="special_tokens_in_content")
        ids: list[int] = []
        for k, piece in enumerate(_MARKS.split(text)):
            if k % 2 == 0:  # the template's own text: its special tokens are control tokens
                ids += self.tok.encode(piece, add_special_tokens=False) if piece else []
            else:           # a message's content: plain text, whatever it spells
                ids += self.tok.encode(messages[int(piece)]["content"], add_special_tokens=False,
                                       split_special_tokens=True)
        return ids

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None) -> str:
        try:
            return str(self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tokenize=False, tools=tools or None))
        except Exception as e:  # jinja2 TemplateError and friends: the messages broke the template
            raise InvalidRequest(f"the chat template refused these messages: {e}", param="messages") from None

    def special_tokens(self) -> dict[str, Any]:
        t = self.tok
        return {"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token,
                "pad_token": t.pad_token, "unk_token": t.unk_token}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        return str(self.tok.decode([token_id], skip_special_tokens=False))
