"""One worker per GPU: each a `sweeper worker` process that sees one GPU, its output prefixed; faked on the CPU."""

from __future__ import annotations

import sys

import pytest

from runner import gpus
from sweeper.cli import worker
from sweeper.errors import SweeperError

# Stands in for `sweeper worker`: says what it was given on stderr (the log), a summary on stdout, as the real one.
FAKE_WORKER = """\
import json, os, sys
gpu = os.environ["CUDA_VISIBLE_DEVICES"]
print(f"joins with {sys.argv[1:]}", file=sys.stderr)
print(f"store from env: {os.environ['SWEEPER_STORE'] == 'postgresql://u:pw@h/db'}", file=sys.stderr)
if gpu == os.environ.get("FAIL_ON_GPU"):
    print("Error: out of luck", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"worker": f"ana/{gpu}", "trials": [int(gpu)], "stop_reason": "ran --max-trials 1"}))
"""


@pytest.fixture
def fake_worker(monkeypatch):
    monkeypatch.setattr(gpus, "WORKER_COMMAND", [sys.executable, "-c", FAKE_WORKER])


def test_two_gpus_run_two_workers_each_on_its_own_gpu(fake_worker):
    lines: list[str] = []
    summaries = gpus.run_workers_per_gpu("postgresql://u:pw@h/db", "demo", gpus=["0", "1"], max_trials=1, account="ana",
                                         deadline_hours=2.0, log=lines.append)

    assert [(s.worker_id, s.trials) for s in summaries] == [("ana/0", [0]), ("ana/1", [1])]
    assert lines[0] == "2 workers, one per GPU (0, 1)"
    args = ["--study", "demo", "--max-trials", "1", "--account", "ana", "--deadline-hours", "2.0"]
    for gpu in ("0", "1"):
        assert f"[gpu {gpu}] joins with {args}" in lines and f"[gpu {gpu}] store from env: True" in lines
    assert not any("pw" in arg for arg in args)  # the store URL, password and all, travels by environment only
    worker.make_context("worker", ["--store", "x://", *args])  # the real command takes exactly these options


def test_a_failed_worker_fails_the_call_after_the_other_finishes(fake_worker, monkeypatch):
    monkeypatch.setenv("FAIL_ON_GPU", "1")
    lines: list[str] = []
    with pytest.raises(SweeperError, match=r"the worker on GPU 1 \(exit 1\) failed"):
        gpus.run_workers_per_gpu("postgresql://u:pw@h/db", gpus=["0", "1"], log=lines.append)
    assert "[gpu 1] Error: out of luck" in lines and any(line.startswith("[gpu 0] joins") for line in lines)


def test_one_gpu_or_none_runs_the_worker_in_this_process(monkeypatch):
    calls = []
    monkeypatch.setattr(gpus, "run_worker", lambda store, study, **kw: calls.append((store, study, kw)) or "summary")
    assert gpus.run_workers_per_gpu("sqlite:///x.db", "demo", gpus=[], max_trials=2) == ["summary"]
    assert gpus.run_workers_per_gpu("sqlite:///x.db", "demo", gpus=["0"]) == ["summary"]
    lines: list[str] = []
    assert gpus.run_workers_per_gpu("sqlite:///x.db", "demo", gpus=["0", "1"], per_gpu=False, log=lines.append) == ["summary"]
    assert lines == ["one worker for 2 GPUs: it trains on the first GPU only (per_gpu=True runs one per GPU)"]
    assert calls[0][2]["max_trials"] == 2 and len(calls) == 3


@pytest.mark.parametrize("env, count, expected", [
    (None, 0, []), ("", 0, []), ("-1", 0, []), (None, 2, ["0", "1"]), ("1,0", 2, ["1", "0"]),
    ("GPU-aa,GPU-bb", 2, ["GPU-aa", "GPU-bb"]), ("0,1", 1, ["0"]),
])
def test_visible_gpus_follow_cuda_visible_devices_and_the_device_count(monkeypatch, env, count, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert gpus.visible_gpus() == expected
