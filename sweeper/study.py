"""The study in a store: created from a SweepSpec, which it then carries for every worker."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import uuid
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from sweeper.configs import ConfigGroup, config_key, trial_seeds
from sweeper.errors import SweeperError, UserError, first_line
from sweeper.spec import TUNABLE, SweepSpec, spec_from_dict
from sweeper.record import FIXED_PARAMS, METRIC, RESUMES, SEED, STUDY_KEY, params_of
from sweeper.storage import Store, open_store, redact, store_lock

SPEC_ATTR = "sweeper_spec"

optuna.logging.set_verbosity(logging.WARNING)


def _opened(store: Store | str, create: bool = False) -> Store:
    return open_store(store, create=create) if isinstance(store, str) else store


def create_study(spec: SweepSpec, store: Store | str, overwrite: bool = False) -> tuple[optuna.Study, str]:
    """Create the study (in a store, or the one at a URL) and store the spec in it. Returns the study and what was
    done.

    An existing study with the same spec is left alone; with a different spec it is refused
    unless `overwrite`, which replaces the stored spec and keeps the trials.
    """
    store = _opened(store, create=True)
    storage = store.storage
    with _store_errors(store.url):
        names = optuna.get_all_study_names(storage)  # summaries would deep-copy every trial
        if spec.study in names:
            study = optuna.load_study(study_name=spec.study, storage=storage)
            stored = study.user_attrs.get(SPEC_ATTR)
            if stored == spec.to_dict():
                return study, "exists, unchanged"
            if not overwrite:
                changed = changed_fields(stored or {}, spec.to_dict())
                raise UserError(
                    f"study {spec.study!r} already exists with a different spec (changed: {', '.join(changed)}); "
                    "pass --overwrite to replace the spec (trials are kept)"
                )
            outside = [f"#{t.number} {_shown_point(point)} ({why})" for t in study.get_trials(
                deepcopy=False, states=(TrialState.WAITING,)) if (why := point_problem(
                    point := t.system_attrs.get(FIXED_PARAMS, {}), spec)) is not None]
            if outside:
                more = f"; and {len(outside) - 10} more" if len(outside) > 10 else ""
                raise UserError(f"the new spec's space leaves out {len(outside)} enqueued point"
                                f"{'s' if len(outside) > 1 else ''}, which every worker would fail on: "
                                f"{'; '.join(outside[:10])}{more}; keep them in the space, or start a new study name")
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
            return study, "spec replaced"
        study = optuna.create_study(study_name=spec.study, storage=storage, direction="minimize")
        with warnings.catch_warnings():  # set_metric_names is "experimental": nothing a user acts on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC])  # what every Optuna tool (dashboard, plots) calls the objective
        study.set_user_attr(STUDY_KEY, uuid.uuid4().hex[:12])  # before the spec: a study workers join has its key
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        return study, "created"


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the fields that differ between two specs (as dicts)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def stored_spec(study: optuna.Study) -> dict[str, Any] | None:
    """The spec as the study holds it now (sweeper init --overwrite replaces it), as a dict."""
    return study.user_attrs.get(SPEC_ATTR)


def load_study(store: Store | str, name: str | None, worker_seed: int | None = None) -> tuple[optuna.Study, SweepSpec]:
    """Open a sweeper study (in a store, or the one at a URL) and its spec, with the spec's sampler and pruner
    attached.

    name None: the store's only study (the store is read once, not once to list and once to load).
    """
    store = _opened(store)
    storage = store.storage
    with _store_errors(store.url):
        if name is None:
            names = optuna.get_all_study_names(storage)  # summaries would deep-copy every trial
            if len(names) != 1:
                raise UserError("give --study: the store holds " + (f"studies {', '.join(names)}" if names else "no study"))
            name = names[0]
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            names = optuna.get_all_study_names(storage)  # summaries would deep-copy every trial
            have = f"; studies here: {', '.join(names)}" if names else "; the store holds no study yet (run sweeper init)"
            raise UserError(f"no study {name!r} in the store{have}") from None
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is None:
            raise UserError(f"study {name!r} was not created by sweeper init: it holds no sweep spec")
        spec = spec_from_dict(stored, source=f"spec stored in study {name!r}")
        study.sampler = make_sampler(spec, worker_seed)
        study.pruner = make_pruner(spec)
    return study, spec


@contextlib.contextmanager
def _store_errors(url: str) -> Iterator[None]:
    """A store failing mid-call becomes one SweeperError line instead of a traceback."""
    try:
        yield
    except (OSError, StorageInternalError, SQLAlchemyError) as e:
        cause = e
        while isinstance(cause, StorageInternalError) and cause.__cause__ is not None:  # Optuna's own words guess
            cause = cause.__cause__  # ("e.g. exceeding max length"); what failed is the database's error
        first = first_line(cause)
        if "database or disk is full" in first:
            first = "the disk is full (SQLite: database or disk is full)"
        raise SweeperError(f"store {redact(url)} failed: {first.replace(url, redact(url))}") from None


def checkpoint_folder(study: optuna.Study) -> str:
    """The study's folder under a checkpoint root: its name and the key made at init, so that two sweeps of one name
    (in two stores) never read each other's checkpoints; a study made before keys were, its name alone."""
    key = study.user_attrs.get(STUDY_KEY)
    return f"{study.study_name}-{key}" if isinstance(key, str) and key.isalnum() else study.study_name


def sampler_seed(spec: SweepSpec, worker_seed: int | None = None) -> int:
    """The spec's seed, or a worker's own made from it: parallel workers with one seed would propose the same point."""
    return spec.seed if worker_seed is None else zlib.crc32(f"{spec.seed}:{worker_seed}".encode())


def make_sampler(spec: SweepSpec, worker_seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded by sampler_seed."""
    seed = sampler_seed(spec, worker_seed)
    if spec.sampler == "tpe":
        # constant_liar keeps parallel workers from piling onto the same region.
        startup = max(3, min(10, spec.n_trials // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        return _AskTellGridSampler({n: p.grid_values() for n, p in spec.space.items()}, seed=seed)
    return optuna.samplers.QMCSampler(seed=seed, scramble=True)


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its stop at the last grid point: that calls study.stop(), which raises outside
    study.optimize, and workers ask and tell. The study's budget (n_trials) ends the sweep, as with every sampler."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """Pruning steps are eval indices (1..budget.evals), the same token fractions for every batch size."""
    if spec.pruner == "median":
        # No pruning in the first quarter of the evals (at least the first): early losses rank trials poorly.
        # Optuna prunes at step >= n_warmup_steps, and our steps count from 1.
        return optuna.pruners.MedianPruner(n_startup_trials=min(4, spec.n_trials // 2),
                                           n_warmup_steps=max(1, spec.budget.evals // 4) + 1)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.budget.evals, reduction_factor=3)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """The trial's params from the spec's space, and for a repeat (sweeper enqueue --repeat) its own train.seed."""
    params: dict[str, Any] = {}
    for name, p in spec.space.items():
        if p.choices is not None:
            params[name] = trial.suggest_categorical(name, p.choices)
        elif TUNABLE[name] is int:
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
    seed = trial.user_attrs.get(SEED)
    if seed is None and RESUMES in trial.user_attrs:  # a resume of a repeat: the seed of the trial it continues
        seed = trial_seeds(trial.study.get_trials(deepcopy=False)).get(trial.number)
        if seed is not None:
            trial.set_user_attr(SEED, seed)  # so that its own resume finds it one step back
    if seed is not None:
        params["seed"] = seed  # not an Optuna param: the sampler and the report see the config, not its seed
    return params


# ---------------------------------------------------------------------------------------------
# Enqueue: explicit points or the whole grid, never a point twice.


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    names = list(spec.space)
    values = [spec.space[n].grid_values() for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def parse_point(text: str, spec: SweepSpec) -> dict[str, Any]:
    """'learning_rate=1e-4,batch_size=16' -> a point checked against the space."""
    point: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or name not in spec.space:
            raise UserError(f"bad point {text!r}: give name=value pairs for params in the space ({', '.join(spec.space)})")
        if name in point:
            raise UserError(f"bad point {text!r}: {name} is given twice")
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"bad point {text!r}: {name}={raw!r} is not a number") from None
        if TUNABLE[name] is int:
            if not value.is_integer():
                raise UserError(f"bad point {text!r}: {name}={raw!r} is not a whole number")
            value = int(value)  # 8.0 is 8
        if (allowed := _outside(name, value, spec)) is not None:
            raise UserError(f"bad point {text!r}: {name}={value} is outside the space ({allowed})")
        point[name] = value
    if not point:
        raise UserError(f"bad point {text!r}: empty")
    return point


def _outside(name: str, value: Any, spec: SweepSpec) -> str | None:
    """What the space allows of a param, when value is not in it; None when it is."""
    p = spec.space[name]
    try:
        ok = value in p.choices if p.choices is not None else p.low <= value <= p.high
    except TypeError:  # a value of another kind, from a store written by hand
        ok = False
    return None if ok else str(p.choices) if p.choices is not None else f"[{p.low}, {p.high}]"


def point_problem(point: dict[str, Any], spec: SweepSpec) -> str | None:
    """Why an enqueued point cannot run in this spec's space (a value outside it, a param it does not tune), or None."""
    for name, value in point.items():
        if name not in spec.space:
            return f"{name} is not tuned"
        if (allowed := _outside(name, value, spec)) is not None:
            return f"{name} not in {allowed}"
    return None


def _shown_point(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def _same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(math.isclose(float(a[k]), float(b[k]), rel_tol=1e-9) for k in a)


def enqueue(study: optuna.Study, store: Store, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Enqueue the points not already waiting, running or finished; returns those enqueued.

    The check and the enqueue happen under the store's lock, so concurrent calls never enqueue a
    point twice (Optuna's own skip_if_exists can, by its documentation).
    """
    added = []
    with store_lock(store.url), _store_errors(store.url):
        present = [
            t.system_attrs.get(FIXED_PARAMS, t.params)
            for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL
        ]
        for point in points:
            if any(_same_point(point, p) for p in present):
                continue
            study.enqueue_trial(point)
            present.append(point)
            added.append(point)
    return added


def enqueue_repeats(study: optuna.Study, store: Store, spec: SweepSpec, configs: list[ConfigGroup],
                    k: int) -> list[tuple[dict[str, Any], int]]:
    """Give each config K repeats, seeded train.seed + 1 .. + K; a repeat already waiting, running or finished is
    not enqueued again (a failed one is). Returns the (params, seed) enqueued.

    Workers stop at the budget (spec.n_trials), so repeats that would not all fit in what is left of it are
    refused whole, before any is enqueued; the check and the enqueue happen under the store's lock."""
    seeds = range(spec.train.seed + 1, spec.train.seed + k + 1)
    with store_lock(store.url), _store_errors(store.url):
        trials = study.get_trials(deepcopy=False)
        seed_of = trial_seeds(trials)
        present = {(config_key(params_of(t)), seed_of[t.number]) for t in trials if t.state != TrialState.FAIL}
        wanted = [(c.params, s) for c in configs for s in seeds if (config_key(c.params), s) not in present]
        taken = sum(t.state != TrialState.FAIL for t in trials)  # finished, running, or queued ahead of ours
        if wanted and len(wanted) > spec.n_trials - taken:
            raise UserError(f"the study's budget of {spec.n_trials} trials has room for {max(0, spec.n_trials - taken)} "
                            f"more ({taken} finished, running or queued), not the {len(wanted)} repeats asked: workers "
                            "stop at the budget; raise n_trials in the sweep file and run sweeper init --overwrite")
        for params, seed in wanted:
            study.enqueue_trial(params, user_attrs={SEED: seed})
    return wanted
