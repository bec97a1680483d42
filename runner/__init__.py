"""runner: the data plane inside each notebook. `run_worker` is what a notebook calls; torch loads lazily."""

__all__ = ["run_worker"]


def __getattr__(name: str):
    # Lazy, so `runner.train` and `runner.data` import without Optuna (the benchmark's GPU machine).
    if name == "run_worker":
        from runner.worker import run_worker

        return run_worker
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
