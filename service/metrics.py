"""Prometheus metrics, one registry per app (no process-global state).

Run one server process per container or pod and scale with replicas: every process then
exports its own correct numbers and Prometheus sums them.

Label values come only from fixed sets: route templates, loaded model names (anything else
is ``UNKNOWN_MODEL``), status codes, error codes. Nothing a caller writes becomes a label,
so the number of series is bounded whatever clients send.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
UNKNOWN_MODEL = "unknown"
_SERVED_MODEL: ContextVar[list[str] | None] = ContextVar("rnnserve_served_model", default=None)
"""Per request (set by the access middleware): the model whose session the request touched."""


def track_served_model() -> list[str]:
    """Start noting, for the current request, the model of the session it touches."""
    holder: list[str] = []
    _SERVED_MODEL.set(holder)
    return holder


def note_served_model(name: str) -> None:
    """Called where a session is looked up: its model labels the request's metrics."""
    holder = _SERVED_MODEL.get()
    if holder is not None:
        holder[:] = [name]
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _SessionCollector:
    """Reports the live session count read by ``Metrics.refresh`` just before a scrape."""

    def __init__(self) -> None:
        self.store = None
        self.last = 0

    def collect(self):
        family = GaugeMetricFamily("rnnserve_sessions_active", "Live sessions in the store")
        family.add_metric([], self.last)
        yield family


class Metrics:
    def __init__(self) -> None:
        # The ``_created`` series double every counter and histogram for a timestamp
        # Prometheus does not need (the switch is the library's, process-wide).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rnnserve_requests", "Requests answered", ["route", "model", "status"], registry=r
        )
        self.latency = Histogram(
            "rnnserve_request_latency_seconds",
            "Request latency",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ws_messages = Counter(
            "rnnserve_ws_messages", "WebSocket messages answered", ["model", "format", "outcome"], registry=r
        )
        self.steps = Counter("rnnserve_session_steps", "Session steps applied", ["model"], registry=r)
        self.batch_size = Histogram(
            "rnnserve_batch_size", "Sequences per onnxruntime call", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "rnnserve_batch_queue_wait_seconds",
            "Time a queued sequence waited in the batcher before its call started (a lone "
            "stream's step run at once, without queueing, is not counted)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions_created = Counter(
            "rnnserve_sessions_created", "Sessions created", ["model"], registry=r
        )
        self.session_expiries = Counter(
            "rnnserve_session_expiries", "Sessions dropped after their idle TTL", registry=r
        )
        self.session_refusals = Counter(
            "rnnserve_session_refusals", "Session creations refused at a limit", registry=r
        )
        self.model_load_failures = Counter(
            "rnnserve_model_load_failures", "Model versions that failed to load", ["model"], registry=r
        )
        self.store_unavailable = Counter(
            "rnnserve_store_unavailable",
            "Session store operations that failed to reach the store (answered 503)",
            ["cause"],
            registry=r,
        )
        self.models_ready = Gauge("rnnserve_models_ready", "Model versions ready", registry=r)
        self._sessions = _SessionCollector()
        r.register(self._sessions)

    def bind_sessions(self, store) -> None:
        self._sessions.store = store
        unavailable = self.store_unavailable
        store.on_unavailable = lambda cause, answers: unavailable.labels(cause=cause).inc(answers)

    async def refresh(self) -> None:
        """Update values that need an await (e.g. a Redis count) before a scrape."""
        store = self._sessions.store
        if store is not None:
            try:
                self._sessions.last = await asyncio.wait_for(store.count(), 1.0)
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail on a store outage
                # The gauge keeps its last value; the outage itself is counted and logged
                # where requests meet it (store_unavailable).
                log.debug("session count not refreshed: %r", exc)

    def render(self) -> bytes:
        return generate_latest(self.registry)
