"""One QLoRA trial: 4-bit base -> fresh LoRA -> packed data -> steps -> eval/report -> checkpoint -> result.

Reads top to bottom. Knows nothing of Optuna: the worker passes `report(eval_index, eval_loss)`,
which returns True when the trial should stop (pruned). Its nouns live next door: runner/model.py (the base,
loaded once per worker, and its adapters), runner/step.py (loss, micro-batch, accumulation, eval),
runner/checkpoints.py, runner/peers.py (a trial on several GPUs), runner/data.py (the sweep's data).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from runner.data import SweepData, prepare_data
from runner.doctor import preflight
from runner.model import BaseModel, make_optimizer, pick_precision, resolve_device
from runner.peers import ALONE, Peers
from runner.platform import library_versions
from runner.step import (NonFiniteLoss, choose_micro_batch, evaluate, is_checkpointing, precision_name,
                         set_checkpointing, take_step, to_tensors)
from sweeper.spec import SweepSpec

__all__ = ["run_trial", "prepare_data", "pick_precision", "quiet_libraries", "library_versions",
           "result_attrs", "TrialResult", "Preempted", "NonFiniteLoss", "SweepData", "latest_checkpoint", "BaseModel",
           "Peers", "ALONE", "preflight"]


class Preempted(Exception):
    """The trial stopped early on request (session deadline, SIGTERM, Ctrl-C), after writing a checkpoint."""

    def __init__(self, reason: str, checkpoint: Path):
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


@dataclass
class TrialResult:
    eval_loss: float | None
    """Final eval loss (the objective); for a pruned or diverged trial, the last (finite) eval loss."""
    pruned_at: int | None
    """Eval index at which the trial was pruned, or None."""
    eval_losses: list[float]
    train_loss: list[list[float]]
    """[step, loss] pairs, at most about 50."""
    steps: int
    total_steps: int
    train_tokens: int
    tokens_per_s: float
    peak_mem_mb: float
    wall_time_s: float
    micro_batch: int
    grad_accum: int
    precision: str
    gradient_checkpointing: bool
    checkpoint: str
    resumed_from_step: int = 0
    gpus: int = 1
    """Processes (GPUs) the trial trained on at once; micro_batch and grad_accum are each one's."""
    fused_kernels: bool = False
    """Whether Liger Kernel's fused kernels and loss ran (CUDA, the `liger` extra installed, a supported model)."""
    diverged: str = ""
    """Why the loss became NaN or inf (the trial ended there: a result, told PRUNED); "" for a trial that did not."""
    versions: dict[str, str] = field(default_factory=dict)


def run_trial(spec: SweepSpec, params: dict[str, Any], trial_dir: Path, sweep_data: SweepData,
              report: Callable[[int, float], bool] | None = None, *, device: str | None = None,
              precision: str | None = None, log: Callable[[str], None] = print,
              stop: Callable[[], str | None] | None = None, peers: Peers = ALONE,
              progress: Callable[[int, int, float, float | None], None] | None = None,
              base: BaseModel | None = None) -> TrialResult:
    """Train one trial to its token budget, evaluating `budget.evals` times; resume from trial_dir if it holds a
    checkpoint. `stop` is asked after every step: a reason makes it checkpoint and raise Preempted. `progress` is
    told (step, total steps, tokens/s, latest eval loss) after every step (runner/progress.py). `base`: the base
    model a worker keeps across its trials (None: loaded for this trial alone). With peers, rank 0 alone reports,
    is asked to stop, writes checkpoints and logs the trial's progress; the others follow its answers and log only
    what is their own (their micro-batch probe, running out of memory)."""
    started = time.perf_counter()
    cfg = spec.trial_config(params)
    dev = resolve_device(device)
    dtype = pick_precision(dev, precision)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base = base or BaseModel()
    with base.lora(spec, cfg, dev, dtype) as model:
        model.train()
        train, evalset = to_tensors(sweep_data.train), to_tensors(sweep_data.eval)
        total_steps = max(1, len(sweep_data.train) // cfg.batch_size)
        optimizer, scheduler = make_optimizer(model, cfg, total_steps)
        scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
        eval_at = {max(1, round(total_steps * k / spec.budget.evals)): k for k in range(1, spec.budget.evals + 1)}
        saver = Saver(trial_dir, model, optimizer, scheduler, scaler, peers)
        state = saver.resume(params, total_steps, log)
        resumed_from, pruned_at = state["step"], None
        if peers.rank > 0:  # the same LoRA init as rank 0, but its own dropout (checkpoints keep rank 0's RNG)
            torch.manual_seed(cfg.seed + 1_000_003 * peers.rank + state["step"])
        if state.get("gradient_checkpointing"):
            set_checkpointing(model, True)  # the interrupted run needed it to fit
        my_rows = max(1, len(range(peers.rank, cfg.batch_size, peers.size)))
        micro = state["micro_batch"] or choose_micro_batch(model, train, my_rows, dev, dtype, log)
        reset_peak_memory(dev)  # the trial's peak, not the probe's near-OOM attempts

        diverged = ""  # a NaN/inf loss ends the trial as a result (every peer sees the same summed loss)
        for step in range(state["step"], total_steps):
            t0 = time.perf_counter()
            rows = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            try:
                loss_value, micro = take_step(model, {k: v[rows] for k, v in train.items()}, micro, optimizer,
                                              scheduler, scaler, cfg.max_grad_norm, dev, dtype, peers,
                                              f"step {step + 1}", log)
            except NonFiniteLoss as e:
                diverged = str(e)
                break
            state.update(step=step + 1, micro_batch=micro, gradient_checkpointing=is_checkpointing(model))
            state["tokens"] += sum(sweep_data.train.real[rows])
            state["train_seconds"] += time.perf_counter() - t0
            state["train_loss"].append([step + 1, round(loss_value, 5)])

            if state["step"] in eval_at:
                eval_loss = evaluate(model, evalset, micro, dev, dtype, peers)
                if not math.isfinite(eval_loss):
                    diverged = f"eval loss became {eval_loss} at step {state['step']} ({precision_name(dtype)})"
                    break
                state["eval_losses"].append(eval_loss)
                if peers.rank == 0:
                    log(f"  eval {eval_at[state['step']]}/{spec.budget.evals} step {state['step']}/{total_steps}: "
                        f"train {loss_value:.4f} eval {eval_loss:.4f}")
                if peers.first_says(report is not None and report(eval_at[state["step"]], eval_loss), dev):
                    pruned_at = eval_at[state["step"]]
                    break
            if progress is not None:
                progress(state["step"], total_steps, state["tokens"] / state["train_seconds"],
                         state["eval_losses"][-1] if state["eval_losses"] else None)
            saved = saver.every(state, spec.budget.checkpoint_every, total_steps)
            if state["step"] < total_steps:
                why = stop() if stop is not None else None
                if peers.first_says(why is not None, dev):
                    raise Preempted(why or "rank 0 stopped", saved or saver.save(state))

        return trial_result(state, total_steps, pruned_at, resumed_from, micro, my_rows, model, dev, dtype, peers,
                            saver.last, base.fused, time.perf_counter() - started, diverged)


@dataclass
class Saver:
    """Where a trial's checkpoints go; rank 0 alone writes them."""

    trial_dir: Path
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    peers: Peers
    last: Path | None = None

    def resume(self, params: dict[str, Any], total_steps: int, log: Callable[[str], None]) -> dict[str, Any]:
        """The state of the latest checkpoint in the trial's folder, loaded into the model and optimizer; or step 0."""
        self.trial_dir.mkdir(parents=True, exist_ok=True)
        self.last = latest_checkpoint(self.trial_dir)
        if self.last is None:
            return {"step": 0, "params": params, "train_loss": [], "eval_losses": [], "micro_batch": None,
                    "train_seconds": 0.0, "tokens": 0}
        state = load_checkpoint(self.last, self.model, self.optimizer, self.scheduler, self.scaler, params)
        if self.peers.rank == 0:
            log(f"resuming from {self.last} (step {state['step']}/{total_steps})")
        return state

    def save(self, state: dict[str, Any]) -> Path | None:
        if self.peers.rank == 0:
            self.last = save_checkpoint(self.trial_dir, self.model, self.optimizer, self.scheduler, self.scaler, state)
            return self.last
        return None

    def every(self, state: dict[str, Any], every: int, total_steps: int) -> Path | None:
        """A checkpoint every `every` steps and at the last; the one written now, if any."""
        return self.save(state) if state["step"] % every == 0 or state["step"] == total_steps else None


def trial_result(state, total_steps: int, pruned_at: int | None, resumed_from: int, micro: int, my_rows: int,
                 model, dev: torch.device, dtype: torch.dtype, peers: Peers, checkpoint: Path | None, fused: bool,
                 wall_s: float, diverged: str = "") -> TrialResult:
    tokens_per_s = state["tokens"] / state["train_seconds"] if state["train_seconds"] else 0.0
    return TrialResult(
        eval_loss=state["eval_losses"][-1] if state["eval_losses"] else None,
        pruned_at=pruned_at,
        eval_losses=state["eval_losses"],
        train_loss=state["train_loss"][:: max(1, len(state["train_loss"]) // 50)],
        steps=state["step"],
        total_steps=total_steps,
        train_tokens=state["tokens"],
        tokens_per_s=round(tokens_per_s, 1),
        peak_mem_mb=round(float(peers.reduce(torch.tensor(_peak_mem_mb(dev), device=dev), "max")), 1),
        wall_time_s=round(wall_s, 2),
        micro_batch=micro,
        grad_accum=math.ceil(my_rows / micro),
        precision=precision_name(dtype),
        gradient_checkpointing=is_checkpointing(model),
        checkpoint=str(checkpoint) if checkpoint else "",
        resumed_from_step=resumed_from,
        gpus=peers.size,
        fused_kernels=fused,
        diverged=diverged,
        versions=library_versions(),
    )


def reset_peak_memory(device: torch.device) -> None:
    """Count the peak from now: the GPU allocator's, or on the CPU the process's resident set (Linux resets its high
    water mark on writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the process's whole-life peak it is


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # the resident set's high water mark since reset_peak_memory
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# What the worker writes next to a result


def result_attrs(result: TrialResult) -> dict[str, Any]:
    """The result as trial user attrs (JSON-safe), the names report.py shows."""
    return asdict(result)


def quiet_libraries() -> None:
    """Progress bars and deprecation chatter from transformers would bury the worker's own log."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    # Logged when bitsandbytes is imported, before any model: set up before that.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_cpu_inference_kernel_line)


def _not_the_cpu_inference_kernel_line(record) -> bool:
    """bitsandbytes on an AVX512-BF16 CPU asks for `pip install kernels`: that kernel serves only the inference-only
    weight format the runner keeps its weights out of (keep_4bit_weights_trainable), so the line asks for nothing."""
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")

