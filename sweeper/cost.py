"""What a sweep is expected to cost in GPU-hours, said by `sweeper init` before a trial runs."""

from __future__ import annotations

from statistics import median

import optuna
from optuna.trial import TrialState

from sweeper.record import result_of, worker_of
from sweeper.spec import SweepSpec

# Training tokens/s of a ~1B model in QLoRA with our runner, one GPU, for the cost `init` prints before a trial has
# run. Measured figures only, each with its source; T4, P100, L4 and A100 have none yet (no published figure for this
# runner), so their cost shows once a trial on one has finished.
TYPICAL_TOKENS_PER_S = {
    "H100": (2116, "BENCHMARKS.md, Trainer: TinyLlama-1.1B shape, seq 1024, fp16, memory capped"),
}


def expected_cost(spec: SweepSpec, study: optuna.Study) -> str:
    """The sweep's GPU-hours, n_trials x tokens per trial / tokens per second per GPU: from the study's complete trials
    on each GPU type when it has some, else from TYPICAL_TOKENS_PER_S. tokens/s is the training steps' own speed, so
    this is training time at the full budget: evaluation and loading add to it, pruning takes from it."""
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
        each = [f"{total / median(v) / 3600:,.1f} GPU-hours on {gpu} ({median(v):,.0f} tok/s measured, "
                f"{len(v)} trial{'s' if len(v) > 1 else ''})" for gpu, v in sorted(speeds.items())]
    else:
        each = [f"{total / tps / 3600:,.1f} GPU-hours on {gpu} ({tps:,} tok/s, {source})"
                for gpu, (tps, source) in TYPICAL_TOKENS_PER_S.items()]
        each.append("T4, P100, L4, A100: no typical speed shipped; measured once a trial there completes "
                    "(sweeper init --overwrite)")
    return f"{head}: " + "; ".join(each) + "; training steps only: evaluation and loading add to it, pruned trials take less"
