"""The HTTP protocol ingest serves with: uvicorn's httptools protocol, except that a request the
key check would refuse without waiting on anything (a missing, malformed or remembered unknown
key; an address, or the strangers' budget, over its limit) is answered from the parser's
callbacks, in one write: no task, no ASGI call, no middleware.

A flood of made-up keys is mostly such requests, and on the ASGI path each cost a worker about
60 microseconds of CPU (a task, the cycle's objects, two writes for head and body). Everything
else (a verified key, a key to read, a pipelined request, an encoded path, Expect: 100-continue)
takes the ASGI path, where api.AuthenticateFirst decides again, the same way. For a key it lets
through to be read, the front door takes the address's token and a stranger's place in the
strangers' budget there and then (KeyCache.screen) and hands what it took on in the scope, so
that no more of a flood gets past it than there are tokens, and none is charged twice.

Refusals never go before real work: once a connection has been refused, its next requests wait
in the worker's StrangersLine, which reads at most PER_TURN of them each turn of the event loop
(their bytes wait beside the connection, up to WAITING_BYTES; beyond that reading pauses).
Without it a loop answering hundreds of flooding connections at once ran every step of a real
request (its task, the broker's acknowledgement, its answer) a whole sweep of refusals later:
the client's p50 went from 6 ms to seconds. A connection that was never refused (a real client)
is read at once, as before; one the app refused (its key read and found unknown) waits in line
like one refused here.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from services.ingest.api import ADMITTED, REFUSED, AuthenticateFirst
from services.ingest.keycache import Admission

WAITING_BYTES = 64 * 1024


class FrontDoor(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._door, self._proxies = _front_of(config.loaded_app)
        self._refused: bytes | None = None
        self._close_after = False
        self._was_refused = False
        self._waiting: list[bytes] | None = None
        self._line = StrangersLine.of(self.loop)

    def data_received(self, data: bytes) -> None:
        if self._waiting is not None:
            self._waiting.append(data)  # behind what already waits: order is kept
            if sum(map(len, self._waiting)) > WAITING_BYTES:
                self.flow.pause_reading()  # a pipelining stranger waits in the kernel instead
        elif self._was_refused:
            self._unset_keepalive_if_required()
            self._waiting = [data]
            self._line.wait(self)
        else:
            super().data_received(data)

    def read_waiting(self) -> None:
        """Its turn in the StrangersLine."""
        waiting, self._waiting = self._waiting or [], None
        if self.parser is None:  # the connection was lost meanwhile
            return
        self._was_refused = False
        super().data_received(b"".join(waiting))
        if self.cycle is None or self.cycle.response_complete:
            self.flow.resume_reading()  # else the response's completion resumes it

    def on_headers_complete(self) -> None:
        screened = self._screen()
        if isinstance(screened, bytes):
            self._refused = screened
            return
        if screened is not None:
            self.scope[ADMITTED] = screened  # type: ignore[literal-required]
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # Refused by the app (a key read and found unknown, a line full): the connection's next
        # request waits in the line too, as after a refusal of the front door's own.
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and REFUSED in cycle.scope:
            self._was_refused = True
        super().on_response_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused is None:
            super().on_message_complete()
            return
        # Answered once the whole request is read, so the next one on the connection parses.
        response, self._refused = self._refused, None
        self._was_refused = True
        self.transport.write(response)
        if self._close_after:
            self.transport.close()
        self.on_response_complete()

    def _screen(self) -> bytes | Admission | None:
        """The refusal to write now, or what the app's key check was given (Admission), or
        None: the app decides alone."""
        if self._door is None or self.expect_100_continue or self.pipeline:
            return None
        if self.cycle is not None and not self.cycle.response_complete:
            return None  # a response is still being written: answers stay in order
        if self.parser.should_upgrade():
            return None
        path = httptools.parse_url(self.url).path
        if b"%" in path or not path.isascii() or self.root_path:
            return None  # the app decodes and prefixes paths: it answers these itself
        authorization = None
        for name, value in self.headers:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        screened = self._door.screen(
            self.parser.get_method().decode("ascii"),
            path.decode("ascii"),
            authorization,
            self._client(),
        )
        if screened is None or isinstance(screened, Admission):
            return screened
        status, headers, body = screened
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        self._close_after = not (
            self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        )
        if self._close_after:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        return b"".join(head)

    def _client(self) -> str | None:
        # What ProxyHeadersMiddleware makes of the address, with uvicorn's own trust rules.
        host = self.client[0] if self.client else None
        if self._proxies is not None and host in self._proxies:
            forwarded = [value for name, value in self.headers if name == b"x-forwarded-for"]
            if forwarded:
                trusted, _ = self._proxies.get_trusted_client_address(
                    b", ".join(forwarded).decode("latin1")
                )
                host = trusted or host
        return host


class StrangersLine:
    """The refused connections' next requests, read PER_TURN at a time, one batch per turn of
    the event loop, so that whatever else is ready runs between two batches."""

    PER_TURN = 16
    _lines: ClassVar[dict[asyncio.AbstractEventLoop, StrangersLine]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: deque[FrontDoor] = deque()
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> StrangersLine:
        line = cls._lines.get(loop)
        if line is None:
            line = cls._lines[loop] = cls(loop)
        return line

    def wait(self, protocol: FrontDoor) -> None:
        self._waiting.append(protocol)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._read_some)

    def _read_some(self) -> None:
        for _ in range(min(self.PER_TURN, len(self._waiting))):
            self._waiting.popleft().read_waiting()
        self._scheduled = bool(self._waiting)
        if self._scheduled:
            self._loop.call_soon(self._read_some)


@functools.cache
def _front_of(app: Any) -> tuple[AuthenticateFirst | None, Any]:
    """Our app inside uvicorn's wrappers, and the trusted proxies if uvicorn reads their headers
    (found once per served app, not at every connection)."""
    proxies = None
    while app is not None:
        if isinstance(app, ProxyHeadersMiddleware):
            proxies = app.trusted_hosts
        if isinstance(app, AuthenticateFirst):
            return app, proxies
        app = getattr(app, "app", None)
    return None, None
