"""GPU truth table: what the runner's claims come to on this machine, every part measured in one run.

One row per part, each saying what it measured, the figure, and pass / fail / n/a (with why):
1. preflight: runner.doctor.preflight on the bench model, each check's status and seconds;
2. trainer vs plain HF: bench/trainer.py's baseline (HF Trainer + peft, padded, checkpointing on) against ours
   capped to the baseline's peak GPU memory, in fp16 and bf16 (fp32 and bf16 on the CPU): tokens/s, the ratio
   (target >= 3.5x on a GPU), peak memory, MFU;
3. fused kernels on and off: the preflight's equality of Liger's loss and gradients, and a trial's tokens/s with them
   on against off;
4. kept base memory: three trials on one BaseModel leave the same torch.cuda.memory_allocated;
5. micro-batch probe: what choose_micro_batch picks against the fastest micro-batch timed;
6. OOM back-off: accumulate_fitting from a micro-batch that does not fit backs off to a smaller one, same step loss;
7. two GPUs: one trial on two processes (run_trial_parallel) against the same trial in one.

The model is TinyLlama-1.1B's shape built from a config (random init, nothing downloaded) on a GPU; `--cpu` runs
every part end to end on bench/trainer.py's "tiny" shape on the CPU (the tests run it), where the figures are a
proxy. Parts that would start after `--budget-s` is spent are listed as "not run: time budget". Progress goes to
stderr, the table to stdout; exit 1 when a row failed.

    python bench/gpu_check.py --out gpu_check.md --json gpu_check.json     # on a GPU, in at most 8 minutes
    python bench/gpu_check.py --cpu                                        # the CPU proxy, under 3 minutes
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # the CPU even where a GPU is present: hidden before torch looks
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import weakref  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trainer import (CONFIGS, EFFECTIVE_BATCH, LORA, PEAK_FLOPS, build_model, make_docs,  # noqa: E402
                           matmul_params, run_baseline, run_ours)
from runner import data as D  # noqa: E402
from runner import step as S  # noqa: E402
from runner.doctor import MEMORY_SLACK_MB, preflight  # noqa: E402
from runner.model import BaseModel, bf16_supported, free_memory, fused_kernels_unavailable, pick_precision  # noqa: E402
from runner.parallel import run_trial_parallel  # noqa: E402
from runner.platform import library_versions  # noqa: E402
from runner.train import SweepData, quiet_libraries, run_trial  # noqa: E402
from sweeper.errors import first_line  # noqa: E402
from sweeper.spec import BudgetSpec, DataSpec, ModelSpec, SweepSpec, TrainSpec  # noqa: E402

# Sizes: the GPU parts meant to fit 8 minutes on a T4 (the slow case; an estimate, not yet measured), the CPU ones 3
# minutes on 2 shared cores (about 1 measured).
GPU = dict(model="tinyllama-1.1b", seq_len=512, tokens=32_000, steps=2)
CPU = dict(model="tiny", seq_len=128, tokens=6_000, steps=2)
TARGET = 3.5  # docs/design.md: ours at least 3.5x the common-notebook script's tokens/s, at no more memory
PROBE_SLACK = 0.10  # the probe's pick within 10% of the fastest micro-batch's time per sequence
LOSS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # one step's loss, split differently
OOM_ROWS = 8  # the batch the OOM back-off steps over
PARAMS = {"learning_rate": 1e-3}
STARTED = time.perf_counter()


def say(line: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {line}", file=sys.stderr, flush=True)


class Bench:
    """What the parts share: the device, the model built from a config, its data and spec, the preflight's base."""

    def __init__(self, cpu: bool, workdir: Path, budget_s: float):
        self.cpu, self.workdir, self.budget_s = cpu, workdir, budget_s
        self.dev = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
        self.sizes = CPU if cpu else GPU
        self.model_dir = build_model(self.sizes["model"], workdir / "model")
        self.n = matmul_params(self.model_dir)
        seq = self.sizes["seq_len"]
        self.docs = make_docs(self.sizes["tokens"], CONFIGS[self.sizes["model"]]["vocab_size"], seq, seed=0)
        self.data = SweepData(None, D.pack(self.docs, seq, pad_id=0), D.pack(self.docs[:8], seq, pad_id=0))
        self.spec = SweepSpec(study="gpu-check", model=ModelSpec(id=str(self.model_dir), max_seq_len=seq),
                              data=DataSpec(source="generated.jsonl"),
                              budget=BudgetSpec(train_tokens=self.sizes["tokens"], evals=2, checkpoint_every=10**9),
                              train=TrainSpec(batch_size=EFFECTIVE_BATCH, **LORA), space={})
        self.dtype = pick_precision(self.dev)
        self.base = BaseModel()  # the preflight loads it; parts 3-6 train on it, as a worker's trials do
        self.card: dict | None = None
        self.preflight_base = None  # a weak reference to the model the preflight loaded
        from transformers.models.llama import modeling_llama

        self.unfused = dict(vars(modeling_llama))  # before Liger patches the module (see unfused_modeling)

    def trial_data(self) -> SweepData:
        """The first `steps` steps' rows: what a trial here trains on."""
        n, rows = self.sizes["steps"] * EFFECTIVE_BATCH, self.data.train
        return SweepData(None, D.Batchable(rows.input_ids[:n], rows.labels[:n], rows.position_ids[:n], rows.real[:n]),
                         self.data.eval)

    def trial(self, name: str, base: BaseModel | None = None, device: str | None = None):
        return run_trial(self.spec, PARAMS, self.workdir / name, self.trial_data(), base=base, device=device,
                         log=lambda line: say(f"  {name}: {line.strip()}"))


@contextlib.contextmanager
def unfused_modeling(bench: Bench):
    """Liger's apply function replaces the modeling module's RoPE, RMSNorm and MLP classes for the whole process, so a
    base loaded afresh would run them too: the module's own are put back for the block."""
    from transformers.models.llama import modeling_llama

    patched = {k: v for k, v in vars(modeling_llama).items() if k in bench.unfused and bench.unfused[k] is not v}
    for name in patched:
        setattr(modeling_llama, name, bench.unfused[name])
    try:
        yield
    finally:
        for name, value in patched.items():
            setattr(modeling_llama, name, value)


def no_dropout(spec: SweepSpec) -> SweepSpec:
    """Dropout differs between runs and processes; without it they compute the same."""
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, lora_dropout=0.0))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------
# The parts: each returns (figure, result, figures); result is "pass", "fail" or "n/a: why"


def part_preflight(b: Bench):
    b.card = preflight(b.spec, b.data, b.base, device=str(b.dev), log=say)
    b.preflight_base = weakref.ref(b.base.model) if b.base.model is not None else None
    figure = "; ".join(f"{c['name']} {c['status']} {c['seconds']:.1f} s" for c in b.card["checks"])
    fused = "on" if b.card["fused"] else f"off: {b.card['fused_note']}"
    figure += f" (micro-batch {b.card['micro_batch']}, {b.card['precision']}, fused kernels {fused})"
    keep = ("ok", "precision", "micro_batch", "gradient_checkpointing", "fused", "fused_note", "checks", "seconds")
    return figure, "pass" if b.card["ok"] else "fail", {k: b.card[k] for k in keep}


def part_trainer(b: Bench):
    precisions = ["fp32", "bf16"] if b.cpu else ["fp16"] + (["bf16"] if bf16_supported(b.dev) else [])
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    peak = next((f for name, f in PEAK_FLOPS.items() if name in torch.cuda.get_device_name(b.dev)), None) \
        if not b.cpu else None
    figures, texts, ok, last_s = {}, [], True, 0.0
    for precision in precisions:
        if time.perf_counter() - STARTED + last_s > b.budget_s:  # the last precision's time would overrun it
            texts.append(f"{precision}: not run (time budget)")
            continue
        start = time.perf_counter()
        say(f"  trainer: plain HF, {precision}")
        try:
            baseline = run_baseline(b.model_dir, b.docs, b.sizes["seq_len"], dtypes[precision], b.workdir / precision)
        except Exception as e:  # noqa: BLE001  bf16 on the CPU: HF's to take or refuse
            if not b.cpu or precision == "fp32":
                raise
            texts.append(f"{precision}: n/a (HF Trainer refused it here: {first_line(e)})")
            continue
        gc.collect()
        say(f"  trainer: ours, {precision}" + ("" if b.cpu else f", capped to {baseline['peak_mem_mb']:,.0f} MiB"))
        try:
            ours = run_ours(b.model_dir, b.docs, b.sizes["seq_len"], precision, b.workdir / precision,
                            None if b.cpu else baseline["peak_mem_mb"])
        finally:
            if not b.cpu:
                torch.cuda.set_per_process_memory_fraction(1.0)
        free_memory(b.dev)
        ratio = ours["tokens_per_s"] / baseline["tokens_per_s"]
        for run in (baseline, ours):
            run["mfu"] = 4 * b.n * run["tokens_per_s"] / peak if peak else None
            if b.cpu:
                run["peak_mem_mb"] = None  # no allocator count on the CPU
        figures[precision] = {"baseline": baseline, "ours": ours, "ratio": ratio}
        text = (f"{precision}: ours {ours['tokens_per_s']:,.0f} vs HF {baseline['tokens_per_s']:,.0f} tok/s "
                f"= {ratio:.2f}x")
        if not b.cpu:
            text += (f", peak {ours['peak_mem_mb']:,.0f} / {baseline['peak_mem_mb']:,.0f} MiB"
                     + (f", MFU {ours['mfu']:.1%} / {baseline['mfu']:.1%}" if peak else ", MFU n/a (GPU peak unknown)"))
        texts.append(text)
        finite = all(math.isfinite(run["tokens_per_s"]) and run["tokens_per_s"] > 0 for run in (baseline, ours))
        ok = ok and finite and (b.cpu or ratio >= TARGET)
        last_s = time.perf_counter() - start
    if not b.cpu and not bf16_supported(b.dev):
        texts.append(f"bf16: n/a ({torch.cuda.get_device_name(b.dev)} has no bf16)")
    if b.cpu:
        texts.append("CPU proxy: the ratio says nothing of a GPU's; peak memory n/a (no allocator count)")
    return "; ".join(texts), "pass" if ok and figures else "fail", figures


def part_fused(b: Bench):
    from transformers import AutoConfig

    why = fused_kernels_unavailable(types.SimpleNamespace(config=AutoConfig.from_pretrained(b.model_dir)), b.dev)
    if why:
        return why, f"n/a: {why}", {"reason": why}
    check = next((c for c in (b.card or {}).get("checks", []) if c["name"] == "fused kernels"), None)
    if check is None:
        return "the preflight stopped before its fused check", "fail", {}
    if not b.base.fused:
        return f"preflight: {check['detail']}", "fail", {"detail": check["detail"]}
    on = b.trial("fused-on", base=b.base, device=str(b.dev))  # the preflight's device: its base is kept (part 4)
    with unfused_modeling(b):
        off = b.trial("fused-off", base=BaseModel(), device=str(b.dev))
    free_memory(b.dev)
    ratio = on.tokens_per_s / off.tokens_per_s
    figure = (f"preflight: {check['detail']}; trial on {on.tokens_per_s:,.0f} vs off {off.tokens_per_s:,.0f} tok/s "
              f"= {ratio:.2f}x (eval {on.eval_loss:.4f} / {off.eval_loss:.4f})")
    if not on.fused_kernels:
        figure += ": the trial on the preflight's fused base ran unfused"
    return figure, "pass" if on.fused_kernels else "fail", {
        "detail": check["detail"], "on_tokens_per_s": on.tokens_per_s, "off_tokens_per_s": off.tokens_per_s,
        "ratio": ratio, "fused_kernels": on.fused_kernels, "eval_losses": [on.eval_loss, off.eval_loss]}


def part_kept_base(b: Bench):
    """Three trials as a worker runs them (run_trial with no device, on the base the preflight loaded)."""
    allocated, losses, loaded = [], [], []
    for i in range(3):
        before = b.preflight_base if i == 0 else weakref.ref(b.base.model)
        result = b.trial(f"kept-{i}", base=b.base)
        loaded.append(before is None or before() is not b.base.model)  # loaded (again) by this trial
        free_memory(b.dev)  # the trial's frame is gone: what is left is the base and whatever leaked
        sync(b.dev)
        allocated.append(torch.cuda.memory_allocated(b.dev) / 2**20 if not b.cpu else None)
        losses.append(result.eval_loss)
    figures = {"allocated_mb": allocated, "eval_losses": losses, "loaded_by_trial": loaded}
    reloads = [i + 1 for i, again in enumerate(loaded) if again and (i > 0 or b.preflight_base is not None)]
    text = (f"eval loss {' / '.join(f'{x:.4f}' for x in losses)}; "
            + (f"the base was loaded again by trial {', '.join(map(str, reloads))}" if reloads else
               "the base kept throughout" + (" (from the preflight)" if b.preflight_base is not None else "")))
    if b.cpu:
        return f"three trials ran; {text}", "fail" if reloads else "n/a: no allocator count on the CPU", figures
    spread = max(allocated) - min(allocated)
    figure = (f"allocated after each: {' / '.join(f'{x:,.1f}' for x in allocated)} MiB (spread {spread:.1f} MiB, "
              f"{MEMORY_SLACK_MB} allowed); {text}")
    return figure, "pass" if spread <= MEMORY_SLACK_MB and not reloads else "fail", figures


def seconds_per_sequence(model, tensors, m: int, dev, dtype, repeats: int = 2) -> float | None:
    """The fastest of `repeats` forward and backward passes of m sequences (after one untimed), per sequence; None
    if they do not fit."""
    batch = {k: v[:m] for k, v in tensors.items()}
    n_items = max(1, S.label_count(batch["labels"]))
    times = []
    try:
        for _ in range(1 + repeats):
            sync(dev)
            start = time.perf_counter()
            S.forward_loss(model, batch, dev, dtype, n_items).backward()
            sync(dev)
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    except RuntimeError as e:
        if not S.is_out_of_memory(e):
            raise
        return None
    finally:
        model.zero_grad(set_to_none=True)
        free_memory(dev)
    return min(times[1:]) / m


def part_probe(b: Bench):
    cfg = b.spec.trial_config(PARAMS)
    tensors = S.to_tensors(b.data.train)
    with b.base.lora(b.spec, cfg, b.dev, b.dtype) as model:
        model.train()
        pick = S.choose_micro_batch(model, tensors, cfg.batch_size, b.dev, b.dtype, say)
        picked_checkpointing = S.is_checkpointing(model)
        candidates = [m for m in (2**i for i in range(12, -1, -1)) if m <= cfg.batch_size and cfg.batch_size % m == 0]
        timed = {}  # (micro-batch, checkpointing) -> seconds per sequence
        for checkpointing in ([False] if b.cpu else [False, True]):  # the CPU's probe never checkpoints
            S.set_checkpointing(model, checkpointing)
            for m in candidates:
                if checkpointing and (m, False) in timed:
                    continue  # what fits without checkpointing is only slower with it
                if (seconds := seconds_per_sequence(model, tensors, m, b.dev, b.dtype)) is not None:
                    timed[m, checkpointing] = seconds
                    say(f"  micro-batch {m}{' with checkpointing' if checkpointing else ''}: "
                        f"{seconds * 1e3:.1f} ms/seq")
    fastest = min(timed, key=timed.get)
    mine = timed.get((pick, picked_checkpointing))
    figures = {"pick": pick, "pick_checkpointing": picked_checkpointing, "fastest": fastest[0],
               "fastest_checkpointing": fastest[1], "pick_ms_per_seq": mine and mine * 1e3,
               "fastest_ms_per_seq": timed[fastest] * 1e3,
               "timed_ms_per_seq": {f"{m}{' ckpt' if c else ''}": t * 1e3 for (m, c), t in timed.items()}}
    ckpt = {True: " with checkpointing", False: ""}
    figure = (f"picks {pick}{ckpt[picked_checkpointing]}"
              + (f" ({mine * 1e3:.1f} ms/seq)" if mine else " (did not fit when timed)")
              + f"; fastest timed {fastest[0]}{ckpt[fastest[1]]} ({timed[fastest] * 1e3:.1f} ms/seq); all: "
              + ", ".join(f"{m}{' ckpt' if c else ''} {t * 1e3:.1f}" for (m, c), t in timed.items()))
    if b.cpu:
        return figure + f" (the CPU takes the largest up to {S.CPU_MAX_MICRO_BATCH}, unprobed)", "pass", figures
    within = mine is not None and mine <= timed[fastest] * (1 + PROBE_SLACK)
    return figure, "pass" if within else "fail", figures


def part_oom(b: Bench):
    spec = no_dropout(b.spec)
    cfg = spec.trial_config(PARAMS)
    batch = {k: v[:OOM_ROWS] for k, v in S.to_tensors(b.data.train).items()}
    n_items = max(1, S.label_count(batch["labels"]))
    with b.base.lora(spec, cfg, b.dev, b.dtype) as model:
        model.train()
        S.set_checkpointing(model, False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        scaler = torch.amp.GradScaler(b.dev.type, enabled=b.dtype == torch.float16)

        def step(micro: int, what: str):
            optimizer.zero_grad(set_to_none=True)
            loss, used = S.accumulate_fitting(model, batch, micro, optimizer, scaler, b.dev, b.dtype, n_items, what,
                                              say)
            optimizer.zero_grad(set_to_none=True)
            return float(loss), used

        if b.cpu:  # no GPU to exhaust: forward_loss fails as cuBLAS does above half the batch
            reference, largest = step(OOM_ROWS, "uncapped")
            limit, how = largest // 2, f"forward_loss raising CUBLAS_STATUS_ALLOC_FAILED above {largest // 2} rows"
            real = S.forward_loss

            def exhausted(model, batch, *args, **kwargs):
                if len(batch["input_ids"]) > limit:
                    raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
                return real(model, batch, *args, **kwargs)

            S.forward_loss = exhausted
            try:
                capped, used = step(largest, "capped")
            finally:
                S.forward_loss = real
        else:
            reference, largest = step(OOM_ROWS, "uncapped")  # the largest micro-batch that fits uncapped
            if largest == 1:
                return "only micro-batch 1 fits uncapped", "n/a: nothing smaller to back off to", {}
            peaks = []  # what a step at the largest and at half of it allocates, each measured on its own
            for micro in (largest, largest // 2):
                free_memory(b.dev)
                before = torch.cuda.memory_allocated(b.dev)
                torch.cuda.reset_peak_memory_stats(b.dev)
                step(micro, "measured")
                peaks.append(torch.cuda.max_memory_allocated(b.dev) - before)
            free_memory(b.dev)
            cap = torch.cuda.memory_reserved(b.dev) + sum(peaks) / 2  # between the two: the largest does not fit
            how = f"memory capped at {cap / 2**20:,.0f} MiB (set_per_process_memory_fraction)"
            total = torch.cuda.get_device_properties(b.dev).total_memory
            torch.cuda.set_per_process_memory_fraction(cap / total, b.dev)
            try:
                capped, used = step(largest, "capped")
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, b.dev)
                free_memory(b.dev)
    same = math.isclose(capped, reference, rel_tol=LOSS_RTOL[b.dtype])
    figure = (f"{how}: micro-batch {largest} -> {used}, step loss {capped:.6f} vs {reference:.6f} uncapped "
              f"({abs(capped - reference) / abs(reference):.1e} relative, {LOSS_RTOL[b.dtype]:g} allowed)")
    return figure, "pass" if used < largest and same else "fail", {
        "largest": largest, "backed_off_to": used, "loss": capped, "reference_loss": reference}


def part_two(b: Bench):
    devices = ["cpu", "cpu"] if b.cpu else [f"cuda:{i}" for i in range(2)]
    if not b.cpu and torch.cuda.device_count() < 2:
        return f"{torch.cuda.device_count()} GPU visible", f"n/a: {torch.cuda.device_count()} GPU visible", {}
    spec, data = no_dropout(b.spec), b.trial_data()
    start = time.perf_counter()
    with unfused_modeling(b):  # the two processes load it unfused, as fresh processes do
        alone = run_trial(spec, PARAMS, b.workdir / "one", data, log=lambda line: say(f"  one process: {line.strip()}"))
    one_s = time.perf_counter() - start
    free_memory(b.dev)
    start = time.perf_counter()
    two = run_trial_parallel(spec, PARAMS, b.workdir / "two", data, devices=devices,
                             log=lambda line: say(f"  two processes: {line.strip()}"))
    two_s = time.perf_counter() - start
    rtol = LOSS_RTOL[b.dtype]
    same = len(two.eval_losses) == len(alone.eval_losses) and all(
        math.isclose(x, y, rel_tol=rtol) for x, y in zip(two.eval_losses, alone.eval_losses))
    worst = max((abs(x - y) / abs(y) for x, y in zip(two.eval_losses, alone.eval_losses)), default=float("nan"))
    backend = "gloo" if b.cpu else "NCCL"
    figure = (f"{backend} on {', '.join(devices)}: eval {' / '.join(f'{x:.4f}' for x in two.eval_losses)} vs one "
              f"process {' / '.join(f'{x:.4f}' for x in alone.eval_losses)} ({worst:.1e} relative, {rtol:g} allowed); "
              f"whole trial {two_s:.1f} s vs {one_s:.1f} s = {two_s / one_s:.2f}x; "
              f"tokens/s {two.tokens_per_s:,.0f} vs {alone.tokens_per_s:,.0f}")
    if b.cpu:
        figure += " (both processes share the CPU: what the split costs, not what it gains)"
    return figure, "pass" if same else "fail", {
        "eval_losses": two.eval_losses, "one_process_eval_losses": alone.eval_losses, "seconds": two_s,
        "one_process_seconds": one_s, "time_ratio": two_s / one_s, "tokens_per_s": two.tokens_per_s,
        "one_process_tokens_per_s": alone.tokens_per_s}


# The rows, in the table's order: number, name, what the row measured, the part.
PARTS = [
    (1, "preflight", "runner.doctor.preflight on the bench model: each check's status and seconds", part_preflight),
    (2, "trainer vs plain HF", (f"tokens/s of ours (on a GPU capped to HF's peak memory) and of HF Trainer + peft "
                                f"(padded, checkpointing on), the ratio (target >= {TARGET}x), peak memory, MFU"),
     part_trainer),
    (3, "fused kernels on and off", "the preflight's fused-vs-unfused equality; a trial's tokens/s fused on vs off",
     part_fused),
    (4, "kept base memory", "torch.cuda.memory_allocated after each of three trials on one BaseModel", part_kept_base),
    (5, "micro-batch probe", "choose_micro_batch's pick vs the fastest micro-batch timed (ms per sequence)",
     part_probe),
    (6, "OOM back-off", (f"accumulate_fitting over {OOM_ROWS} rows from a micro-batch that does not fit: where it "
                         "backs off to, and its step loss vs uncapped"), part_oom),
    (7, "two GPUs", "one trial on two processes (run_trial_parallel) vs in one: eval losses, time ratio", part_two),
]
ORDER = [2, 1, 3, 4, 5, 6, 7]  # the trainer first: bench/trainer.py's runs assume nothing else holds GPU memory


def header(b: Bench) -> str:
    versions = library_versions()
    device = (f"{torch.cuda.get_device_name(b.dev)} ({torch.cuda.device_count()} visible)" if not b.cpu
              else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    shape = CONFIGS[b.sizes["model"]]
    return (f"{device}; torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, bitsandbytes "
            f"{versions.get('bitsandbytes', 'none')}, liger-kernel {versions.get('liger-kernel', 'not installed')}; "
            f"model {b.sizes['model']} (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocab "
            f"{shape['vocab_size']}: {b.n / 1e6:,.1f}M matmul weights, random init), seq {b.sizes['seq_len']}, "
            f"{b.card['precision'] if b.card else S.precision_name(b.dtype)}; {datetime.date.today().isoformat()}")


def table(title: str, rows: list[dict]) -> str:
    lines = [title, "", "| # | part | measured | figure | result |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [str(row["number"]), row["part"], row["measured"], row["figure"], row["result"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU, even if a GPU is present")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="parts that would start after this many seconds are listed as not run")
    args = parser.parse_args()
    quiet_libraries()
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu and not args.cpu:
        say("no CUDA GPU visible: running the CPU proxy (--cpu)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # HF Trainer prints its logs
        say(f"building {(CPU if cpu else GPU)['model']} from its config")
        b = Bench(cpu, Path(tmp), args.budget_s)
        free_memory(b.dev)  # the built model's weights, before the baseline measures its peak
        for number in ORDER:
            _, name, _, part = PARTS[number - 1]
            if time.perf_counter() - STARTED >= b.budget_s:
                results[number] = ("", "not run: time budget", {}, 0.0)
                say(f"{number}. {name}: not run (the {args.budget_s:.0f} s budget is spent)")
                continue
            say(f"{number}. {name}")
            start = time.perf_counter()
            try:
                figure, result, figures = part(b)
            except Exception as e:  # noqa: BLE001  a part that breaks is that row's failure, in one line
                figure, result, figures = f"{type(e).__name__}: {first_line(e)}", "fail", {}
            seconds = time.perf_counter() - start
            results[number] = (figure, result, figures, seconds)
            say(f"{number}. {name}: {result} ({seconds:.0f} s): {figure}")
            free_memory(b.dev)
        title = f"GPU truth table{' (CPU proxy)' if cpu else ''}: {header(b)}"
    rows = [{"number": number, "part": name, "measured": measured, "figure": results[number][0],
             "result": results[number][1], "figures": results[number][2], "seconds": round(results[number][3], 1)}
            for number, name, measured, _ in PARTS]
    text = table(title, rows)
    wall = time.perf_counter() - STARTED
    print(text)
    say(f"done in {wall:.0f} s")
    for path in (args.out, args.json):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"title": title, "cpu": cpu, "wall_s": round(wall, 1), "rows": rows},
                                        indent=2, default=str))
    sys.exit(1 if any(row["result"] == "fail" for row in rows) else 0)


if __name__ == "__main__":
    main()
