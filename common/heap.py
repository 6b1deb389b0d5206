"""Keep Python's cyclic garbage collector off what a service process loaded for life.

A process of the stack imports its libraries (torch and diffusers alone leave about 340,000
objects the collector tracks) and loads its models once, then serves for hours. Python's
collector walks every tracked object on each full collection: 125 ms with torch and diffusers
imported, on this project's development host, during which the process's event loop stands
still. The process that hosts the emulated cluster's eight device hosts made five such pauses
in a 30 s replay (the longest 131 ms), each holding every device's next step, fetch and
result; the gateway's reached 56 ms.

``freeze`` moves every object tracked now into the collector's permanent generation
(``gc.freeze``), so later collections walk only what was made since. Call it once a process
has loaded what it keeps: at the start of its main coroutine (``common.bus.run_async``, after
one collection so that no garbage is frozen) and when a model has been loaded
(``services.host.DeviceHost.run_pool``, without a collection: that process is serving). A
frozen object that later loses its last reference is still freed at once; only a reference
cycle among frozen objects is never collected, the price of a pause-free heap.
"""

from __future__ import annotations

import gc


def freeze(*, collect: bool = False) -> int:
    """Take what is tracked now out of the collector's walks (after one full collection when
    ``collect``: at a process's start, where a pause costs nothing); the objects frozen so
    far."""
    if collect:
        gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
