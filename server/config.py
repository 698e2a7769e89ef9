"""One typed configuration tree, read once.

Owns: the sections of `config.toml`, their defaults and validation, and the
layering file < environment (`LORAPLEX_<SECTION>__<KEY>`) < command-line flags.
The environment comes in as a parameter (`environ=`), never read deep inside,
so tests can pass their own. Relative paths are resolved against the folder
of the config file (or the working directory when there is none).

It does not know what the values are used for; each section's docstring and
field comments say what they mean, and `config.toml` repeats that for users.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "LORAPLEX_"

# The batched LoRA paths (server/lora/pool.py implements each; a test checks the two agree).
LORA_BACKENDS = ("auto", "gathered", "segments", "loop")


@dataclass
class ServerConfig:
    """HTTP front end: address, credentials and request limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Inference API keys. Empty = no auth on /v1. Prefer the environment
    # (LORAPLEX_SERVER__API_KEYS="k1,k2") or api_keys_file over the TOML.
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: str = ""
    # Admin token (separate from API keys). Empty = admin routes answer loopback only.
    admin_token: str = ""
    admin_token_file: str = ""
    log_level: str = "info"
    log_format: str = "text"        # text | json (one object per line)
    max_body_bytes: int = 1_048_576
    # Caps checked before any model work.
    max_tokens: int = 4096          # largest max_tokens a request may ask for
    default_max_tokens: int = 256   # chat default when the request names none
    max_n: int = 8
    max_prompt_tokens: int = 0      # 0 = the model's context length
    max_stop_sequences: int = 8
    max_stop_length: int = 256
    max_top_logprobs: int = 20
    max_prompts: int = 64           # prompts in one /v1/completions list
    # A request still generating after this many seconds is ended (408, or an error event in a
    # stream), so a slow client or a huge max_tokens cannot hold a batch slot forever. 0 = no limit.
    request_timeout_s: float = 600.0
    # A stream whose client has not taken the next event for this long (it stopped reading; its
    # socket is full) is ended and its adapter released, so slow readers cannot hold slots. 0 = never.
    stream_idle_timeout_s: float = 60.0
    # On SIGTERM: /ready turns 503 and new requests get 503 at once; running requests get this
    # long to finish, then end with an error event; then the process exits 0.
    drain_timeout_s: float = 30.0
    metrics_access: str = "public"  # public | inference (an API key) | admin (the admin token)


@dataclass
class ModelConfig:
    """The resident base model and how it is loaded."""

    # "default" (embedded SmolLM2-135M-Instruct), a transformers folder, or a .gguf file.
    model: str = "default"
    id: str = ""                    # served id; "" = derived from the model
    dtype: str = "auto"             # auto | float32 | bfloat16 | float16
    quantization: str = "none"      # none | nf4 | fp4 | int8 (bitsandbytes)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    cache_dir: str = ".cache/models"   # where converted models are kept
    context_length: int = 0         # 0 = the model's max_position_embeddings
    chat_template: str = ""         # a Jinja chat template file to use instead of the model's own
    tool_parser: str = ""           # "" (none: tool_choice "auto" is a 400) | hermes | llama3_json
    # Special-token strings inside chat message content: "text" (plain characters: nobody can
    # forge a turn) or "control" (the raw behaviour, for trusted deployments only).
    special_tokens_in_content: str = "text"


@dataclass
class EngineConfig:
    """The generation engine: batching and threads."""

    max_batch_size: int = 32        # sequences running at once (vLLM's max_num_seqs)
    # Tokens computed in one step: every running decode's token, then prompt chunks. A prompt
    # longer than this is split over steps, so one long prompt never stalls running streams.
    max_num_batched_tokens: int = 512
    # Most prompt tokens one sequence computes in a step while others are decoding (measured on a
    # 2-core CPU: 64 keeps the streams' inter-token p99 under 2x their p50; on a GPU use 512+).
    max_prefill_chunk: int = 64
    block_size: int = 16            # tokens per KV-cache block
    # KV pool size in bytes; 0 = auto (on CUDA 60% of the memory free after loading, on CPU 2 GiB).
    kv_cache_memory: int = 0
    max_kv_tokens: int = 0          # if > 0, the KV pool holds exactly this many tokens (rounded up to blocks)
    prefix_caching: bool = True     # reuse the KV blocks of a prompt prefix seen before, per adapter
    attention_backend: str = "batched"  # batched | reference (see server/engine/attention.py)
    # On CUDA, capture decode-only steps as CUDA graphs and replay them (no effect on a CPU).
    cuda_graphs: bool = True
    max_waiting_requests: int = 256  # queued beyond this get 429
    threads: int = 0                # torch intra-op threads; 0 = torch's default
    lora_backend: str = "auto"      # auto | gathered | segments | loop (see server/lora/pool.py)
    # /ready turns 503 when the engine loop has not come round for this long (a stalled or
    # wedged engine thread): one step, or one adapter load, must never take longer.
    stall_timeout_s: float = 120.0


@dataclass
class AdaptersConfig:
    """The adapter store."""

    dir: str = "adapters"
    load_at_startup: bool = True    # register every valid folder found in `dir`
    max_lora_rank: int = 64
    max_loaded_adapters: int = 16   # LoRA slots: adapters (and blends) held on the device; LRU beyond
    max_cpu_adapters: int = 32      # evicted adapters kept prepared in RAM, so a reload skips the disk
    # A request for an adapter not in a slot, when every slot is serving, waits this long for one
    # to go idle before it gets 429 (0 = 429 at once).
    slot_wait_s: float = 30.0
    # Extra folders an admin may load adapters from by absolute path (the store is always allowed).
    roots: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The bundled trainer's defaults (`loraplex train` flags and /admin/train fields override them),
    and where training data and fused exports live."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # empty = PEFT's preset for the architecture
    learning_rate: float = 2e-4
    epochs: float = 3.0
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    eval_fraction: float = 0.1
    seed: int = 0
    save_steps: int = 50            # a checkpoint every N optimizer steps (--resume continues from the newest)
    data_dir: str = "data"          # /admin/train reads data files only from here (relative paths)
    exports_dir: str = "exports"    # fused models written by `loraplex merge` and /admin/exports
    max_queued_jobs: int = 8        # background jobs waiting beyond this get 429


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    base_dir: Path = field(default_factory=Path.cwd)
    source: Path | None = None      # the TOML file read, if any (background jobs read it too)

    def path(self, value: str) -> Path:
        """Resolve a configured path against the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def api_keys(self) -> list[str]:
        keys = list(self.server.api_keys)
        if self.server.api_keys_file:
            keys += _read_secret_lines(self.path(self.server.api_keys_file), "server.api_keys_file")
        return [k for k in keys if k]

    def admin_token(self) -> str:
        if self.server.admin_token:
            return self.server.admin_token
        if self.server.admin_token_file:
            lines = _read_secret_lines(self.path(self.server.admin_token_file), "server.admin_token_file")
            return lines[0] if lines else ""
        return ""


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("base_dir", "source")}
_CHOICES = {
    ("model", "dtype"): {"auto", "float32", "bfloat16", "float16"},
    ("model", "quantization"): {"none", "nf4", "fp4", "int8"},
    ("model", "attn_implementation"): {"sdpa", "eager", "flash_attention_2"},
    ("model", "tool_parser"): {"", "hermes", "llama3_json"},
    ("model", "special_tokens_in_content"): {"text", "control"},
    ("server", "log_level"): {"debug", "info", "warning", "error"},
    ("server", "log_format"): {"text", "json"},
    ("server", "metrics_access"): {"public", "inference", "admin"},
    ("engine", "lora_backend"): set(LORA_BACKENDS),
    ("engine", "attention_backend"): {"batched", "reference"},
}


def _read_secret_lines(path: Path, key: str) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a TOML or environment value into the field's type, or say why not."""
    origin = typing.get_origin(typ)
    if origin is list or typ is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    if section not in _SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sorted(_SECTIONS))})")
    obj = getattr(cfg, section)
    types_ = _section_types(type(obj))
    if key not in types_:
        raise ConfigError(f"{source}: unknown key {section}.{key} (known: {', '.join(sorted(types_))})")
    name = f"{section}.{key}"
    try:
        coerced = _coerce(name, value, types_[key])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    choices = _CHOICES.get((section, key))
    if choices and coerced not in choices:
        raise ConfigError(f"{source}: {name}: {coerced!r} is not one of {sorted(choices)}")
    setattr(obj, key, coerced)


def _validate(cfg: Config) -> None:
    positive = [
        ("server.port", cfg.server.port), ("server.max_body_bytes", cfg.server.max_body_bytes),
        ("server.max_tokens", cfg.server.max_tokens), ("server.default_max_tokens", cfg.server.default_max_tokens),
        ("server.max_n", cfg.server.max_n), ("server.max_prompts", cfg.server.max_prompts),
        ("engine.max_batch_size", cfg.engine.max_batch_size),
        ("engine.max_num_batched_tokens", cfg.engine.max_num_batched_tokens),
        ("engine.max_prefill_chunk", cfg.engine.max_prefill_chunk),
        ("engine.block_size", cfg.engine.block_size),
        ("engine.max_waiting_requests", cfg.engine.max_waiting_requests),
        ("adapters.max_lora_rank", cfg.adapters.max_lora_rank),
        ("adapters.max_loaded_adapters", cfg.adapters.max_loaded_adapters),
        ("train.rank", cfg.train.rank), ("train.batch_size", cfg.train.batch_size),
        ("train.grad_accum", cfg.train.grad_accum), ("train.max_seq_len", cfg.train.max_seq_len),
        ("train.save_steps", cfg.train.save_steps), ("train.max_queued_jobs", cfg.train.max_queued_jobs),
        ("train.epochs", cfg.train.epochs), ("train.learning_rate", cfg.train.learning_rate),
    ]
    for name, v in positive:
        if v <= 0:
            raise ConfigError(f"{name}: must be > 0, got {v}")
    for name, v in [("server.max_prompt_tokens", cfg.server.max_prompt_tokens),
                    ("engine.threads", cfg.engine.threads),
                    ("engine.kv_cache_memory", cfg.engine.kv_cache_memory),
                    ("engine.max_kv_tokens", cfg.engine.max_kv_tokens),
                    ("adapters.max_cpu_adapters", cfg.adapters.max_cpu_adapters),
                    ("model.context_length", cfg.model.context_length),
                    ("server.max_top_logprobs", cfg.server.max_top_logprobs)]:
        if v < 0:
            raise ConfigError(f"{name}: must be >= 0, got {v}")
    for name, v in [("server.request_timeout_s", cfg.server.request_timeout_s),
                    ("server.stream_idle_timeout_s", cfg.server.stream_idle_timeout_s),
                    ("adapters.slot_wait_s", cfg.adapters.slot_wait_s),
                    ("server.drain_timeout_s", cfg.server.drain_timeout_s)]:
        if not v >= 0:  # also refuses NaN
            raise ConfigError(f"{name}: must be >= 0, got {v}")
    if cfg.engine.max_num_batched_tokens < cfg.engine.max_batch_size:
        raise ConfigError(f"engine.max_num_batched_tokens ({cfg.engine.max_num_batched_tokens}) must be >= "
                          f"engine.max_batch_size ({cfg.engine.max_batch_size}): every running sequence "
                          "gets a token each step")
    if not cfg.engine.stall_timeout_s > 0:
        raise ConfigError(f"engine.stall_timeout_s: must be > 0, got {cfg.engine.stall_timeout_s}")
    if not 0.0 <= cfg.train.eval_fraction < 1.0:
        raise ConfigError(f"train.eval_fraction: must be in [0, 1), got {cfg.train.eval_fraction}")
    if not 0 < cfg.server.port < 65536:
        raise ConfigError(f"server.port: must be 1..65535, got {cfg.server.port}")


def load_config(
    path: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults < TOML file < environment < overrides.

    `overrides` maps "section.key" to a value (the CLI's flags); None values are skipped.
    """
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        cfg.base_dir = p.resolve().parent
        cfg.source = p.resolve()
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{p}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(p))
    for name, value in (environ or {}).items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        _apply(cfg, section, key, value, f"environment {name}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key, value, f"flag for {dotted}")
    _validate(cfg)
    return cfg

