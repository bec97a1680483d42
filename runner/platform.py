"""Where the runner is: colab / kaggle / local, its GPU, checkpoint root, session deadline and account."""

from __future__ import annotations

import getpass
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sweeper.errors import SweeperError, UserError, env_number
from sweeper.platforms import DRIVE_MOUNT, platform_name

# How long a notebook session lasts (checked 2026-12): Colab's runtimes about 12 h; Kaggle's 2026 quota message gives
# its GPU sessions 9 h (and an account 30 GPU-hours a week, 2 GPU sessions at once).
SESSION_HOURS = {"colab": 12.0, "kaggle": 9.0}


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


NO_GPU = {"colab": "Runtime > Change runtime type > T4 GPU (or another GPU), then Run all",
          "kaggle": "Settings > Accelerator > GPU T4 x2, then Run all"}


def require_gpu(platform: Platform, allow_cpu: bool = False) -> None:
    """On Colab and Kaggle a worker without a GPU would hold its trial's lease for hours: stop, saying how to get one."""
    if platform.gpu_count == 0 and platform.name in NO_GPU and not allow_cpu:
        raise UserError(f"this {platform.name.capitalize()} session has no GPU: {NO_GPU[platform.name]} "
                        "(or allow_cpu = True to train on the CPU, slowly)")


def default_checkpoint_root(name: str) -> Path:
    if name == "kaggle":
        return Path("/kaggle/working/sweeper-checkpoints")
    if name == "colab":
        drive = Path(DRIVE_MOUNT) / "MyDrive"
        return (drive if drive.is_dir() else Path("/content")) / "sweeper-checkpoints"
    return Path(os.environ.get("SWEEPER_HOME", Path.home() / ".cache" / "sweeper")) / "checkpoints"


def shared_checkpoints(platform: Platform) -> bool:
    """Whether another worker can resume from this one's checkpoints: not from a notebook VM's own disk."""
    return platform.name == "local" or platform.checkpoint_root.is_relative_to(DRIVE_MOUNT)


def session_deadline(name: str, hours: float | None) -> float:
    """Notebook sessions end SESSION_HOURS after they started (session_start); elsewhere only when asked."""
    if hours is None:
        hours = env_number("SWEEPER_DEADLINE_HOURS", SESSION_HOURS.get(name))
    if hours is None:
        return float("inf")
    explicit = env_number("SWEEPER_DEADLINE_HOURS") is not None
    started = session_start() if name in SESSION_HOURS and not explicit else time.time()
    return started + hours * 3600


def session_start(proc: Path = Path("/proc")) -> float:
    """When this notebook session began: the start of PID 1 of this process's PID namespace. Colab and Kaggle run
    each session's runtime in a container, whose init starts with the session; /proc/uptime is the host's (Kaggle's
    container shows the host's uptime) or a pooled VM's, booted long before its session. Now, if /proc says nothing."""
    try:
        ticks = int((proc / "1" / "stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(float(line.split()[1]) for line in (proc / "stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sweeper-qlora", "torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "optuna"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def detect(account: str | None = None, checkpoint_root: str | Path | None = None,
           deadline_hours: float | None = None) -> Platform:
    name = platform_name()
    gpu, count, mem = gpu_info()
    label = account or os.environ.get("SWEEPER_ACCOUNT") or f"{name}:{getpass.getuser()}@{socket.gethostname()}"
    root = Path(checkpoint_root).expanduser() if checkpoint_root else default_checkpoint_root(name)
    return Platform(name, gpu, count, mem, root, session_deadline(name, deadline_hours), label)
