"""`loraplex eval` on a tiny random Llama: losses equal a plain PEFT computation, exact match and diffs."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from server import cli
from server.config import ModelConfig
from server.training.data import DataError, Example, load_dataset
from server.training.evaluate import Candidate, _prompt_and_reference, evaluate, table, word_diff
from tests.helpers import save_adapter

RECORDS = [
    {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"text": "a text record has no prompt, so only its loss counts"},
]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("evalstore")
    save_adapter(tiny_model_dir, store / "a", seed=3, targets=("q_proj", "v_proj"))
    save_adapter(tiny_model_dir, store / "b", seed=4, r=2, targets=("o_proj", "down_proj", "v_proj"))
    return store


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def plain_peft_losses(tiny_model_dir, store, data, adapter=None, blend=None):
    """The oracle: PEFT's forward with labels, one record at a time, averaged over records."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_dataset(data, tok, max_seq_len=512, eval_fraction=0.0).train
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if adapter or blend:
        model = PeftModel.from_pretrained(model, str(store / "a"), adapter_name="a")
        model.load_adapter(str(store / "b"), adapter_name="b")
        if blend:
            model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
        model.set_adapter(adapter or "mix")
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss)
                  for e in examples]
    return sum(losses) / len(losses)


def test_losses_equal_a_plain_peft_computation(tiny_model_dir, adapters, data):
    cands = [Candidate("base", "base"), Candidate("a", "adapter", adapters / "a"),
             Candidate("b", "adapter", adapters / "b"),
             Candidate("mix", "blend", parts=[("a", 0.7), ("b", 0.3)], part_folders={"b": adapters / "b"},
                       combination_type="cat")]
    result = evaluate(cands, data, ModelConfig(model=str(tiny_model_dir)), adapters / "cache")
    rows = {r["model"]: r for r in result["results"]}
    assert rows["base"]["loss"] == pytest.approx(plain_peft_losses(tiny_model_dir, adapters, data), rel=1e-6)
    for name in ("a", "b"):
        expect = plain_peft_losses(tiny_model_dir, adapters, data, adapter=name)
        assert rows[name]["loss"] == pytest.approx(expect, rel=1e-6)
    assert rows["mix"]["loss"] == pytest.approx(plain_peft_losses(tiny_model_dir, adapters, data, blend=True),
                                                rel=1e-6)
    assert len({round(r["loss"], 6) for r in rows.values()}) == 4  # four different models, four numbers
    assert result["data"]["evaluated"] == 4 and rows["a"]["vs_base"] == pytest.approx(
        rows["a"]["loss"] / rows["base"]["loss"] - 1)
    # Three records have a prompt; a random tiny model matches none, and each miss has a diff.
    for r in rows.values():
        assert r["scored"] == 3 and r["exact"] == 0 and r["exact_match"] == 0.0
        misses = [e for e in r["examples"] if "match" in e]
        assert len(misses) == 3 and all(e["diff"] for e in misses)
        assert "match" not in r["examples"][3]  # the text record
    text = table(result)
    assert "base" in text and "mix" in text and "0/3" in text and "[-" in text


def test_an_answer_the_model_gives_is_an_exact_match(tiny_model_dir, tmp_path):
    """Make the base's own greedy continuation the reference, ending where the model ends it."""
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt):]
    gen = out.tolist()
    k = next(i for i in range(2, len(gen)) if gen[i] not in gen[:i])  # a token the model says first at k
    cfg = json.loads((model_dir / "generation_config.json").read_text()) if (
        model_dir / "generation_config.json").is_file() else {}
    cfg["eos_token_id"] = [tok.eos_token_id, gen[k]]  # ... so the model ends its answer there
    (model_dir / "generation_config.json").write_text(json.dumps(cfg))
    answer = tok.decode(gen[:k])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "The capital of France is", "completion": answer}) + "\n"
                    + json.dumps({"prompt": "The capital of France is", "completion": answer + " not"}) + "\n")
    result = evaluate([Candidate("base", "base")], data, ModelConfig(model=str(model_dir)), tmp_path / "cache")
    row = result["results"][0]
    assert [e["match"] for e in row["examples"]] == [True, False], row["examples"]
    assert row["exact"] == 1 and row["exact_match"] == 0.5
    assert row["examples"][1]["diff"].endswith("[-not-]")


def test_prompt_and_reference_take_the_last_supervised_span():
    e = Example([1, 2, 3, 4, 5, 6, 7], [-100, -100, 3, -100, -100, 6, 7], "f:1")
    assert _prompt_and_reference(e) == ([1, 2, 3, 4, 5], [6, 7])
    assert _prompt_and_reference(Example([1, 2], [1, 2], "f:2")) is None  # a text record
    assert word_diff("the cat sat", "the dog sat down") == "the [-cat-] {+dog+} sat {+down+}"


def test_the_cli_prints_a_table_and_writes_json(tiny_model_dir, adapters, data, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", str(data), "--base", str(tiny_model_dir), "--adapters-dir", str(adapters),
                   "--adapters", "a", "--blend", "mix=a:0.5,b:0.5@cat", "--no-exact", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["results"]] == ["base", "a", "mix"]
    assert all(r["exact_match"] is None and r["scored"] == 0 for r in saved["results"])
    assert printed.splitlines()[1].split() == ["model", "kind", "loss", "vs", "base", "exact", "match", "tokens"]
    assert f"{saved['results'][1]['loss']:.4f}" in printed


def test_unsafe_adapters_and_bad_specs_are_refused_before_loading(tiny_model_dir, adapters, data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapters / "a", bad)
    (bad / "adapter_model.bin").write_bytes(b"a pickle")
    from server.errors import LoraplexError

    with pytest.raises(LoraplexError):
        evaluate([Candidate("bad", "adapter", bad)], data, ModelConfig(model=str(tiny_model_dir)), tmp_path)
    with pytest.raises(DataError, match="no folder"):
        evaluate([Candidate("m", "blend", parts=[("zz", 1.0)])], data, ModelConfig(model=str(tiny_model_dir)),
                 tmp_path)
    assert cli.main(["eval", str(data), "--base", str(tiny_model_dir), "--adapters-dir", str(adapters),
                     "--blend", "mix=a"]) == 1
    assert cli.main(["eval", "--base", str(tiny_model_dir), "--adapters-dir", str(adapters)]) == 1
    assert cli.main(["eval", str(data), "--base", str(tiny_model_dir), "--adapters-dir", str(adapters),
                     "--adapters", "a", "--blend", "a=a:0.5,b:0.5@cat"]) == 1     # two columns named a
