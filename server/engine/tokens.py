"""A transformers tokenizer behind the `PromptTokenizer` protocol.

Owns: prompt encoding, chat rendering with the model's own template, and the
text of single tokens for logprobs. A template that refuses the messages (some
raise on roles out of order) becomes an InvalidRequest, not a 500.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from ..errors import InvalidRequest


class HFPromptTokenizer:
    def __init__(self, tokenizer: Any):
        self.tok = tokenizer

    def clone(self) -> "HFPromptTokenizer":
        """A private copy: the engine thread decodes while API threads encode,
        and a Rust tokenizer shared across threads can fail with 'Already borrowed'."""
        return HFPromptTokenizer(copy.deepcopy(self.tok))

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
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=False, tools=tools or None)
        except Exception as e:  # jinja2 TemplateError and friends: the messages broke the template
            raise InvalidRequest(f"the chat template refused these messages: {e}", param="messages") from None
        return list(self.tok.encode(text, add_special_tokens=False))

    def special_tokens(self) -> dict[str, Any]:
        t = self.tok
        return {"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token,
                "pad_token": t.pad_token, "unk_token": t.unk_token}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)
