"""Reading an HTTP request body with a size bound, for every endpoint that takes one.

The bound holds before anything is buffered: a declared Content-Length over it is refused without
reading a byte, and a body streamed without one (chunked) is refused as soon as it passes the
bound, so memory never holds more than the bound plus one chunk.
"""

from __future__ import annotations

from starlette.requests import Request

from shared.errors import PayloadTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or PayloadTooLarge (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
