"""`sweeper dashboard`: optuna-dashboard over a store, the sweeper view beside it, and no delete unless asked for.

optuna-dashboard shows trials and Optuna's plots; of a sweep it knows nothing: workers, leases, machine cards, repeats,
accounts. What it offers to extend it (notes, custom plotly figures, artifacts) is written into the study, one write to
the team's shared store per change, and stale until written again; so the sweeper view is a page of its own
(/sweeper/), built on the server from the store as it is at each load (the studies with their attrs, read once, and the
study's trials, read once), and writing nothing. It has no script: every value from the store (account names, paths,
GPU names) is escaped text.

Its study list offers a delete button, and its rename copies a study and deletes the original (whose name every worker
joins by): on a shared store both are refused unless `sweeper dashboard --allow-delete`.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from sweeper.accounts import accounts
from sweeper.configs import RULE_SHORT, ConfigGroup, group_configs, numbers_text, params_text, runs_text, value_text
from sweeper.leases import grace_s, lease_note, silence, stopped_workers
from sweeper.record import METRIC, cards, diverged_of, lease_of, worker_of
from sweeper.report import IN_BUDGET, budget, gpu_hours, trial_rows
from sweeper.spec import SweepSpec, spec_from_dict
from sweeper.storage import Store, redact
from sweeper.study import SPEC_ATTR

if TYPE_CHECKING:
    from optuna.study._frozen import FrozenStudy

METRIC_NAMES = "study:metric_names"  # the study system attr Optuna's set_metric_names writes and optuna-dashboard reads
OBJECTIVE = [METRIC]
TOP = 10  # configs in the leaderboard, as the report's default
REFUSED = ("deleting is off: sweeper dashboard serves the team's shared store; start it with --allow-delete to delete "
           "or rename a study")
STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
h2{font-size:1.1em;margin-top:1.6em}table{border-collapse:collapse}
th,td{padding:.25em .8em;text-align:left;vertical-align:top;border-bottom:1px solid #ddd}
td.n,th.n{text-align:right}tr.bad td,li.bad{color:#b00}.dim{color:#777}"""

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def app(store: Store, allow_delete: bool) -> WSGIApp:
    """optuna-dashboard over the store with the sweeper view at /sweeper/; unless allow_delete, every DELETE (a study,
    its artifacts, a preference) and a study's rename answered 403, one line of JSON in optuna-dashboard's own shape."""
    import optuna_dashboard  # (the report extra: the command checked it is there)

    dashboard = optuna_dashboard.wsgi(named_objective(store.storage))

    def serve(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "").rstrip("/")  # as optuna-dashboard matches its routes
        if path == "/sweeper" or path.startswith("/sweeper/"):
            return sweeper_view(store, path.removeprefix("/sweeper").strip("/"), start_response)
        if not allow_delete and deletes(environ.get("REQUEST_METHOD", "GET"), path):
            return _answer(start_response, "403 Forbidden", "application/json", json.dumps({"reason": REFUSED}))
        return dashboard(environ, start_response)

    return serve


def deletes(method: str, path: str) -> bool:
    """A request of optuna-dashboard's that deletes: any DELETE, and a rename (a copy, then the original deleted)."""
    return method.upper() == "DELETE" or re.fullmatch(r"/api/studies/\d+/rename", path) is not None


def named_objective(storage: BaseStorage) -> BaseStorage:
    """The storage, with a sweeper study that has no metric name (one made before `sweeper init` wrote it) read as
    having eval_loss: optuna-dashboard takes it from the study's system attrs, and shows "Objective 0" without. It is
    added to what this process reads, never written to the store."""
    read = storage.get_all_studies

    def get_all_studies() -> list[FrozenStudy]:
        studies = read()
        for study in studies:
            if METRIC_NAMES not in study.system_attrs and SPEC_ATTR in study.user_attrs and len(study.directions) == 1:
                study.system_attrs = {**study.system_attrs, METRIC_NAMES: OBJECTIVE}  # a new dict: the read one as read
        return studies

    storage.get_all_studies = get_all_studies  # on this instance, in this process: optuna-dashboard finds a study by it
    return storage


def _answer(start_response: Callable, status: str, content_type: str, body: str,
            headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", f"{content_type}; charset=utf-8"), ("Content-Length", str(len(data))),
                            *headers])
    return [data]


# ---------------------------------------------------------------------------------------------
# The sweeper view


def sweeper_view(store: Store, wanted: str, start_response: Callable) -> list[bytes]:
    """/sweeper/: the store's sweeper study, or where it holds several, a link to each; /sweeper/ID: study ID (the id
    optuna-dashboard's own pages use)."""
    studies = [s for s in store.storage.get_all_studies() if SPEC_ATTR in s.user_attrs]
    if wanted:
        studies = [s for s in studies if str(s._study_id) == wanted]
        if not studies:
            return _answer(start_response, "404 Not Found", "text/plain", f"no sweeper study with id {wanted!r}\n")
    if len(studies) == 1:
        body = study_page(store, studies[0])
    else:
        links = "".join(f'<li><a href="/sweeper/{s._study_id}">{_e(s.study_name)}</a></li>' for s in studies)
        body = _page("sweeper", f"<h1>sweeper studies in {_e(redact(store.url))}</h1>"
                     + (f"<ul>{links}</ul>" if studies else "<p>none yet: <code>sweeper init</code> creates one</p>"))
    # no script, no request elsewhere: a value from the store that slipped through escaping could still do nothing
    return _answer(start_response, "200 OK", "text/html", body,
                   [("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")])


def study_page(store: Store, study: FrozenStudy, now: float | None = None) -> str:
    """One study's view, from one read of its trials (and the attrs that came with the study): progress, the workers
    running trials with their leases and machine cards, the workers that stopped, the best config by the rule and the
    leaderboard, GPU-hours per account, the diverged trials."""
    now = time.time() if now is None else now
    spec = spec_from_dict(study.user_attrs[SPEC_ATTR], source=f"spec stored in study {study.study_name!r}")
    trials = store.storage.get_all_trials(study._study_id, deepcopy=False)  # what study.get_trials does, by id
    grace = grace_s(*store.lease_timing(spec.heartbeat_s))
    rows = trial_rows(study, store, grace, trials)  # given the trials, it reads nothing of the study
    groups = group_configs(rows)
    diverged = [t for t in trials if t.state == TrialState.PRUNED and diverged_of(t)]
    counts = budget(rows, spec.n_trials)  # as the report counts them: they add up to the budget
    finished = counts["complete"] + counts["pruned"] + counts["diverged"]
    states = ", ".join(f"{name} {counts[name]}" for name in (*IN_BUDGET, "failed", "beyond") if counts[name]) \
        or "no trial yet"
    head = (f"<h1>{_e(study.study_name)}</h1><p class=dim>{_e(redact(store.url))} · read at "
            f"{datetime.fromtimestamp(now):%H:%M:%S} · <a href=\"/dashboard/studies/{study._study_id}\">its trials in "
            f"optuna-dashboard</a></p><p id=progress>{finished} of {spec.n_trials} finished ({_e(states)}) · "
            f"{gpu_hours(rows):.2f} GPU-hours</p>")
    # accounts() asks the study for its name and trials: it gets the trials read above, not a second read
    usage = accounts(SimpleNamespace(study_name=study.study_name, get_trials=lambda deepcopy=False: trials), {},
                     default_gpus=spec.gpus_per_trial)
    stopped = stopped_workers(study)  # from the user attrs that came with the study, as the cards are
    return _page(f"sweeper: {study.study_name}", "".join([
        head, _workers(trials, cards(study.user_attrs), grace, now), _stopped(stopped),
        _best(spec, groups), _accounts(usage), _diverged(diverged)]))


def _workers(trials: list[FrozenTrial], machines: dict[str, dict[str, Any]], grace: float, now: float) -> str:
    """A row per running trial: its worker, the lease's age as the report gives it, and the worker's machine card."""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    rows, bad = [], []
    for t in running:
        lease, who = lease_of(t), worker_of(t)
        worker = lease.get("worker") or who.get("id") or "?"
        step, total = lease.get("step"), lease.get("total_steps")
        rows.append([worker, f"#{t.number}", value_text(lease.get("account") or who.get("account")),
                     value_text(lease.get("platform") or who.get("platform")),
                     "" if step is None else f"{step}/{total if total is not None else '?'}",
                     lease_note(t, grace, now) or "no lease yet", *_card_cells(machines.get(worker))])
        at = lease.get("at")
        bad.append(isinstance(at, (int, float)) and now - at > grace)
    headers = ["worker", "trial", "account", "platform", "step", "lease", "GPU", "precision", "micro-batch", "fused",
               "preflight"]
    return (f"<h2>workers running trials: {len(running)}</h2>"
            + (_table("workers", headers, rows, {"micro-batch"}, bad) if running else "<p class=dim>none</p>"))


def _card_cells(card: dict[str, Any] | None) -> list[str]:
    """GPU (capability), precision, micro-batch, fused kernels, preflight: from the worker's machine card
    (runner/doctor.py), written before its first claim."""
    if card is None:
        return ["no machine card (a worker from before cards)", "", "", "", ""]
    checks = card.get("checks") or []
    passed = sum(1 for c in checks if c.get("status") == "pass")
    failed = [f"{c.get('name')}: {c.get('detail')}" for c in checks if c.get("status") == "fail"]
    capability = f" ({card['capability']})" if card.get("capability") else ""
    return [f"{card.get('gpu', '?')}{capability}", value_text(card.get("precision")),
            value_text(card.get("micro_batch")),
            "yes" if card.get("fused") else f"no: {card.get('fused_note') or '?'}",
            f"{'pass' if card.get('ok') else 'fail'} {passed}/{len(checks)} in {silence(card.get('seconds') or 0)}"
            + "".join(f"; {f}" for f in failed)]


def _stopped(lines: list[str]) -> str:
    items = "".join(f"<li class=bad>{_e(line)}</li>" for line in lines)
    return f"<h2>workers that stopped: {len(lines)}</h2>" + (f"<ul id=stopped>{items}</ul>" if lines else "")


def _best(spec: SweepSpec, groups: list[ConfigGroup]) -> str:
    """The best config by `sweeper best`'s rule, and the leaderboard: each config's mean, spread and runs."""
    if not groups:
        return "<h2>best config</h2><p class=dim>no complete trial yet</p>"
    best = groups[0]
    spread = "" if best.std is None else f" ± {best.std:.4f}"
    line = (f"{params_text(best.params)}: mean eval loss {best.mean:.4f}{spread} over {runs_text(best.n)} "
            f"({numbers_text(best.runs)})")
    headers = ["#", *spec.space, "mean eval loss", "±", "runs", "trials"]
    rows = [[f"#{g.best_trial}", *(value_text(g.params.get(name)) for name in spec.space), f"{g.mean:.4f}",
             "" if g.std is None else f"{g.std:.4f}", str(g.n) + (f" +{g.pending} to run" if g.pending else ""),
             numbers_text(g.runs)] for g in groups[:TOP]]
    return (f"<h2>best config</h2><p id=best><b>{_e(line)}</b></p><p id=rule class=dim>rule: {_e(RULE_SHORT)}</p>"
            f"<h2>leaderboard: top {min(TOP, len(groups))} of {len(groups)} configs</h2>"
            + _table("leaderboard", headers, rows, {*spec.space, "mean eval loss", "±", "runs"}))


def _accounts(usage: dict[str, Any]) -> str:
    headers = ["account", "platform", "GPUs", "trials", "GPU-hours", f"this week ({usage['this_week']})"]
    rows = [[r["account"], r["platform"], ", ".join(r["gpu_names"]), str(r["trials"]), f"{r['gpu_hours']:.2f}",
             f"{r['this_week_gpu_hours']:.2f}"] for r in usage["accounts"]]
    return ("<h2>GPU-hours per account</h2>"
            + (_table("accounts", headers, rows, set(headers[3:])) if rows else "<p class=dim>no trial started</p>"))


def _diverged(diverged: list[FrozenTrial]) -> str:
    """The trials whose loss became NaN or inf (told pruned; never ranked), with why."""
    rows = [[f"#{t.number}", params_text(t.params), diverged_of(t)] for t in diverged]
    return (f"<h2>diverged: {len(diverged)}</h2>"
            + (_table("diverged-trials", ["trial", "params", "why"], rows) if rows else ""))


def _table(table_id: str, headers: list[str], rows: list[list[str]], right: set[str] = frozenset(),
           bad: list[bool] | None = None) -> str:
    """Every header and cell escaped; a bad row (a silent worker's) in red."""
    def cell(tag: str, header: str, text: str) -> str:
        return f"<{tag}{' class=n' if header in right else ''}>{_e(text)}</{tag}>"

    head = "".join(cell("th", h, h) for h in headers)
    body = "".join(f"<tr{' class=bad' if bad and bad[i] else ''}>"
                   f"{''.join(cell('td', h, c) for h, c in zip(headers, row))}</tr>" for i, row in enumerate(rows))
    return f"<table id={table_id}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title><style>{STYLE}</style>"
            f"</head><body>{body}</body></html>")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
