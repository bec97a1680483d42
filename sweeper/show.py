"""`sweeper show N`: one trial in full, as text that fits the terminal (from 80 columns up) or as JSON."""

from __future__ import annotations

import textwrap
from typing import Any

import optuna

from sweeper.configs import group_configs, numbers_text, params_text, trial_seeds
from sweeper.errors import UserError
from sweeper.record import DIVERGED, RESULT, WORKER, cards, lease_of, resumed_from
from sweeper.spec import SweepSpec

BARS = "▁▂▃▄▅▆▇█"
LABEL = 12  # the label column; values start after it


def trial_detail(study: optuna.Study, spec: SweepSpec, trials: list[optuna.trial.FrozenTrial],
                 rows: list[dict[str, Any]], number: int) -> dict[str, Any]:
    """Everything known about trial `number`: its report row (report.trial_rows over the same `trials`, one read of
    the store) plus its seed, eval-loss curve, checkpoint, resume chain, the config it belongs to and the machine card
    of the worker that ran it (the study's user attrs: one more read)."""
    trial = next((t for t in trials if t.number == number), None)
    if trial is None:
        have = f"its trials are #0 to #{len(trials) - 1}" if trials else "it has no trial yet"
        raise UserError(f"no trial {number} in study {study.study_name!r}: {have}")
    row = next(r for r in rows if r["number"] == number)
    result, worker = row["user_attrs"].get(RESULT, {}), row["user_attrs"].get(WORKER, {})
    config = next((g for g in group_configs(rows) if number in g.trials), None)
    chain = resume_chain(trials, trial)
    return {
        **row,
        "seed": trial_seeds(trials)[number],
        "seed_default": spec.train.seed,
        "evals": spec.budget.evals,
        "eval_losses": [[k, trial.intermediate_values[k]] for k in sorted(trial.intermediate_values)],
        "train_loss": result.get("train_loss") or [],
        "checkpoint": result.get("checkpoint") or lease_of(trial).get("checkpoint"),
        "lease": lease_of(trial),  # a running trial's heartbeat: its worker, checkpoint folder, step
        "worker": worker,
        "result": {k: v for k, v in result.items() if k not in ("train_loss", "eval_losses")},
        "chain": [{"number": n, "state": rows[n]["state"]} for n in chain],
        "other_resumes": [{"number": n, "state": rows[n]["state"], "resumes": of}
                          for n, of in other_resumes(trials, chain)],
        "config": config.to_dict() if config is not None else None,
        "card": cards(study.user_attrs).get(worker.get("id")) if worker else None,
    }


def resume_chain(trials: list[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial) -> list[int]:
    """The trials that continue one another, first to last, from the first of this one's; [] for a trial never
    resumed. Where a trial was resumed more than once (two takers raced, a retry), the line goes through the
    lowest-numbered resume, the one that runs; other_resumes gives the rest (this one, maybe)."""
    back = resumed_from(trials)
    resumed_as: dict[int, int] = {}
    for number, resumed in sorted(back.items()):  # the lower number runs
        resumed_as.setdefault(resumed.number, number)
    first, seen = trial.number, {trial.number}
    while (before := back.get(first)) is not None and before.number not in seen:  # (a hand-edited store may loop)
        first = before.number
        seen.add(first)
    chain = [first]
    while (after := resumed_as.get(chain[-1])) is not None and after not in chain:
        chain.append(after)
    return chain if len(chain) > 1 else []


def other_resumes(trials: list[optuna.trial.FrozenTrial], chain: list[int]) -> list[tuple[int, int]]:
    """(resume, the trial it resumes) for every resume of a trial on the chain that is not on it itself."""
    on_chain = set(chain)
    return sorted((number, resumed.number) for number, resumed in resumed_from(trials).items()
                  if resumed.number in on_chain and number not in on_chain)


def sparkline(values: list[float], width: int) -> str:
    """One bar per value (evenly thinned to `width`), low loss low."""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    span = hi - lo or 1.0
    return "".join(BARS[round((v - lo) / span * (len(BARS) - 1))] for v in values)


def render(d: dict[str, Any], width: int) -> list[str]:
    """The detail as lines of at most `width` columns; only a checkpoint path longer than a line is printed whole."""
    width = max(width, 40)
    lines = []

    def add(label: str, text: str) -> None:
        lines.extend(textwrap.wrap(text, width, initial_indent=f"{label:<{LABEL}}", subsequent_indent=" " * LABEL,
                                   break_on_hyphens=False) or [label])

    loss = f"eval loss {d['eval_loss']:.4f}" if d["eval_loss"] is not None else "no eval loss yet"
    add(f"trial {d['number']}", f"{d['state'].lower()}, {loss}")
    if diverged := d["result"].get(DIVERGED):
        value = "its value the last finite eval loss" if d["eval_loss"] is not None else "before its first eval"
        add("diverged", f"{diverged}; told to Optuna as pruned, {value}")
    add("params", params_text(d["params"]) or "none yet")
    add("seed", f"{d['seed']} (a repeat of its config)" if d["seed"] is not None else
        f"{d['seed_default']} (the spec's train.seed)")
    if (c := d["config"]) is not None and len(c["runs"]) + c["pending"] > 1:  # the config has other runs
        spread = f" ± {c['std']:.4f}" if c["std"] is not None else ""
        runs = len(c["runs"])
        pending = f"; {c['pending']} waiting or running" if c["pending"] else ""
        add("config", f"{runs} complete run{'s' if runs != 1 else ''}: mean eval loss {c['mean']:.4f}{spread} "
            f"(trials {numbers_text(c['trials'])}){pending}")
    evals = [v for _, v in d["eval_losses"]]
    if evals:
        add("eval loss", f"{sparkline(evals, width - LABEL)} {len(evals)} of {d['evals']} evals: "
            + " ".join(f"{v:.4f}" for v in evals))
    train = [pair for pair in d["train_loss"] if isinstance(pair, list) and len(pair) == 2]
    if train:
        low = min(train, key=lambda p: p[1])
        add("train loss", f"{sparkline([p[1] for p in train], width - LABEL)} {train[0][1]:.4f} at step {train[0][0]}, "
            f"lowest {low[1]:.4f} at step {low[0]}, last {train[-1][1]:.4f} at step {train[-1][0]}")
    if d["checkpoint"]:
        path = str(d["checkpoint"])
        if LABEL + len(path) <= width:
            lines.append(f"{'checkpoint':<{LABEL}}{path}")
        else:  # whole, on a line of its own, so that it copies in one piece
            lines += ["checkpoint", path]
    w, r = d["worker"], d["result"]
    if w:
        add("worker", ", ".join(filter(None, [w.get("id"), w.get("account") and f"account {w['account']}",
                                              w.get("platform")])))
    if w.get("gpu") or r.get("micro_batch"):
        gpus = r.get("gpus", 1)
        batch = (f"micro-batch {r['micro_batch']} x {r.get('grad_accum', 1)} accumulation"
                 + (f" x {gpus} GPUs" if gpus > 1 else "")) if r.get("micro_batch") else ""
        add("GPU", ", ".join(filter(None, [w.get("gpu"), batch, r.get("precision")])))
    if r.get("steps") is None and d["state"] == "RUNNING" and (step := d["lease"].get("step")) is not None:
        add("run", f"step {step}/{d['lease'].get('total_steps', '?')} at its last heartbeat")
    if r.get("steps") is not None:
        add("run", ", ".join(filter(None, [
            f"{r['steps']}/{r.get('total_steps', '?')} steps",
            r.get("resumed_from_step") and f"resumed at step {r['resumed_from_step']}",
            r.get("wall_time_s") is not None and f"{r['wall_time_s']:,.1f} s",
            r.get("tokens_per_s") is not None and f"{r['tokens_per_s']:,.0f} tok/s",
            r.get("peak_mem_mb") is not None and f"peak {r['peak_mem_mb']:,.0f} MB"])))
    if card := d["card"]:
        lines += card_lines(card, width)
    elif r.get("versions"):  # (the card has them)
        add("versions", ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    if d["chain"]:
        add("chain", " -> ".join(f"#{c['number']} {c['state'].lower()}" for c in d["chain"])
            + "".join(f"; #{o['number']} {o['state'].lower()} resumed #{o['resumes']} too" for o in d["other_resumes"]))
    note = d["note"]
    if diverged:  # given above
        note = "; ".join(part for part in note.split("; ") if part != f"diverged: {diverged}")
    if note:
        add("note", note)
    times = [f"{t:%Y-%m-%d %H:%M:%S}" for t in (d["datetime_start"], d["datetime_complete"]) if t]
    if times:
        add("time", " to ".join(times))
    return lines


def card_lines(card: dict[str, Any], width: int, details: bool = False) -> list[str]:
    """A machine card (runner/doctor.py) as `show` prints it: the machine, and the preflight's checks; with details
    (`sweeper doctor`), a line for each check saying what it found."""
    width = max(width, 40)
    checks = card.get("checks", [])
    summary = ", ".join(f"{c.get('name')} {c.get('status')} {c.get('seconds') or 0:.1f} s" for c in checks)
    verdict = f"{'passed' if card.get('ok') else 'failed'} in {card.get('seconds') or 0:.1f} s"
    labelled = [("machine", _machine_text(card)), ("preflight", verdict if details else f"{verdict}: {summary}")]
    if details:
        labelled += [(f"  {c.get('name')}", f"{c.get('status')}, {c.get('seconds') or 0:.1f} s: {c.get('detail')}")
                     for c in checks]
    pad = LABEL + 5 if details else LABEL  # "  training step" and a space
    lines = []
    for label, text in labelled:
        lines += textwrap.wrap(text, width, initial_indent=f"{label:<{pad}}", subsequent_indent=" " * pad,
                               break_on_hyphens=False)
    return lines


def _machine_text(card: dict[str, Any]) -> str:
    """Tesla T4, compute capability 7.5, 15.6 GB; fp16, micro-batch 4; fused kernels off: why; torch 2.11.0, ..."""
    gpu = ", ".join(filter(None, [card.get("gpu"),
                                  card.get("capability") and f"compute capability {card['capability']}",
                                  card.get("memory_gb") and f"{card['memory_gb']:.1f} GB"]))
    chosen = ", ".join(filter(None, [card.get("precision"),
                                     card.get("micro_batch") and f"micro-batch {card['micro_batch']}",
                                     card.get("gradient_checkpointing") and "gradient checkpointing"]))
    fused = "fused kernels on" if card.get("fused") else f"fused kernels off: {card.get('fused_note') or '?'}"
    versions = ", ".join(f"{k} {v}" for k, v in (card.get("versions") or {}).items() if v)
    return "; ".join(filter(None, [gpu, chosen, fused, versions]))
