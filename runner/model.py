"""The model of a trial: the 4-bit base (loaded once per worker), fresh LoRA adapters per trial, fused kernels,
precision, optimizer and scheduler."""

from __future__ import annotations

import gc
import importlib.util
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from runner.hub import cannot_load
from runner.step import FUSED_LOSS, set_checkpointing
from sweeper.spec import SweepSpec, TrainSpec

# Architectures Liger Kernel patches (RMSNorm, RoPE, SwiGLU) and whose loss runner.step can fuse.
LIGER_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


def pick_precision(device: torch.device, asked: str | None = None) -> torch.dtype:
    """bf16 on GPUs that have it (compute capability 8+), fp16 on T4/P100, fp32 on the CPU."""
    asked = asked or os.environ.get("SWEEPER_PRECISION")
    if asked:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[asked]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def load_base(spec: SweepSpec, device: torch.device, dtype: torch.dtype):
    """The base model, quantized to 4-bit NF4 where the spec says so, frozen, ready for LoRA; checkpointing off."""
    from peft import prepare_model_for_kbit_training
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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)
    return model


def keep_4bit_weights_trainable(model) -> None:
    """Keep every 4-bit weight in the format that trains: bitsandbytes 0.49+ (on a CPU with AVX512-BF16) repacks it
    in place at the first eval-mode forward into an inference-only layout, whose kernel (gemv_4bit) has no backward
    and which save_pretrained unpacks lossily (DESIGN.md). The layer's own switch for that is
    `support_avx512bf16_for_cpu`; versions without it never repack. GPUs never repack: only CPU models get here."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def use_fused_kernels(model, device: torch.device) -> bool:
    """Liger Kernel's fused RMSNorm, RoPE and SwiGLU, and its fused linear cross-entropy as the loss, where it is
    installed (the `liger` extra), on CUDA, for the architectures it supports; True if they are now in use."""
    if (device.type != "cuda" or model.config.model_type not in LIGER_MODELS
            or importlib.util.find_spec("liger_kernel") is None):
        return False
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, _apply_liger_kernel_to_instance

    # The loss is ours (runner.step calls the fused one on the last hidden state), so the model's forward stays.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    setattr(model, FUSED_LOSS, LigerFusedLinearCrossEntropyLoss(reduction="sum"))
    return True


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
    device or precision."""

    def __init__(self):
        self.model, self.key, self.fused = None, None, False

    @contextmanager
    def lora(self, spec: SweepSpec, cfg: TrainSpec, device: torch.device, dtype: torch.dtype) -> Iterator:
        key = (spec.model.id, spec.model.quantize, str(device), dtype)
        if key != self.key:
            self.model = self.key = None  # the old base goes with the last trial's leftovers, just below
        # The last trial's optimizer, scaler and checkpoint saver lived in run_trial's frame, which outlived our
        # finally: only now are they unreachable, so free them here, before this trial allocates.
        free_memory(device)
        if self.model is None:
            self.model = load_base(spec, device, dtype)
            self.fused, self.key = use_fused_kernels(self.model, device), key
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
