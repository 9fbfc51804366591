"""What a user sees at the end of a trial: progress of long decoding passes on a terminal, and a "time left"
that follows the step budget when it ends before the time limit."""

from __future__ import annotations

import io
import sys

import pytest
from omegaconf import OmegaConf

from seq2seq.inference.predict import with_progress
from seq2seq.training.limits import StoppingRules
from seq2seq.training.state import Counters


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, shown", [(_Terminal(), True), (io.StringIO(), False)])
def test_decoding_progress_goes_to_a_terminal_only(monkeypatch, stream, shown):
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(with_progress(iter(["a", "b", "c"]), 3, "testing")) == ["a", "b", "c"]
    assert ("testing:" in stream.getvalue() and "/3 [" in stream.getvalue()) is shown
    assert (stream.getvalue() == "") is not shown


def rules(max_steps: int | None, minutes: float | None, elapsed: float) -> StoppingRules:
    config = OmegaConf.create({"max_steps": max_steps, "max_epochs": None, "time_limit_minutes": minutes,
                               "patience": None, "save_every_minutes": None})
    limits = StoppingRules(config, total_steps=max_steps)
    limits.start_session(elapsed)
    return limits


def test_time_left_is_the_step_budget_when_it_ends_first():
    """trainer.max_steps=50 with the 24-minute default: 40 steps left at 0.5 s each is 20 s, not 23.5 minutes."""
    assert rules(50, 24, elapsed=30.0).time_left(step=10, seconds_per_step=0.5) == pytest.approx(20.0)
    assert rules(20_000, 24, elapsed=60.0).time_left(10, 0.5) == pytest.approx(23 * 60)
    assert rules(None, 24, elapsed=60.0).time_left(10, 0.5) == pytest.approx(23 * 60)
    assert rules(50, None, elapsed=0.0).time_left(50, 0.5) == 0.0
    assert rules(None, None, elapsed=0.0).time_left(10, 0.5) is None


def test_the_bar_ends_at_the_step_the_run_will_stop_at():
    """At 0.5 s a step with 23 minutes left, the time limit stops the run near step 10 + 2,760, before 20,000."""
    assert rules(20_000, 24, elapsed=60.0).last_step(10, 0.5) == pytest.approx(2_770, abs=2)
    assert rules(50, 24, elapsed=60.0).last_step(10, 0.5) == 50
    assert rules(50, None, elapsed=0.0).last_step(10, 0.5) == 50


def test_completed_by_names_the_limit_a_resumed_run_has_reached():
    assert rules(50, 24, elapsed=0.0).completed_by(Counters(step=50)) == "max_steps"
    assert rules(50, 24, elapsed=24 * 60.0).completed_by(Counters(step=10)) == "time_limit_minutes"
    assert rules(50, 24, elapsed=0.0).completed_by(Counters(step=10)) is None


def test_the_session_pace_counts_from_the_step_it_started_at(monkeypatch):
    """A resumed session's pace is its own: seconds since it started over the updates it made, validations included."""
    clock = [100.0]
    monkeypatch.setattr("seq2seq.training.limits.time.perf_counter", lambda: clock[0])
    limits = rules(None, 24, elapsed=600.0)
    limits.start_session(600.0, step=1_000)
    assert limits.session_pace(1_000) is None
    clock[0] += 50.0
    assert limits.session_pace(1_100) == pytest.approx(0.5)
    # 24 min - (600 + 50) s left at 0.5 s a step: the cosine schedule would end near step 1,100 + 1,580
    assert limits.last_step(1_100, limits.session_pace(1_100)) == 2_680
