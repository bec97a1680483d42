"""sweeper: one Optuna study in a shared store, many notebooks fine-tuning against it."""

__version__ = "0.1.0"
