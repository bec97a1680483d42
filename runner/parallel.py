"""One trial across several GPUs, data-parallel, where the spec asks (`gpus_per_trial`).

One training process per GPU (spawned: CUDA does not survive a fork), each running the trainer on its share of
every step's rows (train.Peers); their LoRA gradients are summed before each optimizer step, so the trial computes
what one GPU would (the effective batch is micro-batch x accumulation x GPUs). The worker's process trains
nothing: it answers rank 0's questions (report an eval, stop?) with the worker's own callbacks, so Optuna, the
lease and the signal handlers stay where they are, and it stops every process when one fails or when a callback
raises. NCCL between GPUs, gloo between CPU processes (what the tests run).
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import os
import signal
import socket
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from runner.data import SweepData
from runner.peers import Peers
from runner.train import Preempted, TrialResult, quiet_libraries, run_trial
from sweeper.errors import SweeperError, first_line
from sweeper.spec import SweepSpec

GRACE_S = 5  # how long the others get to say why, once one process failed
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 may wait that long on a slow store or a Drive write
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def trial_devices(gpus_per_trial: int) -> list[str]:
    """The devices one trial trains on: the first gpus_per_trial visible GPUs (fewer if fewer are visible)."""
    return [f"cuda:{i}" for i in range(min(gpus_per_trial, torch.cuda.device_count()))]


def run_trial_parallel(spec: SweepSpec, params: dict[str, Any], trial_dir: Path, sweep_data: SweepData,
                       report: Callable[[int, float], bool] | None = None, *, devices: list[str],
                       precision: str | None = None, log: Callable[[str], None] = print,
                       stop: Callable[[], str | None] | None = None,
                       progress: Callable[[int, int, float, float | None], None] | None = None) -> TrialResult:
    """run_trial, on one process per device: the same arguments, result and exceptions (Preempted, the trainer's
    errors), and a one-line SweeperError when a training process dies."""
    context = mp.get_context("spawn")
    data = SweepData(None, sweep_data.train, sweep_data.eval)  # the tokenizer stays here: training never uses it
    address = f"tcp://127.0.0.1:{_free_port()}"
    links: list[Connection] = []
    procs: list[mp.process.BaseProcess] = []
    try:
        for rank in range(len(devices)):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_train_rank, name=f"sweeper-rank-{rank}", daemon=True,
                                   args=(theirs, address, rank, devices, spec, params, trial_dir, data, precision,
                                         os.getpid()))
            # Ctrl-C reaches the whole process group, Kaggle's SIGTERM maybe too: the worker alone decides to stop
            # (it checkpoints first). Blocked while starting, the children inherit it; here it is only delayed.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            procs.append(proc)
            theirs.close()
            links.append(ours)
        log(f"  training on {len(devices)} processes at once ({', '.join(devices)})")
        return _serve(links, procs, devices, report, stop, log, progress)
    except BaseException:
        for proc in procs:  # a checkpoint is written before Preempted comes back, and is only ever renamed in
            proc.kill()
        raise
    finally:
        for proc in procs:  # they ignore SIGTERM: leaving is the worker's call
            proc.join(timeout=GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _serve(links: list[Connection], procs, devices: list[str], report, stop, log, progress=None) -> TrialResult:
    """Answer rank 0 until a result, Preempted or a failure comes back; log what any of them says."""
    unread = list(links)  # until they read EOF
    running = {proc.sentinel: rank for rank, proc in enumerate(procs)}
    while True:
        ready = wait([*unread, *running])
        for link in [r for r in ready if r in unread]:
            rank = links.index(link)
            try:
                kind, value = link.recv()
            except (EOFError, OSError):  # OSError: it died with our answer unread
                unread.remove(link)  # the process has ended: its sentinel says how
                continue
            if kind == "log":
                log(value)
            elif kind == "progress":
                if progress is not None:
                    progress(*value)
            elif kind == "report":
                _answer(link, report is not None and report(*value))
            elif kind == "stop":
                _answer(link, stop() if stop is not None else None)
            elif kind == "result":
                return value
            elif kind == "preempted":
                raise Preempted(*value)
            else:  # "error"
                raise _failure(links, procs, devices, rank, value) from None
        for sentinel in [r for r in ready if r in running]:
            rank = running.pop(sentinel)
            if links[rank] in unread:
                running[sentinel] = rank  # what it sent before it ended comes first
            elif rank == 0 or procs[rank].exitcode != 0:
                raise _failure(links, procs, devices, rank, None) from None


def _answer(link: Connection, value: Any) -> None:
    try:
        link.send(value)
    except OSError:
        pass  # it died meanwhile: its sentinel says so next


def _failure(links: list[Connection], procs, devices: list[str], rank: int,
             error: BaseException | None) -> BaseException:
    """What explains a failure: an error of the trainer's from any process; else a process that died without a
    word (killed, out of host memory); else the collective error (another process went)."""
    if error is not None and not _lost_a_peer(error):
        return error
    for proc in procs:
        proc.join(timeout=GRACE_S)
    said = {r: error if r == rank else _last_error(link) for r, link in enumerate(links)}
    for e in said.values():
        if e is not None and not _lost_a_peer(e):
            return e
    for r, e in said.items():
        if e is None and procs[r].exitcode not in (0, None):
            return SweeperError(f"the training process of rank {r} ({devices[r]}) died (exit {procs[r].exitcode}); "
                                "the others were stopped")
    return error or SweeperError(f"the training process of rank {rank} ({devices[rank]}) ended without a result")


def _last_error(link: Connection) -> BaseException | None:
    try:
        while link.poll():
            kind, value = link.recv()
            if kind == "error":
                return value
    except (EOFError, OSError):
        pass
    return None


def _lost_a_peer(error: BaseException) -> bool:
    """Whether the error is a collective failing because another process went (gloo: connection closed)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or "gloo" in str(error).lower() or "nccl" in str(error).lower()


def preflight_apart(spec: SweepSpec, sweep_data: SweepData, device: str, precision: str | None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The preflight (runner/doctor.py) on a trial's first GPU, in a process of its own: the worker's process trains
    nothing, and a CUDA context of its own would hold memory on that GPU for the worker's whole life. Its check lines
    are logged from the card it returns."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    data = SweepData(None, sweep_data.train, sweep_data.eval)  # the tokenizer stays here, as for a trial
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            card = pool.submit(_preflight, spec, data, device, precision).result()
    except BrokenProcessPool:
        raise SweeperError(f"preflight failed: its process on {device} died without a word") from None
    for c in card["checks"]:
        log(f"  preflight {c['name']}: {c['status']} ({c['detail']})")
    return card


def _preflight(spec: SweepSpec, data: SweepData, device: str, precision: str | None) -> dict[str, Any]:
    from runner.train import BaseModel, preflight

    quiet_libraries()
    return preflight(spec, data, BaseModel(), device=device, precision=precision, log=lambda line: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int) -> None:
    """Be killed when the worker's process dies, however it dies (Linux): a GPU is not left held by an orphan."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(0)  # it died before the call


def _train_rank(link: Connection, address: str, rank: int, devices: list[str], spec: SweepSpec,
                params: dict[str, Any], trial_dir: Path, data: SweepData, precision: str | None, parent: int) -> None:
    """One training process: join the group, train its share, send rank 0's result (or any error) back."""
    _die_with(parent)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    import torch.distributed as dist

    def tell(kind: str, value: Any = None) -> None:
        try:
            link.send((kind, value))
        except OSError:  # a broken pipe: the worker is gone
            os._exit(0)

    def ask(kind: str, value: Any = None) -> Any:
        tell(kind, value)
        try:
            return link.recv()
        except (EOFError, OSError):
            os._exit(0)

    quiet_libraries()
    first, device = rank == 0, torch.device(devices[rank])
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
                                world_size=len(devices), timeout=COLLECTIVE_TIMEOUT)
        result = run_trial(spec, params, trial_dir, data, (lambda k, loss: ask("report", (k, loss))) if first else None,
                           device=str(device), precision=precision, peers=Peers(rank, len(devices)),
                           log=lambda line: tell("log", line if first else f"  [rank {rank}] {line.lstrip()}"),
                           stop=(lambda: ask("stop")) if first else None,
                           progress=(lambda *value: tell("progress", value)) if first else None)
        if first:
            tell("result", result)
    except Preempted as e:
        if first:
            tell("preempted", (e.reason, e.checkpoint))
    except BaseException as e:  # noqa: BLE001 - whatever it is, it goes back to the worker, one line
        tell("error", _portable(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling (the trainer's own errors, CUDA OOM), else its text."""
    import pickle

    error.__traceback__ = None
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001
        return SweeperError(f"{type(error).__name__}: {first_line(error)}")
