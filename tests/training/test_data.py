"""Training data: three record shapes, loss masks, and errors that name file and line."""

import json

import pytest

from server.training.data import IGNORE, DataError, load_dataset, read_records
from tests.helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labeled_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_chat_loss_only_on_assistant_turns(tmp_path, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "what is the capital"},
            {"role": "assistant", "content": "Paris"}]
    ds = load_dataset(write(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, max_seq_len=256, eval_fraction=0)
    ex = ds.train[0]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    # Both assistant turns (content and end marker) carry loss; system and user text never does.
    assert labeled_text(tok, ex) == "the quick fox<|im_end|>\nParis<|im_end|>\n"
    assert ds.shapes == {"messages": 1}


def test_prompt_completion_and_text(tmp_path, tok):
    ds = load_dataset(write(tmp_path / "p.jsonl", [{"prompt": "hello world,", "completion": " the fox"},
                                                   {"text": "the lazy dog"}]),
                      tok, max_seq_len=256, eval_fraction=0)
    by_shape = {("pc" if ex.labels[0] == IGNORE else "text"): ex for ex in ds.train}
    assert labeled_text(tok, by_shape["pc"]) == " the fox<|im_end|>"
    assert labeled_text(tok, by_shape["text"]) == "the lazy dog<|im_end|>"
    assert by_shape["text"].labels == by_shape["text"].input_ids


def test_bad_lines_are_named_with_file_and_line(tmp_path, tok):
    path = write(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"prompt": "no completion"},
                                          "", {"messages": [{"role": "user", "content": "no answer"}]}, "[1, 2]"])
    with pytest.raises(DataError) as e:
        load_dataset(path, tok, max_seq_len=64)
    msg = str(e.value)
    assert "4 bad line(s)" in msg
    for line, why in ((2, "invalid JSON"), (3, "'prompt' and 'completion'"), (5, "'messages' has no assistant message"),
                      (6, "expected a JSON object")):
        assert f"{path}:{line}: {why}" in msg, msg


def test_empty_and_missing_files(tmp_path, tok):
    with pytest.raises(DataError, match="empty"):
        read_records(write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="cannot read"):
        read_records(tmp_path / "absent.jsonl")


def test_long_examples_error_skip_truncate(tmp_path, tok):
    long = "the quick brown fox jumps over the lazy dog " * 10
    path = write(tmp_path / "l.jsonl", [{"text": "short one"}, {"text": long}, {"text": "also short"}])
    with pytest.raises(DataError) as e:
        load_dataset(path, tok, max_seq_len=16)
    assert f"{path}:2:" in str(e.value) and "max_seq_len=16" in str(e.value)
    skipped = load_dataset(path, tok, max_seq_len=16, eval_fraction=0, long_examples="skip")
    assert (len(skipped.train), skipped.skipped_long, skipped.truncated_long) == (2, 1, 0)
    cut = load_dataset(path, tok, max_seq_len=16, eval_fraction=0, long_examples="truncate")
    assert (len(cut.train), cut.truncated_long) == (3, 1)
    assert max(len(e.input_ids) for e in cut.train) == 16


def test_eval_split_is_seeded_and_disjoint(tmp_path, tok):
    path = write(tmp_path / "s.jsonl", [{"prompt": f"hello {i}", "completion": " world"} for i in range(20)])
    a = load_dataset(path, tok, max_seq_len=64, eval_fraction=0.2, seed=3)
    b = load_dataset(path, tok, max_seq_len=64, eval_fraction=0.2, seed=3)
    assert (len(a.train), len(a.eval)) == (16, 4)
    assert [e.where for e in a.eval] == [e.where for e in b.eval]
    assert not {e.where for e in a.eval} & {e.where for e in a.train}
    assert len(a.sha256) == 64 and a.summary()["records"] == 20


def test_sample_datasets_are_valid_and_hold_out_the_demo_question():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "data"
    for name in ("json-answer", "pirate", "terse"):
        records, _ = read_records(root / f"{name}.jsonl")
        assert 300 <= len(records) <= 400 and {shape for _, _, shape in records} == {"messages"}
        assert not any("France" in r["messages"][0]["content"] for _, r, _ in records)
