"""Prometheus metrics, one registry per daemon (tests build their own, so figures never leak between them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ANSWER_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class Metrics:
    """Everything callbridge counts. ``render()`` gives the text exposition for ``GET /metrics``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.api_latency = Histogram("callbridge_api_request_seconds", "HTTP API request latency",
                                     ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.calls_created = Counter("callbridge_calls_created_total", "Calls accepted by the API",
                                     ["kind"], registry=r)
        self.calls_final = Counter("callbridge_calls_finished_total", "Calls by final status and cause",
                                   ["status", "cause"], registry=r)
        self.calls_in_flight = Gauge("callbridge_calls_in_flight", "Calls in progress by phase",
                                     ["phase"], registry=r)
        self.originate_to_answer = Histogram("callbridge_originate_to_answer_seconds",
                                             "Time from dialing a leg to its answer", ["leg"],
                                             buckets=ANSWER_BUCKETS, registry=r)
        self.scheduler_lateness = Histogram("callbridge_scheduler_lateness_seconds",
                                            "Start time minus due time of each call",
                                            buckets=LATENESS_BUCKETS, registry=r)
        # Per switch, labelled by its host:port (never its password).
        self.esl_connected = Gauge("callbridge_esl_connected", "1 when the switch's Event Socket is up",
                                   ["switch"], registry=r)
        self.esl_reconnects = Counter("callbridge_esl_reconnects_total", "Event Socket reconnections",
                                      ["switch"], registry=r)
        self.webhooks = Counter("callbridge_webhook_deliveries_total", "Webhook delivery attempts",
                                ["result"], registry=r)
        # Each switch's session capacity (daemon/switch/capacity.py); the gauges read it when scraped.
        self.switch_sps = Gauge("callbridge_switch_sessions_per_second_limit",
                                "The switch's sessions-per-second limit as last read (0: not known)", ["switch"],
                                registry=r)
        self.switch_max_sessions = Gauge("callbridge_switch_max_sessions",
                                         "The switch's max sessions as last read (0: not known)", ["switch"],
                                         registry=r)
        self.switch_sessions = Gauge("callbridge_switch_sessions",
                                     "Sessions on the switch now (its last status, plus creations, less hangups)",
                                     ["switch"], registry=r)
        self.switch_session_rate = Gauge("callbridge_switch_session_rate",
                                         "Sessions created on the switch in the last second (ours from when sent)",
                                         ["switch"], registry=r)
        self.switch_legs_waiting = Gauge("callbridge_switch_legs_waiting",
                                         "Legs of calls in progress waiting for room on the switch", ["switch"],
                                         registry=r)
        self.switch_calls = Gauge("callbridge_switch_calls_in_progress",
                                  "Calls this daemon follows on the switch", ["switch"], registry=r)
        self.switch_throttled = Counter("callbridge_switch_throttled_total",
                                        "Legs the switch refused over its session limits (nothing dialed)",
                                        ["leg"], registry=r)
        for leg in ("a", "b"):
            self.switch_throttled.labels(leg)
        # Several daemons on one PostgreSQL (daemon/calls/leases.py): calls changing hands.
        self.leases = Counter("callbridge_lease_events_total",
                              "Calls changing hands: taken_over (another daemon's lease ran out), lost (another "
                              "daemon took it), released (at this daemon's stop), held (takeovers held after "
                              "missed renewals)", ["event"], registry=r)
        for event in ("taken_over", "lost", "released", "held"):
            self.leases.labels(event)
        self.loop_blocked = Counter("callbridge_loop_blocked_total",
                                    "Times a greenlet held the event loop longer than loop_block_warning "
                                    "(daemon/ops/loopwatch.py)", registry=r)
        self.clock_offset = Gauge("callbridge_clock_offset_seconds",
                                  "The shared database server's clock minus this host's, at the last lease renewal "
                                  "(0 on SQLite)", registry=r)
        self._esl_traffic = _EslTrafficCollector()
        r.register(self._esl_traffic)

    def watch_esl_traffic(self, switch: str, traffic: Any) -> None:
        """Export a switch's Event Socket message counts (``daemon.switch.esl.EslTraffic``), read at each scrape."""
        self._esl_traffic.switches[switch] = traffic

    def watch_media_pool(self, pool: Any) -> None:
        """Export what the media worker pool (``daemon.media.pool.WorkerPool``) did, read at each scrape."""
        self.registry.register(_MediaPoolCollector(pool))

    def watch_http_server(self, server: Any) -> None:
        """Export the API server's connections (``webapi.server.ApiServer``), read at each scrape."""
        self.registry.register(_HttpServerCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _MediaPoolCollector:
    """The media worker pool's own counts (kept by the pool in ``PoolStats``), as Prometheus metrics."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        stats = self.pool.stats
        yield GaugeMetricFamily("callbridge_media_workers", "Media worker processes running now",
                                value=len(stats.pids))
        yield GaugeMetricFamily("callbridge_media_workers_max", "Media worker processes at most (media_workers)",
                                value=self.pool.size)
        jobs = CounterMetricFamily("callbridge_media_jobs", "Media jobs (decode or speech) by how they ended",
                                   labels=["outcome"])
        jobs.add_metric(["done"], stats.jobs - stats.retired)
        jobs.add_metric(["out_of_memory"], stats.retired)  # answered, over media_memory_mb: its worker ended
        jobs.add_metric(["busy"], stats.busy)  # refused: every worker busy past media_queue_timeout (503)
        jobs.add_metric(["killed"], stats.killed)  # past its wall-clock deadline
        jobs.add_metric(["died"], stats.died)  # crashed or over media_cpu_seconds
        yield jobs
        yield CounterMetricFamily("callbridge_media_cpu_seconds", "CPU seconds the media workers reported",
                                  value=stats.cpu_seconds)
        yield CounterMetricFamily("callbridge_media_workers_started", "Media worker processes started",
                                  value=stats.started)


class _HttpServerCollector:
    """The API server's connections: open now, its cap, and those it closed or refused and why."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        yield GaugeMetricFamily("callbridge_http_connections", "API connections open now",
                                value=len(server.connections))
        yield GaugeMetricFamily("callbridge_http_connections_max", "API connections at most (http_max_connections, "
                                "fitted under the open-file limit)", value=server.limits.max_connections)
        closed = CounterMetricFamily("callbridge_http_connections_closed",
                                     "API connections the server closed or refused, by reason", labels=["reason"])
        closed.add_metric(["evicted"], server.evicted)  # the longest-receiving one, to make room at the cap
        closed.add_metric(["refused"], server.refused)  # at the cap with every connection serving: 503
        closed.add_metric(["timed_out"], server.timed_out)  # a header, body or idle deadline passed
        yield closed


class _EslTrafficCollector:
    """Whole Event Socket messages per switch: received (events, replies) and sent (commands), and the writes
    the commands went in. Counted as
    plain integers by the connection, so the reader's hot path pays no lock per message."""

    def __init__(self) -> None:
        self.switches: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("callbridge_esl_messages", "Event Socket messages by switch and direction "
                                     "(received: events and replies; sent: commands)", labels=["switch", "direction"])
        for switch, traffic in self.switches.items():
            family.add_metric([switch, "received"], traffic.received)
            family.add_metric([switch, "sent"], traffic.sent)
        yield family
        writes = CounterMetricFamily("callbridge_esl_writes", "Writes of commands to the Event Socket by switch "
                                     "(commands queued together go in one write: sent messages / writes)",
                                     labels=["switch"])
        for switch, traffic in self.switches.items():
            writes.add_metric([switch], traffic.writes)
        yield writes
