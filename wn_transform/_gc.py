"""Python's cyclic garbage collector, paused for the span of one call."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The collector off inside the block (as ``timeit`` does), back as it was after.

    Tracing and registering thousands of layers allocate millions of objects, and the
    collections they trigger walk every live object: a quarter to a third of the time of
    ``apply_weight_norm(init="preserve")`` on a 300- to 1000-layer MLP.  Nothing is lost: the
    cycles made meanwhile are collected after the block, as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
