"""Evaluating adapters: the loss and exact match of the base, adapters, blends and fused exports on one file.

Owns: `evaluate` (`loraplex eval` and the `/admin/evals` job run it): it reads a JSONL file in the
trainer's shapes (training/data.py tokenizes it the same way, loss masks included), or the
held-out split of a training run (the card names the file, its sha256, the seed and the split),
and scores each model in one table:
  loss      the mean over examples of each example's mean token cross-entropy on its supervised
            tokens, i.e. what transformers' Trainer reports as `eval_loss` with an eval batch of one
            (the trainer evaluates that way, so the numbers of a held-out split match its card);
  exact     for records with a prompt (`messages`, `prompt`/`completion`): the greedy answer of at
            most the reference's length + `SLACK` tokens, compared with the reference after
            collapsing whitespace; each example's word diff is kept.
Models are PEFT's own forward of each adapter on one base (PEFT is the oracle the server is tested
against), a blend built with PEFT's `add_weighted_adapter`, and an export loaded as a plain
transformers model. Adapter folders pass the same checks as a load before any weight is read.

It knows nothing of HTTP, the registry or jobs; the CLI and the admin route name the folders.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .data import IGNORE, DataError, Example, load_dataset

SLACK = 8          # tokens generated past the reference's length, so a longer answer shows as one
SHOWN_DIFFS = 5    # mismatches printed per model in the text table (the JSON keeps them all)
Report = Callable[[dict], None]


@dataclass
class Candidate:
    """One column of the table: `kind` is base | adapter | blend | export."""
    name: str
    kind: str
    folder: Path | None = None
    parts: list[tuple[str, float]] = field(default_factory=list)   # a blend's (adapter, weight)
    part_folders: dict[str, Path] = field(default_factory=dict)     # ... and where each adapter is
    combination_type: str = "linear"
    density: float | None = None


@dataclass
class EvalData:
    examples: list[Example]
    source: dict[str, Any]


def held_out(adapter_folder: Path) -> tuple[Path, dict[str, Any]]:
    """The data file and split settings a training card recorded, checked against the file today."""
    card_path = Path(adapter_folder) / "training.json"
    try:
        card = json.loads(card_path.read_text())
        data, hp = Path(card["data"]["file"]), card["hyperparameters"]
        split = {"eval_fraction": float(hp["eval_fraction"]), "seed": int(hp["seed"]),
                 "max_seq_len": int(hp["max_seq_len"]), "long_examples": hp.get("long_examples", "error"),
                 "sha256": card["data"]["sha256"], "qlora": card.get("method") == "qlora"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{card_path}: no readable training card ({e})") from None
    if split["eval_fraction"] <= 0:
        raise DataError(f"{adapter_folder.name} was trained without a held-out split (eval_fraction 0)")
    return data, split


def load_eval_data(path: Path, tokenizer: Any, *, max_seq_len: int, split: dict[str, Any] | None = None,
                   max_examples: int | None = None) -> EvalData:
    """All records of `path`, or (with `split`, from `held_out`) exactly the split training held out."""
    if split is None:
        ds = load_dataset(path, tokenizer, max_seq_len=max_seq_len, eval_fraction=0.0)
        examples, which = ds.train, "all"
    else:
        ds = load_dataset(path, tokenizer, max_seq_len=split["max_seq_len"], eval_fraction=split["eval_fraction"],
                          seed=split["seed"], long_examples=split["long_examples"])
        if ds.sha256 != split["sha256"]:
            raise DataError(f"{path} changed since training (sha256 {ds.sha256[:12]}, the card has "
                            f"{split['sha256'][:12]}); its held-out split is gone")
        examples, which = ds.eval, "held-out"
    if max_examples is not None:
        examples = examples[:max_examples]
    return EvalData(examples, {"file": str(path), "sha256": ds.sha256, "records": ds.lines, "split": which,
                               "evaluated": len(examples)})


def _prompt_and_reference(e: Example) -> tuple[list[int], list[int]] | None:
    """The tokens before the last supervised span, and that span; None for a text record (no prompt)."""
    sup = [i for i, lab in enumerate(e.labels) if lab != IGNORE]
    if not sup or sup[0] == 0:
        return None
    end = sup[-1]
    start = end
    while start > 0 and e.labels[start - 1] != IGNORE:
        start -= 1
    return e.input_ids[:start], e.input_ids[start:end + 1]


def _until_end(ids: list[int], eos: list[int]) -> list[int]:
    """The answer without the end-of-sequence token(s) that close it (not every eos is a special token)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def _norm(text: str) -> str:
    return " ".join(text.split())


def word_diff(expected: str, got: str) -> str:
    """A wdiff-style line: [-expected words-]{+generated words+} around what both share."""
    a, b = expected.split(), got.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(" ".join(a[i1:i2]))
            continue
        if i2 > i1:
            out.append("[-" + " ".join(a[i1:i2]) + "-]")
        if j2 > j1:
            out.append("{+" + " ".join(b[j1:j2]) + "+}")
    return " ".join(out)


@torch.no_grad()
def example_loss(model: Any, e: Example, device: torch.device) -> tuple[float, int]:
    """(mean token cross-entropy over the supervised tokens, their count): the model's own loss."""
    ids = torch.tensor([e.input_ids], device=device)
    labels = torch.tensor([e.labels], device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return float(out.loss), sum(1 for lab in e.labels[1:] if lab != IGNORE)


@torch.no_grad()
def _greedy(model: Any, prompt: list[int], budget: int, eos: list[int], pad: int, device: torch.device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                         do_sample=False, eos_token_id=eos or None, pad_token_id=pad, num_beams=1,
                         temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt):].tolist()


def score(model: Any, tokenizer: Any, data: EvalData, device: torch.device, eos: list[int],
          report: Report, label: str, exact: bool = True) -> dict[str, Any]:
    """One model's row: loss, token count, exact match over the records that have a prompt, examples."""
    t0 = time.monotonic()
    model.eval()
    rows, losses, tokens, hits, scored = [], [], 0, 0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    for i, e in enumerate(data.examples):
        loss, n = example_loss(model, e, device)
        losses.append(loss)
        tokens += n
        row: dict[str, Any] = {"where": e.where, "loss": loss}
        pr = _prompt_and_reference(e) if exact else None
        if pr is not None:
            prompt, ref = pr
            got_ids = _greedy(model, prompt, len(ref) + SLACK, eos, pad, device)
            expected = tokenizer.decode(_until_end(ref, eos), skip_special_tokens=True).strip()
            got = tokenizer.decode(_until_end(got_ids, eos), skip_special_tokens=True).strip()
            match = _norm(expected) == _norm(got)
            hits, scored = hits + match, scored + 1
            row.update(expected=expected, got=got, match=match)
            if not match:
                row["diff"] = word_diff(expected, got)
        rows.append(row)
        report({"event": "progress", "model": label, "done": i + 1, "total": len(data.examples)})
    return {"loss": sum(losses) / len(losses) if losses else None, "tokens": tokens,
            "exact": hits if scored else None, "scored": scored,
            "exact_match": hits / scored if scored else None,
            "seconds": round(time.monotonic() - t0, 2), "examples": rows}


def _check_folder(folder: Path, max_rank: int) -> int:
    """The adapter's rank, after the same allow-list as a load (config keys, tensors, no pickles)."""
    from ..lora.weights import read_adapter

    return read_adapter(folder, max_rank=max_rank).info.rank


def evaluate(candidates: list[Candidate], data_path: Path, model_cfg: ModelConfig, cache_dir: Path, *,
             split: dict[str, Any] | None = None, max_seq_len: int = 2048, max_examples: int | None = None,
             exact: bool = True, max_rank: int = 1024, report: Report | None = None) -> dict[str, Any]:
    """Score every candidate on the same examples; returns the table as a JSON-able dict."""
    from peft import PeftModel

    from ..lora.blend import BlendSpec, build, check_spec
    from ..model import load_model

    report = report or (lambda _e: None)
    # Every adapter folder PEFT will read: the candidates' and the blends' parts, each once.
    folders = {c.name: c.folder for c in candidates if c.kind == "adapter" and c.folder is not None}
    for c in candidates:
        if c.kind == "blend":
            missing = [n for n, _ in c.parts if n not in folders and n not in c.part_folders]
            if missing:
                raise DataError(f"blend {c.name!r}: no folder for {missing}")
            folders.update({n: c.part_folders[n] for n, _ in c.parts if n not in folders})
    ranks = {name: _check_folder(folder, max_rank) for name, folder in folders.items()}
    for c in candidates:   # PEFT's blend rules, before the model is loaded
        if c.kind == "blend":
            check_spec(BlendSpec(tuple(c.parts), c.combination_type, c.density), ranks)
    if split is not None and split.get("qlora") and model_cfg.quantization == "none":
        model_cfg = replace(model_cfg, quantization="nf4")   # a QLoRA run evaluated itself on the nf4 base
    loaded = load_model(replace(model_cfg, dtype="auto"), cache_dir)
    tok = loaded.tokenizer
    data = load_eval_data(data_path, tok, max_seq_len=max_seq_len, split=split, max_examples=max_examples)
    if not data.examples:
        raise DataError(f"{data_path}: nothing to evaluate ({data.source['split']} split is empty)")
    report({"event": "data", **data.source})
    peft_model = None
    for name, folder in folders.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(loaded.model, str(folder), adapter_name=name)
        else:
            peft_model.load_adapter(str(folder), adapter_name=name)
    results = []
    for c in candidates:
        if c.kind == "base":
            if peft_model is not None:
                with peft_model.disable_adapter():
                    row = score(peft_model, tok, data, loaded.device, loaded.eos_token_ids, report, c.name, exact)
            else:
                row = score(loaded.model, tok, data, loaded.device, loaded.eos_token_ids, report, c.name, exact)
        elif c.kind in ("adapter", "blend"):
            assert peft_model is not None  # folders holds every adapter and blend part
            if c.kind == "blend":
                build(peft_model, c.name, BlendSpec(tuple(c.parts), c.combination_type, c.density))
            peft_model.set_adapter(c.name)
            row = score(peft_model, tok, data, loaded.device, loaded.eos_token_ids, report, c.name, exact)
        elif c.kind == "export":
            fused = load_model(replace(model_cfg, model=str(c.folder), quantization="none", dtype="auto"), cache_dir)
            row = score(fused.model, tok, data, fused.device, fused.eos_token_ids, report, c.name, exact)
            del fused
        else:
            raise ValueError(f"unknown candidate kind {c.kind!r}")
        results.append({"model": c.name, "kind": c.kind, **row})
        report({"event": "scored", "model": c.name, "loss": row["loss"], "exact_match": row["exact_match"]})
    base = next((r["loss"] for r in results if r["kind"] == "base"), None)
    for r in results:
        r["vs_base"] = (r["loss"] / base - 1.0) if base and r["loss"] is not None else None
    return {"object": "evaluation", "data": data.source, "base_model": loaded.model_id,
            "quantization": loaded.quantization, "results": results}


def table(result: dict[str, Any], shown_diffs: int = SHOWN_DIFFS) -> str:
    """The plain-text report: one line per model, then the first mismatches of each."""
    lines = [f"{result['data']['file']} ({result['data']['split']}: {result['data']['evaluated']} examples), "
             f"base {result['base_model']}"]
    width = max([len("model")] + [len(r["model"]) for r in result["results"]])
    lines.append(f"{'model':<{width}}  {'kind':<7}  {'loss':>8}  {'vs base':>8}  {'exact match':>12}  tokens")
    for r in result["results"]:
        vs = "" if r["vs_base"] is None or r["kind"] == "base" else f"{100 * r['vs_base']:+.1f}%"
        em = "-" if r["exact_match"] is None else f"{r['exact']}/{r['scored']} {100 * r['exact_match']:.0f}%"
        lines.append(f"{r['model']:<{width}}  {r['kind']:<7}  {r['loss']:>8.4f}  {vs:>8}  {em:>12}  {r['tokens']}")
    for r in result["results"]:
        misses = [e for e in r["examples"] if e.get("match") is False]
        for e in misses[:shown_diffs]:
            lines.append(f"  {r['model']} {e['where']}: {e['diff']}")
        if len(misses) > shown_diffs:
            lines.append(f"  {r['model']}: ... and {len(misses) - shown_diffs} more mismatches (see --json)")
    return "\n".join(lines)
