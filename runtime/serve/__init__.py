"""`vidrd serve`: the HTTP service around the runtime. The core (loop, backends, options) never imports it.

api (FastAPI routes, request validation), jobs (ServeConfig, the job Registry, files), worker (one job on a Runtime;
LocalService, the single-process backend), batching (compatible jobs in one UNet batch: --batch-jobs), ray (the same API on Ray Serve replicas), bench (load benchmark), cmd
(the `vidrd serve` command).
"""
