"""Prometheus metrics of one server (``GET /metrics``): requests, latency, batches, residency.

Each app has its own ``CollectorRegistry``, so several servers (tests) in one process do not mix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The counters and histograms the server updates, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, resident: Callable[[], int], attached: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adamix_requests", "HTTP requests by route and status.", ["route", "status"], registry=r)
        self.latency = Histogram(
            "adamix_request_latency_seconds", "Request latency (in -> out) by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.rows = Counter("adamix_rows", "Rows answered, by batch kind (predict, generate).", ["kind"], registry=r)
        self.batch_rows = Histogram(
            "adamix_batch_rows", "Rows per batch (forward pass or decode loop).", ["kind"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.evictions = Counter("adamix_evictions", "Adapters evicted from memory to make room.", registry=r)
        Gauge("adamix_resident_adapters", "Adapters in memory.", registry=r).set_function(resident)
        Gauge("adamix_attached_tasks", "Tasks attached (resident or not).", registry=r).set_function(attached)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def counted(self, kind: str, run: Callable[[list, list], list], resident: Callable[[], list[str]]):
        """``run`` (a batch function) that also counts its rows, batch size and evictions."""

        def run_counted(tasks: list, rows: list) -> list[Any]:
            before = set(resident())
            answers = run(tasks, rows)
            self.evictions.inc(len(before - set(resident())))
            self.rows.labels(kind).inc(len(rows))
            self.batch_rows.labels(kind).observe(len(rows))
            return answers

        return run_counted

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
