"""Benchmark: the demo sweep with the 4-bit base kept trainable on the CPU, against the same sweep as shipped
before that fix (bitsandbytes repacking the weights at the first eval), in the same run.

On a CPU with AVX512-BF16, bitsandbytes 0.49-0.50 repacks each 4-bit weight into an inference-only format at
the first eval-mode forward; training after that goes through a kernel with no backward (docs/design.md). Both
sweeps use the demo's spec, its enqueued points and the same worker id, so the same sampler seed; they differ
only in runner.model.keep_4bit_weights_trainable. On a CPU without AVX512-BF16 both print the same figures.

    python bench/cpu_4bit.py [--trials 12]
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path
from unittest import mock

from runner import demo, model, run_worker
from runner.train import quiet_libraries
from sweeper.spec import load_spec
from sweeper.storage import open_store
from sweeper.study import create_study, enqueue, load_study


def sweep(folder: Path, trials: int, trainable: bool) -> dict:
    """One demo sweep in `folder`; its best eval loss and the eval loss of each enqueued point."""
    spec = load_spec(demo.prepare_demo(folder, n_trials=trials))
    store = f"sqlite:///{folder / 'sweeps.db'}"
    study, _ = create_study(spec, opened := open_store(store, create=True))
    enqueue(study, opened, demo.FIRST_POINTS)
    fixed_worker_id = uuid.UUID(int=0)  # the worker id seeds the sampler: the same for both sweeps
    keep = model.keep_4bit_weights_trainable if trainable else (lambda model: None)  # None: as shipped before
    with mock.patch("runner.worker.uuid.uuid4", return_value=fixed_worker_id), \
            mock.patch.object(model, "keep_4bit_weights_trainable", keep):
        run_worker(store, spec.study, checkpoint_root=str(folder / "checkpoints"), account="bench", log=lambda s: None)
    study, _ = load_study(store, spec.study)
    points = {(t.params["learning_rate"], t.params["batch_size"]): t.value for t in study.trials[:len(demo.FIRST_POINTS)]}
    return {"best": study.best_value, "best_trial": study.best_trial.number, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    quiet_libraries()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"CPU has AVX512-BF16: {'yes' if 'avx512_bf16' in flags else 'no'}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: sweep(Path(tmp) / name, args.trials, trainable)
                for name, trainable in (("as shipped (repacked at the first eval)", False), ("fixed", True))}
    print("| sweep | best eval loss | best trial | " + " | ".join(f"lr {lr:g}, batch {b}" for lr, b in demo_points()) + " |")
    print("|---" * (3 + len(demo.FIRST_POINTS)) + "|")
    for name, run in runs.items():
        print(f"| {name} | {run['best']:.4f} | #{run['best_trial']} | "
              + " | ".join(f"{run['points'][p]:.4f}" for p in demo_points()) + " |")


def demo_points() -> list[tuple[float, int]]:
    return [(p["learning_rate"], p["batch_size"]) for p in demo.FIRST_POINTS]


if __name__ == "__main__":
    main()
