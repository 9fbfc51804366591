"""When training stops and how far it has to go: the stopping rules and the progress bar, each an object of its own.

`StoppingRules` owns the budget (trainer.max_steps, max_epochs, time_limit_minutes as wall clock summed over resumed
sessions, patience), the step the run will stop at (the cosine schedule's end) and the save_every_minutes clock; `ProgressBar` shows rank 0's loss, learning rate, tokens/s and
time left, with a total that follows the step the run will really stop at. The trainer asks them; it never reads
these keys itself.
"""

from __future__ import annotations

import sys
import time
from tqdm import tqdm

from seq2seq.config import TrainerConfig
from seq2seq.training.state import Counters


class StoppingRules:
    """The limits of trainer config `trainer_cfg` for a run whose step budget is `total_steps` (None: unbounded)."""

    def __init__(self, trainer_cfg: TrainerConfig, total_steps: int | None) -> None:
        self.max_steps = trainer_cfg.max_steps
        self.max_epochs = trainer_cfg.max_epochs
        self.time_limit = trainer_cfg.time_limit_minutes * 60 if trainer_cfg.time_limit_minutes else None
        self.patience = trainer_cfg.patience
        minutes = trainer_cfg.save_every_minutes
        self.save_every = minutes * 60 if minutes else None
        self.total_steps = total_steps
        self.start_session(0.0)

    def start_session(self, elapsed_before: float, step: int = 0) -> None:
        """Start this session's clock at update `step`; `elapsed_before` is what earlier sessions trained."""
        self._elapsed_before = elapsed_before
        self._session_first_step = step
        self._session_start = time.perf_counter()
        self._saved_at = self._session_start

    def session_pace(self, step: int) -> float | None:
        """Seconds per update in this session so far, validations and checkpoints included (None before the
        first): the pace at which the rest of the time limit will be spent."""
        done = step - self._session_first_step
        return (time.perf_counter() - self._session_start) / done if done > 0 else None

    def elapsed(self) -> float:
        """Wall-clock seconds of training, validations included, summed over resumed sessions."""
        return self._elapsed_before + (time.perf_counter() - self._session_start)

    def time_is_up(self) -> bool:
        return self.time_limit is not None and self.elapsed() >= self.time_limit

    def steps_done(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def completed_by(self, state: Counters) -> str | None:
        """The limit a resumed run has already reached (it is finished), or None."""
        if self.steps_done(state.step):
            return "max_steps"
        if self.max_epochs is not None and state.epoch >= self.max_epochs:
            return "max_epochs"
        if self.time_is_up():
            return "time_limit_minutes"
        if self.patience is not None and state.validations_since_best >= self.patience:
            return "patience"
        return None

    def time_left(self, step: int, seconds_per_step: float) -> float | None:
        """Seconds of training left: to the time limit or, when the step budget (max_steps, max_epochs) ends
        first at this pace, to that; None when neither bounds the run. Validations are not counted."""
        candidates = []
        if self.time_limit is not None:
            candidates.append(max(self.time_limit - self.elapsed(), 0.0))
        if self.total_steps:
            candidates.append(max(self.total_steps - step, 0) * seconds_per_step)
        return min(candidates) if candidates else None

    def last_step(self, step: int, seconds_per_step: float) -> int | None:
        """The step the run will stop at, at this pace: the step budget or what the time limit leaves room for."""
        if self.time_limit is None:
            return self.total_steps
        reachable = step + int(max(self.time_limit - self.elapsed(), 0.0) / max(seconds_per_step, 1e-9))
        return min(reachable, self.total_steps or reachable)

    def save_due(self) -> bool:
        """trainer.save_every_minutes have passed since the last save."""
        return self.save_every is not None and time.perf_counter() - self._saved_at >= self.save_every

    def saved(self) -> None:
        self._saved_at = time.perf_counter()


class ProgressBar:
    """Rank 0's training bar on stderr (absent on other ranks): steps, loss, learning rate, tokens/s, time left."""

    def __init__(self, enabled: bool, rules: StoppingRules, initial: int) -> None:
        self.rules = rules
        self._bar = None
        if enabled:
            self._bar = tqdm(
                total=rules.total_steps, initial=initial, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.05,
            )

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def show(self, step: int, loss: float, lr: float, tokens_per_s: float, seconds_per_step: float) -> None:
        """The interval's figures; the bar's total (and so tqdm's own ETA) becomes the step the run will stop at."""
        if self._bar is None:
            return
        postfix = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
        left = self.rules.time_left(step, seconds_per_step)
        if left is not None:
            postfix["time left"] = f"{left / 60:.1f}min"
        self._bar.total = self.rules.last_step(step, seconds_per_step)
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
