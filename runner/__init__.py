"""runner: the data plane inside each notebook. `run_worker` is what a notebook calls; torch loads lazily."""

import warnings

__all__ = ["run_worker"]

# Optuna imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns that its widget bars cannot show:
# the runner shows none of them, so the line would only bury the notebook's own output.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")


def __getattr__(name: str):
    # Lazy, so `runner.train` and `runner.data` import without Optuna (the benchmark's GPU machine).
    if name == "run_worker":
        from runner.worker import run_worker

        return run_worker
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
