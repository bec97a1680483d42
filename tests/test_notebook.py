"""`sweeper notebook`: every template for every store kind, valid and secret-free; the local one run for real."""

from __future__ import annotations

import json
import sys

import nbformat
import pytest
from click.testing import CliRunner

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


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("platform", ["colab", "kaggle", "local"])
def test_every_template_renders_valid_and_without_secrets_for_every_store(platform, kind):
    store = STORES[kind]
    if platform == "kaggle" and kind == "drive":
        with pytest.raises(Exception, match="Kaggle cannot mount Google Drive"):
            render(platform, store, "demo")
        return
    nb = render(platform, store, "demo", account="ana", max_trials=3)
    text = nbformat.writes(nb)
    nbformat.validate(nbformat.reads(text, as_version=4))
    assert PASSWORD not in text

    values = parameters(nb)
    assert values["store"] == (None if kind == "postgresql" else store)
    assert (values["study"], values["account"], values["max_trials"], values["per_gpu"]) == ("demo", "ana", 3, True)
    assert values["secrets"] == {"postgresql": ["SWEEPER_STORE"], "gsheets": ["SWEEPER_GSHEETS_CREDENTIALS"]}.get(kind, [])
    assert values["install"] == ("" if platform == "local" else "sweeper[runner]==0.1.0")
    ids = [c.get("id") for c in nb.cells]
    assert ids == ["intro", "parameters", "install", "secrets", "gpu", "worker"]
    code = "\n".join(c.source for c in nb.cells)
    assert "run_workers_per_gpu(" in code and "detect(" in code
    if platform == "colab":
        assert "auth.authenticate_user()" in code and 'drive.mount("/content/drive")' in code
    if platform == "kaggle":
        assert "UserSecretsClient()" in code and "get_secret(name)" in code
        assert nb.metadata.kaggle.isInternetEnabled and nb.metadata.kaggle.isGpuEnabled
    if kind == "postgresql":
        assert "postgresql://bob:***@db.example.com:5432/sweeps: read from the secret SWEEPER_STORE" in code


def test_a_password_in_the_query_also_goes_to_a_secret():
    nb = render("colab", "mysql://db.example.com/sweeps?user=bob&password=hunter22", "demo")
    assert "hunter22" not in nbformat.writes(nb) and parameters(nb)["secrets"] == ["SWEEPER_STORE"]


def test_install_is_pinned_or_given_and_never_holds_a_credential():
    url = "sweeper[runner] @ git+https://github.com/team/sweeper@v0.1.0"
    assert parameters(render("kaggle", STORES["gsheets"], "demo", install=url))["install"] == url
    with pytest.raises(Exception, match="holds a credential"):
        render("kaggle", STORES["gsheets"], "demo", install="sweeper @ git+https://ghp_token123@github.com/team/sweeper")


def test_notebook_command_writes_the_file_and_names_the_secrets(tmp_path):
    out = tmp_path / "runner.ipynb"
    result = CliRunner().invoke(cli, ["notebook", "--platform", "kaggle", "--store", STORES["postgresql"], "--study", "demo",
                                      "--account", "ana", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "it reads the secrets SWEEPER_STORE" in result.stderr
    assert PASSWORD not in out.read_text() and PASSWORD not in result.output
    nbformat.validate(nbformat.read(str(out), as_version=4))


def test_notebook_command_refuses_a_drive_store_on_kaggle_in_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["notebook", "--platform", "kaggle", "--store", STORES["drive"], "-o",
                                      str(tmp_path / "x.ipynb")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: Kaggle cannot mount Google Drive, so it cannot use a drive:// store; use gsheets:// "
        "(README: A Google Sheet as the store)"]
    assert not (tmp_path / "x.ipynb").exists()


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
    sweep.write_text(sweep.read_text().replace("train_tokens = 60_000", "train_tokens = 4_000"))
    store = f"sqlite:///{tmp_path / 'sweeps.db'}"
    create_study(load_spec(sweep), store)
    nb = render("local", store, "demo", account="nb", max_trials=1, checkpoint_root=str(tmp_path / "ck"))

    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {c.id: "".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells if c.cell_type == "code"}
    assert outputs["install"].strip() == ""  # skipped: the package is already here
    assert "platform: local; GPU: 0 x cpu" in outputs["gpu"] and "workers: 1; account: nb" in outputs["gpu"]
    assert "trial 0 complete: eval loss" in outputs["worker"] and "trials [0]; stopped: ran --max-trials 1" in outputs["worker"]
    assert foreign_lines(outputs["gpu"] + "\n" + outputs["worker"]) == []  # no library chatter in the user's notebook
    (trial,) = optuna.load_study(study_name="demo", storage=store).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["worker"]["account"] == "nb"
    assert (tmp_path / "ck" / "demo").is_dir()
