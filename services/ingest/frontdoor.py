"""The HTTP protocol ingest serves with: uvicorn's httptools protocol, except that a request the
key check would refuse without waiting on anything (a missing, malformed or remembered unknown
key; an address, or the strangers' budget, over its limit) is answered from the parser's
callbacks, in one write: no task, no ASGI call, no middleware.

A flood of made-up keys is mostly such requests, and on the ASGI path each cost a worker about
60 microseconds of CPU (a task, the cycle's objects, two writes for head and body). Everything
else (a verified key, a key to read, a pipelined request, an encoded path, Expect: 100-continue)
takes the ASGI path, where api.AuthenticateFirst decides again, the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from services.ingest.api import AuthenticateFirst


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

    def on_headers_complete(self) -> None:
        refused = self._refusal()
        if refused is None:
            super().on_headers_complete()
        else:
            self._refused = refused

    def on_body(self, body: bytes) -> None:
        if self._refused is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused is None:
            super().on_message_complete()
            return
        # Answered once the whole request is read, so the next one on the connection parses.
        response, self._refused = self._refused, None
        self.transport.write(response)
        if self._close_after:
            self.transport.close()
        self.on_response_complete()

    def _refusal(self) -> bytes | None:
        if self._door is None or self.expect_100_continue or self.pipeline:
            return None
        if self.cycle is not None and not self.cycle.response_complete:
            return None  # a response is still being written: answers stay in order
        if self.parser.should_upgrade():
            return None
        path = httptools.parse_url(self.url).path
        if b"%" in path:
            return None
        authorization = None
        for name, value in self.headers:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        refusal = self._door.refusal(
            self.parser.get_method().decode("ascii"),
            path.decode("ascii"),
            authorization,
            self._client(),
        )
        if refusal is None:
            return None
        status, headers, body = refusal
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


def _front_of(app: Any) -> tuple[AuthenticateFirst | None, Any]:
    """Our app inside uvicorn's wrappers, and the trusted proxies if uvicorn reads their headers."""
    proxies = None
    while app is not None:
        if isinstance(app, ProxyHeadersMiddleware):
            proxies = app.trusted_hosts
        if isinstance(app, AuthenticateFirst):
            return app, proxies
        app = getattr(app, "app", None)
    return None, None
