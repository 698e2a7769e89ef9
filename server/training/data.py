"""Training data: JSONL files in the three shapes users already have, tokenized with loss masks.

Owns: reading a JSONL file line by line, recognising each record's shape
(`{"messages": [...]}` chat, `{"prompt", "completion"}`, `{"text"}`),
rendering chat with the base model's own chat template, and building
`input_ids` / `labels` where only assistant or completion tokens carry loss
(label -100 elsewhere, the value transformers' loss ignores). Every problem
is reported with `file:line`; long examples are refused, skipped or truncated
as asked, and the counts are always reported, never silent.

It does not know about models, PEFT or the training loop.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100                    # transformers' CrossEntropy ignore_index
ROLES = {"system", "user", "assistant"}
LONG_POLICIES = ("error", "skip", "truncate")
MAX_REPORTED = 10                # problems listed in one error message


class DataError(ValueError):
    """The data cannot be trained on as it is; the message names file and lines."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str                   # "file:line"


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    sha256: str
    lines: int
    shapes: dict[str, int] = field(default_factory=dict)
    skipped_long: int = 0
    truncated_long: int = 0

    def summary(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "records": self.lines, "train": len(self.train), "eval": len(self.eval),
                "shapes": self.shapes, "skipped_long": self.skipped_long, "truncated_long": self.truncated_long}


def _shape(rec: Any) -> str:
    """The record's shape, or raise ValueError with what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': one of {sorted(ROLES)}, 'content': a string}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("'messages' has no assistant message to learn from")
        return "messages"
    if "prompt" in rec or "completion" in rec:
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not rec["completion"]:
            raise ValueError("'completion' is empty")
        return "prompt_completion"
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError("'text' must be a non-empty string")
        return "text"
    raise ValueError("unknown record shape: expected 'messages', 'prompt'+'completion' or 'text' "
                     f"(keys: {sorted(rec)[:8]})")


def read_records(path: Path) -> tuple[list[tuple[int, dict, str]], str]:
    """Every record as (line number, object, shape), and the file's sha256; DataError lists bad lines."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    records, problems = [], []
    for no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records.append((no, rec, _shape(rec)))
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{no}: invalid JSON ({e.msg} at column {e.colno})")
        except ValueError as e:
            problems.append(f"{path}:{no}: {e}")
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} bad line(s) in {path}:\n" + "\n".join(problems[:MAX_REPORTED]) + more)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records, hashlib.sha256(raw).hexdigest()


def _chat(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Tokens of the rendered conversation; labels only on each assistant turn (content and end marker)."""
    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation must start with a system or user message")
        prefix, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "use prompt/completion records for this model")
        spans.append((len(prefix), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(s <= a < e for s, e in spans) else IGNORE for t, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _encode(tokenizer: Any, rec: dict, shape: str) -> tuple[list[int], list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if shape == "messages":
        return _chat(tokenizer, rec["messages"])
    if shape == "prompt_completion":
        p = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + eos
        return p + c, [IGNORE] * len(p) + c
    ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + eos
    return ids, list(ids)


def load_dataset(path: Path, tokenizer: Any, *, max_seq_len: int, eval_fraction: float = 0.1, seed: int = 0,
                 long_examples: str = "error") -> Dataset:
    """Read, tokenize and split a JSONL file (the split is a seeded shuffle, the same every run)."""
    if long_examples not in LONG_POLICIES:
        raise DataError(f"long_examples must be one of {LONG_POLICIES}, got {long_examples!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    records, sha = read_records(path)
    examples, too_long = [], []
    shapes: dict[str, int] = {}
    skipped = truncated = 0
    for no, rec, shape in records:
        where = f"{path}:{no}"
        shapes[shape] = shapes.get(shape, 0) + 1
        try:
            ids, labels = _encode(tokenizer, rec, shape)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ids) > max_seq_len:
            if long_examples == "error":
                too_long.append(f"{where}: {len(ids)} tokens > max_seq_len {max_seq_len}")
                continue
            if long_examples == "skip":
                skipped += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        if all(lab == IGNORE for lab in labels[1:]):
            raise DataError(f"{where}: no completion tokens left to learn from (after truncation)")
        examples.append(Example(ids, labels, where))
    if too_long:
        more = f"\n... and {len(too_long) - MAX_REPORTED} more" if len(too_long) > MAX_REPORTED else ""
        raise DataError(f"{len(too_long)} example(s) longer than max_seq_len={max_seq_len} "
                        "(raise --max-seq-len, or pass --long-examples skip|truncate):\n"
                        + "\n".join(too_long[:MAX_REPORTED]) + more)
    if not examples:
        raise DataError(f"{path}: every example was skipped as too long")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(examples) >= 2:
        n_eval = 1
    eval_idx = set(order[:n_eval])
    return Dataset([examples[i] for i in order if i not in eval_idx], [examples[i] for i in sorted(eval_idx)],
                   sha, len(records), shapes, skipped, truncated)
