"""Random-weight models and adapters of realistic shapes, built where they run (no download, no file).

    from loadtest.shapes import SHAPES, loader_for, write_adapter

`SHAPES` holds the default model's shape (SmolLM2-135M) and Llama 3.2 1B- and Llama 3.1 8B-shaped
configs. `loader_for(shape)` is a `TorchEngine(loader=...)` that builds that model with random
weights directly on the engine's device in its dtype (speed does not depend on the weights'
values; an 8B model never touches the disk) and a byte-level tokenizer trained here on a tiny
corpus. `write_adapter` writes a random PEFT folder for a shape without building the model (the
LoRA shapes follow from the config). Used by loadtest/gpu_bench.py and loadtest/gpu_check.sh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # hidden, intermediate, layers, heads, kv heads, vocab: the published configs' numbers.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
TARGETS = {"qv": ("q_proj", "v_proj"),
           "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[shape])


def tokenizer() -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world", "0123456789 abcdefghijklmnopqrstuvwxyz"]
    bpe.train_from_iterator(corpus * 8, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT
    return tok


def parameters(shape: str) -> int:
    """Weights read by one decode step (embeddings once if tied): what the bandwidth roofline counts."""
    s = SHAPES[shape]
    h, i, n, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if s["tie_word_embeddings"] else 2) + h


def loader_for(shape: str):
    """A TorchEngine loader: the shape's model with random weights on the configured device."""
    def load(cfg: Any, cache_dir: Path) -> Any:
        import torch
        from transformers import LlamaForCausalLM

        from server.model import LoadedModel, choose_device, choose_dtype

        device, _ = choose_device(cfg.device)
        dtype, _ = choose_dtype(cfg.dtype, device, "none")
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config(shape), dtype=dtype, attn_implementation="sdpa")
        model.eval()
        tok = tokenizer()
        return LoadedModel(model, tok, shape, device, dtype, 4096, [tok.eos_token_id])
    return load


def write_adapter(shape: str, folder: Path, rank: int, targets: str, seed: int) -> Path:
    """A PEFT LoRA folder for `shape` with random weights (small, so outputs stay finite)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    s = SHAPES[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}   # (in, out)
    part = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(s["num_hidden_layers"]):
        for m in TARGETS[targets]:
            d_in, d_out = dims[m]
            key = f"base_model.model.model.layers.{layer}.{part[m]}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * d_in ** -0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS[targets]),
               task_type="CAUSAL_LM").save_pretrained(str(folder))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == rank
    return folder
