"""Admin routes for background work: training (/admin/train), evaluations (/admin/evals), fused exports
(/admin/exports), jobs (/admin/jobs).

Owns: the request shapes with their bounds, every check that can be made
before a job is queued (names, data path inside `train.data_dir`, conflicts
with the store, the registry and other jobs), the argument list handed to the
job runner, and what happens when a job succeeds (a trained adapter is
registered and servable at once, and an alias flipped to it when asked; one
that failed its promotion gate is not). An evaluation names registered
adapters, blends and exports, which become folders on the job's command line.
Long work never runs in the request: the answer is 202 with a job id to poll.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import Conflict, InvalidRequest, NotFound, NotReady
from ..jobs import Job, JobManager
from ..registry import check_name
from ..training import defaults
from .admin import entry_json
from .deps import AppState, require_admin

router = APIRouter()

TARGET_RE = r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TrainBody(_Body):
    name: str
    data: str = Field(description="a JSONL file, relative to train.data_dir")
    rank: int | None = Field(None, ge=1, le=1024)
    alpha: int | None = Field(None, ge=1, le=65536)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, min_length=1, max_length=64)
    modules_to_save: list[str] | None = Field(None, min_length=1, max_length=64)
    epochs: float | None = Field(None, gt=0.0, le=1000.0)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    warmup_ratio: float = Field(defaults.WARMUP_RATIO, ge=0.0, lt=1.0)
    batch_size: int | None = Field(None, ge=1, le=4096)
    grad_accum: int | None = Field(None, ge=1, le=4096)
    max_seq_len: int | None = Field(None, ge=8, le=1_048_576)
    eval_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    save_steps: int | None = Field(None, ge=1, le=10_000_000)
    long_examples: Literal["error", "skip", "truncate"] = "error"
    qlora: bool = False
    loftq: bool = False
    loftq_examples: int | None = Field(None, ge=0, le=1_000_000, description="with loftq: records that calibrate it")
    dora: bool = False
    rslora: bool = False
    gradient_checkpointing: bool = False
    resume: bool = False
    replace: bool = False
    promote_if: str | None = Field(None, max_length=200, description="a gate, e.g. eval_loss<0.8*base")
    alias: str | None = Field(None, description="flip this alias to the new version once registered")


class EvalBody(_Body):
    data: str | None = Field(None, description="a JSONL file, relative to train.data_dir")
    held_out: str | None = Field(None, description="a registered adapter whose training split to evaluate")
    adapters: list[str] = Field(default_factory=list, max_length=64, description="registered adapters or blends")
    exports: list[str] = Field(default_factory=list, max_length=16, description="fused exports, by name")
    base: bool = True
    exact: bool = True
    max_examples: int | None = Field(None, ge=1, le=1_000_000)


class ExportBody(_Body):
    adapter: str
    name: str
    tolerance: float | None = Field(None, gt=0.0, le=1e3)
    replace: bool = False


def _jobs(state: AppState) -> JobManager:
    if state.jobs is None or not state.ready:
        raise NotReady("the server is not ready for background jobs yet", code="not_ready")
    return state.jobs


def _inside_data_dir(state: AppState, path: Path, param: str, outside: str) -> Path:
    """`path` after symlinks and '..', when it lies inside train.data_dir; `outside` is the 400's
    message when it does not. A path the OS cannot name or resolve is a 400 too, not a 500."""
    root = state.config.path(state.config.train.data_dir).resolve()
    text = str(path)
    shown = text if len(text) <= 200 else text[:200] + "..."  # the name once, not a 5,000-character echo
    if "\x00" in text:  # the OS cannot name it; a ValueError deep in pathlib otherwise
        raise InvalidRequest(f"{param} holds a NUL byte", param=param, code="invalid_path")
    try:
        full = path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise InvalidRequest(f"{param} {shown!r} cannot be resolved ({getattr(e, 'strerror', None) or e})",
                             param=param, code="invalid_path") from None
    if root not in full.parents:
        raise InvalidRequest(f"{outside} ({root})", param=param, code="path_outside_roots")
    return full


def _data_file(state: AppState, data: str) -> Path:
    """The data file, inside train.data_dir after resolving symlinks and '..'; never outside it."""
    root = state.config.path(state.config.train.data_dir).resolve()
    shown = data if len(data) <= 200 else data[:200] + "..."
    full = _inside_data_dir(state, root / data, "data", f"data {shown!r} resolves outside the training data folder")
    try:
        found = full.is_file()
    except OSError as e:  # a name too long for the file system
        raise InvalidRequest(f"data {shown!r} cannot be read ({e.strerror or e})", param="data",
                             code="invalid_path") from None
    if not found:
        raise InvalidRequest(f"data {shown!r}: no such file in {root}", param="data", code="data_not_found")
    return full


def _base_flags(state: AppState) -> list[str]:
    cfg = state.config
    flags = ["--progress", "json", "--base", cfg.model.model, "--adapters-dir", str(cfg.path(cfg.adapters.dir))]
    return flags + (["--config", str(cfg.source)] if cfg.source else [])


def _train_argv(state: AppState, body: TrainBody, data: Path) -> list[str]:
    argv = ["train", str(data), "--name", body.name, *_base_flags(state), "--long-examples", body.long_examples,
            "--warmup-ratio", repr(body.warmup_ratio)]
    values = {"--rank": body.rank, "--alpha": body.alpha, "--dropout": body.dropout, "--epochs": body.epochs,
              "--max-steps": body.max_steps, "--lr": body.learning_rate, "--batch-size": body.batch_size,
              "--grad-accum": body.grad_accum, "--max-seq-len": body.max_seq_len,
              "--eval-fraction": body.eval_fraction, "--seed": body.seed, "--save-steps": body.save_steps,
              "--loftq-examples": body.loftq_examples}
    for flag, value in values.items():
        if value is not None:
            argv += [flag, repr(value)]
    if body.target_modules:
        argv += ["--target-modules", ",".join(body.target_modules)]
    if body.modules_to_save:
        argv += ["--modules-to-save", ",".join(body.modules_to_save)]
    if body.promote_if:
        argv += ["--promote-if", body.promote_if]
    for flag, on in (("--qlora", body.qlora), ("--loftq", body.loftq), ("--dora", body.dora), ("--rslora", body.rslora),
                     ("--gradient-checkpointing", body.gradient_checkpointing),
                     ("--resume", body.resume), ("--replace", body.replace)):
        if on:
            argv.append(flag)
    return argv


@router.post("/admin/train")
async def start_training(body: TrainBody, state: AppState = Depends(require_admin)) -> Any:
    from ..training.gate import GateError, parse

    jobs = _jobs(state)
    check_name(body.name)
    if body.promote_if is not None:
        try:
            parse(body.promote_if)
        except GateError as e:
            raise InvalidRequest(str(e), param="promote_if", code="invalid_gate") from None
        if body.eval_fraction == 0:
            raise InvalidRequest("promote_if needs a held-out split; eval_fraction is 0", param="promote_if")
    if body.alias is not None:
        check_name(body.alias, param="alias")
        # Checked now so that the flip after training cannot fail on the name (it would leave the
        # adapter registered and the alias as it was).
        if body.alias == body.name or body.alias in {e.name for e in state.registry.entries()}:
            raise Conflict(f"{body.alias!r} is an adapter's name; an alias needs a name of its own", param="alias",
                           code="name_is_adapter")
    for param, names in (("target_modules", body.target_modules), ("modules_to_save", body.modules_to_save)):
        bad = [t for t in names or [] if not re.match(TARGET_RE, t)]
        if bad:
            raise InvalidRequest(f"invalid module name(s): {bad}", param=param)
    rank = body.rank or state.config.train.rank
    if rank > state.config.adapters.max_lora_rank:
        raise InvalidRequest(f"rank {rank} is above adapters.max_lora_rank={state.config.adapters.max_lora_rank}, "
                             "so the result could not be served", param="rank", code="rank_too_large")
    data = _data_file(state, body.data)
    store = state.config.path(state.config.adapters.dir)
    if not body.replace and ((store / body.name).exists() or body.name in {e.name for e in state.registry.entries()}):
        raise Conflict(f"an adapter named {body.name!r} exists; pass replace=true or choose another name",
                       param="name", code="name_taken")
    if jobs.active("train", "name", body.name):
        raise Conflict(f"a training job for {body.name!r} is already queued or running", param="name",
                       code="job_exists")

    async def register(job: Job) -> dict[str, Any]:
        entry, _ = await state.registry.register(body.name, body.name, replace=body.replace)
        out: dict[str, Any] = {"adapter": entry_json(entry)}
        if body.alias:
            out["alias"], _ = await state.registry.set_alias(body.alias, {"target": f"{body.name}@{entry.version}"})
        return out

    job = jobs.submit("train", _train_argv(state, body, data), body.model_dump(), register)
    return JSONResponse({"job": job.id, **job.public()}, status_code=202)


def _folder_of(state: AppState, name: str, param: str) -> Path:
    entry = state.registry.get(name)  # 404 in OpenAI's shape for a name nobody serves
    if entry.path is None or not (entry.path / "adapter_config.json").is_file():
        raise InvalidRequest(f"{name!r} has no adapter folder to evaluate", param=param)
    return entry.path


def _card_data_inside_data_dir(state: AppState, folder: Path) -> None:
    """A card names its data file, and a card can come with an adapter from anywhere: the file it
    names is read only when it lies inside train.data_dir, as for a training request."""
    from ..training.data import DataError
    from ..training.evaluate import held_out

    try:
        data, _ = held_out(folder)
    except DataError as e:
        raise InvalidRequest(str(e), param="held_out", code="no_training_card") from None
    # Relative: to the working folder, as the job reads it.
    _inside_data_dir(state, data, "held_out", f"the training card of {folder.name!r} names a data file outside "
                     "the training data folder")


@router.post("/admin/evals")
async def start_eval(body: EvalBody, state: AppState = Depends(require_admin)) -> Any:
    """Score the base, adapters, blends and exports on one file (or a run's held-out split), as a job."""
    jobs = _jobs(state)
    if (body.data is None) == (body.held_out is None):
        raise InvalidRequest("name exactly one of data (a file) and held_out (an adapter's training split)",
                             param="data")
    argv = ["eval"]
    if body.data is not None:
        argv.append(str(_data_file(state, body.data)))
    else:
        assert body.held_out is not None
        folder = _folder_of(state, body.held_out, "held_out")
        _card_data_inside_data_dir(state, folder)
        argv += ["--held-out", str(folder)]
    argv += [*_base_flags(state), "--quantization", state.config.model.quantization]
    folders = [str(_folder_of(state, n, "adapters")) for n in body.adapters]
    if folders:
        argv += ["--adapters", ",".join(folders)]
    root = state.config.path(state.config.train.exports_dir)
    for name in body.exports:
        check_name(name, param="exports")
        if not (root / name / "config.json").is_file():
            raise InvalidRequest(f"no export named {name!r} in {root}", param="exports", code="export_not_found")
        argv += ["--export", str(root / name)]
    if not body.base:
        argv.append("--no-base")
    if not body.exact:
        argv.append("--no-exact")
    if body.max_examples is not None:
        argv += ["--max-examples", str(body.max_examples)]
    if not body.base and not folders and not body.exports and body.held_out is None:
        raise InvalidRequest("nothing to evaluate: name adapters or exports, or keep the base", param="adapters")
    job = jobs.submit("eval", argv, body.model_dump())
    return JSONResponse({"job": job.id, **job.public()}, status_code=202)


@router.post("/admin/exports")
async def start_export(body: ExportBody, state: AppState = Depends(require_admin)) -> Any:
    jobs = _jobs(state)
    check_name(body.name)
    entry = state.registry.get(body.adapter)
    if entry.path is None or not entry.path.is_dir():
        raise InvalidRequest(f"{body.adapter!r} has no adapter folder to export", param="adapter")
    out = state.config.path(state.config.train.exports_dir) / body.name
    if out.exists() and not body.replace:
        raise Conflict(f"an export named {body.name!r} exists; pass replace=true or choose another name",
                       param="name", code="name_taken")
    if jobs.active("export", "name", body.name):
        raise Conflict(f"an export named {body.name!r} is already queued or running", param="name",
                       code="job_exists")
    argv = ["merge", str(entry.path), "--out", str(out), *_base_flags(state),
            "--quantization", state.config.model.quantization]
    if body.tolerance is not None:
        argv += ["--tolerance", repr(body.tolerance)]
    if body.replace:
        argv.append("--replace")
    job = jobs.submit("export", argv, body.model_dump())
    return JSONResponse({"job": job.id, **job.public()}, status_code=202)


@router.get("/admin/data")
async def list_data(state: AppState = Depends(require_admin)) -> Any:
    """The JSONL files a training or evaluation may name: those in train.data_dir (not below it)."""
    root = state.config.path(state.config.train.data_dir).resolve()
    files = sorted(p for p in root.glob("*.jsonl") if p.is_file() and root in p.resolve().parents) \
        if root.is_dir() else []
    return {"object": "list", "data": [{"name": p.name, "size_bytes": p.stat().st_size} for p in files]}


@router.get("/admin/jobs")
async def list_jobs(state: AppState = Depends(require_admin)) -> Any:
    return {"object": "list", "data": [j.public() for j in state.jobs.list()] if state.jobs else []}


@router.get("/admin/jobs/{job_id}")
async def get_job(job_id: str, state: AppState = Depends(require_admin)) -> Any:
    return _jobs_or_404(state).get(job_id).public()


@router.delete("/admin/jobs/{job_id}")
async def cancel_job(job_id: str, state: AppState = Depends(require_admin)) -> Any:
    return (await _jobs_or_404(state).cancel(job_id)).public()


def _jobs_or_404(state: AppState) -> JobManager:
    if state.jobs is None:
        raise NotFound("no jobs", code="job_not_found")
    return state.jobs
