"""Incremental detokenization and stop strings, as tables, without a model."""

import pytest

from server.engine.detokenize import IncrementalDetokenizer, StopMatcher
from server.engine.fake import ByteTokenizer


@pytest.mark.parametrize("stops,pieces,released,stopped", [
    ((), ["ab", "cd"], "abcd", False),
    (("END",), ["hello ", "E", "N", "D", " more"], "hello ", True),
    (("END",), ["hello E", "NX"], "hello ENX", False),          # held "E", then released when it is not a stop
    (("END",), ["xEN", "D"], "x", True),                          # stop split across pieces
    (("ab", "b"), ["xab"], "x", True),                            # earliest match wins
    (("\n\n",), ["line\n", "\nnext"], "line", True),
    (("aaa",), ["aa", "aa"], "", True),                           # held prefix turns into the stop
])
def test_stop_matcher(stops, pieces, released, stopped):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    if not m.stopped:
        out += m.flush()
    assert out == released
    assert m.stopped is stopped


def test_matcher_never_releases_a_possible_stop_prefix():
    m = StopMatcher(["STOP"])
    assert m.feed("abcST") == "abc"
    assert m.feed("O") == ""
    assert m.feed("x") == "STOx"


def test_utf8_split_across_tokens_is_held_until_complete():
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok)
    deltas = [d.add(b) for b in "é€".encode()]  # 2 + 3 bytes
    assert deltas == ["", "é", "", "", "€"]
    assert d.text == "é€"


def test_flush_releases_trailing_bytes():
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok)
    assert d.add("€".encode()[0]) == ""
    assert d.flush() == "\ufffd"


def test_with_a_real_bpe_tokenizer_deltas_add_up():
    from tests.helpers import tiny_tokenizer
    tok = tiny_tokenizer()
    text = "the quick brown fox, jumps! über 42"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    out = "".join(d.add(i) for i in ids) + d.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
