"""Quality per CPU-minute: train the default recipes one at a time, as a user would, and record what they reach.

    python scripts/benchmark_quality.py --minutes 24 model=rnn,bahdanau,transformer
    python scripts/benchmark_quality.py --baseline d7d39a1 model=transformer      # side by side with another commit

Each model is trained by its own `python -m seq2seq.train model=M trainer.time_limit_minutes=MINUTES` (plus any
other overrides given), alone on the machine: the command refuses to start when the 1-minute load average is above
--max-load, since a figure taken beside other work is noise. With --baseline REV the same runs are made, model by
model and back to back, from a `git worktree` of REV, so a change is judged against its predecessor on one machine
on one day. For every run it prints and appends to docs/results.md one dated row: the CPU (model, family, the flags
that decide the precision), precision, steps, real target tokens per step, target tokens/s, validation and test
BLEU / chrF, whether the averaged checkpoint won, the wall time of the whole command (data preparation and the
final test included), the peak resident memory of its whole process tree (sampled every 0.2 s), the highest
load average seen while it ran, and the machine's matrix-multiply speed just before and just after the run, in the
dtype `precision=auto` trains in on this CPU (bf16 where it has AMX / AVX512-BF16, else fp32). The last one is
there because a virtual machine's CPU can slow down with no load of its own to show (a busy host; on one Xeon VM
its bf16 speed fell by 40 % within an hour while fp32 held): when the two figures differ, or differ from another
row's, the rows are not comparable. Figures only; no test times
anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_HEADING = "## Quality per half hour (scripts/benchmark_quality.py)"
COLUMNS = (
    "date", "commit", "CPU", "precision", "model", "limit min", "steps", "tgt tok/step", "tgt tok/s", "valid BLEU",
    "valid chrF", "test BLEU", "test chrF", "best.pt", "wall min", "peak RSS GiB", "load start/max",
    "matmul TFLOP/s before/after",
)
# The median time of a 1024 x 1024 product on all of torch's threads, in the training dtype on this CPU, in a fresh
# process (~1 s); prints the speed and the dtype.
MATMUL_PROBE = """
import statistics, time, torch
from seq2seq.runtime import cpu_has_native_bf16
dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
for _ in range(5):
    a @ b
times = []
for _ in range(60):
    start = time.perf_counter(); a @ b; times.append(time.perf_counter() - start)
print(2 * 1024**3 / statistics.median(times) / 1e12, "bf16" if dtype == torch.bfloat16 else "fp32")
"""
DECIDING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; model=a,b,c trains each model in turn")
    parser.add_argument("--minutes", type=float, default=24.0, help="trainer.time_limit_minutes of every run")
    parser.add_argument("--baseline", metavar="REV", help="also train commit REV's defaults, back to back")
    parser.add_argument("--baseline-only", action="store_true",
                        help="train only REV's defaults (the current tree's rows were taken already)")
    parser.add_argument("--max-load", type=float, default=0.5, help="refuse to start above this 1-minute load")
    parser.add_argument("--force", action="store_true", help="start anyway on a busy machine (the row says so)")
    parser.add_argument("--runs", type=Path, default=None, help="run folders go here (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md", help="markdown file to append to")
    return parser.parse_args()


def split_models(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The models of a `model=a,b,c` override (default: the three families) and the remaining overrides."""
    models, rest = [], []
    for override in overrides:
        if override.startswith("model="):
            models += [name for name in override.split("=", 1)[1].split(",") if name]
        else:
            rest.append(override)
    return models or ["rnn", "bahdanau", "transformer"], rest


def cpu_description() -> str:
    """Model name, family/model numbers and the flags that decide `precision=auto`, e.g.
    "AMD EPYC 9R14 (family 25 model 17; avx2 avx512f avx512_bf16)"."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    shown = " ".join(flag for flag in DECIDING_FLAGS if flag in flags) or "no AVX2"
    return (f"{fields.get('model name', 'cpu')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')};"
            f" {os.cpu_count()} cores; {shown})")


def commit_of(checkout: Path) -> str:
    described = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return described + ("+changes" if dirty else "")


def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants now (threads' children included)."""
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the process ended between two reads
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


@dataclass
class Watch:
    """What a sampling thread saw of a running command: the peak tree RSS and the highest load average."""

    peak_rss: int = 0
    max_load: float = 0.0

    def follow(self, process: subprocess.Popen, interval: float = 0.2) -> None:
        while process.poll() is None:
            self.peak_rss = max(self.peak_rss, tree_rss_bytes(process.pid))
            self.max_load = max(self.max_load, os.getloadavg()[0])
            time.sleep(interval)


def train(checkout: Path, model: str, overrides: list[str], minutes: float, run_dir: Path) -> tuple[dict, float, Watch]:
    """One training command in `checkout` (its own code: PYTHONPATH points there); results.json, wall time, watch."""
    command = [
        sys.executable, "-m", "seq2seq.train", f"model={model}", f"trainer.time_limit_minutes={minutes:g}",
        *overrides, f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}
    print(f"$ {' '.join(command)}    (in {checkout})", flush=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    watch = Watch()
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=watch.follow, args=(process,), daemon=True)
        sampler.start()
        returncode = process.wait()
        sampler.join()
    wall = time.perf_counter() - start
    if returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        sys.exit(f"error: training {model} in {checkout} failed (exit {returncode}); log {log_path}:\n" + "\n".join(tail))
    return json.loads((run_dir / "results.json").read_text()), wall, watch


def matmul_speed() -> tuple[float, str]:
    """The machine's matrix-multiply speed now, TFLOP/s, and its dtype (MATMUL_PROBE): how fast this CPU runs at
    the moment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", MATMUL_PROBE], capture_output=True, text=True, check=True, env=env)
    speed, dtype = result.stdout.split()
    return float(speed), dtype


def row(results: dict, commit: str, cpu: str, minutes: float, wall: float, watch: Watch, load_start: float,
        speeds: tuple[tuple[float, str], tuple[float, str]]) -> list[str]:
    def score(key: str) -> str:
        value = results.get(key)
        return "-" if value is None else f"{value:.2f}"

    per_step = results.get("target_tokens_per_step")
    return [
        datetime.date.today().isoformat(), commit, cpu, results["precision"], results["model"], f"{minutes:g}",
        str(results["steps"]), "-" if per_step is None else f"{per_step:.0f}", f"{results['target_tokens_per_s']:.0f}",
        score("valid_bleu"), score("valid_chrf"), score("test_bleu"), score("test_chrf"),
        f"averaged (step {results['best_step']})" if results.get("averaged") else f"step {results['best_step']}",
        f"{wall / 60:.1f}", f"{watch.peak_rss / 2**30:.2f}", f"{load_start:.2f}/{watch.max_load:.2f}",
        f"{speeds[0][0]:.3f}/{speeds[1][0]:.3f} {speeds[0][1]}",
    ]


def append_rows(path: Path, rows: list[list[str]]) -> None:
    """Add the rows to the benchmark's table in `path`, creating the file, section, table and header when absent
    (the section may open with prose of its own; the table then follows it)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    lines = ["| " + " | ".join(cells) + " |" for cells in rows]
    header = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    if RESULTS_HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{RESULTS_HEADING}\n\n" + "\n".join(header + lines) + "\n"
    else:
        head, _, section = text.partition(RESULTS_HEADING)
        section_end = section.find("\n## ")
        body, rest = (section, "") if section_end < 0 else (section[:section_end], section[section_end:])
        table_at = body.find(header[0])
        if table_at < 0:
            body = body.rstrip("\n") + "\n\n" + "\n".join(header + lines) + "\n"
        else:
            # The table ends at its first line that is not a row, whatever follows it (prose, a heading).
            table_end = table_at
            while table_end < len(body) and body.startswith("|", table_end):
                next_line = body.find("\n", table_end)
                table_end = len(body) if next_line < 0 else next_line + 1
            after = body[table_end:]
            body = body[:table_end].rstrip("\n") + "\n" + "\n".join(lines) + "\n" + ("\n" + after.lstrip("\n") if after.strip() else "")
        text = head + RESULTS_HEADING + body + rest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def main() -> None:
    args = parse_args()
    models, overrides = split_models(args.overrides)
    load_start = os.getloadavg()[0]
    if load_start > args.max_load:
        message = (f"the 1-minute load average is {load_start:.2f} (above {args.max_load}): other work is running, "
                   "and figures taken beside it are noise")
        if not args.force:
            sys.exit(f"error: {message}. Stop it and wait, or pass --force to record a row marked with the load.")
        print(f"WARNING: {message}; --force given, the rows carry the load.", file=sys.stderr)
    cpu = cpu_description()
    runs = args.runs or Path(tempfile.mkdtemp(prefix="benchmark_quality_"))
    if args.baseline_only and not args.baseline:
        sys.exit("error: --baseline-only needs --baseline REV (the commit whose defaults to train)")
    checkouts = [] if args.baseline_only else [("current", ROOT)]
    baseline_dir = None
    if args.baseline:
        baseline_dir = Path(tempfile.mkdtemp(prefix="benchmark_baseline_")) / "checkout"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline_dir), args.baseline],
                       check=True, capture_output=True)
        checkouts.append(("baseline", baseline_dir))
    # Each commit is read before the first run: the rows this command appends to docs/results.md would make the
    # current tree look changed.
    commits = {label: commit_of(checkout) for label, checkout in checkouts}
    started = time.perf_counter()
    appended = 0
    try:
        for model in models:
            for label, checkout in checkouts:
                before = matmul_speed()
                results, wall, watch = train(checkout, model, overrides, args.minutes, runs / label / model)
                speeds = (before, matmul_speed())
                cells = row(results, commits[label], cpu, args.minutes, wall, watch, load_start, speeds)
                append_rows(args.results, [cells])  # at once: a later run that fails or is cut keeps this one
                appended += 1
                print(" | ".join(f"{name}: {value}" for name, value in zip(COLUMNS, cells)), flush=True)
    finally:
        if baseline_dir is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_dir)], check=False)
    print(f"{appended} row(s) appended to {args.results}; whole command {(time.perf_counter() - started) / 60:.1f} "
          f"min; run folders in {runs}")


if __name__ == "__main__":
    main()
