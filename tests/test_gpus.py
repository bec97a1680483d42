"""One worker per GPU (or per group of the spec's gpus_per_trial): each a `sweeper worker` process that sees only its
GPUs, its output prefixed; the worker command is faked on the CPU, the study is real."""

from __future__ import annotations

import sys

import pytest

from runner import gpus
from sweeper.cli import worker
from sweeper.errors import SweeperError
from sweeper.spec import spec_from_dict
from sweeper.study import create_study

# Stands in for `sweeper worker`: says what it was given on stderr (the log), a summary on stdout, as the real one.
FAKE_WORKER = """\
import json, os, sys
gpu = os.environ["CUDA_VISIBLE_DEVICES"]
print(f"joins with {sys.argv[1:]}", file=sys.stderr)
print(f"store from env: {os.environ['SWEEPER_STORE'] == os.environ['EXPECTED_STORE']}", file=sys.stderr)
if gpu == os.environ.get("FAIL_ON_GPU"):
    print("Error: out of luck", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"worker": f"ana/{gpu}", "trials": [int(gpu[0])], "stop_reason": "ran --max-trials 1"}))
"""


@pytest.fixture
def fake_worker(monkeypatch):
    monkeypatch.setattr(gpus, "WORKER_COMMAND", [sys.executable, "-c", FAKE_WORKER])


def make_study(url: str, spec_table: dict, gpus_per_trial: int = 1) -> str:
    create_study(spec_from_dict({**spec_table, "gpus_per_trial": gpus_per_trial}), url)
    return url


@pytest.fixture
def store(tmp_path, spec_table, monkeypatch) -> str:
    url = make_study(f"journal://{tmp_path / 'sweep.log'}", spec_table)
    monkeypatch.setenv("EXPECTED_STORE", url)
    return url


def test_two_gpus_run_two_workers_each_on_its_own_gpu(fake_worker, store):
    lines: list[str] = []
    summaries = gpus.run_workers_per_gpu(store, "demo", gpus=["0", "1"], max_trials=1, account="ana",
                                         deadline_hours=2.0, log=lines.append)

    assert [(s.worker_id, s.trials) for s in summaries] == [("ana/0", [0]), ("ana/1", [1])]
    assert lines[0] == "2 workers, one per GPU (0, 1)"
    args = ["--study", "demo", "--max-trials", "1", "--account", "ana", "--deadline-hours", "2.0"]
    for gpu in ("0", "1"):
        assert f"[gpu {gpu}] joins with {args}" in lines and f"[gpu {gpu}] store from env: True" in lines
    assert store not in args  # the store URL, password and all, travels by environment only
    worker.make_context("worker", ["--store", "x://", *args])  # the real command takes exactly these options


def test_a_failed_worker_fails_the_call_after_the_other_finishes(fake_worker, store, monkeypatch):
    monkeypatch.setenv("FAIL_ON_GPU", "1")
    lines: list[str] = []
    with pytest.raises(SweeperError, match=r"the worker on GPU 1 \(exit 1\) failed"):
        gpus.run_workers_per_gpu(store, gpus=["0", "1"], log=lines.append)
    assert "[gpu 1] Error: out of luck" in lines and any(line.startswith("[gpu 0] joins") for line in lines)


def test_a_spec_asking_two_gpus_per_trial_runs_one_worker_per_pair(fake_worker, tmp_path, spec_table, monkeypatch):
    url = make_study(f"journal://{tmp_path / 'pairs.log'}", spec_table, gpus_per_trial=2)
    monkeypatch.setenv("EXPECTED_STORE", url)
    lines: list[str] = []
    summaries = gpus.run_workers_per_gpu(url, gpus=["0", "1", "2", "3"], log=lines.append)

    assert [s.worker_id for s in summaries] == ["ana/0,1", "ana/2,3"]  # each worker process sees its pair
    assert lines[0] == "2 workers, one per group of GPUs (0,1; 2,3)"
    assert gpus.gpu_groups(url, gpus=["0", "1", "2"]) == [["0", "1"], ["2"]]  # the odd one out trains alone


def test_a_single_group_of_gpus_runs_the_worker_in_this_process(monkeypatch, tmp_path, spec_table, store):
    calls = []
    monkeypatch.setattr(gpus, "run_worker", lambda store, study, **kw: calls.append((store, study, kw)) or "summary")
    assert gpus.run_workers_per_gpu(store, "demo", gpus=[], max_trials=2) == ["summary"]
    assert gpus.run_workers_per_gpu(store, "demo", gpus=["0"]) == ["summary"]
    lines: list[str] = []
    assert gpus.run_workers_per_gpu(store, "demo", gpus=["0", "1"], per_gpu=False, log=lines.append) == ["summary"]
    assert lines == ["one worker for 2 GPUs: its trials train on the spec's gpus_per_trial of them "
                     "(per_gpu=True runs one worker per GPU)"]
    pairs = make_study(f"journal://{tmp_path / 'pairs.log'}", spec_table, gpus_per_trial=2)
    assert gpus.run_workers_per_gpu(pairs, gpus=["0", "1"]) == ["summary"]  # one trial across both, in this process
    assert calls[0][2]["max_trials"] == 2 and len(calls) == 4


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
