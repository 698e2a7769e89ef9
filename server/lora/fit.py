"""Does an adapter fit this base model? Checked before any weight touches it.

Owns: mapping PEFT tensor names to the base model's modules and comparing
shapes (lora_A: (r, in_features), lora_B: (out_features, r)), for
`nn.Linear`, bitsandbytes' quantized linears and GPT-2's `Conv1D` (whose
weight is stored transposed, (in, out)). An adapter whose tensors match no
module at all is refused rather than loaded as a silent no-op.

It does not load anything; it reads module attributes only.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidAdapter

# base_model.model.<module path>.lora_A.weight  (PEFT's saved layout; the adapter name is not in it)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _features(module: Any) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, or None if unknown."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def check_fits(name: str, base: Any, tensors: dict[str, Any], rank: int) -> None:
    """Raise InvalidAdapter (code wrong_base) unless every LoRA tensor fits a base module."""
    modules = dict(base.named_modules())
    matched = 0
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue  # embeddings, magnitude vectors (DoRA) and the like: PEFT checks those
        path, part = m.group("module"), m.group("part")
        module = modules.get(path)
        if module is None:
            raise InvalidAdapter(f"adapter {name!r}: tensor {key} targets {path}, which this base model lacks",
                                 code="wrong_base")
        feats = _features(module)
        if feats is None:
            raise InvalidAdapter(f"adapter {name!r}: {path} is a {type(module).__name__}, not a linear layer",
                                 code="wrong_base")
        fin, fout = feats
        want = (rank, fin) if part == "A" else (fout, rank)
        if tuple(t.shape) != want:
            raise InvalidAdapter(
                f"adapter {name!r}: {key} has shape {tuple(t.shape)}, but {path} needs {want} "
                f"(in {fin}, out {fout}, rank {rank}); the adapter was made for another base model",
                code="wrong_base")
        matched += 1
    if matched == 0:
        raise InvalidAdapter(f"adapter {name!r}: none of its {len(tensors)} tensors matches a layer of this base model",
                             code="wrong_base")
