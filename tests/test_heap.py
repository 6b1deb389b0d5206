"""What a process loaded stays out of the garbage collector's walks (``common.heap``)."""

from __future__ import annotations

import gc

from common import bus, heap


def _tracked(obj: object) -> bool:
    """Whether a collection walks ``obj`` (``gc.get_objects`` leaves the frozen out)."""
    return any(o is obj for o in gc.get_objects())


def test_freeze_takes_what_exists_out_of_the_walks_and_not_what_comes_after():
    loaded = {"weights": [1.0, 2.0]}
    assert _tracked(loaded)
    assert heap.freeze() >= 1
    assert not _tracked(loaded)
    later = {"request": [3.0]}
    assert _tracked(later)


def test_a_process_main_runs_with_what_it_imported_frozen():
    imported = {"module": ["state"]}

    async def main() -> tuple[bool, bool]:
        made_while_serving = {"task": []}
        return _tracked(imported), _tracked(made_while_serving)

    assert _tracked(imported)
    assert bus.run_async(main()) == (False, True)
