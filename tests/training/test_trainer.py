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
    assert card["method"] == "qlora"
    assert card["eval_loss"] < card["eval_loss_before"], card
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
