"""The cyclic garbage collector's settings for long-running processes.

A process that has started (imported its modules, built its engine, consumer and caches) holds
objects that live as long as it does; every full pass of the collector rescans them all.
`settle()` freezes them out of those passes. A process that works in large batches may also
raise the young generation's threshold: an aggregator batch allocates a few hundred thousand
container objects (its events, their properties, the statements' parameters) that all live
until the batch ends, so with the default threshold of 700 the collector ran hundreds of young
passes per batch, promoted the whole batch generation by generation and finished with full
passes over it, none of which found garbage: reference counting frees the batch when it ends.
"""

from __future__ import annotations

import gc


def settle(young_threshold: int | None = None) -> None:
    """Collect, then freeze what is left out of the collector's passes; optionally set the
    number of allocations (less deallocations) that starts a young pass."""
    gc.collect()  # what is garbage already goes first: frozen, it would stay for good
    gc.freeze()
    if young_threshold is not None:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(young_threshold, middle, old)
