"""Replicas on a shared store: follow the other replicas' commits.

Every replica serves both APIs from its in-memory view of the deployment. Writes are
compare-and-set commits conditioned on the revision that view was read at
(:meth:`marblekeep.service.Coordinator.commit`): a replica whose view is stale loses the
compare, re-reads and computes again, so no write is lost or applied twice. Reads are served
from the view, which a :class:`Follower` keeps fresh: it watches the store's revision (an etcd
watch) and has the Coordinator take every commit of another replica, in commit order: the records
changed since its view in one read, applied as they are when only counts changed, the whole state
re-read otherwise (each sync covers every commit up to the revision it read; a watch that falls
behind etcd's compaction simply syncs). docs/ha.md states the read freshness this gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from marblekeep.errors import MarbleKeepError

__all__ = ["CONFLICT_RETRIES", "BackgroundLoop", "Follower", "Watchable"]

log = logging.getLogger("marblekeep.replica")

#: How often a write that lost the compare-and-set against another replica is computed again.
CONFLICT_RETRIES = 16


class Watchable(Protocol):
    """A store that can report revision changes (the etcd backend)."""

    def watch_head(self, after: int) -> AsyncIterator[int]: ...


class BackgroundLoop:
    """One asyncio task running :meth:`_run` from :meth:`start` until :meth:`stop`."""

    _task_name = "marblekeep-loop"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._task_name)

    async def _run(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Follower(BackgroundLoop):
    """Calls ``sync(revision)`` whenever the shared store's revision moves past the replica's view."""

    _task_name = "marblekeep-follower"

    def __init__(
        self, store: Watchable, sync: Callable[[int], Awaitable[object]], revision: Callable[[], int]
    ) -> None:
        self._store = store
        self._sync = sync
        self._revision = revision
        #: Set after each sync attempt (tests and the bench wait on it).
        self.synced = asyncio.Event()
        #: The newest store revision the watch reported (a writer whose view is older syncs before
        #: computing its change instead of losing its compare-and-set).
        self.seen = 0

    async def _run(self) -> None:
        while True:
            try:
                async for revision in self._store.watch_head(self._revision()):
                    self.seen = max(self.seen, revision)
                    if revision > self._revision():
                        await self._sync(revision)
                    self.synced.set()
                return
            except asyncio.CancelledError:
                raise
            except MarbleKeepError as exc:
                log.error("cannot follow the other replicas' commits", extra={"reason": exc.message})
            except Exception as exc:  # a bug: its type only (its text or traceback might hold data)
                log.error("the replica follower failed; restarting it", extra={"error": type(exc).__name__})
            await asyncio.sleep(1.0)
