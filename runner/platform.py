"""Where the runner is: colab / kaggle / local, its GPU, checkpoint root, session deadline and account."""

from __future__ import annotations

import getpass
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sweeper.errors import SweeperError

SESSION_HOURS = {"colab": 12.0, "kaggle": 12.0}


@dataclass
class Platform:
    name: str
    """'colab', 'kaggle' or 'local'."""
    gpu_name: str
    """'cpu' when there is no CUDA GPU."""
    gpu_count: int
    gpu_mem_gb: float
    checkpoint_root: Path
    deadline: float
    """Wall-clock time (time.time()) by which the session ends; inf when it never does."""
    account: str

    def seconds_left(self) -> float:
        return self.deadline - time.time()


def detect_platform_name(environ: dict[str, str] | None = None, ipython_repr: str | None = None) -> str:
    """Kaggle first: its image also ships google.colab and COLAB_RELEASE_TAG (DESIGN.md)."""
    environ = os.environ if environ is None else environ
    if "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return "kaggle"
    if ipython_repr is None:
        try:
            from IPython import get_ipython

            ipython_repr = str(get_ipython())
        except ImportError:
            ipython_repr = ""
    return "colab" if "google.colab" in ipython_repr else "local"


def gpu_info() -> tuple[str, int, float]:
    """(name, count, GiB of the first GPU); ('cpu', 0, 0) without CUDA. Fails in one line on a GPU torch cannot use."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", 0, 0.0
    props = torch.cuda.get_device_properties(0)
    if not torch_has_kernels(props.major * 10 + props.minor, torch.cuda.get_arch_list()):
        raise SweeperError(
            f"this torch build ({torch.__version__}) has no kernels for the {props.name} (sm_{props.major}{props.minor}); "
            "pick another GPU (on Kaggle: T4 x2) or install a torch build that supports it"
        )
    return props.name, torch.cuda.device_count(), props.total_memory / 2**30


def torch_has_kernels(capability: int, arch_list: list[str]) -> bool:
    """Whether a torch build runs on a GPU: native code for it (sm_XY) or PTX for an older one (compute_XY).

    Kaggle's current torch has neither for the P100 (sm_60).
    """
    if not arch_list:  # unknown: let CUDA decide
        return True
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)[a-z]?", arch)
        if match and (int(match.group(2)) == capability or (match.group(1) == "compute" and int(match.group(2)) <= capability)):
            return True
    return False


def default_checkpoint_root(name: str) -> Path:
    if name == "kaggle":
        return Path("/kaggle/working/sweeper-checkpoints")
    if name == "colab":
        drive = Path("/content/drive/MyDrive")
        return (drive if drive.is_dir() else Path("/content")) / "sweeper-checkpoints"
    return Path(os.environ.get("SWEEPER_HOME", Path.home() / ".cache" / "sweeper")) / "checkpoints"


def session_deadline(name: str, hours: float | None) -> float:
    """Notebook sessions end about 12 h after the VM started; /proc/uptime says when that was."""
    if hours is None:
        env = os.environ.get("SWEEPER_DEADLINE_HOURS")
        hours = float(env) if env else SESSION_HOURS.get(name)
    if hours is None:
        return float("inf")
    started = time.time()
    if name in SESSION_HOURS and os.environ.get("SWEEPER_DEADLINE_HOURS") is None:
        try:
            started -= float(Path("/proc/uptime").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return started + hours * 3600


def detect(account: str | None = None, checkpoint_root: str | Path | None = None,
           deadline_hours: float | None = None) -> Platform:
    name = detect_platform_name()
    gpu, count, mem = gpu_info()
    label = account or os.environ.get("SWEEPER_ACCOUNT") or f"{name}:{getpass.getuser()}@{socket.gethostname()}"
    root = Path(checkpoint_root).expanduser() if checkpoint_root else default_checkpoint_root(name)
    return Platform(name, gpu, count, mem, root, session_deadline(name, deadline_hours), label)
