"""The training loop: windows of token-budget batches, one update each, validation and checkpoints, the end.

One `Trainer` (built by `setup.build_trainer`) runs on every rank. All ranks train; rank 0 alone logs, validates
and writes files while the others wait at a barrier (inside `distributed.main_rank_only`, so a collective there
fails at once instead of hanging), and every decision to stop is broadcast from rank 0. The parts: the update and
its interval statistics are `update.py`'s; when to stop and the progress bar `limits.py`'s; validation, best.pt and
last.pt `keeper.py`'s; resume `resume.py`'s; the end of the run (averaging, the test, results.json) `finish.py`'s.
Throughput counts target tokens (y + EOS) of all ranks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from seq2seq.config import RunConfig
from seq2seq.data.batching import Batch
from seq2seq.errors import TrainingError
from seq2seq.models.base import Seq2SeqModel
from seq2seq.runtime import rng_state
from seq2seq.training import board, distributed
from seq2seq.training.finish import finish_run
from seq2seq.training.keeper import CheckpointKeeper
from seq2seq.training.limits import ProgressBar, StoppingRules
from seq2seq.training.optim import refit_scheduler, schedule_of
from seq2seq.training.lifecycle import StopSignals, TrainingInterrupted
from seq2seq.training.state import Counters
from seq2seq.training.update import IntervalStats, UpdateResult, Update, describe

log = logging.getLogger("seq2seq.train")


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, dist: distributed.DistInfo, device: torch.device,
                 precision: str, model: Seq2SeqModel, loader: DataLoader, update: Update, counters: Counters,
                 rules: StoppingRules, keeper: CheckpointKeeper | None) -> None:
        self.cfg, self.run_dir, self.dist, self.device, self.precision = cfg, run_dir, dist, device, precision
        self.model, self.loader, self.update, self.counters, self.rules = model, loader, update, counters, rules
        self.keeper = keeper  # rank 0's; None on the others
        self.is_main = dist.is_main
        self.last_path = run_dir / "checkpoints" / "last.pt"
        self.interval = IntervalStats(device)
        self._interval_start = time.perf_counter()
        self._out_of_memory_streak = 0
        self._stops: StopSignals | None = None  # set by `fit`

    def epochs_done(self) -> float:  # epochs and the share of the current one
        return self.counters.epoch + self.counters.position / max(self.loader.batch_sampler.batches_per_epoch, 1)

    def fit(self, stops: StopSignals | None = None) -> dict[str, Any]:
        """Train until a limit is reached, then validate, average, test and write results.json, on every rank.

        A signal in `stops` saves last.pt after the current step and raises TrainingInterrupted (see `_decide`);
        during the end of the run it stops at once. A resumed run that finished training but not its end (e.g.
        killed during the final test) only does the end.
        """
        self._stops, counters = stops, self.counters
        self.rules.start_session(counters.elapsed_seconds, counters.step)
        completed, has_results = distributed.broadcast_object(
            (self.rules.completed_by(counters), (self.run_dir / "results.json").is_file()),
            "rank 0's check whether the run is complete",
        )
        if completed and has_results:
            log.info(
                "the run in %s is already complete (%s; step %d, %.2f epochs, %.1f minutes); raise trainer.max_steps, "
                "trainer.max_epochs, trainer.time_limit_minutes or trainer.patience to train it further.",
                self.run_dir, completed, counters.step, self.epochs_done(), self.rules.elapsed() / 60,
            )
            return {}
        if completed:
            log.info("training in %s is complete (%s at step %d) but it has no results.json: averaging and testing "
                     "now", self.run_dir, completed, counters.step)
            reason = completed
        else:
            reason = self._loop(stops)
        if self.dist.enabled:
            self._check_replicas()
        doing = "the end of training (averaging, the test, results.json)"
        results: dict[str, Any] = {}
        with self._interrupted_at_once(doing):
            if self.is_main:
                with distributed.main_rank_only(doing):
                    results = finish_run(self, reason)
            self._wait_for_main_rank("rank 0's final test and results.json")
        return results

    def _loop(self, stops: StopSignals | None) -> str:
        """The training loop and its last validation -> what stopped it."""
        counters, tcfg = self.counters, self.cfg.trainer
        progress = ProgressBar(self.is_main, self.rules, initial=counters.step)
        reason = "max_epochs"
        batches = self._batches()
        self._reset_interval()
        with logging_redirect_tqdm():
            try:
                while True:
                    if self.rules.steps_done(counters.step):
                        reason = "max_steps"
                        break
                    window = list(itertools.islice(batches, tcfg.accumulate))
                    if not window:
                        break
                    result = self._apply_update(window)
                    if result.out_of_memory:
                        self._skipped_for_memory(result)
                        continue
                    self._out_of_memory_streak = 0
                    self.interval.add(result)
                    counters.step += 1
                    progress.advance()
                    step = counters.step
                    boundary = step % tcfg.log_every == 0 or step % tcfg.eval_every == 0
                    if boundary:
                        self._log_interval(progress)
                        self._follow_time_limit()
                    stop = self._decide(boundary, stops)
                    if step % tcfg.eval_every == 0:
                        stop = self._validate() or stop
                    if boundary and self.dist.enabled:
                        stop = distributed.broadcast_object(stop, f"rank 0's stop decision at step {step}")
                    if stop in ("signal", "save"):
                        self._save_last()
                    if stop == "signal":
                        raise TrainingInterrupted(
                            f"{stops.name or 'a signal'} stopped training at step {step}; saved {self.last_path}",
                            self.last_path, 128 + (stops.received or 2),
                        )
                    if stop and stop != "save":
                        reason = stop
                        break
            finally:
                progress.close()
        if self.interval.steps:
            self._log_interval(None)
        log.info("training stopped at step %d (%s) after %.1f minutes", counters.step, reason,
                 self.rules.elapsed() / 60)
        if counters.last_validated_step != counters.step:
            self._validate()
        return reason

    def _batches(self) -> Iterator[Batch]:
        """Training batches across epochs, from the saved position on; moves `counters.epoch/position` along."""
        counters, sampler, max_epochs = self.counters, self.loader.batch_sampler, self.cfg.trainer.max_epochs
        while max_epochs is None or counters.epoch < max_epochs:
            sampler.resume_at(counters.epoch, counters.position)
            if sampler.batches_per_epoch == 0:
                raise TrainingError("the training split yields no batches; check the data config and max_tokens.")
            for batch in self.loader:
                counters.position += 1
                yield batch
            counters.epoch += 1
            counters.position = 0

    def _apply_update(self, window: list[Batch]) -> UpdateResult:
        """One update; running out of memory where it cannot skip the batch is a TrainingError with advice."""
        try:
            return self.update(window)
        except torch.OutOfMemoryError as error:
            raise TrainingError(
                f"step {self.counters.step + 1}: out of memory in the gradient all-reduce or the optimizer update, "
                f"where a batch cannot be skipped ({describe(window[-1])}). {self._memory_advice()}"
            ) from error

    def _memory_advice(self) -> str:
        return (f"Lower trainer.max_tokens (now {self.cfg.trainer.max_tokens} tokens per batch and rank; raise "
                "trainer.accumulate to keep the update size), then start again, or resume from checkpoints/last.pt "
                "with trainer.resume_reset=[sampler] (the batches are cut anew).")

    def _skipped_for_memory(self, result: UpdateResult) -> None:
        """Count a window skipped because a batch did not fit in memory; trainer.max_oom_steps of them in a row
        stop the run. Every rank gets here alike (the ranks agree on skipping)."""
        counters, limit = self.counters, self.cfg.trainer.max_oom_steps
        counters.out_of_memory_steps += 1
        self._out_of_memory_streak += 1
        if result.failed_batch:
            log.warning("rank %d, step %d: out of memory on a batch of %s; skipped it (%d skipped in total)",
                        self.dist.rank, counters.step + 1, result.failed_batch, counters.out_of_memory_steps)
        else:
            log.info("step %d: another rank ran out of memory (see its warning); every rank skipped its batch",
                     counters.step + 1)
        if self._out_of_memory_streak >= limit:
            raise TrainingError(
                f"stopped at step {counters.step}: {self._out_of_memory_streak} batches in a row did not fit in "
                f"memory (trainer.max_oom_steps={limit}). {self._memory_advice()}"
            )

    def _reset_interval(self) -> None:
        """Start a new logging interval; the running non-finite streak carries over."""
        self.interval.reset()
        self._interval_start = time.perf_counter()

    def _log_interval(self, progress: ProgressBar | None) -> None:
        """Read the interval's statistics (the one host synchronisation) and log them on rank 0.

        Raises TrainingError, on every rank alike, after `max_nonfinite_steps` consecutive non-finite steps.
        """
        stats, counters, step, limit = self.interval, self.counters, self.counters.step, self.cfg.trainer
        loss_sum, tokens, nonfinite, streak_max = stats.reduce(f"step {step}")
        finite_steps = stats.finite_steps.item()
        elapsed = time.perf_counter() - self._interval_start
        counters.nonfinite_steps += nonfinite
        counters.tokens += tokens
        loss, lr = loss_sum / max(tokens, 1), self.update.scheduler.get_last_lr()[0]
        tokens_per_s = tokens / max(elapsed, 1e-9)
        if self.keeper is not None:
            board.log_training(  # target_tokens_per_step: real (unpadded) target tokens per update, all ranks
                self.keeper.writer, step, loss=loss, lr=lr, tokens_per_s=tokens_per_s,
                grad_norm=stats.grad_norm_sum.item() / finite_steps if finite_steps else math.nan,
                target_tokens_per_step=tokens / max(stats.steps, 1), nonfinite_steps=counters.nonfinite_steps,
                epoch=self.epochs_done(),
            )
        if progress is not None:
            progress.show(step, loss, lr, tokens_per_s, elapsed / max(stats.steps, 1))
        if nonfinite:
            log.warning("step %d: %d step(s) with a non-finite loss or gradient skipped in the last %d (%d in total)",
                        step, nonfinite, stats.steps, counters.nonfinite_steps)
        self._reset_interval()
        if streak_max >= limit.max_nonfinite_steps:
            raise TrainingError(
                f"stopped at step {step}: {streak_max} consecutive steps had a non-finite loss or gradient "
                f"(trainer.max_nonfinite_steps={limit.max_nonfinite_steps}); the model diverged. Lower optim.lr, "
                "raise optim.warmup_steps, keep trainer.grad_clip on or use trainer.precision=fp32, then resume "
                "from checkpoints/last.pt or start again."
            )

    def _follow_time_limit(self) -> None:
        """A cosine schedule ends where the run will: when the time limit stops it before the step budget, at the
        step this session's pace (validations included) reaches by then, re-estimated every log interval and kept
        in the counters (a resume goes on with it). Rank 0's estimate holds on every rank."""
        if self.cfg.optim.schedule != "cosine" or self.rules.time_limit is None:
            return
        step = self.counters.step
        pace = self.rules.session_pace(step)
        planned = self.rules.last_step(step, pace) if pace else self.counters.planned_steps
        if self.dist.enabled:
            planned = distributed.broadcast_object(planned, f"rank 0's schedule length at step {step}")
        if planned is None or planned == (self.counters.planned_steps or self.rules.total_steps):
            return
        self.counters.planned_steps = planned
        refit_scheduler(self.update.scheduler, self.update.optimizer, self.cfg.optim.lr,
                        schedule_of(self.cfg.optim, planned, self.counters.schedule_anchor))

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (global ones and its DataLoader's), in rank order."""
        return distributed.all_gather_object(rng_state({"train_loader": self.loader.generator}),
                                             f"every rank's random state at step {self.counters.step}")

    def _validate(self) -> str | None:
        """Validate and checkpoint on rank 0 while the other ranks wait -> a stop reason or None."""
        rng_states, step = self._rng_states(), self.counters.step
        self.counters.last_validated_step = step
        stop = None
        if self.is_main:
            with distributed.main_rank_only(f"the validation at step {step}"):
                stop = self.keeper.validate(self.counters, rng_states)
        self._wait_for_main_rank(f"the end of rank 0's validation at step {step}")
        self._reset_interval()  # validation time does not count towards tokens/s
        return stop

    def _save_last(self) -> None:
        """checkpoints/last.pt at the current step without validating (a signal, save_every_minutes)."""
        rng_states = self._rng_states()
        if self.is_main:
            with distributed.main_rank_only(f"saving {self.last_path}"):
                self.keeper.save_last(self.counters, rng_states)
        distributed.barrier(f"rank 0 to save last.pt at step {self.counters.step}")
        self.rules.saved()

    def _decide(self, boundary: bool, stops: StopSignals | None) -> str | None:
        """After a step: "signal", "time_limit_minutes", "save" (trainer.save_every_minutes) or None. Under DDP
        only at log boundaries, where rank 0's answer is broadcast."""
        if self.dist.enabled and not boundary:
            return None
        if stops is not None and stops.received:
            return "signal"
        if self.rules.time_is_up():
            return "time_limit_minutes"
        return "save" if self.rules.save_due() else None

    def _interrupted_at_once(self, doing: str) -> contextlib.AbstractContextManager:
        """A block that a signal stops at once (last.pt is up to date), instead of after the current step."""
        if self._stops is None:
            return contextlib.nullcontext()
        return self._stops.at_once(doing, self.last_path)

    def _wait_for_main_rank(self, what: str) -> None:
        """Every rank meets here after `what`, which rank 0 did alone with last.pt written by then: a signal
        while waiting stops a rank at once, so a rank whose peer hangs or died still ends on SIGTERM."""
        if self.dist.enabled:
            with self._interrupted_at_once(f"waiting for {what}"):
                distributed.barrier(what)

    def _check_replicas(self) -> None:
        """Under DDP, compare the ranks' weights bit for bit: a silent desynchronisation would waste the run."""
        step = self.counters.step
        digests = distributed.all_gather_object(distributed.weights_digest(self.model),
                                                f"every rank's weight digest at step {step}")
        listing = ", ".join(f"rank{rank}={digest}" for rank, digest in enumerate(digests))
        if len(set(digests)) != 1:
            raise TrainingError(f"replica weights differ after step {step}: {listing}")
        log.info("replica weights identical on %d ranks at step %d (sha1: %s)", len(digests), step, listing)

    def close(self) -> None:
        """Flush TensorBoard events, also when training ends with an error (the curves up to it stay readable)."""
        if self.keeper is not None:
            self.keeper.writer.close()
