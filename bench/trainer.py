"""Trainer throughput: one trial of our runner against the common-notebook QLoRA script, in one run.

The baseline is written the way the popular QLoRA notebooks do it: HF Trainer + peft +
bitsandbytes NF4, every example padded to max length, no packing, gradient checkpointing on,
micro-batch 4 x accumulation 4, paged 8-bit AdamW on a GPU. Both train the same randomly
initialised model (built from a config: nothing is downloaded) on the same documents to the same
token budget with the same LoRA settings. Ours runs capped to the baseline's peak memory
(`--equal-memory`, on a GPU) so "faster" is measured at no more memory.

    python bench/trainer.py --model small --tokens 60000           # CPU proxy
    python bench/trainer.py --model tinyllama-1.1b --precision fp16 --equal-memory   # on a GPU

`--startup` measures instead what a worker pays from claiming a trial to its first step, for trials after the
first on one worker (the base model kept, runner.model.BaseModel) against the first (which loads and quantizes
it), and against trials that each load it afresh, as every trial did before. Each trial is two short steps.

    python bench/trainer.py --startup --model tinyllama-2-layers --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner import data as D  # noqa: E402
from runner.train import BaseModel, SweepData, quiet_libraries, run_trial  # noqa: E402
from sweeper.spec import BudgetSpec, DataSpec, ModelSpec, SweepSpec, TrainSpec  # noqa: E402

CONFIGS = {
    # A Llama in miniature: bench/gpu_check.py --cpu runs every part of its table on it, on 2 cores, in minutes.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2000),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),
    # TinyLlama-1.1B's shape, the model Unsloth's T4 figure is for.
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    # The same shape with 2 of its 22 layers (222M weights): loading and quantizing it shows, even on a CPU.
    "tinyllama-2-layers": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
                               num_key_value_heads=4, vocab_size=32000),
}
# Dense fp16/bf16 tensor-core peaks, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12, "P100": 18.7e12}
EFFECTIVE_BATCH, BASELINE_MICRO = 16, 4
LORA = dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.05)


def build_model(name: str, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIGS[name], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(folder)
    return folder


def matmul_params(folder: Path) -> int:
    """N in the 4N-FLOPs-per-token LoRA estimate: every linear weight, the LM head included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def make_docs(tokens: int, vocab: int, max_len: int, seed: int) -> list[D.Doc]:
    """Instruction-data-like lengths (log-normal, median ~200 tokens), random ids."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < tokens:
        n = min(max_len, max(16, int(rng.lognormvariate(math.log(200), 0.7))))
        ids = [rng.randrange(3, vocab) for _ in range(n - 1)] + [2]
        docs.append(D.Doc(ids, list(ids)))
        total += n
    return docs


def peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class StepEnds:
    """This process's CPU time at the end of each step. On a machine others share, their load stretches wall time
    but hardly the CPU time a run itself takes: tokens per CPU second over steps 2.. (the first warms up) compares
    runs made minutes apart under different load."""

    def __init__(self):
        self.cpu_s: list[float] = []

    def end(self) -> None:
        self.cpu_s.append(time.process_time())

    def tokens_per_cpu_s(self, real: list[int]) -> float | None:
        if len(self.cpu_s) < 2:
            return None
        steps = len(self.cpu_s)
        return sum(real[EFFECTIVE_BATCH: steps * EFFECTIVE_BATCH]) / (self.cpu_s[-1] - self.cpu_s[0])


def StepEndCallback(step_ends: StepEnds):
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.end()

    return Callback()


def run_baseline(model_dir: Path, docs: list[D.Doc], seq_len: int, dtype: torch.dtype, workdir: Path) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, default_data_collator

    reset_memory()
    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"],
                                             lora_dropout=LORA["lora_dropout"], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = D.pad_each(docs, seq_len, pad_id=0)
    mask = [[1] * n + [0] * (seq_len - n) for n in rows.real]
    dataset = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(rows.input_ids, mask, rows.labels)]
    steps = len(docs) // EFFECTIVE_BATCH
    args = TrainingArguments(
        output_dir=str(workdir / "baseline"), per_device_train_batch_size=BASELINE_MICRO,
        gradient_accumulation_steps=EFFECTIVE_BATCH // BASELINE_MICRO, max_steps=steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * steps), gradient_checkpointing=True,
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, use_cpu=not cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch", logging_steps=10, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    step_ends = StepEnds()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[StepEndCallback(step_ends)])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = sum(rows.real[: steps * EFFECTIVE_BATCH])
    result = {"tokens": tokens, "steps": steps, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "tokens_per_cpu_s": step_ends.tokens_per_cpu_s(rows.real), "peak_mem_mb": peak_mb(),
              "micro_batch": BASELINE_MICRO}
    del trainer, model
    return result


def run_ours(model_dir: Path, docs: list[D.Doc], seq_len: int, precision: str, workdir: Path,
             memory_cap_mb: float | None) -> dict:
    reset_memory()
    if memory_cap_mb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_cap_mb * 2**20 / total)
    spec = SweepSpec(study="bench", model=ModelSpec(id=str(model_dir), max_seq_len=seq_len),
                     data=DataSpec(source="generated.jsonl"),
                     budget=BudgetSpec(train_tokens=sum(len(d.input_ids) for d in docs), evals=1, checkpoint_every=10**9),
                     train=TrainSpec(batch_size=EFFECTIVE_BATCH, **LORA))
    packed = D.pack(docs, seq_len, pad_id=0)
    sweep_data = SweepData(None, packed, D.pack(docs[:8], seq_len, pad_id=0))
    step_ends = StepEnds()
    result = run_trial(spec, {"learning_rate": 2e-4}, workdir / "ours", sweep_data, precision=precision,
                       log=lambda line: print(line, file=sys.stderr), progress=lambda *_: step_ends.end())
    if memory_cap_mb and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)
    return {"tokens": result.train_tokens, "steps": result.steps, "seconds": result.train_tokens / result.tokens_per_s,
            "tokens_per_s": result.tokens_per_s, "tokens_per_cpu_s": step_ends.tokens_per_cpu_s(packed.real),
            "peak_mem_mb": peak_mb(), "micro_batch": result.micro_batch}


def run_startup(model_dir: Path, docs: list[D.Doc], seq_len: int, precision: str, workdir: Path, trials: int) -> dict:
    """Seconds from run_trial's call to its first step done, for `trials` trials on one kept base and for as many
    that each load their own, in turns; each trial trains two steps of one sequence (its eval comes after the
    second)."""
    spec = SweepSpec(study="bench", model=ModelSpec(id=str(model_dir), max_seq_len=seq_len),
                     data=DataSpec(source="generated.jsonl"),
                     budget=BudgetSpec(train_tokens=2 * seq_len, evals=1, checkpoint_every=10**9),
                     train=TrainSpec(batch_size=1, **LORA))
    rows = D.pack(docs, seq_len, pad_id=0)
    two = D.Batchable(rows.input_ids[:2], rows.labels[:2], rows.position_ids[:2], rows.real[:2])  # the eval: after 2
    sweep_data = SweepData(None, two, two)
    figures: dict[str, list[float]] = {}
    ways = (("kept base", BaseModel()), ("fresh load", None))
    for i in range(trials):  # the two ways in turns: a shared machine's load drifts
        for name, base in ways:
            first_step: list[tuple[float, float]] = []  # (wall, this process's CPU) seconds: a shared machine's
            start = time.perf_counter(), time.process_time()  # other load stretches the first, not the second
            run_trial(spec, {"learning_rate": 2e-4}, workdir / f"{name}-{i}", sweep_data, precision=precision,
                      base=base, log=lambda line: None,
                      progress=lambda *_: first_step or first_step.append((time.perf_counter() - start[0],
                                                                           time.process_time() - start[1])))
            figures.setdefault(name, []).append(first_step[0][0])
            figures.setdefault(f"{name}, CPU", []).append(first_step[0][1])
            print(f"  {name}, trial {i + 1}: {first_step[0][0]:.2f} s ({first_step[0][1]:.2f} CPU s) to the first step",
                  file=sys.stderr)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--tokens", type=int, default=60_000, help="training tokens per run (real, not padding)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None)
    parser.add_argument("--equal-memory", action="store_true", help="cap ours to the baseline's peak GPU memory")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--startup", action="store_true", help="time claim-to-first-step of trials on one worker")
    parser.add_argument("--trials", type=int, default=3, help="with --startup: trials per way")
    args = parser.parse_args()
    quiet_libraries()
    if args.startup:
        startup(args)
        return

    cuda = torch.cuda.is_available()
    precision = args.precision or ("fp16" if cuda else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    device = torch.cuda.get_device_name() if cuda else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = build_model(args.model, workdir / "model")
        n = matmul_params(model_dir)
        docs = make_docs(args.tokens, CONFIGS[args.model]["vocab_size"], args.seq_len, seed=0)
        baseline = run_baseline(model_dir, docs, args.seq_len, dtype, workdir)
        ours = run_ours(model_dir, docs, args.seq_len, precision, workdir,
                        baseline["peak_mem_mb"] if args.equal_memory else None)

    peak = next((f for name, f in PEAK_FLOPS.items() if name in device), None)
    figures = {"device": device, "model": args.model, "matmul_params": n, "precision": precision,
               "seq_len": args.seq_len, "docs": len(docs), "baseline": baseline, "ours": ours,
               "speedup": ours["tokens_per_s"] / baseline["tokens_per_s"],
               "speedup_cpu_time": (ours["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"]
                                    if ours["tokens_per_cpu_s"] and baseline["tokens_per_cpu_s"] else None),
               "memory_ratio": ours["peak_mem_mb"] / baseline["peak_mem_mb"] if cuda else None}
    for run in (baseline, ours):
        run["mfu"] = 4 * n * run["tokens_per_s"] / peak if peak else None
    print("| run | tokens/s | peak MiB | micro-batch | steps | MFU |\n|---|---|---|---|---|---|")
    for name, run in (("baseline (HF Trainer, padded, GC on)", baseline), ("sweeper runner (packed)", ours)):
        mfu = f"{run['mfu']:.1%}" if run["mfu"] else "n/a"
        print(f"| {name} | {run['tokens_per_s']:,.0f} | {run['peak_mem_mb']:,.0f} | {run['micro_batch']} | {run['steps']} | {mfu} |")
    print(f"{device}, {args.model} ({n / 1e6:.0f}M matmul params), {precision}, seq {args.seq_len}: "
          f"speedup {figures['speedup']:.2f}x" + (f", memory {figures['memory_ratio']:.2f}x" if cuda else "")
          + (f"; per CPU second (steps 2..) {figures['speedup_cpu_time']:.2f}x" if figures["speedup_cpu_time"] else ""))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def startup(args) -> None:
    cuda = torch.cuda.is_available()
    precision = args.precision or ("fp16" if cuda else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.model, Path(tmp) / "model")
        docs = make_docs(4 * args.seq_len, CONFIGS[args.model]["vocab_size"], args.seq_len, seed=0)
        figures = run_startup(model_dir, docs, args.seq_len, precision, Path(tmp), args.trials)
    print("| claim to first step | 1st trial | later trials (median) | later / 1st |\n|---|---|---|---|")
    for name, times in figures.items():
        print(f"| {name} | {times[0]:.2f} s | {statistics.median(times[1:]):.2f} s | "
              f"{statistics.median(times[1:]) / times[0]:.2f} |")
    kept, fresh = figures["kept base"], figures["fresh load"]
    later = statistics.median(kept[1:])
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{device}, {args.model}, {precision}, seq {args.seq_len}: a later trial starts in {later / kept[0]:.0%} of "
          f"the first's time, {later / statistics.median(fresh[1:]):.0%} of a fresh load's")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "model": args.model, "precision": precision, **figures},
                                        indent=2))


if __name__ == "__main__":
    main()
