"""Python's cyclic garbage collector in ownllm's own processes.

Importing torch, transformers and peft creates about two million objects, and at Python's default thresholds the
collector runs ~1,100 times while they load (7 of them full collections over everything loaded so far): ~0.9 of
the ~4.5 CPU-seconds those imports take. What an import creates lives as long as the process, so those collections
free nothing. A process's start-up therefore imports with the collector off and then freezes what it imported
(`gc.freeze`: later collections skip it; a paused collector alone would only defer the scans). A CLI verb that
loads a model pauses it first thing (`pause_for_start_up`: free, so a verb that ends early pays nothing) and the
model's load resumes it (`start_up_done`); a worker process imports what it needs at once (`import_at_start`). A
server then keeps what it loaded for its whole life: `freeze_heap` takes that out of every later collection too (as
vLLM's `freeze_gc_heap` does), so a full collection in the middle of a decode step scans only what requests created.

The few thousand objects of reference cycles the imports leave behind stay allocated: a collection to free them
would cost a third of what the pause saves, and would not lower the peak (the default model's `generate`: 751 MB
peak RSS against 725 MB without the pause, 746 MB with that collection).
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from contextlib import contextmanager

_paused_for_start_up = False  # set by pause_for_start_up until start_up_done (or freeze_heap)


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off inside the block (reference counting still frees everything else), back on after
    it if it was on before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def import_at_start(*modules: str) -> None:
    """Import `modules` (dotted names) with the collector paused, then freeze every object alive. For a process's
    start-up (a worker), never a library call."""
    with collector_paused():
        for name in modules:
            importlib.import_module(name)
        gc.freeze()


def pause_for_start_up() -> None:
    """Turn the collector off until `start_up_done`: for a CLI verb about to import the model libraries and load a
    model (if it ends before that, nothing was spent)."""
    global _paused_for_start_up
    if gc.isenabled():
        gc.disable()
        _paused_for_start_up = True


def start_up_done() -> None:
    """Called where the model libraries are imported and, as a rule, no model is loaded yet (the start of every
    loader: models, tokenizers, heads, pulls): if `pause_for_start_up` turned the collector off, freeze what is
    alive and turn it back on. Otherwise nothing: a process that never paused (a library user's) is left as it is,
    and so is every later load."""
    if _paused_for_start_up:
        gc.freeze()
        end_start_up_pause()


def end_start_up_pause() -> None:
    """Turn the collector back on if `pause_for_start_up` turned it off and nothing ended the pause (a verb that
    loaded no model, or failed first), freezing nothing: for the CLI's own exit, and its callers in process."""
    global _paused_for_start_up
    if _paused_for_start_up:
        _paused_for_start_up = False
        gc.enable()


def freeze_heap() -> None:
    """Collect everything once (the frozen start-up objects too, in case a model loaded before the freeze left
    garbage there), then move every object alive now into the permanent generation, which later collections skip,
    and turn the collector back on if start-up paused it. For a process about to serve for long after its start-up,
    never for a library call: a frozen object that later becomes unreachable through a reference cycle is never
    freed (reference counting still frees the others)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    end_start_up_pause()
