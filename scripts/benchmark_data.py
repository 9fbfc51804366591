"""Data preparation benchmark: wall time per stage, pairs/s and peak memory of `prepare_data` on a corpus of N pairs.

    python scripts/benchmark_data.py --pairs 1000000                 # synthetic corpus built from the Tatoeba file
    python scripts/benchmark_data.py --corpus big.tsv                # an existing TSV corpus (data.format=tsv)
    python scripts/benchmark_data.py --pairs 200000 tokenizer.src_vocab_size=4000   # config overrides after the options

The synthetic corpus joins 1-3 random Tatoeba pairs on both sides of each line, so lines look real and nearly all
are distinct. Preparation runs in a fresh cache folder (nothing is reused), in a child process, so its memory is
measured alone. Preparation forks worker processes, so two figures are printed: the peak of the memory of the whole
process tree, sampled every 0.1 s as the sum of each process's proportional set size (PSS: a page shared by n
processes counts 1/n in each, so forked copies are not counted twice), and the largest single process's peak RSS
(`resource.getrusage`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seq2seq.paths import CONFIG_DIR, data_mirror  # noqa: E402

TATOEBA = Path("tatoeba-cmn-eng/cmn-eng.tsv")


def synthetic_corpus(source: Path, target: Path, pairs: int, seed: int = 0) -> None:
    """`pairs` lines, each joining 1-3 random lines of `source` (English side with spaces, Chinese side without)."""
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            rows.append((fields[0], fields[1]))
    rng = random.Random(seed)
    with open(target, "w", encoding="utf-8") as handle:
        for _ in range(pairs):
            picked = [rows[rng.randrange(len(rows))] for _ in range(rng.randint(1, 3))]
            handle.write(" ".join(en for en, _ in picked) + "\t" + "".join(zh for _, zh in picked) + "\n")


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_pss_mib(root: int) -> float:
    """Sum of the proportional set sizes of `root` and its descendants, in MiB (0 for processes that ended)."""
    total_kib = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                total_kib += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total_kib / 1024


class TreeMemory(threading.Thread):
    """Samples `tree_pss_mib(pid)` every `interval` seconds and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_mib = pid, interval, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak_mib = max(self.peak_mib, tree_pss_mib(self.pid))


def prepare(corpus: str, cache: str, overrides: list[str], result: str) -> None:
    """Child process: the real `prepare_data` with data.path=corpus, its stage times written to `result`."""
    import os

    os.environ["SEQ2SEQ_CACHE"] = cache
    from seq2seq.data.prepare import prepare_data
    from seq2seq.config import saved_config
    from seq2seq.runtime import cpu_name  # here, where torch is loaded anyway: the parent stays small

    cfg = OmegaConf.create(
        {"data": OmegaConf.load(CONFIG_DIR / "data" / "tatoeba_zh_en.yaml"), "tokenizer": {}}
    )
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"data.path={corpus}", *overrides]))
    prepared = prepare_data(saved_config(cfg), log=lambda message: print(message, file=sys.stderr))
    Path(result).write_text(json.dumps({
        "stages": prepared.stage_seconds, "read": prepared.report.read, "kept": prepared.report.kept,
        "splits": prepared.report.split_sizes, "cpu": cpu_name(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000, help="size of the synthetic corpus")
    parser.add_argument("--corpus", type=Path, help="benchmark this TSV file instead of a synthetic corpus")
    parser.add_argument("--workdir", type=Path, help="where the corpus and cache go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. tokenizer.src_vocab_size=4000")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        corpus = args.corpus
        if corpus is None:
            mirror = data_mirror()
            source = mirror / TATOEBA if mirror else ROOT / "data" / TATOEBA
            if not source.is_file():
                sys.exit(f"benchmark_data: {source} not found; set SEQ2SEQ_DATA_MIRROR or pass --corpus FILE.")
            corpus = Path(work) / f"synthetic_{args.pairs}.tsv"
            start = time.perf_counter()
            synthetic_corpus(source, corpus, args.pairs)
            print(f"built {corpus} ({args.pairs:,} pairs) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        result = Path(work) / "result.json"
        start = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(
            target=prepare, args=(str(corpus), str(Path(work) / "cache"), args.overrides, str(result))
        )
        child.start()
        memory = TreeMemory(child.pid)
        memory.start()
        child.join()
        wall = time.perf_counter() - start
        memory.done.set()
        if child.exitcode != 0:
            sys.exit(f"benchmark_data: preparation failed (exit status {child.exitcode}).")
        figures = json.loads(result.read_text())
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child, in KiB on Linux
    figures.update(
        wall_seconds=wall, pairs_per_second=figures["read"] / wall, peak_tree_pss_mib=memory.peak_mib,
        peak_process_rss_mib=peak_mib, cores=len(os.sched_getaffinity(0)),
    )
    print(f"input pairs      {figures['read']:,}")
    print(f"kept             {figures['kept']:,}  ({', '.join(f'{k} {v:,}' for k, v in figures['splits'].items())})")
    for stage, seconds in figures["stages"].items():
        print(f"  {stage:<22}{seconds:8.1f} s")
    print(f"wall             {wall:.1f} s (process start and imports included)")
    print(f"pairs/s          {figures['pairs_per_second']:,.0f}")
    print(f"peak memory      {memory.peak_mib:,.0f} MiB (all processes, PSS sampled every 0.1 s)")
    print(f"peak RSS         {peak_mib:,.0f} MiB (largest single process)")
    print(f"machine          {figures['cpu']}, {figures['cores']} cores")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
