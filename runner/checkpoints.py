"""A trial's checkpoints: adapter (safetensors), optimizer, scheduler, scaler, RNG and step, written atomically.

Checkpoints live in shared places (a team's Drive folder; the path a lease records in the shared store), so reading
one must never run code: the training state holds tensors and plain types only and is read with
`torch.load(weights_only=True)`; the adapter is safetensors, the step and params JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from sweeper.errors import SweeperError

# What an older sweeper's training_state.pt holds beyond tensors and plain types: numpy's RNG state as an array.
# Rebuilding an array of numbers runs no code of the file's choosing, so these alone are let through.
LEGACY_NUMPY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                        "numpy.dtype"}


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from, as tensors and plain lists (weights_only reads them)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"]),
                       "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state()'s RNGs (or an older sweeper's: numpy's as a tuple). A checkpoint written by a process
    that saw another number of GPUs restores the GPUs both have; the others keep their own state."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = ("MT19937", np.asarray(saved["key"], dtype=np.uint32), saved["pos"], saved["has_gauss"], saved["gauss"])
    np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def latest_checkpoint(trial_dir: Path) -> Path | None:
    steps = sorted(p for p in trial_dir.glob("step-*") if (p / "trainer_state.json").is_file())
    return steps[-1] if steps else None


def save_checkpoint(trial_dir: Path, model, optimizer, scheduler, scaler, state: dict[str, Any], keep: int = 2) -> Path:
    final = trial_dir / f"step-{state['step']:06d}"
    tmp = trial_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state()}, tmp / "training_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # readers only ever see whole checkpoints
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SweeperError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
    for old in sorted(trial_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, params: dict[str, Any]) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    if state["params"] != params:
        raise SweeperError(f"checkpoint {path} belongs to a trial with other params ({state['params']})")
    saved = read_training_state(path / "training_state.pt")
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    return state


def read_training_state(path: Path) -> dict[str, Any]:
    """The optimizer, scheduler, scaler and RNG states, read without running any code the file might carry: tensors
    and plain types only (and an older sweeper's numpy RNG array); anything else is refused in one line."""
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        if not unsafe <= LEGACY_NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"it names {', '.join(sorted(unsafe - LEGACY_NUMPY_GLOBALS))}")
        allowed = [(_numpy_global(name), name) for name in unsafe]
        if unsafe:  # the array's dtype is built as numpy's own class of it, named by no global in the file
            import numpy as np

            allowed.append(np.dtypes.UInt32DType)
        with torch.serialization.safe_globals(allowed):
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except ValueError:  # not a torch.save zip: a bare pickle
        raise SweeperError(f"checkpoint {path.parent} refused: its {path.name} is no torch.save file, and loading it "
                           "could run code; delete that checkpoint folder to start the trial afresh") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
        why = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweeperError(f"checkpoint {path.parent} refused: its {path.name} holds more than tensors and plain data "
                           f"({why}), and loading it could run code; delete that checkpoint folder to start the trial "
                           "afresh") from None
    if not isinstance(saved, dict) or not {"optimizer", "scheduler", "scaler", "rng"} <= saved.keys():
        raise SweeperError(f"checkpoint {path.parent} refused: its {path.name} is not a sweeper training state")
    return saved


def _numpy_global(name: str) -> Any:
    """The numpy object a legacy checkpoint names: numpy 2 moved numpy.core to numpy._core."""
    import importlib

    module, _, attr = name.replace("numpy.core.", "numpy._core.").rpartition(".")
    for candidate in (module, module.replace("numpy._core.", "numpy.core.")):
        try:
            return getattr(importlib.import_module(candidate), attr)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"it names {name}, which this numpy lacks")
