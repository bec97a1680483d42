"""What a sweep is expected to cost in GPU-hours, said by `sweeper init` before a trial runs."""

from __future__ import annotations

from statistics import median

import optuna
from optuna.trial import TrialState

from sweeper.record import result_of, worker_of
from sweeper.spec import SweepSpec

# Training tokens/s of our runner, one GPU, for the cost `init` prints before a trial has run: measured figures only,
# each for one model and GPU class, with its source. A model or GPU with none is priced once a trial there completes.
SHIPPED_TOKENS_PER_S = {
    ("tinyllama-1.1b", "H100"): (2116, "BENCHMARKS.md, Trainer: TinyLlama-1.1B shape, seq 1024, fp16, memory capped"),
}
AFTER = "training steps only: evaluation and loading add to it, pruned trials take less"


def shipped_speeds(model_id: str) -> dict[str, tuple[int, str]]:
    """GPU -> (tokens/s, source) shipped for this model: its id's last part names it ("TinyLlama/TinyLlama-1.1B-Chat
    -v1.0"), in any case."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    return {gpu: figure for (model, gpu), figure in SHIPPED_TOKENS_PER_S.items() if name.startswith(model)}


def expected_cost(spec: SweepSpec, study: optuna.Study) -> list[str]:
    """The sweep's GPU-hours, n_trials x tokens per trial / tokens per second per GPU, as lines to print: from this
    study's complete trials on each GPU type when it has some, else from a figure shipped for this model, else a line
    saying it cannot be known yet. tokens/s is the training steps' own speed, so this is training time at the full
    budget: evaluation and loading add to it, pruning takes from it."""
    speeds: dict[str, list[float]] = {}
    tokens = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        r = result_of(t)
        if r.get("tokens_per_s") and worker_of(t).get("gpu"):  # per GPU: a trial on 2 GPUs counts each
            speeds.setdefault(worker_of(t)["gpu"], []).append(r["tokens_per_s"] / (r.get("gpus") or 1))
        if r.get("train_tokens"):
            tokens.append(r["train_tokens"])
    b = spec.budget
    per_trial = b.train_tokens or (median(tokens) if tokens else b.train_examples * spec.model.max_seq_len)
    total = spec.n_trials * per_trial
    head = (f"expected cost: {spec.n_trials} trials x {per_trial:,.0f} tokens"
            + ("" if b.train_tokens or tokens else " (at most: examples x max_seq_len)"))
    if speeds:
        each = [f"{hours(total / median(v))} GPU-hours on {gpu} ({median(v):,.0f} tok/s measured, "
                f"{len(v)} trial{'s' if len(v) > 1 else ''} of this study)" for gpu, v in sorted(speeds.items())]
    elif shipped := shipped_speeds(spec.model.id):
        each = [f"{hours(total / tps)} GPU-hours on {gpu} ({tps:,} tok/s, {source})"
                for gpu, (tps, source) in shipped.items()]
        each.append("other GPUs: priced once a trial there completes (sweeper init --overwrite)")
    else:
        return [f"{head}; GPU-hours not known yet:",
                f"  no trial of this study has completed, and no speed is shipped for {spec.model.id}",
                "  (sweeper init --overwrite prices it once one has)"]
    return [f"{head}:", *(f"  {line}" for line in each), f"  ({AFTER})"]


def hours(seconds: float) -> str:
    """12, 3.4, 0.0083: two significant digits below 10 hours."""
    value = seconds / 3600
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"
