"""Time-ordered UUIDs (version 7): primary keys that keep index inserts local.

One implementation for the server and the client: the client's (it cannot import the server).
"""

from meterline_client.events import uuid7

__all__ = ["uuid7"]
