"""Prometheus metrics for ``/metrics``: what happened (counters) and what is (gauges).

Counters and the load histogram are updated as events happen. Gauges (states,
memory, requests in flight) are read from the hub at scrape time, so they can
never drift from what ``/hub/status`` says. Each hub has its own registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mlx_hub.core.status import HubStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)


class _StateCollector:
    def __init__(self, status: Callable[[], HubStatus]):
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.status()
        running = GaugeMetricFamily(
            "mlx_hub_model_port_running", "1 while the model's port serves", labels=["model"]
        )
        loaded = GaugeMetricFamily(
            "mlx_hub_model_loaded", "1 while the model's weights are loaded", labels=["model"]
        )
        state = GaugeMetricFamily(
            "mlx_hub_model_memory_state", "1 for the model's current memory state", labels=["model", "state"]
        )
        memory = GaugeMetricFamily(
            "mlx_hub_model_memory_bytes", "memory the model's load added", labels=["model"]
        )
        in_flight = GaugeMetricFamily("mlx_hub_model_in_flight", "requests being served", labels=["model"])
        waiting = GaugeMetricFamily("mlx_hub_model_waiting", "requests waiting for a load", labels=["model"])
        reserved = GaugeMetricFamily(
            "mlx_hub_model_kv_reserved_bytes",
            "KV cache and prefill memory its requests in flight reserve",
            labels=["model"],
        )
        peak = GaugeMetricFamily(
            "mlx_hub_model_memory_peak_bytes", "the most the model accounted for at once", labels=["model"]
        )
        for row in status.models:
            name, meta = row.id, row.metadata
            running.add_metric([name], 1.0 if meta.process_state == "running" else 0.0)
            loaded.add_metric([name], 1.0 if meta.memory_state == "loaded" else 0.0)
            for value in ("unloaded", "loading", "loaded", "unloading", "failed"):
                state.add_metric([name, value], 1.0 if meta.memory_state == value else 0.0)
            memory.add_metric([name], float(meta.memory_bytes))
            in_flight.add_metric([name], float(meta.in_flight))
            waiting.add_metric([name], float(meta.waiting))
            reserved.add_metric([name], float(meta.kv_reserved_bytes))
            peak.add_metric([name], float(meta.memory_peak_bytes))
        yield from (running, loaded, state, memory, in_flight, waiting, reserved, peak)
        yield _rank_memory(status)
        yield from _hub_memory(status)
        restarts = CounterMetricFamily(
            "mlx_hub_restarts", "times the supervisor restarted the hub after a crash (kept across restarts)"
        )
        restarts.add_metric([], float(status.restarts))
        yield restarts
        yield from _prompt_cache_metrics(status)
        if status.memory.budget_bytes:
            budget = GaugeMetricFamily("mlx_hub_memory_budget_bytes", "max_memory in bytes")
            budget.add_metric([], float(status.memory.budget_bytes))
            yield budget


def _hub_memory(status: HubStatus) -> Iterator[GaugeMetricFamily]:
    """The hub process's MLX memory and what its models and requests account for."""
    active = GaugeMetricFamily("mlx_hub_mlx_active_memory_bytes", "MLX active memory of the hub process")
    active.add_metric([], float(status.memory.active_bytes))
    yield active
    hub_reserved = GaugeMetricFamily(
        "mlx_hub_memory_reserved_bytes", "what every request in flight reserves (KV cache, prefill)"
    )
    hub_reserved.add_metric([], float(status.memory.reserved_bytes))
    hub_peak = GaugeMetricFamily("mlx_hub_mlx_peak_memory_bytes", "MLX peak memory since the hub started")
    hub_peak.add_metric([], float(status.memory.peak_bytes))
    models = GaugeMetricFamily("mlx_hub_models_memory_bytes", "loaded models' bytes (weights, prompt caches)")
    models.add_metric([], float(status.memory.models_bytes))
    yield from (hub_reserved, hub_peak, models)


def _rank_memory(status: HubStatus) -> GaugeMetricFamily:
    """Each sharded model's ranks: the MLX active memory each reports, on whichever host it runs."""
    ranks = GaugeMetricFamily(
        "mlx_hub_rank_memory_bytes",
        "MLX active memory of each rank of a sharded model",
        labels=["model", "rank", "host"],
    )
    for row in status.models:
        for rank in row.metadata.ranks or []:
            if rank.get("memory_bytes") is not None:
                ranks.add_metric([row.id, str(rank["rank"]), str(rank["host"])], float(rank["memory_bytes"]))  # type: ignore[arg-type]
    return ranks


def _prompt_cache_metrics(status: HubStatus) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Prompt caches kept on disk: lookups by model (counters since the hub started), bytes and the cap."""
    if status.prompt_cache is None or not status.prompt_cache.enabled:
        return
    families = {
        "hits": CounterMetricFamily(
            "mlx_hub_prompt_cache_hits", "lookups that found a prompt cache to start from", labels=["model"]
        ),
        "misses": CounterMetricFamily(
            "mlx_hub_prompt_cache_misses", "lookups that found no prompt cache", labels=["model"]
        ),
        "tokens": CounterMetricFamily(
            "mlx_hub_prompt_cache_tokens_reused", "prompt tokens not prefilled again", labels=["model"]
        ),
        "disk": GaugeMetricFamily(
            "mlx_hub_model_prompt_cache_disk_bytes", "the model's prompt caches on disk", labels=["model"]
        ),
    }
    for row in status.models:
        meta = row.metadata
        families["hits"].add_metric([row.id], float(meta.prompt_cache_hits))
        families["misses"].add_metric([row.id], float(meta.prompt_cache_misses))
        families["tokens"].add_metric([row.id], float(meta.prompt_cache_tokens_reused))
        families["disk"].add_metric([row.id], float(meta.prompt_cache_disk_bytes))
    yield from families.values()
    disk = GaugeMetricFamily("mlx_hub_prompt_cache_disk_bytes", "every model's prompt caches on disk")
    disk.add_metric([], float(status.prompt_cache.disk_bytes))
    cap = GaugeMetricFamily("mlx_hub_prompt_cache_disk_cap_bytes", "prompt_cache_disk_size in bytes")
    cap.add_metric([], float(status.prompt_cache.cap_bytes))
    written = CounterMetricFamily(
        "mlx_hub_prompt_cache_written_bytes", "bytes of prompt caches this hub wrote to disk"
    )
    written.add_metric([], float(status.prompt_cache.bytes_written))
    yield from (disk, cap, written)


class HubMetrics:
    def __init__(self, status: Callable[[], HubStatus]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlx_hub_requests",
            "requests served, by model, route and status",
            ["model", "route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "mlx_hub_request_errors",
            "requests answered with a 4xx or 5xx, by model and route",
            ["model", "route"],
            registry=self.registry,
        )
        self.loads = Counter("mlx_hub_loads", "completed loads", ["model"], registry=self.registry)
        self.load_seconds = Histogram(
            "mlx_hub_load_seconds",
            "time to load a model",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.evictions = Counter(
            "mlx_hub_unloads",
            "unloads, by reason (idle, group, budget, keep_alive, manual, stop)",
            ["model", "reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "mlx_hub_generated_tokens",
            "completion tokens reported by the handler's usage",
            ["model"],
            registry=self.registry,
        )
        self.allocation_failures = Counter(
            "mlx_hub_allocation_failures",
            "requests that failed because MLX could not allocate memory",
            ["model"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "mlx_hub_requests_cancelled_by_client",
            "requests whose client went away, by stage (waiting, generating)",
            ["model", "stage"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(status))

    def request(self, model: str, route: str, status: int, tokens: int) -> None:
        self.requests.labels(model, route, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, route).inc()
        if tokens:
            self.tokens.labels(model).inc(tokens)

    def client_left(self, model: str, stage: str) -> None:
        self.cancelled.labels(model, stage).inc()

    def loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model).inc()
        self.load_seconds.labels(model).observe(seconds)

    def allocation_failed(self, model: str) -> None:
        self.allocation_failures.labels(model).inc()

    def unloaded(self, model: str, reason: str) -> None:
        self.evictions.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
