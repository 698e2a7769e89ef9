"""When a sequence ends, and what text it releases, per appended token."""

from server.engine.fake import EOS, ByteTokenizer
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams


def run(tokens, **params):
    p = SamplingParams(**{"max_tokens": 100, **params})
    seq = Sequence(GenerationRequest("r", [1, 2], p), ByteTokenizer(), [EOS])
    events = []
    for t in tokens:
        events.append(seq.append(t))
        if seq.finished:
            break
    return "".join(e.text for e in events), events[-1].finish_reason, len(events)


def b(s):
    return list(s.encode())


def test_eos_stops_and_carries_no_text():
    assert run(b("hi") + [EOS] + b("zz")) == ("hi", "stop", 3)


def test_max_tokens_is_length():
    assert run(b("hello"), max_tokens=3) == ("hel", "length", 3)


def test_stop_string_cut_and_not_returned():
    assert run(b("one, two, three"), stop=(", t",)) == ("one", "stop", 6)


def test_stop_token_ids():
    assert run(b("abc"), stop_token_ids=(ord("b"),)) == ("a", "stop", 2)


def test_ignore_eos_runs_to_length():
    assert run(b("a") + [EOS] + b("bc"), ignore_eos=True, max_tokens=4) == ("abc", "length", 4)


def test_min_tokens_defers_eos():
    text, reason, n = run([EOS, ord("a"), EOS, ord("b"), EOS], min_tokens=3)
    assert (text, reason, n) == ("ab", "stop", 5)


def test_held_stop_prefix_released_at_length():
    assert run(b("abST"), stop=("STOP",), max_tokens=4) == ("abST", "length", 4)


def test_event_counts():
    seq = Sequence(GenerationRequest("r", [1, 2, 3], SamplingParams(max_tokens=5)), ByteTokenizer(), [EOS])
    ev = seq.append(ord("x"))
    assert (ev.prompt_tokens, ev.completion_tokens, ev.token_ids) == (3, 1, [ord("x")])
