"""Platform detection on faked environments; GPU support checks; session deadlines."""

from __future__ import annotations

import os
import time

import pytest

from runner.platform import (Platform, default_checkpoint_root, detect, require_gpu, session_deadline, session_start,
                             torch_has_kernels)
from sweeper.errors import UserError
from sweeper.platforms import notebook_secrets, platform_name


class FakeColabShell:
    def __repr__(self) -> str:
        return "<google.colab._shell.Shell object at 0x7f>"


@pytest.mark.parametrize("environ, shell, expected", [
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "", "kaggle"),
    # Kaggle's image also ships google.colab: Kaggle wins.
    ({"KAGGLE_KERNEL_RUN_TYPE": "Batch", "COLAB_RELEASE_TAG": "x"}, repr(FakeColabShell()), "kaggle"),
    ({}, repr(FakeColabShell()), "colab"),
    # `!sweeper worker` in a Colab cell: a subprocess with no IPython, but Colab's environment.
    ({"COLAB_RELEASE_TAG": "release-colab-20261201"}, "None", "colab"),
    ({}, "None", "local"),
])
def test_platform_is_detected_from_environment_and_shell(environ, shell, expected):
    assert platform_name(environ, shell) == expected


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


def test_notebook_sessions_end_their_platforms_hours_after_the_session_started(monkeypatch):
    monkeypatch.delenv("SWEEPER_DEADLINE_HOURS", raising=False)
    assert session_deadline("kaggle", None) == session_start() + 9 * 3600  # Kaggle's 2026 quota message
    assert session_deadline("colab", None) == session_start() + 12 * 3600
    assert session_deadline("local", 2.0) == pytest.approx(time.time() + 7200, abs=60)
    monkeypatch.setenv("SWEEPER_DEADLINE_HOURS", "1")
    assert session_deadline("colab", None) == pytest.approx(time.time() + 3600, abs=60)


def test_a_session_starts_with_its_container_not_with_the_host(tmp_path):
    """Kaggle's container shows the host's /proc/uptime; a pooled VM booted long before its session."""
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "stat").write_text("cpu  1 2 3\nbtime 1764000000\nprocesses 9\n")
    ticks_after_boot = 3 * 24 * 3600 * os.sysconf("SC_CLK_TCK")  # the host had been up three days
    (proc / "1" / "stat").write_text(f"1 (tini (init)) S 0 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 "
                                     f"{ticks_after_boot} 2306048 1 18446744073709551615\n")
    assert session_start(proc) == 1764000000 + 3 * 24 * 3600
    assert abs(session_start(tmp_path / "no-proc") - time.time()) < 60  # nothing to go by: from now


def test_no_gpu_on_colab_or_kaggle_stops_with_the_platforms_own_instruction(tmp_path):
    def on(name: str, gpus: int = 0) -> Platform:
        return Platform(name, "cpu" if not gpus else "Tesla T4", gpus, 15.0 * gpus, tmp_path, float("inf"), "ana")

    with pytest.raises(UserError, match=r"^this Colab session has no GPU: Runtime > Change runtime type > T4 GPU"):
        require_gpu(on("colab"))
    with pytest.raises(UserError, match=r"^this Kaggle session has no GPU: Settings > Accelerator > GPU T4 x2"):
        require_gpu(on("kaggle"))
    require_gpu(on("kaggle"), allow_cpu=True)
    require_gpu(on("colab", gpus=1))
    require_gpu(on("local"))  # a laptop's CPU is a choice, not a mistake


# ---------------------------------------------------------------------------------------------
# Secrets, through stand-ins of the platforms' own modules (tests/platforms)


def test_notebook_secrets_say_where_each_came_from_and_never_the_value(on_colab, monkeypatch):
    monkeypatch.delenv("SWEEPER_STORE", raising=False)
    monkeypatch.setenv("SWEEPER_GSHEETS_CREDENTIALS", "{...}")
    on_colab.secrets(SWEEPER_STORE="postgresql://u:PLANTED-pw@db/x")
    store, lines = notebook_secrets(["SWEEPER_GSHEETS_CREDENTIALS"], None)
    assert store == "postgresql://u:PLANTED-pw@db/x" and os.environ["SWEEPER_STORE"] == store
    assert lines == ["SWEEPER_GSHEETS_CREDENTIALS: from the environment variable",
                     "SWEEPER_STORE: from the Colab secret SWEEPER_STORE"]
    assert "PLANTED" not in "".join(lines)


@pytest.mark.parametrize("platform, secrets, error", [
    ("colab", {}, "no secret SWEEPER_STORE: add a Colab secret named SWEEPER_STORE (the key icon on the left) and "
                  "turn on its notebook access, then run again"),
    ("colab", {"SWEEPER_STORE": ("x", False)}, "the Colab secret SWEEPER_STORE exists but this notebook may not "
                                              "read it: turn on its \"Notebook access\" switch"),
    ("kaggle", {}, "no secret SWEEPER_STORE: attach a Kaggle secret named SWEEPER_STORE to this notebook "
                   "(Add-ons > Secrets), then run again"),
    ("kaggle", "internet off", "Kaggle's secrets service is unreachable: turn on Settings > Internet"),
    ("kaggle", "no token", "this Kaggle session has no secrets token (KAGGLE_USER_SECRETS_TOKEN)"),
])
def test_each_platform_secret_failure_is_one_line_that_says_what_to_do(platform, secrets, error, request, monkeypatch):
    monkeypatch.delenv("SWEEPER_STORE", raising=False)
    where = request.getfixturevalue(f"on_{platform}")
    if secrets == "internet off":
        monkeypatch.setenv("SWEEPER_FAKE_KAGGLE_INTERNET", "off")
    elif secrets == "no token":
        monkeypatch.delenv("KAGGLE_USER_SECRETS_TOKEN")
    else:
        where.secrets(**secrets)
    with pytest.raises(UserError) as caught:
        notebook_secrets([], None)
    assert str(caught.value).startswith(error) and "\n" not in str(caught.value)


def test_an_optional_secret_may_be_missing(on_colab):
    assert notebook_secrets(["SWEEPER_GSHEETS_CREDENTIALS"], "gsheets://x", optional=("SWEEPER_GSHEETS_CREDENTIALS",)) \
        == ("gsheets://x", ["SWEEPER_GSHEETS_CREDENTIALS: not set"])


def test_checkpoint_roots_per_platform(monkeypatch, tmp_path):
    assert str(default_checkpoint_root("kaggle")) == "/kaggle/working/sweeper-checkpoints"
    monkeypatch.setenv("SWEEPER_HOME", str(tmp_path))
    assert default_checkpoint_root("local") == tmp_path / "checkpoints"


def test_drive_is_mounted_once_and_again_after_the_flush_cell(on_colab, tmp_path, capsys):
    from google.colab import drive

    from sweeper.platforms import mount_drive

    mountpoint = str(tmp_path / "drive")
    mount_drive(mountpoint)
    mount_drive(mountpoint)  # the secrets cell run again: Drive is left as it is
    assert capsys.readouterr().out == f"Mounted at {mountpoint}\n"
    drive.flush_and_unmount()  # the notebook's last cell
    mount_drive(mountpoint)  # the worker cell run after it mounts again, before writing anything
    assert (tmp_path / "drive" / "My Drive").is_dir()


def test_a_mountpoint_written_to_while_unmounted_is_one_line(on_colab, tmp_path):
    from sweeper.platforms import mount_drive

    (tmp_path / "drive" / "MyDrive" / "sweeper-checkpoints").mkdir(parents=True)  # what an old notebook left
    with pytest.raises(UserError, match=r"^cannot mount Google Drive at .* \(Mountpoint must not already contain "
                                        r"files\): Runtime > Disconnect and delete runtime, then Run all$"):
        mount_drive(str(tmp_path / "drive"))
