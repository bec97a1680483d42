"""Benchmark: one trial on two training processes (runner/parallel.py) against the same trial in this process,
measured in the same run on the demo's tiny model.

On the CPU both processes share the machine's cores, so this measures what the split costs, not what it gains:
the seconds from the call to the first eval (spawning, importing torch/transformers/peft, loading the model
twice) and the whole trial. On two GPUs the steps would run side by side; that needs a machine with two.

    python bench/parallel.py [--train-tokens 24000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from runner import demo
from runner.parallel import run_trial_parallel
from runner.train import prepare_data, quiet_libraries, run_trial
from sweeper.spec import load_spec, spec_from_dict

PARAMS = {"learning_rate": 1e-3, "batch_size": 8}


def timed(train, folder: Path) -> tuple[float, float]:
    """(seconds to the first eval, seconds for the whole trial)."""
    started = time.perf_counter()
    first: list[float] = []

    def report(k: int, loss: float) -> bool:
        if not first:
            first.append(time.perf_counter() - started)
        return False

    train(report, folder)
    return first[0], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-tokens", type=int, default=24_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        demo.prepare_demo(root / "demo")
        table = load_spec(root / "demo" / "sweep.toml").to_dict()
        table["budget"] = {"train_tokens": args.train_tokens, "evals": 4, "checkpoint_every": 1000}
        spec = spec_from_dict(table)
        data = prepare_data(spec)
        runs = {
            "one process": lambda report, folder: run_trial(spec, PARAMS, folder, data, report, log=lambda s: None),
            "two processes (gloo)": lambda report, folder: run_trial_parallel(
                spec, PARAMS, folder, data, report, devices=["cpu", "cpu"], log=lambda s: None),
        }
        results = {name: [timed(train, root / f"{name}-{i}") for i in range(args.repeat)] for name, train in runs.items()}
    base_first, base_whole = (statistics.median(r[j] for r in results["one process"]) for j in (0, 1))
    print(f"{'run':<22} {'first eval s':>12} {'whole trial s':>13} {'trial / one process':>20}")
    for name, measured in results.items():
        first, whole = (statistics.median(r[j] for r in measured) for j in (0, 1))
        print(f"{name:<22} {first:>12.1f} {whole:>13.1f} {whole / base_whole:>19.2f}x")
    print(f"start-up cost of the split: {statistics.median(r[0] for r in results['two processes (gloo)']) - base_first:.1f} s")


if __name__ == "__main__":
    main()
