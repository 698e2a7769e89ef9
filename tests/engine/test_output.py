"""The hand-off: per-step token batches become events on the output thread, in order."""

import asyncio

from server.engine.fake import EOS, ByteTokenizer
from server.engine.output import ErrorOut, OutputProcessor, Sink, TokenOut
from server.engine.sequence import Sequence, token_finish
from server.engine.types import GenerationRequest, SamplingParams, TokenLogprob


def seq(rid, **params):
    p = SamplingParams(**{"max_tokens": 100, **params})
    return Sequence(GenerationRequest(rid, [1, 2], p), ByteTokenizer(), [EOS])


def drive(batches, token_text=chr):
    """Process batches on this thread; return (events per request, stop calls)."""
    stops: list[str] = []

    async def main():
        sink = Sink(asyncio.get_running_loop(), asyncio.Queue())
        proc = OutputProcessor(token_text, stops.append)
        for batch in batches(sink):
            proc.process(batch)
        await asyncio.sleep(0)  # call_soon_threadsafe callbacks run on the next turn
        out = []
        while not sink.queue.empty():
            out.append(sink.queue.get_nowait())
        return out
    return asyncio.run(main()), stops


def test_stop_string_is_found_here_and_aborts_the_engine_side():
    s = seq("a", stop=(", t",))
    text = b"one, two"

    def batches(sink):
        # The engine knows nothing of the stop string: every token says "not finished".
        for ch in text:
            yield [TokenOut(sink, s, ch, None, finished=False)]
    events, stops = drive(batches)
    assert stops == ["a"]                          # asked once, at the token that completed ", t"
    assert "".join(e.text for e in events) == "one"
    assert events[-1].finish_reason == "stop"
    assert len(events) == len(b"one, t")           # tokens computed after the stop are dropped, not sent


def test_token_rules_finish_without_an_abort():
    s = seq("b", max_tokens=3)

    def batches(sink):
        for n, ch in enumerate(b"abc", 1):
            fin = token_finish(s.params, s.stop_ids, ch, n) is not None
            yield [TokenOut(sink, s, ch, None, finished=fin)]
    events, stops = drive(batches)
    assert stops == [] and events[-1].finish_reason == "length" and "".join(e.text for e in events) == "abc"


def test_errors_keep_their_place_after_tokens_and_logprobs_are_named():
    s = seq("c")
    err = RuntimeError("boom")
    lp = TokenLogprob(ord("x"), "", -0.5, ((ord("x"), "", -0.5), (ord("y"), "", -1.0)))

    def batches(sink):
        yield [TokenOut(sink, s, ord("x"), lp, finished=False, queue_time=0.25)]
        yield [ErrorOut(sink, "c", err)]
    events, _ = drive(batches)
    assert [e.error for e in events] == [None, err]
    named = events[0].logprobs[0]
    assert named.token == "x" and [t for _, t, _ in named.top] == ["x", "y"] and named.logprob == -0.5
    assert events[0].queue_time == 0.25


def test_token_finish_rules():
    p = SamplingParams(max_tokens=4, min_tokens=2)
    assert token_finish(p, {7}, 7, 1) is None          # an end token before min_tokens does not end it
    assert token_finish(p, {7}, 7, 3) == "stop"
    assert token_finish(p, {7}, 5, 4) == "length"
    assert token_finish(p, {7}, 5, 3) is None


def test_the_thread_delivers_and_stops():
    async def main():
        sink = Sink(asyncio.get_running_loop(), asyncio.Queue())
        proc = OutputProcessor(chr, lambda rid: None)
        proc.start()
        s = seq("d", max_tokens=2)
        proc.put([TokenOut(sink, s, ord("h"), None, False)])
        proc.put([TokenOut(sink, s, ord("i"), None, True)])
        evs = [await asyncio.wait_for(sink.queue.get(), 5) for _ in range(2)]
        proc.close()
        return evs, proc._thread.is_alive()
    evs, alive = asyncio.run(main())
    assert "".join(e.text for e in evs) == "hi" and evs[-1].finish_reason == "length" and not alive
