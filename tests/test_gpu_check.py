"""bench/gpu_check.py, the GPU truth table: with --cpu every part runs end to end on the CPU and none fails."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
ROWS = ["preflight", "trainer vs plain HF", "fused kernels on and off", "kept base memory", "micro-batch probe",
        "OOM back-off", "two GPUs"]


def gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[int, tuple[str, str]]]:
    """Run it (a hang guard, not a time limit: the budget is the script's) and read its table: {row: (part, result)}."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(tmp_path / "table.md"),
                           "--json", str(tmp_path / "figures.json"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    rows = {}
    for line in (tmp_path / "table.md").read_text().splitlines() if (tmp_path / "table.md").exists() else []:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows[int(cells[0])] = (cells[1], cells[-1])
    return done, rows


def test_every_part_of_the_gpu_truth_table_runs_on_the_cpu_and_none_fails(tmp_path):
    done, rows = gpu_check(tmp_path, "--budget-s", "100000")  # no part left out for a slow machine

    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("GPU truth table (CPU proxy): CPU") and table in done.stdout
    assert [rows[number][0] for number in sorted(rows)] == ROWS
    for number, (part, result) in rows.items():
        assert result == "pass" or result.startswith("n/a: "), (number, part, result)
    assert rows[3][1] == "n/a: Liger Kernel runs on CUDA GPUs only"

    figures = {row["number"]: row["figures"] for row in json.loads((tmp_path / "figures.json").read_text())["rows"]}
    trainer, oom, two = figures[2]["fp32"], figures[6], figures[7]
    assert all(math.isfinite(x) and x > 0 for x in (trainer["ours"]["tokens_per_s"], trainer["baseline"]["tokens_per_s"],
                                                    trainer["ratio"], *figures[4]["eval_losses"]))
    assert oom["backed_off_to"] < oom["largest"] and math.isfinite(oom["loss"])
    assert all(math.isfinite(x) for x in two["eval_losses"]) and len(two["eval_losses"]) == 2
    assert figures[1]["ok"] and all(math.isfinite(check["seconds"]) for check in figures[1]["checks"])


def test_parts_past_the_time_budget_are_listed_as_not_run(tmp_path):
    done, rows = gpu_check(tmp_path, "--budget-s", "0")

    assert done.returncode == 0, done.stderr[-5000:]
    assert [rows[number] for number in sorted(rows)] == [(part, "not run: time budget") for part in ROWS]
