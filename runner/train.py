"""One QLoRA trial: load 4-bit base -> LoRA -> packed data -> steps -> eval/report -> checkpoint -> result.

Reads top to bottom. Knows nothing of Optuna: the worker passes `report(eval_index, eval_loss)`,
which returns True when the trial should stop (pruned).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner import data as D
from runner.hub import cannot_load, check_model_source
from sweeper.errors import SweeperError
from sweeper.spec import SweepSpec, TrainSpec

CPU_MAX_MICRO_BATCH = 8  # on the CPU memory is no limit; this keeps a step's latency modest


class NonFiniteLoss(SweeperError):
    """The training loss became NaN or inf (fp16 overflow, too high a learning rate)."""


@dataclass(frozen=True)
class Peers:
    """The processes that train one trial together (runner/parallel.py), as the trainer sees them.

    Each takes every `size`-th row of a step and of the eval set, from row `rank` on; losses are taken over the
    whole step's tokens, and gradients and losses are summed across the processes, so the step is the one a single
    GPU would take. Alone: rank 0 of 1, and nothing is sent anywhere.
    """

    rank: int = 0
    size: int = 1

    def share(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors if self.size == 1 else {k: v[self.rank::self.size] for k, v in tensors.items()}

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The tensor summed (or max-ed) over all processes, in place."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def first_says(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's flag, on every process (rank 0 alone answers to the worker: prune, stop)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=device)
        dist.broadcast(value, src=0)
        return bool(value.item())


ALONE = Peers()


@dataclass
class SweepData:
    """What every trial of a sweep shares: the tokenizer and the same train and eval sequences."""

    tokenizer: Any
    train: D.Batchable
    eval: D.Batchable


@dataclass
class TrialResult:
    eval_loss: float | None
    """Final eval loss (the objective); for a pruned trial, the last eval loss."""
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
    versions: dict[str, str] = field(default_factory=dict)


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


# ---------------------------------------------------------------------------------------------
# Data shared by the sweep


def prepare_data(spec: SweepSpec) -> SweepData:
    """Tokenize the dataset once per sweep: every trial trains on the same sequences."""
    from transformers import AutoTokenizer

    check_model_source(spec.model.id)  # the worker's first look at the model: one clear line if it is not there
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model.id)
    except (OSError, ValueError) as e:
        raise cannot_load("tokenizer", spec.model.id, e) from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seq_len, seed = spec.model.max_seq_len, spec.train.seed
    docs = D.tokenize(D.load_records(spec.data), tokenizer, spec.data, seq_len)
    train_docs, eval_docs = D.split_eval(docs, spec.data.eval_examples, seed)
    budget = D.budget_docs(train_docs, seq_len, seed, spec.budget.train_tokens, spec.budget.train_examples)
    layout = D.pack if spec.data.packing else D.pad_each
    return SweepData(tokenizer, layout(budget, seq_len, pad_id), layout(eval_docs, seq_len, pad_id))


# ---------------------------------------------------------------------------------------------
# Model


def pick_precision(device: torch.device, asked: str | None = None) -> torch.dtype:
    """bf16 on GPUs that have it (compute capability 8+), fp16 on T4/P100, fp32 on the CPU."""
    asked = asked or os.environ.get("SWEEPER_PRECISION")
    if asked:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[asked]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def load_model(spec: SweepSpec, cfg: TrainSpec, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if spec.model.quantize == "nf4":
        # On T4 the 4-bit compute dtype must be fp16: the fp32 default is slow (DESIGN.md).
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.model.id, quantization_config=quant, dtype=dtype,
                                                     device_map={"": device}, attn_implementation="sdpa")
    except (OSError, ValueError) as e:  # a missing file; a config transformers does not know
        raise cannot_load("model", spec.model.id, e) from None
    model.config.use_cache = False  # a KV cache also turns off the packed-sequence masking
    if quant is not None:
        if device.type == "cpu":
            keep_4bit_weights_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.model.gradient_checkpointing)
    elif spec.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(cfg.seed)  # the same LoRA init for every trial
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=spec.model.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def keep_4bit_weights_trainable(model) -> None:
    """Keep every 4-bit weight in the format that trains: bitsandbytes 0.49+ (on a CPU with AVX512-BF16) repacks it
    in place at the first eval-mode forward into an inference-only layout, whose kernel (gemv_4bit) has no backward
    and which save_pretrained unpacks lossily (DESIGN.md). The layer's own switch for that is
    `support_avx512bf16_for_cpu`; versions without it never repack. GPUs never repack: only CPU models get here."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def make_optimizer(model, cfg: TrainSpec, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    else:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        optimizer = cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# Batches


def to_tensors(rows: D.Batchable) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor(rows.input_ids), "labels": torch.tensor(rows.labels),
            "position_ids": torch.tensor(rows.position_ids)}


def label_count(labels: torch.Tensor) -> int:
    """Tokens the loss is taken on (HF shifts labels left by one)."""
    return int((labels[:, 1:] != D.IGNORE).sum())


# Architectures whose logits are exactly lm_head(last hidden state): no soft-capping or scaling.
CHUNKED_LOSS_MODELS = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
LOSS_CHUNK_TOKENS = 2048


def forward_loss(model, batch: dict[str, torch.Tensor], device, dtype, n_items: int) -> torch.Tensor:
    """Sum of token losses / n_items, so micro-batches add up to the exact token mean of the step."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    causal_lm = model.get_base_model()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if causal_lm.config.model_type not in CHUNKED_LOSS_MODELS:
            return model(**batch, num_items_in_batch=n_items).loss
        hidden = causal_lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        return chunked_cross_entropy(hidden, batch["labels"], causal_lm.lm_head, n_items)


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head, n_items: int) -> torch.Tensor:
    """The causal-LM loss without ever holding all the logits.

    Full fp32 logits and their gradient cost ~10 bytes x vocab per token (1.3 GB for 4 x 1024 tokens of a
    32k vocab): more than the checkpointed activations. Here the head runs on chunks of the tokens that
    carry a label, and each chunk's logits are recomputed in backward instead of kept.
    """
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:].reshape(-1)
    keep = targets != D.IGNORE
    states, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep], targets[keep]
    total = hidden[:, :0].float().sum()  # zero, but in the graph: a micro-batch with no label still backpropagates
    for i in range(0, len(targets), LOSS_CHUNK_TOKENS):
        chunk = slice(i, i + LOSS_CHUNK_TOKENS)
        total = total + checkpoint(_summed_cross_entropy, head, states[chunk], targets[chunk], use_reentrant=False)
    return total / n_items


def _summed_cross_entropy(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(states).float(), targets, reduction="sum")


def choose_micro_batch(model, tensors, batch_size: int, device, dtype, log: Callable[[str], None] = print) -> int:
    """The fastest micro-batch (a power of two dividing the batch) that fits this GPU.

    Finds the largest that fits without gradient checkpointing and the largest with it, times a step
    of each, and keeps the faster per sequence: small micro-batches leave a fast GPU idle between
    kernel launches, checkpointing costs a recompute. Leaves checkpointing on only if that won.
    """
    candidates = [m for m in (2**i for i in range(12, -1, -1)) if m <= batch_size and batch_size % m == 0]
    if device.type != "cuda":
        return next(m for m in candidates if m <= CPU_MAX_MICRO_BATCH)
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    timed: list[tuple[float, int, bool]] = []  # (seconds per sequence, micro-batch, checkpointing)
    try:
        for checkpointing in ([True] if is_checkpointing(model) else [False, True]):
            if checkpointing and not is_checkpointing(model):
                enable_checkpointing(model)
            fitting = next((m for m in candidates if _step_seconds(model, tensors, m, device, dtype)), None)
            if fitting is not None:
                timed.append((_step_seconds(model, tensors, fitting, device, dtype) / fitting, fitting, checkpointing))
                if fitting == batch_size:
                    break  # checkpointing could only be slower
        if not timed:
            raise SweeperError(f"out of GPU memory even at micro-batch 1 with gradient checkpointing "
                               f"(seq len {tensors['input_ids'].shape[1]}): lower model.max_seq_len")
        log("  micro-batch probe: " + ", ".join(f"{m} {'with' if c else 'without'} checkpointing {t * 1e3:.0f} ms/seq"
                                               for t, m, c in timed))
        _, micro, checkpointing = min(timed)
        if not checkpointing and is_checkpointing(model):
            model.get_base_model().gradient_checkpointing_disable()
        return micro
    finally:
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state_all(rng[1])


def _step_seconds(model, tensors, m: int, device, dtype) -> float | None:
    """Seconds for a forward and backward of m sequences, or None if they do not fit."""
    batch = {k: v[:m] for k, v in tensors.items()}
    torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        forward_loss(model, batch, device, dtype, max(1, label_count(batch["labels"]))).backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        return None  # returning drops the traceback and with it the failed attempt's tensors
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def is_checkpointing(model) -> bool:
    base = model.get_base_model()
    # transformers 5 renamed the property; 4.x (still on some notebook images) has only the old name.
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


def enable_checkpointing(model) -> None:
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def accumulate(model, batch, micro: int, scaler, device, dtype, n_items: int) -> torch.Tensor | None:
    """Forward and backward over a step's micro-batches; the summed loss, or None on CUDA OOM."""
    step_loss = torch.zeros((), device=device)
    try:
        for i in range(0, len(batch["input_ids"]), micro):
            loss = forward_loss(model, {k: v[i:i + micro] for k, v in batch.items()}, device, dtype, n_items)
            scaler.scale(loss).backward()
            step_loss += loss.detach().float()
    except torch.cuda.OutOfMemoryError:
        return None  # returning drops the traceback, so the caller can free the memory
    return step_loss


def sum_gradients(model, step_loss: torch.Tensor, peers: Peers) -> torch.Tensor:
    """Add up the trainable gradients and the step loss of all peers (one all-reduce: LoRA's are a few MB)."""
    if peers.size == 1:
        return step_loss
    params = [p for p in model.parameters() if p.requires_grad]
    flat = peers.reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for p in params] + [step_loss.reshape(1).float()]))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    return flat[-1]


@torch.no_grad()
def evaluate(model, tensors, micro_batch: int, device, dtype, peers: Peers = ALONE) -> float:
    model.eval()
    n_items = max(1, label_count(tensors["labels"]))  # the whole eval set's: each peer sums its share of it
    mine = peers.share(tensors)
    total = torch.zeros((), device=device)
    for i in range(0, len(mine["input_ids"]), micro_batch):
        total += forward_loss(model, {k: v[i:i + micro_batch] for k, v in mine.items()}, device, dtype, n_items).float()
    model.train()
    return float(peers.reduce(total))


# ---------------------------------------------------------------------------------------------
# Checkpoints: adapter (safetensors), optimizer, scheduler, scaler, RNG, step; written atomically.


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(trial_dir: Path) -> Path | None:
    steps = sorted(p for p in trial_dir.glob("step-*") if (p / "trainer_state.json").is_file())
    return steps[-1] if steps else None


def save_checkpoint(trial_dir: Path, model, optimizer, scheduler, scaler, state: dict[str, Any], keep: int = 2) -> Path:
    final = trial_dir / f"step-{state['step']:06d}"
    tmp = trial_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state()}, tmp / "training_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # readers only ever see whole checkpoints
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SweeperError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
    for old in sorted(trial_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, params: dict[str, Any]) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    if state["params"] != params:
        raise SweeperError(f"checkpoint {path} belongs to a trial with other params ({state['params']})")
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    saved = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    return state


# ---------------------------------------------------------------------------------------------
# The trial


class Preempted(Exception):
    """The trial stopped early on request (session deadline, SIGTERM, Ctrl-C), after writing a checkpoint."""

    def __init__(self, reason: str, checkpoint: Path):
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


def run_trial(spec: SweepSpec, params: dict[str, Any], trial_dir: Path, sweep_data: SweepData,
              report: Callable[[int, float], bool] | None = None, *, device: str | None = None,
              precision: str | None = None, log: Callable[[str], None] = print,
              stop: Callable[[], str | None] | None = None, peers: Peers = ALONE,
              progress: Callable[[int, int, float, float | None], None] | None = None) -> TrialResult:
    """Train one trial to its token budget, evaluating `budget.evals` times; resume from trial_dir if it holds a
    checkpoint. `stop` is asked after every step: a reason makes it checkpoint and raise Preempted. `progress` is
    told (step, total steps, tokens/s, latest eval loss) after every step (runner/progress.py). With peers,
    rank 0 alone reports, is asked to stop, writes checkpoints and logs the trial's progress; the others follow
    its answers and log only what is their own (their micro-batch probe, running out of memory)."""
    started = time.perf_counter()
    cfg = spec.trial_config(params)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = pick_precision(dev, precision)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    model = load_model(spec, cfg, dev, dtype)
    model.train()
    train, evalset = to_tensors(sweep_data.train), to_tensors(sweep_data.eval)
    total_steps = max(1, len(sweep_data.train) // cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    eval_at = {max(1, round(total_steps * k / spec.budget.evals)): k for k in range(1, spec.budget.evals + 1)}

    trial_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "params": params, "train_loss": [], "eval_losses": [], "micro_batch": None,
             "train_seconds": 0.0, "tokens": 0}
    checkpoint = latest_checkpoint(trial_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, params)
        if peers.rank == 0:
            log(f"resuming from {checkpoint} (step {state['step']}/{total_steps})")
    resumed_from = state["step"]
    if peers.rank > 0:  # the same LoRA init as rank 0, but its own dropout (checkpoints keep rank 0's RNG)
        torch.manual_seed(cfg.seed + 1_000_003 * peers.rank + state["step"])
    if state.get("gradient_checkpointing") and not is_checkpointing(model):
        enable_checkpointing(model)  # the interrupted run needed it to fit
    my_rows = max(1, len(range(peers.rank, cfg.batch_size, peers.size)))
    micro = state["micro_batch"] or choose_micro_batch(model, train, my_rows, dev, dtype, log)
    state["micro_batch"], state["gradient_checkpointing"] = micro, is_checkpointing(model)
    pruned_at = None

    for step in range(state["step"], total_steps):
        t0 = time.perf_counter()
        rows = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        batch = {k: v[rows] for k, v in train.items()}
        n_items = max(1, label_count(batch["labels"]))  # the whole step's, on every peer
        batch = peers.share(batch)
        while (step_loss := accumulate(model, batch, micro, scaler, dev, dtype, n_items)) is None:
            # Out of GPU memory mid-step: same effective batch, half the micro-batch, the step redone.
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if micro > 1:
                micro //= 2
            elif not is_checkpointing(model):
                enable_checkpointing(model)
            else:
                raise SweeperError(f"out of GPU memory at micro-batch 1 with gradient checkpointing (step {step + 1}, "
                                   f"seq len {spec.model.max_seq_len}): lower model.max_seq_len")
            state["micro_batch"], state["gradient_checkpointing"] = micro, is_checkpointing(model)
            log(f"  out of GPU memory: micro-batch {micro} x {math.ceil(my_rows / micro)}, "
                f"gradient checkpointing {'on' if state['gradient_checkpointing'] else 'off'}")
        loss_value = float(sum_gradients(model, step_loss, peers))  # one device sync per step
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"training loss became {loss_value} at step {step + 1} ({_precision_name(dtype)})")
        if cfg.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] = step + 1
        state["tokens"] += sum(sweep_data.train.real[rows])
        state["train_seconds"] += time.perf_counter() - t0
        state["train_loss"].append([step + 1, round(loss_value, 5)])

        if state["step"] in eval_at:
            k = eval_at[state["step"]]
            eval_loss = evaluate(model, evalset, micro, dev, dtype, peers)
            state["eval_losses"].append(eval_loss)
            if peers.rank == 0:
                log(f"  eval {k}/{spec.budget.evals} step {state['step']}/{total_steps}: "
                    f"train {loss_value:.4f} eval {eval_loss:.4f}")
            if not math.isfinite(eval_loss):
                raise NonFiniteLoss(f"eval loss became {eval_loss} at step {state['step']} ({_precision_name(dtype)})")
            if peers.first_says(report is not None and report(k, eval_loss), dev):
                pruned_at = k
                break
        if progress is not None:
            progress(state["step"], total_steps, state["tokens"] / state["train_seconds"],
                     state["eval_losses"][-1] if state["eval_losses"] else None)
        saved = peers.rank == 0 and (state["step"] % spec.budget.checkpoint_every == 0 or state["step"] == total_steps)
        if saved:
            checkpoint = save_checkpoint(trial_dir, model, optimizer, scheduler, scaler, state)
        if state["step"] < total_steps:
            why = stop() if stop is not None else None
            if peers.first_says(why is not None, dev):
                if peers.rank == 0 and not saved:
                    checkpoint = save_checkpoint(trial_dir, model, optimizer, scheduler, scaler, state)
                raise Preempted(why or "rank 0 stopped", checkpoint)

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
        wall_time_s=round(time.perf_counter() - started, 2),
        micro_batch=micro,
        grad_accum=math.ceil(my_rows / micro),
        precision=_precision_name(dtype),
        gradient_checkpointing=is_checkpointing(model),
        checkpoint=str(checkpoint) if checkpoint else "",
        resumed_from_step=resumed_from,
        gpus=peers.size,
        versions=library_versions(),
    )


def _precision_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # the process's peak RSS: on the CPU there is no per-trial counter

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sweeper-qlora", "torch", "transformers", "peft", "bitsandbytes", "optuna"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def result_attrs(result: TrialResult) -> dict[str, Any]:
    """The result as trial user attrs (JSON-safe), the names report.py shows."""
    return asdict(result)
