"""The access event's direct JSON rendering against structlog's own chain.

`AccessLog` skips structlog's processors on the hot path; these tests hold it to writing
exactly the line those processors would (timestamp aside), with the same redaction, and
to stepping aside whenever the chain is not the one `configure()` built.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from proxy import log

FIELDS: dict[str, Any] = dict(method="POST", path="/mcp", status=200, upstream_status=201,
                              duration_ms=12.3, bytes_out=1024, client="127.0.0.1")
_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    saved = structlog.get_config()
    yield buf
    log.flush()
    structlog.configure(**saved)
    log._json_output = None


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    log.flush()
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def _emit(logger: Any, **fields: Any) -> None:
    log.AccessLog(logger)(**fields)


def test_the_line_is_the_one_structlog_writes(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream)
    logger = log.get_logger().bind(workload="w-1", extra={"nested": [1, 2]})
    logger.info("request", **FIELDS)
    _emit(logger, **FIELDS)
    log.flush()
    slow, fast = stream.getvalue().splitlines()
    slow_d, fast_d = json.loads(slow), json.loads(fast)
    assert _ISO.match(fast_d["timestamp"]) and _ISO.match(slow_d["timestamp"])
    # Same keys in the same order, same values: only the clock moved.
    assert list(fast_d) == list(slow_d)
    assert {**fast_d, "timestamp": None} == {**slow_d, "timestamp": None}
    assert fast.split('"timestamp"')[0] == slow.split('"timestamp"')[0]


def test_null_fields_and_escaping(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream)
    logger = log.get_logger().bind(workload='quote"and\\slash')
    _emit(logger, **{**FIELDS, "path": '/a"b\\c\u00e9', "upstream_status": None,
                     "client": None})
    (event,) = _lines(stream)
    assert event["workload"] == 'quote"and\\slash'
    assert event["path"] == '/a"b\\c\u00e9'
    assert event["upstream_status"] is None and event["client"] is None


def test_credentials_in_the_path_or_registered_are_masked(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream)
    secret = "registered-secret-value-1234"
    log.register_secret(secret)
    logger = log.get_logger().bind(workload="w")
    _emit(logger, **{**FIELDS, "path": "/mcp?access_token=abcdef&x=1"})
    _emit(logger, **{**FIELDS, "path": f"/echo/{secret}"})
    log.flush()
    text = stream.getvalue()
    assert "abcdef" not in text and secret not in text
    first, second = _lines(io.StringIO(text))
    assert first["path"] == f"/mcp?access_token={log.REDACTED}&x=1"
    assert second["path"] == f"/echo/{log.REDACTED}"


def test_above_info_nothing_is_written(stream: io.StringIO) -> None:
    log.configure("warning", "json", stream=stream)
    _emit(log.get_logger().bind(workload="w"), **FIELDS)
    assert _lines(stream) == []


def test_console_output_goes_through_structlog(stream: io.StringIO) -> None:
    log.configure("info", "console", stream=stream)
    _emit(log.get_logger().bind(workload="w"), **FIELDS)
    log.flush()
    text = stream.getvalue()
    assert "request" in text and "method=POST" in text and not text.startswith("{")


def test_capture_logs_still_sees_the_event(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream)
    logger = log.get_logger().bind(workload="w")
    with capture_logs() as captured:
        _emit(logger, **FIELDS)
    assert [e["event"] for e in captured] == ["request"]
    assert captured[0]["path"] == "/mcp" and captured[0]["workload"] == "w"
    assert _lines(stream) == []


def test_a_logger_that_is_not_structlog_gets_a_plain_call(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream)
    calls: list[tuple[str, dict[str, Any]]] = []

    class Plain:
        def info(self, event: str, **kw: Any) -> None:
            calls.append((event, kw))

    _emit(Plain(), **FIELDS)
    assert calls == [("request", FIELDS)]
    assert _lines(stream) == []
