"""The `sweeper` command: a thin layer over spec, study, storage and report.

Data goes to stdout, messages to stderr. Exit codes: 0 ok, 1 runtime failure, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import tomli_w
from rich.console import Console

from sweeper import __version__, configs, report
from sweeper.cost import expected_cost
from sweeper.errors import SweeperError, UserError
from sweeper.leases import grace_s, stopped_workers
from sweeper.spec import load_spec, local_problems
from sweeper.storage import BACKENDS, FILE_STORES, open_store

err = Console(stderr=True, highlight=False, soft_wrap=True)  # never break a path or URL across lines


class _Group(click.Group):
    """Every SweeperError becomes one `Error: ...` line and its exit code, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SweeperError as e:
            error = click.ClickException(str(e))
            error.exit_code = e.exit_code
            raise error from None



store_option = click.option("--store", envvar="SWEEPER_STORE", required=True, metavar="URL",
                            help="Store URL (env SWEEPER_STORE); `sweeper stores` lists the kinds.")
study_option = click.option("--study", envvar="SWEEPER_STUDY", metavar="NAME",
                            help="Study name (env SWEEPER_STUDY); may be left out when the store holds one study.")


def _folder_must_exist(path: Path) -> None:
    """A file to write into a folder that is not there is bad input (exit 2), said before any work."""
    if not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist (for {path})")


RUNNER_MODULES = ("torch", "transformers", "peft", "bitsandbytes")  # the runner extra's, that training imports


def _needs_runner(command: str) -> None:
    """A command that trains, where only the control plane is installed: one line saying what to install, not the
    traceback of an import deep in the runner."""
    import importlib.util

    missing = [m for m in RUNNER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"sweeper {command} trains, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                        "not installed: pip install 'sweeper-qlora[runner]' (on Colab and Kaggle, which ship their "
                        "own torch, the runner notebook installs it)")


def _open(url: str, study: str | None):
    """(the store, its study, the study's spec); study None: the store's only one, read once."""
    from sweeper.study import load_study

    store = open_store(url)
    return (store, *load_study(store, study))


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="sweeper")
def cli() -> None:
    """One Optuna sweep of QLoRA fine-tunes, shared by many notebooks through one store."""


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False, path_type=Path))
@store_option
@click.option("--overwrite", is_flag=True, help="Replace the spec of an existing study (its trials are kept).")
def init(sweep_file: Path, store: str, overwrite: bool) -> None:
    """Validate SWEEP_FILE and create its study in the store."""
    from sweeper.study import create_study

    spec = load_spec(sweep_file)
    local = store.startswith(FILE_STORES)
    if problems := local_problems(spec):
        if local:  # its workers run on this machine, from here: they would all stop at it
            raise UserError(f"{sweep_file}: {'; '.join(problems)}")
        for problem in problems:
            err.print(f"warning: {sweep_file}: {problem} on this machine; every worker of this store needs it",
                      style="yellow", markup=False, highlight=False)
    study, what = create_study(spec, open_store(store, create=True), overwrite=overwrite)
    err.print(f"study {spec.study!r}: {what}")
    for line in expected_cost(spec, study):
        err.print(line, markup=False, highlight=False)
    click.echo(spec.study)


@cli.command()
@store_option
@study_option
@click.option("--grid", is_flag=True, help="Enqueue every point of the space's grid.")
@click.option("--point", "points", multiple=True, metavar="NAME=VALUE,...",
              help="A point to enqueue, e.g. learning_rate=1e-4,batch_size=16. Repeatable.")
@click.option("--repeat", type=click.IntRange(min=1), metavar="K",
              help="Run each of the --top configs K more times, with train.seed + 1 .. + K (repeats already there "
                   "are not enqueued again).")
@click.option("--top", type=click.IntRange(min=1), metavar="N",
              help="With --repeat: how many of the best configs (by `sweeper best`'s rule) to repeat [default: 3].")
def enqueue(store: str, study: str | None, grid: bool, points: tuple[str, ...], repeat: int | None,
            top: int | None) -> None:
    """Enqueue points for workers to run first; a point already present is skipped. With --repeat, run the best
    configs again with other seeds, to measure the noise `sweeper best` accounts for."""
    from sweeper.study import enqueue as enqueue_points
    from sweeper.study import grid_points, parse_point, point_problem

    if top is not None and repeat is None:
        raise UserError("--top N goes with --repeat K: give both (sweeper enqueue --repeat 2 --top 3)")
    if repeat is not None and (grid or points):
        raise UserError("give --repeat alone, or --grid / --point: repeats run configs already tried, with other seeds")
    if not grid and not points and repeat is None:
        raise UserError("give --grid or at least one --point (or --repeat K --top N)")
    opened, optuna_study, spec = _open(store, study)
    if repeat is not None:
        _enqueue_repeats(opened, optuna_study, spec, repeat, top or 3)
        return
    wanted = (grid_points(spec) if grid else []) + [parse_point(p, spec) for p in points]
    for point in wanted[:len(wanted) - len(points)]:  # a grid stored by an older sweeper may hold such a point
        if (why := point_problem(point, spec)) is not None:
            raise UserError(f"the study's grid holds a point no worker could run ({why}): fix the grid in the sweep "
                            "file and run sweeper init --overwrite")
    added = enqueue_points(optuna_study, opened, wanted)
    err.print(f"enqueued {len(added)} of {len(wanted)} points ({len(wanted) - len(added)} already present)")


def _enqueue_repeats(opened, optuna_study, spec, repeat: int, top: int) -> None:
    """enqueue --repeat: the top configs by the rule, each given `repeat` runs with other seeds."""
    from sweeper.configs import group_configs, numbers_text, params_text, runs_text
    from sweeper.study import enqueue_repeats

    chosen = group_configs(report.trial_rows(optuna_study))[:top]
    if not chosen:
        raise SweeperError(f"study {optuna_study.study_name!r} has no complete trial yet: nothing to repeat")
    added = enqueue_repeats(optuna_study, opened, spec, chosen, repeat)
    seeds = f"seeds {spec.train.seed + 1}..{spec.train.seed + repeat}" if repeat > 1 else f"seed {spec.train.seed + 1}"
    fewer = f" (only {len(chosen)} {'have' if len(chosen) > 1 else 'has'} a complete run)" if len(chosen) < top else ""
    err.print(f"enqueued {len(added)} of {len(chosen) * repeat} repeats ({seeds}) of the top {len(chosen)} "
              f"config{'s' if len(chosen) > 1 else ''}{fewer}; {len(chosen) * repeat - len(added)} already present")
    for group in chosen:
        new = sum(params is group.params for params, _ in added)
        err.print(f"  {params_text(group.params)}: {runs_text(group.n)} ({numbers_text(group.runs)}), {new} new",
                  markup=False, highlight=False)


@cli.command(name="report")
@store_option
@study_option
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, metavar="N",
              help="Configs in the leaderboard.")
@click.option("--all", "show_all", is_flag=True, help="Every trial, a line each; checkpoint paths whole.")
@click.option("--watch", is_flag=True, help="Redraw the view in place as trials land; Ctrl-C leaves.")
@click.option("--interval", type=click.FloatRange(min=1), default=10, show_default=True, metavar="S",
              help="Seconds between --watch redraws (each reads the store).")
@click.option("--json", "as_json", is_flag=True, help="Print every trial as JSON: an array, a trial a line.")
@click.option("--csv", "as_csv", is_flag=True, help="Print every trial as CSV.")
def report_command(store: str, study: str | None, top: int, show_all: bool, watch: bool, interval: float,
                   as_json: bool, as_csv: bool) -> None:
    """Where the sweep stands: progress, leaderboard, running trials, learning rate x batch size, importances,
    warnings. --all, --json and --csv give every trial."""
    from sweeper import overview

    if as_json and as_csv:
        raise UserError("give --json or --csv, not both")
    if watch and (show_all or as_json or as_csv):
        raise UserError("--watch redraws the default view: drop --all, --json and --csv")
    opened, optuna_study, spec = _open(store, study)
    console = Console(highlight=False)  # the terminal's own width
    if as_json or as_csv or show_all:
        rows = report.trial_rows(optuna_study, opened, grace_s(*opened.lease_timing(spec.heartbeat_s)))
        if as_json:
            click.echo(report.rows_json(rows))
        elif as_csv:
            click.echo(report.to_csv(spec, rows), nl=False)
        else:
            report.render_all(optuna_study, spec, rows, console)
            for line in stopped_workers(optuna_study):
                console.print(line, style="red", markup=False, soft_wrap=True)
    elif watch:  # each redraw reads the store afresh
        overview.watch(console, lambda: overview.look(optuna_study, opened, spec, console.width, top, live=True),
                       interval)
    else:
        console.print(overview.look(optuna_study, opened, spec, console.width, top), crop=False)


@cli.command(help=f"""The config for the full run: the best config's params plus everything the spec fixes.

Rule (written into the config as `rule`): {configs.RULE}. `sweeper enqueue --repeat K --top N` adds repeats.""")
@store_option
@study_option
@click.option("--export", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the config to this file: JSON for a .json file, else TOML.")
@click.option("--json", "as_json", is_flag=True, help="Print (or export) the config as JSON instead of TOML.")
@click.option("--notebook", type=click.Choice(["colab", "kaggle", "local"]),
              help="Instead, write the full-run notebook for this platform (to -o): train, merge, samples, push.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="The notebook file to write.")
@click.option("--push-to", metavar="REPO", help="With --notebook: the Hub repo the notebook pushes the merged model to.")
def best(store: str, study: str | None, export: Path | None, as_json: bool, notebook: str | None,
         output: Path | None, push_to: str | None) -> None:
    if notebook or output or push_to:
        return _full_run_notebook(notebook, store, study, output, push_to)
    if export is not None:
        suffix = export.suffix.lower()
        if as_json and suffix == ".toml":
            raise UserError(f"--json contradicts --export {export}: a .toml file gets TOML; drop --json, or export to "
                            "a .json file")
        as_json = as_json or suffix == ".json"
        _folder_must_exist(export)
    _, optuna_study, spec = _open(store, study)
    rows = report.trial_rows(optuna_study)
    groups = configs.group_configs(rows)
    config = configs.full_run_config(optuna_study.study_name, spec, rows, groups)
    text = json.dumps(config, indent=2) + "\n" if as_json else tomli_w.dumps(config)
    if export:
        try:
            export.write_text(text)
        except OSError as e:
            raise SweeperError(f"cannot write {export}: {e.strerror or e}") from None
        runs = config["trials"]
        what = (f"best trial #{runs[0]} (eval loss {config['eval_loss']:.4f})" if len(runs) == 1 else
                f"best config: trials {configs.numbers_text(runs)} (mean eval loss {config['eval_loss']:.4f} "
                f"± {config['eval_loss_std']:.4f})")
        err.print(f"{what} written to {export}", markup=False, highlight=False)
    else:
        click.echo(text, nl=False)
    for note in configs.best_notes(groups):
        err.print(f"note: {note}", style="yellow", markup=False, highlight=False)


def _full_run_notebook(platform: str | None, store: str, study: str | None, output: Path | None,
                       push_to: str | None) -> None:
    """`best --notebook PLATFORM -o FILE`: the full-run notebook (sweeper/notebook.py render_full_run)."""
    from sweeper import notebook

    if not platform or not output:
        raise UserError("give --notebook colab|kaggle|local and -o FILE together (--push-to goes with them)")
    _folder_must_exist(output)
    nb = notebook.render_full_run(platform, store, study, push_to=push_to)
    notebook.write(nb, output)
    if (warning := notebook.study_warning(store, study)) is not None:
        err.print(warning, style="yellow", markup=False, highlight=False)
    needed = notebook.secrets_needed(store) + (["HF_TOKEN"] if push_to else [])
    err.print(f"wrote the full-run notebook {output} for {platform}"
              + (f"; it reads the secrets {', '.join(needed)}" if needed else ""), markup=False, highlight=False)


@cli.command(name="full-run")
@store_option
@study_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for checkpoints, adapter and merged model (default: the platform's checkpoint root/STUDY-KEY/"
                   "full-run). Run again with the same folder to continue from its last checkpoint.")
@click.option("--train-tokens", type=click.IntRange(min=1), metavar="N", help="Train on N tokens of the full data.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), metavar="E",
              help="Train E passes over the full data (default: 1).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), metavar="N",
              help="Optimizer steps between checkpoints (default: the sweep's).")
@click.option("--push-to", metavar="REPO", help="Push the merged model to this Hugging Face Hub repo (token: HF_TOKEN).")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Prompts for the before/after samples, one a line (default: from the held-out data).")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), help="Override the automatic choice.")
def full_run_command(store: str, study: str | None, out: Path | None, train_tokens: int | None, epochs: float | None,
                     checkpoint_every: int | None, push_to: str | None, prompts: Path | None,
                     precision: str | None) -> None:
    """Train the best config on the full data, merge the adapter into the 16-bit base, sample before and after,
    push to the Hub: the full run, through the same code a trial runs. A stopped run continues when run again."""
    _needs_runner("full-run")
    from runner.full_run import full_run, read_prompts

    done = full_run(store, study, out=out, train_tokens=train_tokens, epochs=epochs, checkpoint_every=checkpoint_every,
                    push_to=push_to, prompts=read_prompts(prompts) if prompts else None, precision=precision,
                    log=lambda line: err.print(line, markup=False, highlight=False))
    click.echo(json.dumps({"out": str(done.out), "best_trial": done.best_trial, "steps": done.steps,
                           "resumed_from_step": done.resumed_from_step, "eval_loss": done.eval_loss,
                           "adapter": str(done.adapter), "merged": str(done.merged), "pushed": done.pushed}))


@cli.command()
@click.argument("number", type=int)
@store_option
@study_option
@click.option("--json", "as_json", is_flag=True, help="Print the trial as JSON.")
def show(number: int, store: str, study: str | None, as_json: bool) -> None:
    """One trial in full: params, seed, eval-loss and train-loss curves, checkpoint, worker, GPU, micro-batch,
    versions, its resume chain and the other runs of its config."""
    import shutil

    from sweeper import show as shown

    opened, optuna_study, spec = _open(store, study)
    trials = optuna_study.get_trials(deepcopy=False)  # one read: a trial landing meanwhile is in both or neither
    rows = report.trial_rows(optuna_study, opened, grace_s(*opened.lease_timing(spec.heartbeat_s)), trials=trials)
    detail = shown.trial_detail(optuna_study, spec, trials, rows, number)
    if as_json:
        click.echo(report.to_json(detail))
    else:
        click.echo("\n".join(shown.render(detail, shutil.get_terminal_size().columns)))


@cli.command()
@store_option
@study_option
@click.option("--max-trials", type=click.IntRange(min=1), help="Stop after this many trials.")
@click.option("--account", envvar="SWEEPER_ACCOUNT", help="Label for this worker's account in the report (env SWEEPER_ACCOUNT).")
@click.option("--checkpoint-root", type=click.Path(file_okay=False), help="Where trial checkpoints go (default: per platform).")
@click.option("--deadline-hours", type=click.FloatRange(min=0), help="Session length; no trial starts that cannot finish in it.")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), help="Override the automatic choice.")
@click.option("--allow-cpu", is_flag=True, help="On Colab or Kaggle, train on the CPU when there is no GPU (slow).")
def worker(store: str, study: str | None, max_trials: int | None, account: str | None, checkpoint_root: str | None,
           deadline_hours: float | None, precision: str | None, allow_cpu: bool) -> None:
    """Join a study: claim trials (enqueued first), fine-tune, write results back."""
    _needs_runner("worker")
    from runner import run_worker

    summary = run_worker(store, study, max_trials=max_trials, account=account,
                         checkpoint_root=checkpoint_root, deadline_hours=deadline_hours, precision=precision,
                         allow_cpu=allow_cpu, log=lambda line: err.print(line))
    click.echo(json.dumps({"worker": summary.worker_id, "trials": summary.trials, "stop_reason": summary.stop_reason}))


@cli.command()
@click.option("--store", envvar="SWEEPER_STORE", metavar="URL",
              help="Check with this store's study's model and data (env SWEEPER_STORE); without it, a tiny model.")
@study_option
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), help="Check this precision, not the automatic one.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine card as JSON.")
def doctor(store: str | None, study: str | None, precision: str | None, as_json: bool) -> None:
    """Check this machine before it joins a sweep: the GPU and its kernels, the precision, bitsandbytes' 4-bit
    matmul against the dequantized weight, one real training step at the micro-batch the probe picks, memory back to
    its level after it, and fused kernels equal to unfused ones. Prints the machine card; exit 1 when a check fails,
    2 when it is a precision the GPU lacks. Every worker runs these checks before its first claim."""
    _needs_runner("doctor")
    import shutil
    import tempfile

    from runner.train import BaseModel, prepare_data, preflight, quiet_libraries
    from runner.worker import preflight_failure
    from sweeper import show as shown

    quiet_libraries()
    log = lambda line: err.print(line, markup=False, highlight=False)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="sweeper-doctor-") as folder:
        if store:
            spec = _open(store, study)[2]
        else:
            from runner.demo import prepare_demo

            log("no --store: checking with a tiny model built here (--store and --study check the study's own)")
            spec = load_spec(prepare_demo(Path(folder), n_trials=2))
        card = preflight(spec, prepare_data(spec), BaseModel(), precision=precision, log=log)
    if as_json:
        click.echo(json.dumps(card, indent=2))
    else:
        click.echo("\n".join(shown.card_lines(card, shutil.get_terminal_size().columns, details=True)))
    if (failed := preflight_failure(card)) is not None:
        raise failed


@cli.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("sweeper-demo"),
              show_default=True, help="Folder for the model, data, store and checkpoints.")
@click.option("--trials", type=click.IntRange(min=2), default=12, show_default=True)
def demo(folder: Path, trials: int) -> None:
    """A real QLoRA sweep of a tiny model on the CPU, with a local store: report and best config at the end."""
    _needs_runner("demo")
    from runner import run_worker
    from runner.demo import FIRST_POINTS, prepare_demo
    from runner.train import quiet_libraries
    from sweeper.study import create_study, enqueue as enqueue_points

    quiet_libraries()
    err.print(f"building a tiny model and dataset in {folder}/")
    sweep = prepare_demo(folder, n_trials=trials)
    spec = load_spec(sweep)
    store = f"sqlite:///{folder / 'sweeps.db'}"
    opened = open_store(store, create=True)
    optuna_study, what = create_study(spec, opened, overwrite=True)
    enqueue_points(optuna_study, opened, FIRST_POINTS)
    err.print(f"study {spec.study!r} in {store}: {what}; running {trials} trials")
    run_worker(store, spec.study, checkpoint_root=str(folder / "checkpoints"), account="demo",
               log=lambda line: err.print(line))
    opened, optuna_study, spec = _open(store, spec.study)
    report.render_all(optuna_study, spec, report.trial_rows(optuna_study, opened), Console(highlight=False))
    click.echo(tomli_w.dumps(report.best_config(optuna_study, spec)))
    err.print(f"again: sweeper report --store {store}")


install_option = click.option("--install", metavar="REQUIREMENT",
                              help="pip requirement for the notebook's install cell, e.g. "
                                   "'sweeper-qlora[runner] @ git+URL@TAG' (default: this sweeper's own code, carried "
                                   "in the notebook; none for --platform local).")


@cli.command(name="notebook")
@click.option("--platform", type=click.Choice(["colab", "kaggle", "local"]), required=True)
@store_option
@study_option
@click.option("--account", help="Label for the notebook's worker in the report.")
@click.option("--max-trials", type=click.IntRange(min=1), help="Stop each worker after this many trials.")
@click.option("--checkpoint-root", help="Where trial checkpoints go (default: per platform).")
@click.option("--deadline-hours", type=click.FloatRange(min=0), help="Session length (default: per platform).")
@install_option
@click.option("--allow-cpu", is_flag=True, help="Let the notebook train on the CPU when its session has no GPU.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .ipynb file to write.")
def notebook_command(platform: str, store: str, study: str | None, account: str | None, max_trials: int | None,
                     checkpoint_root: str | None, deadline_hours: float | None, install: str | None, allow_cpu: bool,
                     output: Path) -> None:
    """Write a runner notebook for Colab, Kaggle or this machine: upload it and Run all."""
    from sweeper import notebook

    _folder_must_exist(output)
    nb = notebook.render(platform, store, study, account=account, max_trials=max_trials, checkpoint_root=checkpoint_root,
                         deadline_hours=deadline_hours, install=install, allow_cpu=allow_cpu)
    notebook.write(nb, output)
    if (warning := notebook.study_warning(store, study)) is not None:
        err.print(warning, style="yellow", markup=False, highlight=False)
    needed = notebook.secrets_needed(store)
    err.print(f"wrote {output} for {platform}" + (f"; it reads the secrets {', '.join(needed)}" if needed else ""))


@cli.group()
def launch() -> None:
    """Start runner notebooks on a platform, under your own account."""


@launch.command(name="kaggle")
@click.option("--store", envvar="SWEEPER_STORE", metavar="URL", help="Store URL (env SWEEPER_STORE).")
@click.option("--study", envvar="SWEEPER_STUDY", required=True, metavar="NAME", help="Study name (env SWEEPER_STUDY).")
@click.option("--gpu", type=click.Choice(["t4x2", "p100"]), default="t4x2", show_default=True,
              help="Kaggle's GPU machine (the API offers no single T4).")
@click.option("--timeout", "timeout_hours", type=float, metavar="HOURS", help="Session time limit (at most 9, Kaggle's GPU session limit).")
@click.option("--account", help="Label for the workers in the report (default: kaggle:USERNAME).")
@install_option
@click.option("--public", is_flag=True, help="Make the kernel public (default: private).")
@click.option("--status", "show_status", is_flag=True, help="Show the state of the study's kernel instead of pushing.")
def launch_kaggle(store: str | None, study: str, gpu: str, timeout_hours: float | None, account: str | None,
                  install: str | None, public: bool, show_status: bool) -> None:
    """Push the Kaggle runner notebook as a new version of your kernel USERNAME/sweeper-STUDY and run it."""
    from sweeper import kaggle_launch

    if show_status:
        click.echo(kaggle_launch.status(study))
        return
    if not store:
        raise UserError("give --store (or set SWEEPER_STORE)")
    url = kaggle_launch.launch(store, study, gpu=gpu, timeout_hours=timeout_hours, account=account, install=install,
                               private=not public, log=lambda line: err.print(line))
    click.echo(url)


@cli.command()
@store_option
@study_option
@click.option("--failed", is_flag=True, help="Every failed trial not yet resumed (preempted, stale, crashed).")
@click.option("--trial", "numbers", type=int, multiple=True, metavar="N", help="This trial (repeatable).")
def retry(store: str, study: str | None, failed: bool, numbers: tuple[int, ...]) -> None:
    """Enqueue trials again; a failed or pruned one resumes from its last checkpoint where one is reachable."""
    from sweeper.leases import retry as retry_trials

    if failed == bool(numbers):
        raise UserError("give --failed or --trial N (not both)")
    _, optuna_study, _ = _open(store, study)
    done = retry_trials(optuna_study, list(numbers) if numbers else None)
    for number, checkpoint in done:
        err.print(f"trial {number} enqueued again" + (f", to resume from {checkpoint}" if checkpoint else ", from the start"))
    if not done:
        err.print("no failed trial to retry")
    click.echo(json.dumps([n for n, _ in done]))


@cli.command()
def stores() -> None:
    """List the store URL kinds, what each is safe for, and what this install lacks to open one."""
    for backend in BACKENDS.values():
        lacks = backend.missing() if backend.missing else None
        click.echo(f"{backend.example:40} {backend.safe_for}" + (f"  (driver missing: {lacks})" if lacks else ""))


# -- plot, accounts, dashboard: the sweep seen as figures, as GPU-hours per account, in optuna-dashboard ----------

@cli.command()
@store_option
@study_option
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Folder for the PNG files and plots.html (created if missing).")
def plot(store: str, study: str | None, out: Path) -> None:
    """Write the sweep's figures as PNG files and one HTML page.

    Eval loss vs learning rate by batch size, every trial's learning curve, parallel coordinates, importances."""
    from sweeper import plots

    plots.check_out(out)
    _, optuna_study, _ = _open(store, study)
    written, skipped = plots.write_plots(optuna_study, out)
    for line in skipped:
        err.print(line, markup=False, highlight=False)
    for path in written:
        click.echo(path)


@cli.command()
@store_option
@study_option
@click.option("--weekly-hours", "weekly", multiple=True, metavar="[PLATFORM=]HOURS",
              help="A weekly GPU-hour allowance per account, on every platform or on one (e.g. kaggle=30); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def accounts(store: str, study: str | None, weekly: tuple[str, ...], as_json: bool) -> None:
    """GPU-hours and trials per account and platform.

    In all, per week and per day; with --weekly-hours, what is left of each account's allowance this week."""
    from sweeper import accounts as usage

    allowances = usage.parse_allowances(weekly)
    _, optuna_study, spec = _open(store, study)
    figures = usage.accounts(optuna_study, allowances, default_gpus=spec.gpus_per_trial)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    else:
        usage.render(figures, Console(highlight=False))


@cli.command()
@store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free one).")
@click.option("--allow-delete", is_flag=True,
              help="Let the dashboard delete (or rename) a study; off by default, the store being the team's.")
def dashboard(store: str, host: str, port: int, allow_delete: bool) -> None:
    """Serve optuna-dashboard over the store, of any kind, and the sweeper view beside it.

    A Google Sheet or a Drive folder too, read as the workers read it. The sweeper view (/sweeper/) shows the workers
    running trials with their leases and machine cards, the workers that stopped, the best config by `sweeper best`'s
    rule with the leaderboard, GPU-hours per account and the diverged trials. Deleting a study is off unless
    --allow-delete. Ctrl-C stops."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from sweeper import dashboard as served
    from sweeper.plots import report_extra

    report_extra("optuna_dashboard")
    opened = open_store(store)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # a line per request would bury the address
            pass

    # optuna_dashboard.run_server, but bound before the address is printed: a port in use is one line, port 0 works
    try:
        server = make_server(host, port, served.app(opened, allow_delete), handler_class=Quiet)
    except OSError as e:
        raise SweeperError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    base = f"http://{host}:{server.server_port}"
    deleting = "deleting a study is on" if allow_delete else "deleting a study is off (--allow-delete)"
    err.print(f"optuna-dashboard over the {opened.backend.scheme} store: {base}/dashboard/, the sweeper view: "
              f"{base}/sweeper/; {deleting}; Ctrl-C stops", markup=False, highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: optuna-dashboard has no login: anyone who reaches {host}:{server.server_port} can change "
                  "the study's trials" + (" or delete the study" if allow_delete else ""),
                  style="yellow", markup=False, highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    cli(prog_name="sweeper")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
