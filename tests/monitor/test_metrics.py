"""Prometheus metrics: what a scrape shows after the other parts report to `Metrics`."""

from __future__ import annotations

import math

import pytest
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.forwarding.observe import Exchange
from proxy.monitor.health import ProbeOutcome, ProbeResult
from proxy.monitor.metrics import Metrics, RefreshOutcome, method_label, status_class
from proxy.status.model import WorkloadStatus

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    """Parse the text exposition the way a Prometheus server would."""
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _exchange(method: str = "POST", status: int = 200, *, probe: bool = False,
              upstream: float | None = 0.02, sse: bool = False,
              headers: dict[str, str] | None = None) -> Exchange:
    """An exchange the target answered (`upstream=None`: the proxy answered itself)."""
    answered = CIMultiDictProxy(CIMultiDict(headers or {})) if upstream is not None else None
    return Exchange(method=method, path="/mcp", on_mcp_path=True, status=status,
                    upstream_headers=answered, upstream_seconds=upstream, probe=probe, sse=sse)


@pytest.mark.parametrize(
    ("status", "label"),
    [(100, "1xx"), (200, "2xx"), (204, "2xx"), (302, "3xx"), (401, "4xx"), (499, "4xx"),
     (502, "5xx"), (599, "5xx"), (0, "other"), (99, "other"), (600, "other")],
)
def test_status_class(status: int, label: str) -> None:
    """Requests are grouped by status class, and odd codes cannot grow the label set."""
    assert status_class(status) == label


def test_method_label_is_bounded() -> None:
    """A client inventing HTTP methods cannot grow the metrics without bound."""
    assert method_label("POST") == "POST"
    assert method_label("BREW") == "other"
    assert method_label("post") == "other"


def test_scrape_shows_every_family() -> None:
    """A scrape after each kind of report shows it under an mcp_authproxy_ name."""
    m = Metrics()
    for exchange in (_exchange("POST", 200), _exchange("POST", 202), _exchange("GET", 401),
                     _exchange("BREW", 503), _exchange("DELETE", 0, upstream=None)):
        m.on_response(exchange)
        m.on_complete(exchange, duration=0.1, bytes_out=10)
    m.probe(ProbeResult(ProbeOutcome.REACHABLE, 200, "the target answered 200", notify=True))
    m.probe(ProbeResult(ProbeOutcome.TIMEOUT, None, "no answer", notify=False))
    m.probe(ProbeResult(ProbeOutcome.TIMEOUT, None, "no answer", notify=False))
    m.episode_opened()
    m.auth_answer(401, "invalid_token")
    m.auth_answer(401, None)
    m.auth_answer(403, "insufficient_scope")
    m.auth_answer(401, "made_up_by_target")
    m.auth_answer(200, None)  # not an auth answer: ignored
    m.token_refresh(RefreshOutcome.SUCCESS)
    m.token_refresh("transient_error")
    m.token_refresh("something new")
    m.set_token_expiry(120.0)
    m.set_status(WorkloadStatus.UNAUTHENTICATED)
    m.stream_opened()
    m.stream_opened()
    m.stream_closed(3.5)

    s = scrape(m)
    assert value(s, "mcp_authproxy_requests_total", method="POST", code="2xx") == 2
    assert value(s, "mcp_authproxy_requests_total", method="GET", code="4xx") == 1
    assert value(s, "mcp_authproxy_requests_total", method="other", code="5xx") == 1
    assert value(s, "mcp_authproxy_requests_total", method="DELETE", code="other") == 1
    assert value(s, "mcp_authproxy_upstream_response_seconds_count") == 4
    assert value(s, "mcp_authproxy_upstream_response_seconds_bucket", le="0.025") == 4
    assert value(s, "mcp_authproxy_health_probes_total", result="reachable") == 1
    assert value(s, "mcp_authproxy_health_probes_total", result="timeout") == 2
    assert value(s, "mcp_authproxy_health_probes_total", result="unreachable") == 0
    assert value(s, "mcp_authproxy_auth_episodes_total") == 1
    assert value(s, "mcp_authproxy_auth_answers_total", status="401", error="invalid_token") == 1
    # One from auth_answer(401, None), one from the observed GET answered 401.
    assert value(s, "mcp_authproxy_auth_answers_total", status="401", error="none") == 2
    assert value(s, "mcp_authproxy_auth_answers_total", status="401", error="other") == 1
    assert value(s, "mcp_authproxy_auth_answers_total", status="403",
                 error="insufficient_scope") == 1
    assert value(s, "mcp_authproxy_token_refreshes_total", outcome="success") == 1
    assert value(s, "mcp_authproxy_token_refreshes_total", outcome="transient_error") == 1
    assert value(s, "mcp_authproxy_token_refreshes_total", outcome="other") == 1
    assert 100 < value(s, "mcp_authproxy_token_expiry_seconds") <= 120
    assert value(s, "mcp_authproxy_open_streams") == 1
    assert value(s, "mcp_authproxy_stream_lifetime_seconds_count") == 1
    assert value(s, "mcp_authproxy_stream_lifetime_seconds_sum") == 3.5
    statuses = {dict(k[1])["status"]: v for k, v in s.items()
                if k[0] == "mcp_authproxy_workload_status"}
    assert statuses == {w.value: (1.0 if w is WorkloadStatus.UNAUTHENTICATED else 0.0)
                        for w in WorkloadStatus}


def test_status_gauge_moves() -> None:
    """The workload status gauge shows exactly one status at a time as it changes."""
    m = Metrics()
    m.set_status(WorkloadStatus.RUNNING)
    m.set_status(WorkloadStatus.UNHEALTHY)
    s = scrape(m)
    assert value(s, "mcp_authproxy_workload_status", status="unhealthy") == 1
    assert value(s, "mcp_authproxy_workload_status", status="running") == 0


def test_probes_are_not_client_requests() -> None:
    """Health probes show in the probe counter only, not as client traffic."""
    m = Metrics()
    probe = _exchange(probe=True)
    m.on_response(probe)
    m.on_complete(probe, duration=0.1, bytes_out=0)
    s = scrape(m)
    assert value(s, "mcp_authproxy_requests_total", method="POST", code="2xx") == 0
    assert value(s, "mcp_authproxy_upstream_response_seconds_count") == 0


def test_token_expiry_unknown_is_nan() -> None:
    """With no known expiry the gauge says NaN rather than a misleading number."""
    m = Metrics()
    assert math.isnan(value(scrape(m), "mcp_authproxy_token_expiry_seconds"))
    m.set_token_expiry(30)
    m.set_token_expiry(None)
    assert math.isnan(value(scrape(m), "mcp_authproxy_token_expiry_seconds"))


def test_registries_are_per_proxy() -> None:
    """Two proxies in one process keep separate counts and never touch the global registry."""
    a, b = Metrics(), Metrics()
    a.episode_opened()
    assert value(scrape(a), "mcp_authproxy_auth_episodes_total") == 1
    assert value(scrape(b), "mcp_authproxy_auth_episodes_total") == 0
    assert not any(m.name.startswith("mcp_authproxy") for m in REGISTRY.collect())
    assert "mcp_authproxy_requests" in a.names()


def test_observed_exchanges_count_auth_answers_and_streams() -> None:
    """Registered as an observer, Metrics counts 401/403s and SSE streams on its own."""
    m = Metrics()
    challenge: dict[str, str] = {hdrs.WWW_AUTHENTICATE: 'Bearer realm="x", error="invalid_token"'}
    unauthorized = _exchange("POST", 401, headers=challenge)
    probe_401 = _exchange("POST", 401, headers=challenge, probe=True)
    stream = _exchange("GET", 200, sse=True)
    own_503 = _exchange("POST", 503, upstream=None)
    for ex in (unauthorized, probe_401, stream, own_503):
        m.on_response(ex)
    s = scrape(m)
    assert value(s, "mcp_authproxy_auth_answers_total", status="401", error="invalid_token") == 2
    assert value(s, "mcp_authproxy_open_streams") == 1
    for ex in (unauthorized, probe_401, stream, own_503):
        m.on_complete(ex, duration=42.0, bytes_out=100)
    s = scrape(m)
    assert value(s, "mcp_authproxy_open_streams") == 0
    assert value(s, "mcp_authproxy_stream_lifetime_seconds_sum") == 42.0
    assert value(s, "mcp_authproxy_requests_total", method="POST", code="4xx") == 1
    assert value(s, "mcp_authproxy_requests_total", method="POST", code="5xx") == 1
    assert value(s, "mcp_authproxy_requests_total", method="GET", code="2xx") == 1


def _families(text: str) -> dict[str, list[tuple[str, tuple[tuple[str, str], ...], float]]]:
    """Each family's samples in exposition order (`_created` values left out: timestamps)."""
    return {
        family.name: [(s.name, tuple(sorted(s.labels.items())),
                       math.nan if s.name.endswith("_created") else s.value)
                      for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_request_families_scrape_like_prometheus_client_objects() -> None:
    """The per-request families (plain counts behind a collector) show exactly what
    prometheus-client's Counter and Histogram show for the same traffic: names, types,
    help, every label child (zeros too), `le` buckets, _count, _sum and _created."""
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.exposition import generate_latest

    from proxy.monitor.metrics import METHODS, OTHER, UPSTREAM_BUCKETS

    reference = CollectorRegistry()
    requests = Counter("mcp_authproxy_requests",
                       "Client requests answered, by method and status class.",
                       ("method", "code"), registry=reference)
    upstream = Histogram("mcp_authproxy_upstream_response_seconds",
                         "Seconds from sending a request to the target until its response "
                         "headers.", registry=reference, buckets=UPSTREAM_BUCKETS)
    for method in (*METHODS, OTHER):
        for code in ("other", "1xx", "2xx", "3xx", "4xx", "5xx"):
            requests.labels(method, code)

    m = Metrics()
    # Bounds themselves (buckets are `le`), between bounds, zero, past the last bound.
    timings = [0.0, 0.005, 0.0051, 0.01, 0.3, 1.0, 2.5000001, 300.0, 300.5, 4000.0]
    traffic = [("POST", 200), ("GET", 404), ("BREW", 503), ("post", 201), ("DELETE", 0),
               ("PUT", 700), ("OPTIONS", 101), ("PATCH", 302), ("HEAD", 599), ("POST", 200)]
    for (method, status), seconds in zip(traffic, timings, strict=True):
        ex = _exchange(method, status, upstream=seconds)
        m.on_response(ex)
        m.on_complete(ex, duration=1.0, bytes_out=1)
        requests.labels(method_label(method), status_class(status)).inc()
        upstream.observe(seconds)
    own = _exchange("GET", 502, upstream=None)  # the proxy's own answer: no timing
    m.on_response(own)
    m.on_complete(own, duration=0.0, bytes_out=0)
    requests.labels("GET", "5xx").inc()

    ours = _families(m.render().decode())
    theirs = _families(generate_latest(reference).decode())
    for name in ("mcp_authproxy_requests", "mcp_authproxy_upstream_response_seconds"):
        assert sorted(ours[name]) == sorted(theirs[name]), name
    # HELP and TYPE lines too (the sample lines differ only in their _created stamps).
    text = m.render().decode()
    for line in generate_latest(reference).decode().splitlines():
        if line.startswith("#"):
            assert line in text


def test_upstream_histogram_is_cumulative_with_count_and_sum() -> None:
    """Buckets count every timing at or below their bound; +Inf and _count count all."""
    m = Metrics()
    timings = [0.004, 0.005, 0.02, 0.02, 0.7, 301.0]
    for seconds in timings:
        ex = _exchange(upstream=seconds)
        m.on_response(ex)
        m.on_complete(ex, duration=seconds, bytes_out=0)
    s = scrape(m)
    name = "mcp_authproxy_upstream_response_seconds"
    assert value(s, name + "_bucket", le="0.005") == 2  # 0.005 itself is in le="0.005"
    assert value(s, name + "_bucket", le="0.01") == 2
    assert value(s, name + "_bucket", le="0.025") == 4
    assert value(s, name + "_bucket", le="1.0") == 5
    assert value(s, name + "_bucket", le="300.0") == 5
    assert value(s, name + "_bucket", le="+Inf") == 6
    assert value(s, name + "_count") == 6
    assert value(s, name + "_sum") == pytest.approx(sum(timings))
    buckets = [v for (n, _), v in s.items() if n == name + "_bucket"]
    assert buckets == sorted(buckets)
    assert (name + "_created", ()) in s


def test_created_series_follow_prometheus_client_switch() -> None:
    """disable_created_metrics() drops _created from the per-request families too."""
    from prometheus_client import disable_created_metrics, enable_created_metrics

    # prometheus_client (py.typed) leaves these two functions unannotated
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        names = {n for n, _ in scrape(Metrics())}
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]
    assert "mcp_authproxy_requests_total" in names
    assert not any(n.endswith("_created") for n in names)
    assert "mcp_authproxy_requests_created" in {n for n, _ in scrape(Metrics())}
