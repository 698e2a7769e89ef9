"""One typed configuration tree, read once.

Owns: the sections of `config.toml`, their defaults and validation, and the
layering file < environment (`LORAPLEX_<SECTION>__<KEY>`) < command-line flags.
The environment comes in as a parameter (`environ=`), never read deep inside,
so tests can pass their own. Relative paths are resolved against the folder
of the config file (or the working directory when there is none).

Each section is a pydantic dataclass: the field's type says what a value may be (a choice is a
`Literal`, a bound is a `Field` constraint), pydantic turns TOML and environment strings into it,
and every error names the key and where the value came from (file, environment variable, flag).

It does not know what the values are used for; each section's docstring and
field comments say what they mean, and `config.toml` repeats that for users.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass as section

from .errors import ConfigError
from .scopes import Scope, parse_key

ENV_PREFIX = "LORAPLEX_"

# The batched LoRA paths (server/lora/pool.py implements each; a test checks the two agree).
LORA_BACKENDS = ("auto", "gathered", "segments", "loop")
LoraBackend = Literal["auto", "gathered", "segments", "loop"]


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):  # pydantic takes true as 1; a TOML `port = true` is a mistake
        raise ValueError("expected a number, got a boolean")
    return v


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("expected a finite number")
    return v


def _comma_list(v: Any) -> Any:
    """The environment spells a list as "a,b"; TOML as a list of strings."""
    return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


Int = Annotated[int, BeforeValidator(_no_bool)]
Positive = Annotated[int, BeforeValidator(_no_bool), Field(gt=0)]
NonNegative = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
Seconds = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, BeforeValidator(_no_bool), BeforeValidator(_finite), Field(gt=0)]
Strings = Annotated[list[str], BeforeValidator(_comma_list)]
# Lax mode turns the environment's strings into numbers and booleans ("8000", "off"); a TOML
# number is still not a string. Unknown keys are refused earlier, with the list of known ones.
_SECTION = ConfigDict(extra="forbid")


@section(config=_SECTION)
class ServerConfig:
    """HTTP front end: address, credentials and request limits."""

    host: str = "127.0.0.1"
    port: Annotated[int, BeforeValidator(_no_bool), Field(gt=0, lt=65536)] = 8000
    # Inference API keys. Empty = no auth on /v1. Prefer the environment
    # (LORAPLEX_SERVER__API_KEYS="k1,k2") or api_keys_file over the TOML.
    api_keys: Strings = field(default_factory=list)
    api_keys_file: str = ""
    # Admin token (separate from API keys). Empty = admin routes answer loopback only.
    admin_token: str = ""
    admin_token_file: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line
    max_body_bytes: Positive = 1_048_576
    # Caps checked before any model work.
    max_tokens: Positive = 4096     # largest max_tokens a request may ask for
    default_max_tokens: Positive = 256  # chat default when the request names none
    max_n: Positive = 8
    max_prompt_tokens: NonNegative = 0  # 0 = the model's context length
    max_stop_sequences: NonNegative = 8
    max_stop_length: Positive = 256
    max_top_logprobs: NonNegative = 20
    max_prompts: Positive = 64      # prompts in one /v1/completions list
    # A request still generating after this many seconds is ended (408, or an error event in a
    # stream), so a slow client or a huge max_tokens cannot hold a batch slot forever. 0 = no limit.
    request_timeout_s: Seconds = 600.0
    # A stream whose client has not taken the next event for this long (it stopped reading; its
    # socket is full) is ended and its adapter released, so slow readers cannot hold slots. 0 = never.
    stream_idle_timeout_s: Seconds = 60.0
    # On SIGTERM: /ready turns 503 and new requests get 503 at once; running requests get this
    # long to finish, then end with an error event; then the process exits 0.
    drain_timeout_s: Seconds = 30.0
    metrics_access: Literal["public", "inference", "admin"] = "public"  # inference: an API key; admin: the token
    ui: bool = True                 # the web console at /ui (static files; it calls the API like any client)


@section(config=_SECTION)
class ModelConfig:
    """The resident base model and how it is loaded."""

    # "default" (embedded SmolLM2-135M-Instruct), a transformers folder, or a .gguf file.
    model: str = "default"
    id: str = ""                    # served id; "" = derived from the model
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"  # bitsandbytes
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    cache_dir: str = ".cache/models"   # where converted models are kept
    context_length: NonNegative = 0  # 0 = the model's max_position_embeddings
    chat_template: str = ""         # a Jinja chat template file to use instead of the model's own
    tool_parser: Literal["", "hermes", "llama3_json"] = ""  # "": none (tool_choice "auto" is a 400)
    # Special-token strings inside chat message content: "text" (plain characters: nobody can
    # forge a turn) or "control" (the raw behaviour, for trusted deployments only).
    special_tokens_in_content: Literal["text", "control"] = "text"


@section(config=_SECTION)
class EngineConfig:
    """The generation engine: batching and threads."""

    max_batch_size: Positive = 32   # sequences running at once (vLLM's max_num_seqs)
    # Tokens computed in one step: every running decode's token, then prompt chunks. A prompt
    # longer than this is split over steps, so one long prompt never stalls running streams.
    max_num_batched_tokens: Positive = 512
    # Most prompt tokens one sequence computes in a step while others are decoding (measured on a
    # 2-core CPU: 64 keeps the streams' inter-token p99 under 2x their p50; on a GPU use 512+).
    max_prefill_chunk: Positive = 64
    block_size: Positive = 16       # tokens per KV-cache block
    # KV pool size in bytes; 0 = auto (on CUDA 60% of the memory free after loading, on CPU 2 GiB).
    kv_cache_memory: NonNegative = 0
    max_kv_tokens: NonNegative = 0  # if > 0, the KV pool holds exactly this many tokens (rounded up to blocks)
    prefix_caching: bool = True     # reuse the KV blocks of a prompt prefix seen before, per adapter
    attention_backend: Literal["batched", "reference"] = "batched"  # see server/engine/attention.py
    # On CUDA, capture decode-only steps as CUDA graphs and replay them (no effect on a CPU).
    cuda_graphs: bool = True
    max_waiting_requests: Positive = 256  # queued beyond this get 429
    threads: NonNegative = 0        # torch intra-op threads; 0 = torch's default
    lora_backend: LoraBackend = "auto"  # see server/lora/pool.py
    # /ready turns 503 when the engine loop has not come round for this long (a stalled or
    # wedged engine thread): one step, or one adapter load, must never take longer.
    stall_timeout_s: PositiveFloat = 120.0

    @model_validator(mode="after")
    def _every_sequence_gets_a_token(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_batch_size "
                             f"({self.max_batch_size}): every running sequence gets a token each step")
        return self


@section(config=_SECTION)
class AdaptersConfig:
    """The adapter store."""

    dir: str = "adapters"
    load_at_startup: bool = True    # register every valid folder found in `dir`
    max_lora_rank: Positive = 64
    max_loaded_adapters: Positive = 16  # LoRA slots: adapters (and blends) held on the device; LRU beyond
    max_cpu_adapters: NonNegative = 32  # evicted adapters kept prepared in RAM, so a reload skips the disk
    # A request for an adapter not in a slot, when every slot is serving, waits this long for one
    # to go idle before it gets 429 (0 = 429 at once).
    slot_wait_s: Seconds = 30.0
    # Extra folders an admin may load adapters from by absolute path (the store is always allowed).
    roots: Strings = field(default_factory=list)
    # Resolvers (server/resolvers.py): a request naming an unknown adapter first looks for a store
    # folder of that name that appeared after start-up, then in each source, in order: a local
    # tree ("/srv/loras"), "s3://bucket/prefix", "hf://ORG[@REVISION]" (the Hub: off unless listed).
    resolve_store: bool = True
    sources: Strings = field(default_factory=list)
    s3_endpoint_url: str = ""       # an S3-compatible server (MinIO...); "" = AWS
    hf_cache: str = ""              # the Hub cache (or a mirror in its layout); "" = huggingface_hub's default
    max_download_bytes: Positive = 4 << 30   # per file a resolver fetches
    negative_cache_s: Seconds = 30.0         # a name no source has is not looked up again for this long
    # Store folders added, changed or removed are registered, replaced or unregistered (server/watch.py).
    watch: bool = False
    watch_interval_s: PositiveFloat = 2.0


@section(config=_SECTION)
class TrainConfig:
    """The bundled trainer's defaults (`loraplex train` flags and /admin/train fields override them),
    and where training data and fused exports live."""

    rank: Positive = 16
    alpha: Int = 32
    dropout: Annotated[float, BeforeValidator(_no_bool), Field(ge=0, lt=1)] = 0.05
    target_modules: Strings = field(default_factory=list)  # empty = the family's (server/training/defaults.py)
    learning_rate: PositiveFloat = 2e-4
    epochs: PositiveFloat = 3.0
    batch_size: Positive = 4
    grad_accum: Positive = 1
    max_seq_len: Positive = 512
    eval_fraction: Annotated[float, BeforeValidator(_no_bool), Field(ge=0, lt=1)] = 0.1
    seed: Int = 0
    save_steps: Positive = 50       # a checkpoint every N optimizer steps (--resume continues from the newest)
    data_dir: str = "data"          # /admin/train reads data files only from here (relative paths)
    exports_dir: str = "exports"    # fused models written by `loraplex merge` and /admin/exports
    max_queued_jobs: Positive = 8   # background jobs waiting beyond this get 429


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
        """The bare keys (a scoped entry `KEY: PATTERN ...` gives KEY)."""
        return list(self.api_key_scopes())

    def api_key_scopes(self) -> dict[str, Scope | None]:
        """Each key and the adapters it may use (None: every one); server/scopes.py."""
        entries = [(k, "server.api_keys") for k in self.server.api_keys]
        if self.server.api_keys_file:
            entries += [(k, "server.api_keys_file") for k in
                        _read_secret_lines(self.path(self.server.api_keys_file), "server.api_keys_file")]
        scopes: dict[str, Scope | None] = {}
        for entry, where in entries:
            if entry.strip():
                key, scope = parse_key(entry, where)
                if key in scopes and scopes[key] != scope:
                    raise ConfigError(f"{where}: one key is listed twice with different scopes")
                scopes[key] = scope
        return scopes

    def admin_token(self) -> str:
        if self.server.admin_token:
            return self.server.admin_token
        if self.server.admin_token_file:
            lines = _read_secret_lines(self.path(self.server.admin_token_file), "server.admin_token_file")
            return lines[0] if lines else ""
        return ""


_SECTIONS: dict[str, type] = {"server": ServerConfig, "model": ModelConfig, "engine": EngineConfig,
                              "adapters": AdaptersConfig, "train": TrainConfig}


def _read_secret_lines(path: Path, key: str) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def _build(section: str, values: dict[str, tuple[Any, str]]) -> Any:
    """The section from its (value, where it came from) pairs; ConfigError naming key and source."""
    cls = _SECTIONS[section]
    try:
        return cls(**{k: v for k, (v, _) in values.items()})
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        given = ", ".join(sorted({src for _, src in values.values()})) or "defaults"
        where = values[key][1] if key in values else given   # a check across keys: every source
        name = f"{section}.{key}" if key else f"[{section}]"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {name}: {msg} (got {err['input']!r})" if key else f"{where}: {name}: {msg}"
                          ) from None


def _put(raw: dict[str, dict[str, tuple[Any, str]]], section: str, key: str, value: Any, source: str) -> None:
    if section not in _SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sorted(_SECTIONS))})")
    known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
    if key not in known:
        raise ConfigError(f"{source}: unknown key {section}.{key} (known: {', '.join(sorted(known))})")
    raw.setdefault(section, {})[key] = (value, source)


def load_config(
    path: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults < TOML file < environment < overrides.

    `overrides` maps "section.key" to a value (the CLI's flags); None values are skipped.
    """
    raw: dict[str, dict[str, tuple[Any, str]]] = {}   # section -> key -> (value, its source); later wins
    base_dir, source = Path.cwd(), None
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        base_dir, source = p.resolve().parent, p.resolve()
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{p}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _put(raw, section, key, value, str(p))
    for name, value in (environ or {}).items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        _put(raw, section, key, value, f"environment {name}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _put(raw, section, key, value, f"flag for {dotted}")
    sections = {name: _build(name, raw.get(name, {})) for name in _SECTIONS}
    return Config(**sections, base_dir=base_dir, source=source)
