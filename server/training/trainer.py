"""The bundled LoRA / QLoRA trainer: transformers' `Trainer` over a PEFT model, written atomically into the store.

Owns: the training options and their defaults, setting up the base (full
precision for LoRA, bitsandbytes nf4 + `prepare_model_for_kbit_training` for
QLoRA), the PEFT config (the architecture family's targets from defaults.py
unless told otherwise), the `Trainer` arguments (checkpoints, eval split,
warmup, optimizer per device), the short-run warning, resuming from the newest
*complete* checkpoint, stopping at a safe point when asked, the promotion gate
(gate.py) and publishing the adapter: a staging folder with the weights, a
training card (loss history included) and its loss.png, renamed into the store
in one step, or into `<store>/.loraplex/unpromoted/<name>/` when the gate says
no. Checkpoints live in `<store>/.loraplex/train/<name>/` until success.

The training loop is transformers'; this module does not implement one. It
does not know about HTTP, the registry or a running server (the CLI and the
job runner register the result).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import publish, staging_path
from ..config import ModelConfig
from ..errors import ConfigError
from ..model import load_model
from . import defaults, gate, loftq
from .data import Dataset, Example, load_dataset
from .plot import PLOT_FILE, plot_losses
from .progress import LossBar, ProgressReporter, StopAtSafePoint

log = logging.getLogger("loraplex.train")

CARD_FILE = "training.json"
Report = Callable[[dict], None]


class TrainingError(RuntimeError):
    """Training could not run or finish; the message says why and what is left on disk."""


@dataclass
class TrainOptions:
    data: Path
    name: str
    rank: int = defaults.RANK
    alpha: int = defaults.ALPHA
    dropout: float = 0.05
    target_modules: list[str] | None = None   # None: the family's (defaults.py); ["all-linear"]: every Linear
    learning_rate: float = defaults.LEARNING_RATE
    warmup_ratio: float = defaults.WARMUP_RATIO
    epochs: float = 3.0
    max_steps: int = -1                        # > 0 overrides epochs
    batch_size: int = defaults.BATCH_SIZE
    grad_accum: int = 1
    max_seq_len: int = 512
    eval_fraction: float = 0.1
    seed: int = 0
    qlora: bool = False
    loftq: bool = False                        # QLoRA: LoRA starts as the best rank-r fix of nf4's error (loftq.py)
    loftq_examples: int = defaults.LOFTQ_EXAMPLES  # training records that calibrate that fix; 0: the plain SVD fix
    dora: bool = False                         # PEFT's use_dora (served exactly: server/lora/slots.py)
    rslora: bool = False                       # PEFT's use_rslora
    modules_to_save: list[str] | None = None   # trained in full (served per row: server/lora/swap.py)
    gradient_checkpointing: bool = False
    precision: str = "auto"                    # auto | fp32 | bf16 | fp16
    optim: str = "auto"                        # auto: paged 8-bit AdamW on CUDA, AdamW elsewhere
    save_steps: int = 50
    resume: bool = False
    long_examples: str = "error"               # error | skip | truncate
    replace: bool = False
    promote_if: str | None = None              # a gate (gate.py); failing it leaves the adapter unpromoted

    def hyperparameters(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "name", "resume", "replace", "promote_if"):
            d.pop(k)
        return d


def work_dir(store: Path, name: str) -> Path:
    return Path(store) / ".loraplex" / "train" / name


def unpromoted_dir(store: Path, name: str) -> Path:
    """Where a run that failed its gate is kept: inside the store's hidden folder, which no scan,
    resolver or watcher serves from, so the adapter is on disk but not servable by name."""
    return Path(store) / ".loraplex" / "unpromoted" / name


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The highest `checkpoint-N` whose trainer_state.json (written last by the Trainer) parses.

    A kill during a save leaves a checkpoint without it; that one is removed so the
    Trainer's own rotation never counts it.
    """
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob("checkpoint-*"):
        try:
            step = int(p.name.split("-", 1)[1])
            json.loads((p / "trainer_state.json").read_text())
            found.append((step, p))
        except (ValueError, OSError):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
    return max(found)[1] if found else None


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}


def _precision(opts: TrainOptions, device: torch.device) -> tuple[str, str]:
    if opts.precision != "auto":
        if opts.precision == "fp16" and device.type == "cpu":
            raise ConfigError("fp16 training needs CUDA; use bf16 or fp32 on CPU")
        return opts.precision, "set in the options"
    if device.type == "cuda":
        return ("bf16", "CUDA with bfloat16") if torch.cuda.is_bf16_supported() else ("fp16", "CUDA without bf16")
    return "fp32", "CPU: fp32 trains exactly; --precision bf16 uses autocast where the CPU has it"


def _optimizer(opts: TrainOptions, device: torch.device) -> str:
    if opts.optim != "auto":
        return opts.optim
    return "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"


def _load_base(opts: TrainOptions, model_cfg: ModelConfig, cache_dir: Path, report: Report):
    # LoRA trains on the full-precision base (fp32 on CPU), QLoRA on nf4, whatever the server
    # is set to serve with; the precision of the arithmetic is the Trainer's (--precision).
    cfg = replace(model_cfg, quantization="nf4" if opts.qlora else "none", dtype="auto")
    loaded = load_model(cfg, cache_dir)
    tok = loaded.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    report({"event": "model", "model": loaded.model_id, "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."), "quantization": loaded.quantization})
    return loaded


def _peft_model(model: Any, opts: TrainOptions) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if opts.qlora:
        # bitsandbytes repacks 4-bit weights for a fast CPU kernel the first time a layer runs in
        # eval mode (our eval-before-training does), and that kernel has no backward: gradients
        # would stop flowing through the frozen base. Keep the trainable layout for the whole run.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=opts.gradient_checkpointing)
    elif opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets: Any = opts.target_modules or ["default"]
    if len(targets) == 1 and targets[0] in defaults.PRESETS:   # a preset by name; default: the family's table
        try:
            targets = defaults.targets_for(getattr(model.config, "model_type", ""), targets[0])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    cfg = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                     use_dora=opts.dora, use_rslora=opts.rslora, modules_to_save=opts.modules_to_save,
                     task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. a target module the model does not have
        raise ConfigError(f"LoRA config refused by PEFT: {e}") from None


def _training_args(opts: TrainOptions, out: Path, device: torch.device, precision: str, has_eval: bool,
                   quiet: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=opts.batch_size,
        # One example per eval batch: eval_loss is then the mean of each example's loss, what
        # `loraplex eval` computes (evaluate.py), and padding never changes it.
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=opts.grad_accum, num_train_epochs=opts.epochs, max_steps=opts.max_steps,
        learning_rate=opts.learning_rate, warmup_steps=opts.warmup_ratio, lr_scheduler_type="linear",
        logging_steps=1, eval_strategy="epoch" if has_eval else "no", save_strategy="steps",
        save_steps=opts.save_steps, save_total_limit=2, seed=opts.seed, data_seed=opts.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device.type == "cpu",
        optim=_optimizer(opts, device), report_to=[], disable_tqdm=quiet, remove_unused_columns=False,
        dataloader_num_workers=0, gradient_checkpointing=False,  # enabled on the model in _peft_model
        save_only_model=False,
    )


def _publish(peft_model: Any, card: dict, store: Path, name: str, replace_existing: bool,
             target: Path | None = None) -> Path:
    """Write the adapter to a staging folder beside the store, then rename it in: whole or not at all."""
    home = store / ".loraplex"
    home.mkdir(parents=True, exist_ok=True)
    staging = staging_path(home, name)
    target = target or store / name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        peft_model.save_pretrained(str(staging))
        if card.get("history"):
            try:
                plot_losses(card["history"], staging / PLOT_FILE, f"{name}: {card['method']} on {card['base_model']}")
                card["plot"] = PLOT_FILE
            except Exception as e:  # a picture is not worth a lost training run
                log.warning("could not draw %s: %s", PLOT_FILE, e)
        (staging / CARD_FILE).write_text(json.dumps(card, indent=1))
        try:
            publish(staging, target, replace=replace_existing, aside_dir=home)
        except FileExistsError:
            raise TrainingError(f"{target} appeared while training; the result was not published") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _targets(model: Any) -> list[str]:
    t = model.peft_config["default"].target_modules
    return [t] if isinstance(t, str) else sorted(t)


def _history(log_history: list[dict]) -> list[dict]:
    """The per-step training loss and per-evaluation eval loss, for the card and its plot."""
    keep = ("step", "epoch", "loss", "eval_loss", "learning_rate")
    return [{k: h[k] for k in keep if k in h} for h in log_history if "loss" in h or "eval_loss" in h]


def _held_out_exact_match(model: Any, tokenizer: Any, data: Dataset, eos: list[int], device: Any) -> dict:
    """The adapter's and the base's exact match on the held-out split (for an exact_match gate)."""
    from .evaluate import EvalData, score

    held = EvalData(data.eval, {})
    mine = score(model, tokenizer, held, device, eos, lambda _e: None, "adapter")
    with model.disable_adapter():
        base = score(model, tokenizer, held, device, eos, lambda _e: None, "base")
    return {"exact_match": mine["exact_match"], "base_exact_match": base["exact_match"], "scored": mine["scored"]}


def _promotion(g: gate.Gate, card: dict, measured: dict) -> dict:
    adapter = {"eval_loss": card["eval_loss"], "exact_match": measured.get("exact_match")}
    # The base's eval loss on the same split: measured with the adapter off (eval_loss_base).
    base = {"eval_loss": card["eval_loss_base"], "exact_match": measured.get("base_exact_match")}
    return gate.check(g, adapter, base)


def _last(history: list[dict], key: str) -> float | None:
    vals = [h[key] for h in history if key in h]
    return float(vals[-1]) if vals else None


def train(opts: TrainOptions, model_cfg: ModelConfig, *, store: Path, cache_dir: Path, report: Report | None = None,
          stop: threading.Event | None = None, quiet: bool = False) -> dict:
    """Train one adapter and publish it as `<store>/<name>`; return its training card.

    `report` receives progress events (dicts); `stop`, when set, makes the
    Trainer save a checkpoint at the next step and return (TrainingError then).
    """
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    report = report or (lambda _e: None)
    store = Path(store)
    target = store / opts.name
    if target.exists() and not opts.replace:
        raise TrainingError(f"{target} already exists; choose another --name or pass --replace")
    if opts.loftq and not opts.qlora:
        raise ConfigError("--loftq starts LoRA from the nf4 base's quantization error; it needs --qlora")
    if opts.loftq_examples < 0:
        raise ConfigError(f"--loftq-examples {opts.loftq_examples}: a number of training records, 0 or more")
    g = gate.parse(opts.promote_if) if opts.promote_if else None  # a bad gate fails before any work
    if g is not None and opts.eval_fraction <= 0:
        raise ConfigError(f"--promote-if {opts.promote_if!r} needs a held-out split; eval_fraction is 0")
    set_seed(opts.seed)
    started = time.time()
    loaded = _load_base(opts, model_cfg, cache_dir, report)
    data: Dataset = load_dataset(opts.data, loaded.tokenizer, max_seq_len=opts.max_seq_len,
                                 eval_fraction=opts.eval_fraction, seed=opts.seed, long_examples=opts.long_examples)
    report({"event": "data", **data.summary()})
    model = _peft_model(loaded.model, opts)
    if opts.loftq:
        from ..model import resolve_source

        folder, _ = resolve_source(model_cfg, cache_dir)
        calibration = [e.input_ids for e in data.train[:opts.loftq_examples]]
        grams = loftq.input_grams(model, calibration) if calibration else None
        report({"event": "loftq", "calibration_examples": len(calibration),
                "layers": loftq.init_from_residual(model, loftq.full_weights(folder), grams=grams)})
    trainable, total = model.get_nb_trainable_parameters()
    report({"event": "parameters", "trainable": trainable, "total": total,
            "percent": round(100.0 * trainable / total, 4)})
    steps = defaults.optimizer_steps(len(data.train), opts.batch_size, opts.grad_accum, opts.epochs, opts.max_steps)
    supervised = sum(sum(1 for t in e.labels if t != -100) for e in data.train)
    seen = int(supervised * (steps * opts.batch_size * opts.grad_accum) / max(len(data.train), 1))
    warnings = [w for w in [defaults.short_run(steps, seen, trainable)] if w]
    for w in warnings:
        log.warning("%s", w)
        report({"event": "warning", "message": w, "steps": steps, "tokens": seen, "trainable": trainable})
    precision, why = _precision(opts, loaded.device)
    log.info("precision %s (%s)", precision, why)
    work = work_dir(store, opts.name)
    ckpt = newest_complete_checkpoint(work / "checkpoints") if opts.resume else None
    if opts.resume and ckpt is None:
        log.info("--resume: no complete checkpoint in %s; starting from the beginning", work)
    if not opts.resume and work.exists():
        shutil.rmtree(work)  # a fresh run never mixes with an older run's checkpoints
    stopper = StopAtSafePoint(stop)
    trainer = Trainer(
        model=model,
        args=_training_args(opts, work / "checkpoints", loaded.device, precision, bool(data.eval), quiet),
        train_dataset=_Examples(data.train), eval_dataset=_Examples(data.eval) if data.eval else None,
        data_collator=DataCollatorForSeq2Seq(loaded.tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[ProgressReporter(report), stopper],
    )
    if not quiet:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossBar)
    eval_before = trainer.evaluate()["eval_loss"] if data.eval else None
    eval_base = eval_before
    if eval_before is not None and opts.loftq:   # LoftQ's LoRA is not the identity: the base, adapter off
        with model.disable_adapter():
            eval_base = trainer.evaluate()["eval_loss"]
    if eval_before is not None:
        report({"event": "eval_before", "eval_loss": eval_before, "eval_loss_base": eval_base})
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if stopper.stopped:
        raise TrainingError(f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps}; a checkpoint "
                            f"is in {work} and --resume continues from it")
    eval_after = trainer.evaluate()["eval_loss"] if data.eval else None
    train_loss = _last(trainer.state.log_history, "loss")
    if train_loss is not None and not math.isfinite(train_loss):
        raise TrainingError(f"training diverged (loss {train_loss}); nothing was published")
    measured = (_held_out_exact_match(model, loaded.tokenizer, data, loaded.eos_token_ids, loaded.device)
                if g is not None and g.needs_exact_match() else {})
    card = {
        "name": opts.name, "base_model": loaded.model_id, "base_source": str(model_cfg.model),
        "method": "qlora" if opts.qlora else "lora", "precision": precision, "device": str(loaded.device),
        # The base this adapter was trained against; a LoftQ adapter is right only on that one.
        "base_quantization": "nf4" if opts.qlora else "none", "loftq": opts.loftq,
        "data": {"file": str(opts.data), **data.summary()}, "hyperparameters": opts.hyperparameters(),
        "parameters": {"trainable": trainable, "total": total},
        "target_modules": _targets(model),
        "warnings": warnings,
        "history": _history(trainer.state.log_history),
        "steps": trainer.state.global_step, "resumed_from": str(ckpt.name) if ckpt else None,
        "train_loss": train_loss, "train_loss_mean": float(result.training_loss),
        "eval_loss_before": eval_before, "eval_loss_base": eval_base, "eval_loss": eval_after,
        **({"held_out": measured} if measured else {}),
        "train_seconds": round(time.time() - started, 1),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    promoted = True
    if g is not None:
        card["promotion"] = _promotion(g, card, measured)
        promoted = card["promotion"]["passed"]
        (log.info if promoted else log.warning)("%s", card["promotion"]["reason"])
    if promoted:
        path = _publish(model, card, store, opts.name, opts.replace)
    else:  # kept on disk, out of the store's names: what serves today stays as it is
        path = _publish(model, card, store, opts.name, True, target=unpromoted_dir(store, opts.name))
    shutil.rmtree(work, ignore_errors=True)
    report({"event": "done", "path": str(path), "promoted": promoted, "card": card})
    return card
