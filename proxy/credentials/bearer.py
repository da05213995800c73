"""Bearer token sources: `--bearer-token-file` (watched, re-read when it changes) and
`--bearer-token-env` (read once).

A source never exits the process: a missing or bad file only makes it unavailable
until it heals. It must never log, raise or repr the token.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import CredentialInvalid, CredentialRetrying
from ..log import get_logger
from .base import (
    INVALID_RETRY_AFTER,
    Credential,
    CredentialReporter,
    ReportOnChange,
    cancel_task,
)
from .files import (
    WATCH_INTERVAL,
    FileWatch,
    SecretRead,
    check_secret_text,
    read_secret_file,
    warn_if_shared,
)


class FileBearerSource:
    """`--bearer-token-file`: `Bearer <file contents, stripped>`, re-read when it changes.

    Invalid file contents never stop the proxy: the source reports itself unavailable
    (permanent: only a change of the file heals it) and heals on its own.
    """

    can_refresh = False

    def __init__(self, path: str | Path, *, poll_interval: float = WATCH_INTERVAL) -> None:
        self.path = Path(path)
        self.description = f"token file {self.path}"
        self.fix = f"write a valid token to {self.path}"
        self._poll_interval = poll_interval
        self._watch = FileWatch(self.path)
        self._state = ReportOnChange()
        self._credential: Credential | None = None
        self._version = 0
        self._problem: SecretRead | None = None
        self._warned = False
        self._task: asyncio.Task[None] | None = None

    @property
    def current_version(self) -> int | None:
        return self._credential.version if self._credential else None

    async def start(self, report: CredentialReporter) -> None:
        self._state.attach(report)
        self._reload()
        self._task = asyncio.create_task(self._watch_loop(), name="token-file-watch")

    async def close(self) -> None:
        await cancel_task(self._task)
        self._task = None

    def ready(self) -> Credential | None:
        return self._credential

    async def get(self) -> Credential:
        if self._credential is not None:
            return self._credential
        problem = self._problem
        if problem is None:
            raise CredentialRetrying("CredentialNotStarted", f"{self.description} not loaded")
        raise CredentialInvalid(problem.reason, problem.message, INVALID_RETRY_AFTER)

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        self.check()
        current = self._credential
        return current if current is not None and current.version > used.version else None

    def check(self) -> None:
        """Re-read the file when it may have changed (the watch loop and every 401)."""
        if self._watch.changed():
            self._reload()

    def _reload(self) -> None:
        result = read_secret_file(self.path, "token file")
        self._watch.mark(result.signature)
        if not self._warned:
            self._warned = warn_if_shared(self.path, result.signature, "token file")
        if result.text is None:
            self._credential = None
            self._problem = result
            self._state(False, result.reason, result.message, True)
            return
        authorization = f"Bearer {result.text}"
        if self._credential is None or self._credential.authorization != authorization:
            self._version += 1
            self._credential = Credential(authorization, self._version)
        self._problem = None
        self._state(True, "TokenLoaded", result.message, False)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                self.check()
            except Exception:  # a bug here must not stop watching; never log contents
                get_logger().exception("token_file_check_failed", path=str(self.path))


class EnvBearerSource:
    """`--bearer-token-env`: `Bearer <value, stripped>`, read once at start."""

    can_refresh = False

    def __init__(self, variable: str, environ: Mapping[str, str] | None = None) -> None:
        self.variable = variable
        self.description = f"environment variable {variable}"
        self.fix = f"restart the proxy with a valid token in {variable}"
        self._environ = os.environ if environ is None else environ
        self._credential: Credential | None = None
        self._reason = "TokenEnvMissing"

    @property
    def current_version(self) -> int | None:
        return self._credential.version if self._credential else None

    async def start(self, report: CredentialReporter) -> None:
        text, reason = check_secret_text(self._environ.get(self.variable, "").encode())
        if text is None:
            # Config validation rejects unset/empty, so this is only reached when
            # embedding code changed the environment in between.
            self._reason = "TokenEnvMissing" if reason == "TokenFileEmpty" else "TokenEnvInvalid"
            report(False, self._reason, f"{self.description} is unset, empty or invalid", True)
            return
        self._credential = Credential(f"Bearer {text}", 1)
        report(True, "TokenLoaded", f"token read from {self.description}", False)

    async def close(self) -> None:
        return None

    def ready(self) -> Credential | None:
        return self._credential

    async def get(self) -> Credential:
        if self._credential is None:
            raise CredentialInvalid(
                self._reason, f"{self.description} is unset, empty or invalid",
                INVALID_RETRY_AFTER,
            )
        return self._credential

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        return None
