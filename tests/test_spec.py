"""SweepSpec: every malformed sweep is refused with a message naming the problem; valid ones round-trip."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from sweeper.errors import UserError
from sweeper.spec import SPEC_VERSION, ParamSpec, SweepSpec, load_spec, spec_from_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sweep.toml"

DELETE = object()


def changed(table: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of table with the dotted path set to value, or removed when value is DELETE."""
    table = copy.deepcopy(table)
    *parents, last = path.split(".")
    node = table
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return table


# (id, dotted path, new value, substring the message must hold): one change each to a valid spec.
MALFORMED = [
    ("unknown top-level key", "colour", "blue", "colour: unknown field (allowed: study, n_trials"),
    ("typo in [model]", "model.max_seq_length", 128, "model.max_seq_length: unknown field (allowed: id, max_seq_len"),
    ("wrong type for n_trials", "n_trials", "10", "n_trials: expected an integer, got '10'"),
    ("bool where an int belongs", "budget.evals", True, "budget.evals: expected an integer"),
    ("wrong type for a flag", "model.gradient_checkpointing", 1, "model.gradient_checkpointing: expected true or false"),
    ("infinite learning rate", "train.learning_rate", float("inf"), "train.learning_rate: expected a number"),
    ("missing [model].id", "model.id", DELETE, "model.id: required"),
    ("missing [data] table", "data", DELETE, "[data]: missing table"),
    ("[model] not a table", "model", "tiny/model", "[model]: expected a table"),
    ("both train_tokens and train_examples", "budget.train_examples", 100,
     "budget: give exactly one of train_tokens and train_examples"),
    ("neither train_tokens nor train_examples", "budget.train_tokens", DELETE,
     "budget: give exactly one of train_tokens and train_examples"),
    ("bad sampler", "sampler", "bayes", "sampler: expected one of 'tpe', 'random', 'grid', 'qmc', got 'bayes'"),
    ("bad pruner", "pruner", "asha", "pruner: expected one of 'median', 'hyperband', 'none'"),
    ("bad quantize", "model.quantize", "int8", "model.quantize: expected one of 'nf4', 'none'"),
    ("space param not tunable", "space.max_seq_len", {"choices": [64, 128]},
     "space.max_seq_len: unknown param (tunable: learning_rate, batch_size"),
    ("space param not a table", "space.lora_r", 8, "space.lora_r: expected a table with choices, or low and high"),
    ("space with choices and low/high", "space.batch_size.low", 4, "space.batch_size: give choices, or low and high, not both"),
    ("space with neither choices nor range", "space.lora_r", {"log": True}, "space.lora_r: give choices, or low and high"),
    ("space with low but no high", "space.lora_r", {"low": 4}, "space.lora_r: give both low and high"),
    ("low >= high", "space.learning_rate.low", 1e-3, "space.learning_rate: low (0.001) must be below high (0.001)"),
    ("log with low <= 0", "space.weight_decay", {"low": 0.0, "high": 0.1, "log": True}, "space.weight_decay: log scale needs low > 0"),
    ("grid outside the range", "space.learning_rate.grid", [1e-4, 1e-2], "space.learning_rate: grid values must lie within"),
    ("batch_size choice not an integer", "space.batch_size.choices", [8, 12.5], "space.batch_size: 12.5 is not an integer"),
    ("batch_size choice written as a float", "space.batch_size.choices", [8, 16.0], "space.batch_size: 16.0 is not an integer"),
    ("batch_size choice not a number", "space.batch_size.choices", [8, "16"], "space.batch_size: '16' is not an integer"),
    ("empty choices", "space.batch_size.choices", [], "space.batch_size: choices must not be empty"),
    ("space lora_dropout >= 1", "space.lora_dropout", {"choices": [0.1, 1.5]}, "space.lora_dropout: 1.5 must be below 1"),
    ("space negative learning rate", "space.learning_rate", {"choices": [-1e-4, 1e-4]},
     "space.learning_rate: -0.0001 must be positive"),
    ("space negative low on a log scale", "space.learning_rate.low", -1e-4, "space.learning_rate: log scale needs low > 0"),
    ("empty [space]", "space", {}, "[space]: expected a table of params"),
    ("negative fixed learning rate", "train.learning_rate", -1e-4, "train.learning_rate: must be positive"),
    ("fixed lora_dropout >= 1", "train.lora_dropout", 1.0, "train.lora_dropout: must be in [0, 1)"),
    ("bad study name", "study", "my sweep!", "study: 'my sweep!' may hold only letters, digits"),
    ("empty study name", "study", " ", "study: expected a non-empty string"),
    ("n_trials < 1", "n_trials", 0, "n_trials: must be at least 1"),
    ("budget evals < 1", "budget.evals", 0, "budget.evals: must be at least 1"),
    ("prompt_field without response_field", "data.prompt_field", "instruction",
     "data: give both prompt_field and response_field, or neither"),
    ("spec version mismatch", "version", SPEC_VERSION + 1, f"spec version {SPEC_VERSION + 1} is not supported"),
]


@pytest.mark.parametrize(("path", "value", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_spec_is_refused_with_a_message_naming_the_problem(spec_table, path, value, expected):
    with pytest.raises(UserError) as caught:
        spec_from_dict(changed(spec_table, path, value), source="sweep.toml")
    message = str(caught.value)
    assert message.startswith("sweep.toml: ")
    assert expected in message


def test_two_field_problems_are_reported_together_in_one_message(spec_table):
    table = changed(changed(spec_table, "colour", "blue"), "model.max_seq_length", 128)
    with pytest.raises(UserError) as caught:
        spec_from_dict(table)
    message = str(caught.value)
    assert "colour: unknown field" in message and "model.max_seq_length: unknown field" in message
    assert "\n" not in message


def test_two_cross_field_problems_are_reported_together_in_one_message(spec_table):
    table = changed(changed(spec_table, "n_trials", 0), "data.response_field", "output")
    with pytest.raises(UserError) as caught:
        spec_from_dict(table)
    assert "n_trials: must be at least 1" in str(caught.value)
    assert "give both prompt_field and response_field" in str(caught.value)


def test_sampler_error_lists_every_allowed_sampler(spec_table):
    with pytest.raises(UserError, match="'tpe', 'random', 'grid', 'qmc'"):
        spec_from_dict(changed(spec_table, "sampler", "cmaes"))


# ---------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('study = "demo"\n[model\nid = "x"\n', "is not valid TOML"),
        ('study = "demo"\nstudy = "again"\n', "is not valid TOML"),
        ("n_trials = \n", "is not valid TOML"),
    ],
    ids=["unclosed table header", "duplicate key", "missing value"],
)
def test_invalid_toml_syntax_is_a_user_error_naming_the_file(tmp_path, text, expected):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_spec(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_missing_sweep_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="sweep file not found: .*nope.toml"):
        load_spec(tmp_path / "nope.toml")


def test_problems_in_a_file_are_prefixed_with_its_path(tmp_path, spec_toml):
    spec_toml.write_text(spec_toml.read_text().replace('sampler = "tpe"', 'sampler = "bayes"'))
    with pytest.raises(UserError) as caught:
        load_spec(spec_toml)
    assert str(caught.value).startswith(f"{spec_toml}: sampler: expected one of")


def test_shipped_example_sweep_parses():
    spec = load_spec(EXAMPLE)
    assert spec.study == "tinyllama-alpaca"
    assert spec.budget.train_tokens == 2_000_000 and spec.budget.train_examples is None
    assert spec.data.prompt_field == "instruction" and spec.data.response_field == "output"
    assert set(spec.space) == {"learning_rate", "batch_size"}


def test_small_fixture_sweep_file_parses(spec_toml):
    spec = load_spec(spec_toml)
    assert spec.study == "demo" and spec.train.lora_r == 8
    assert spec.train.lora_alpha == 16.0 and isinstance(spec.train.lora_alpha, float)


# ---------------------------------------------------------------------------------------------
# Defaults, round trip, grid


def test_space_defaults_to_log_learning_rate_and_batch_sizes_8_16_32(spec_table):
    del spec_table["space"]
    spec = spec_from_dict(spec_table)
    lr, batch = spec.space["learning_rate"], spec.space["batch_size"]
    assert (lr.low, lr.high, lr.log, lr.choices) == (3e-5, 2e-3, True, None)
    assert batch.choices == [8, 16, 32]
    assert list(spec.space) == ["learning_rate", "batch_size"]


def test_minimal_spec_takes_every_documented_default():
    spec = spec_from_dict({"study": "s", "model": {"id": "m"}, "data": {"source": "d.jsonl"},
                           "budget": {"train_examples": 100}})
    assert (spec.sampler, spec.pruner, spec.n_trials, spec.seed) == ("tpe", "hyperband", 30, 0)
    assert spec.budget.evals == 8
    assert spec.model.quantize == "nf4" and spec.model.target_modules == "all-linear"
    assert spec.train.learning_rate == 2e-4 and spec.train.batch_size == 16
    assert spec.data.text_field == "text" and spec.data.packing is True


@pytest.mark.parametrize("use_example", [False, True], ids=["small sweep", "shipped example"])
def test_to_dict_then_spec_from_dict_is_identity(spec_table, use_example):
    spec = load_spec(EXAMPLE) if use_example else spec_from_dict(spec_table)
    again = spec_from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert spec.to_dict()["version"] == SPEC_VERSION


def test_to_dict_holds_no_none_so_it_writes_as_toml(spec_table):
    d = spec_from_dict(spec_table).to_dict()
    assert "train_examples" not in d["budget"] and "choices" not in d["space"]["learning_rate"]
    assert spec_from_dict(tomllib.loads(tomli_w.dumps(d))) == spec_from_dict(spec_table)


def test_grid_values_of_a_log_range_are_four_log_spaced_points():
    assert ParamSpec("learning_rate", low=1e-4, high=1e-2, log=True).grid_values() == [1e-4, 0.000464, 0.00215, 0.01]


def test_grid_values_of_a_linear_range_are_four_even_points():
    assert ParamSpec("warmup_ratio", low=0.0, high=0.3).grid_values() == [0.0, 0.1, 0.2, 0.3]


def test_grid_values_of_an_integer_range_are_rounded_and_deduplicated():
    assert ParamSpec("lora_r", low=4, high=64, log=True).grid_values() == [4, 10, 25, 64]
    assert ParamSpec("lora_r", low=1, high=2).grid_values() == [1, 2]


def test_grid_values_are_the_choices_unless_a_grid_is_given():
    assert ParamSpec("batch_size", choices=[8, 16, 32]).grid_values() == [8, 16, 32]
    assert ParamSpec("batch_size", choices=[8, 16, 32], grid=[16]).grid_values() == [16]
    assert ParamSpec("learning_rate", low=1e-4, high=1e-3, grid=[2e-4, 5e-4]).grid_values() == [2e-4, 5e-4]


def test_trial_config_overrides_fixed_values_with_the_trials_params(spec_table):
    spec: SweepSpec = spec_from_dict(spec_table)
    config = spec.trial_config({"learning_rate": 5e-4, "batch_size": 8})
    assert (config.learning_rate, config.batch_size, config.lora_r, config.lora_alpha) == (5e-4, 8, 8, 16.0)


def test_the_grid_sampler_lets_workers_tell_the_last_point_of_the_grid(spec_table):
    """Optuna's GridSampler calls study.stop() after the last point, which raises outside study.optimize."""
    import optuna

    from sweeper.study import make_sampler, suggest

    spec = spec_from_dict({**spec_table, "sampler": "grid",
                           "space": {"batch_size": {"choices": [8, 16]}, "learning_rate": {"choices": [1e-4]}}})
    study = optuna.create_study(sampler=make_sampler(spec))
    for _ in range(2):
        trial = study.ask()
        study.tell(trial, suggest(trial, spec)["batch_size"] / 10)
    assert sorted(t.params["batch_size"] for t in study.trials) == [8, 16]
