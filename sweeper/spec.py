"""SweepSpec: the sweep definition, validated once with every problem reported together."""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from sweeper.errors import UserError

SPEC_VERSION = 1

# Params a trial may tune, with the kind of value each takes. Their fixed values live in [train].
TUNABLE = {
    "learning_rate": float,
    "batch_size": int,
    "lora_r": int,
    "lora_alpha": float,
    "lora_dropout": float,
    "warmup_ratio": float,
    "weight_decay": float,
}


@dataclass
class ModelSpec:
    id: str
    """Hugging Face model id or a local folder holding config, weights and tokenizer."""
    max_seq_len: int = 512
    """Length of the packed training sequences, in tokens."""
    quantize: Literal["nf4", "none"] = "nf4"
    """'nf4': 4-bit NF4 base via bitsandbytes (QLoRA); 'none': base in the compute dtype."""
    target_modules: str | list[str] = "all-linear"
    """LoRA targets: 'all-linear' or a list of module names."""
    gradient_checkpointing: bool = False
    """Trade compute for memory; off by default since small models fit without it."""


@dataclass
class TrainSpec:
    learning_rate: float = 2e-4
    """Peak learning rate (fixed value when not in [space])."""
    batch_size: int = 16
    """Effective batch size in sequences: micro-batch x accumulation x GPUs."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up from zero."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """torch AdamW, or bitsandbytes' 8-bit (optionally paged) AdamW."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    seed: int = 0
    """Seed for LoRA init, data order and dropout; the same for every trial so trials compare."""


@dataclass
class DataSpec:
    source: str
    """A local .jsonl file, or a Hugging Face dataset name (optionally 'name:config')."""
    split: str = "train"
    """Dataset split to read (Hugging Face datasets only)."""
    text_field: str | None = "text"
    """Field holding plain text. Ignored when prompt_field and response_field are set."""
    prompt_field: str | None = None
    """Field holding the prompt, for chat-formatted data (with response_field)."""
    response_field: str | None = None
    """Field holding the response, for chat-formatted data (with prompt_field)."""
    eval_examples: int = 200
    """Examples held out for evaluation: the same fixed set for every trial."""
    packing: bool = True
    """Pack examples into full sequences, each masked off from the others."""


@dataclass
class BudgetSpec:
    train_tokens: int | None = None
    """Training tokens per trial. Exactly one of train_tokens and train_examples."""
    train_examples: int | None = None
    """Training examples per trial. Exactly one of train_tokens and train_examples."""
    evals: int = 8
    """Evaluations per trial, evenly spaced over the budget; each is a pruning point."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints (a checkpoint is also written at the end)."""


@dataclass
class ParamSpec:
    name: str
    choices: list[Any] | None = None
    """Categorical values; or give low and high."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample on a log scale (learning rates)."""
    grid: list[Any] | None = None
    """Values `enqueue --grid` and the grid sampler use; default: choices, or 4 points from low to high."""

    def grid_values(self) -> list[Any]:
        if self.grid is not None:
            return list(self.grid)
        if self.choices is not None:
            return list(self.choices)
        lo, hi = float(self.low), float(self.high)
        if TUNABLE[self.name] is int:
            return sorted({round(v) for v in _spaced(lo, hi, 4, self.log)})
        return [float(f"{v:.3g}") for v in _spaced(lo, hi, 4, self.log)]


def _spaced(lo: float, hi: float, n: int, log: bool) -> list[float]:
    if log:
        a, b = math.log(lo), math.log(hi)
        return [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def default_space() -> dict[str, ParamSpec]:
    """The LoRA space docs/design.md argues for: lr log-uniform 3e-5..2e-3, effective batch 8/16/32."""
    return {
        "learning_rate": ParamSpec("learning_rate", low=3e-5, high=2e-3, log=True),
        "batch_size": ParamSpec("batch_size", choices=[8, 16, 32]),
    }


@dataclass
class SweepSpec:
    study: str
    """Study name in the store."""
    model: ModelSpec
    data: DataSpec
    budget: BudgetSpec
    train: TrainSpec = field(default_factory=TrainSpec)
    space: dict[str, ParamSpec] = field(default_factory=default_space)
    n_trials: int = 30
    """Trials to finish (complete or pruned) before workers stop. The defaults of n_trials, sampler, pruner and
    budget.evals are those bench/sweep_efficiency.py picks (BENCHMARKS.md, Sweep efficiency)."""
    sampler: Literal["tpe", "random", "grid", "qmc"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "hyperband"
    seed: int = 0
    """Sampler seed."""
    heartbeat_s: float = 60
    """Seconds between a running trial's heartbeats; one silent for 3 of them is taken over by another worker."""
    gpus_per_trial: int = 1
    """GPUs one trial trains on, data-parallel: 1 runs one trial per GPU (two at once on Kaggle's T4 x2); 2 trains
    each trial on two GPUs at once, splitting every step's batch between them (the same trial, about twice as fast)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the study's user attrs and for JSON; None fields are dropped (TOML has no null)."""
        d = asdict(self)
        d["space"] = {name: {k: v for k, v in asdict(p).items() if k != "name"} for name, p in self.space.items()}
        d["version"] = SPEC_VERSION
        return drop_none(d)

    def trial_config(self, params: dict[str, Any]) -> TrainSpec:
        """The training values of one trial: fixed [train] values overridden by the trial's params."""
        return TrainSpec(**{**asdict(self.train), **params})


def drop_none(value: Any) -> Any:
    """Nested dicts without their None values (TOML has no null)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    return value


# ---------------------------------------------------------------------------------------------
# Parsing and validation: every problem is collected, then raised as one UserError.


def local_problems(spec: SweepSpec) -> list[str]:
    """What is wrong, on this machine, with what the sweep file names as local: a data.source or model.id written as a
    path that is not there, a model folder without its config.json, a text (or prompt/response) field that the first
    rows of a local JSONL file do not have. Hugging Face names are the worker's to fetch. Relative paths are from the
    current folder, as a worker started here reads them."""
    problems = []
    source = spec.data.source
    path = Path(source).expanduser()
    if path.exists():
        if not (path.is_file() or path.is_dir()):
            problems.append(f"data.source {source!r} is neither a file nor a folder")
        elif path.is_file() and path.suffix == ".jsonl":
            problems += _missing_fields(spec.data, path)
    elif _written_as_path(source, (".jsonl", ".json")):
        problems.append(f"data.source {source!r} is a path, and there is no file there"
                        + (f" (relative to {Path.cwd()})" if not path.is_absolute() else ""))
    model = Path(spec.model.id).expanduser()
    if model.is_dir():
        if not (model / "config.json").is_file():
            problems.append(f"model.id {spec.model.id!r} is a folder without a config.json: not a saved model")
    elif model.exists() or _written_as_path(spec.model.id, ()):
        problems.append(f"model.id {spec.model.id!r} is a path, and there is no model folder there"
                        + (f" (relative to {Path.cwd()})" if not model.is_absolute() else ""))
    return problems


def _written_as_path(name: str, suffixes: tuple[str, ...]) -> bool:
    """A name that can only be a path (a Hugging Face name is `owner/name`, at most one slash, no leading one)."""
    return Path(name).suffix in suffixes or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


FIELDS_READ = 20  # rows of local data whose fields init checks


def _missing_fields(data: DataSpec, path: Path) -> list[str]:
    """The fields the spec reads that the first rows of a JSONL file lack (a typo: every worker would stop on it)."""
    import json

    wanted = ([("prompt_field", data.prompt_field), ("response_field", data.response_field)]
              if data.prompt_field and data.response_field else [("text_field", data.text_field)])
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) == FIELDS_READ:
                    break
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [f"data.source {str(path)!r} is not JSON lines ({str(e).splitlines()[0]})"]
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return [f"data.source {str(path)!r} holds no JSON object a line"]
    present = sorted(set().union(*rows))
    return [f"data.{setting} = {field!r}, but the first rows of {path.name} have no such field (they have "
            f"{', '.join(present)})" for setting, field in wanted if field and not any(field in r for r in rows)]


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML file."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"sweep file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read sweep file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    return spec_from_dict(table, source=str(path), written=True)


def spec_from_dict(table: dict[str, Any], source: str = "sweep spec", written: bool = False) -> SweepSpec:
    """Build a SweepSpec from plain data (a TOML file, or a study's user attrs).

    written: the table is what a person wrote (a sweep file, for init). It is also refused a [train] value of a
    tuned param (a stored spec, to_dict, holds every [train] value), repeated choices or grid values, a grid value
    outside the choices, and more evals than a trial has steps; a spec stored by an older sweeper keeps loading.
    """
    problems: list[str] = []
    table_given = table
    table = dict(table)
    version = table.pop("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise UserError(f"{source}: spec version {version} is not supported (this sweeper reads {SPEC_VERSION})")
    sections = {"model": ModelSpec, "data": DataSpec, "budget": BudgetSpec, "train": TrainSpec}
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        sub = table.pop(name, None)
        if sub is None and name == "train":
            sub = {}
        if not isinstance(sub, dict):
            problems.append(f"[{name}]: missing table" if sub is None else f"[{name}]: expected a table")
            continue
        n = len(problems)
        kwargs = _build(cls, sub, name, problems)
        if len(problems) == n:
            built[name] = cls(**kwargs)
    space_table = table.pop("space", None)
    top = _build(SweepSpec, table, "", problems, skip=set(sections) | {"space"}, tables=[*sections, "space"])
    space = _build_space(space_table, problems, written)
    train_table = table_given.get("train")
    fixed_and_tuned = [f"train.{name}: fixed in [train] and tuned in [space.{name}]; keep one of them"
                       for name in (train_table if written and isinstance(train_table, dict) else ())
                       if name in space]

    if not problems:
        spec = SweepSpec(**top, **built, space=space)
        problems.extend(_check(spec, written))
    problems.extend(fixed_and_tuned)
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))
    return spec


def _build(cls: type, table: dict[str, Any], where: str, problems: list[str], skip: set[str] = frozenset(),
           tables: list[str] = ()) -> dict[str, Any]:
    """The constructor arguments of a dataclass from a table; problems are appended, not raised. tables: the names of
    the tables allowed beside the fields (the top level's [model], [data], ...)."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.name not in skip]
    prefix = f"{where}." if where else ""
    listed = ", ".join(known) + (f"; tables: {', '.join(f'[{t}]' for t in tables)}" if tables else "")
    for key in table:
        if key not in known:
            kind = "table" if isinstance(table[key], dict) and tables else "field"
            shown = f"[{prefix}{key}]" if kind == "table" else f"{prefix}{key}"
            close = difflib.get_close_matches(key, [*known, *tables], n=1, cutoff=0.75)
            hint = f"; did you mean {f'[{close[0]}]' if close[0] in tables else close[0]}?" if close else ""
            problems.append(f"{shown}: unknown {kind} (allowed: {listed}{hint})")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.name in table:
            value = table[f.name]
            problem = _type_problem(value, hints[f.name])
            if problem:
                problems.append(f"{prefix}{f.name}: {problem}, got {value!r}")
            else:
                kwargs[f.name] = float(value) if hints[f.name] is float else value
        elif f.default is MISSING and f.default_factory is MISSING:
            problems.append(f"{prefix}{f.name}: required")
    return kwargs


def _type_problem(value: Any, hint: Any) -> str | None:
    """None when value fits the type hint, else what was expected."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else "expected one of " + ", ".join(repr(a) for a in allowed)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if all(_type_problem(value, o) for o in options):
            return "expected " + " or ".join(_type_name(o) for o in options if o is not type(None))
        return None
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or (item is not Any and any(_type_problem(v, item) for v in value)):
            return f"expected {_type_name(hint)}"
        return None
    if hint is type(None):
        return None if value is None else "expected nothing"
    if hint is Any:
        return None
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "expected a number"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is str:
        return None if isinstance(value, str) and value.strip() else "expected a non-empty string"
    return None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def _build_space(table: Any, problems: list[str], written: bool = False) -> dict[str, ParamSpec]:
    if table is None:
        return default_space()
    if not isinstance(table, dict) or not table:
        problems.append("[space]: expected a table of params, e.g. [space.learning_rate]")
        return {}
    space = {}
    for name, sub in table.items():
        where = f"space.{name}"
        if name not in TUNABLE:
            problems.append(f"{where}: unknown param (tunable: {', '.join(TUNABLE)})")
            continue
        if not isinstance(sub, dict):
            problems.append(f"{where}: expected a table with choices, or low and high")
            continue
        n = len(problems)
        kwargs = _build(ParamSpec, sub, where, problems, skip={"name"})
        if len(problems) == n:
            param = ParamSpec(name=name, **kwargs)
            problems.extend(f"{where}: {p}" for p in _check_param(param, written))
            space[name] = param
    return space


def _check_param(p: ParamSpec, written: bool = False) -> list[str]:
    """What is wrong with one param's space; written (a sweep file): repeated values and a grid value outside the
    choices too."""
    kind = TUNABLE[p.name]
    has_range = p.low is not None or p.high is not None
    if p.choices is not None and has_range:
        return ["give choices, or low and high, not both"]
    if p.choices is None and not has_range:
        return ["give choices, or low and high"]
    values = list(p.choices or []) + list(p.grid or [])
    if p.choices is None:
        if p.low is None or p.high is None:
            return ["give both low and high"]
        if not p.low < p.high:
            return [f"low ({p.low}) must be below high ({p.high})"]
        if p.log and p.low <= 0:
            return ["log scale needs low > 0"]
        values += [p.low, p.high]
        if p.grid is not None and any(not (p.low <= v <= p.high) for v in p.grid if _is_number(v)):
            return [f"grid values must lie within [{p.low}, {p.high}]"]
    elif not p.choices:
        return ["choices must not be empty"]
    problems = []
    for name, listed in (("choices", p.choices), ("grid", p.grid)) if written else ():
        repeated = [v for i, v in enumerate(listed or []) if v in listed[:i]]
        if repeated:
            problems.append(f"{name} repeat {', '.join(repr(v) for v in repeated)}")
    if written and p.choices is not None and p.grid is not None:
        outside = [v for v in p.grid if v not in p.choices]
        if outside:
            problems.append(f"grid {'values' if len(outside) > 1 else 'value'} {', '.join(repr(v) for v in outside)} "
                            f"{'are' if len(outside) > 1 else 'is'} not among the choices {p.choices}: no worker "
                            "could run such a point")
    for v in values:
        if not _is_number(v) or (kind is int and not isinstance(v, int)):  # 16.0 would reach the runner as a float
            problems.append(f"{v!r} is not {'an integer' if kind is int else 'a number'}")
        elif v < 0 or (p.name in ("learning_rate", "batch_size", "lora_r", "lora_alpha") and v <= 0):
            problems.append(f"{v!r} must be positive")
        elif p.name in ("lora_dropout", "warmup_ratio") and v >= 1:
            problems.append(f"{v!r} must be below 1")
    return problems


def _most_steps(spec: SweepSpec) -> tuple[int, int, str] | None:
    """(at most how many optimizer steps a trial of the space's largest batch has, that batch, how so), or None
    when no bound is known. As runner/train.py counts them: sequences // batch_size. Without packing a token
    budget's sequences depend on the documents' lengths: no bound."""
    p = spec.space.get("batch_size")
    batch = (max(p.choices) if p.choices is not None else int(p.high)) if p is not None else spec.train.batch_size
    b, seq_len = spec.budget, spec.model.max_seq_len
    if b.train_examples is not None:  # packed, sequences are at most one per example
        return max(1, b.train_examples // batch), batch, f"train_examples {b.train_examples} / batch_size {batch}"
    if not spec.data.packing:
        return None
    rows = -(-b.train_tokens // seq_len) + 1  # the last document may run past the budget by up to one sequence
    return max(1, rows // batch), batch, f"train_tokens {b.train_tokens} / max_seq_len {seq_len} / batch_size {batch}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(spec: SweepSpec, written: bool = False) -> list[str]:
    """Checks across fields, after every field has the right type; written (a sweep file): more evals than steps too."""
    problems = []
    if not spec.study.replace("-", "").replace("_", "").replace(".", "").isalnum():
        problems.append(f"study: {spec.study!r} may hold only letters, digits, '-', '_' and '.'")
    if spec.n_trials < 1:
        problems.append("n_trials: must be at least 1")
    if not spec.heartbeat_s > 0:
        problems.append("heartbeat_s: must be positive")
    if spec.gpus_per_trial < 1:
        problems.append("gpus_per_trial: must be at least 1")
    if spec.model.max_seq_len < 16:
        problems.append("model.max_seq_len: must be at least 16")
    b = spec.budget
    if (b.train_tokens is None) == (b.train_examples is None):
        problems.append("budget: give exactly one of train_tokens and train_examples")
    for name in ("train_tokens", "train_examples", "evals", "checkpoint_every"):
        value = getattr(b, name)
        if value is not None and value < 1:
            problems.append(f"budget.{name}: must be at least 1")
    budget_ok = (b.train_tokens is None) != (b.train_examples is None) and all(
        getattr(b, n) is None or getattr(b, n) >= 1 for n in ("train_tokens", "train_examples", "evals"))
    if written and budget_ok and (steps := _most_steps(spec)) is not None and b.evals > steps[0]:
        problems.append(f"budget.evals: {b.evals} evaluations, but a trial of batch_size {steps[1]} has at most "
                        f"{steps[0]} optimizer steps ({steps[2]}); lower budget.evals or raise the budget")
    d = spec.data
    if (d.prompt_field is None) != (d.response_field is None):
        problems.append("data: give both prompt_field and response_field, or neither")
    if d.prompt_field is None and d.text_field is None:
        problems.append("data: give text_field, or prompt_field and response_field")
    if d.eval_examples < 1:
        problems.append("data.eval_examples: must be at least 1")
    t = spec.train
    for name in ("learning_rate", "batch_size", "lora_r", "lora_alpha"):
        if getattr(t, name) <= 0:
            problems.append(f"train.{name}: must be positive")
    for name in ("lora_dropout", "warmup_ratio"):
        if not 0 <= getattr(t, name) < 1:
            problems.append(f"train.{name}: must be in [0, 1)")
    return problems
