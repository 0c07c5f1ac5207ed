"""The clients alive in this process: flushed at interpreter exit, reset in a forked child.

The registry holds clients strongly until they are closed, so a client with buffered events is
never garbage-collected unsent; close() (or `with`) takes it out.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Protocol

logger = logging.getLogger("meterline_client")


class ProcessBound(Protocol):
    def _close_at_exit(self) -> None: ...

    def _after_fork_in_child(self) -> None: ...


_live: set[ProcessBound] = set()
_lock = threading.Lock()


def register(client: ProcessBound) -> None:
    with _lock:
        _live.add(client)


def forget(client: ProcessBound) -> None:
    with _lock:
        _live.discard(client)


def _close_all_at_exit() -> None:
    with _lock:
        clients = list(_live)
    for client in clients:
        try:
            client._close_at_exit()
        except Exception:
            logger.exception("meterline_client_exit_flush_failed")


def _after_fork() -> None:
    # The child gets copies of the parent's locks (perhaps held) and buffers (the parent sends
    # those): each client starts afresh, with nothing buffered.
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()
    for client in list(_live):
        client._after_fork_in_child()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
