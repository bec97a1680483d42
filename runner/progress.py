"""A progress bar per trial where a person watches the worker (a terminal, a notebook), nothing extra elsewhere.

The bar (tqdm.auto: a widget in a notebook, text in a terminal) shows step / total, time left, tokens/s and the
latest eval loss. Where the output is read later (a Kaggle batch run's log, CI, a worker whose stderr is piped)
the eval lines the trainer logs are the progress, as before.
"""

from __future__ import annotations

import os
import sys


def watched() -> bool:
    """Whether a person sees this output as it comes: a Jupyter kernel (not a Kaggle batch run) or a terminal."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch":
        return False
    if "ipykernel" in sys.modules:
        from IPython import get_ipython

        if getattr(get_ipython(), "kernel", None) is not None:
            return True
    return sys.stderr.isatty()


class TrialBar:
    """Called by the trainer after each step; draws the bar from the first call (a resumed trial starts part-way)."""

    def __init__(self, trial_number: int):
        self.label, self.bar = f"trial {trial_number}", None

    def __call__(self, step: int, total: int, tokens_per_s: float, eval_loss: float | None) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=step - 1, desc=self.label, unit="step", leave=False, dynamic_ncols=True)
        postfix = {"tok/s": f"{tokens_per_s:,.0f}"}
        if eval_loss is not None:
            postfix["eval"] = f"{eval_loss:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def above(self, log):
        """`log`, each line written above the bar: tqdm takes the bar away, the line goes out, the bar comes back."""
        def write(line: str) -> None:
            if self.bar is None:
                log(line)
                return
            with self.bar.external_write_mode():
                log(line)

        return write

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
