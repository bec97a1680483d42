"""Two GPUs, two trials at once: one worker process per visible GPU, each seeing only its own GPU.

The trainer runs a trial on one GPU, so on Kaggle's T4 x2 one worker per GPU keeps both busy
(DESIGN.md: not device_map="auto", which leaves one idle). With 0 or 1 GPU the worker runs in this process.
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


def run_workers_per_gpu(store: str, study: str | None = None, *, per_gpu: bool = True, gpus: list[str] | None = None,
                        max_trials: int | None = None, account: str | None = None, checkpoint_root: str | None = None,
                        deadline_hours: float | None = None, precision: str | None = None,
                        log: Callable[[str], None] = print) -> list[WorkerSummary]:
    """One `sweeper worker` process per GPU (max_trials each), their output prefixed with the GPU; with one GPU,
    none, or per_gpu False, one worker in this process (on the first GPU only)."""
    gpus = visible_gpus() if gpus is None else gpus
    if not per_gpu or len(gpus) < 2:
        if len(gpus) > 1:
            log(f"one worker for {len(gpus)} GPUs: it trains on the first GPU only (per_gpu=True runs one per GPU)")
        return [run_worker(store, study, max_trials=max_trials, account=account, checkpoint_root=checkpoint_root,
                           deadline_hours=deadline_hours, precision=precision, log=log)]

    args = worker_args(study, max_trials, account, checkpoint_root, deadline_hours, precision)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    procs: dict[str, subprocess.Popen] = {}
    outputs: dict[str, IO[str]] = {}

    def pump(gpu: str, stream) -> None:
        for line in stream:
            lines.put((gpu, line))
        lines.put((gpu, None))

    try:
        for gpu in gpus:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "SWEEPER_STORE": store, "PYTHONUNBUFFERED": "1"}
            # stdout (the summary line) to a file: a pipe nobody reads until the end could fill and block the worker
            outputs[gpu] = tempfile.TemporaryFile("w+")
            procs[gpu] = subprocess.Popen(WORKER_COMMAND + args, env=env, text=True,
                                          stdout=outputs[gpu], stderr=subprocess.PIPE)
            threading.Thread(target=pump, args=(gpu, procs[gpu].stderr), daemon=True).start()
        log(f"{len(gpus)} workers, one per GPU ({', '.join(gpus)})")
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
                failed.append(f"GPU {gpu} (exit {proc.returncode})")
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
