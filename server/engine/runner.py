"""Tensors on the engine thread: adapters attached to the model, batched forwards.

Owns: the model object (the base, wrapped in a PEFT model once the first
adapter arrives), attaching and detaching adapters, and the two forwards of a
batch: `prefill` (left-padded prompts, one pass) and `decode` (one token per
row), with a KV cache that grows in place (`kvcache.py`), rows that leave (`keep`) and
rows that join (`merge`).

Each row names its adapter. PEFT holds the adapters' weights, but its LoRA
layers stay switched off (each computes only its base layer); `BatchedLora`
adds every row's own delta in one batched product per layer (see
`server/lora/batched.py`). PEFT's own mixed-batch path (`adapter_names=`)
loops over adapters with hooks registered per call and cost 60% of the
throughput here (facts.md).

It knows nothing of requests, text or HTTP: rows are token ids and adapter names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, InvalidAdapter
from ..lora.batched import BASE, BatchedLora
from ..lora.blend import BlendSpec, build, write_folder
from ..lora.fit import check_fits
from ..lora.weights import AdapterFiles
from ..model import LoadedModel
from .kvcache import GrowingCache

log = logging.getLogger("loraplex.runner")



@dataclass
class BatchState:
    """The tensors of a running batch. Shapes: B rows, L cached positions."""

    cache: GrowingCache             # a transformers DynamicCache that grows in place
    attention_mask: torch.Tensor    # (B, L) long, 0 on left padding
    next_position: torch.Tensor     # (B, 1) long, position id of the next token
    adapters: list[str]             # (B,) adapter name per row, BASE for none


class ModelRunner:
    def __init__(self, loaded: LoadedModel, lora_backend: str = "auto"):
        self.lora_backend = lora_backend
        self.loaded = loaded
        self.device = loaded.device
        self.base = loaded.model
        self.peft = None            # peft.PeftModel once an adapter is attached
        self.adapters: set[str] = set()
        self.batched: BatchedLora | None = None

    # -- adapters --------------------------------------------------------------
    def add_adapter(self, name: str, files: AdapterFiles) -> None:
        """Attach a validated adapter; on any failure the model is left as it was."""
        from peft import get_peft_model, set_peft_model_state_dict

        for flag in ("use_dora", "lora_bias"):
            if getattr(files.config, flag, False):
                raise InvalidAdapter(f"adapter {name!r} uses {flag}, which the batched LoRA path does not "
                                     "compute yet", code="unsupported_adapter")
        rank_pattern = getattr(files.config, "rank_pattern", None)
        if not rank_pattern:  # per-module ranks would need per-module expectations
            check_fits(name, self.base, files.tensors, files.info.rank)
        first = self.peft is None
        try:
            # (PEFT's low_cpu_mem_usage=True skips the random init but measured no faster here.)
            if first:
                self.peft = get_peft_model(self.base, files.config, adapter_name=name)
            else:
                self.peft.add_adapter(name, files.config)
            result = set_peft_model_state_dict(self.peft, files.tensors, adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if missing:  # such a layer would keep PEFT's random init: a silently wrong adapter
                raise InvalidAdapter(f"adapter {name!r}: {len(missing)} LoRA tensors missing from the file "
                                     f"(first: {missing[0]})", code="invalid_weights")
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if unexpected:
                raise InvalidAdapter(f"adapter {name!r}: {len(unexpected)} tensors match no layer of the base "
                                     f"model (first: {unexpected[0]})", code="wrong_base")
        except (ValueError, RuntimeError, InvalidAdapter) as e:
            self._undo(name, first)
            if isinstance(e, InvalidAdapter):
                raise
            raise InvalidAdapter(f"adapter {name!r} does not fit this base model: {e}", code="wrong_base") from None
        self.peft.to(self.device)
        self.peft.eval()
        self.adapters.add(name)
        self._adapters_changed()

    def _undo(self, name: str, first: bool) -> None:
        """Remove a half-attached adapter; if it was the first, give back the plain base."""
        if self.peft is None:
            return
        if first:
            if self.batched is not None:
                self.batched.detach()
                self.batched = None
            self.base = self.peft.unload()  # strips the LoRA layers PEFT injected into the base
            self.peft = None
        elif name in self.peft.peft_config:
            self.peft.delete_adapter(name)
            left = [a for a in self.peft.peft_config if a != name]
            if left and self.peft.active_adapter not in self.peft.peft_config:
                self.peft.set_adapter(left[0])  # PEFT's forward looks its active adapter up
            self._adapters_changed()

    def add_blend(self, name: str, spec: BlendSpec, folder: Path | None) -> None:
        """Build a blend of attached adapters (PEFT add_weighted_adapter); write it to `folder` if given."""
        missing = [n for n, _ in spec.adapters if n not in self.adapters]
        if self.peft is None or missing:
            raise InvalidAdapter(f"blend {name!r}: adapters not in memory: {missing}", code="adapter_not_loaded")
        build(self.peft, name, spec)
        self.adapters.add(name)
        self._adapters_changed()
        if folder is not None:
            try:
                write_folder(self.peft, name, folder)
            except BaseException:
                self.remove_adapter(name)
                raise

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters:
            self._undo(name, first=len(self.adapters) == 1)
            self.adapters.discard(name)

    # -- start-up check ----------------------------------------------------------
    @torch.inference_mode()
    def self_check(self) -> float:
        """Refuse an architecture this engine would serve wrongly.

        The engine relies on left padding, explicit position ids and a cache whose rows can
        be selected and merged. A short prompt run alone and run left-padded beside a longer
        one, then one decode step, must give the same logits; returns the largest difference.
        """
        vocab = int(self.base.config.vocab_size)
        long = [(7 * i + 3) % vocab for i in range(1, 9)]
        short = long[:4]
        alone, la = self.prefill([short], [None])
        both, lb = self.prefill([long, short], [None, None])
        diff = float((la[0] - lb[1]).abs().max())
        nxt = int(la[0].argmax())
        da = self.decode(alone, [nxt])
        db = self.decode(both, [int(lb[0].argmax()), nxt])
        diff = max(diff, float((da[0] - db[1]).abs().max()))
        tol = 1e-3 if self.loaded.dtype == torch.float32 and self.loaded.quantization == "none" else 0.25
        scale = max(1.0, float(la[0].abs().max()))
        if diff > tol * scale:
            arch = ", ".join(getattr(self.base.config, "architectures", None) or [type(self.base).__name__])
            raise ConfigError(f"model architecture {arch} is not supported: a left-padded batched forward "
                              f"differs from a single one by {diff:.3g}, so batched answers would be wrong")
        return diff

    # -- forwards ------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str]) -> torch.Tensor:
        """One forward; (B, V) logits of the last position."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True, logits_to_keep=1)
        if self.peft is None:
            return self.base(**kwargs).logits[:, -1, :]
        self.batched.set_rows(adapters)
        return self.peft(**kwargs).logits[:, -1, :]

    def _adapters_changed(self) -> None:
        """PEFT's layers all off (ours add the deltas), new layers hooked, stale concatenations dropped.

        Every time, not once: PEFT creates the layers of a newly targeted module switched on.
        """
        self.peft.base_model.disable_adapter_layers()
        if self.batched is None:
            self.batched = BatchedLora(self.peft, backend=self.lora_backend)
        else:
            self.batched.attach(self.peft)
            self.batched.forget()

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], adapters: list[str | None]) -> tuple[BatchState, torch.Tensor]:
        """Run left-padded prompts; return the batch state and (B, V) next-token logits."""
        names = [a if a is not None else BASE for a in adapters]
        missing = {a for a in names if a != BASE and a not in self.adapters}
        if missing:
            raise InvalidAdapter(f"adapter(s) not loaded: {sorted(missing)}", code="adapter_not_loaded")
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowingCache()
        logits = self._forward(ids, mask, positions, cache, names)
        state = BatchState(cache, mask, positions[:, -1:] + 1, names)
        return state, logits

    @torch.inference_mode()
    def decode(self, state: BatchState, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return (B, V) next-token logits."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        ones = torch.ones((len(tokens), 1), dtype=state.attention_mask.dtype, device=self.device)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        logits = self._forward(ids, state.attention_mask, state.next_position, state.cache, state.adapters)
        state.next_position = state.next_position + 1
        return logits

    def keep(self, state: BatchState, rows: list[int]) -> None:
        """Drop every row not listed; the kept rows' caches stay exact."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        state.cache.batch_select_indices(idx)
        state.attention_mask = state.attention_mask[idx]
        state.next_position = state.next_position[idx]
        state.adapters = [state.adapters[i] for i in rows]
        # Columns that are left padding for every remaining row hold nothing: cut them.
        live = state.attention_mask.any(dim=0)
        first = int(live.long().argmax()) if bool(live.any()) else 0
        if first > 0:
            state.attention_mask = state.attention_mask[:, first:]
            for layer in state.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    @staticmethod
    def merge(running: BatchState | None, joining: BatchState) -> BatchState:
        """Append the rows of a freshly prefilled batch to the running one.

        Both are left-padded: the shorter side gets more left padding so the
        newest position lines up in one column. Cache tensors: (B, heads, L, head_dim).
        """
        if running is None:
            return joining
        la, lb = running.attention_mask.shape[1], joining.attention_mask.shape[1]
        width = max(la, lb)

        def left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for a, b in zip(running.cache.layers, joining.cache.layers):
            a.keys = torch.cat([left(a.keys, width - la, 2), left(b.keys, width - lb, 2)], dim=0)
            a.values = torch.cat([left(a.values, width - la, 2), left(b.values, width - lb, 2)], dim=0)
        running.attention_mask = torch.cat([left(running.attention_mask, width - la, 1),
                                            left(joining.attention_mask, width - lb, 1)], dim=0)
        running.next_position = torch.cat([running.next_position, joining.next_position], dim=0)
        running.adapters = running.adapters + joining.adapters
        return running
