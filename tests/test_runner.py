"""The data plane on the CPU: a real 4-bit NF4 base + LoRA trial, checkpoints, resume, worker loop."""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from runner import demo, run_worker
from runner.train import SweepData, prepare_data, quiet_libraries, run_trial
from sweeper.spec import SweepSpec, load_spec, spec_from_dict
from sweeper.leases import stopped_workers
from sweeper.storage import open_store
from sweeper.study import create_study, enqueue, load_study

quiet_libraries()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    demo.prepare_demo(folder)
    return folder


def small_spec(demo_dir: Path, **budget) -> SweepSpec:
    """The demo sweep on a budget of a dozen steps."""
    table = load_spec(demo_dir / "sweep.toml").to_dict()
    table["budget"] = {"train_tokens": 12_000, "evals": 4, "checkpoint_every": 5, **budget}
    table["n_trials"] = 3
    return spec_from_dict(table)


@pytest.fixture(scope="session")
def sweep_data(demo_dir) -> SweepData:
    return prepare_data(small_spec(demo_dir))


PARAMS = {"learning_rate": 1e-2, "batch_size": 8}


def test_trial_trains_a_4bit_nf4_base_with_lora_and_writes_its_checkpoint(demo_dir, sweep_data, tmp_path):
    import bitsandbytes as bnb

    seen = {}

    def report(k, loss):
        seen[k] = loss
        return False

    result = run_trial(small_spec(demo_dir), PARAMS, tmp_path / "t0", sweep_data, report, log=lambda s: None)

    assert list(seen) == [1, 2, 3, 4] and result.eval_losses == list(seen.values())
    assert result.eval_loss == seen[4] < seen[1]  # it learns
    assert result.steps == result.total_steps == len(sweep_data.train) // 8
    assert (result.micro_batch, result.grad_accum, result.precision) == (8, 1, "fp32")
    assert result.train_tokens == sum(sweep_data.train.real[: result.steps * 8]) and result.tokens_per_s > 0
    checkpoint = Path(result.checkpoint)
    assert checkpoint.name == f"step-{result.steps:06d}"
    assert {p.name for p in checkpoint.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json",
                                                      "training_state.pt", "trainer_state.json"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["params"] == PARAMS
    assert len(list((tmp_path / "t0").glob("step-*"))) == 2  # older checkpoints are pruned

    # The QLoRA path itself, not a stand-in: the base linears are bitsandbytes 4-bit NF4.
    from runner.model import BaseModel

    spec = small_spec(demo_dir)
    with BaseModel().lora(spec, spec.trial_config(PARAMS), torch.device("cpu"), torch.float32) as model:
        base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_type == "nf4"


def test_resumed_trial_ends_with_the_same_loss_as_an_uninterrupted_one(demo_dir, sweep_data, tmp_path):
    spec = small_spec(demo_dir)
    whole = run_trial(spec, PARAMS, tmp_path / "whole", sweep_data, log=lambda s: None)

    class Preempted(Exception):
        pass

    def die_at_eval_2(k, loss):
        if k == 2:
            raise Preempted
        return False

    with pytest.raises(Preempted):
        run_trial(spec, PARAMS, tmp_path / "cut", sweep_data, die_at_eval_2, log=lambda s: None)
    assert [p.name for p in (tmp_path / "cut").glob("step-*")] == ["step-000005"]

    resumed = run_trial(spec, PARAMS, tmp_path / "cut", sweep_data, log=lambda s: None)
    assert resumed.resumed_from_step == 5
    assert resumed.eval_losses == whole.eval_losses  # bit for bit on the CPU


def test_a_stop_request_checkpoints_between_checkpoints_and_resumes_bit_exact(demo_dir, sweep_data, tmp_path):
    from runner.train import Preempted

    spec = small_spec(demo_dir)
    whole = run_trial(spec, PARAMS, tmp_path / "whole", sweep_data, log=lambda s: None)
    steps = iter(range(100))
    with pytest.raises(Preempted) as stopped:  # asked after every step: "stop" after the 3rd
        run_trial(spec, PARAMS, tmp_path / "cut", sweep_data, log=lambda s: None,
                  stop=lambda: "SIGTERM received" if next(steps) == 2 else None)
    assert stopped.value.reason == "SIGTERM received" and stopped.value.checkpoint.name == "step-000003"
    resumed = run_trial(spec, PARAMS, tmp_path / "cut", sweep_data, log=lambda s: None)
    assert resumed.resumed_from_step == 3 and resumed.eval_losses == whole.eval_losses


def test_checkpoint_of_other_params_is_not_resumed(demo_dir, sweep_data, tmp_path):
    spec = small_spec(demo_dir, train_tokens=3_000)
    run_trial(spec, PARAMS, tmp_path / "t", sweep_data, log=lambda s: None)
    with pytest.raises(Exception, match="other params"):
        run_trial(spec, {"learning_rate": 1e-3, "batch_size": 8}, tmp_path / "t", sweep_data, log=lambda s: None)


def test_larger_effective_batch_takes_fewer_steps_on_the_same_tokens(demo_dir, sweep_data, tmp_path):
    spec = small_spec(demo_dir)
    r8 = run_trial(spec, PARAMS, tmp_path / "b8", sweep_data, log=lambda s: None)
    r16 = run_trial(spec, {**PARAMS, "batch_size": 16}, tmp_path / "b16", sweep_data, log=lambda s: None)
    assert r16.steps == r8.steps // 2
    assert (r16.micro_batch, r16.grad_accum) == (8, 2)  # the CPU micro-batch cap, accumulated to 16
    assert abs(r16.train_tokens - r8.train_tokens) <= 8 * 128


def test_a_nan_loss_ends_the_trial_as_diverged_with_the_reason(demo_dir, sweep_data, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "tiny-llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / "tiny-llama" / name, broken / name)
    table = small_spec(demo_dir).to_dict()
    table["model"]["id"] = str(broken)
    result = run_trial(spec_from_dict(table), PARAMS, tmp_path / "t", sweep_data, log=lambda s: None)
    assert result.diverged == "training loss became nan at step 1 (fp32)"
    assert (result.eval_loss, result.eval_losses, result.steps) == (None, [], 0)


def test_a_trial_that_diverges_after_an_eval_keeps_its_last_finite_eval_loss(demo_dir, sweep_data, tmp_path,
                                                                              monkeypatch):
    import runner.train as train

    real = train.take_step

    def take_step(*args):  # the loss overflows at step 5, after the first eval (step 3)
        if args[-2] == "step 5":
            raise train.NonFiniteLoss("training loss became inf at step 5 (fp16)")
        return real(*args)

    monkeypatch.setattr(train, "take_step", take_step)
    seen = []
    result = run_trial(small_spec(demo_dir), PARAMS, tmp_path / "t", sweep_data,
                       lambda k, loss: seen.append(loss) or False, log=lambda s: None)
    assert result.diverged == "training loss became inf at step 5 (fp16)"
    assert len(seen) == 1 and result.eval_losses == seen and result.eval_loss == seen[0]
    assert (result.steps, result.pruned_at) == (4, None)


def test_an_allocation_failure_under_another_name_backs_off_like_an_out_of_memory(demo_dir, sweep_data, monkeypatch):
    """cuBLAS reports an exhausted GPU as a RuntimeError: simulated on the CPU for micro-batches above 2."""
    from runner import step
    from runner.train import BaseModel

    spec = small_spec(demo_dir)
    real = step.forward_loss

    def forward_loss(model, batch, *args):
        if len(batch["input_ids"]) > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return real(model, batch, *args)

    monkeypatch.setattr(step, "forward_loss", forward_loss)
    tensors = step.to_tensors(sweep_data.train)
    batch = {k: v[:8] for k, v in tensors.items()}
    lines = []
    with BaseModel().lora(spec, spec.trial_config(PARAMS), torch.device("cpu"), torch.float32) as model:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, micro = step.accumulate_fitting(model, batch, 8, optimizer, scaler, torch.device("cpu"), torch.float32,
                                              step.label_count(batch["labels"]), "step 1", lines.append)
        assert micro == 2 and math.isfinite(float(loss))
        assert lines == ["  out of GPU memory: micro-batch 4 x 2, gradient checkpointing off",
                         "  out of GPU memory: micro-batch 2 x 4, gradient checkpointing off"]
        monkeypatch.setattr(step, "forward_loss", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
        with pytest.raises(RuntimeError, match="shape mismatch"):  # any other RuntimeError is no out-of-memory
            step.accumulate_fitting(model, batch, 8, optimizer, scaler, torch.device("cpu"), torch.float32, 1,
                                    "step 1", lines.append)


def write_sweep(demo_dir: Path, tmp_path: Path, n_trials: int = 3, **changes) -> Path:
    text = (demo_dir / "sweep.toml").read_text()
    text = text.replace("n_trials = 12", f"n_trials = {n_trials}").replace("train_tokens = 60_000", "train_tokens = 6_000")
    text = text.replace("evals = 4", "evals = 2")  # 3 steps at batch 16: no more evals than steps
    for old, new in changes.items():
        text = text.replace(old, new)
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_worker_runs_enqueued_trials_first_and_writes_results_back(demo_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 's.db'}"
    spec = load_spec(write_sweep(demo_dir, tmp_path))
    study, _ = create_study(spec, opened := open_store(store, create=True))
    enqueue(study, opened, [{"learning_rate": 1e-3, "batch_size": 16}])

    summary = run_worker(store, "demo", account="alice", checkpoint_root=str(tmp_path / "ck"), log=lambda s: None)

    assert summary.trials == [0, 1, 2] and "budget of 3 trials is met" in summary.stop_reason
    study, _ = load_study(store, "demo")
    trials = study.get_trials()
    assert trials[0].params == {"learning_rate": 1e-3, "batch_size": 16}
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    complete = next(t for t in trials if t.state == TrialState.COMPLETE)
    worker, result = complete.user_attrs["worker"], complete.user_attrs["result"]
    assert worker["account"] == "alice" and worker["platform"] == "local" and worker["gpu"] == "cpu"
    assert result["eval_loss"] == complete.value
    assert Path(result["checkpoint"]).is_dir() and str(tmp_path / "ck" / "demo") in result["checkpoint"]
    assert {"torch", "transformers", "peft", "bitsandbytes", "optuna"} <= set(result["versions"])
    assert complete.intermediate_values  # pruning saw every eval


def test_worker_stops_at_max_trials(demo_dir, tmp_path):
    store = f"journal:///{tmp_path / 's.log'}"
    create_study(load_spec(write_sweep(demo_dir, tmp_path, n_trials=5)), store)
    summary = run_worker(store, "demo", max_trials=1, checkpoint_root=str(tmp_path / "ck"), log=lambda s: None)
    assert summary.trials == [0] and "max-trials" in summary.stop_reason


def test_failing_trials_are_told_fail_with_the_reason_and_the_worker_gives_up_after_three(demo_dir, tmp_path,
                                                                                          monkeypatch):
    import runner.train
    from sweeper.errors import SweeperError

    def disk_full(*args, **kwargs):  # what the preflight cannot see: every trial's first checkpoint fails
        raise SweeperError("cannot write checkpoint /ck/trial/step-000001: No space left on device")

    monkeypatch.setattr(runner.train, "run_trial", disk_full)
    store = f"sqlite:///{tmp_path / 's.db'}"
    create_study(load_spec(write_sweep(demo_dir, tmp_path, n_trials=5)), store)
    with pytest.raises(SweeperError, match="3 trials failed in a row"):
        run_worker(store, "demo", checkpoint_root=str(tmp_path / "ck"), log=lambda s: None)
    trials = optuna.load_study(study_name="demo", storage=store).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert "No space left on device" in trials[0].user_attrs["result"]["fail_reason"]
    (stop,) = stopped_workers(optuna.load_study(study_name="demo", storage=store))  # the team sees why, in the store
    assert "stopped: 3 trials failed in a row; last: SweeperError: cannot write checkpoint" in stop


def test_a_model_without_weights_stops_the_worker_at_its_preflight_before_any_claim(demo_dir, tmp_path):
    from sweeper.errors import SweeperError

    store = f"sqlite:///{tmp_path / 's.db'}"
    # The tokenizer is found (the data loads), the weights are not: every trial would fail the same way.
    model = tmp_path / "no-weights"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / "tiny-llama" / name, model / name)
    sweep = write_sweep(demo_dir, tmp_path, n_trials=5, **{str(demo_dir / "tiny-llama"): str(model)})
    create_study(load_spec(sweep), store)
    with pytest.raises(SweeperError, match="^preflight failed: training step: cannot load the model of"):
        run_worker(store, "demo", checkpoint_root=str(tmp_path / "ck"), log=lambda s: None)
    study = optuna.load_study(study_name="demo", storage=store)
    assert study.get_trials() == []  # no trial claimed
    (stop,) = stopped_workers(study)
    assert "stopped: preflight failed: training step: cannot load the model of" in stop


def test_worker_does_not_start_a_trial_past_the_session_deadline(demo_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 's.db'}"
    create_study(load_spec(write_sweep(demo_dir, tmp_path)), store)
    summary = run_worker(store, "demo", deadline_hours=0.01, checkpoint_root=str(tmp_path / "ck"), log=lambda s: None)
    assert summary.trials == [] and "deadline" in summary.stop_reason


def test_chunked_loss_equals_the_models_own_loss_and_gradients(demo_dir, sweep_data, monkeypatch):
    from runner import step
    from runner.model import BaseModel

    spec = small_spec(demo_dir)
    batch = {k: v[:4] for k, v in step.to_tensors(sweep_data.train).items()}
    n_items = step.label_count(batch["labels"])

    def loss_and_grads(model):
        model.zero_grad()
        loss = step.forward_loss(model, batch, torch.device("cpu"), torch.float32, n_items)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    with BaseModel().lora(spec, spec.trial_config(PARAMS), torch.device("cpu"), torch.float32) as model:
        monkeypatch.setattr(step, "LOSS_CHUNK_TOKENS", 100)  # several chunks, one of them ragged
        chunked, chunked_grads = loss_and_grads(model)
        monkeypatch.setattr(step, "CHUNKED_LOSS_MODELS", set())
        plain, plain_grads = loss_and_grads(model)
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The base loaded once per worker: each trial gets fresh adapters, and ends as it would on a fresh load.


class Failed(Exception):
    pass


def adapter_weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(result.checkpoint) / "adapter_model.safetensors")


def test_a_trial_on_a_base_kept_from_earlier_trials_ends_bit_identical_to_one_on_a_fresh_load(demo_dir, tmp_path):
    from runner.train import BaseModel, result_attrs

    spec = small_spec(demo_dir, train_tokens=3_000, evals=2, checkpoint_every=100)
    data = prepare_data(spec)
    base = BaseModel()

    def fail_at_first_eval(k, loss):
        raise Failed("the trial before fails mid-way")

    with pytest.raises(Failed):  # another learning rate, and its adapters left mid-step by an error
        run_trial(spec, {**PARAMS, "learning_rate": 3e-3}, tmp_path / "before", data, fail_at_first_eval,
                  base=base, log=lambda s: None)
    loaded_once = base.model
    kept = run_trial(spec, PARAMS, tmp_path / "kept", data, base=base, log=lambda s: None)
    fresh = run_trial(spec, PARAMS, tmp_path / "fresh", data, log=lambda s: None)

    assert base.model is loaded_once  # not loaded again
    assert not [name for name, _ in base.model.named_modules() if "lora" in name]  # adapters off between trials
    assert kept.steps == fresh.steps > 1 and kept.eval_losses == fresh.eval_losses
    kept_weights, fresh_weights = adapter_weights(kept), adapter_weights(fresh)
    assert kept_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(kept_weights[k], fresh_weights[k]) for k in kept_weights)
    assert kept.fused_kernels is False and result_attrs(kept)["fused_kernels"] is False  # no fused kernels on a CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory: on a CUDA device")
def test_trials_on_a_kept_base_give_back_the_gpu_memory_they_allocated(demo_dir, tmp_path):
    import gc

    from runner.train import BaseModel

    spec = small_spec(demo_dir, train_tokens=4_000, evals=1, checkpoint_every=100)
    data, base, levels = prepare_data(spec), BaseModel(), []
    for i in range(3):
        run_trial(spec, PARAMS, tmp_path / f"t{i}", data, base=base, device="cuda", log=lambda s: None)
        gc.collect()
        levels.append(torch.cuda.memory_allocated())
    print(f"GPU memory allocated after each trial: {levels} bytes")
    assert levels[0] == levels[1] == levels[2]  # the base alone: nothing of a trial stays behind


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger Kernel: on a CUDA device, with the `liger` extra installed")
def test_fused_kernels_give_the_losses_of_the_unfused_path_within_fp16_tolerance(demo_dir, tmp_path, monkeypatch):
    from runner import model

    spec = small_spec(demo_dir, train_tokens=4_000, evals=2, checkpoint_every=100)
    data = prepare_data(spec)
    with monkeypatch.context() as m:  # unfused first: Liger's RoPE patches the modeling module for good
        m.setattr(model, "LIGER_MODELS", set())
        plain = run_trial(spec, PARAMS, tmp_path / "plain", data, device="cuda", precision="fp16", log=lambda s: None)
    fused = run_trial(spec, PARAMS, tmp_path / "fused", data, device="cuda", precision="fp16", log=lambda s: None)
    assert (plain.fused_kernels, fused.fused_kernels) == (False, True)
    torch.testing.assert_close(torch.tensor(fused.eval_losses), torch.tensor(plain.eval_losses), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# The 4-bit base stays trainable on every CPU. bitsandbytes 0.49-0.50 repacks 4-bit weights in place into an
# inference-only format at the first eval-mode forward on a CPU with AVX512-BF16 (docs/design.md): these three fail
# there without the fix, and on other CPUs still prove that an eval and a checkpoint leave training as it was.


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers  # the QLoRA path, not a plain model
    return layers


def step_gradients(model, batch, n_items: int) -> list[torch.Tensor]:
    from runner.step import forward_loss

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws
    forward_loss(model, batch, torch.device("cpu"), torch.float32, n_items).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.fixture
def qlora_model(demo_dir, sweep_data):
    from runner.model import BaseModel
    from runner.step import to_tensors

    spec = small_spec(demo_dir)
    batch = {k: v[:4] for k, v in to_tensors(sweep_data.train).items()}
    with BaseModel().lora(spec, spec.trial_config(PARAMS), torch.device("cpu"), torch.float32) as model:
        yield model, batch, to_tensors(sweep_data.eval), spec.trial_config(PARAMS)


def test_an_eval_leaves_the_lora_gradients_of_a_training_step_bit_identical(qlora_model):
    from runner.step import evaluate, label_count

    model, batch, evalset, _ = qlora_model
    before = step_gradients(model, batch, label_count(batch["labels"]))
    evaluate(model, evalset, 8, torch.device("cpu"), torch.float32)
    after = step_gradients(model, batch, label_count(batch["labels"]))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_no_4bit_layer_is_left_in_the_cpu_inference_format_after_an_eval(qlora_model):
    from runner.step import evaluate

    model, _, evalset, _ = qlora_model
    evaluate(model, evalset, 8, torch.device("cpu"), torch.float32)
    packed = [m for m in four_bit_layers(model) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert packed == []


def test_an_eval_and_a_checkpoint_leave_the_4bit_base_weights_bit_identical(qlora_model, tmp_path):
    from bitsandbytes.functional import dequantize_4bit

    from runner.checkpoints import save_checkpoint
    from runner.model import make_optimizer
    from runner.step import evaluate

    def base_weights():
        return [dequantize_4bit(m.weight.data, m.weight.quant_state) for m in four_bit_layers(model)]

    model, _, evalset, cfg = qlora_model
    before = base_weights()
    evaluate(model, evalset, 8, torch.device("cpu"), torch.float32)  # where bitsandbytes would repack them
    optimizer, scheduler = make_optimizer(model, cfg, total_steps=4)
    save_checkpoint(tmp_path, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                    {"step": 1, "params": PARAMS})  # where it would unpack them, lossily
    assert all(torch.equal(a, b) for a, b in zip(before, base_weights()))


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_8bit_optimizers_train(demo_dir, sweep_data, tmp_path, optimizer):
    table = small_spec(demo_dir, train_tokens=3_000, evals=1).to_dict()
    table["train"]["optimizer"] = optimizer
    spec = spec_from_dict(table)
    result = run_trial(spec, PARAMS, tmp_path / "t", prepare_data(spec), log=lambda s: None)
    assert result.steps == result.total_steps and 0 < result.eval_loss < 6.5


def test_a_micro_batch_without_labels_backpropagates_a_zero_loss():
    from runner.step import chunked_cross_entropy

    hidden = torch.randn(1, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    loss = chunked_cross_entropy(hidden, torch.full((1, 5), -100), head, n_items=1)
    loss.backward()
    assert loss.item() == 0 and hidden.grad is not None and not hidden.grad.any()


# ---------------------------------------------------------------------------------------------
# One trial across two processes (gloo on the CPU; NCCL across GPUs runs the same code)


def no_dropout(spec: SweepSpec) -> SweepSpec:
    """Dropout differs between processes (each its own seed); without it two processes compute what one does."""
    table = spec.to_dict()
    table["train"]["lora_dropout"] = 0.0
    return spec_from_dict(table)


def test_a_worker_trains_each_trial_across_two_processes_as_one_would(demo_dir, sweep_data, tmp_path, monkeypatch):
    from runner import parallel

    monkeypatch.setattr(parallel, "trial_devices", lambda n: ["cpu", "cpu"][:n])  # two "GPUs"
    store = f"sqlite:///{tmp_path / 's.db'}"
    sweep = write_sweep(demo_dir, tmp_path, n_trials=1, **{"lora_dropout = 0.05": "lora_dropout = 0.0"})
    spec = load_spec(sweep)
    spec.gpus_per_trial = 2
    study, _ = create_study(spec, opened := open_store(store, create=True))
    enqueue(study, opened, [PARAMS])
    lines: list[str] = []
    run_worker(store, "demo", checkpoint_root=str(tmp_path / "ck"), log=lines.append)

    trial = load_study(store, "demo")[0].get_trials()[0]
    result = trial.user_attrs["result"]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["worker"]["gpu"] == "2 x cpu"
    assert (result["gpus"], result["micro_batch"], result["grad_accum"]) == (2, 4, 1)  # 8 rows a step: 4 each
    assert "  training on 2 processes at once (cpu, cpu)" in lines
    assert sum("eval 1/" in line for line in lines) == 1  # the trial's progress is rank 0's to tell
    alone = run_trial(spec, PARAMS, tmp_path / "alone", prepare_data(spec), log=lambda s: None)
    assert result["eval_losses"] == pytest.approx(alone.eval_losses, rel=1e-5)  # the same trial, on two
    assert list(trial.intermediate_values.values()) == result["eval_losses"]  # rank 0 reported every eval
    assert result["train_tokens"] == alone.train_tokens and Path(result["checkpoint"]).is_dir()


def test_two_processes_stop_checkpoint_resume_and_prune_together(demo_dir, sweep_data, tmp_path):
    from runner.parallel import run_trial_parallel
    from runner.train import Preempted

    spec = no_dropout(small_spec(demo_dir))
    whole = run_trial(spec, PARAMS, tmp_path / "whole", sweep_data, log=lambda s: None)
    steps = iter(range(100))
    with pytest.raises(Preempted) as stopped:  # the worker's stop answers rank 0; both processes stop
        run_trial_parallel(spec, PARAMS, tmp_path / "cut", sweep_data, devices=["cpu", "cpu"], log=lambda s: None,
                           stop=lambda: "SIGTERM received" if next(steps) == 2 else None)
    assert stopped.value.reason == "SIGTERM received" and stopped.value.checkpoint.name == "step-000003"
    assert [p.name for p in (tmp_path / "cut").iterdir()] == ["step-000003"]  # rank 0 alone writes

    resumed = run_trial_parallel(spec, PARAMS, tmp_path / "cut", sweep_data, lambda k, loss: k == 3,
                                 devices=["cpu", "cpu"], log=lambda s: None)
    assert resumed.resumed_from_step == 3 and resumed.pruned_at == 3
    assert resumed.eval_losses == pytest.approx(whole.eval_losses[:3], rel=1e-5)
    assert not multiprocessing.active_children()


def test_a_dead_training_process_fails_the_trial_in_one_line_and_stops_the_others(demo_dir, sweep_data, tmp_path):
    from runner.parallel import run_trial_parallel
    from sweeper.errors import SweeperError

    spec = small_spec(demo_dir, train_tokens=4_000, evals=2)

    def kill_rank_1(k, loss):
        rank_1 = next(p for p in multiprocessing.active_children() if p.name == "sweeper-rank-1")
        os.kill(rank_1.pid, signal.SIGKILL)  # out of host memory, say
        return False

    with pytest.raises(SweeperError, match=r"^the training process of rank 1 \(cpu\) died \(exit -9\); "
                                           r"the others were stopped$"):
        run_trial_parallel(spec, PARAMS, tmp_path / "t", sweep_data, kill_rank_1, devices=["cpu", "cpu"],
                           log=lambda s: None)
    assert not multiprocessing.active_children()

    def freeze_rank_1_kill_rank_0(k, loss):  # no process left to say why (NCCL does not tell of a lost peer)
        ranks = {p.name: p.pid for p in multiprocessing.active_children()}
        os.kill(ranks["sweeper-rank-1"], signal.SIGSTOP)
        os.kill(ranks["sweeper-rank-0"], signal.SIGKILL)
        return False  # answered to a dead process

    with pytest.raises(SweeperError, match=r"^the training process of rank 0 \(cpu\) died \(exit -9\)"):
        run_trial_parallel(spec, PARAMS, tmp_path / "t1", sweep_data, freeze_rank_1_kill_rank_0,
                           devices=["cpu", "cpu"], log=lambda s: None)
    assert not multiprocessing.active_children()  # the frozen one too

    class Superseded(Exception):
        pass

    def superseded(k, loss):  # what the worker's report raises when another record holds the trial's place
        raise Superseded("claim lost")

    with pytest.raises(Superseded):
        run_trial_parallel(spec, PARAMS, tmp_path / "t2", sweep_data, superseded, devices=["cpu", "cpu"],
                           log=lambda s: None)
    assert not multiprocessing.active_children()
