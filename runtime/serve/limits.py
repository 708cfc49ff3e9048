"""The service's limits in front of its routes: the API key and the body (Guard, ASGI middleware), the headers,
header and send timeouts (http_protocol, uvicorn's protocol class), submissions per client (Throttle) and
downloads in progress (Downloads)."""
from __future__ import annotations

import asyncio
import secrets

from fastapi import HTTPException
from fastapi.responses import FileResponse, JSONResponse

from vidrd.ref.sampler import shorten

from .jobs import ServeConfig


class Guard:
    """ASGI middleware in front of every route: the API key (401) before anything of the body is read, then the
    body's type (415 unless JSON), size (413, declared by Content-Length or streamed) and read time (408 for a
    client that stalls)."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float, api_key: str | None):
        self.app, self.max_bytes, self.read_timeout_s, self.api_key = app, max_bytes, read_timeout_s, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/") and not _key_ok(headers, self.api_key):
            return await _reply(scope, receive, send, 401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        kind = headers.get(b"content-type")
        if kind is not None and not _is_json(kind):
            return await _reply(scope, receive, send, 415, f"Content-Type {shorten(kind.decode('latin-1'))!r} is not "
                                "JSON: send Content-Type: application/json", {"Connection": "close"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s  # for the whole body, not per chunk
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                return await _reply(scope, receive, send, 408, f"request body not received within "
                                    f"{self.read_timeout_s:g} s", {"Connection": "close"})
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not msg.get("more_body"):
                break
        body, done = b"".join(chunks), False

        async def replay():
            nonlocal done
            if done:
                return await receive()
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await _reply(scope, receive, send, 413, f"request body larger than {self.max_bytes} bytes",
                     {"Connection": "close"})


def _is_json(content_type: bytes) -> bool:
    """application/json or application/*+json, with any parameters (FastAPI's own rule for parsing a body)."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


class Throttle:
    """Submissions per client address: a token bucket of `burst` tokens refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)

    def take(self, client: str, now: float) -> float:
        """0 and one token taken, or the seconds until the client has a token."""
        tokens, then = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if len(self.buckets) > 4096:  # forget clients whose bucket is full again: the same as never seen
            self.buckets = {k: (n, t) for k, (n, t) in self.buckets.items() if n + (now - t) * self.rate < self.burst}
        if tokens >= 1:
            self.buckets[client] = (tokens - 1, now)
            return 0.0
        self.buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate


UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)"


def _key_ok(headers: dict, key: str) -> bool:
    """X-API-Key: KEY or Authorization: Bearer KEY, compared in constant time."""
    given = headers.get(b"x-api-key")
    if given is None:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        given = token.strip() if scheme.lower() == b"bearer" else None
    return given is not None and secrets.compare_digest(given, key.encode())


async def _reply(scope, receive, send, status: int, detail: str, headers: dict | None = None):
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


def http_protocol(config: ServeConfig):
    """uvicorn's HTTP protocol class with the limits uvicorn lacks, all before any route (and the API key) runs:
    - request headers must arrive within read_timeout_s of the connection opening or of its previous response, or
      the connection is closed (slow clients holding connections); bodies are timed by Guard;
    - request headers larger than max_header_bytes get 431 and the connection closed: counted while they arrive
      (httptools buffers them all, with no limit of its own) and measured once parsed;
    - a response the client does not read for send_timeout_s (its socket buffers full) is cut off: otherwise a
      stalled download holds its connection, file and buffers forever.
    uvicorn itself times only idle keep-alive connections."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional for uvicorn; h11 refuses headers over 16 KiB itself (400)
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base
    limit, too_large = config.max_header_bytes, f"request headers larger than {config.max_header_bytes} bytes"
    body = ('{"detail": "%s"}' % too_large).encode()
    refusal = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

    async def refuse(scope, receive, send):
        await _reply(scope, receive, send, 431, too_large, {"Connection": "close"})

    class Limited(Base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_bytes, self._in_headers, self._send_timer = 0, False, None
            self._header_timer = self.loop.call_later(config.read_timeout_s, self._headers_late)

        def data_received(self, data):
            super().data_received(data)
            # only bytes of a request whose headers are still arriving count: the rest of a body the app did not
            # read (a 401 before a large body) is parsed as that body, not as the next request's headers
            if self._in_headers and not self.transport.is_closing():
                self._header_bytes += len(data)
                if self._header_bytes > limit:
                    self.transport.write(refusal)
                    self.transport.close()

        def on_message_begin(self):  # httptools: a request starts (h11 limits its headers itself)
            self._header_bytes, self._in_headers = 0, True
            super().on_message_begin()

        def on_headers_complete(self):  # httptools: headers that came in one piece, measured as parsed
            self._in_headers = False
            if len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers) > limit:
                app, self.app = self.app, refuse
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
            else:
                super().on_headers_complete()

        def on_response_complete(self):
            super().on_response_complete()
            self._header_timer.cancel()  # the next request on this connection gets its own time
            self._header_timer = self.loop.call_later(config.read_timeout_s, self._headers_late)

        def pause_writing(self):  # the client's socket and our write buffer are full: it has to read on
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(config.send_timeout_s, self._send_stalled)

        def resume_writing(self):
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def connection_lost(self, exc):
            self._header_timer.cancel()
            if self._send_timer is not None:
                self._send_timer.cancel()
            super().connection_lost(exc)

        def _headers_late(self):
            idle = self.cycle is None or self.cycle.response_complete  # no request in progress: headers still due
            if idle and not self.transport.is_closing():
                self.transport.close()

        def _send_stalled(self):
            self._send_timer = None
            self.transport.abort()  # close() would wait for the unread buffer to drain, which never happens

    return Limited


class Downloads:
    """Clip and video downloads in progress, at most `most` (503 + Retry-After past it); the protocol's send
    timeout ends a stalled one, which frees its place."""

    def __init__(self, most: int):
        self.most, self.active = most, 0

    def file(self, path, media_type: str, name: str) -> FileResponse:
        if not path.is_file():  # deleted by the janitor between the status read and now
            raise HTTPException(404, f"{name} is gone (expired)")
        if self.active >= self.most:
            raise HTTPException(503, f"{self.most} downloads in progress; retry later", headers={"Retry-After": "1"})
        self.active += 1  # handlers and responses run on the one event loop: no lock
        return _Counted(path, media_type=media_type, filename=name, on_end=self._end)

    def _end(self) -> None:
        self.active -= 1


class _Counted(FileResponse):
    """A FileResponse that says when it has ended, however (sent, client gone, cut off)."""

    def __init__(self, *args, on_end, **kw):
        super().__init__(*args, **kw)
        self._on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()
