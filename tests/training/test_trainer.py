"""The trainer on a tiny random Llama: loss goes down, eval is reported, resume, QLoRA on CPU, atomic results."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from safetensors.torch import load_file

from server.config import ModelConfig
from server.errors import ConfigError
from server.training.trainer import TrainingError, TrainOptions, newest_complete_checkpoint, train, work_dir

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = []
    for i in range(24):
        rows.append({"messages": [{"role": "user", "content": f"hello world {i}"},
                                  {"role": "assistant", "content": "the quick brown fox"}]})
        rows.append({"prompt": f"what is the capital {i}?", "completion": " Paris."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def opts(data, name, **kw):
    base = dict(rank=4, alpha=8, dropout=0.0, learning_rate=2e-2, epochs=2, batch_size=8, max_seq_len=64,
                eval_fraction=0.25, seed=0, save_steps=2)
    return TrainOptions(data=data, name=name, **{**base, **kw})


def run(tiny_model_dir, store, o, **kw):
    return train(o, ModelConfig(model=str(tiny_model_dir)), store=store, cache_dir=store / "cache", quiet=True, **kw)


def test_training_lowers_the_loss_and_publishes_a_card(tiny_model_dir, tmp_path, data_file):
    events = []
    card = run(tiny_model_dir, tmp_path, opts(data_file, "fox"), report=events.append)
    assert card["eval_loss"] < card["eval_loss_before"] - 0.5, card
    first = next(e["loss"] for e in events if e["event"] == "progress" and "loss" in e)
    assert card["train_loss"] < first
    folder = tmp_path / "fox"
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= set(os.listdir(folder))
    saved = json.loads((folder / "training.json").read_text())
    assert saved["data"]["sha256"] == card["data"]["sha256"] and saved["data"]["eval"] == 12
    assert saved["hyperparameters"]["rank"] == 4 and saved["base_model"] == "tiny-llama"
    assert 0 < saved["parameters"]["trainable"] < saved["parameters"]["total"]
    assert any(e["event"] == "parameters" for e in events) and any("eval_loss" in e for e in events)
    # LoRA B starts at zero: a trained adapter is not a no-op.
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in tensors.items())
    assert not work_dir(tmp_path, "fox").exists()  # checkpoints go once the adapter is published
    # 36 examples, batch 8, 2 epochs: 10 steps, and the run says so before it starts, and in the card.
    warned = [e for e in events if e["event"] == "warning"]
    assert len(warned) == 1 and "10 optimizer steps (fewer than 50)" in warned[0]["message"]
    assert saved["warnings"] == [warned[0]["message"]] and warned[0]["steps"] == 10
    # The default targets: every attention and MLP projection of the (Llama) family.
    assert saved["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    # Progress to look at: the per-step losses in the card, drawn as a PNG beside the adapter.
    steps = [h["step"] for h in saved["history"] if "loss" in h]
    assert steps == list(range(1, 11)) and sum("eval_loss" in h for h in saved["history"]) == 3
    assert saved["plot"] == "loss.png" and (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "loss.png").stat().st_size > 5000
    with pytest.raises(TrainingError, match="already exists"):
        run(tiny_model_dir, tmp_path, opts(data_file, "fox"))


def test_resume_continues_from_the_newest_complete_checkpoint(tiny_model_dir, tmp_path, data_file):
    full = run(tiny_model_dir, tmp_path / "a", opts(data_file, "r"))
    stop = threading.Event()

    def report(e):
        if e["event"] == "progress" and e.get("step", 0) >= 3:
            stop.set()
    with pytest.raises(TrainingError, match="stopped at step"):
        run(tiny_model_dir, tmp_path / "b", opts(data_file, "r"), report=report, stop=stop)
    assert not (tmp_path / "b" / "r").exists()
    ckpts = work_dir(tmp_path / "b", "r") / "checkpoints"
    newest = newest_complete_checkpoint(ckpts)
    assert newest is not None
    (ckpts / "checkpoint-999").mkdir()  # a checkpoint cut short by a kill: no trainer_state.json
    resumed = run(tiny_model_dir, tmp_path / "b", opts(data_file, "r", resume=True))
    assert resumed["resumed_from"] == newest.name
    assert resumed["steps"] == full["steps"]
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-3)


def test_qlora_trains_on_cpu(tiny_model_dir, tmp_path, data_file):
    card = run(tiny_model_dir, tmp_path, opts(data_file, "q", qlora=True, epochs=3))
    assert card["method"] == "qlora" and card["base_quantization"] == "nf4" and card["loftq"] is False
    assert card["eval_loss"] < card["eval_loss_before"], card
    assert card["eval_loss_base"] == card["eval_loss_before"]   # plain LoRA starts as the identity


def test_loftq_starts_qlora_closer_to_the_full_precision_base(tiny_model_dir, tmp_path, data_file):
    full = run(tiny_model_dir, tmp_path, opts(data_file, "f", max_steps=1))
    plain = run(tiny_model_dir, tmp_path, opts(data_file, "q", qlora=True, max_steps=1))
    events = []
    lq = run(tiny_model_dir, tmp_path, opts(data_file, "l", qlora=True, loftq=True, max_steps=1), report=events.append)
    # 7 projections x 2 layers, calibrated on every training record (36 < the 128 asked for)
    assert [(e["layers"], e["calibration_examples"]) for e in events if e["event"] == "loftq"] == [(14, 36)]
    assert lq["loftq"] is True and lq["eval_loss_base"] == pytest.approx(plain["eval_loss_before"], rel=1e-5)
    assert lq["hyperparameters"]["loftq_examples"] == 128
    svd = run(tiny_model_dir, tmp_path, opts(data_file, "s", qlora=True, loftq=True, loftq_examples=0, max_steps=1))
    # Before any step, on the held-out records: the nf4 base plus either rank-4 fix is nearer the
    # full-precision base than nf4 alone. (Which fix is nearer is a layer's question, and the
    # calibrated one's answer is checked in test_loftq.py; on a random tiny model the loss cannot tell.)
    gap = {k: abs(c["eval_loss_before"] - full["eval_loss_before"]) for k, c in
           (("nf4", plain), ("svd", svd), ("calibrated", lq))}
    assert max(gap["calibrated"], gap["svd"]) < gap["nf4"], gap
    with pytest.raises(ConfigError, match="needs --qlora"):
        run(tiny_model_dir, tmp_path, opts(data_file, "x", loftq=True))
    with pytest.raises(ConfigError, match="--loftq-examples -1"):
        run(tiny_model_dir, tmp_path, opts(data_file, "x", qlora=True, loftq=True, loftq_examples=-1))
    cfg = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_data_errors_stop_before_training(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"oops": 1}\n')
    from server.training.data import DataError
    with pytest.raises(DataError, match=f"{bad}:2"):
        run(tiny_model_dir, tmp_path, opts(bad, "x"))
    assert not (tmp_path / "x").exists()


def test_kill_9_leaves_no_partial_adapter(tiny_model_dir, tmp_path, data_file):
    """kill -9 at random moments of `loraplex train`: the store shows the adapter whole or not at all."""
    store = tmp_path / "store"
    for delay in (0.5, 2.0, 4.0, 6.0):
        proc = subprocess.Popen([sys.executable, "-m", "server", "train", str(data_file), "--name", "k",
                                 "--base", str(tiny_model_dir), "--adapters-dir", str(store), "--rank", "4",
                                 "--epochs", "30", "--save-steps", "1", "--replace", "--progress", "json"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        visible = sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) if store.exists() else []
        assert visible in ([], ["k"]), visible
        if visible:
            assert (store / "k" / "adapter_model.safetensors").is_file() and (store / "k" / "training.json").is_file()
    # The next start (the registry's) clears staging leftovers.
    from server.state import StateFile
    StateFile(store).clean_staging()
    assert not list((store / ".loraplex").glob(".staging-*")) if (store / ".loraplex").exists() else True


def test_sigterm_stops_at_a_checkpoint(tiny_model_dir, tmp_path, data_file):
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "server", "train", str(data_file), "--name", "t",
                             "--base", str(tiny_model_dir), "--adapters-dir", str(store), "--rank", "4",
                             "--epochs", "200", "--save-steps", "1000", "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if '"event": "progress"' in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err[-2000:]
    assert "--resume continues" in err
    assert newest_complete_checkpoint(work_dir(store, "t") / "checkpoints") is not None
    assert not (store / "t").exists()


@pytest.mark.parametrize("variant", [
    dict(dora=True, rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    dict(modules_to_save=["lm_head", "norm"], target_modules=["q_proj", "embed_tokens"]),
], ids=["dora-rslora", "modules-to-save-and-embedding-lora"])
def test_a_variant_adapter_trained_here_is_served_as_peft_computes_it(tiny_model_dir, tmp_path, data_file, variant):
    """Issues 14/16: what `--dora --rslora` or `--modules-to-save` trains, the engine serves with
    PEFT's greedy tokens."""
    import asyncio

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.config import load_config
    from server.engine.loop import TorchEngine
    from server.engine.types import GenerationRequest, SamplingParams

    card = run(tiny_model_dir, tmp_path, opts(data_file, "dr", max_steps=6, **variant))
    folder = tmp_path / "dr"
    saved = json.loads((folder / "adapter_config.json").read_text())
    keys = list(load_file(str(folder / "adapter_model.safetensors")))
    if variant.get("dora"):
        assert card["hyperparameters"]["dora"] and card["hyperparameters"]["rslora"]
        assert saved["use_dora"] is True and saved["use_rslora"] is True
        assert any("lora_magnitude_vector" in k for k in keys)
    else:
        assert saved["modules_to_save"] == ["lm_head", "norm"] and any(k.endswith("lm_head.weight") for k in keys)
        assert any("lora_embedding_A" in k for k in keys)
    cfg = load_config(overrides={"model.model": str(tiny_model_dir), "model.dtype": "float32"})
    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path / "cache")
    eng.start()
    try:
        async def served():
            await eng.wait_ready()
            await eng.load_adapter("dr", folder)
            req = GenerationRequest("r", eng.tokenizer.encode("hello world 3"),
                                    SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), "dr")
            return [t for ev in [e async for e in eng.submit(req)] for t in ev.token_ids], eng.tokenizer
        got, tok = asyncio.run(served())
    finally:
        eng.shutdown()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, folder).eval()
    ids = tok.encode("hello world 3")
    with torch.no_grad():
        want = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[0, len(ids):].tolist()
    assert got == want


def test_the_held_out_split_evaluates_to_what_training_reported(tiny_model_dir, tmp_path, data_file):
    from server.training.evaluate import Candidate, evaluate, held_out

    card = run(tiny_model_dir, tmp_path, opts(data_file, "fox"))
    data, split = held_out(tmp_path / "fox")
    result = evaluate([Candidate("base", "base"), Candidate("fox", "adapter", tmp_path / "fox")], data,
                      ModelConfig(model=str(tiny_model_dir)), tmp_path / "cache", split=split)
    rows = {r["model"]: r for r in result["results"]}
    assert result["data"]["split"] == "held-out" and result["data"]["evaluated"] == card["data"]["eval"] == 12
    assert rows["fox"]["loss"] == pytest.approx(card["eval_loss"], rel=1e-5)
    assert rows["base"]["loss"] == pytest.approx(card["eval_loss_before"], rel=1e-5)
    data_file_copy = tmp_path / "changed.jsonl"
    data_file_copy.write_text(data_file.read_text() + data_file.read_text().splitlines()[0] + "\n")
    with pytest.raises(Exception, match="changed since training"):
        evaluate([Candidate("base", "base")], data_file_copy, ModelConfig(model=str(tiny_model_dir)), tmp_path,
                 split=split)


def test_a_gate_that_fails_keeps_the_adapter_aside_and_one_that_holds_publishes(tiny_model_dir, tmp_path, data_file):
    from server.training.trainer import unpromoted_dir

    card = run(tiny_model_dir, tmp_path, opts(data_file, "fox", promote_if="eval_loss<0.01*base"))
    assert card["promotion"]["passed"] is False and "does not hold" in card["promotion"]["reason"]
    assert not (tmp_path / "fox").exists()                     # not servable by name
    kept = unpromoted_dir(tmp_path, "fox")
    assert (kept / "adapter_model.safetensors").is_file()      # ... but kept, with its card saying why
    assert json.loads((kept / "training.json").read_text())["promotion"]["passed"] is False
    card = run(tiny_model_dir, tmp_path, opts(data_file, "fox", promote_if="eval_loss<base"))
    assert card["promotion"]["passed"] is True and card["promotion"]["threshold"] == card["eval_loss_before"]
    assert (tmp_path / "fox" / "adapter_model.safetensors").is_file()
    # exact_match gates evaluate greedy answers on the held-out split for the adapter and the base.
    card = run(tiny_model_dir, tmp_path, opts(data_file, "fox2", promote_if="exact_match>=0.0"))
    assert card["held_out"]["scored"] == 12 and card["promotion"]["passed"] is True
    with pytest.raises(ConfigError, match="held-out split"):
        run(tiny_model_dir, tmp_path, opts(data_file, "fox3", promote_if="eval_loss<base", eval_fraction=0.0))


def test_the_cli_exits_4_when_the_gate_does_not_hold(tiny_model_dir, tmp_path, data_file):
    from server import cli

    argv = ["train", str(data_file), "--name", "fox", "--base", str(tiny_model_dir), "--adapters-dir",
            str(tmp_path), "--rank", "4", "--epochs", "1", "--batch-size", "8", "--max-seq-len", "64",
            "--eval-fraction", "0.25", "--progress", "json"]
    assert cli.main(argv + ["--promote-if", "eval_loss<0.01*base"]) == 4
    assert not (tmp_path / "fox").exists()
    assert cli.main(argv + ["--promote-if", "eval_loss<<base"]) == 1     # a gate that does not parse
    assert cli.main(argv + ["--alias", "live"]) == 2                     # --alias needs --register
