"""`vidrd serve --batch-jobs K` (runtime/serve/batching.py) on the tiny preset: compatible jobs share a batch and each
job's video is the one it makes alone, incompatible jobs never share one, a cancel or a failure ends one job only, a
job that fails validation never enters a batch, /metrics has the batch sizes, the flag's checks."""
import asyncio
import json
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_service import model, submit, wait  # noqa: E402,F401 - model: the module-scoped tiny model fixture
from tolerances import BATCHED_MP4_MEAN  # noqa: E402
from vidrd.runtime.bench import service as serve_bench  # noqa: E402
from vidrd.runtime.cli import main  # noqa: E402
from vidrd.runtime.loop import Limits  # noqa: E402
from vidrd.runtime.options import open_runtime  # noqa: E402
from vidrd.runtime.serve.jobs import ServeConfig, job_dir  # noqa: E402
from vidrd.runtime.serve.worker import spec_request  # noqa: E402
from vidrd.runtime.video_io import VideoWriter, read_video  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMITS = Limits(batch=2, frames=4, height=32, width=32, steps=12, overlap=2, clips=3)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    config = ServeConfig(results=str(tmp_path_factory.mktemp("results")), queue_size=8, limits=LIMITS, batch_jobs=3)
    with serve_bench.serving(model, config) as (base, service), httpx.Client(base_url=base, timeout=30) as client:
        yield client, service


def running(client, job_id, steps=1):
    return wait(client, job_id, until=lambda st: st["state"] != "queued" and st["steps_done"] >= steps)


def hold(client) -> str:
    """A running job that keeps the worker busy until it is cancelled (release), so that the jobs submitted meanwhile
    are waiting together when the worker next admits."""
    blocker = submit(client, prompts=["x", "y"], steps=12, clips=3)
    running(client, blocker)
    return blocker


def release(client, blocker) -> None:
    assert client.delete(f"/v1/videos/{blocker}").status_code in (200, 202)
    assert wait(client, blocker)["state"] == "cancelled", "the blocker ended before the jobs were queued"


def overlap(service, a, b) -> bool:
    """Whether jobs a and b ran at the same time (the worker runs one batch at a time)."""
    ja, jb = service.registry.jobs[a], service.registry.jobs[b]
    return ja.started < jb.finished and jb.started < ja.finished


def test_compatible_jobs_share_a_batch_and_each_video_is_the_jobs_own(tmp_path):
    """On the trained embedded model (the tiny random one amplifies the rounding of batched matrices ~1e4-fold:
    tests/tolerances.py): each job's video is the one its request makes alone, through the same video writer."""
    from vidrd.ref.weights import load_dir
    from vidrd.runtime import shapes

    shapes_model = load_dir(shapes.MODEL_DIR)
    limits = Limits(batch=2, frames=8, height=64, width=64, steps=12, overlap=4, clips=3)
    config = ServeConfig(results=str(tmp_path / "results"), queue_size=8, limits=limits, batch_jobs=3,
                         defaults=tuple(shapes.SETTINGS.items()), negative_prompt=shapes.NEGATIVE)
    bodies = [dict(prompts=["a red circle moving right on a black background"], seed=1),
              dict(prompts=["a blue square", "a green triangle"], seed=2, guidance_scale=4.0),
              dict(prompts=["a yellow circle moving up"], seed=3, clips=3, noise_prior=0.3)]
    with serve_bench.serving(shapes_model, config) as (base, service), \
            httpx.Client(base_url=base, timeout=30) as client:
        blocker = client.post("/v1/videos", json={"prompts": ["a"], "steps": 12, "clips": 3}).json()["id"]
        running(client, blocker)  # busy the worker, so the three below queue together
        jobs = [client.post("/v1/videos", json={**body, "steps": 3, "clips": body.get("clips", 2)}).json()["id"]
                for body in bodies]
        release(client, blocker)
        for job_id in jobs:
            assert wait(client, job_id)["state"] == "done"
        assert service.registry.batch_sizes[3] == 3 * 2  # two clips in one batch of three
        rt = open_runtime(shapes_model, limits=limits)
        for job_id in jobs:  # the same request alone, through the same video writer
            spec = client.get(f"/v1/videos/{job_id}").json()["request"]
            clips = list(rt.generate(spec_request(spec)))
            for v in range(len(spec["prompts"])):
                with VideoWriter(tmp_path / f"{job_id}-{v}.mp4", spec["fps"]) as w:
                    for c in clips:
                        w.write(c.frames[v])
                got = client.get(f"/v1/videos/{job_id}/file", params={"video": v})
                (tmp_path / f"got-{job_id}-{v}.mp4").write_bytes(got.content)
                want = read_video(tmp_path / f"{job_id}-{v}.mp4").astype(np.int16)
                have = read_video(tmp_path / f"got-{job_id}-{v}.mp4").astype(np.int16)
                assert want.shape == have.shape and np.abs(want - have).mean() <= BATCHED_MP4_MEAN


def test_incompatible_jobs_never_share_a_batch(server):
    client, service = server
    blocker = hold(client)
    a, b, c = submit(client, steps=2), submit(client, steps=3), submit(client, steps=2, guidance_scale=3.0)
    release(client, blocker)
    for job_id in (a, b, c):
        assert wait(client, job_id)["state"] == "done"
    assert overlap(service, a, c)  # a and c match (guidance_scale is the job's own): one batch
    assert not overlap(service, a, b) and not overlap(service, b, c) and not overlap(service, blocker, a)
    assert service.registry.jobs[b].started >= service.registry.jobs[c].finished  # b waited: nothing overtook it


def test_a_job_with_clip_prompts_runs_alone(server):
    """Per-clip prompts change a job's text context between clips: it runs on its own, as with --batch-jobs 1."""
    client, service = server
    blocker = hold(client)
    a, solo = submit(client, steps=2), submit(client, steps=2, clips=3, clip_prompts=["a cat"])
    b = submit(client, steps=2)
    release(client, blocker)
    for job_id in (a, solo, b):
        assert wait(client, job_id)["state"] == "done"
    assert overlap(service, a, b) and not overlap(service, a, solo) and not overlap(service, b, solo)


def test_cancel_removes_one_job_after_its_step(server):
    client, service = server
    blocker = hold(client)
    keep, stop = submit(client, steps=12, clips=2), submit(client, steps=12, clips=2, seed=9)
    release(client, blocker)
    running(client, stop, steps=2)
    r = client.delete(f"/v1/videos/{stop}")
    assert r.status_code == 202
    st = wait(client, stop)
    assert st["state"] == "cancelled" and st["steps_done"] <= r.json()["steps_done"] + 1 < st["steps_total"]
    assert not any(job_dir(service.config.results, stop).glob("video-*"))
    assert wait(client, keep)["state"] == "done" and overlap(service, keep, stop)


def test_one_jobs_failure_fails_that_job_only_and_an_invalid_job_never_enters(server):
    client, service = server
    blocker = hold(client)
    ok, broken = submit(client, steps=10, clips=3), submit(client, steps=10, clips=3, seed=5)
    # a spec that passed the API once but that the runtime refuses (as an old record might): it fails at admission
    spec = dict(client.get(f"/v1/videos/{ok}").json()["request"], prompts=[" "])
    invalid, refused = asyncio.run(service.submit(spec))
    assert refused is None
    release(client, blocker)
    wait(client, broken, until=lambda st: st["clips_done"] >= 1)
    folder = job_dir(service.config.results, broken)  # its storage breaks under the running job
    shutil.rmtree(folder)
    folder.write_text("not a folder any more")
    st = wait(client, broken)
    assert st["state"] == "failed" and re.search(r"NotADirectory|FileNotFound|No such file", st["error"]), st
    st = wait(client, invalid)
    assert st["state"] == "failed" and "is empty" in st["error"] and st["steps_done"] == 0
    assert wait(client, ok)["state"] == "done" and client.get(f"/v1/videos/{ok}/file").status_code == 200
    assert overlap(service, ok, broken)


def test_metrics_have_the_batch_size_histogram(server):
    client, _ = server
    wait(client, submit(client, steps=2))
    text = client.get("/metrics").text
    assert "# TYPE vidrd_batch_jobs histogram" in text
    counts = dict(re.findall(r'^vidrd_batch_jobs_bucket\{batch_jobs_max="3",le="([^"]+)"\} (\d+)$', text, re.M))
    count = re.search(r'^vidrd_batch_jobs_count\{batch_jobs_max="3"\} (\d+)$', text, re.M)
    assert int(counts["+Inf"]) == int(count.group(1)) >= 1 and int(counts["1"]) <= int(counts["4"])


def test_batch_jobs_flag_is_checked_before_anything_loads(tmp_path, capsys):
    assert main(["serve", "--results", str(tmp_path), "--batch-jobs", "0", "--preset", "tiny"]) == 2
    assert "--batch-jobs 0 must be an integer >= 1" in capsys.readouterr().err
    assert main(["serve", "--results", str(tmp_path), "--batch-jobs", "2", "--ray", "--preset", "tiny"]) == 2
    assert "Ray replicas run one job at a time" in capsys.readouterr().err



def test_a_batch_stopped_mid_clip_resumes_each_job_from_its_last_clip(model, tmp_path):
    """A clean stop (SIGTERM) while two jobs share a batch: both stay running, and the next service resumes both
    from their own checkpoints, in one batch again; their videos equal an uninterrupted batch of the same requests."""
    from contextlib import closing

    from test_job_store import hold_in_clip, same_videos, videos
    from vidrd.runtime.serve.store import Store

    config = ServeConfig(results=str(tmp_path), queue_size=8, limits=LIMITS, batch_jobs=2)
    bodies = [dict(prompts=["a boat"], seed=1), dict(prompts=["a cat", "a dog"], seed=2, guidance_scale=4.0)]
    with serve_bench.serving(model, config) as (base, service), httpx.Client(base_url=base, timeout=30) as client:
        reached = hold_in_clip(service, clip=1, step=1, then=lambda: service._stop.wait(60))  # until the stop
        blocker = hold(client)
        jobs = [submit(client, steps=4, clips=3, **body) for body in bodies]
        release(client, blocker)
        assert reached.wait(60)
    with closing(Store(config.jobs_path())) as store:
        states = {r["id"]: (r["state"], r["clips_done"]) for r in store.load()}
    assert [states[j] for j in jobs] == [("running", 1)] * 2
    with serve_bench.serving(model, config) as (base, service), httpx.Client(base_url=base, timeout=30) as client:
        for job_id in jobs:
            st = wait(client, job_id)
            assert st["state"] == "done" and st["attempts"] == 2
        assert overlap(service, *jobs)
        blocker = hold(client)
        again = [submit(client, steps=4, clips=3, **body) for body in bodies]
        release(client, blocker)
        for job_id, first in zip(again, jobs):
            assert wait(client, job_id)["state"] == "done"
            n = len(client.get(f"/v1/videos/{job_id}").json()["request"]["prompts"])
            same_videos(videos(client, first, n), videos(client, job_id, n), tmp_path)


def test_serve_bench_appends_one_row_with_batch_sizes_and_first_clip(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    args = ["serve-bench", "--workload", "tiny", "--clients", "2", "--batch-jobs", "2", "--out", str(out)]
    assert main(args) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["clients"] == 2 and row["batch_jobs"] == 2 and row["done"] == 2 and row["errors"] == 0
    assert row["first_clip_p50_s"] <= row["p50_s"] and sum(row["batch_sizes"].values()) == 2 * 2  # job-clips
    assert row["workload"]["name"] == "tiny" and "cpu_flags" in row and row["torch_threads"] == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    assert main(["serve-bench", "--workload", "tiny", "--batch-jobs", "0"]) == 2


def test_unet_rows_benchmark_reports_the_per_row_gain_of_larger_batches(tmp_path, capsys):
    import json

    from vidrd.runtime.bench import rows

    out = tmp_path / "rows.jsonl"
    assert rows.main(["--model", "tiny", "--size", "32", "--frames", "2", "--rows", "1,2", "--repeats", "1",
                      "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row == json.loads(capsys.readouterr().out)
    assert row["bench"] == "vidrd.unet_rows" and set(row["rows"]) == {"1", "2"}
    one, two = row["rows"]["1"], row["rows"]["2"]
    assert one["gain_vs_first"] == 1.0 and two["per_row_min_s"] == pytest.approx(two["min_s"] / 2, rel=1e-3)
    assert two["gain_vs_first"] == pytest.approx(one["per_row_min_s"] / two["per_row_min_s"], rel=1e-2)
    assert rows.summarize({2: [4.0, 2.0], 8: [4.0]}) == {
        "2": {"min_s": 2.0, "median_s": 3.0, "per_row_min_s": 1.0, "gain_vs_first": 1.0},
        "8": {"min_s": 4.0, "median_s": 4.0, "per_row_min_s": 0.5, "gain_vs_first": 2.0}}
    with pytest.raises(SystemExit):
        rows.main(["--rows", "2,x"])
