"""Platform detection on faked environments; GPU support checks; session deadlines."""

from __future__ import annotations

import time

import pytest

from runner.platform import default_checkpoint_root, detect, detect_platform_name, session_deadline, torch_has_kernels


class FakeColabShell:
    def __repr__(self) -> str:
        return "<google.colab._shell.Shell object at 0x7f>"


@pytest.mark.parametrize("environ, shell, expected", [
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "", "kaggle"),
    # Kaggle's image also ships google.colab: Kaggle wins.
    ({"KAGGLE_KERNEL_RUN_TYPE": "Batch", "COLAB_RELEASE_TAG": "x"}, repr(FakeColabShell()), "kaggle"),
    ({}, repr(FakeColabShell()), "colab"),
    ({"COLAB_RELEASE_TAG": "x"}, "<ipykernel.zmqshell.ZMQInteractiveShell object>", "local"),
    ({}, "None", "local"),
])
def test_platform_is_detected_from_environment_and_shell(environ, shell, expected):
    assert detect_platform_name(environ, shell) == expected


@pytest.mark.parametrize("capability, arch_list, ok", [
    (60, ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"], False),  # P100 on Kaggle's torch
    (75, ["sm_75", "sm_80"], True),  # T4
    (90, ["sm_80", "compute_80"], True),  # PTX for an older arch runs on a newer GPU
    (60, ["sm_50", "compute_50"], True),
    (80, ["sm_90a"], False),
    (90, ["sm_90a"], True),
])
def test_gpu_support_follows_the_torch_builds_arch_list(capability, arch_list, ok):
    assert torch_has_kernels(capability, arch_list) is ok


def test_local_platform_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("SWEEPER_ACCOUNT", raising=False)
    monkeypatch.delenv("SWEEPER_DEADLINE_HOURS", raising=False)
    platform = detect(checkpoint_root=tmp_path)
    assert (platform.name, platform.gpu_name, platform.gpu_count) == ("local", "cpu", 0)
    assert platform.checkpoint_root == tmp_path and platform.deadline == float("inf")
    assert platform.account.startswith("local:")
    assert detect(account="bob").account == "bob"


def test_notebook_sessions_end_twelve_hours_after_the_vm_started(monkeypatch):
    monkeypatch.delenv("SWEEPER_DEADLINE_HOURS", raising=False)
    uptime = float(open("/proc/uptime").read().split()[0])
    assert session_deadline("kaggle", None) == pytest.approx(time.time() - uptime + 12 * 3600, abs=5)
    assert session_deadline("local", 2.0) == pytest.approx(time.time() + 7200, abs=5)
    monkeypatch.setenv("SWEEPER_DEADLINE_HOURS", "1")
    assert session_deadline("colab", None) == pytest.approx(time.time() + 3600, abs=5)


def test_checkpoint_roots_per_platform(monkeypatch, tmp_path):
    assert str(default_checkpoint_root("kaggle")) == "/kaggle/working/sweeper-checkpoints"
    monkeypatch.setenv("SWEEPER_HOME", str(tmp_path))
    assert default_checkpoint_root("local") == tmp_path / "checkpoints"
