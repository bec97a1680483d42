"""Record the ground truth for bench/sweep_efficiency.py: a full grid of our runner's trials with eval-loss curves.

Every (learning rate, batch size, seed) point is trained to the whole token budget with `runner.train.run_trial`
on the demo's tiny model and data (runner/demo.py: nothing downloaded), evaluated at more points than the default
so a pruner can be replayed at any of them. For each eval the loss and the seconds since the trial started (model
load included) are kept, so a replayed trial pruned there costs exactly that. The seed is the trial's train seed
(LoRA init) and the order of the packed training rows; the eval set is the same for every trial.

    python bench/record_grid.py                  # 117 trials, ~6 CPU-s each; writes bench/data/grid_demo.json
    python bench/record_grid.py --seeds 1 --out /tmp/seed1.json    # one seed per process; merge the trials by hand

The file is rewritten after every trial, and a rerun skips the points it already holds. The times are the process's
CPU seconds (one torch thread), not wall seconds: the recording machine was shared, and queueing for a core is not
the trial's cost.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.demo import prepare_demo  # noqa: E402
from runner.train import library_versions, prepare_data, quiet_libraries, run_trial  # noqa: E402
from sweeper.spec import load_spec  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "grid_demo.json"


def machine() -> dict[str, str]:
    """CPU model and flags of this machine, as the table's provenance."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": str(torch.get_num_threads())}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        info["cpu_flags"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("flags"))
        info["cores"] = str(sum(line.startswith("processor") for line in lines))
    except (OSError, StopIteration):
        pass
    return info


def log_spaced(low: float, high: float, n: int) -> list[float]:
    a, b = math.log10(low), math.log10(high)
    return [float(f"{10 ** (a + (b - a) * i / (n - 1)):.3g}") for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--lr-low", type=float, default=1e-5)
    ap.add_argument("--lr-high", type=float, default=1e-1)
    ap.add_argument("--lrs", type=int, default=13, help="learning rates, log-spaced from --lr-low to --lr-high")
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated train seeds")
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens per trial")
    ap.add_argument("--evals", type=int, default=16, help="evaluations per trial (the pruning points)")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many new trials (0: the whole grid)")
    args = ap.parse_args()

    torch.set_num_threads(1)  # the recording machine is shared: one core per recorder, steady timings
    quiet_libraries()
    lrs = log_spaced(args.lr_low, args.lr_high, args.lrs)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="record-grid-"))
    spec = load_spec(prepare_demo(work / "demo"))
    budget = replace(spec.budget, train_tokens=args.tokens, evals=args.evals, checkpoint_every=10**6)  # one, at the end
    spec = replace(spec, budget=budget)
    data = prepare_data(spec)

    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table.update({
        "what": "demo tiny Llama (runner/demo.py) + LoRA, full grid, eval loss at every eval point",
        "command": "python bench/record_grid.py " + " ".join(sys.argv[1:]),
        "spec": spec.to_dict() | {"space": {"learning_rate": {"grid": lrs}, "batch_size": {"choices": batch_sizes}}},
        "seeds": sorted({*table.get("seeds", []), *seeds}),
        "versions": library_versions(),
        "machine": machine() | {"torch_threads": "1"},
        "times": "evals: [eval index, eval loss, CPU seconds of the process since the trial began (model load "
                 "included)]; cpu_s: the trial's CPU seconds; wall_s: its wall seconds (the machine was shared "
                 "with other jobs, so CPU seconds are the measure of its compute)",
        "device": "cpu (no GPU was lent to the recording session)",
    })
    trials = table.setdefault("trials", [])
    done = {(t["learning_rate"], t["batch_size"], t["seed"]) for t in trials}
    points = [(lr, bs, s) for s in seeds for bs in batch_sizes for lr in lrs if (lr, bs, s) not in done]
    print(f"{len(done)} trials recorded, {len(points)} to go", flush=True)

    for n, (lr, bs, seed) in enumerate(points[: args.limit or None]):
        rows = list(range(len(data.train)))
        random.Random(seed).shuffle(rows)  # the seed's order of the packed training rows
        seeded = replace(data, train=type(data.train)(*([getattr(data.train, f)[i] for i in rows]
                                                        for f in ("input_ids", "labels", "position_ids", "real"))))
        curve: list[list[float]] = []
        started, cpu_started = time.perf_counter(), time.process_time()

        def report(k: int, loss: float) -> bool:
            curve.append([k, round(loss, 6), round(time.process_time() - cpu_started, 3)])
            return False

        params = {"learning_rate": lr, "batch_size": bs, "seed": seed}
        state, steps, tps = "COMPLETE", None, None
        result = run_trial(spec, params, work / f"trial-{n}", seeded, report, device="cpu", log=lambda s: None)
        if result.diverged:
            state = "FAIL"  # diverged (the grid files' name for it; the runner tells such a trial PRUNED)
        else:
            steps, tps = result.total_steps, result.tokens_per_s
        wall = round(time.perf_counter() - started, 3)
        cpu = round(time.process_time() - cpu_started, 3)
        trials.append({"learning_rate": lr, "batch_size": bs, "seed": seed, "state": state, "steps": steps,
                       "tokens_per_s": tps, "cpu_s": cpu, "wall_s": wall, "evals": curve})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(args.out)
        last = f"{curve[-1][1]:.4f}" if curve else "-"
        print(f"[{len(trials)}] lr {lr:g} bs {bs} seed {seed}: {state} eval {last} in {cpu:.1f} CPU s, {wall:.1f} s",
              flush=True)
        shutil.rmtree(work / f"trial-{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
