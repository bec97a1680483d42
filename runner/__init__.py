"""runner: the data plane inside each notebook. `run_worker` is what a notebook calls; torch loads lazily."""

from runner.worker import run_worker

__all__ = ["run_worker"]
