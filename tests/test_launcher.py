"""hydra/launcher=local: CPU threads per job and per DDP rank, and the GPU pool (given device ids, tested on CPU).

Real submitit local jobs throughout. The pool tests run tests/helpers/launcher_app.py, a tiny Hydra app whose jobs
record what their process sees (torch threads, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, start and end times).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import CONF, TINY

from gruexp.threads import threads_per_process, usable_cores
from hydra_plugins.gruexp_plugins.launcher import DevicePool

APP = Path(__file__).parent / "helpers" / "launcher_app.py"
SRC = Path(__file__).resolve().parents[1] / "src"
THREADS_LINE = re.compile(r"job (\d+): (\d+) torch threads? \((.*)\); CUDA_VISIBLE_DEVICES=(\S*) \((.*)\)$", re.M)


def run_app(tmp_path: Path, *args: str, omp: str | None = None) -> subprocess.CompletedProcess:
    """A local-launcher sweep of the tiny app in tmp_path, OMP_NUM_THREADS as given (unset by default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    cmd = [sys.executable, str(APP), "-m", "hydra/launcher=local", f"hydra.searchpath=[file://{CONF}]"]
    cmd += ["hydra.sweep.dir=sweep", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def seen(tmp_path: Path) -> dict[int, dict]:
    """What each job of the sweep recorded, by its x."""
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/seen.json")]
    return {r["x"]: r for r in records}


def test_pool_lends_each_job_its_own_gpus_and_takes_back_those_of_failed_jobs(tmp_path):
    # GPUs 5 and 7, array_parallelism 3 (capped at 2). Job 0 dies at once (os._exit: no result), job 1 raises;
    # job 2 wants both GPUs, so it can run only once both failed jobs gave theirs back (else the sweep would hang).
    r = run_app(
        tmp_path,
        "hydra.launcher.gpus=[5,7]",
        "hydra.launcher.array_parallelism=3",
        "x=0,1,2,3",
        "crash=0",
        "fail=1",
        "wide=2",
        "sleep=0.5",
        omp="2",
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "job #0 ended without a result" in out, out[-3000:]
    assert "array_parallelism 3 capped at 2: 2 GPUs" in out
    jobs = seen(tmp_path)
    assert {x: j["CUDA_VISIBLE_DEVICES"] for x, j in jobs.items()} == {0: "5", 1: "7", 2: "5,7", 3: "5"}
    # no two jobs held one GPU at the same time
    spans = sorted((j["start"], j["end"], set(j["CUDA_VISIBLE_DEVICES"].split(","))) for j in jobs.values())
    for i, (_, end, gpus) in enumerate(spans):
        assert all(not gpus & other or end <= start for start, _, other in spans[i + 1 :]), spans
    # an OMP_NUM_THREADS set by the user is kept, and the job's log says so
    assert {j["threads"] for j in jobs.values()} == {2} and {j["OMP_NUM_THREADS"] for j in jobs.values()} == {"2"}
    log2 = (tmp_path / "sweep" / "2" / "launcher_app.log").read_text()
    line = "job 2: 2 torch threads (OMP_NUM_THREADS=2 set by you); CUDA_VISIBLE_DEVICES=5,7 (GPUs 5,7 of the pool 5,7)"
    assert line in log2


def test_jobs_side_by_side_share_the_cores_and_see_no_gpu_on_a_cpu_pool(tmp_path):
    r = run_app(tmp_path, "hydra.launcher.gpus=[]", "hydra.launcher.array_parallelism=2", "x=0,1", "sleep=0")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    jobs = seen(tmp_path)
    want = threads_per_process(2)  # cores // (2 jobs x 1 process), at least 1
    assert {x: (j["threads"], j["OMP_NUM_THREADS"]) for x, j in jobs.items()} == {
        0: (want, str(want)),
        1: (want, str(want)),
    }
    assert {j["CUDA_VISIBLE_DEVICES"] for j in jobs.values()} == {""}  # submitit's default: no GPU, as before
    for x in jobs:
        m = THREADS_LINE.search((tmp_path / "sweep" / str(x) / "launcher_app.log").read_text())
        assert m and (int(m[1]), int(m[2])) == (x, want)
        assert m[3] == f"{usable_cores()} cores // (2 jobs side by side x 1 process)" and m.groups()[3:] == (
            "",
            "no GPU",
        )


def test_a_job_wanting_more_gpus_than_the_pool_is_refused_in_one_line(tmp_path):
    r = run_app(tmp_path, "hydra.launcher.gpus=[0,1]", "trainer.devices=3", "x=0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: a job wants trainer.devices=3 GPUs but hydra/launcher=local has 2 (0, 1): "
        "lower trainer.devices or list more in hydra.launcher.gpus"
    )
    assert not (tmp_path / "sweep" / "0").exists()


def test_device_pool_waits_for_free_ids_and_hands_out_the_lowest():
    pool = DevicePool([3, 1, 2])
    first = pool.acquire(2)
    assert first == ["3", "1"] and pool.free() == ["2"]
    got: list[list[str]] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(2)))
    waiter.start()
    time.sleep(0.2)
    assert got == [] and waiter.is_alive()  # 1 free, 2 wanted: it waits
    pool.release(["1"])
    waiter.join(timeout=5)
    assert got == [["1", "2"]] and pool.free() == []
    pool.release(first[:1] + got[0])
    assert pool.free() == ["3", "1", "2"]  # back in the pool's order
    with pytest.raises(ValueError, match="4 GPUs wanted from a pool of 3"):
        pool.acquire(4)


@pytest.mark.slow
def test_gruexp_jobs_side_by_side_and_ddp_ranks_get_their_share_of_cores(tmp_path, corpus_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    one_epoch = [*TINY, "trainer.max_epochs=1", "logger=csv", "model=torch"]
    # two gruexp.train jobs side by side: each its share of the cores, said in its train.log
    r = subprocess.run(
        [sys.executable, "-m", "gruexp.train", "-m", "hydra/launcher=local", "hydra.launcher.array_parallelism=2"]
        + ["optimizer.lr=0.5,2", *one_epoch],
        cwd=tmp_path,
        env={**env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multirun").iterdir()
    want = threads_per_process(2)
    for job in ("0", "1"):
        m = THREADS_LINE.search((sweep / job / "train.log").read_text())
        assert m and (m[1], int(m[2])) == (job, want), (sweep / job / "train.log").read_text()[:2000]
        # the console says each job's start and end as they happen, with its values, val/ppl and status
        lr = ("0.5", "2")[int(job)]
        assert f"job {job} started: optimizer.lr={lr} " in r.stdout + r.stderr
        val = json.loads((sweep / job / "summary.json").read_text())["val_ppl"]
        assert f"job {job} ended: completed, val/ppl {val:.3f} (" in r.stdout + r.stderr

    # one DDP job of 2 ranks on CPU, started without a launcher: each rank cores // 2 threads, in its own log
    r = subprocess.run(
        [sys.executable, "-m", "gruexp.train", "trainer.devices=2", *one_epoch],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    logs = {p.name: p.read_text() for p in run.glob("*.log")}
    assert f"2 DDP ranks on CPU: {want} torch threads each ({usable_cores()} cores // 2 ranks)" in logs["train.log"]
    assert f"rank 0/2: {want} torch threads (OMP_NUM_THREADS={want})" in logs["train.log"]
    assert f"rank 1/2: {want} torch threads (OMP_NUM_THREADS={want})" in logs["train_rank1.log"]
