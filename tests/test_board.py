"""What TensorBoard opens on, read back from the event files: the comparison layout (valid BLEU, loss, tokens/s, memory
of every run), and the test figures of one point each as a text summary and in the HPARAMS row, not as scalar
charts."""

from __future__ import annotations

import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from seq2seq.training import board

TRAINING_SCALARS = ["train/loss", "train/lr", "train/tokens_per_s", "valid/loss", "valid/bleu", "valid/chrf",
                    "system/resident_gib", "system/peak_resident_gib"]


def read_events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def comparison_layout(accumulator: EventAccumulator) -> layout_pb2.Layout:
    """The custom-scalars layout a run's events hold, as TensorBoard's plugin reads it."""
    (event,) = accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def chart_tags(layout: layout_pb2.Layout, tags: list[str]) -> dict[str, list[str]]:
    """Each chart's title -> the tags of `tags` its regular expressions draw."""
    return {chart.title: [tag for tag in tags if any(re.search(pattern, tag) for pattern in chart.multiline.tag)]
            for category in layout.category for chart in category.chart}


def test_a_run_opens_on_valid_bleu_loss_tokens_per_second_and_memory(tmp_path):
    writer = board.open_writer(tmp_path)
    for step in (5, 10):
        for tag in TRAINING_SCALARS:
            writer.add_scalar(tag, 1.0, step)
    writer.close()
    layout = comparison_layout(read_events(tmp_path))
    assert [category.title for category in layout.category] == ["compare runs"]
    assert chart_tags(layout, TRAINING_SCALARS) == {
        "valid BLEU": ["valid/bleu"],
        "loss (train and valid)": ["train/loss", "valid/loss"],
        "target tokens/s": ["train/tokens_per_s"],
        "resident memory (GiB)": ["system/resident_gib", "system/peak_resident_gib"],
    }


def test_a_resumed_writer_keeps_one_layout_and_continues_the_curves(tmp_path):
    writer = board.open_writer(tmp_path)
    for step in (5, 10, 15):
        writer.add_scalar("train/loss", float(step), step)
    writer.close()
    resumed = board.open_writer(tmp_path, purge_step=11)  # the run was killed after its step-10 checkpoint
    resumed.add_scalar("train/loss", 99.0, 15)
    resumed.close()
    accumulator = read_events(tmp_path)
    assert [(event.step, event.value) for event in accumulator.Scalars("train/loss")] == [(5, 5.0), (10, 10.0),
                                                                                          (15, 99.0)]
    assert comparison_layout(accumulator).category[0].title == "compare runs"


def test_test_scores_are_a_text_summary_not_scalar_charts(tmp_path):
    writer = board.open_writer(tmp_path)
    buckets = [{"bucket": "1-6", "count": 500, "bleu": 31.9}, {"bucket": "12+", "count": 480, "bleu": 13.7}]
    board.log_test(writer, {"bleu": 26.31, "chrf": 43.25}, buckets, 400)
    writer.close()
    accumulator = read_events(tmp_path)
    assert accumulator.Tags()["scalars"] == []
    (event,) = accumulator.Tensors("test/scores/text_summary")
    summary = event.tensor_proto.string_val[0].decode()
    assert summary.splitlines()[0] == "test BLEU 26.31, chrF 43.25"
    assert "| 1-6 | 500 | 31.90 |" in summary and "| 12+ | 480 | 13.70 |" in summary
