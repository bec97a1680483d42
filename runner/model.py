"""The model of a trial: the 4-bit base (loaded once per worker), fresh LoRA adapters per trial, fused kernels,
precision, optimizer and scheduler."""

from __future__ import annotations

import gc
import importlib.util
import inspect
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from runner.hub import cannot_load
from runner.step import FUSED_LOSS, set_checkpointing
from sweeper.errors import UserError
from sweeper.spec import SweepSpec, TrainSpec

# Architectures Liger Kernel patches (RMSNorm, RoPE, SwiGLU) and whose loss runner.step can fuse.
LIGER_MODELS = {"llama", "mistral", "qwen2", "qwen3"}
# What we ask of Liger's apply function: its own norms, RoPE and SwiGLU; the loss is ours (runner.step).
LIGER_KWARGS = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
MIN_TRITON_CAPABILITY = (7, 0)  # Triton refuses older GPUs (the P100 is 6.0)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str | None) -> torch.device:
    """The device to train on, named one way (`cuda:0`, not `cuda`): the kept base is keyed by it, and the preflight
    and the trials must find the same one. None: the current GPU, else the CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def bf16_supported(device: torch.device) -> bool:
    """Native bf16: GPUs of compute capability 8.0 and up, and the CPU. (torch.cuda.is_bf16_supported says yes on a
    T4 too, where bf16 is emulated, slowly.)"""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def pick_precision(device: torch.device, asked: str | None = None) -> torch.dtype:
    """bf16 on GPUs that have it (compute capability 8+), fp16 on T4/P100, fp32 on the CPU. A precision asked for
    (argument, else SWEEPER_PRECISION) that the device lacks is refused in one line."""
    asked = asked or os.environ.get("SWEEPER_PRECISION", "").strip() or None
    if asked:
        if asked not in PRECISIONS:
            raise UserError(f"SWEEPER_PRECISION must be one of {', '.join(PRECISIONS)} (got {asked!r})")
        if asked == "bf16" and not bf16_supported(device):
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
            raise UserError(f"precision bf16 was asked for, but the {name} has no bf16 (compute capability "
                            f"{capability_text(device)}, bf16 needs 8.0): use fp16, or leave the precision to sweeper")
        return PRECISIONS[asked]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def capability_text(device: torch.device) -> str:
    """'7.5' for a T4; '' off CUDA."""
    return ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else ""


def load_base(spec: SweepSpec, device: torch.device, dtype: torch.dtype):
    """The base model, quantized to 4-bit NF4 where the spec says so, frozen, ready for LoRA; checkpointing off."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if spec.model.quantize == "nf4":
        # On T4 the 4-bit compute dtype must be fp16: the fp32 default is slow (docs/design.md).
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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)
    return model


def keep_4bit_weights_trainable(model) -> None:
    """Keep every 4-bit weight in the format that trains: bitsandbytes 0.49+ (on a CPU with AVX512-BF16) repacks it
    in place at the first eval-mode forward into an inference-only layout, whose kernel (gemv_4bit) has no backward
    and which save_pretrained unpacks lossily (docs/design.md). The layer's own switch for that is
    `support_avx512bf16_for_cpu`; versions without it never repack. GPUs never repack: only CPU models get here."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def fused_kernels_unavailable(model, device: torch.device) -> str:
    """Why Liger Kernel's fused kernels cannot run on this model and device; "" when they can (the preflight then
    decides, by comparing them with the unfused path: runner/doctor.py)."""
    if device.type != "cuda":
        return "Liger Kernel runs on CUDA GPUs only"
    if torch.cuda.get_device_capability(device) < MIN_TRITON_CAPABILITY:
        return f"Triton needs compute capability 7.0 or more; this GPU has {capability_text(device)}"
    if model.config.model_type not in LIGER_MODELS:
        return f"no fused kernels for {model.config.model_type} models"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (the `liger` extra)"
    apply = _liger_apply_function(model.config.model_type)
    if apply is None:
        return f"this liger-kernel has no kernels for {model.config.model_type} models"
    # Liger's own dispatcher drops arguments its apply function does not take, without a word: a renamed one would
    # silently switch a default on (its fused loss in place of ours). Ours must all be taken.
    missing = sorted(set(LIGER_KWARGS) - set(inspect.signature(apply).parameters))
    if missing:
        return f"this liger-kernel's {apply.__name__} takes no {', '.join(missing)}"
    return ""


def _liger_apply_function(model_type: str):
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)


def apply_fused_kernels(model) -> Callable[[], None]:
    """Liger Kernel's fused RMSNorm, RoPE and SwiGLU on the model, and its fused linear cross-entropy as the loss
    (runner.step calls it on the last hidden state, so the model's forward stays). Only after
    fused_kernels_unavailable said "". Liger also replaces the modeling module's own functions and classes (RoPE, the
    norm, the MLP) for the whole process: the function returned puts them back, for a base loaded again unfused."""
    import importlib

    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    modeling = importlib.import_module(type(model).__module__)
    before = dict(vars(modeling))
    _liger_apply_function(model.config.model_type)(model=model, **LIGER_KWARGS)
    setattr(model, FUSED_LOSS, LigerFusedLinearCrossEntropyLoss(reduction="sum"))

    def undo() -> None:
        for name, value in before.items():
            if getattr(modeling, name, None) is not value:
                setattr(modeling, name, value)

    return undo


def add_lora(model, spec: SweepSpec, cfg: TrainSpec):
    """The model with fresh LoRA adapters: the same init for the same seed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=spec.model.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class BaseModel:
    """The quantized base a worker loads once and keeps across its trials: each trial gets fresh LoRA adapters on
    it, which are taken off again when the trial ends, however it ends. Loads again only for another model,
    device or precision. Fused kernels run on it only once the preflight found them equal to the unfused path
    (runner/doctor.py sets `fused`); a base loaded again runs unfused."""

    def __init__(self):
        self.model, self.key, self.fused = None, None, False

    def load(self, spec: SweepSpec, device: torch.device, dtype: torch.dtype):
        """The base for this model, device and precision: the one kept, or loaded now."""
        key = (spec.model.id, spec.model.quantize, str(device), dtype)
        if key != self.key:
            self.model = self.key = None  # the old base goes with the last trial's leftovers, just below
            self.fused = False
        # The last trial's optimizer, scaler and checkpoint saver lived in run_trial's frame, which outlived our
        # finally: only now are they unreachable, so free them here, before this trial allocates.
        free_memory(device)
        if self.model is None:
            self.model, self.key = load_base(spec, device, dtype), key
        return self.model

    @contextmanager
    def lora(self, spec: SweepSpec, cfg: TrainSpec, device: torch.device, dtype: torch.dtype) -> Iterator:
        self.load(spec, device, dtype)
        set_checkpointing(self.model, spec.model.gradient_checkpointing)  # a trial may have turned it on or off
        model = add_lora(self.model, spec, cfg)
        try:
            yield model
        finally:
            model.unload()  # the LoRA layers replaced by the base layers they wrapped
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config  # peft's note on the base; left, the next trial's adapters warn


def free_memory(device: torch.device) -> None:
    """What the last trial allocated back to the GPU: its tensors are unreachable once its frames are gone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
