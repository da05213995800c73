"""Prometheus metrics of one proxy, in its own `CollectorRegistry`.

`Metrics` is a forward observer (requests, time to the target's headers) and has one
small method for each thing the other parts count: probes, auth episodes, 401/403
answers, token refreshes, token expiry, workload status and SSE streams. Every label
value comes from a small closed set, and every label child exists from the start (a
scrape shows zeros, not missing series).

It must never use prometheus-client's global registry (several proxies can run in one
process), never take a label value from unbounded input (a path, a header, a token),
and never do I/O on the request path. It is used from the event loop's thread only.

The two families every request touches (`requests_total`, `upstream_response_seconds`)
are plain ints and a float updated on the event loop, exposed at scrape time by
`_RequestFamilies`: prometheus-client's Counter and Histogram take a lock (and a few
calls) per increment, which per request cost as much as the rest of the observer.
The proxy is single-threaded (the admin port scrapes on the same loop), so plain
increments are exact. The text a scrape shows is what the prometheus-client objects
showed: same names, types, help, labels, buckets and `_created` series.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import TYPE_CHECKING

from aiohttp import hdrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ..credentials.challenge import bearer_error
from ..forwarding.observe import Exchange
from ..status.model import WorkloadStatus

if TYPE_CHECKING:
    from .probe import ProbeResult

PREFIX = "mcp_authproxy_"
# The content type of `render()`'s output (the classic text format, version 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

METHODS = frozenset({
    hdrs.METH_GET, hdrs.METH_POST, hdrs.METH_DELETE, hdrs.METH_PUT, hdrs.METH_PATCH,
    hdrs.METH_HEAD, hdrs.METH_OPTIONS,
})
OTHER = "other"
# Index by status // 100; anything outside 100..599 (0: no answer at all) is "other".
_STATUS_CLASSES = (OTHER, "1xx", "2xx", "3xx", "4xx", "5xx")
# RFC 6750 §3.1 error codes; "none" when the answer named none.
AUTH_ERROR_CODES = frozenset({"invalid_request", "invalid_token", "insufficient_scope"})
PROBE_RESULTS = ("reachable", "unauthorized", "server_error", "timeout", "unreachable")

# Time to the target's headers: MCP calls run from milliseconds to minutes.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)
# SSE streams live from a single answer to hours.
STREAM_BUCKETS = (0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0,
                  12 * 3600.0, 24 * 3600.0)


class RefreshOutcome(StrEnum):
    """The `outcome` label of token refreshes; other values are counted as "other"."""

    SUCCESS = "success"
    TRANSIENT_ERROR = "transient_error"  # 5xx, 429, network: retried with backoff
    REFUSED = "refused"  # an RFC 6749 error code: the source is invalid until it changes
    OTHER = "other"


def status_class(status: int) -> str:
    """`2xx` … `5xx` (and `1xx`); "other" for anything else, 0 included."""
    index = status // 100
    return _STATUS_CLASSES[index] if 1 <= index <= 5 else OTHER


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


_REQUESTS_HELP = "Client requests answered, by method and status class."
_UPSTREAM_HELP = "Seconds from sending a request to the target until its response headers."
# The `le` label of each upstream bucket, +Inf last (prometheus-client's spelling).
_UPSTREAM_LE = (
    *(floatToGoString(b) for b in UPSTREAM_BUCKETS),  # type: ignore[no-untyped-call]
    "+Inf",
)


def _use_created() -> bool:
    # prometheus-client's switch for `_created` series (PROMETHEUS_DISABLE_CREATED_SERIES
    # or disable_created_metrics()), honoured like its own Counter and Histogram do.
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class _RequestFamilies:
    """The collector of the per-request families, read from `Metrics`' plain counts."""

    def __init__(self, metrics: Metrics, created: float) -> None:
        self._metrics = metrics
        self._created = created

    def describe(self) -> Iterable[Metric]:
        # Names only (for the registry's duplicate check), without reading any count.
        return [CounterMetricFamily(PREFIX + "requests", _REQUESTS_HELP,
                                    labels=("method", "code")),
                HistogramMetricFamily(PREFIX + "upstream_response_seconds", _UPSTREAM_HELP)]

    def collect(self) -> Iterator[Metric]:
        m, created = self._metrics, self._created if _use_created() else None
        requests = CounterMetricFamily(PREFIX + "requests", _REQUESTS_HELP,
                                       labels=("method", "code"))
        for method, counts in m._request_counts.items():
            for code, count in zip(_STATUS_CLASSES, counts, strict=True):
                requests.add_metric((method, code), count, created=created)
        yield requests
        upstream = HistogramMetricFamily(PREFIX + "upstream_response_seconds", _UPSTREAM_HELP)
        cumulative, buckets = 0, []
        for le, count in zip(_UPSTREAM_LE, m._upstream_counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        upstream.add_metric((), buckets, m._upstream_sum)
        if created is not None:
            upstream.samples.append(Sample(upstream.name + "_created", {}, created))
        yield upstream


class Metrics:
    """Every metric of one proxy. Implements `proxy.observe.ForwardObserver`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # Per request: a count per method (every METHODS one and OTHER) and status class
        # (indexed like _STATUS_CLASSES), and the upstream histogram's per-bucket counts
        # (not cumulative; +Inf last) and sum. Read at scrape time by _RequestFamilies,
        # registered first so the families keep their place in the exposition.
        self._request_counts: dict[str, list[int]] = {
            m: [0] * len(_STATUS_CLASSES) for m in (*METHODS, OTHER)
        }
        self._other_counts = self._request_counts[OTHER]
        self._upstream_counts = [0] * (len(UPSTREAM_BUCKETS) + 1)
        self._upstream_sum = 0.0
        r.register(_RequestFamilies(self, time.time()))
        self._open_streams = Gauge(
            PREFIX + "open_streams", "SSE streams open between clients and the target now.",
            registry=r,
        )
        self._stream_lifetime = Histogram(
            PREFIX + "stream_lifetime_seconds", "How long SSE streams stayed open.",
            registry=r, buckets=STREAM_BUCKETS,
        )
        self._episodes = Counter(
            PREFIX + "auth_episodes", "Unauthorized episodes opened.", registry=r,
        )
        self._auth_answers = Counter(
            PREFIX + "auth_answers",
            "401 and 403 answers from the target, by RFC 6750 error code.",
            ("status", "error"), registry=r,
        )
        self._probes = Counter(
            PREFIX + "health_probes", "Health probes of the target, by result.",
            ("result",), registry=r,
        )
        self._refreshes = Counter(
            PREFIX + "token_refreshes", "Outgoing token refreshes, by outcome.",
            ("outcome",), registry=r,
        )
        self._expiry = Gauge(
            PREFIX + "token_expiry_seconds",
            "Seconds until the current outgoing token expires (NaN when unknown).",
            registry=r,
        )
        self._status = Gauge(
            PREFIX + "workload_status", "1 for the workload's current status, 0 for the others.",
            ("status",), registry=r,
        )
        # Bind the children of every closed label set once: counting then only looks a
        # child up.
        self._auth_children = {
            (s, e): self._auth_answers.labels(str(s), e)
            for s in (401, 403) for e in (*AUTH_ERROR_CODES, "none", OTHER)
        }
        self._probe_children = {p: self._probes.labels(p) for p in PROBE_RESULTS}
        self._refresh_children = {o.value: self._refreshes.labels(o.value) for o in RefreshOutcome}
        self._status_children = {s: self._status.labels(s.value) for s in WorkloadStatus}
        self._expires_at: float | None = None
        self._streams: set[int] = set()  # id() of exchanges whose SSE stream is open
        self._expiry.set_function(self._seconds_to_expiry)

    # --- ForwardObserver -----------------------------------------------------------

    # Registered as a forward observer, Metrics counts auth answers and SSE streams from
    # the exchanges themselves: the forwarding path then needs no metrics calls of its
    # own (and must not also call `auth_answer` / `stream_*` for the same answers).

    def on_response(self, exchange: Exchange) -> None:
        headers = exchange.upstream_headers
        if headers is None:
            return  # the proxy's own answer: counted as a request in on_complete
        if exchange.status in (401, 403):
            values = headers.getall(hdrs.WWW_AUTHENTICATE, [])
            self.auth_answer(exchange.status, bearer_error(values).error if values else None)
        # Probes are counted by `probe`; their timings would blur the clients'.
        if exchange.probe:
            return
        seconds = exchange.upstream_seconds
        if seconds is not None:
            # The first bucket whose bound is >= seconds (buckets are `le`); +Inf past all.
            self._upstream_counts[bisect_left(UPSTREAM_BUCKETS, seconds)] += 1
            self._upstream_sum += seconds
        if exchange.sse:
            self._streams.add(id(exchange))
            self.stream_opened()

    def on_complete(self, exchange: Exchange, duration: float, bytes_out: int) -> None:
        if exchange.probe:
            return
        # method_label and status_class, inlined: this runs for every request.
        counts = self._request_counts.get(exchange.method, self._other_counts)
        index = exchange.status // 100
        counts[index if 1 <= index <= 5 else 0] += 1
        # Only a stream this observer saw open is closed: the gauge can never drift.
        if exchange.sse and id(exchange) in self._streams:
            self._streams.discard(id(exchange))
            self.stream_closed(duration)

    # --- called by the other parts -------------------------------------------------

    def probe(self, result: ProbeResult) -> None:
        self._probe_children[result.outcome.value].inc()

    def episode_opened(self) -> None:
        self._episodes.inc()

    def auth_answer(self, status: int, error_code: str | None) -> None:
        """A 401 or 403 from the target; `error_code` is its RFC 6750 `error`, if any."""
        if status not in (401, 403):
            return
        if error_code is None:
            code = "none"
        else:
            code = error_code if error_code in AUTH_ERROR_CODES else OTHER
        self._auth_children[status, code].inc()

    def token_refresh(self, outcome: str) -> None:
        child = self._refresh_children.get(outcome)
        (child or self._refresh_children[RefreshOutcome.OTHER.value]).inc()

    def set_token_expiry(self, seconds: float | None) -> None:
        """The current token expires in `seconds` (None: unknown or never)."""
        self._expires_at = None if seconds is None else time.monotonic() + seconds

    def set_status(self, status: WorkloadStatus) -> None:
        for value, child in self._status_children.items():
            child.set(1 if value == status else 0)

    def stream_opened(self) -> None:
        self._open_streams.inc()

    def stream_closed(self, lifetime_s: float) -> None:
        self._open_streams.dec()
        self._stream_lifetime.observe(lifetime_s)

    # --- exposition ----------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def names(self) -> Iterable[str]:
        """The metric family names this registry exposes."""
        return sorted({m.name for m in self.registry.collect()})

    def _seconds_to_expiry(self) -> float:
        # Counted down at scrape time, so the gauge never shows a stale value.
        if self._expires_at is None:
            return math.nan
        return self._expires_at - time.monotonic()
