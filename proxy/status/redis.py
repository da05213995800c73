"""`RedisStore`: one workload's record shared by its replicas through Redis (`--store`).

Layout (keys share the hash tag `{name}`, so a transaction touches one slot):

    mcp-authproxy:{name}:workload         JSON: target_url, the workload's conditions
                                          (Authenticated, CredentialAvailable, Authorized),
                                          episode_token
    mcp-authproxy:{name}:replica:<id>     JSON: one replica's lifecycle and Reachable,
                                          with a TTL (`replica_ttl`) its heartbeat renews
    mcp-authproxy:{name}:replicas         SET of replica ids (pruned when a key expired)
    mcp-authproxy:workloads               SET of workload names (`status --store`)
    mcp-authproxy:{name}:changed          pub/sub channel: the workload's conditions
                                          changed (the writer's replica id)

A change to the workload's conditions is read-derive-write in a WATCH/MULTI
transaction, through the same `model.apply` the file store uses: of two replicas
opening an episode at once, exactly one transaction flips `Authenticated`, and the
record it returns carries that writer's `episode_token` — which is how the replica that
opened the episode (and only it) knows to call `on_unauthorized`. A replica's own
lifecycle and Reachable live in its own key, written by it alone.

It must never be awaited on the request path (`Workload` writes through its queue), and
never show the store URL's password: errors and logs name `location.display`. Redis
errors become `StateError` at one boundary (`_io`), with one WARN when the store is
lost and one INFO when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

from ..config import StoreLocation
from ..errors import StateError
from ..log import get_logger
from . import model as st
from .store import scrub

PREFIX = "mcp-authproxy"
CONNECT_TIMEOUT = 2.0  # seconds; the writer retries with backoff, so fail fast
COMMAND_TIMEOUT = 2.0
_T = TypeVar("_T")


def workload_key(name: str) -> str:
    return f"{PREFIX}:{{{name}}}:workload"


def replicas_key(name: str) -> str:
    return f"{PREFIX}:{{{name}}}:replicas"


def replica_key(name: str, replica_id: str) -> str:
    return f"{PREFIX}:{{{name}}}:replica:{replica_id}"


def changes_channel(name: str) -> str:
    return f"{PREFIX}:{{{name}}}:changed"


def names_key() -> str:
    return f"{PREFIX}:workloads"


def connect(location: StoreLocation) -> aioredis.Redis:
    """A client that fails fast: the callers retry with their own backoff.

    One immediate retry on a connection error: a pooled connection that died with a
    restarted Redis is reconnected instead of failing the command that found it.
    """
    return aioredis.Redis.from_url(
        location.url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
        retry=Retry(NoBackoff(), 1), health_check_interval=0, client_name=PREFIX,
    )


def new_replica_id() -> str:
    """`<host>-<pid>-<random>`: unique per process even where hosts and pids repeat."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


# --- (de)serialising the two parts ------------------------------------------------------


def _workload_part(record: st.WorkloadRecord) -> bytes:
    return json.dumps({
        "name": record.name,
        "target_url": record.target_url,
        "conditions": [c.to_dict() for c in record.conditions
                       if c.type in st.WORKLOAD_CONDITIONS],
        "episode_token": record.episode_token,
        "updated_at": st.format_time(record.updated_at),
    }).encode()


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _parse_workload(name: str, raw: bytes | str | None) -> st.WorkloadRecord | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return st.WorkloadRecord(
            name=name, lifecycle=st.Lifecycle.SERVING,
            conditions=tuple(st.Condition.from_dict(c) for c in data.get("conditions", ())
                             if c.get("type") in set(map(str, st.WORKLOAD_CONDITIONS))),
            target_url=data.get("target_url"),
            episode_token=data.get("episode_token"),
            updated_at=st.parse_time(data["updated_at"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # foreign or corrupt: the next write replaces it


def _replica_part(replica: st.Replica) -> bytes:
    data = replica.to_dict()
    data["reachable"] = (replica.reachable_condition.to_dict()
                         if replica.reachable_condition else None)
    return json.dumps(data).encode()


def _parse_replica(raw: bytes | str | None) -> st.Replica | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        reachable = data.get("reachable")
        return st.Replica(
            id=str(data["id"]), host=str(data["host"]), pid=int(data["pid"]),
            proxy_url=data.get("proxy_url"), lifecycle=st.Lifecycle(data["lifecycle"]),
            updated_at=st.parse_time(data["updated_at"]),
            reachable_condition=st.Condition.from_dict(reachable) if reachable else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class RedisStore:
    """One replica's handle on its workload's shared record (a `StatusStore`)."""

    shared = True

    def __init__(self, location: StoreLocation, name: str, *, replica_ttl: float,
                 client: aioredis.Redis | None = None, replica_id: str | None = None,
                 logger: Any = None) -> None:
        self.name = name
        self.location = location
        self.client = client if client is not None else connect(location)
        self.replica_id = replica_id or new_replica_id()
        self.host = socket.gethostname()
        self._ttl_ms = max(1, int(replica_ttl * 1000))
        self._logger = logger if logger is not None else get_logger().bind(workload=name)
        self._wkey = workload_key(name)
        self._rkey = replica_key(name, self.replica_id)
        self._skey = replicas_key(name)
        self._channel = changes_channel(name)
        self._pubsub: PubSub | None = None  # hears other replicas' workload changes
        self._replica: st.Replica | None = None  # this replica's entry as it should be
        self._workload: st.WorkloadRecord | None = None  # last read, to re-seed a lost one
        self._available: bool | None = None  # None until the first answer (or failure)
        # Told when the store answers again after a loss (an OAuth source waiting on it).
        self.recovered: list[Callable[[], None]] = []

    # --- the I/O boundary -------------------------------------------------------------

    async def _io(self, action: Callable[[], Awaitable[_T]]) -> _T:
        try:
            result = await action()
        except (RedisError, OSError) as exc:
            if self._available is not False:
                self._available = False
                self._logger.warning("store_unavailable", store=self.location.display,
                                     error=type(exc).__name__,
                                     action="forwarding continues; status kept and written "
                                     "when the store is back")
            raise StateError(f"store {self.location.display} unavailable: "
                             f"{type(exc).__name__}") from exc
        if self._available is False:
            self._available = True
            self._logger.info("store_recovered", store=self.location.display)
            for listener in self.recovered:
                listener()
        self._available = True
        return result

    @property
    def available(self) -> bool:
        return bool(self._available)

    # --- StatusStore --------------------------------------------------------------------

    async def read(self) -> st.WorkloadRecord | None:
        return await self._io(self._snapshot)

    async def update(self, event: st.Event) -> st.WorkloadRecord:
        event = scrub(event)
        if isinstance(event, st.SetCondition) and event.kind in st.WORKLOAD_CONDITIONS:
            return await self._io(lambda: self._change_workload(event))
        return await self._io(lambda: self._change_replica(event))

    async def claim(self, started: st.Started) -> st.WorkloadRecord:
        """Join the workload; with a shared store any number of replicas share a name."""
        self._replica = st.Replica(
            id=self.replica_id, host=self.host, pid=started.pid,
            proxy_url=started.proxy_url, lifecycle=st.Lifecycle.STARTING,
            updated_at=st.now())
        return await self._io(lambda: self._join(started))

    async def heartbeat(self) -> st.WorkloadRecord:
        """Renew this replica's TTL, re-seed a record the store lost, read the record."""
        return await self._io(self._beat)

    async def wait_change(self, timeout: float) -> None:
        """Return after `timeout` s, or as soon as another replica changed the workload's
        conditions (Redis pub/sub), so an episode opened or ended there is seen here at
        once rather than at the next heartbeat. Never raises: errors just wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        mine = self.replica_id.encode()
        try:
            if self._pubsub is None:
                self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(self._channel)
            while (remaining := deadline - loop.time()) > 0:
                message = await self._pubsub.get_message(timeout=remaining)
                if message is not None and message.get("data") != mine:
                    return
        except (RedisError, OSError):
            await self._drop_pubsub()  # subscribed again on the next call
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._drop_pubsub()
        with contextlib.suppress(RedisError, OSError):  # leaving: nothing more to write
            await self.client.aclose()

    # --- operations (each runs inside `_io`) ----------------------------------------------

    async def live(self) -> tuple[st.Replica, ...]:
        """The replicas whose heartbeat has not expired (ids of expired ones pruned)."""
        ids = sorted(_text(i) for i in await self.client.smembers(self._skey))
        if not ids:
            return ()
        raws = await self.client.mget([replica_key(self.name, i) for i in ids])
        gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            await self.client.srem(self._skey, *gone)
        found = (_parse_replica(raw) for raw in raws if raw is not None)
        return tuple(r for r in found if r is not None)

    async def _snapshot(self) -> st.WorkloadRecord:
        """The record from this replica's side: its lifecycle and Reachable, all replicas."""
        workload = _parse_workload(self.name, await self.client.get(self._wkey))
        replicas = await self.live()
        if workload is not None:
            self._workload = workload
        return self._perspective(workload, replicas)

    def _perspective(self, workload: st.WorkloadRecord | None,
                     replicas: tuple[st.Replica, ...]) -> st.WorkloadRecord:
        mine = self._replica
        conditions = list(workload.conditions if workload else ())
        if mine is not None and mine.reachable_condition is not None:
            conditions.append(mine.reachable_condition)
        conditions.sort(key=lambda c: list(st.ConditionType).index(c.type))
        return st.WorkloadRecord(
            name=self.name,
            lifecycle=mine.lifecycle if mine else st.shared_lifecycle(replicas),
            conditions=tuple(conditions),
            pid=mine.pid if mine else None,
            proxy_url=mine.proxy_url if mine else None,
            target_url=workload.target_url if workload else None,
            updated_at=workload.updated_at if workload else st.now(),
            episode_token=workload.episode_token if workload else None,
            replicas=replicas,
        )

    async def _change_workload(self, event: st.SetCondition) -> st.WorkloadRecord:
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._wkey)
                    current = _parse_workload(self.name, await pipe.get(self._wkey))
                    if current is None:
                        current = self._workload or st.WorkloadRecord(
                            name=self.name, lifecycle=st.Lifecycle.SERVING)
                    changed = st.apply(current, event, name=self.name)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(self._wkey, _workload_part(changed))
                    pipe.publish(self._channel, self.replica_id)
                    await pipe.execute()
                    break
                except WatchError:
                    continue  # another replica changed it meanwhile: derive again
        self._workload = changed
        return self._perspective(changed, await self.live())

    async def _join(self, started: st.Started) -> st.WorkloadRecord:
        assert self._replica is not None
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._wkey, self._skey)
                    current = _parse_workload(self.name, await pipe.get(self._wkey))
                    others = await self.live()
                    if current is None or not others:
                        # No live replica: nothing outlives the last one (rule 4: stopping
                        # ends everything), so the workload starts afresh.
                        current = st.WorkloadRecord(name=self.name,
                                                    lifecycle=st.Lifecycle.SERVING)
                    workload = st.WorkloadRecord(
                        name=self.name, lifecycle=st.Lifecycle.SERVING,
                        conditions=current.conditions, target_url=started.target_url,
                        episode_token=current.episode_token)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(self._wkey, _workload_part(workload))
                    pipe.set(self._rkey, _replica_part(self._replica), px=self._ttl_ms)
                    pipe.sadd(self._skey, self.replica_id)
                    pipe.sadd(names_key(), self.name)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        self._workload = workload
        return self._perspective(workload, await self.live())

    async def _change_replica(self, event: st.Event) -> st.WorkloadRecord:
        mine = self._replica
        if mine is None:  # an event before claim (a failed start): nothing to share
            return self._perspective(self._workload, ())
        at = st.now()
        match event:
            case st.Serving(proxy_url=proxy_url):
                lifecycle = (st.Lifecycle.SERVING if mine.lifecycle is st.Lifecycle.STARTING
                             else mine.lifecycle)
                mine = st.Replica(mine.id, mine.host, mine.pid, proxy_url or mine.proxy_url,
                                  lifecycle, at, mine.reachable_condition)
            case st.Stopping():
                mine = _with_lifecycle(mine, st.Lifecycle.STOPPING, at)
            case st.Failed():
                mine = _with_lifecycle(mine, st.Lifecycle.FAILED, at)
            case st.SetCondition(kind=kind, status=status, reason=reason, message=message):
                old = mine.reachable_condition
                since = old.last_transition_time if old and old.status == status else at
                condition = st.Condition(kind, status, reason, message, since)
                mine = st.Replica(mine.id, mine.host, mine.pid, mine.proxy_url,
                                  mine.lifecycle, at, condition)
            case st.Stopped():
                return await self._leave()
            case _:
                pass
        self._replica = mine
        await self._write_replica()
        return await self._snapshot()

    async def _write_replica(self) -> None:
        assert self._replica is not None
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._rkey, _replica_part(self._replica), px=self._ttl_ms)
            pipe.sadd(self._skey, self.replica_id)
            await pipe.execute()

    async def _leave(self) -> st.WorkloadRecord:
        """Stopped: drop this replica; the last one out clears the workload's conditions."""
        assert self._replica is not None
        stopped = _with_lifecycle(self._replica, st.Lifecycle.STOPPED, st.now())
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._rkey)
            pipe.srem(self._skey, self.replica_id)
            await pipe.execute()
        self._replica = None
        replicas = await self.live()
        if not replicas:
            await self._change_workload_to_empty()
        record = self._perspective(self._workload, replicas)
        self._replica = stopped
        return _stopped_view(record)

    async def _change_workload_to_empty(self) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._skey)
                    if await pipe.scard(self._skey):
                        return  # a replica joined meanwhile: its record stays
                    current = self._workload or st.WorkloadRecord(
                        name=self.name, lifecycle=st.Lifecycle.SERVING)
                    empty = st.WorkloadRecord(name=self.name, lifecycle=st.Lifecycle.SERVING,
                                              target_url=current.target_url)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(self._wkey, _workload_part(empty))
                    await pipe.execute()
                    self._workload = empty
                    return
                except WatchError:
                    continue

    async def _beat(self) -> st.WorkloadRecord:
        if self._replica is not None and self._replica.lifecycle is not st.Lifecycle.STOPPED:
            self._replica = _with_lifecycle(self._replica, self._replica.lifecycle, st.now())
            await self._write_replica()
            if self._workload is not None:
                # A store that lost everything (restarted without persistence) gets the
                # record back from what this replica knows; NX: never over a live one.
                await self.client.set(self._wkey, _workload_part(self._workload), nx=True)
                await self.client.sadd(names_key(), self.name)
        return await self._snapshot()


def _with_lifecycle(replica: st.Replica, lifecycle: st.Lifecycle, at: Any) -> st.Replica:
    return st.Replica(replica.id, replica.host, replica.pid, replica.proxy_url, lifecycle,
                      at, replica.reachable_condition)


def _stopped_view(record: st.WorkloadRecord) -> st.WorkloadRecord:
    """This replica's last record: `stopped`, with no condition outliving it."""
    return st.WorkloadRecord(name=record.name, lifecycle=st.Lifecycle.STOPPED,
                             pid=record.pid, proxy_url=record.proxy_url,
                             target_url=record.target_url, updated_at=st.now())


# --- reading for `mcp-authproxy status --store` -----------------------------------------


async def read_shared(location: StoreLocation, name: str | None) -> list[st.WorkloadRecord]:
    """Every workload's shared record (or NAME's), from outside: no replica of its own."""
    client = connect(location)
    try:
        names = [name] if name else sorted(
            _text(n) for n in await client.smembers(names_key()))
        out: list[st.WorkloadRecord] = []
        for each in names:
            store = RedisStore(location, each, replica_ttl=1.0, client=client,
                               replica_id="status-reader")
            workload = _parse_workload(each, await client.get(workload_key(each)))
            replicas = await store.live()
            if workload is None and not replicas:
                continue
            record = store._perspective(workload, replicas)
            serving = [r for r in replicas if r.lifecycle is st.Lifecycle.SERVING]
            first = (serving or list(replicas) or [None])[0]  # type: ignore[list-item]
            out.append(st.WorkloadRecord(
                name=record.name, lifecycle=record.lifecycle, conditions=record.conditions,
                pid=first.pid if first else None,
                proxy_url=first.proxy_url if first else None,
                target_url=record.target_url, updated_at=record.updated_at,
                replicas=replicas))
        return out
    except (RedisError, OSError) as exc:
        raise StateError(f"store {location.display} unavailable: "
                         f"{type(exc).__name__}") from exc
    finally:
        await client.aclose()
