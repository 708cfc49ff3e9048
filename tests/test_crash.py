"""kill -9 of `vidrd serve` under a small client load (runtime/bench/crash.py): every accepted job ends done with
its whole video, or cancelled when a cancel was answered; none lost, none run twice to completion."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from vidrd.runtime.bench import crash  # noqa: E402


@pytest.mark.slow  # two kills and restarts of `vidrd serve`, 12 jobs: about 55 s on two shared cores
def test_kill_9_under_load_loses_no_job(capsys):
    rc = crash.main(["--kills", "2", "--clients", "4", "--jobs-per-client", "3", "--seed", "1", "--max-wall", "240"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(row)
    assert rc == 0 and row["lost"] == row["duplicates"] == 0, row
    assert row["kills"] >= 1 and row["jobs_accepted"] == 12 and row["clean_exit"], row
    assert row["done"] + row["cancelled"] == row["jobs_accepted"], row
