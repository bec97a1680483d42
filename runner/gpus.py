"""Two GPUs, two trials at once: one worker process per visible GPU, each seeing only its own GPU.

On Kaggle's T4 x2 one worker per GPU keeps both busy (docs/design.md: not device_map="auto", which leaves one idle).
A spec with `gpus_per_trial = 2` trains each trial on two GPUs at once instead (runner/parallel.py): one worker
per pair. With a single group of GPUs (or none) the worker runs in this process.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import IO

from runner.worker import WorkerSummary, run_worker
from sweeper.errors import SweeperError
from sweeper.study import load_study

WORKER_COMMAND = [sys.executable, "-m", "sweeper.cli", "worker"]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    import torch

    count = torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(count)]


def worker_args(study: str | None, max_trials: int | None, account: str | None, checkpoint_root: str | None,
                deadline_hours: float | None, precision: str | None) -> list[str]:
    """`sweeper worker` options for these settings; the store URL goes by environment, never on a command line."""
    options = {"--study": study, "--max-trials": max_trials, "--account": account, "--checkpoint-root": checkpoint_root,
               "--deadline-hours": deadline_hours, "--precision": precision}
    return [part for option, value in options.items() if value is not None for part in (option, str(value))]


def gpu_groups(store: str, study: str | None = None, *, per_gpu: bool = True,
               gpus: list[str] | None = None) -> list[list[str]]:
    """The GPUs each worker sees: one per GPU, or groups of the study spec's gpus_per_trial; all of them for a
    single worker (per_gpu False, or fewer than two GPUs)."""
    gpus = visible_gpus() if gpus is None else gpus
    if not per_gpu or len(gpus) < 2:
        return [gpus]
    size = load_study(store, study)[1].gpus_per_trial
    return [gpus[i:i + size] for i in range(0, len(gpus), size)]


def run_workers_per_gpu(store: str, study: str | None = None, *, per_gpu: bool = True, gpus: list[str] | None = None,
                        max_trials: int | None = None, account: str | None = None, checkpoint_root: str | None = None,
                        deadline_hours: float | None = None, precision: str | None = None, allow_cpu: bool = False,
                        log: Callable[[str], None] = print) -> list[WorkerSummary]:
    """One `sweeper worker` process per GPU, or per group of the spec's gpus_per_trial GPUs (max_trials each), their
    output prefixed with the GPUs; with a single group (one GPU, none, per_gpu False), one worker in this process."""
    groups = gpu_groups(store, study, per_gpu=per_gpu, gpus=gpus)
    if len(groups) == 1:
        if not per_gpu and len(groups[0]) > 1:
            log(f"one worker for {len(groups[0])} GPUs: its trials train on the spec's gpus_per_trial of them "
                "(per_gpu=True runs one worker per GPU)")
        return [run_worker(store, study, max_trials=max_trials, account=account, checkpoint_root=checkpoint_root,
                           deadline_hours=deadline_hours, precision=precision, allow_cpu=allow_cpu, log=log)]

    args = worker_args(study, max_trials, account, checkpoint_root, deadline_hours, precision)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    procs: dict[str, subprocess.Popen] = {}
    outputs: dict[str, IO[str]] = {}

    def pump(gpu: str, stream) -> None:
        for line in stream:
            lines.put((gpu, line))
        lines.put((gpu, None))

    try:
        for gpu in (",".join(group) for group in groups):
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "SWEEPER_STORE": store, "PYTHONUNBUFFERED": "1"}
            # stdout (the summary line) to a file: a pipe nobody reads until the end could fill and block the worker
            outputs[gpu] = tempfile.TemporaryFile("w+")
            procs[gpu] = subprocess.Popen(WORKER_COMMAND + args, env=env, text=True,
                                          stdout=outputs[gpu], stderr=subprocess.PIPE)
            threading.Thread(target=pump, args=(gpu, procs[gpu].stderr), daemon=True).start()
        per, sep = ("GPU", ", ") if all(len(g) == 1 for g in groups) else ("group of GPUs", "; ")
        log(f"{len(groups)} workers, one per {per} ({sep.join(outputs)})")
        streams = len(procs)
        while streams:  # log from this thread: a notebook shows output printed by the cell's own thread
            gpu, line = lines.get()
            if line is None:
                streams -= 1
            else:
                log(f"[gpu {gpu}] {line.rstrip()}")
        summaries, failed = [], []
        for gpu, proc in procs.items():
            proc.wait()
            outputs[gpu].seek(0)
            try:
                summary = json.loads(outputs[gpu].read().strip().splitlines()[-1])
            except (IndexError, ValueError):
                summary = None
            if proc.returncode != 0 or summary is None:
                failed.append(f"GPU{'s' if ',' in gpu else ''} {gpu} (exit {proc.returncode})")
                continue
            summaries.append(WorkerSummary(summary["worker"], summary["trials"], summary["stop_reason"]))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: each worker checkpoints and hands its trial over
        for proc in procs.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    if failed:
        raise SweeperError(f"the worker on {', '.join(failed)} failed; its last lines are above")
    return summaries
