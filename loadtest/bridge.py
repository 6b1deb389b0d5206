"""An asyncio event loop in a native thread, for Locust's greenlets to run coroutines on.

nats-py is asyncio; Locust runs users as gevent greenlets in a monkey-patched process, where
``threading`` makes greenlets and the default selector is gevent's. So the loop gets a real OS
thread (gevent's original ``start_new_thread``) and the original epoll selector: it never
blocks the greenlets and they never block it. A greenlet hands a coroutine over with
``call_soon_threadsafe`` and sleeps on an ``AsyncResult``; the loop thread wakes it through
the hub's async watcher, the one thread-safe way into gevent's loop (a gevent object set from
another thread is undefined behaviour).
"""

from __future__ import annotations

import asyncio
import collections
import selectors
from collections.abc import Coroutine
from typing import Any

import gevent
import gevent.event
import gevent.monkey

_start_native_thread = gevent.monkey.get_original("_thread", "start_new_thread")
_native_getaddrinfo = gevent.monkey.get_original("socket", "getaddrinfo")
_NativeSelector: type[selectors.BaseSelector] = gevent.monkey.get_original(
    "selectors", "DefaultSelector"
)


class _NativeLoop(asyncio.SelectorEventLoop):
    async def getaddrinfo(
        self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        # The default runs it in a ThreadPoolExecutor, whose patched "threads" are greenlets
        # of this thread's idle hub: it would never return. Resolving inline blocks only this
        # loop, and only while connecting.
        return _native_getaddrinfo(host, port, family, type, proto, flags)


class LoopThread:
    """One asyncio loop in its own OS thread; ``call`` runs a coroutine there from a greenlet."""

    def __init__(self) -> None:
        self.loop = _NativeLoop(_NativeSelector())
        self._finished: collections.deque[tuple[gevent.event.AsyncResult, asyncio.Task]] = (
            collections.deque()
        )
        self._wake = gevent.get_hub().loop.async_()
        self._wake.start(self._deliver)
        _start_native_thread(self._run, ())

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the loop; this greenlet sleeps until it ends, then gets its result
        (or its exception raised)."""
        result = gevent.event.AsyncResult()

        def start() -> None:  # on the loop thread
            task = self.loop.create_task(coro)
            task.add_done_callback(lambda done: self._finish(result, done))

        self.loop.call_soon_threadsafe(start)
        return result.get()

    def _finish(self, result: gevent.event.AsyncResult, task: asyncio.Task) -> None:
        self._finished.append((result, task))  # deque appends are atomic across threads
        self._wake.send()

    def _deliver(self) -> None:  # on the gevent hub; several sends may coalesce into one call
        while self._finished:
            result, task = self._finished.popleft()
            if task.cancelled():
                result.set_exception(asyncio.CancelledError())
            elif task.exception() is not None:
                result.set_exception(task.exception())
            else:
                result.set(task.result())

    def stop(self) -> None:
        """Stop the loop (the thread closes it and exits); pending coroutines are dropped."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._wake.stop()
        self._wake.close()

