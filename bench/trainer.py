"""Trainer throughput: one trial of our runner against the common-notebook QLoRA script, in one run.

The baseline is written the way the popular QLoRA notebooks do it: HF Trainer + peft +
bitsandbytes NF4, every example padded to max length, no packing, gradient checkpointing on,
micro-batch 4 x accumulation 4, paged 8-bit AdamW on a GPU. Both train the same randomly
initialised model (built from a config: nothing is downloaded) on the same documents to the same
token budget with the same LoRA settings. Ours runs capped to the baseline's peak memory
(`--equal-memory`, on a GPU) so "faster" is measured at no more memory.

    python bench/trainer.py --model small --tokens 60000           # CPU proxy
    python bench/trainer.py --model tinyllama-1.1b --precision fp16 --equal-memory   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner import data as D  # noqa: E402
from runner.train import SweepData, quiet_libraries, run_trial  # noqa: E402
from sweeper.spec import BudgetSpec, DataSpec, ModelSpec, SweepSpec, TrainSpec  # noqa: E402

CONFIGS = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),
    # TinyLlama-1.1B's shape, the model Unsloth's T4 figure is for.
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
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
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = sum(rows.real[: steps * EFFECTIVE_BATCH])
    result = {"tokens": tokens, "steps": steps, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "peak_mem_mb": peak_mb(), "micro_batch": BASELINE_MICRO}
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
    result = run_trial(spec, {"learning_rate": 2e-4}, workdir / "ours", sweep_data, precision=precision,
                       log=lambda line: print(line, file=sys.stderr))
    if memory_cap_mb and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)
    return {"tokens": result.train_tokens, "steps": result.steps, "seconds": result.train_tokens / result.tokens_per_s,
            "tokens_per_s": result.tokens_per_s, "peak_mem_mb": peak_mb(), "micro_batch": result.micro_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--tokens", type=int, default=60_000, help="training tokens per run (real, not padding)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None)
    parser.add_argument("--equal-memory", action="store_true", help="cap ours to the baseline's peak GPU memory")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    quiet_libraries()

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
               "memory_ratio": ours["peak_mem_mb"] / baseline["peak_mem_mb"] if cuda else None}
    for run in (baseline, ours):
        run["mfu"] = 4 * n * run["tokens_per_s"] / peak if peak else None
    print("| run | tokens/s | peak MiB | micro-batch | steps | MFU |\n|---|---|---|---|---|---|")
    for name, run in (("baseline (HF Trainer, padded, GC on)", baseline), ("sweeper runner (packed)", ours)):
        mfu = f"{run['mfu']:.1%}" if run["mfu"] else "n/a"
        print(f"| {name} | {run['tokens_per_s']:,.0f} | {run['peak_mem_mb']:,.0f} | {run['micro_batch']} | {run['steps']} | {mfu} |")
    print(f"{device}, {args.model} ({n / 1e6:.0f}M matmul params), {precision}, seq {args.seq_len}: "
          f"speedup {figures['speedup']:.2f}x" + (f", memory {figures['memory_ratio']:.2f}x" if cuda else ""))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
