"""lm-evaluation-harness against loraplex, checked against the same computation in-process with PEFT.

    python -m loadtest.lm_eval_check --lm-eval .lmeval/bin/lm_eval [--model pirate] [--port 8731]

lm-eval lives in its own venv (it pins its own datasets and friends):
    python3 -m venv .lmeval && .lmeval/bin/pip install "lm_eval[api]==0.4.13"

It writes a small multiple-choice task (a JSON-lines file and a task YAML in a temporary folder:
no dataset hub is reachable here), starts `loraplex serve` on the default model with the shipped
sample adapters, and runs lm-eval's `local-completions` model on it with the server's own
tokenizer (`tokenizer_backend=remote`: /tokenize, /detokenize, /tokenizer_info), so every
loglikelihood request is `echo` + `logprobs` + `max_tokens: 1` on token ids. Then it scores the
same (context, continuation) pairs in-process: PEFT on the same adapter in fp32, the continuation's
tokens split from the context's as lm-eval splits them. It prints both accuracies and the largest
difference between the two loglikelihoods of any choice; they should agree to ~1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .compare import ROOT, start_server

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("What is the capital of Italy?", ["Lisbon", "Rome", "Vienna", "Oslo"], 1),
    ("What is the capital of Japan?", ["Seoul", "Beijing", "Tokyo", "Bangkok"], 2),
    ("What colour is the sky on a clear day?", ["green", "blue", "red", "black"], 1),
    ("How many legs does a spider have?", ["six", "four", "eight", "ten"], 2),
    ("What is 2 plus 2?", ["four", "five", "three", "six"], 0),
    ("Which animal barks?", ["cat", "dog", "fish", "bird"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wax paper"], 2),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What is frozen water called?", ["steam", "ice", "fog", "salt"], 1),
    ("Which season comes after winter?", ["autumn", "summer", "spring", "winter"], 2),
    ("What is the largest ocean?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("How many days are in a week?", ["five", "seven", "ten", "twelve"], 1),
    ("What gas do people breathe in to live?", ["oxygen", "helium", "neon", "argon"], 0),
    ("Which is a fruit?", ["carrot", "potato", "apple", "onion"], 2),
    ("What is the opposite of hot?", ["warm", "cold", "big", "fast"], 1),
]
TEMPLATE = "Question: {{question}}\nAnswer:"


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "loraplex_mc.yaml").write_text(
        "task: loraplex_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        f"doc_to_text: {json.dumps(TEMPLATE)}\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    return folder


def in_process(model_name: str) -> tuple[float, list[list[float]]]:
    """Accuracy and every choice's loglikelihood, computed by PEFT on the same tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.config import load_config
    from server.model import resolve_source

    cfg = load_config(ROOT / "config.toml")
    folder, base_id = resolve_source(cfg.model, cfg.path(cfg.model.cache_dir))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if model_name != base_id:
        model = PeftModel.from_pretrained(model, ROOT / "adapters" / model_name).eval()
    right, scores = 0, []
    for q, choices, answer in QUESTIONS:
        context = TEMPLATE.replace("{{question}}", q)
        lls = []
        for c in choices:
            ctx_ids = tok.encode(context, add_special_tokens=False)
            whole = tok.encode(context + " " + c, add_special_tokens=False)  # lm-eval: " " joins them
            cont = whole[len(ctx_ids):]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            lls.append(sum(float(logp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(cont)))
        scores.append(lls)
        right += int(max(range(len(lls)), key=lls.__getitem__) == answer)
    return right / len(QUESTIONS), scores


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval", default=str(ROOT / ".lmeval" / "bin" / "lm_eval"))
    ap.add_argument("--model", default="pirate", help="the adapter (or the base id) to evaluate")
    ap.add_argument("--port", type=int, default=8731)
    args = ap.parse_args(argv)
    if not Path(args.lm_eval).exists():
        raise SystemExit(f"{args.lm_eval} not found: python3 -m venv .lmeval && .lmeval/bin/pip install "
                         "'lm_eval[api]==0.4.13'")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tasks = write_task(tmp_path / "tasks")
        store = tmp_path / "store"
        store.mkdir()
        for name in ("json-answer", "pirate", "terse"):
            os.symlink(ROOT / "adapters" / name, store / name)
        proc = start_server("float32", args.port, str(store), env={"LORAPLEX_ADAPTERS__ROOTS": str(ROOT / "adapters")})
        try:
            url = f"http://127.0.0.1:{args.port}/v1/completions"
            cmd = [args.lm_eval, "--model", "local-completions", "--tasks", "loraplex_mc", "--include_path",
                   str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples", "--model_args",
                   f"model={args.model},base_url={url},tokenizer_backend=remote,tokenized_requests=True,"
                   "num_concurrent=4,max_retries=1"]
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env)
        finally:
            proc.terminate()
            proc.wait(60)
        [result_file] = list((tmp_path / "out").rglob("results_*.json"))
        served_acc = json.loads(result_file.read_text())["results"]["loraplex_mc"]["acc,none"]
        [samples_file] = list((tmp_path / "out").rglob("samples_loraplex_mc_*.jsonl"))
        samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()),
                         key=lambda s: s["doc_id"])
        served = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    ref_acc, ref = in_process(args.model)
    diff = max(abs(a - b) for sa, sb in zip(served, ref) for a, b in zip(sa, sb))
    out = {"model": args.model, "questions": len(QUESTIONS), "lm_eval_acc": served_acc, "peft_acc": ref_acc,
           "max_loglikelihood_diff": diff}
    print(json.dumps(out, indent=2))
    if served_acc != ref_acc or diff > 1e-3:
        print("MISMATCH between lm-eval on loraplex and PEFT in-process", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
