"""The preflight on the CPU: `sweeper doctor`, the machine card every worker writes before its first claim, and a
failed check stopping a worker before it touches a trial."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

from runner import model as runner_model
from runner.doctor import preflight
from runner.train import BaseModel, prepare_data, quiet_libraries, run_trial
from sweeper.cli import cli
from sweeper.leases import stopped_workers
from sweeper.record import CARD, WORKER, cards
from sweeper.spec import load_spec
from sweeper.study import create_study
from test_runner import (PARAMS, adapter_weights, demo_dir, small_spec, sweep_data,  # noqa: F401  (fixtures)
                         write_sweep)

quiet_libraries()
CHECKS = ["device", "precision", "bitsandbytes", "training step", "memory", "fused kernels"]


def sweeper(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def test_doctor_prints_the_machine_card_and_exits_0_without_a_store():
    done = sweeper("doctor", "--json")
    assert done.exit_code == 0, done.output
    card = json.loads(done.stdout)
    assert [c["name"] for c in card["checks"]] == CHECKS
    assert {c["name"]: c["status"] for c in card["checks"]} == {
        "device": "pass", "precision": "pass", "bitsandbytes": "pass", "training step": "pass",
        "memory": "skip", "fused kernels": "skip"}  # the CPU: no allocator count, no Liger
    assert card["ok"] and card["gpu"] == "cpu" and card["precision"] == "fp32" and card["micro_batch"] >= 1
    assert card["versions"]["torch"] == torch.__version__ and "bitsandbytes" in card["versions"]
    assert card["fused"] is False and "CUDA" in card["fused_note"]
    assert "tiny model" in done.stderr  # it says what it checked with


def test_doctor_checks_the_studys_own_model_and_prints_a_card_a_person_reads(demo_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 's.db'}"
    create_study(load_spec(write_sweep(demo_dir, tmp_path)), store)
    done = sweeper("doctor", "--store", store, "--study", "demo")
    assert done.exit_code == 0, done.output
    assert "preflight passed" in " ".join(done.stdout.split())
    assert "training step  pass" in done.stdout
    assert "micro-batch 8" in done.stdout  # the sweep's batch of 16 on the CPU: 8 x 2
    assert "preflight training step: pass" in done.stderr  # each check as it runs


def test_a_precision_the_device_lacks_fails_doctor_in_one_line_with_exit_2(monkeypatch):
    monkeypatch.setattr(runner_model, "bf16_supported", lambda device: False)  # a T4, simulated
    done = sweeper("doctor", "--precision", "bf16")
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines()[-1].startswith("Error: preflight failed: precision: precision bf16 was "
                                                           "asked for, but the cpu has no bf16")


def test_a_forced_precision_the_gpu_lacks_stops_the_worker_before_any_claim(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_model, "bf16_supported", lambda device: False)  # a T4, simulated on the CPU
    store = f"sqlite:///{tmp_path / 's.db'}"
    create_study(load_spec(write_sweep(demo_dir, tmp_path)), store)
    done = sweeper("worker", "--store", store, "--checkpoint-root", tmp_path / "ck",
                   env={"SWEEPER_PRECISION": "bf16"})
    assert done.exit_code == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert errors == [errors[0]] and errors[0].startswith("Error: preflight failed: precision: precision bf16")
    assert "Traceback" not in done.output
    study = optuna.load_study(study_name="demo", storage=store)
    assert study.get_trials() == []  # nothing claimed, nothing written to the trials
    (card,) = cards(study.user_attrs).values()
    assert card["ok"] is False and [c["status"] for c in card["checks"]] == ["pass", "fail"]
    (stop,) = stopped_workers(study)  # the team sees why, in the store
    assert "preflight failed: precision" in stop


def test_a_4bit_matmul_that_disagrees_with_its_dequantized_weight_fails_its_check(monkeypatch):
    import bitsandbytes as bnb

    real = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: real(*a, **k) * 1.1)  # a broken kernel, 10% off
    card = preflight(None, None, None, log=lambda line: None)
    assert card["ok"] is False
    assert [(c["name"], c["status"]) for c in card["checks"]] == [("device", "pass"), ("precision", "pass"),
                                                                   ("bitsandbytes", "fail")]
    assert "4-bit matmul forward differs from the dequantized weight's" in card["checks"][-1]["detail"]


def test_the_worker_writes_its_machine_card_before_its_first_claim(demo_dir, tmp_path):
    from runner import run_worker

    store = f"sqlite:///{tmp_path / 's.db'}"
    create_study(load_spec(write_sweep(demo_dir, tmp_path, n_trials=1)), store)
    lines = []
    summary = run_worker(store, "demo", account="ana", checkpoint_root=str(tmp_path / "ck"), log=lines.append)
    study = optuna.load_study(study_name="demo", storage=store)
    card = study.user_attrs[CARD + summary.worker_id]
    assert card["ok"] and card["worker"]["account"] == "ana"
    assert study.get_trials()[0].user_attrs[WORKER]["id"] == summary.worker_id  # its trials find their card
    first_trial = next(i for i, line in enumerate(lines) if line.startswith("trial 0:"))
    assert any(line.startswith("preflight passed") for line in lines[:first_trial])


def test_a_trial_after_the_preflight_on_the_kept_base_equals_one_on_a_fresh_base(demo_dir, tmp_path):
    spec = small_spec(demo_dir, train_tokens=4_000, evals=2, checkpoint_every=100)
    data = prepare_data(spec)
    kept = BaseModel()
    preflight(spec, data, kept, log=lambda line: None)
    after = run_trial(spec, PARAMS, tmp_path / "after", data, base=kept, log=lambda line: None)
    fresh = run_trial(spec, PARAMS, tmp_path / "fresh", data, log=lambda line: None)
    assert after.eval_losses == fresh.eval_losses
    for name, weight in adapter_weights(fresh).items():
        assert torch.equal(adapter_weights(after)[name], weight), name


def test_a_cpu_peak_memory_is_the_trials_not_the_probes(demo_dir, sweep_data, tmp_path, monkeypatch):
    """The CPU's counter (the resident set's high-water mark) stands in for the GPU allocator's: both are reset after
    the micro-batch probe, whose near-OOM attempts are no part of what the trial needs."""
    import runner.train as train

    probe, seen = train.choose_micro_batch, []

    def greedy_probe(*args, **kwargs):  # what a GPU probe does: tries a micro-batch that nearly fills the memory
        held = bytearray(600 * 2**20)
        held[::4096] = b"x" * len(held[::4096])  # touched: resident
        seen.append(resident_mb())
        del held
        return probe(*args, **kwargs)

    monkeypatch.setattr(train, "choose_micro_batch", greedy_probe)
    result = run_trial(small_spec(demo_dir, train_tokens=2_000, evals=1), PARAMS, tmp_path / "t", sweep_data,
                       log=lambda line: None)
    assert 0 < result.peak_mem_mb < seen[0] - 500  # not the probe's 600 MB


def resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@pytest.fixture(autouse=True)
def _no_precision_from_the_shell(monkeypatch):
    monkeypatch.delenv("SWEEPER_PRECISION", raising=False)


def test_the_notebooks_gpu_cell_checks_the_device_alone():
    card = preflight(None, None, None, log=lambda line: None)
    assert card["ok"]
    assert [c["status"] for c in card["checks"][3:]] == ["skip"] * 3
    assert all("before its first claim" in c["detail"] for c in card["checks"][3:])


def liger_here(monkeypatch, capability=(7, 5), apply=None):
    """A CUDA device of this capability with liger-kernel installed, simulated on the CPU (Triton needs a GPU)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel"
                        else find_spec(name, *a))
    monkeypatch.setattr(runner_model, "_liger_apply_function", lambda model_type: apply)


def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                swiglu=True, model=None):
    """liger-kernel 0.8.5's signature."""


def test_fused_kernels_need_triton_s_compute_capability_7_and_every_argument_taken(monkeypatch):
    from types import SimpleNamespace

    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    cuda = torch.device("cuda", 0)
    liger_here(monkeypatch, capability=(6, 0), apply=apply_liger_kernel_to_llama)  # a P100
    assert runner_model.fused_kernels_unavailable(llama, cuda) == ("Triton needs compute capability 7.0 or more; "
                                                                  "this GPU has 6.0")
    liger_here(monkeypatch, apply=apply_liger_kernel_to_llama)  # a T4
    assert runner_model.fused_kernels_unavailable(llama, cuda) == ""

    def renamed(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swi_glu=True,
                model=None):  # a release that renamed an argument: Liger's own dispatcher would drop ours silently
        pass

    liger_here(monkeypatch, apply=renamed)
    assert runner_model.fused_kernels_unavailable(llama, cuda) == "this liger-kernel's renamed takes no swiglu"
    assert "CUDA" in runner_model.fused_kernels_unavailable(llama, torch.device("cpu"))
