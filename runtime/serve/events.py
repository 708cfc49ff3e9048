"""Live job events for `GET /v1/videos/{id}/events` (Server-Sent Events) and the latest preview of each job.

The Registry publishes to a `Hub` from any thread (HTTP handlers, the worker, the preview thread); a stream awaits
the next event on its own asyncio loop, woken through `call_soon_threadsafe`, so nothing polls. Memory is bounded:
an open job has a ring of its last RING events and its latest preview (the middle frame of each video); a job's
channel is dropped when it ends (its streams still hold it until they send the end), leaving its end event among
the last Hub.ENDED. Events are numbered per job (the SSE `id:`): a client that reconnects with `Last-Event-ID`
gets what it missed while the ring still holds it, else the current state.

Under Ray the registry is an actor in another process, so `poll` makes the same events from status changes.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict, deque

import numpy as np

END = ("done", "failed", "cancelled")  # an event of one of these names is a stream's last
RING = 32  # events kept per open job for reconnecting clients
STEP_INTERVAL_S = 0.25  # `step` events of a job at most this often (a step can take a millisecond)
KEEPALIVE_S = 15.0  # a comment line this often on a quiet stream: proxies keep it, a gone client shows


def sse(seq: int, name: str, data: dict) -> bytes:
    """One Server-Sent Event."""
    return f"id: {seq}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def progress(st: dict) -> dict:
    """An event's data from a job's status (Job.status)."""
    return {k: st[k] for k in ("id", "state", "clips_done", "steps_done", "steps_total", "error")}


class Channel:
    """One open job: its last events (seq, name, data), its latest progress and preview, its waiting streams."""

    def __init__(self, latest: dict):
        self.ring: deque = deque(maxlen=RING)
        self.seq = 0
        self.latest = latest  # the data of the newest change, a dropped `step` included
        self.last_step = 0.0
        self.preview: tuple | None = None  # (clip, step, (B,H,W,3) uint8 middle frames)
        self.waiters: set = set()  # (loop, asyncio.Event) of each stream

    def since(self, seq: int) -> list | None:
        """Events after `seq`; None when the ring no longer holds all of them."""
        if seq >= self.seq:
            return []
        if not self.ring or self.ring[0][0] > seq + 1:
            return None
        return [e for e in self.ring if e[0] > seq]


class Hub:
    """Every open job's channel, and the end events of the last ENDED jobs (so that a stream opened as its job
    ends still gets the end); thread-safe."""

    ENDED = 1024

    def __init__(self):
        self._lock = threading.Lock()
        self._channels: dict[str, Channel] = {}
        self._ended: OrderedDict[str, tuple] = OrderedDict()  # job id: its end event (seq, name, data)

    def publish(self, job_id: str, name: str, data: dict) -> None:
        """Add an event and wake the job's streams; `step` events closer than STEP_INTERVAL_S only update the
        progress; an end event closes the channel; nothing follows an end."""
        now = time.monotonic()
        with self._lock:
            if job_id in self._ended:
                return
            ch = self._channels.setdefault(job_id, Channel(data))
            ch.latest = data
            if name == "step":
                if now - ch.last_step < STEP_INTERVAL_S:
                    return
                ch.last_step = now
            ch.seq += 1
            ch.ring.append((ch.seq, name, data))
            if name in END:
                del self._channels[job_id]
                self._ended[job_id] = ch.ring[-1]
                if len(self._ended) > self.ENDED:
                    self._ended.popitem(last=False)
            waiters = list(ch.waiters)
        for loop, wake in waiters:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that stream's loop closed (the server stopped)
                pass

    def preview(self, job_id: str, clip: int, step: int, frames: np.ndarray, data: dict) -> None:
        """Keep the middle frame of each video of a preview (B,F,H,W,3) uint8 and publish a `preview` event."""
        middle = frames[:, frames.shape[1] // 2].copy()  # (B,H,W,3)
        with self._lock:
            if job_id in self._ended:
                return  # decoded after the job ended
            self._channels.setdefault(job_id, Channel(data)).preview = (clip, step, middle)
        self.publish(job_id, "preview", {**data, "clip": clip, "step": step})

    def latest(self, job_id: str) -> tuple | None:
        """(clip, step, (B,H,W,3) uint8) of the job's latest preview; None before the first or after the end."""
        with self._lock:
            ch = self._channels.get(job_id)
            return None if ch is None else ch.preview

    def forget(self, job_ids) -> None:
        with self._lock:
            for job_id in job_ids:
                self._channels.pop(job_id, None)
                self._ended.pop(job_id, None)

    async def stream(self, job_id: str, now: dict, last_id: int | None = None):
        """The SSE bytes of a job whose status was `now`: `status` (its state and progress) unless `last_id` names
        an event the ring still holds, then each event as it comes, until the end event."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            end = self._ended.get(job_id)
            if end is None and now["state"] in END:  # ended before this service ran (a restart)
                end = (0, now["state"], progress(now))
            ch = None if end is not None else self._channels.setdefault(job_id, Channel(progress(now)))
            if ch is not None:
                ch.waiters.add((loop, wake))
                missed = None if last_id is None else ch.since(last_id)
                seq, latest = (ch.seq, ch.latest) if missed is None else (last_id, None)
        if end is not None:
            yield sse(end[0], "status", end[2])
            yield sse(*end)
            return
        try:
            if latest is not None:  # a new client, or one that missed more than the ring holds
                yield sse(seq, "status", latest)
            while True:
                wake.clear()
                with self._lock:
                    events = ch.since(seq)
                if events is None:  # fell behind the ring: the current progress instead of what it missed
                    events = [ch.ring[-1]]
                for seq, name, data in events:
                    yield sse(seq, name, data)
                    if name in END:
                        return
                if not events:
                    try:
                        await asyncio.wait_for(wake.wait(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield b": keep-alive\n\n"
        finally:
            with self._lock:
                ch.waiters.discard((loop, wake))


async def poll(status, job_id: str, now: dict, interval_s: float = 0.5):
    """The same events made from status polling (`await status(job_id)`), for backends whose registry lives in
    another process (Ray): `status`, then started / step / clip / the end as the status changes. No previews."""
    seq, last = 1, now
    yield sse(seq, "status", progress(now))
    while last["state"] not in END:
        await asyncio.sleep(interval_s)
        st = await status(job_id)
        if st is None:  # expired meanwhile
            return
        data = progress(st)
        events = ([("started", data)] if last["state"] == "queued" and st["state"] != "queued" else []) \
            + [("clip", {**data, "clip": k}) for k in range(last["clips_done"], st["clips_done"])] \
            + ([("step", data)] if st["steps_done"] > last["steps_done"] and st["state"] not in END else []) \
            + ([(st["state"], data)] if st["state"] in END else [])
        for name, d in events:
            seq += 1
            yield sse(seq, name, d)
        last = st
