"""The preflight: does this device train the study's model correctly? Run by `sweeper doctor` and by every worker
before its first claim; its result is the worker's machine card (written to the store: record.CARD).

The checks, in order, each timed, each pass, fail or skip (one that cannot apply here: the CPU has no fused kernels):
- device: torch sees the GPU and carries kernels for its architecture, and a kernel runs;
- precision: the precision to train in (asked for, or picked) is one the device has, and a matmul in it is finite;
- bitsandbytes: its library loads, and a 4-bit NF4 matmul's forward and backward equal those of the dequantized
  weight (the quantization itself close to the weight);
- training step: one real step of the study's own model, at the micro-batch the probe picks, gives a finite loss;
- memory: the GPU's allocated memory is back to its level before the step once its adapters are gone;
- fused kernels: where Liger Kernel can run, its loss and LoRA gradients equal the unfused path's on one batch;
  else, or where they differ, the worker trains unfused, and the card says why.
A failed check stops the worker before any claim (runner/worker.py: one line naming the check).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from runner.model import (BaseModel, apply_fused_kernels, bf16_supported, capability_text, fused_kernels_unavailable,
                          make_optimizer, pick_precision, resolve_device)
from runner.peers import ALONE
from runner.platform import library_versions
from runner.step import (NonFiniteLoss, choose_micro_batch, forward_loss, is_checkpointing, label_count,
                         precision_name, take_step, to_tensors)
from sweeper.errors import SweeperError, first_line
from sweeper.spec import SweepSpec

CARD_VERSIONS = ("bitsandbytes", "liger-kernel", "transformers", "peft")  # beside torch and CUDA, on the card
MEMORY_SLACK_MB = 16  # what a first step may leave allocated for good: cuBLAS/cuDNN workspaces, not the trial's
FUSED_RTOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}  # loss and gradients, fused vs not


@dataclass
class Check:
    name: str
    status: str
    """'pass', 'fail' or 'skip' (it does not apply here)."""
    seconds: float
    detail: str


class _Skip(Exception):
    """The check does not apply here; its message says why."""


def preflight(spec: SweepSpec | None, sweep_data, base: BaseModel | None, *, device: str | None = None,
              precision: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the checks on `device` (None: the first GPU, else the CPU) with the worker's own base (loaded here if not
    yet: its trials then keep it) and return the machine card. Never raises for a failed check: card["ok"] says.
    spec None: the device alone (a notebook's GPU cell), its model checks skipped: each worker makes them."""
    started = time.perf_counter()
    dev = resolve_device(device)
    checks: list[Check] = []
    found: dict[str, Any] = {"micro_batch": None, "gradient_checkpointing": False, "fused_note": "", "dtype": None}

    def check(name: str, run: Callable[[], str]) -> bool:
        t0 = time.perf_counter()
        try:
            status, detail = "pass", run()
        except _Skip as e:
            status, detail = "skip", str(e)
        except Exception as e:  # noqa: BLE001  whatever broke is this check's failure, in one line
            status, detail = "fail", str(e) if isinstance(e, SweeperError) else f"{type(e).__name__}: {first_line(e)}"
            found.setdefault("exit_code", getattr(e, "exit_code", 1))
        checks.append(Check(name, status, round(time.perf_counter() - t0, 2), detail))
        log(f"  preflight {name}: {status} ({detail})" if detail else f"  preflight {name}: {status}")
        return status != "fail"

    def pick() -> str:
        found["dtype"] = pick_precision(dev, precision)
        return matmul_in(dev, found["dtype"])

    ok = check("device", lambda: device_check(dev))
    ok = ok and check("precision", pick)
    quantize = spec.model.quantize if spec is not None else "nf4"
    ok = ok and check("bitsandbytes", lambda: four_bit_check(dev, found["dtype"], quantize))
    if spec is None:
        for name in ("training step", "memory", "fused kernels") if ok else ():
            check(name, _skip("each worker checks the study's model before its first claim"))
    else:
        ok = ok and check("training step",
                          lambda: training_step(spec, sweep_data, base, dev, found["dtype"], found, log))
        ok = ok and check("memory", lambda: _outcome(found.pop("memory")))
        ok = ok and check("fused kernels", lambda: fused_check(spec, sweep_data, base, dev, found["dtype"], found))
    fused = base is not None and base.fused
    if not fused and not found["fused_note"]:
        found["fused_note"] = next((c.detail for c in checks if c.name == "fused kernels" and c.status != "pass"),
                                   "the preflight stopped before the fused kernels were checked")
    versions = library_versions()
    card = {
        "device": str(dev),
        **device_facts(dev),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     **{k: v for k, v in versions.items() if k in CARD_VERSIONS}},
        "precision": precision_name(found["dtype"]) if found["dtype"] is not None else None,
        "micro_batch": found["micro_batch"],
        "gradient_checkpointing": found["gradient_checkpointing"],
        "fused": fused,
        "fused_note": "" if fused else found["fused_note"],
        "checks": [asdict(c) for c in checks],
        "ok": all(c.status != "fail" for c in checks),
        "seconds": round(time.perf_counter() - started, 2),
        "at": time.time(),
    }
    if not card["ok"]:
        card["exit_code"] = found.get("exit_code", 1)
    return card


def device_facts(dev: torch.device) -> dict[str, Any]:
    """The card's GPU, capability and memory; what CUDA can still tell where the device check failed."""
    if dev.type != "cuda":
        return {"gpu": "cpu", "capability": None, "memory_gb": None}
    try:
        props = torch.cuda.get_device_properties(dev)
    except Exception:  # noqa: BLE001  a GPU CUDA cannot use: the failed check says why
        return {"gpu": str(dev), "capability": None, "memory_gb": None}
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1)}


# ---------------------------------------------------------------------------------------------
# The checks: each returns a one-line detail, or raises (_Skip where it does not apply)


def device_check(dev: torch.device) -> str:
    if dev.type != "cuda":
        return f"no CUDA GPU: the CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    from runner.platform import gpu_info

    gpu_info()  # no kernels for this architecture: one line saying so
    torch.ones(1024, device=dev).mul_(2).sum().item()  # a kernel runs and the device answers
    props = torch.cuda.get_device_properties(dev)
    return (f"{props.name}, compute capability {capability_text(dev)}, {props.total_memory / 2**30:.0f} GiB, "
            f"torch {torch.__version__} with CUDA {torch.version.cuda}")


def matmul_in(dev: torch.device, dtype: torch.dtype) -> str:
    """A small matmul under autocast in dtype: finite. Also warms up cuBLAS (its workspace is allocated for good at
    the first matmul, before the memory check's baseline)."""
    a = torch.randn(64, 64, device=dev)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        product = a @ a
    if not torch.isfinite(product).all():
        raise SweeperError(f"a {precision_name(dtype)} matmul gave NaN or inf")
    native = "native" if dtype != torch.bfloat16 or bf16_supported(dev) else "emulated"
    return f"{precision_name(dtype)} ({native})"


def four_bit_check(dev: torch.device, dtype: torch.dtype, quantize: str) -> str:
    """bitsandbytes' NF4 matmul against the dequantized weight, forward and backward to the input (what LoRA trains
    through), in the compute dtype."""
    if quantize != "nf4":
        raise _Skip("the study's model is not quantized (model.quantize = 'none')")
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(256, 512, generator=generator) * 0.05).to(dev, dtype)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=True)
    reference = bnb.functional.dequantize_4bit(packed, state)
    error = float((reference.float() - weight.float()).norm() / weight.float().norm())
    if not error < 0.15:  # NF4 keeps about 10% relative error on a Gaussian weight; a broken kernel, far more
        raise SweeperError(f"NF4 quantization is off: relative error {error:.3f} (about 0.1 expected)")
    x = torch.randn(16, 512, generator=generator).to(dev, dtype)
    grad = torch.randn(16, 256, generator=generator).to(dev, dtype)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = bnb.matmul_4bit(ours, packed.t(), quant_state=state)
    out.backward(grad)
    expected = theirs @ reference.t()
    expected.backward(grad)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for what, got, want in (("forward", out, expected), ("backward", ours.grad, theirs.grad)):
        off = float((got.detach().float() - want.detach().float()).abs().max() / want.detach().float().abs().max())
        if not off <= tolerance:
            raise SweeperError(f"4-bit matmul {what} differs from the dequantized weight's by {off:.2g} (relative)")
    return f"bitsandbytes {bnb.__version__}: NF4 forward and backward equal the dequantized weight's"


def training_step(spec: SweepSpec, sweep_data, base: BaseModel, dev: torch.device, dtype: torch.dtype,
                  found: dict[str, Any], log: Callable[[str], None]) -> str:
    """One optimizer step of the study's model on its first batch, at the largest batch size the space allows (the
    probe's hardest case). Leaves the memory check's detail in found["memory"]."""
    cfg = spec.trial_config({"batch_size": largest_batch(spec)})
    base.load(spec, dev, dtype)  # loaded now, kept for the trials
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
    loss, micro, checkpointing = _one_step(spec, cfg, sweep_data, base, dev, dtype, log)
    found.update(micro_batch=micro, gradient_checkpointing=checkpointing)
    if dev.type == "cuda":
        from runner.model import free_memory

        free_memory(dev)
        left = (torch.cuda.memory_allocated(dev) - before) / 2**20
        if left > MEMORY_SLACK_MB:
            found["memory"] = SweeperError(f"{left:.0f} MB still allocated after the step's adapters were taken off "
                                           f"(at most {MEMORY_SLACK_MB} MB expected)")
        else:
            found["memory"] = f"back to {before / 2**20:,.0f} MB (+{left:.1f} MB) after the step"
    else:
        found["memory"] = _Skip("the CPU has no allocator count to compare")
    return (f"loss {loss:.4f} at micro-batch {micro} x {math.ceil(cfg.batch_size / micro)}"
            + (" with gradient checkpointing" if checkpointing else ""))


def _one_step(spec, cfg, sweep_data, base: BaseModel, dev, dtype, log) -> tuple[float, int, bool]:
    """The step itself, in a frame of its own: its optimizer and gradients are gone when it returns."""
    train = to_tensors(sweep_data.train)
    with base.lora(spec, cfg, dev, dtype) as model:
        model.train()
        optimizer, scheduler = make_optimizer(model, cfg, total_steps=1)
        scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
        micro = choose_micro_batch(model, train, cfg.batch_size, dev, dtype, log)
        batch = {k: v[:cfg.batch_size] for k, v in train.items()}
        try:
            loss, micro = take_step(model, batch, micro, optimizer, scheduler, scaler, cfg.max_grad_norm, dev, dtype,
                                    ALONE, "the preflight's step", log)
        except NonFiniteLoss as e:
            raise SweeperError(f"{e}: this model does not train in {precision_name(dtype)} here") from None
        return loss, micro, is_checkpointing(model)


def largest_batch(spec: SweepSpec) -> int:
    p = spec.space.get("batch_size")
    if p is None:
        return spec.train.batch_size
    return int(max(p.choices) if p.choices is not None else p.high)


def fused_check(spec: SweepSpec, sweep_data, base: BaseModel, dev: torch.device, dtype: torch.dtype,
                found: dict[str, Any]) -> str:
    """Liger's fused path against the unfused one: the loss and every LoRA gradient of one batch, on the same
    adapters (B made non-zero, so that A has gradients too). Equal within FUSED_RTOL: the base keeps them; else the
    base is loaded again without them (what Liger replaced in the modeling module put back first)."""
    why = fused_kernels_unavailable(base.model, dev)
    if why:
        found["fused_note"] = why
        raise _Skip(why)
    cfg = spec.trial_config({"batch_size": largest_batch(spec)})
    batch = {k: v[:found["micro_batch"] or 1] for k, v in to_tensors(sweep_data.train).items()}
    with base.lora(spec, cfg, dev, dtype) as model:
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=generator) * 0.01)
        plain = _loss_and_grads(model, batch, dev, dtype)
        unfuse = apply_fused_kernels(base.model)
        fused = _loss_and_grads(model, batch, dev, dtype)
    rtol = FUSED_RTOL.get(dtype, 1e-4)
    differences = [abs(fused[0] - plain[0]) / max(abs(plain[0]), 1e-6)]
    differences += [float((a - b).norm() / max(float(b.norm()), 1e-12)) for a, b in zip(fused[1], plain[1])]
    worst = max(differences)
    if worst <= rtol:
        base.fused = True
        return f"loss and LoRA gradients equal the unfused path's within {worst:.1e} (relative; {rtol:g} allowed)"
    unfuse()
    base.model = base.key = None  # reloaded unfused at the first trial
    base.fused = False
    found["fused_note"] = f"fused loss or gradients differ from the unfused path's by {worst:.1e} (relative)"
    raise _Skip(found["fused_note"] + ": off for this worker")


def _loss_and_grads(model, batch, dev, dtype) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch, dev, dtype, max(1, label_count(batch["labels"])))
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def _outcome(found: str | Exception) -> str:
    """A check's outcome found by an earlier one: its detail, or the exception (failure or _Skip) to raise."""
    if isinstance(found, Exception):
        raise found
    return found


def _skip(why: str) -> Callable[[], str]:
    def skipped() -> str:
        raise _Skip(why)

    return skipped
