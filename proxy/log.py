"""structlog configuration, and redaction of anything that could carry a credential.

Nothing configures logging at import time: `configure()` is called by the CLI (and by
`AuthProxy` when asked). Every event passes `redact` last-but-one, so a credential that
slipped into an event (a header dict, a URL with a token query) is masked before it is
rendered.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from json import dumps as _json_dumps
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, TextIO

import structlog
from yarl import URL

REDACTED = "<redacted>"
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
SENSITIVE_KEYS = frozenset(
    {"authorization", "proxy_authorization", "token", "access_token", "refresh_token",
     "client_secret", "password", "secret", "cookie", "credential", "id_token", "code"}
)
_TOKENISH_QUERY = re.compile(
    r"(?i)((?:access_|refresh_|id_)?token|key|secret|password|code|sig|signature|auth\w*)="
    r"[^&\s\"']*"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


# Credentials in use, masked wherever they show up: a careless target may quote the token
# back (in an error_description, say), where no pattern would recognise it. A tuple, so
# threads writing status files read a consistent snapshot while the loop registers more.
_known_secrets: tuple[str, ...] = ()
_KNOWN_SECRETS_KEPT = 16  # rotated-out tokens stay masked for a while, not forever
MIN_SECRET_LENGTH = 8  # shorter values would mask ordinary words


def register_secret(value: str) -> None:
    """Mask `value` in every log event and status message from now on (process-wide)."""
    global _known_secrets
    value = value.strip()
    if len(value) >= MIN_SECRET_LENGTH and value not in _known_secrets:
        _known_secrets = (*_known_secrets, value)[-_KNOWN_SECRETS_KEPT:]


def mask_known_secrets(text: str) -> str:
    """`text` with every registered credential replaced by the redaction marker."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


_MAY_HOLD_SECRET = re.compile(r"[\s=]")
_BEARER_MASK = r"\1 " + REDACTED
_TOKENISH_MASK = r"\1=" + REDACTED
_SENSITIVE_KEY_CACHE: dict[str, bool] = {}


def redact_text(text: str) -> str:
    """Mask known credentials, bearer/basic values and token-like query values in text."""
    if _known_secrets:
        text = mask_known_secrets(text)
    # Both patterns need a blank or an "=": one cheap search spares most values (paths,
    # methods, addresses) the two substitutions. Logging runs once per request.
    if _MAY_HOLD_SECRET.search(text) is None:
        return text
    text = _BEARER.sub(_BEARER_MASK, text)
    return _TOKENISH_QUERY.sub(_TOKENISH_MASK, text)


def redact_url(url: str | URL) -> str:
    """A URL with every query value masked (target URLs may carry API keys)."""
    u = URL(url) if isinstance(url, str) else url
    if not u.query_string:
        return str(u.with_user(None).with_password(None)) if u.user else str(u)
    base = str(u.with_user(None).with_password(None).with_query(None).with_fragment(None))
    return base + "?" + "&".join(f"{k}={REDACTED}" for k in u.query)


def _sensitive_key(key: str) -> bool:
    known = _SENSITIVE_KEY_CACHE.get(key)
    if known is None:
        low = key.lower()
        known = low in SENSITIVE_KEYS or low in SENSITIVE_HEADERS
        if len(_SENSITIVE_KEY_CACHE) < 1024:  # keys come from code, not from clients
            _SENSITIVE_KEY_CACHE[key] = known
    return known


def _redact_value(key: str, value: Any) -> Any:
    if _sensitive_key(key):
        return REDACTED
    kind = type(value)
    if kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(key, value)
    return event_dict


def configure(level: str = "info", fmt: str | None = None, stream: TextIO | None = None) -> None:
    global _json_output
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    levelno = logging.getLevelNamesMapping()[level.upper()]
    _json_output = (
        _JsonOutput(renderer, levelno, _CoalescingWriter.for_stream(stream))
        if fmt == "json" else None
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=_CoalescingWriter.factory(stream),
        cache_logger_on_first_use=True,
    )


class _CoalescingWriter:
    """A structlog logger writing each line at once, but one write per loop iteration.

    Under load many requests end in the same event-loop iteration; their access-log
    lines go out in one `write` scheduled with `call_soon` instead of one flushed
    `print` each (a system call per request). Nothing waits longer than the current
    iteration, and outside a running loop (start-up, threads, exit) lines are written
    straight away.
    """

    _by_stream: dict[int, _CoalescingWriter] = {}

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled = False

    @classmethod
    def for_stream(cls, stream: TextIO) -> _CoalescingWriter:
        writer = cls._by_stream.get(id(stream))
        if writer is None or writer._stream is not stream:
            writer = cls._by_stream[id(stream)] = cls(stream)
            atexit.register(writer.flush)
        return writer

    @classmethod
    def factory(cls, stream: TextIO) -> Callable[..., _CoalescingWriter]:
        writer = cls.for_stream(stream)
        return lambda *args: writer

    def msg(self, message: str) -> None:
        self._pending.append(message)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    log = debug = info = warn = warning = err = error = critical = exception = msg
    failure = fatal = msg

    def flush(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop serving
            pass


def flush() -> None:
    """Write out every log line still waiting for the end of a loop iteration."""
    for writer in list(_CoalescingWriter._by_stream.values()):
        writer.flush()


def get_logger(name: str = "mcp_authproxy") -> Any:
    return structlog.get_logger(name)


# --- the access event -----------------------------------------------------------------

class _JsonOutput:
    """What `configure()` set up for JSON lines: the renderer ending the chain, the level,
    the writer. The access event is rendered straight to this while that renderer is
    still the configured chain's last step (`capture_logs` and re-configuration swap it)."""

    __slots__ = ("level", "renderer", "writer")

    def __init__(self, renderer: Any, level: int, writer: _CoalescingWriter) -> None:
        self.renderer = renderer
        self.level = level
        self.writer = writer


_json_output: _JsonOutput | None = None
_METHODS = frozenset({"GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH"})


class AccessLog:
    """The one log event per request: `request`, with method, path, status and timing.

    It runs on every request, so with JSON output it skips structlog's processor chain
    (a chain of generic calls per event, costly at this rate) and writes the line those
    processors would: the logger's bound context, the fields, `event`, `level` and a
    UTC ISO `timestamp`, in that order, with the same redaction (bearer/basic values
    and token-like query values in the path, registered credentials anywhere in the
    line). Console output, a test's `capture_logs`, or a logger that is not structlog's
    go through `logger.info` as before.
    """

    __slots__ = ("_context_for", "_logger", "_prefix", "_second", "_stamp")

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self._prefix: str | None = None  # the rendered bound context, e.g. '{"workload": "x", '
        self._context_for: Any = None  # the renderer `_prefix` was made for
        self._second = -1
        self._stamp = ""

    def __call__(self, method: str, path: str, status: int, upstream_status: int | None,
                 duration_ms: float, bytes_out: int, client: str | None) -> None:
        out = _json_output
        if out is None or not self._fast(out):
            self._logger.info(
                "request", method=method, path=path, status=status,
                upstream_status=upstream_status, duration_ms=duration_ms,
                bytes_out=bytes_out, client=client,
            )
            return
        if out.level > logging.INFO:
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = (
            f'{self._prefix}"method": '
            f'{_json_str(method if method in _METHODS else redact_text(method))}, '
            f'"path": {_json_str(redact_text(path))}, "status": {status}, '
            f'"upstream_status": {"null" if upstream_status is None else upstream_status}, '
            f'"duration_ms": {duration_ms!r}, "bytes_out": {bytes_out}, '
            f'"client": {"null" if client is None else _json_str(client)}, '
            f'"event": "request", "level": "info", '
            f'"timestamp": "{self._stamp}.{int((now - second) * 1e6):06d}Z"}}'
        )
        if _known_secrets:
            line = mask_known_secrets(line)
        out.writer.msg(line)

    def _fast(self, out: _JsonOutput) -> bool:
        processors = structlog.get_config()["processors"]
        if not processors or processors[-1] is not out.renderer:
            return False
        if self._context_for is not out.renderer:
            try:
                context = dict(structlog.get_context(self._logger))
            except AttributeError:  # not a structlog logger: always the slow way
                return False
            context = dict(redact(None, "", context))
            rendered = _json_dumps(context, default=repr)
            self._prefix = rendered[:-1] + ", " if context else "{"
            self._context_for = out.renderer
        return True
