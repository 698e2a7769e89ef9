"""An engine failure after a request started: an OpenAI error body, or an SSE error event."""

from server.engine.fake import FakeEngine
from server.errors import LoraplexError


class FailingEngine(FakeEngine):
    """Produces two tokens, then fails the request."""

    async def _generate(self, request):
        n = 0
        async for ev in super()._generate(request):
            yield ev
            n += 1
            if n == 2:
                raise LoraplexError("engine error: boom", code="engine_error")


def test_non_stream_gets_500_in_openai_shape(make_client):
    c = make_client()
    c.app.state.loraplex.engine.__class__ = FailingEngine
    r = c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 20})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    # the server keeps serving: a request that ends before the failure point succeeds
    assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_stream_ends_with_error_event_then_done(make_client):
    import json
    c = make_client()
    c.app.state.loraplex.engine.__class__ = FailingEngine
    with c.stream("POST", "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 20,
                                                   "stream": True}) as r:
        data = [ln[5:].strip() for ln in r.iter_lines() if ln.startswith("data:")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["message"] == "engine error: boom"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-2]) == "[b"
