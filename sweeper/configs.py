"""Configs run more than once: trials grouped by their params, mean and spread per config, and the rule for the best.

A repeat is a trial enqueued with the params of a config already run and a seed of its own (the user attr SEED,
which study.suggest hands to the runner as train.seed). Every rule here works on report.trial_rows' rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

from sweeper.errors import SweeperError
from sweeper.record import DIVERGED, RESULT, SEED, resumed_from, row_info
from sweeper.spec import SweepSpec, drop_none

RULE = ("the best config has the lowest mean eval loss + standard error over its complete runs, the standard error "
        "being the noise between repeats (pooled over every repeated config) / sqrt(runs): a config run once pays the "
        "whole noise, one run 4 times half of it; with no repeat yet, the lowest eval loss wins; a config with a "
        "diverged run is never picked")
RULE_SHORT = "lowest mean eval loss + noise/sqrt(runs), the noise pooled over repeats; never one that diverged"  # as the exported config says it: a line a person reads


@dataclass(slots=True)
class ConfigGroup:
    """One config (a set of params) and every trial that ran it or will."""

    params: dict[str, Any]
    trials: list[int] = field(default_factory=list)
    """Every trial with these params, any state, in number order."""
    runs: list[int] = field(default_factory=list)
    """The complete trials, in number order."""
    losses: list[float] = field(default_factory=list)
    """Their eval losses, in the same order."""
    pending: int = 0
    """Trials of this config waiting or running."""
    diverged: int = 0
    """Trials of this config whose loss became NaN or inf (row_diverged)."""
    mean: float = math.nan
    std: float | None = None
    """Sample standard deviation of the losses; None for a config run once."""
    score: float = math.nan
    """What the rule ranks by: mean + noise / sqrt(n) (the mean while no config has been repeated)."""

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def best(self) -> float:
        return min(self.losses)

    @property
    def best_trial(self) -> int:
        """The config's complete run with the lowest eval loss."""
        return self.runs[self.losses.index(self.best)]

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "trials": self.trials, "runs": self.runs, "eval_losses": self.losses,
                "mean": self.mean, "std": self.std, "score": self.score, "pending": self.pending}


def config_key(params: dict[str, Any]) -> frozenset[tuple[str, Any]]:
    """The same key for the same config, in any order of its params, however its numbers were written (16 and 16.0
    are one number in Python)."""
    return frozenset(params.items())


def row_diverged(row: dict[str, Any]) -> str:
    """Why a report row's trial diverged (record.DIVERGED in its RESULT); "" for any other trial."""
    return str(row["user_attrs"].get(RESULT, {}).get(DIVERGED) or "")


def group_configs(rows: Iterable[dict[str, Any]]) -> list[ConfigGroup]:
    """The configs with at least one complete run and none diverged, best first by RULE (ties: lower mean, then
    older). A config whose loss became NaN or inf once may again in the full run, on another seed or GPU: it is never
    ranked, however well its other runs did."""
    groups: dict[frozenset, ConfigGroup] = {}
    for r in rows:
        if not r["params"]:
            continue  # failed before it had params
        key = config_key(r["params"])
        group = groups.get(key)
        if group is None:
            group = groups[key] = ConfigGroup(params=r["params"])
        group.trials.append(r["number"])
        if r["state"] == "COMPLETE" and r["eval_loss"] is not None:
            group.runs.append(r["number"])
            group.losses.append(r["eval_loss"])
        elif r["state"] in ("WAITING", "RUNNING"):
            group.pending += 1
        elif r["state"] == "PRUNED" and row_diverged(r):  # (a diverged trial is told PRUNED)
            group.diverged += 1
    done = [g for g in groups.values() if g.runs and not g.diverged]
    spread = noise(done)
    for g in done:
        n = len(g.losses)
        if n == 1:  # most configs, with a continuous learning rate: no sums to take
            g.mean, g.std = g.losses[0], None
        else:
            g.mean = math.fsum(g.losses) / n
            g.std = math.sqrt(_squares(g.losses) / (n - 1))
        g.score = g.mean + (spread / math.sqrt(n) if spread is not None else 0.0)
    return sorted(done, key=lambda g: (g.score, g.mean, g.trials[0]))


def noise(groups: Iterable[ConfigGroup]) -> float | None:
    """The standard deviation of one run's eval loss about its config's mean, pooled over the repeated configs
    (each weighted by its runs - 1); None before any config has two complete runs."""
    squares = dof = 0.0
    for g in groups:
        if len(g.losses) > 1:
            squares += _squares(g.losses)
            dof += len(g.losses) - 1
    return math.sqrt(squares / dof) if dof else None


def _squares(values: list[float]) -> float:
    """The sum of squared deviations from the mean (statistics.variance is exact, with Fractions: 20x slower)."""
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values)


def best_text(groups: list[ConfigGroup]) -> str:
    """The best config (RULE) as a person reads it wherever it is named: its mean, not its luckiest run.
    groups: group_configs' list."""
    if not groups:
        return "no complete trial yet"
    best = groups[0]
    return f"best config #{best.best_trial}: {best.mean:.4f}, {'mean of ' * (best.n > 1)}{runs_text(best.n)}"


def full_run_config(study_name: str, spec: SweepSpec, rows: list[dict[str, Any]],
                    groups: list[ConfigGroup]) -> dict[str, Any]:
    """The config for the full run: the best config's params (RULE) over everything the spec fixes, with the rule,
    its runs and what its best run measured. groups: group_configs(rows)."""
    if not groups:
        raise SweeperError(f"study {study_name!r} has no complete trial yet")
    best = groups[0]
    row = next(r for r in rows if r["number"] == best.best_trial)
    config = {
        "study": study_name,
        "rule": RULE_SHORT,
        "best_trial": best.best_trial,
        "eval_loss": best.mean,
        "eval_loss_std": best.std,
        "trials": best.runs,
        "model": asdict(spec.model),
        "data": asdict(spec.data),
        "train": asdict(spec.trial_config(best.params)),  # the spec's own seed: a repeat's seed is no part of it
        "budget_per_trial": asdict(spec.budget),
    }
    measured = {k: v for k, v in row_info(row).items() if k in ("micro_batch", "grad_accum", "gpus", "gpu", "precision")}
    if measured:
        config["measured_on_best_trial"] = measured
    return drop_none(config)


def best_notes(groups: list[ConfigGroup]) -> list[str]:
    """What a person should know about the pick: no repeats yet, or a runner-up that the noise cannot tell apart."""
    if not groups:
        return []
    spread = noise(groups)
    if spread is None:
        return ["no config has been repeated, so the noise is unmeasured: `sweeper enqueue --repeat 2 --top 3` "
                "runs the top configs again with other seeds"]
    notes = []
    best = groups[0]
    if len(groups) > 1 and groups[1].mean - best.mean < spread:
        notes.append(f"the runner-up (trial{_plural(groups[1].runs)} {numbers_text(groups[1].runs)}, mean "
                     f"{groups[1].mean:.4f}) is within the noise (±{spread:.4f}) of the best (mean {best.mean:.4f}): "
                     "repeat both to tell them apart")
    lucky = [g for g in groups[1:] if g.mean < best.mean]
    if lucky:
        notes.append(f"trial{_plural(lucky[0].runs)} {numbers_text(lucky[0].runs)} had a lower eval loss "
                     f"({lucky[0].mean:.4f}) in {runs_text(lucky[0].n)}, too few to trust over the best's {runs_text(best.n)}")
    return notes


def params_text(params: dict[str, Any]) -> str:
    """learning_rate=0.0005, batch_size=16: params as a person reads them (a log line, a note), never as exported."""
    return ", ".join(f"{k}={value_text(v)}" for k, v in params.items())


def value_text(value: Any) -> str:
    """A param or attr value as every view shows it: a float to 3 significant digits (1.96e-05; 1,234 from a
    thousand up, whole), None as nothing. --json, --csv and `best` keep full precision: they are read by programs."""
    if type(value) is str:  # most cells: first, and fast
        return value
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 999.5 else f"{value:.3g}"
    return str(value)


def numbers_text(numbers: list[int]) -> str:
    """#3, #7"""
    return ", ".join(f"#{n}" for n in numbers)


def _plural(items: list[Any]) -> str:
    return "s" if len(items) > 1 else ""


def runs_text(n: int) -> str:
    """1 run, 3 runs"""
    return f"{n} run{'s' if n > 1 else ''}"


def trial_seeds(trials: list[FrozenTrial]) -> dict[int, int | None]:
    """Trial number -> the seed it runs with (None: the spec's train.seed). A resume runs with the seed of the trial
    it continues, which it may not carry itself: the RESUMES chain is followed back to one that does."""
    back = resumed_from(trials)
    seeds = {}
    for t in trials:
        seen, at = set(), t
        while SEED not in at.user_attrs and at.number in back and at.number not in seen:
            seen.add(at.number)
            at = back[at.number]
        seeds[t.number] = at.user_attrs.get(SEED)
    return seeds
