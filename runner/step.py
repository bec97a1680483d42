"""One training step: batches to tensors, the loss, the micro-batch choice, accumulation over micro-batches, the
optimizer step (a NaN/inf loss stops it: NonFiniteLoss), eval."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from runner import data as D
from runner.peers import ALONE, Peers, sum_gradients
from sweeper.errors import SweeperError

CPU_MAX_MICRO_BATCH = 8  # on the CPU memory is no limit; this keeps a step's latency modest
# Architectures whose logits are exactly lm_head(last hidden state): no soft-capping or scaling.
CHUNKED_LOSS_MODELS = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
LOSS_CHUNK_TOKENS = 2048
# An exhausted GPU, as cuBLAS, cuDNN and the CUDA runtime report it: a RuntimeError, not torch's OutOfMemoryError.
OUT_OF_MEMORY_MESSAGES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory",
                          "CUDA out of memory")
FUSED_LOSS = "sweeper_fused_loss"
"""Attribute of the causal LM holding a fused linear cross-entropy (runner/model.py sets it where Liger runs)."""


class NonFiniteLoss(SweeperError):
    """The training loss became NaN or inf (fp16 overflow, too high a learning rate): run_trial ends the trial there
    and returns it as diverged."""


def to_tensors(rows: D.Batchable) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor(rows.input_ids), "labels": torch.tensor(rows.labels),
            "position_ids": torch.tensor(rows.position_ids)}


def label_count(labels: torch.Tensor) -> int:
    """Tokens the loss is taken on (HF shifts labels left by one)."""
    return int((labels[:, 1:] != D.IGNORE).sum())


# ---------------------------------------------------------------------------------------------
# The loss


def forward_loss(model, batch: dict[str, torch.Tensor], device, dtype, n_items: int) -> torch.Tensor:
    """Sum of token losses / n_items, so micro-batches add up to the exact token mean of the step."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    causal_lm = model.get_base_model()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if causal_lm.config.model_type not in CHUNKED_LOSS_MODELS:
            return model(**batch, num_items_in_batch=n_items).loss
        hidden = causal_lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        if (fused := getattr(causal_lm, FUSED_LOSS, None)) is not None:
            return fused_cross_entropy(fused, hidden, batch["labels"], causal_lm.lm_head, n_items, dtype)
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


def fused_cross_entropy(loss_fn, hidden: torch.Tensor, labels: torch.Tensor, head, n_items: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """The same loss through Liger's fused linear cross-entropy (CUDA): the logits are never materialised, and
    ignored labels are skipped in the kernel, so no boolean-mask gather (a host sync) is needed. The kernel
    multiplies without autocast, and prepare_model_for_kbit_training left the final norm and the head in fp32: both
    go in the compute dtype, as the chunked path's head runs under autocast (tensor cores on a T4; the softmax is
    fp32 inside the kernel). The preflight keeps it only where its loss and gradients equal the unfused path's."""
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(dtype)
    return loss_fn(head.weight.to(dtype), states, labels[:, 1:].reshape(-1)).float() / n_items


def precision_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing and the micro-batch


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error says the GPU ran out of memory, under whichever name the library that hit it uses."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in OUT_OF_MEMORY_MESSAGES))


def is_checkpointing(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed the property; 4.x (still on some notebook images) has only the old name.
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on or off (model: the causal LM, or a peft model around it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on and not is_checkpointing(base):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    elif not on and is_checkpointing(base):
        base.gradient_checkpointing_disable()
        base.disable_input_require_grads()


def choose_micro_batch(model, tensors, batch_size: int, device, dtype, log: Callable[[str], None] = print) -> int:
    """The fastest micro-batch (a power of two dividing the batch) that fits this GPU.

    For each of without and with gradient checkpointing, finds the largest micro-batch that fits and times it and
    the next smaller one, and keeps the fastest per sequence: small micro-batches leave a fast GPU idle between
    kernel launches, checkpointing costs a recompute, and the largest that fits may sit so close to the memory
    limit that the allocator frees and retries on every step. Leaves checkpointing on only if that won.
    """
    candidates = [m for m in (2**i for i in range(12, -1, -1)) if m <= batch_size and batch_size % m == 0]
    if device.type != "cuda":
        return next(m for m in candidates if m <= CPU_MAX_MICRO_BATCH)
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    timed: list[tuple[float, int, bool]] = []  # (seconds per sequence, micro-batch, checkpointing)
    try:
        for checkpointing in ([True] if is_checkpointing(model) else [False, True]):
            set_checkpointing(model, checkpointing)
            fitting = next((m for m in candidates if _step_seconds(model, tensors, m, device, dtype)), None)
            for m in ([] if fitting is None else [fitting, fitting // 2] if fitting > 1 else [fitting]):
                if (seconds := _step_seconds(model, tensors, m, device, dtype, repeats=2)) is not None:
                    timed.append((seconds / m, m, checkpointing))
            if fitting == batch_size:
                break  # checkpointing could only be slower
        if not timed:
            raise SweeperError(f"out of GPU memory even at micro-batch 1 with gradient checkpointing "
                               f"(seq len {tensors['input_ids'].shape[1]}): lower model.max_seq_len")
        log("  micro-batch probe: " + ", ".join(f"{m} {'with' if c else 'without'} checkpointing {t * 1e3:.0f} ms/seq"
                                               for t, m, c in timed))
        _, micro, checkpointing = min(timed)
        set_checkpointing(model, checkpointing)
        return micro
    finally:
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state_all(rng[1])


def _step_seconds(model, tensors, m: int, device, dtype, repeats: int = 0) -> float | None:
    """Seconds for a forward and backward of m sequences (the median of `repeats` timed runs after an untimed one
    that warms the allocator's cache and the kernels; with none, the untimed run's), or None if they do not fit.
    The cache is emptied only after: emptying it between runs would time cudaMalloc, not the step."""
    batch = {k: v[:m] for k, v in tensors.items()}
    n_items = max(1, label_count(batch["labels"]))
    times = []
    try:
        for _ in range(1 + repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            forward_loss(model, batch, device, dtype, n_items).backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        return statistics.median(times[1:]) if repeats else times[0]
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        return None  # returning drops the traceback and with it the failed attempt's tensors
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Accumulation and eval


def accumulate(model, batch, micro: int, scaler, device, dtype, n_items: int) -> torch.Tensor | None:
    """Forward and backward over a step's micro-batches; the summed loss, or None when the GPU ran out of memory."""
    step_loss = torch.zeros((), device=device)
    try:
        for i in range(0, len(batch["input_ids"]), micro):
            loss = forward_loss(model, {k: v[i:i + micro] for k, v in batch.items()}, device, dtype, n_items)
            scaler.scale(loss).backward()
            step_loss += loss.detach().float()
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        return None  # returning drops the traceback, so the caller can free the memory
    return step_loss


def accumulate_fitting(model, batch, micro: int, optimizer, scaler, device, dtype, n_items: int,
                       what: str, log: Callable[[str], None]) -> tuple[torch.Tensor, int]:
    """accumulate, and on running out of GPU memory the same step again at half the micro-batch (then with
    gradient checkpointing): the effective batch stays the same. Returns the step loss and the micro-batch used."""
    while (step_loss := accumulate(model, batch, micro, scaler, device, dtype, n_items)) is None:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if micro > 1:
            micro //= 2
        elif not is_checkpointing(model):
            set_checkpointing(model, True)
        else:
            raise SweeperError(f"out of GPU memory at micro-batch 1 with gradient checkpointing ({what}): "
                               "lower model.max_seq_len")
        log(f"  out of GPU memory: micro-batch {micro} x {math.ceil(len(batch['input_ids']) / micro)}, "
            f"gradient checkpointing {'on' if is_checkpointing(model) else 'off'}")
    return step_loss, micro


def take_step(model, batch, micro: int, optimizer, scheduler, scaler, max_grad_norm: float, dev, dtype,
              peers: Peers, what: str, log: Callable[[str], None]) -> tuple[float, int]:
    """One optimizer step over the batch (this peer's share of it): the step's loss and the micro-batch it took."""
    n_items = max(1, label_count(batch["labels"]))  # the whole step's, on every peer
    step_loss, micro = accumulate_fitting(model, peers.share(batch), micro, optimizer, scaler, dev, dtype, n_items,
                                          what, log)
    loss_value = float(sum_gradients(model, step_loss, peers))  # one device sync per step
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"training loss became {loss_value} at {what} ({precision_name(dtype)})")
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss_value, micro


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
