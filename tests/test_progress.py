"""What a user sees at the end of a trial: progress of long decoding passes on a terminal, and a "time left"
that follows the step budget when it ends before the time limit."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import pytest

from seq2seq.inference.predict import with_progress
from seq2seq.training.trainer import Trainer


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, shown", [(_Terminal(), True), (io.StringIO(), False)])
def test_decoding_progress_goes_to_a_terminal_only(monkeypatch, stream, shown):
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(with_progress(iter(["a", "b", "c"]), 3, "testing")) == ["a", "b", "c"]
    assert ("testing:" in stream.getvalue() and "/3 [" in stream.getvalue()) is shown
    assert (stream.getvalue() == "") is not shown


def fake_trainer(max_steps: int | None, minutes: float | None, elapsed: float) -> SimpleNamespace:
    return SimpleNamespace(tcfg=SimpleNamespace(time_limit_minutes=minutes), total_steps=max_steps,
                           _elapsed=lambda: elapsed)


def test_time_left_is_the_step_budget_when_it_ends_first():
    """trainer.max_steps=50 with the 24-minute default: 40 steps left at 0.5 s each is 20 s, not 23.5 minutes."""
    assert Trainer._time_left(fake_trainer(50, 24, elapsed=30.0), step=10, seconds_per_step=0.5) == pytest.approx(20.0)
    assert Trainer._time_left(fake_trainer(20_000, 24, elapsed=60.0), 10, 0.5) == pytest.approx(23 * 60)
    assert Trainer._time_left(fake_trainer(None, 24, elapsed=60.0), 10, 0.5) == pytest.approx(23 * 60)
    assert Trainer._time_left(fake_trainer(50, None, elapsed=0.0), 50, 0.5) == 0.0
    assert Trainer._time_left(fake_trainer(None, None, elapsed=0.0), 10, 0.5) is None
