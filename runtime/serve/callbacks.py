"""Webhooks: a job's `callback_url` gets a JSON POST on every finished clip and at its end, from background sender
threads, so a slow or dead receiver never holds the worker.

Body: {"id", "event" ("clip", "done", "failed", "cancelled"), "state", "clips_done", "progress" (0..1), "error"}.
Each event is tried 1 + retries times (timeout each, exponential backoff between): a 2xx is delivered; a network
error, a timeout, 408, 429 or 5xx is tried again; any other answer is final. Redirects are not followed.

Addresses: unless private callbacks are allowed, a URL whose host is a loopback, private, link-local, reserved,
multicast or unspecified address is refused at submit time when the host is a literal IP (check_url), and at send
time every address the host resolves to is checked, and the connection goes to the checked address, so a name
that resolves to a public address when checked and a private one when connecting (DNS rebinding) reaches nothing.

Events are held in memory: those not yet delivered when the process dies are lost (at most once per event, not a
queue that survives a restart). Events of one job go through one thread, in order.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import zlib
from urllib.parse import urlsplit

log = logging.getLogger("vidrd.serve")
MAX_URL_CHARS = 2000
SENDERS = 4  # threads; a job's events always go through the same one (hash of its id), so they stay in order
PENDING = 1000  # events waiting per thread; more are dropped with a warning rather than grow without bound
BACKOFF_S = 0.5  # wait before the first retry; doubled for each one after
RETRY_STATUS = (408, 429)  # and 5xx


def _refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` may not receive callbacks (a non-public kind), or None."""
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    # the most specific name first: Python's is_private also covers link-local, unspecified and some reserved
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"{ip} is a {kind.replace('_', '-')} address"
    return None


def check_url(url: str, allow_private: bool) -> str:
    """`url` when it is an http(s) URL with a host; ValueError saying why not, or why its host (a literal IP, or
    localhost) may not receive callbacks. Names are resolved at send time only (resolve)."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"{len(url)} characters exceed {MAX_URL_CHARS}")
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a bad port
    except ValueError as e:
        raise ValueError(f"not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if allow_private:
        return url
    if host == "localhost" or host.endswith(".localhost"):
        raise ValueError(f"{host} is a loopback address; this service sends no callbacks to private addresses")
    try:
        why = _refused(ipaddress.ip_address(host))
    except ValueError:  # a name: checked after it is resolved
        return url
    if why:
        raise ValueError(f"{why}; this service sends no callbacks to private addresses")
    return url


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for `host`: every address it resolves to is checked (OSError when it does not
    resolve; ValueError when one is refused)."""
    addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    if not allow_private:
        for a in addresses:
            why = _refused(ipaddress.ip_address(a.split("%")[0]))  # an IPv6 scope (%eth0) is not part of the address
            if why:
                raise ValueError(f"{host} resolves to {why}")
    return addresses[0]


def post(url: str, body: bytes, timeout_s: float, allow_private: bool) -> int:
    """POST `body` (JSON) to `url` on the checked address; the HTTP status. Raises OSError (network, timeout) or
    ValueError (a refused address)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    address = resolve(parts.hostname, port, allow_private)
    conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(parts.hostname, port,
                                                                                   timeout=timeout_s)
    # connect to the address just checked, not to a second resolution; TLS still verifies the host name
    conn._create_connection = lambda addr, timeout=None, source=None: socket.create_connection(
        (address, addr[1]), timeout, source)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body, {"Content-Type": "application/json", "User-Agent": "vidrd"})
        resp = conn.getresponse()
        resp.read(65536)  # the answer is not used; read a bounded part so the connection closes cleanly
        return resp.status
    finally:
        conn.close()


class Sender:
    """Delivers events to callback URLs from SENDERS daemon threads; `send` never blocks."""

    def __init__(self, timeout_s: float, retries: int, allow_private: bool):
        self.timeout_s, self.retries, self.allow_private = timeout_s, retries, allow_private
        self.delivered = self.failed = 0  # events, each counted once when it ends
        self._count = threading.Lock()
        self._queues = [queue.Queue(PENDING) for _ in range(SENDERS)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(q,), daemon=True, name=f"vidrd-callbacks-{i}")
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def send(self, url: str, event: dict) -> None:
        q = self._queues[zlib.crc32(event["id"].encode()) % SENDERS]
        try:
            q.put_nowait((url, event))
        except queue.Full:
            log.warning("callbacks: %d events pending, %s of job %s dropped", PENDING, event["event"], event["id"])

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the threads: events still pending are dropped; one being sent gets up to `wait_s` to end."""
        self._stop.set()
        for q in self._queues:
            with q.mutex:
                q.queue.clear()
            q.put_nowait(None)
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _loop(self, q: queue.Queue) -> None:
        while (item := q.get()) is not None:
            url, event = item
            ok = self._deliver(url, json.dumps(event).encode())
            with self._count:
                self.delivered, self.failed = self.delivered + ok, self.failed + (not ok)

    def _deliver(self, url: str, body: bytes) -> bool:
        """True when a try got a 2xx; at most 1 + retries tries, waiting BACKOFF_S * 2**i before retry i + 1."""
        for i in range(self.retries + 1):
            if i and self._stop.wait(BACKOFF_S * 2 ** (i - 1)):
                return False
            try:
                status = post(url, body, self.timeout_s, self.allow_private)
            except ValueError as e:  # a refused address: trying again would not change it
                log.warning("callback to %s refused: %s", url, e)
                return False
            except OSError as e:  # includes timeouts and http.client's errors (HTTPException is not one)
                why = f"{type(e).__name__}: {e}"
            except http.client.HTTPException as e:
                why = f"{type(e).__name__}: {e}"
            else:
                if 200 <= status < 300:
                    return True
                why = f"HTTP {status}"
                if not (status >= 500 or status in RETRY_STATUS):
                    break
            log.info("callback to %s failed (try %d of %d): %s", url, i + 1, self.retries + 1, why)
        log.warning("callback to %s given up: %s", url, why)
        return False
