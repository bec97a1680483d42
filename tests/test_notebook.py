"""`sweeper notebook`: every template for every store kind, valid and secret-free; the local one run for real."""

from __future__ import annotations

import base64
import io
import json
import lzma
import re
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner

import sweeper

from sweeper.cli import cli
from sweeper.notebook import render
from worker_log import foreign_lines

PASSWORD = "pg-Secret-42"
STORES = {
    "sqlite": "sqlite:////tmp/sweeps.db",
    "journal": "journal:///tmp/sweeps.log",
    "gsheets": "gsheets://1AbCdEfGhIjKlMnOpQrStUvWxYz",
    "drive": "drive:///content/drive/MyDrive/sweeps/x",
    "postgresql": f"postgresql://bob:{PASSWORD}@db.example.com:5432/sweeps",
}


def parameters(nb: nbformat.NotebookNode) -> dict:
    """The values the notebook's parameters cell sets."""
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    values: dict = {}
    exec(cell.source, {}, values)
    return values


REACHABLE = {"colab": ["gsheets", "drive", "postgresql"], "kaggle": ["gsheets", "postgresql"], "local": list(STORES)}


def cell_values(nb: nbformat.NotebookNode, cell_id: str) -> dict:
    values: dict = {}
    exec(next(c for c in nb.cells if c.get("id") == cell_id).source, {}, values)
    return values


@pytest.mark.parametrize("platform, kind", [(p, k) for p, kinds in REACHABLE.items() for k in kinds])
def test_every_template_renders_valid_and_without_secrets_for_every_store_it_can_reach(platform, kind):
    store = STORES[kind]
    nb = render(platform, store, "demo", account="ana", max_trials=3)
    text = nbformat.writes(nb)
    nbformat.validate(nbformat.reads(text, as_version=4))
    assert PASSWORD not in text

    values = parameters(nb)
    assert values["store"] == (None if kind == "postgresql" else store)
    assert (values["study"], values["account"], values["max_trials"], values["per_gpu"]) == ("demo", "ana", 3, True)
    assert values["secrets"] == {"postgresql": ["SWEEPER_STORE"], "gsheets": ["SWEEPER_GSHEETS_CREDENTIALS"]}.get(kind, [])
    assert values["allow_cpu"] is False
    carried = cell_values(nb, "sweeper-code")
    assert carried["rendered_by"] == sweeper.__version__
    if platform == "local":  # the package is installed here already
        assert values["install"] == "" and carried["wheel_xz_base64"] is None
    else:  # this install's own code rides in the notebook: never PyPI's unrelated `sweeper`
        assert values["install"] is None and carried["wheel_name"].startswith("sweeper_qlora-")
        wheel_bytes = lzma.decompress(base64.b64decode(carried["wheel_xz_base64"]))
        assert zipfile.ZipFile(io.BytesIO(wheel_bytes)).read("sweeper/__init__.py") == Path(sweeper.__file__).read_bytes()
    ids = [c.get("id") for c in nb.cells]
    assert ids == ["intro", "parameters", "sweeper-code", "install", "check", "secrets", "gpu", "worker"] \
        + (["flush"] if platform == "colab" else [])
    code = "\n".join(c.source for c in nb.cells)
    assert "run_workers_per_gpu(" in code and "require_gpu(platform, allow_cpu)" in code
    assert "sweeper[" not in code and "flush_and_unmount" not in next(c.source for c in nb.cells if c.get("id") == "worker")
    if platform == "colab":
        assert (nb.metadata.accelerator, nb.metadata.colab.gpuType) == ("GPU", "T4")
    if platform == "kaggle":
        assert nb.metadata.kaggle.isInternetEnabled and nb.metadata.kaggle.isGpuEnabled
    if kind == "postgresql":
        assert "postgresql://bob:***@db.example.com:5432/sweeps: read from the secret SWEEPER_STORE" in code


@pytest.mark.parametrize("platform, store, error", [
    ("colab", "sqlite:////tmp/sweeps.db", "a Colab notebook cannot reach sqlite:////tmp/sweeps.db: that store is a "
                                          "file on this machine; use gsheets://"),
    ("kaggle", "journal:///tmp/sweeps.log", "a Kaggle notebook cannot reach journal:///tmp/sweeps.log"),
    ("kaggle", STORES["drive"], "Kaggle cannot mount Google Drive, so it cannot use a drive:// store; use gsheets://"),
    ("colab", "drive:///home/ana/sweeps", "a Colab notebook sees Google Drive under /content/drive"),
])
def test_a_store_the_notebook_cannot_reach_is_refused_in_one_line(platform, store, error, tmp_path):
    out = tmp_path / "x.ipynb"
    result = CliRunner().invoke(cli, ["notebook", "--platform", platform, "--store", store, "-o", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"Error: {error}") and not out.exists()


def test_the_carried_code_cell_is_collapsed_and_its_wheel_compressed_whole():
    import base64
    import lzma

    from sweeper import wheel

    for platform in ("colab", "kaggle"):
        nb = render(platform, STORES["gsheets"], "demo")
        cell = next(c for c in nb.cells if c.id == "sweeper-code")
        assert cell.metadata["cellView"] == "form" and cell.metadata["jupyter"]["source_hidden"] is True
        assert cell.source.startswith("#@title ")  # what Colab shows in its place
        carried = cell_values(nb, "sweeper-code")["wheel_xz_base64"]
        assert lzma.decompress(base64.b64decode(carried)) == wheel.build(stored=True)[1]
        assert len(carried) < 0.75 * len(base64.b64encode(wheel.build()[1]))  # than the deflated wheel's base64


def test_the_colab_notebook_states_colabs_terms_as_colab_states_them():
    intro = render("colab", STORES["gsheets"], "demo").cells[0].source
    assert "several accounts" in intro and '"running distributed computing workers"' in intro
    assert "paid Colab tier" in intro and "Kaggle or your own machines" in intro  # what is allowed instead


def test_a_password_in_the_query_also_goes_to_a_secret():
    nb = render("colab", "mysql://db.example.com/sweeps?user=bob&password=hunter22", "demo")
    assert "hunter22" not in nbformat.writes(nb) and parameters(nb)["secrets"] == ["SWEEPER_STORE"]


def test_install_may_name_a_requirement_that_holds_no_credential():
    url = "sweeper-qlora[runner] @ git+https://github.com/team/sweeper@v0.1.0"
    nb = render("kaggle", STORES["gsheets"], "demo", install=url)
    assert parameters(nb)["install"] == url and cell_values(nb, "sweeper-code")["wheel_xz_base64"] is None
    with pytest.raises(Exception, match="holds a credential"):
        render("kaggle", STORES["gsheets"], "demo", install="sweeper-qlora @ git+https://ghp_token123@github.com/team/sweeper")


def test_notebook_command_writes_the_file_and_names_the_secrets(tmp_path):
    out = tmp_path / "runner.ipynb"
    result = CliRunner().invoke(cli, ["notebook", "--platform", "kaggle", "--store", STORES["postgresql"], "--study", "demo",
                                      "--account", "ana", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "it reads the secrets SWEEPER_STORE" in result.stderr
    assert PASSWORD not in out.read_text() and PASSWORD not in result.output
    nbformat.validate(nbformat.read(str(out), as_version=4))


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A Jupyter kernel that runs this interpreter, whatever kernels the machine has installed."""
    folder = tmp_path / "jupyter" / "kernels" / "sweeper-test"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sweeper test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU, on any machine
    for name in ("SWEEPER_STORE", "SWEEPER_STUDY", "SWEEPER_ACCOUNT", "SWEEPER_DEADLINE_HOURS"):
        monkeypatch.delenv(name, raising=False)
    return "sweeper-test"


def test_the_local_notebook_runs_a_real_trial_on_a_jupyter_kernel(kernel, tmp_path):
    import optuna
    from nbclient import NotebookClient

    from runner.demo import prepare_demo
    from sweeper.spec import load_spec
    from sweeper.study import create_study

    sweep = prepare_demo(tmp_path / "demo", n_trials=4)
    sweep.write_text(sweep.read_text().replace("train_tokens = 60_000", "train_tokens = 4_000").replace("evals = 4", "evals = 2"))
    store = f"sqlite:///{tmp_path / 'sweeps.db'}"
    create_study(load_spec(sweep), store)
    nb = render("local", store, "demo", account="nb", max_trials=1, checkpoint_root=str(tmp_path / "ck"))

    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {c.id: text_of(nb, c.id) for c in nb.cells if c.cell_type == "code"}
    assert outputs["install"].strip() == ""  # skipped: the package is already here
    assert "platform: local; GPU: 0 x cpu" in outputs["gpu"] and "workers: 1; account: nb" in outputs["gpu"]
    assert "  preflight bitsandbytes: pass" in outputs["gpu"]  # the device checked before any worker claims
    assert "trial 0 complete: eval loss" in outputs["worker"] and "trials [0]; stopped: ran --max-trials 1" in outputs["worker"]
    assert foreign_lines(outputs["gpu"] + "\n" + outputs["worker"]) == []  # no library chatter in the user's notebook
    assert re.search(r"trial 0: +\d+%\|", outputs["worker"])  # a person watches a notebook: a progress bar per trial
    (trial,) = optuna.load_study(study_name="demo", storage=store).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["worker"]["account"] == "nb"
    assert [p.name.startswith("demo-") for p in (tmp_path / "ck").iterdir()] == [True]  # the study's own folder


# ---------------------------------------------------------------------------------------------
# The Colab and Kaggle notebooks on a real kernel, under stand-ins of google.colab and kaggle_secrets
# (tests/platforms), against a gsheets:// store served by the fake Sheets API.


@pytest.fixture
def sheet_study(tmp_path, monkeypatch):
    """A demo study on a fake Google Sheet; the service-account key is left for the test to put in a secret."""
    from sheets_server import FakeSheets

    from runner.demo import prepare_demo
    from sweeper.spec import load_spec
    from sweeper.storage.gsheets.auth import CREDENTIALS_ENV
    from sweeper.study import create_study

    with FakeSheets() as fake:
        account = fake.add_service_account()
        store = f"gsheets://{fake.add_spreadsheet(editors=[account['client_email']])}"
        # A busy machine must not turn into timeouts: these tests are about the notebook, not Google's latency.
        for name, value in {"ENDPOINT": fake.url, "SETTLE_S": "0.05", "SYNC_S": "0.3", "TIMEOUT_S": "60"}.items():
            monkeypatch.setenv(f"SWEEPER_GSHEETS_{name}", value)
        sweep = prepare_demo(tmp_path / "demo", n_trials=4)
        sweep.write_text(sweep.read_text().replace("train_tokens = 60_000", "train_tokens = 4_000").replace("evals = 4", "evals = 2"))
        monkeypatch.setenv(CREDENTIALS_ENV, json.dumps(account))
        create_study(load_spec(sweep), store)
        monkeypatch.delenv(CREDENTIALS_ENV)  # from here on, only the notebook platform's secret holds it
        yield store, json.dumps(account)


def notebook_for(platform: str, store: str, tmp_path, monkeypatch, **changes):
    # An hour from now, whenever this machine booted (a session's own hours count from its container's start).
    monkeypatch.setenv("SWEEPER_DEADLINE_HOURS", "1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "platforms"))  # the stand-in platform modules
    return render(platform, store, "demo", account="nb", max_trials=1, checkpoint_root=str(tmp_path / "ck"),
                  install="", **changes)  # install "": the test's own sweeper, not a pip install


def run_cells(nb, kernel: str, tmp_path, runs: int = 1) -> dict | None:
    """Run all, `runs` times in one kernel; the error output of the cell that stopped it, or None."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for _ in range(runs):
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError:
                    return next(o for o in cell.outputs if o.output_type == "error") | {"cell": cell.id}
    return None


def text_of(nb, cell_id: str) -> str:
    """A cell's printed text; its stdout and stderr pieces (a progress bar's, say) on lines of their own."""
    return "\n".join(o.get("text", "") for o in next(c for c in nb.cells if c.get("id") == cell_id).outputs)


@pytest.mark.parametrize("platform", ["colab", "kaggle"])
def test_run_all_twice_on_a_kernel_reads_the_secret_and_runs_a_trial_each_time(platform, request, kernel, sheet_study,
                                                                                 tmp_path, monkeypatch):
    import optuna

    from sweeper.storage import open_storage

    store, key = sheet_study
    request.getfixturevalue(f"on_{platform}").secrets(SWEEPER_GSHEETS_CREDENTIALS=key)
    nb = notebook_for(platform, store, tmp_path, monkeypatch, allow_cpu=True)

    assert run_cells(nb, kernel, tmp_path, runs=2) is None  # a second Run all in the same kernel is safe too

    name = platform.capitalize()
    assert text_of(nb, "check").strip() == f"sweeper {sweeper.__version__}"
    assert text_of(nb, "secrets").strip() == f"SWEEPER_GSHEETS_CREDENTIALS: from the {name} secret SWEEPER_GSHEETS_CREDENTIALS"
    assert f"platform: {platform}; GPU: 0 x cpu" in text_of(nb, "gpu")
    worker = text_of(nb, "worker")
    assert "trial 1 complete: eval loss" in worker and "stopped: ran --max-trials 1" in worker
    assert foreign_lines(text_of(nb, "gpu") + "\n" + worker) == []
    assert json.loads(key)["private_key"].splitlines()[1] not in nbformat.writes(nb)  # nothing secret in any output
    monkeypatch.setenv("SWEEPER_GSHEETS_CREDENTIALS", key)
    trials = optuna.load_study(study_name="demo", storage=open_storage(store)).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.user_attrs["worker"]["platform"] for t in trials} == {platform}


@pytest.mark.parametrize("platform, set_up, cell, error", [
    ("colab", {}, "secrets", "Error: the Google login was declined or failed: run this cell again and allow access"),
    ("colab", {"secret": ("key", False)}, "secrets",
     "Error: the Colab secret SWEEPER_GSHEETS_CREDENTIALS exists but this notebook may not read it"),
    ("colab", {"secret": "key", "gpu": "none"}, "gpu",
     "Error: this Colab session has no GPU: Runtime > Change runtime type > T4 GPU (or another GPU), then Run all"),
    ("kaggle", {}, "secrets", "Error: no secret SWEEPER_GSHEETS_CREDENTIALS: attach a Kaggle secret named "
                              "SWEEPER_GSHEETS_CREDENTIALS to this notebook (Add-ons > Secrets), then run again"),
    ("kaggle", {"secret": "key", "internet": "off"}, "secrets",
     "Error: Kaggle's secrets service is unreachable: turn on Settings > Internet, then run again"),
    ("kaggle", {"secret": "key", "gpu": "none"}, "gpu", "Error: this Kaggle session has no GPU: Settings > Accelerator"),
])
def test_each_failure_a_user_can_cause_in_a_notebook_is_one_line(platform, set_up, cell, error, request, kernel,
                                                                   sheet_study, tmp_path, monkeypatch):
    store, key = sheet_study
    on = request.getfixturevalue(f"on_{platform}")
    if "secret" in set_up:
        secret = set_up["secret"]
        on.secrets(SWEEPER_GSHEETS_CREDENTIALS=(key, secret[1]) if isinstance(secret, tuple) else key)
    if set_up.get("internet") == "off":
        monkeypatch.setenv("SWEEPER_FAKE_KAGGLE_INTERNET", "off")
    nb = notebook_for(platform, store, tmp_path, monkeypatch)  # allow_cpu False: this machine has no GPU

    failed = run_cells(nb, kernel, tmp_path)

    assert failed is not None and failed["cell"] == cell
    assert failed["ename"] == "SystemExit" and failed["evalue"].startswith(error) and "\n" not in failed["evalue"]
    assert json.loads(key)["private_key"].splitlines()[1] not in nbformat.writes(nb)


def test_the_code_a_notebook_carries_installs_in_a_fresh_venv_with_no_index(tmp_path):
    import subprocess
    import sysconfig

    nb = render("kaggle", STORES["gsheets"], "demo")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    # No index to fetch from: the dependencies come from this test's environment, sweeper only from the notebook.
    (target / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)  # torch needs a newer one
    script = tmp_path / "cells.py"
    script.write_text("\n".join(c.source for c in nb.cells if c.get("id") in ("parameters", "sweeper-code", "install",
                                                                             "check")))
    done = subprocess.run([python, script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PIP_NO_INDEX": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"sweeper {sweeper.__version__}"  # the install itself printed nothing
    wheel_name = cell_values(nb, "sweeper-code")["wheel_name"]
    where = subprocess.run([python, "-c", "import importlib.metadata as m, runner, sweeper; "
                                          "print(sweeper.__file__, runner.__file__, m.version('sweeper-qlora'))"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert all(path.startswith(str(target)) for path in where[:2]) and where[2] == wheel_name.split("-")[1]
    # Installed from a wheel, it finds its templates and renders a notebook that carries the same code again.
    done = subprocess.run([venv / "bin" / "sweeper", "notebook", "--platform", "kaggle", "--store", STORES["gsheets"],
                           "-o", "again.ipynb"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert cell_values(nbformat.read(tmp_path / "again.ipynb", as_version=4), "sweeper-code")["wheel_name"] == wheel_name


def test_rendering_for_a_study_the_store_does_not_hold_warns(pg_store, tmp_path):
    out = tmp_path / "runner.ipynb"
    result = CliRunner().invoke(cli, ["notebook", "--platform", "kaggle", "--store", pg_store, "--study", "typo",
                                      "-o", str(out)])
    assert result.exit_code == 0 and out.exists()  # a warning: the notebook is still written
    assert "holds no study, not study 'typo': run sweeper init first" in result.stderr
    password = pg_store.split(":")[2].split("@")[0]
    assert f":{password}@" not in result.stderr and ":***@" in result.stderr  # the password stays out
