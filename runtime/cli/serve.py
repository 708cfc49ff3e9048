"""`vidrd serve`: the HTTP service (FastAPI on uvicorn), on one runtime or, with --ray, on Ray Serve replicas."""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import tempfile
from dataclasses import replace

from vidrd.runtime import shapes
from vidrd.runtime.cli.model_args import add_model_args, check_model_args, is_default_model
from vidrd.runtime.cli.args import add_runtime_args, runtime_options
from vidrd.runtime.batch import PER_JOB
from vidrd.runtime.loop import Limits
from vidrd.runtime.options import RuntimeOptions
from vidrd.runtime.quality import feature_reuse_blocker
from vidrd.runtime.serve.jobs import ServeConfig
from vidrd.runtime.serve.store import shared

D = ServeConfig()
BATCH_JOBS = 4  # --batch-jobs default: BENCHMARKS.md, "Serving": batched jobs
MODEL_FLAGS = ("weights", "sd", "ckpt", "vae", "preset", "weights_seed")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve video generation over HTTP (FastAPI; --ray for Ray Serve replicas)",
                       description="An HTTP service: POST /v1/videos submits a job, GET /v1/videos/ID follows it, "
                       "GET /v1/videos/ID/clips/K streams finished clips, GET /v1/videos/ID/file the video, "
                       "DELETE /v1/videos/ID cancels; /healthz, /metrics, /docs. See runtime/serve/README.md.")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    n.add_argument("--port", type=int, default=8000)
    n.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="uvicorn's log level (info logs every request)")
    n.add_argument("--api-key", default=os.environ.get("VIDRD_API_KEY"),
                   help="require this key (Authorization: Bearer KEY or X-API-Key: KEY); default $VIDRD_API_KEY")
    j = p.add_argument_group("jobs and limits (the runtime's buffers are sized from the limits)")
    j.add_argument("--results", default=D.results, help="folder of job results (shared storage under --ray)")
    j.add_argument("--jobs-db", metavar="PATH",
                   help="SQLite file or postgresql://USER@HOST/DB URL of the job records, kept across restarts: open "
                   "jobs run again, the running one from its last finished clip (default: jobs.db in --results; "
                   "':memory:' forgets them at exit; one service per database; under --ray only a postgresql:// "
                   "URL, which every replica reaches, else the records live in a registry actor's memory)")
    j.add_argument("--queue-size", type=int, default=D.queue_size, help="jobs waiting before 429")
    j.add_argument("--max-records", type=int, default=D.max_records,
                   help="job records held (open, and finished until their TTL) before 429")
    j.add_argument("--submit-rate", type=float, default=D.submit_rate,
                   help="submissions per second per client address, sustained, before 429 + Retry-After")
    j.add_argument("--submit-burst", type=int, default=D.submit_burst, help="... and at once")
    j.add_argument("--ttl", type=float, default=D.ttl_s, help="seconds a finished job's files are kept")
    for name in ("batch", "frames", "height", "width", "steps", "clips", "overlap"):
        j.add_argument(f"--max-{name}", type=int, default=getattr(D.limits, name), help=f"largest {name} of a request")
    j.add_argument("--max-video-prompts", type=int, default=D.limits.video_prompts,
                   help="distinct prompts in one video (the prompt and its clip_prompts): a text context each")
    j.add_argument("--max-prompt-chars", type=int, default=D.max_prompt_chars)
    j.add_argument("--max-body-bytes", type=int, default=D.max_body_bytes, help="larger request bodies get 413")
    j.add_argument("--read-timeout", type=float, default=D.read_timeout_s,
                   help="seconds a client has to send a request's headers, and then its body (slow clients: 408 or "
                   "the connection closed)")
    j.add_argument("--max-header-bytes", type=int, default=D.max_header_bytes,
                   help="larger request headers get 431 and the connection closed")
    j.add_argument("--send-timeout", type=float, default=D.send_timeout_s,
                   help="seconds a client may read nothing of a response (a stalled download) before it is cut off")
    j.add_argument("--max-downloads", type=int, default=D.max_downloads,
                   help="clip and video downloads in progress at once; more get 503 + Retry-After")
    j.add_argument("--min-free-mb", type=float, default=D.min_free_bytes / 2**20,
                   help="/healthz answers 503 'low disk space' when the results folder has less free")
    j.add_argument("--no-callbacks", dest="callbacks", action="store_false",
                   help="refuse requests with a callback_url (422): this service sends no webhooks")
    j.add_argument("--allow-private-callbacks", action="store_true",
                   help="let callback URLs reach loopback, private and link-local addresses (default: refused at "
                   "submit time and again after the host is resolved)")
    j.add_argument("--batch-jobs", type=int, metavar="K",
                   help="run up to K queued jobs whose settings match (all but prompts, negatives, seed, "
                   f"{', '.join(PER_JOB)}) in one UNet batch, joining and leaving between clips; 1: one job at a "
                   f"time (default {BATCH_JOBS}, measured in BENCHMARKS.md; 1 under --ray). The runtime's buffers "
                   "hold K x --max-batch prompts")
    j.add_argument("--preview-every", type=int, default=D.preview_every, metavar="K",
                   help="a preview of a running job every K denoising steps (GET /v1/videos/ID/preview, `preview` "
                   "events), decoded by the model's tiny decoder (the embedded model ships one); 0: none")
    x = p.add_argument_group("execution (under --ray: of every replica; on a cluster without GPUs, --threads "
                             "defaults to --replica-cpus)")
    add_runtime_args(x)
    r = p.add_argument_group("Ray Serve")
    r.add_argument("--ray", action="store_true", help="serve on Ray Serve: one runtime per replica (per GPU)")
    r.add_argument("--ray-address", help="an existing cluster (e.g. auto); default: start a local one")
    r.add_argument("--min-replicas", type=int, default=1)
    r.add_argument("--max-replicas", type=int, help="default: the cluster's GPUs (1 without GPUs)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    add_model_args(p)
    p.set_defaults(func=run)


def config_from(args) -> ServeConfig:
    limits = Limits(batch=args.max_batch, frames=args.max_frames, height=args.max_height, width=args.max_width,
                    steps=args.max_steps, overlap=args.max_overlap, clips=args.max_clips,
                    video_prompts=args.max_video_prompts)
    c = ServeConfig(results=args.results, queue_size=args.queue_size, ttl_s=args.ttl, limits=limits,
                    max_prompt_chars=args.max_prompt_chars,
                    max_body_bytes=args.max_body_bytes, read_timeout_s=args.read_timeout, api_key=args.api_key or None,
                    max_records=args.max_records, submit_rate=args.submit_rate, submit_burst=args.submit_burst,
                    max_header_bytes=args.max_header_bytes, send_timeout_s=args.send_timeout,
                    max_downloads=args.max_downloads, min_free_bytes=int(args.min_free_mb * 2**20),
                    feature_reuse_off=feature_reuse_blocker(runtime_options(args)), jobs_db=args.jobs_db,
                    callbacks=args.callbacks, allow_private_callbacks=args.allow_private_callbacks,
                    preview_every=args.preview_every, batch_jobs=batch_jobs(args))
    if is_default_model(args):  # requests that leave a setting out get the embedded model's own
        c = replace(c, defaults=tuple(shapes.SETTINGS.items()), negative_prompt=shapes.NEGATIVE)
    c.validate()
    return c


def batch_jobs(args) -> int:
    """--batch-jobs, or its default: BATCH_JOBS, 1 under --ray (a replica runs one job at a time). ValueError for
    K < 1, or K > 1 under --ray."""
    if args.batch_jobs is None:
        return 1 if args.ray else BATCH_JOBS
    if args.batch_jobs < 1:
        raise ValueError(f"--batch-jobs {args.batch_jobs} must be an integer >= 1")
    if args.ray and args.batch_jobs > 1:
        raise ValueError(f"--batch-jobs {args.batch_jobs}: Ray replicas run one job at a time; drop --batch-jobs")
    return args.batch_jobs


def check(args) -> RuntimeOptions:
    """Every flag checked before anything loads; the runtime's options."""
    check_model_args(args)
    options = runtime_options(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must be in 1..65535")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who reaches it can submit jobs",
              file=sys.stderr)
    check_writable(args.results)
    if args.ray and args.jobs_db and not shared(args.jobs_db):
        raise ValueError(f"--jobs-db {args.jobs_db}: under --ray the job records live in PostgreSQL (--jobs-db "
                         "postgresql://...) or in the registry actor's memory; SQLite needs one host")
    return options


def check_writable(results: str) -> None:
    """ValueError unless a file can be created in `results` (made if missing): a read-only folder would otherwise
    pass /healthz and fail every job."""
    try:
        os.makedirs(results, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vidrd-write-check-", dir=results)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--results {results} is not writable: {e.strerror or e}") from None


def run(args) -> int:
    config = config_from(args)
    options = check(args)
    if args.ray:
        return run_ray(args, config, options)
    return run_local(args, config, options.resolved())


def run_local(args, config: ServeConfig, options: RuntimeOptions) -> int:
    import uvicorn

    from vidrd.runtime import preview
    from vidrd.runtime.cli.model_args import load_model
    from vidrd.runtime.loop import Runtime
    from vidrd.runtime.options import open_runtime
    from vidrd.runtime.serve.api import make_app
    from vidrd.runtime.serve.limits import http_protocol
    from vidrd.runtime.serve.store import open_store
    from vidrd.runtime.serve.worker import LocalService

    store = open_store(config.jobs_path())  # before the model loads: a bad or unreachable database stops it
    try:
        model, what, _ = load_model(args, dtype=options.torch_dtype, device=options.device)
        config = config.for_model(model)
        rt = open_runtime(model, options, config.runtime_limits())
        # previews need a tiny decoder (only the embedded model ships one) and the lean runtime's loop
        tiny = (preview.load(shapes.MODEL_DIR / "tiny_decoder.safetensors")
                if config.preview_every and is_default_model(args) and isinstance(rt, Runtime) else None)
        service = LocalService(rt, config, store, tiny)
    except BaseException:
        store.close()
        raise
    print(f"serving {what} ({options.backend} on {options.device}) at http://{args.host}:{args.port} (docs at "
          "/docs)", file=sys.stderr)
    stop_once()
    try:
        uvicorn.run(make_app(service, config), host=args.host, port=args.port, log_level=args.log_level,
                    http=http_protocol(config))
    except KeyboardInterrupt:
        pass  # a stop request: shut down cleanly
    finally:
        stop_once(ignore=True)  # a second signal must not interrupt the cleanup below
        service.close()
    return 0


def stop_once(ignore: bool = False) -> None:
    """SIGINT and SIGTERM (docker stop, systemd) raise KeyboardInterrupt once; any later one is ignored, so that
    the shutdown (stop the running job after its step, drop its temporary files, free the runtime, close the job
    store) runs to its end. uvicorn
    handles both while it serves and re-raises the first after its own graceful shutdown."""
    def handler(sig, frame):
        stop_once(ignore=True)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN if ignore else handler)


def run_ray(args, config: ServeConfig, options: RuntimeOptions) -> int:
    import ray
    from ray import serve

    from vidrd.runtime.serve.ray import build, start_registry, stop_registry
    from vidrd.runtime.serve.store import open_store

    from vidrd.runtime.cli.model_args import load_model

    model, _, _ = load_model(args, dtype=options.torch_dtype)  # once, on CPU: its schedule bounds requests' steps
    config = config.for_model(model)
    del model
    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    if not shared(config.jobs_db):
        start_registry(config)
    else:
        open_store(config.jobs_db, exclusive=False).close()  # an unreachable or newer database stops it here
    app = build(config, {k: getattr(args, k) for k in MODEL_FLAGS}, options, min_replicas=args.min_replicas,
                max_replicas=args.max_replicas, replica_cpus=args.replica_cpus)
    print(f"serving on Ray Serve at http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    stop_once()  # SIGTERM as Ctrl-C: the finally below runs, once
    try:
        serve.run(app, name="vidrd", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        stop_once(ignore=True)
        serve.shutdown()
        stop_registry()  # job records go with the service, as without --ray (files expire by TTL)
    return 0
