"""Metrics a serving operator scrapes, with ``prometheus_client`` (off unless asked for).

``ShardedPageTable(..., metrics=True)`` (or a :class:`TableMetrics` of your own registry)
records, per table: commit latency (a histogram, from the call until every shard confirmed),
bytes and row updates sent, the published epoch, the epochs in flight (0 or 1), recoveries,
and each shard's apply time as the shard itself measured it. :func:`serve_metrics` exposes
a registry over HTTP, bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0)
_TABLES = itertools.count()


class TableMetrics:
    """The metrics of one table in ``registry`` (a fresh one by default), labelled
    ``table=name``."""

    def __init__(self, registry: CollectorRegistry | None = None, name: str | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.name = name or f"table{next(_TABLES)}"
        labels, reg = ["table"], self.registry
        self.commit_seconds = Histogram(
            "spt_commit_seconds", "Commit latency until every shard confirmed",
            labels, registry=reg, buckets=_BUCKETS,
        )  # fmt: skip
        self.bytes_sent = Counter(
            "spt_commit_bytes", "Batch payload bytes sent", labels, registry=reg
        )
        self.rows_sent = Counter("spt_commit_rows", "Row updates sent", labels, registry=reg)
        self.epoch = Gauge("spt_epoch", "Published epoch", labels, registry=reg)
        self.in_flight = Gauge(
            "spt_epochs_in_flight", "Epochs sent, not yet confirmed", labels, registry=reg
        )
        self.recoveries = Counter(
            "spt_recoveries", "Recoveries (all shards replaced)", labels, registry=reg
        )
        self.shard_apply_seconds = Histogram(
            "spt_shard_apply_seconds", "A shard's own time to apply an epoch",
            [*labels, "shard"], registry=reg, buckets=_BUCKETS,
        )  # fmt: skip

    def sent(self, receipt) -> None:
        """An epoch left for the shards."""
        self.bytes_sent.labels(self.name).inc(receipt.bytes)
        self.rows_sent.labels(self.name).inc(receipt.rows)
        self.in_flight.labels(self.name).set(1)

    def confirmed(self, epoch: int, seconds: float, acks) -> None:
        """Every shard confirmed ``epoch``, ``seconds`` after the commit began."""
        self.commit_seconds.labels(self.name).observe(seconds)
        self.epoch.labels(self.name).set(epoch)
        self.in_flight.labels(self.name).set(0)
        for ack in acks:
            self.shard_apply_seconds.labels(self.name, str(ack.shard)).observe(ack.apply_us / 1e6)

    def failed(self) -> None:
        self.in_flight.labels(self.name).set(0)

    def recovered(self) -> None:
        self.recoveries.labels(self.name).inc()


def serve_metrics(registry: CollectorRegistry, port: int = 0, addr: str = "127.0.0.1"):
    """Expose ``registry`` at ``http://addr:port/metrics``; returns ``(server, port)``."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, server.server_port
