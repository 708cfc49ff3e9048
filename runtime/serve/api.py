"""The service's HTTP API (FastAPI): request validation and routes; the limits in front of them are limits.py's.

`make_app(backend, config)` serves one backend: worker.LocalService (`vidrd serve`) or ray.RayBackend
(`vidrd serve --ray`); both answer the same async calls, so both serve exactly this API. The request's sampler
fields are SamplerSettings' own (name, type, default, help, choices); its limits are the runtime's (Limits.check).
"""
import asyncio
import math
import re
import secrets
import time
from dataclasses import asdict, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, FastAPI, Header, HTTPException, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model

from vidrd.ref.ddim import DDIM
from vidrd.ref.sampler import SEED_MAX, SEED_MIN, SamplerSettings, check_prompt, check_text, shorten

from ..options import OFFICIAL_NEGATIVE
from ..quality import QUALITIES, check_reuse, resolve
from ..video_io import FPS_RANGE, check_fps, check_frame_size, encode_png
from .callbacks import check_url
from .jobs import ID_PATTERN, STATES, ServeConfig, clip_path, video_path
from .limits import UNAUTHORIZED, Downloads, Guard, Throttle

MEDIA = {"mp4": "video/mp4", "gif": "image/gif"}
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="32 hex digits, as returned by POST /v1/videos")]
ClipIndex = Annotated[int, Path(ge=0, description="clip number, from 0")]
Video = Annotated[int, Query(ge=0, description="which prompt's video, for a batch")]
SETTINGS = tuple(f.name for f in fields(SamplerSettings))
QUALITY_HELP = ("a preset over the settings left out: exact (the official sampler), balanced (DPM-Solver++ on trailing "
                "timesteps at 0.6x the steps, guidance reuse in the last 30% of them), fast (the same at 0.4x the "
                "steps, nothing reused); the service's dtype stands (runtime/README.md, quality presets)")


def _setting_fields(defaults: dict) -> dict:
    """Every SamplerSettings field as a request field: its type (its choices as a Literal), default and help. The
    settings a service's model has its own values for (`defaults`) default to None: to_spec fills them."""
    out = {}
    for f in fields(SamplerSettings):
        default, meta = f.default, f.metadata
        kind = Literal[meta["choices"]] if meta["choices"] else type(default)
        if f.name in defaults:
            alt = defaults[f.name]
            note = f"default {default}" + (f"; {alt} for the embedded model" if alt != default else "")
            out[f.name] = (Optional[kind], Field(None, description=f"{meta['help']} ({note})"))
        else:
            out[f.name] = (kind, Field(default, description=f"{meta['help']} (default {default})"))
    return out


def request_model(config: ServeConfig) -> type[BaseModel]:
    """The request body of a service with `config`: its schema names the model's own defaults (config.defaults)."""
    negative = f"default {OFFICIAL_NEGATIVE!r}" + (f"; {config.negative_prompt!r} for the embedded model"
                                                   if config.defaults else "")
    return create_model(
        "VideoRequest",
        __doc__="A video request: the settings of `vidrd generate`, with its defaults; strict JSON types, no unknown "
        "keys.",
        __config__=ConfigDict(extra="forbid", strict=True, allow_inf_nan=False),
        prompts=(list[str], Field(min_length=1, description="one video per prompt (a batch)")),
        negative_prompts=(Optional[list[str]], Field(None, description=f"one per prompt ({negative})")),
        clip_prompts=(Optional[list[str]], Field(None, description="the prompts of clips 2, 3, ... of a one-prompt "
                                                 "request (clip k+1 follows clip_prompts[k-1], the last holds for "
                                                 "later clips; at most clips - 1 of them)")),
        **_setting_fields(dict(config.defaults)),
        quality=(Optional[Literal[QUALITIES]], Field(None, description=QUALITY_HELP)),
        seed=(int, Field(42, ge=SEED_MIN, le=SEED_MAX)),
        format=(Literal["mp4", "gif"], "mp4"),
        fps=(float, Field(8.0, ge=min(lo for lo, _ in FPS_RANGE.values()),
                          le=max(hi for _, hi in FPS_RANGE.values()),
                          description="gif: at most 100 (GIF delays are whole centiseconds)")),
        callback_url=(Optional[str], Field(None, description="an http(s) URL that gets a JSON POST on every finished "
                                           "clip and at the end (runtime/serve/README.md, webhooks)")),
    )


# the request body with the official defaults; to_spec fills what a request leaves out from its config either way
VideoRequest = request_model(ServeConfig())


class JobStatus(BaseModel):
    id: str
    state: Literal[STATES]
    error: str | None = Field(description="why the job failed")
    cancel_requested: bool
    videos: int = Field(description="prompts in the batch; ?video=i picks one")
    format: str
    clips: int
    clips_done: int = Field(description="clips 0..clips_done-1 can be fetched")
    steps_per_clip: int
    steps_done: int
    steps_total: int
    worker: str | None = Field(description="host:pid of the runtime running it")
    attempts: int
    created: float
    started: float | None
    finished: float | None
    expires: float | None = Field(description="when its files are deleted (unix time)")
    request: dict


class Error(BaseModel):
    detail: str


def _field_error(field: str, msg: str, value=None) -> RequestValidationError:
    loc = ("body",) + tuple(field) if isinstance(field, tuple) else ("body", field)
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg, "input": value}])


def to_spec(req: BaseModel, config: ServeConfig) -> dict:
    """The validated job spec of a request (VideoRequest, or make_app's request_model): the sampler's own rules
    (SamplerSettings), this service's limits (the runtime's: Limits.check) and the model's schedule (the sampler's
    DDIM.check_steps). Raises a 422 that names the field."""
    negatives = req.negative_prompts if req.negative_prompts is not None else [config.negative_prompt] * len(req.prompts)
    if len(negatives) != len(req.prompts):
        raise _field_error("negative_prompts", f"{len(negatives)} negative prompts for {len(req.prompts)} prompts; "
                           "give one per prompt")
    for name, texts in (("prompts", req.prompts), ("negative_prompts", negatives)):
        for i, text in enumerate(texts):
            if len(text) > config.max_prompt_chars:
                raise _field_error((name, i), f"{len(text)} characters exceed {config.max_prompt_chars}")
            try:  # an empty prompt (the CLI refuses it too); a lone surrogate would fail the job, and its status
                # could not be JSON. Negative prompts may be empty (the official default is "").
                (check_prompt if name == "prompts" else check_text)(f"{name}[{i}]", text)
            except ValueError as e:
                raise _field_error((name, i), str(e)) from None
    clip_prompts = list(req.clip_prompts or ())
    if clip_prompts and len(req.prompts) != 1:
        raise _field_error("clip_prompts", f"clip_prompts needs a single prompt, not a batch of {len(req.prompts)} "
                           "(prompts): per-clip prompts describe one video")
    for i, text in enumerate(clip_prompts):
        if len(text) > config.max_prompt_chars:
            raise _field_error(("clip_prompts", i), f"{len(text)} characters exceed {config.max_prompt_chars}")
        try:
            check_prompt(f"clip_prompts[{i}]", text)
        except ValueError as e:
            raise _field_error(("clip_prompts", i), str(e)) from None
    # what the request left out (or sent as null) is the service's default: its model's own, else the official one
    given = {k: getattr(req, k) for k in SETTINGS if k in req.model_fields_set and getattr(req, k) is not None}
    try:
        s = SamplerSettings(**{**asdict(SamplerSettings()), **dict(config.defaults), **given})
    except ValueError as e:  # messages start with "name=value"
        raise _settings_error(e, req) from None
    quality = None
    try:
        if req.quality is not None:  # the preset fills what the request left out
            quality = resolve(req.quality, s, None, set(given), spell=lambda name: name,
                              feature_reuse_off=config.feature_reuse_off)
            s = quality.settings
        check_reuse(s, config.feature_reuse_off, spell=lambda name: name)
    except ValueError as e:  # a contradiction names "quality", or the setting the preset or the runtime cannot take
        raise _settings_error(e, req) from None
    if 1 + len(clip_prompts) > s.clips:
        raise _field_error("clip_prompts", f"clip_prompts has {len(clip_prompts)} prompts, so {1 + len(clip_prompts)} "
                           f"with the first, for clips={s.clips}; give at most {s.clips - 1}, or more clips")
    try:  # the runtime's own checks, before the job is queued
        config.limits.check(s, len(req.prompts), len(set(req.prompts[:1] + clip_prompts)))
        if config.scheduler is not None:  # the model's schedule has no room (leading spacing: 999 of 1000 steps)
            DDIM(config.scheduler).check_steps(s.steps, s.spacing)
    except ValueError as e:
        raise _settings_error(e, req) from None
    for field, check in (("fps", lambda: check_fps(req.format, req.fps)),
                         ("width", lambda: check_frame_size(req.format, s.height, s.width))):
        try:  # what the video writer would refuse mid-job
            check()
        except ValueError as e:
            raise _field_error(field, str(e)) from None
    if req.callback_url is not None:
        if not config.callbacks:
            raise _field_error("callback_url", "callbacks are turned off on this service (vidrd serve --no-callbacks)")
        try:
            check_url(req.callback_url, config.allow_private_callbacks)
        except ValueError as e:
            raise _field_error("callback_url", str(e)) from None
    return {"prompts": list(req.prompts), "negative_prompts": list(negatives), "clip_prompts": clip_prompts or None,
            "settings": asdict(s),
            "quality": None if quality is None else quality.summary(), "seed": req.seed, "format": req.format,
            "fps": req.fps, "callback_url": req.callback_url}


def _settings_error(e: ValueError, req) -> RequestValidationError:
    """A settings ValueError as a 422 on the field its message starts with ("name=value ..." or "name value ...");
    "batch=N" (Limits.check) is the prompts field."""
    m = re.match(r"(\w+)[= ]", str(e))
    name = {"batch": "prompts", "video_prompts": "clip_prompts"}.get(m.group(1), m.group(1)) if m else None
    field = name if name in SETTINGS + ("quality", "prompts", "clip_prompts") else "settings"
    return _field_error(field, str(e), getattr(req, field, None))


def _auth_dependency(key: str):
    bearer, header = HTTPBearer(auto_error=False), APIKeyHeader(name="X-API-Key", auto_error=False)

    async def check(b: HTTPAuthorizationCredentials | None = Security(bearer), k: str | None = Security(header)):
        # Guard has already checked the key before the body was read; this documents it in the OpenAPI schema
        given = k if k is not None else (b.credentials if b is not None else None)
        if given is None or not secrets.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    return check


def _package_version() -> str:
    try:
        return version("vidrd")
    except PackageNotFoundError:
        return "0"


def make_app(backend, config: ServeConfig) -> FastAPI:
    """The HTTP API over `backend` (LocalService or RayBackend) with `config`'s limits and API key."""
    app = FastAPI(title="vidrd", version=_package_version(),
                  description="Long text-to-video generation with Reuse and Diffuse: submit a job, follow its "
                  "progress, play its clips while later ones are still being generated, fetch the whole video. Request "
                  f"headers over {config.max_header_bytes} bytes get 431 on any route.")
    app.add_middleware(Guard, max_bytes=config.max_body_bytes, read_timeout_s=config.read_timeout_s,
                       api_key=config.api_key)
    app.add_exception_handler(RequestValidationError, _invalid)
    auth = {401: {"model": Error, "description": "missing or wrong API key"}} if config.api_key else {}
    v1 = APIRouter(prefix="/v1", tags=["videos"], responses=auth,
                   dependencies=[Security(_auth_dependency(config.api_key))] if config.api_key else [])
    not_found = {404: {"model": Error, "description": "no such job (or it expired), clip or video"}}
    not_yet = {409: {"model": Error, "description": "the job has not produced it (yet: see Retry-After, or it "
                     "ended without it)"}}
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait before retrying"}}
    file_ok = {200: {"content": {m: {} for m in MEDIA.values()}, "description": "the video file"},
               503: {"model": Error, "description": f"{config.max_downloads} downloads in progress",
                     "headers": retry_after}}
    throttle, downloads = Throttle(config.submit_rate, config.submit_burst), Downloads(config.max_downloads)
    # this service's request body: its schema names the model's defaults. A local class works as the annotation
    # below because this module does not postpone annotations (no `from __future__ import annotations`).
    Body = request_model(config)

    async def job(job_id: str) -> dict:
        st = await backend.status(job_id)
        if st is None:
            raise HTTPException(404, f"no job {job_id} (unknown, or deleted after its TTL)")
        return st

    def pending(st: dict, what: str) -> HTTPException:
        open_ = st["state"] in ("queued", "running")
        return HTTPException(409, f"{what} is not available: the job is {st['state']}"
                             + (" (try again later)" if open_ else ""), headers={"Retry-After": "1"} if open_ else None)

    @v1.post("/videos", status_code=202, response_model=JobStatus, summary="Submit a video job",
             responses={400: {"model": Error, "description": "body not parseable as JSON (truncated, nested too "
                             "deeply)"},
                        408: {"model": Error, "description": "request body not received in time"},
                        413: {"model": Error, "description": "request body too large"},
                        415: {"model": Error, "description": "Content-Type is not application/json"},
                        429: {"model": Error, "description": "queue or job records full, or this client's submission "
                              f"rate over {config.submit_rate:g}/s (burst {config.submit_burst})",
                              "headers": retry_after},
                        503: {"model": Error, "description": "the job store cannot record the job (its disk full)",
                              "headers": retry_after}})
    async def submit(req: Body, request: Request, response: Response):
        spec = to_spec(req, config)
        # valid submissions only count: they are what holds queue places and records
        wait_s = throttle.take(request.client.host if request.client else "", time.monotonic())
        if wait_s:
            raise HTTPException(429, f"too many submissions from this client (at most {config.submit_rate:g} per "
                                f"second, {config.submit_burst} at once); retry later",
                                headers={"Retry-After": str(math.ceil(wait_s))})
        job_id, refused = await backend.submit(spec)
        if job_id is None:
            status, retry, why = refused
            raise HTTPException(status, f"{why}; retry later", headers={"Retry-After": str(retry)})
        response.headers["Location"] = f"/v1/videos/{job_id}"
        return await backend.status(job_id)

    @v1.get("/videos/{job_id}", response_model=JobStatus, responses=not_found, summary="Status and progress")
    async def get_status(job_id: JobId):
        return await job(job_id)

    @v1.get("/videos/{job_id}/clips/{k}", response_class=FileResponse, responses={**file_ok, **not_found, **not_yet},
            summary="One clip, as soon as it is decoded")
    async def get_clip(job_id: JobId, k: ClipIndex, video: Video = 0):
        st = await job(job_id)
        if video >= st["videos"] or k >= st["clips"]:
            raise HTTPException(404, f"job {job_id} has clips 0..{st['clips'] - 1} of videos 0..{st['videos'] - 1}")
        if k >= st["clips_done"]:
            raise pending(st, f"clip {k}")
        return downloads.file(clip_path(config.results, job_id, k, video, st["format"]), MEDIA[st["format"]],
                              f"{job_id}-clip{k}-{video}.{st['format']}")

    @v1.get("/videos/{job_id}/file", response_class=FileResponse, responses={**file_ok, **not_found, **not_yet},
            summary="The whole video, once the job is done")
    async def get_file(job_id: JobId, video: Video = 0):
        st = await job(job_id)
        if video >= st["videos"]:
            raise HTTPException(404, f"job {job_id} has videos 0..{st['videos'] - 1}")
        if st["state"] != "done":
            raise pending(st, "the video")
        return downloads.file(video_path(config.results, job_id, video, st["format"]), MEDIA[st["format"]],
                              f"{job_id}-{video}.{st['format']}")

    @v1.get("/videos/{job_id}/events", response_class=StreamingResponse, summary="Live events (Server-Sent Events)",
            responses={200: {"content": {"text/event-stream": {}}, "description": "`status` (the state and progress "
                             "now), then one event per change: started, step (a few per second at most), clip, "
                             "preview, and the end (done, failed or cancelled), after which the stream ends; each "
                             "event's data is JSON with id, state, clips_done, steps_done, steps_total, error"},
                       **not_found})
    async def get_events(job_id: JobId, last_event_id: Annotated[Optional[int], Header(
            description="the id of the last event received: a reconnecting client gets the events it missed")] = None):
        st = await job(job_id)
        return StreamingResponse(backend.events(job_id, st, last_event_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @v1.get("/videos/{job_id}/preview", response_class=Response, responses={
            200: {"content": {"image/png": {}}, "description": "the middle frame of the latest preview of the video "
                  "(X-Preview-Clip, X-Preview-Step: where in the job it was taken)"}, **not_found, **not_yet},
            summary="The latest preview, while the job runs")
    async def get_preview(job_id: JobId, video: Video = 0):
        st = await job(job_id)
        if video >= st["videos"]:
            raise HTTPException(404, f"job {job_id} has videos 0..{st['videos'] - 1}")
        if not backend.previews:
            raise HTTPException(409, "this service makes no previews (vidrd serve --preview-every 0, a model "
                                "without a tiny decoder, or --ray)")
        latest = await backend.preview(job_id)
        if latest is None:
            raise pending(st, "a preview")
        clip, step, frames = latest  # (B,H,W,3) uint8 middle frames
        png = await asyncio.to_thread(encode_png, frames[video])
        return Response(png, media_type="image/png", headers={"X-Preview-Clip": str(clip),
                                                              "X-Preview-Step": str(step), "Cache-Control": "no-store"})

    @v1.delete("/videos/{job_id}", response_model=JobStatus, summary="Cancel a job",
               responses={202: {"model": JobStatus, "description": "running: it stops after its current step"},
                          **not_found, 409: {"model": Error, "description": "the job already finished"}})
    async def cancel(job_id: JobId, response: Response):
        st = await backend.cancel(job_id)
        if st is None:
            raise HTTPException(404, f"no job {job_id} (unknown, or deleted after its TTL)")
        if st["state"] in ("done", "failed"):
            raise HTTPException(409, f"job {job_id} already {st['state']}")
        response.status_code = 202 if st["state"] == "running" else 200
        return st

    app.include_router(v1)

    @app.get("/healthz", summary="Liveness and storage", responses={503: {"description": "no worker is alive, or "
             f"the results folder is missing or has under {config.min_free_bytes} bytes free (status says which)"}})
    async def healthz():
        h = await backend.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}, "description": "text exposition format 0.0.4"}})
    async def metrics():
        return PlainTextResponse(await backend.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _invalid(request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON at all; else 422 naming each bad field. The input is not echoed (it may be
    huge, or NaN, which JSON cannot carry), and names and messages from the request are shortened."""
    errors = exc.errors()
    bad = next((e for e in errors if e["type"] == "json_invalid"), None)
    if bad is not None:
        why, at = bad.get("ctx", {}).get("error", "JSON decode error"), bad["loc"][-1]
        return JSONResponse({"detail": shorten(f"body is not valid JSON: {why} (at character {at})", 300)},
                            status_code=400)
    detail = [{"loc": [shorten(x) if isinstance(x, str) else x for x in e["loc"]], "msg": shorten(e["msg"], 300),
               "type": e["type"]} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)
