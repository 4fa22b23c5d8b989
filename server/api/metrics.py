"""Prometheus metrics, one registry per app: requests, tokens, queue, batch, latencies, prefix cache."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.request import Request

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self, state):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefix_server_requests", "Generate requests by task and outcome", ["task", "status"], registry=r
        )
        self.tokens = Counter("prefix_server_tokens", "Tokens by task and kind", ["task", "kind"], registry=r)
        self.ttft = Histogram(
            "prefix_server_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "prefix_server_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        queue = Gauge("prefix_server_queue_depth", "Requests waiting for a slot", registry=r)
        queue.set_function(lambda: state.scheduler.num_waiting if state.scheduler else 0)
        batch = Gauge("prefix_server_running_batch_size", "Rows in the running batch", registry=r)
        batch.set_function(lambda: state.scheduler.num_running if state.scheduler else 0)
        r.register(_PrefixCacheCollector(state))
        r.register(_EngineCollector(state))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def refused(self, task: str, status: str) -> None:
        """Record a generate request refused before it became a request (e.g. an unknown task, 404)."""
        self.requests.labels(task, status).inc()

    def observe(self, request: Request, task: str, status: str) -> None:
        """Record one finished (or failed) generate request."""
        self.requests.labels(task, status).inc()
        self.tokens.labels(task, "prompt").inc(request.num_prompt_tokens)
        self.tokens.labels(task, "completion").inc(len(request.output_token_ids))
        if request.arrival_time and request.first_token_time is not None:
            self.ttft.observe(request.first_token_time - request.arrival_time)
        if request.arrival_time and request.finish_time is not None and status == "ok":
            self.latency.observe(request.finish_time - request.arrival_time)


class _PrefixCacheCollector:
    """Reads the registry's cache counters at scrape time."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        components = self.state.components
        if components is None:
            return
        stats = components.registry.stats()
        counters = {
            "hits": "cache hits",
            "misses": "cache misses (loads from disk)",
            "evictions": "LRU evictions",
        }
        for key, text in counters.items():
            c = CounterMetricFamily(f"prefix_server_prefix_cache_{key}", f"Prefix {text}")
            c.add_metric([], stats.get(key, 0))
            yield c
        for key, text in {
            "bytes_in_use": "bytes held in the prefix cache",
            "pinned_bytes": "bytes pinned by running requests",
            "capacity_bytes": "prefix cache budget",
            "num_entries": "prefixes in the cache",
            "num_tasks": "tasks in the registry",
        }.items():
            g = GaugeMetricFamily(f"prefix_server_prefix_cache_{key}", text.capitalize())
            g.add_metric([], stats.get(key, 0))
            yield g
        load = CounterMetricFamily(
            "prefix_server_prefix_load_seconds", "Total seconds spent loading prefixes from disk"
        )
        load.add_metric([], stats.get("load_seconds_total", 0.0))
        yield load


class _EngineCollector:
    """The engine worker's counters, read at scrape time: steps, busy seconds, compiled step in use."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        scheduler, components = self.state.scheduler, self.state.components
        steps = CounterMetricFamily("prefix_server_engine_steps", "Engine steps (admissions + one decode)")
        steps.add_metric([], scheduler.num_steps if scheduler else 0)
        yield steps
        busy = CounterMetricFamily("prefix_server_engine_busy_seconds", "Seconds the engine worker ran steps")
        busy.add_metric([], scheduler.engine_seconds if scheduler else 0.0)
        yield busy
        decoder = getattr(components.engine, "decoder", None) if components is not None else None
        compiled = GaugeMetricFamily(
            "prefix_server_compiled_decode", "1 when decode steps run the compiled step (--compile)"
        )
        compiled.add_metric([], 1 if decoder is not None and decoder.ready else 0)
        yield compiled
        kv_stats = getattr(components.engine, "kv_stats", None) if components is not None else None
        if kv_stats is None:
            return
        stats = kv_stats()
        for key, text in {
            "pages_total": "K/V pages in the pool (--kv-cache-bytes)",
            "pages_used": "K/V pages held by running rows and resident prefixes",
            "pages_shared": "K/V pages of prefixes read by more than one running row",
            "prefix_pages_resident": "K/V pages of resident prefixes (used and idle)",
        }.items():
            g = GaugeMetricFamily(f"prefix_server_kv_{key}", text)
            g.add_metric([], stats[key])
            yield g
