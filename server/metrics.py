"""Prometheus metrics, owned by one app instance.

Owns: every `loraplex_*` metric, in a `CollectorRegistry` of its own (two apps
in one process must not collide: prometheus/client_python#537), the bounded
`adapter` label, and the scrape-time gauges that read the engine's and the
registry's state through plain callables.

Label rules: the `adapter` label takes the base model's id, a registered
adapter or blend name, or "~mix" for every per-request blend; a series is only
created once the request's model was resolved (an unknown name never makes
one), and `forget_adapter` removes an unregistered adapter's series.
`outcome` is one of OUTCOMES.

It knows nothing of torch, HTTP or the registry's types: callers pass numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OUTCOMES = ("stop", "length", "aborted", "error", "rejected")
# From well under a millisecond (GPU decode) to minutes (CPU, long generations).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
MIX_LABEL = "~mix"


# A labelled scrape-time gauge's read(): (label values, value) per series.
LabelledRead = Callable[[], Iterable[tuple[tuple[str, ...], float]]]


class _StateCollector:
    """Gauges and counters read at scrape time from callables returning numbers."""

    def __init__(self, sources: dict[str, tuple[str, Callable[[], float | None]]], counters: set[str],
                 labelled: dict[str, tuple[str, tuple[str, ...], LabelledRead]]):
        self.sources = sources
        self.counters = counters
        self.labelled = labelled

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for name, (doc, read) in self.sources.items():
            value = read()
            if value is not None:
                family = CounterMetricFamily if name in self.counters else GaugeMetricFamily
                m = family(name, doc)
                m.add_metric([], float(value))
                yield m
        for name, (doc, labels, lread) in self.labelled.items():
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            for values, value in lread():
                g.add_metric(list(values), float(value))
            yield g


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # `version`: the adapter version that served (its sha256 prefix; "" for the base and mixes), so
        # a canary's two versions can be compared on the dashboard.
        ad = ["adapter", "version"]
        self.requests = Counter("loraplex_requests", "Requests by adapter, version and outcome "
                                "(stop, length, aborted by the client, error in the engine, rejected before "
                                "generation)", ad + ["outcome"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ad, registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", ad, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time from request to first token", ad,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between tokens of a stream", ad,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_request_duration_seconds", "Time from request to last token", ad,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("loraplex_queue_time_seconds", "Time a request waited before its prefill", ad,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("loraplex_batch_size", "Sequences in each engine step", buckets=BATCH_BUCKETS,
                               registry=r)
        self.step = Histogram("loraplex_engine_step_duration_seconds", "Duration of one engine step",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.loads = Counter("loraplex_adapter_loads", "Adapter loads into memory by result "
                             "(ok, invalid, overloaded)", ["result"], registry=r)
        self.load_time = Histogram("loraplex_adapter_load_duration_seconds", "Time to load an adapter into memory",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("loraplex_adapter_evictions", "Adapters evicted from memory (LRU)", registry=r)
        self.jobs = Counter("loraplex_jobs", "Background jobs (train, eval, export) finished, by kind and status",
                            ["kind", "status"], registry=r)
        self.blends = Counter("loraplex_blends_created", "Named blends created", registry=r)
        ProcessCollector(namespace="loraplex", registry=r)
        self._series: dict[str, set[tuple[str, ...]]] = {}   # adapter -> label tuples created, for removal
        self._state: dict[str, tuple[str, Callable[[], float | None]]] = {}
        self._counters: set[str] = set()
        self._labelled: dict[str, tuple[str, tuple[str, ...], LabelledRead]] = {}
        r.register(_StateCollector(self._state, self._counters, self._labelled))

    # -- scrape-time state ---------------------------------------------------------
    def gauge(self, name: str, doc: str, read: Callable[[], float | None]) -> None:
        """Expose `read()` as gauge `name` at every scrape (None = omit)."""
        self._state[name] = (doc, read)

    def labelled_gauge(self, name: str, doc: str, labels: tuple[str, ...], read: LabelledRead) -> None:
        """Expose the series `read()` returns as gauge `name` at every scrape."""
        self._labelled[name] = (doc, labels, read)

    def counter(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Expose a count kept elsewhere (it must only grow) as counter `name` (`name_total` on the wire)."""
        self._state[name] = (doc, read)
        self._counters.add(name)

    # -- per-request ---------------------------------------------------------------
    def _note(self, adapter: str, *labels: str) -> None:
        self._series.setdefault(adapter, set()).add(labels)

    def request_done(self, adapter: str, outcome: str, *, version: str = "", prompt_tokens: int = 0,
                     generation_tokens: int = 0, ttft: float | None = None, itls: Iterable[float] = (),
                     duration: float | None = None, queue: float | None = None) -> None:
        assert outcome in OUTCOMES, outcome
        self.requests.labels(adapter, version, outcome).inc()
        self._note(adapter, version, outcome)
        self.prompt_tokens.labels(adapter, version).inc(prompt_tokens)
        self.generation_tokens.labels(adapter, version).inc(generation_tokens)
        if ttft is not None:
            self.ttft.labels(adapter, version).observe(ttft)
        itl = self.itl.labels(adapter, version)
        for gap in itls:
            itl.observe(gap)
        if duration is not None:
            self.e2e.labels(adapter, version).observe(duration)
        if queue is not None:
            self.queue.labels(adapter, version).observe(queue)

    def forget_adapter(self, adapter: str) -> None:
        """Drop every series of an adapter that is gone, so dashboards do not show ghosts."""
        seen = self._series.pop(adapter, set())
        for version, outcome in seen:
            self.requests.remove(adapter, version, outcome)
        for version in {v for v, _ in seen}:
            for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e, self.queue):
                try:
                    metric.remove(adapter, version)
                except KeyError:
                    pass

    # -- engine and registry callbacks -------------------------------------------
    def engine_step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.step.observe(seconds)

    # (these four implement the registry's Observer)
    def adapter_loaded(self, result: str, seconds: float | None = None) -> None:
        self.loads.labels(result).inc()
        if seconds is not None:
            self.load_time.observe(seconds)

    def adapter_evicted(self) -> None:
        self.evictions.inc()

    def job_finished(self, kind: str, status: str) -> None:
        self.jobs.labels(kind, status).inc()

    def blend_created(self) -> None:
        self.blends.inc()

    def adapter_forgotten(self, name: str) -> None:
        self.forget_adapter(name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
