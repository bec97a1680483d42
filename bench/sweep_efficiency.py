"""Replay sweeps against a recorded full grid: how much of the grid's GPU time each sampler and pruner needs.

The ground truth is bench/data/grid_demo.json (bench/record_grid.py): every (learning rate, batch size) point of a
grid trained to the full budget with 3 seeds, each with its eval loss and elapsed seconds at 16 eval points. A
replayed sweep uses Optuna itself (in-memory storage, ask/tell, the project's own `make_sampler`, `make_pruner` and
`suggest`) with K asynchronous workers on a virtual clock: a worker asks as soon as its trial ends, while the others
run, and stops asking once finished + running trials reach n_trials, as runner/worker.py does. A trial is the
recorded run of its point (a sampled learning rate snapped to the nearest recorded one in log space; the seed drawn
at random), reports the recorded eval losses at the recorded times, and is pruned on them; a pruned trial costs the
seconds to its pruning point, a complete one its whole recorded time. Times are the recorder's CPU seconds (one
torch thread on a shared machine: its compute, not the queueing), standing in for a GPU's seconds.

The quality of a point is its eval loss averaged over the 3 seeds; the grid's best is the best point by that. The
best a sweep found is the point of its lowest reported loss, scored by its seed-averaged loss: a lucky seed does not
count as a find.

    python bench/sweep_efficiency.py                 # the table in BENCHMARKS.md and bench/data/sweep_efficiency.png
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from multiprocessing import Pool
from pathlib import Path

import optuna
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.ERROR)  # GPSampler's "greenlet is unavailable" once per worker
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # QMC, GP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeper.spec import SweepSpec, spec_from_dict  # noqa: E402
from sweeper.study import grid_points, make_pruner, make_sampler, sampler_seed, suggest  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
TABLE = DATA / "grid_demo.json"
BUDGETS = (0.1, 0.2, 0.3, 0.5)  # fractions of the grid's GPU-hours at which regret is reported
WITHIN = 0.01  # "found": a point whose seed-averaged loss is within 1% of the grid's best



@dataclass(frozen=True)
class Setting:
    sampler: str
    """A spec sampler, or "gp" (built here)."""
    pruner: str = "none"
    """A spec pruner, or "sha" (built here)."""
    evals: int | None = None
    """budget.evals; None: the spec's default."""
    n_trials: int | None = None
    """None: the spec's default; 0: the full grid, every point enqueued once in a random order (`enqueue --grid`)."""
    warmup: float | None = None
    """Median pruner only: the fraction of the evals it never prunes in; None: make_pruner's."""


# What the issue asks to compare, at K = 1, 4 and 8 workers.
SETTINGS = {
    "grid": Setting("random", n_trials=0),
    "random": Setting("random"),
    "qmc": Setting("qmc"),
    "tpe": Setting("tpe"),
    "gp": Setting("gp"),
    "random + median": Setting("random", "median"),
    "tpe + median": Setting("tpe", "median"),
    "tpe + successive halving": Setting("tpe", "sha"),
    "tpe + hyperband": Setting("tpe", "hyperband"),
}
# The chosen defaults' knobs, one at a time, and the runner-up pruner, at K = 8.
VARIANTS = {
    "tpe + hyperband / 20 trials": Setting("tpe", "hyperband", n_trials=20),
    "tpe + hyperband / 40 trials": Setting("tpe", "hyperband", n_trials=40),
    "tpe + hyperband / 4 evals": Setting("tpe", "hyperband", evals=4),
    "tpe + hyperband / 16 evals": Setting("tpe", "hyperband", evals=16),
    "tpe + median / 20 trials": Setting("tpe", "median", n_trials=20),
    "tpe + median / warm-up 1/2": Setting("tpe", "median", warmup=0.5),
}
ONLY_AT_MOST_WORKERS = {"gp"}  # GP's asks take seconds: replayed at K = 8 alone, to keep the whole run in minutes
ALL = SETTINGS | VARIANTS


# ---------------------------------------------------------------------------------------------
# The recorded table


@dataclass
class Table:
    spec: SweepSpec
    """The recorded model, data and token budget; SweepSpec's default sweep settings; the recorded grid as space."""
    runs: dict[tuple[float, int], list[dict]]
    """(learning rate, batch size) -> the recorded trials of that point, one per seed."""
    quality: dict[tuple[float, int], float]
    """Seed-averaged final eval loss of each point (inf when every seed diverged)."""
    best: tuple[float, int]
    grid_cost: float
    """Seconds of the full grid: every point once (the seed-averaged time of each, summed)."""
    points: int
    """Eval points recorded per trial."""

    @property
    def best_loss(self) -> float:
        return self.quality[self.best]


def load_table(path: Path = TABLE) -> Table:
    raw = json.loads(path.read_text())
    lrs = raw["spec"]["space"]["learning_rate"]["grid"]
    batch_sizes = raw["spec"]["space"]["batch_size"]["choices"]
    # The recorded model, data and budget; the sweep settings (n_trials, sampler, pruner, evals) are SweepSpec's
    # defaults, which a replay overrides; the space is the recorded grid.
    stored = {k: v for k, v in raw["spec"].items() if k not in ("n_trials", "sampler", "pruner")}
    stored["budget"] = {k: v for k, v in stored["budget"].items() if k != "evals"}
    stored["space"] = {"learning_rate": {"low": min(lrs), "high": max(lrs), "log": True, "grid": lrs},
                       "batch_size": {"choices": batch_sizes}}
    spec = spec_from_dict(stored, source=str(path))
    runs: dict[tuple[float, int], list[dict]] = {}
    for t in raw["trials"]:
        runs.setdefault((t["learning_rate"], t["batch_size"]), []).append(t)
    missing = [(lr, bs) for lr in lrs for bs in batch_sizes if (lr, bs) not in runs]
    if missing:
        raise SystemExit(f"{path}: the grid is incomplete, no trial for {missing[:3]}")
    quality = {k: statistics.fmean(r["evals"][-1][1] for r in rs if r["state"] == "COMPLETE")
               if any(r["state"] == "COMPLETE" for r in rs) else math.inf for k, rs in runs.items()}
    grid_cost = sum(statistics.fmean(r["cpu_s"] for r in rs) for rs in runs.values())
    return Table(spec, runs, quality, min(quality, key=quality.get), grid_cost, raw["spec"]["budget"]["evals"])


# ---------------------------------------------------------------------------------------------
# One replayed sweep


def sampler_of(spec: SweepSpec, name: str, worker_seed: int) -> optuna.samplers.BaseSampler:
    if name == "gp":
        return optuna.samplers.GPSampler(seed=sampler_seed(spec, worker_seed), n_startup_trials=5)
    return make_sampler(replace(spec, sampler=name), worker_seed)


def pruner_of(spec: SweepSpec, setting: Setting) -> optuna.pruners.BasePruner:
    if setting.pruner == "sha":  # rungs at a quarter of the evals, then x3
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec.budget.evals // 4), reduction_factor=3)
    if setting.pruner == "median" and setting.warmup is not None:  # make_pruner's, with another warm-up
        return optuna.pruners.MedianPruner(n_startup_trials=min(4, spec.n_trials // 2),
                                           n_warmup_steps=max(1, int(spec.budget.evals * setting.warmup)) + 1)
    return make_pruner(replace(spec, pruner=setting.pruner))


def nearest(values: list[float], x: float) -> float:
    return min(values, key=lambda v: abs(math.log(v) - math.log(x)))


def replay(table: Table, setting: str, workers: int, seed: int, n_trials: int | None = None,
           evals: int | None = None) -> list[tuple[float, float, int, tuple[float, int] | None]]:
    """One sweep. Returns its trajectory: (GPU-seconds used, clock seconds, trials finished, best point so far) at
    every trial's end."""
    chosen = ALL[setting]
    base = table.spec
    e = evals or chosen.evals or base.budget.evals
    if table.points % e:
        raise ValueError(f"{e} evals do not divide the {table.points} recorded eval points")
    n = len(table.runs) if chosen.n_trials == 0 else (n_trials or chosen.n_trials or base.n_trials)
    spec = replace(base, n_trials=n, seed=seed, budget=replace(base.budget, evals=e))
    lrs = base.space["learning_rate"].grid_values()
    every = table.points // e

    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="replay", direction="minimize")
    studies = [optuna.load_study(study_name="replay", storage=storage, sampler=sampler_of(spec, chosen.sampler, w),
                                 pruner=pruner_of(spec, chosen)) for w in range(workers)]
    rng = random.Random(seed)
    if chosen.n_trials == 0:  # as `sweeper enqueue --grid`: each point once (parallel GridSamplers repeat points)
        points = grid_points(spec)
        rng.shuffle(points)
        for point in points:
            studies[0].enqueue_trial(point)
    events: list[tuple[float, int, int, int]] = []  # (clock, order, worker, eval index)
    running: dict[int, tuple[optuna.Trial, dict, float, tuple[float, int]]] = {}  # worker -> trial, run, start, point
    done_cost, finished, best = 0.0, 0, (math.inf, None)
    trajectory = []
    order = 0

    def start(w: int, now: float) -> None:
        nonlocal order
        if finished + len(running) >= n:
            return
        trial = studies[w].ask()
        params = suggest(trial, spec)
        point = (nearest(lrs, params["learning_rate"]), params["batch_size"])
        run = rng.choice(table.runs[point])
        running[w] = (trial, run, now, point)
        heapq.heappush(events, (now + event_time(run, 1, every, e), order, w, 1))
        order += 1

    for w in range(workers):
        start(w, 0.0)
    while events:
        now, _, w, k = heapq.heappop(events)
        trial, run, began, point = running[w]
        reached = k * every <= len(run["evals"])
        state = None
        if not reached:  # diverged before this eval: told PRUNED, as the runner tells a diverged trial
            state, value = TrialState.PRUNED, None
        else:
            value = run["evals"][k * every - 1][1]
            trial.report(value, k)
            if k == e:
                state = TrialState.COMPLETE if run["state"] == "COMPLETE" else TrialState.PRUNED
            elif trial.should_prune():
                state = TrialState.PRUNED
        if state is None:
            heapq.heappush(events, (began + event_time(run, k + 1, every, e), order, w, k + 1))
            order += 1
            continue
        studies[w].tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        del running[w]
        finished += 1
        done_cost += now - began
        if state == TrialState.COMPLETE and value < best[0]:
            best = (value, point)
        used = done_cost + sum(now - b for _, _, b, _ in running.values())  # GPU time: the running trials' too
        trajectory.append((used, now, finished, best[1]))
        start(w, now)
    return trajectory


def event_time(run: dict, k: int, every: int, evals: int) -> float:
    """Seconds from the trial's start to its k-th eval (the last one: the whole trial, checkpoint included)."""
    if k == evals or k * every > len(run["evals"]):
        return run["cpu_s"]
    return run["evals"][k * every - 1][2]



# ---------------------------------------------------------------------------------------------
# Figures


def cost_to_find(table: Table, trajectory: list) -> float:
    """Fraction of the grid's GPU-hours used when the best found first is within 1% of the grid's best."""
    for used, _, _, point in trajectory:
        if point is not None and table.quality[point] <= (1 + WITHIN) * table.best_loss:
            return used / table.grid_cost
    return math.inf


def regret_at(table: Table, trajectory: list, budget: float) -> float:
    """Relative regret of the best found within `budget` x the grid's GPU-hours (inf: nothing finished yet)."""
    point = None
    for used, _, _, p in trajectory:
        if used > budget * table.grid_cost:
            break
        point = p
    return math.inf if point is None else table.quality[point] / table.best_loss - 1


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; inf values (never found) sort last."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(table: Table, trajectories: list[list]) -> dict[str, float]:
    found = [cost_to_find(table, t) for t in trajectories]
    return {
        "median": percentile(found, 0.5), "p90": percentile(found, 0.9),
        **{f"regret@{b:g}": percentile([regret_at(table, t, b) for t in trajectories], 0.5) for b in BUDGETS},
        "final_is_best": statistics.fmean(t[-1][3] == table.best for t in trajectories),
        "sweep_cost": percentile([t[-1][0] / table.grid_cost for t in trajectories], 0.5),
    }


def shown(x: float) -> str:
    return "never" if math.isinf(x) else f"{100 * x:.0f}%"


def markdown(rows: list[tuple[str, int, dict]]) -> str:
    head = ("| setting | K | GPU-h to within 1%: median | p90 | " + " | ".join(f"regret @{b:.0%}" for b in BUDGETS)
            + " | final best = grid's best | sweep's GPU-h |")
    lines = [head, "|" + " --- |" * 2 + " ---: |" * (len(BUDGETS) + 4)]
    for name, k, s in rows:
        regrets = " | ".join(shown(s[f"regret@{b:g}"]) if not math.isinf(s[f"regret@{b:g}"]) else "-" for b in BUDGETS)
        lines.append(f"| {name} | {k} | {shown(s['median'])} | {shown(s['p90'])} | {regrets} | "
                     f"{s['final_is_best']:.0%} | {shown(s['sweep_cost'])} |")
    return "\n".join(lines)


def plot(table: Table, results: dict[tuple[str, int], list], workers: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: matplotlib is not installed)", file=sys.stderr)
        return
    budgets = [i / 100 for i in range(0, 101)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, k), trajectories in results.items():
        if k != workers:
            continue
        found = [cost_to_find(table, t) for t in trajectories]
        default = name == "tpe + hyperband"
        ax.plot([100 * b for b in budgets], [100 * statistics.fmean(f <= b for f in found) for b in budgets],
                label=name + (" (default)" if default else ""), lw=2.5 if default else 1,
                ls="--" if name == "grid" else "-")
    ax.axhline(50, color="grey", ls=":", lw=1)
    ax.axvline(30, color="grey", ls=":", lw=1)
    ax.set_xlabel("GPU-hours used, % of the full grid's")
    ax.set_ylabel("% of sweeps whose best is within 1%")
    ax.set_title(f"{workers} asynchronous workers, {len(next(iter(results.values())))} replayed sweeps each")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Main

_table: Table | None = None


def _job(args: tuple) -> tuple:
    global _table
    path, setting, k, seed = args
    if _table is None:
        _table = load_table(path)
    return setting, k, replay(_table, setting, k, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS ('' for none)")
    ap.add_argument("--workers", default="1,4,8", help="K for SETTINGS; VARIANTS run at the largest")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2, help="processes")
    ap.add_argument("--plot", type=Path, default=DATA / "sweep_efficiency.png")
    args = ap.parse_args()

    started = time.perf_counter()
    table = load_table(args.table)
    workers = [int(k) for k in args.workers.split(",")]
    cases = [(s, k) for s in args.settings.split(",") for k in workers
             if s not in ONLY_AT_MOST_WORKERS or k == max(workers)]
    cases += [(v, max(workers)) for v in filter(None, args.variants.split(","))]
    unknown = [s for s, _ in cases if s not in ALL]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {', '.join(ALL)}")
    # The slow samplers (GP) first, so the two processes finish together.
    jobs = sorted(((args.table, s, k, rep) for s, k in cases for rep in range(args.reps)),
                  key=lambda job: ALL[job[1]].sampler != "gp")
    with Pool(args.jobs) as pool:
        done = pool.map(_job, jobs, chunksize=1)
    results: dict[tuple[str, int], list] = {}
    for setting, k, trajectory in done:
        results.setdefault((setting, k), []).append(trajectory)

    (best_lr, best_bs), spec = table.best, table.spec
    print(f"grid: {len(table.runs)} points x {len(next(iter(table.runs.values())))} seeds; best learning_rate "
          f"{best_lr:g}, batch_size {best_bs}: eval loss {table.best_loss:.4f}; full grid {table.grid_cost:.0f} "
          f"recorded seconds; defaults: n_trials {spec.n_trials}, budget.evals {spec.budget.evals}; "
          f"{args.reps} replays each\n")
    print(markdown([(s, k, summarize(table, results[(s, k)])) for s, k in cases]))
    if args.plot:
        plot(table, {c: results[c] for c in cases if c[0] in SETTINGS}, max(workers), args.plot)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
