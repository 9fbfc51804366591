"""scripts/benchmark_quality.py: refuses a busy machine, records one row per run (also for a baseline commit), and
keeps docs/results.md's other sections. It measures; these tests check only what it records, never a speed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_quality.py"
spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
benchmark_quality = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(benchmark_quality)


def test_rows_go_into_the_benchmark_table_and_leave_other_sections_alone(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n## Decoding\n\nsome figures\n")
    cells = [str(i) for i in range(len(benchmark_quality.COLUMNS))]
    benchmark_quality.append_rows(results, [cells])
    results.write_text(results.read_text() + "\n## Later section\n\nkept\n")
    benchmark_quality.append_rows(results, [["x"] * len(cells), ["y"] * len(cells)])
    text = results.read_text()
    assert text.count(benchmark_quality.RESULTS_HEADING) == 1 and "some figures" in text
    table = text.split(benchmark_quality.RESULTS_HEADING)[1].split("## Later section")[0].strip().splitlines()
    assert table[0].startswith("| date | commit | CPU |") and len(table) == 5
    assert table[2:] == ["| " + " | ".join(cells) + " |", "| " + " | ".join("x" * len(cells)) + " |",
                         "| " + " | ".join("y" * len(cells)) + " |"]
    assert text.rstrip().endswith("kept")


def test_a_section_that_opens_with_prose_gets_its_table_after_it(tmp_path):
    """docs/results.md's section explains the columns before any row: the first row brings the header."""
    results = tmp_path / "results.md"
    heading = benchmark_quality.RESULTS_HEADING
    results.write_text(f"# Results\n\n{heading}\n\nHow to read it.\n\n## Next\n\nkept\n")
    cells = ["c"] * len(benchmark_quality.COLUMNS)
    benchmark_quality.append_rows(results, [cells])
    benchmark_quality.append_rows(results, [["d"] * len(cells)])
    section = results.read_text().split(heading)[1].split("## Next")[0]
    assert section.strip().splitlines()[0] == "How to read it."
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table[0].startswith("| date | commit |") and table[2:] == [
        "| " + " | ".join(cells) + " |", "| " + " | ".join("d" * len(cells)) + " |"]
    assert results.read_text().rstrip().endswith("kept")


def test_text_written_right_under_the_table_stays_below_the_new_rows(tmp_path):
    """A sub-heading or a note typed on the line after the last row (no blank line) is not part of the table: rows
    land above it, never inside the prose."""
    results = tmp_path / "results.md"
    heading = benchmark_quality.RESULTS_HEADING
    cells = ["c"] * len(benchmark_quality.COLUMNS)
    benchmark_quality.append_rows(results, [cells])
    results.write_text(results.read_text().rstrip("\n") + "\n### A later note\nIt reads the rows above.\n- a point\n")
    benchmark_quality.append_rows(results, [["d"] * len(cells)])
    lines = results.read_text().split(heading)[1].strip().splitlines()
    rows = [number for number, line in enumerate(lines) if line.startswith("|")]
    assert rows == list(range(rows[0], rows[0] + 4)), "the table's rows are no longer contiguous"
    assert lines[rows[-1]] == "| " + " | ".join("d" * len(cells)) + " |"
    assert lines[rows[-1] + 1:] == ["", "### A later note", "It reads the rows above.", "- a point"]


def test_model_sweep_is_split_from_the_other_overrides():
    assert benchmark_quality.split_models(["model=rnn,transformer", "trainer.max_tokens=900"]) == (
        ["rnn", "transformer"], ["trainer.max_tokens=900"])
    assert benchmark_quality.split_models([])[0] == ["rnn", "bahdanau", "transformer"]


def test_a_busy_machine_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--max-load", "-1", "--runs", str(tmp_path / "runs"),
         "--results", str(tmp_path / "results.md"), "model=rnn"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and "load average" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results.md").exists()


def test_tree_rss_counts_children():
    """A child holding 200 MiB: counted in its own figure and in its parent's tree."""
    child = subprocess.Popen([sys.executable, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
                              "print(flush=True); import time; time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # the memory is touched
        own = benchmark_quality.tree_rss_bytes(child.pid)
        assert own >= 200 * 2**20
        assert benchmark_quality.tree_rss_bytes(os.getpid()) >= own + 10 * 2**20  # this process and its child
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_current_and_baseline_runs_each_record_a_row(ws, tmp_path):
    """Two tiny runs, this checkout and a worktree of HEAD, back to back: a row each, with what results.json says."""
    results = tmp_path / "results.md"
    command = [
        sys.executable, str(SCRIPT), "--force", "--minutes", "0.05", "--baseline", "HEAD",
        "--runs", str(tmp_path / "runs"), "--results", str(results), "model=tiny_rnn",
        *(override for override in ws.overrides if not override.startswith("attention_examples")),
    ]
    result = subprocess.run(command, cwd=ws.root, env=ws.env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2
    head = subprocess.run(["git", "-C", str(SCRIPT.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert [line.split("|")[2].strip() for line in rows][1] == head  # the baseline worktree of HEAD, unchanged
    for line, label in zip(rows, ("current", "baseline")):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        record = dict(zip(benchmark_quality.COLUMNS, cells))
        assert record["model"] == "rnn" and int(record["steps"]) > 0 and float(record["peak RSS GiB"]) > 0.1
        assert record["precision"] in ("fp32", "bf16") and "cores" in record["CPU"]
        speeds, dtype = record["matmul TFLOP/s before/after"].split()
        assert all(float(speed) > 0.001 for speed in speeds.split("/")) and dtype in ("fp32", "bf16")
        assert (tmp_path / "runs" / label / "tiny_rnn" / "results.json").is_file()
