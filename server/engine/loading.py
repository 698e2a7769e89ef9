"""What the engine sizes and prepares before anything touches the running model.

Owns: the KV pool's size in blocks (from engine.max_kv_tokens, engine.kv_cache_memory or the
device's default), the host tier's key for an adapter folder, and a blend made ready for a slot
(PEFT builds it on the workbench, it is written to its folder, and its identity for the
prefix cache is fixed). Plain functions: the engine calls them on its own or its loader thread.

It knows configs, files and PEFT's output; not requests, threads or the scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import EngineConfig, ModelConfig
from ..lora.blend import BlendSpec, write_folder
from ..lora.slots import Prepared
from ..lora.weights import CONFIG_FILE, WEIGHTS_FILE, AdapterFiles, describe_adapter
from ..model import LoadedModel
from .attention import KVPool
from .runner import model_geometry

CPU_KV_BYTES = 2 << 30              # the KV pool's default size on CPU


def pool_blocks(cfg: EngineConfig, model_cfg: ModelConfig, loaded: LoadedModel) -> int:
    """KV blocks from engine.max_kv_tokens, else engine.kv_cache_memory, else the device's default."""
    bs = cfg.block_size
    if cfg.max_kv_tokens:
        return -(-cfg.max_kv_tokens // bs)
    layers, kv, head_dim = model_geometry(loaded.model.config)
    per_block = bs * KVPool.bytes_per_slot(layers, kv, head_dim, loaded.dtype)
    memory = cfg.kv_cache_memory
    if not memory:
        if loaded.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(loaded.device)
            memory = int(0.6 * free)
        else:
            memory = CPU_KV_BYTES
        # Auto never sizes past what the batch could ever hold: every sequence at full context.
        ctx = model_cfg.context_length or getattr(loaded.model.config, "max_position_embeddings", 0) or 2048
        memory = min(memory, -(-cfg.max_batch_size * ctx // bs) * per_block)
    return max(1, memory // per_block)


def file_key(folder: Path) -> tuple[Any, ...] | None:
    """The host tier's key for an adapter folder: its files' paths, sizes and modification times."""
    try:
        parts = []
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            path = Path(folder) / f
            st = path.stat()
            parts.append((str(path.resolve()), st.st_size, st.st_mtime_ns))
        return tuple(parts)
    except OSError:
        return None


def prepare_blend(runner: Any, name: str, spec: BlendSpec, folder: Path) -> tuple[Prepared, str]:
    """PEFT's blend of loaded adapters, written to `folder`, ready for a slot; and its identity
    for the prefix cache: the folder's content hash. (Per-request mixes build nothing: see
    `AdapterSlots.mix_slots`.)"""
    from peft import get_peft_model_state_dict

    peft = runner.slots.build_blend(name, spec)
    cfg = peft.peft_config[name]
    write_folder(peft, name, folder)
    info = describe_adapter(folder)
    identity = info.sha256
    tensors = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(peft, adapter_name=name).items()}
    return runner.slots.prepare(name, AdapterFiles(info, cfg, tensors)), identity
