"""A trial's checkpoints: adapter (safetensors), optimizer, scheduler, scaler, RNG and step, written atomically."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from sweeper.errors import SweeperError


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    saved = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    return state
