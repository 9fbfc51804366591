"""Side-by-side comparison of finished runs: a markdown table, BLEU by source length overlaid, and the models'
attention on the same sentences.

    python -m seq2seq.train -m model=rnn,bahdanau,transformer
    python scripts/compare.py runs/tatoeba_zh_en

Every `results.json` below the given folders is one run (the trainer writes it when a run ends); when a model was
trained several times, the newest run of each data/model pair is used unless --all is given. Writes
`comparison.md` and `bleu_by_length.png` into --out (default: the first folder given), and for each data set one
`attention_<data>_<n>.png` per sentence of `attention_examples` (from the runs' configs, see configs/train.yaml):
the runs' best checkpoints side by side, drawn and diagnosed as `python -m seq2seq.inspect` does, the diagnostics
appended to comparison.md. All of it is logged to TensorBoard under `<out>/comparison`, so
`tensorboard --logdir runs` shows it beside the runs. With --alignments PREFIX, comparison.md also gets the
attention AER of every run against PREFIX.tsv / PREFIX.align (scripts/reference_alignments.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from seq2seq.analysis import inspection  # noqa: E402
from seq2seq.analysis.diagnostics import COVERAGE_THRESHOLD  # noqa: E402
from seq2seq.training.board import add_figure  # noqa: E402
from seq2seq.errors import UsageError  # noqa: E402

COLUMNS = (
    ("run", "{}"),
    ("parameters", "{:,}"),
    ("train min", "{:.1f}"),
    ("steps", "{:,}"),
    ("tgt tokens/s", "{:,.0f}"),
    ("valid BLEU", "{:.1f}"),
    ("valid chrF", "{:.1f}"),
    ("test BLEU", "{:.1f}"),
    ("test chrF", "{:.1f}"),
)


def find_runs(folders: list[Path], keep_all: bool) -> list[dict]:
    runs = []
    for folder in folders:
        for path in sorted(folder.rglob("results.json")):
            result = json.loads(path.read_text())
            result["run_dir"] = path.parent
            runs.append(result)
    if not keep_all:
        newest: dict[tuple[str, str], dict] = {}
        for run in sorted(runs, key=lambda r: str(r["run_dir"])):
            newest[(run["data"], run["model"])] = run
        runs = list(newest.values())
    order = {"rnn": 0, "bahdanau": 1, "transformer": 2}
    return sorted(runs, key=lambda r: (r["data"], order.get(r["model"], 9), str(r["run_dir"])))


def run_label(run: dict, keep_all: bool) -> str:
    return f"{run['model']} ({run['run_dir'].name})" if keep_all else run["model"]


def markdown_table(runs: list[dict], keep_all: bool) -> str:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    lines = [header, rule]
    for run in runs:
        values = (
            run_label(run, keep_all), run["parameters"], run["train_minutes"], run["steps"],
            run["target_tokens_per_s"], run["valid_bleu"], run["valid_chrf"], run["test_bleu"], run["test_chrf"],
        )
        cells = ("n/a" if value is None else fmt.format(value) for (_, fmt), value in zip(COLUMNS, values))
        lines.append("| " + " | ".join(cells) + " |")
    datasets = sorted({run["data"] for run in runs})
    lines.append("")
    lines.append(f"Data: {', '.join(datasets)}. BLEU/chrF: sacreBLEU on detokenized output; test with the best "
                 "checkpoint (by validation BLEU) and the configured beam.")
    return "\n".join(lines)


def length_figure(runs: list[dict], keep_all: bool) -> plt.Figure:
    """BLEU against source length, one line per run: the shape of Bahdanau et al. (2015), Fig. 2."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for run in runs:
        buckets = run.get("test_bleu_by_length") or []
        labels = [b["bucket"] for b in buckets]
        ax.plot(labels, [b["bleu"] for b in buckets], marker="o", label=run_label(run, keep_all))
    ax.set_xlabel("source length (subword tokens)")
    ax.set_ylabel("test BLEU")
    ax.set_title("BLEU by source sentence length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def run_checkpoint(run: dict) -> Path | None:
    """The checkpoint a run's test used (best.pt), or its last one when training stopped before a best."""
    folder = Path(run["run_dir"]) / "checkpoints"
    return next((path for path in (folder / "best.pt", folder / "last.pt") if path.is_file()), None)


def attention_comparison(runs: list[dict], out: Path, writer: SummaryWriter) -> list[str]:
    """One side-by-side figure per attention example and data set; returns the markdown of the diagnostics."""
    markdown = []
    for data in sorted({run["data"] for run in runs}):
        paths = [path for run in runs if run["data"] == data and (path := run_checkpoint(run)) is not None]
        if not paths:
            print(f"compare: no checkpoints in the {data} runs; skipping the attention figures", file=sys.stderr)
            continue
        try:
            models = inspection.load_models(paths, torch.device("cpu"))
        except UsageError as error:
            print(f"compare: skipping the {data} attention figures: {error}", file=sys.stderr)
            continue
        examples = models[0][1].config.attention_examples
        for number, sentence in enumerate(examples):
            view = inspection.View()
            result = inspection.inspect_sentence(models, sentence, None, view, COVERAGE_THRESHOLD, None,
                                                 torch.device("cpu"))
            table = inspection.format_table(result.reports, result.agreement, COVERAGE_THRESHOLD)
            markdown += [f"### {data}: {sentence}", "", f"![attention](attention_{data}_{number}.png)", "",
                         "```", table, "```", ""]
            figure = inspection.comparison_figure(result.inspected, sentence, view, words=False)
            figure.savefig(out / f"attention_{data}_{number}.png")
            add_figure(writer, f"comparison/attention/{data}_{number}", figure, 0)
            code_block = "\n".join(f"    {line}" for line in table.splitlines())  # markdown: keep the columns
            writer.add_text(f"comparison/attention_diagnostics/{data}_{number}", code_block)
    return markdown


def alignment_table(runs: list[dict], prefix: Path, keep_all: bool) -> str:
    """Attention AER of every run's checkpoint on PREFIX.tsv / PREFIX.align (`seq2seq.evaluate --alignments` per
    model, in one markdown table): the explanation, map and extraction chosen on the first half of the pairs, and
    their AER, precision and recall on the second half."""
    from seq2seq.analysis.alignment import AlignmentError, read_alignment_set, score_checkpoint
    from seq2seq.checkpoint import load_model
    from seq2seq.data.corpus import CorpusError

    lines = ["| model | chosen on the first half | extraction | held-out AER | precision | recall | pairs |",
             "|---|---|---|---:|---:|---:|---:|"]
    for run in runs:
        path = run_checkpoint(run)
        if path is None:
            continue
        loaded = load_model(path, device=torch.device("cpu"))
        if not loaded.model.has_attention:
            lines.append(f"| {run_label(run, keep_all)} | no attention | | | | | |")
            continue
        try:
            selection, held_out = read_alignment_set(prefix, loaded.config.data).halves()
            report = score_checkpoint(loaded, selection, held_out, torch.device("cpu"))
        except (AlignmentError, CorpusError) as error:
            sys.exit(f"compare: --alignments: {error}")
        best = report.best
        scores = best["held_out"]
        lines.append(f"| {run_label(run, keep_all)} | {best['explanation']}, {best['map']} | {best['extraction']} | "
                     f"{100 * scores['aer']:.1f} | {100 * scores['precision']:.1f} | {100 * scores['recall']:.1f} | "
                     f"{report.pairs['selection']} + {report.pairs['held_out']} |")
    lines += ["", f"AER in percent (lower is better) against {prefix}.align: the map and extraction are chosen on the "
              "first half of the pairs and scored on the second; per explanation and extraction: python -m "
              f"seq2seq.evaluate --checkpoint C --tsv {prefix}.tsv --alignments {prefix}.align"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or folders that contain runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write comparison.md and the plot")
    parser.add_argument("--all", action="store_true", help="every run, not only the newest per model")
    parser.add_argument("--alignments", type=Path, metavar="PREFIX",
                        help="also the attention AER of each run on PREFIX.tsv + PREFIX.align "
                        "(scripts/reference_alignments.py writes them)")
    args = parser.parse_args()

    runs = find_runs(args.folders, args.all)
    if not runs:
        sys.exit(f"compare: no results.json under {', '.join(map(str, args.folders))}; "
                 "a run writes it when training ends.")
    out = args.out or args.folders[0]
    out.mkdir(parents=True, exist_ok=True)

    table = markdown_table(runs, args.all)
    figure = length_figure(runs, args.all)
    figure.savefig(out / "bleu_by_length.png")

    with SummaryWriter(log_dir=str(out / "comparison")) as writer:
        writer.add_text("comparison/table", table)
        writer.add_figure("comparison/bleu_by_length", figure)
        attention = attention_comparison(runs, out, writer)
    sections = [table, "", "## Attention", "", *attention] if attention else [table]
    if args.alignments is not None:
        alignment = alignment_table(runs, args.alignments, args.all)
        sections += ["", "## Alignment error rate of the attention", "", alignment]
        print(alignment)
    (out / "comparison.md").write_text("\n".join(sections) + "\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {out / 'comparison.md'}, {out / 'bleu_by_length.png'} and "
          f"{sum(line.startswith('![') for line in attention)} attention figure(s)", file=sys.stderr)


if __name__ == "__main__":
    main()
