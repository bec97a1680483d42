"""journal:/// stores: a half-written last op (a full disk, a kill mid-append, a truncated copy) never makes the
store unreadable or loses an acknowledged op; a file that is no journal is refused and left as it was."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys

import optuna
import pytest

from sweeper.errors import UserError
from sweeper.spec import spec_from_dict
from sweeper.storage import open_storage, open_store
from sweeper.study import create_study, enqueue


@pytest.fixture
def journal(tmp_path, spec_table):
    """A sweep's journal store, one point enqueued, whose last op is a study attr: (url, path, the file's bytes
    before that op, the op's line)."""
    path = tmp_path / "sweep.log"
    url = f"journal://{path}"
    store = open_store(url, create=True)
    study, _ = create_study(spec_from_dict(spec_table), store)
    enqueue(study, store, [{"learning_rate": 2e-4, "batch_size": 8}])
    before = path.read_bytes()
    study.set_user_attr("last", "op")
    return url, path, before, path.read_bytes()[len(before):]


def learning_rates(url: str) -> list[float]:
    return [t.system_attrs["fixed_params"]["learning_rate"]
            for t in optuna.load_study(study_name="demo", storage=open_storage(url)).trials]


def test_a_last_op_cut_at_any_byte_is_set_aside_and_the_store_goes_on(journal, caplog):
    url, path, before, last_line = journal
    for cut in range(len(last_line)):  # every length short of the whole line with its newline
        path.write_bytes(before + last_line[:cut])
        (path.parent / "sweep.log.torn").unlink(missing_ok=True)
        study = optuna.load_study(study_name="demo", storage=open_storage(url))
        assert learning_rates(url) == [2e-4] and "last" not in study.user_attrs  # it was never acknowledged
        study.set_user_attr("after", cut)  # the next write goes on: not glued onto the torn tail

        again = optuna.load_study(study_name="demo", storage=open_storage(url))
        assert again.user_attrs["after"] == cut and "last" not in again.user_attrs and learning_rates(url) == [2e-4]
        assert all(json.loads(line) for line in path.read_bytes().splitlines())  # every line a whole op
        torn = path.parent / "sweep.log.torn"
        assert (torn.read_bytes() == last_line[:cut] + b"\n") if cut else not torn.exists()  # kept, not deleted
    assert "its last op was only half written" in caplog.text


def test_an_append_killed_by_a_full_disk_is_one_line_and_the_next_one_works(journal, tmp_path):
    url, path, _, _ = journal

    def enqueue_cli(point: str, room: int | None = None):
        def fill_up():  # the file may grow only `room` bytes more: the write stops part-way, as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + room,) * 2)
        return subprocess.run([sys.executable, "-m", "sweeper.cli", "enqueue", "--store", url, "--study", "demo",
                               "--point", point], capture_output=True, text=True, preexec_fn=fill_up if room else None)

    failed = enqueue_cli("learning_rate=3e-4,batch_size=8", room=20)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
        f"Error: cannot write journal store {path}: File too large"]
    assert not path.read_bytes().endswith(b"\n")  # half an op is left
    assert enqueue_cli("learning_rate=4e-4,batch_size=8").returncode == 0
    assert enqueue_cli("learning_rate=5e-4,batch_size=16").returncode == 0
    assert learning_rates(url) == [2e-4, 4e-4, 5e-4]  # the point whose enqueue failed is not there, and said so


@pytest.mark.parametrize("content", [b"SQLite format 3\x00\xfb\x01\x02 not json\n", b"garbage\n{\"op_code\": 0}\n"])
def test_a_file_that_is_no_journal_is_refused_in_one_line_and_never_written(tmp_path, content):
    path = tmp_path / "x.log"
    path.write_bytes(content)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=f"^journal store {path} is not an Optuna journal, or is damaged before its "
                                        "last line .*; nothing was written to it$"):
        open_storage(f"journal://{path}")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and os.listdir(tmp_path) == ["x.log"]
