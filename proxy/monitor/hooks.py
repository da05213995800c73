"""`--on-unauthorized-exec`: a command run when an unauthorized episode begins.

The event goes to the command as JSON in `MCP_AUTHPROXY_EVENT` (no shell, no argument
built from it); its output goes to stderr, since stdout carries only the proxy's URL
line. It must never stop the proxy (a command that cannot start or fails is logged) and
never outlive it: cancelled when the proxy stops, its child gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import subprocess

from ..log import get_logger
from .auth import UnauthorizedCallback, UnauthorizedEvent

EVENT_ENV = "MCP_AUTHPROXY_EVENT"
# A child still running when the proxy stops gets SIGTERM, then SIGKILL after this many
# seconds: no hook outlives the proxy that started it.
CHILD_GRACE = 2.0


def exec_callback(command: str) -> UnauthorizedCallback:
    """`--on-unauthorized-exec`: run `command` (no shell) with the event as JSON in env.

    The command's output goes to stderr: stdout carries only the proxy's URL line.
    A command that cannot start or exits non-zero is logged; it never stops the proxy.
    """
    argv = shlex.split(command)
    if not argv:
        raise ValueError("on_unauthorized_exec: must name a command")
    logger = get_logger()

    async def run(event: UnauthorizedEvent) -> None:
        env = dict(os.environ)
        env[EVENT_ENV] = json.dumps(event.to_dict())
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=subprocess.DEVNULL, stdout=2, stderr=2)
        except OSError as exc:
            logger.warning("on_unauthorized_exec_failed", workload=event.workload,
                           command=argv[0], error=exc.strerror or str(exc))
            return
        try:
            code = await proc.wait()
        except asyncio.CancelledError:
            # The proxy is stopping: the hook does not outlive it.
            await _stop_child(proc)
            logger.warning("on_unauthorized_exec_stopped", workload=event.workload,
                           command=argv[0], exit_code=proc.returncode)
            raise
        if code != 0:
            logger.warning("on_unauthorized_exec_failed", workload=event.workload,
                           command=argv[0], exit_code=code)
        else:
            logger.info("on_unauthorized_exec_done", workload=event.workload, command=argv[0])

    return run


async def _stop_child(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after CHILD_GRACE; reaped either way."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), CHILD_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
