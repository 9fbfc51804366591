"""The training loop: token-budget batches, validation with BLEU, checkpoints, the final test.

One `Trainer` runs on every rank. All ranks train; rank 0 alone logs, validates, decodes and writes files while
the others wait at a barrier, and every decision to stop is broadcast from rank 0 so ranks never disagree. What
rank 0 does alone runs inside `distributed.main_rank_only`, so a collective there fails at once instead of
hanging the run; the end of training (averaging, test, results.json) is a phase of every rank like the others.

The update itself is `step.TrainStep` (no host synchronisation inside); the loop reads the interval's device-side
statistics only every `log_every` steps. When to stop (steps, epochs, the time limit, patience, periodic saves) and
the progress bar are `limits.py`'s. Throughput (train/tokens_per_s, results.json) counts target tokens
(y + EOS) of all ranks per second of training. Checkpoint contents and resume are `state.py`'s;
TensorBoard drawing is `board.py`'s; validation and the test `validation.py`'s; devices, precision and random
state `runtime.py`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from seq2seq.training import board, distributed
from seq2seq.atomic import atomic_write
from seq2seq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seq2seq.config import ConfigError, TrainConfig, TrainerConfig, saved_config
from seq2seq.allocator import active_allocator
from seq2seq.data.batching import Batch, TokenBatchSampler, make_loader
from seq2seq.data.prepare import PreparedData, prepare_data
from seq2seq.models import build_model, count_parameters
from seq2seq.models.base import Seq2SeqModel
from seq2seq.training.limits import ProgressBar, StoppingRules
from seq2seq.training.runs import StopSignals, TrainingInterrupted, share_main_rank_folder
from seq2seq.runtime import (
    RuntimeSettingError, configure_device, resolve_device, resolve_precision, rng_state,
    seed_everything, set_rng_state,
)
from seq2seq.training.step import IntervalStats, StepResult, TrainStep, describe
from seq2seq.training.optim import refit_scheduler, schedule_of
from seq2seq.training.state import AveragingHistory, Training, TrainState, changed_settings
from seq2seq.training.validation import Evaluator

log = logging.getLogger("seq2seq.train")


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume_from: Path | None = None) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist = distributed.env_info()
        try:
            self.device = resolve_device(self.tcfg.device, self.dist.local_rank)
            self.precision = resolve_precision(self.tcfg.precision, self.device)
        except RuntimeSettingError as error:
            raise ConfigError(str(error)) from error
        self.dist = distributed.init_distributed(
            self.device.type, timedelta(minutes=self.tcfg.collective_timeout_minutes)
        )
        self._stops: StopSignals | None = None  # set by `fit`
        self.is_main = self.dist.is_main
        if self.dist.enabled:
            self.run_dir = share_main_rank_folder(self.run_dir)
            self.ckpt_dir = self.run_dir / "checkpoints"
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        self._configure_threads()
        configure_device(self.device)

        log.info("run folder: %s", self.run_dir.resolve())
        self.data = self._prepare_data()
        self.src_tok, self.tgt_tok = self.data.src_tokenizer, self.data.tgt_tokenizer

        seed_everything(self.tcfg.seed)  # identical initial weights on every rank
        try:  # the vocabularies exist only now: too small, or two where share_embeddings needs one
            self.model: Seq2SeqModel = build_model(cfg.model, self.src_tok.vocab_size, self.tgt_tok.vocab_size)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self.model.to(self.device)
        self.num_parameters = count_parameters(self.model)
        log.info(
            "model %s: %s trainable parameters | device %s, precision %s, %d thread(s)%s, %s allocator",
            cfg.model.name, f"{self.num_parameters:,}", self.device, self.precision, torch.get_num_threads(),
            f", {self.dist.world_size} ranks" if self.dist.enabled else "", active_allocator(),
        )

        self.loader = make_loader(
            self.data.splits["train"], self.tcfg.max_tokens, shuffle=True, seed=self.tcfg.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, pad_multiple=self.tcfg.pad_multiple,
            pin_memory=self.device.type == "cuda",
        )
        self.sampler: TokenBatchSampler = self.loader.batch_sampler
        self.accumulate = self.tcfg.accumulate
        self.steps_per_epoch = max(math.ceil(self.sampler.batches_per_epoch / self.accumulate), 1)
        self.total_steps = self._total_steps()

        self.step = TrainStep.from_config(self.model, cfg, self.device, self.precision, self.dist.enabled, self.total_steps)
        self.training = Training(
            cfg, self.model, self.src_tok, self.tgt_tok, self.step.optimizer, self.step.scheduler, self.step.scaler,
            self.dist.world_size, self.num_parameters,
        )
        self.history = AveragingHistory(self.ckpt_dir / "average", self.tcfg.average_last)
        self.state = TrainState()
        self.resumed = False
        if resume_from is not None:
            self._resume(resume_from)
        # Different dropout masks per rank; after a resume the restored RNG states take over instead.
        if not self.resumed:
            seed_everything(self.tcfg.seed + self.dist.rank)

        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            purge = {"purge_step": self.state.step + 1} if self.resumed else {}
            self.writer = SummaryWriter(log_dir=str(self.run_dir), **purge)
            self.evaluator = Evaluator(cfg, self.data, self.device, self.precision, self.writer)
        self.interval = IntervalStats(self.device)
        self.rules = StoppingRules(self.tcfg, self.total_steps)
        self._interval_start = time.perf_counter()

    # ------------------------------------------------------------------ setup

    def _configure_threads(self) -> None:
        """trainer.num_threads, else OMP_NUM_THREADS (torchrun sets 1 per process unless told otherwise), else
        PyTorch's default (one thread per physical core) split between the processes on this machine."""
        if self.tcfg.num_threads:
            torch.set_num_threads(self.tcfg.num_threads)
        elif self.device.type == "cpu" and self.dist.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // self.dist.local_world_size))

    def _prepare_data(self) -> PreparedData:
        """Rank 0 builds the tokenized cache first; the other ranks then load it instead of racing to build it."""
        if not self.is_main:
            distributed.barrier("rank 0's data preparation")
        try:
            prepared = prepare_data(self.cfg, log=log.info if self.is_main else lambda message: None)
        except ValueError as error:  # e.g. a vocabulary too small for the corpus' characters
            raise ConfigError(f"cannot prepare data={self.cfg.data.name}: {error}") from error
        if self.is_main:
            distributed.barrier("rank 0's data preparation")
        return prepared

    def _total_steps(self, trainer_cfg: TrainerConfig | None = None) -> int | None:
        """Updates the run will make when it is bounded by steps or epochs (for the cosine schedule and the ETA);
        `trainer_cfg`: another run's trainer settings (a checkpoint's) instead of this run's."""
        tcfg = self.tcfg if trainer_cfg is None else trainer_cfg
        bounds = []
        if tcfg.max_steps:
            bounds.append(tcfg.max_steps)
        if tcfg.max_epochs:
            bounds.append(tcfg.max_epochs * self.steps_per_epoch)
        return min(bounds) if bounds else None

    # ------------------------------------------------------------------ checkpoints

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (global ones and its DataLoader's), in rank order."""
        return distributed.all_gather_object(
            rng_state({"train_loader": self.loader.generator}), f"every rank's random state at step {self.state.step}"
        )

    def _resume(self, path: Path) -> None:
        """Continue exactly where `path` stopped, or refuse (`check_resumable` has compared the settings); the parts
        trainer.resume_reset names start afresh. A changed optim.lr, max_steps or other setting applies as given."""
        resets = self.tcfg.resets
        self.state, rng, saved = self.training.restore(path, resets)
        if len(rng) == self.dist.world_size and "sampler" not in resets:
            set_rng_state(rng[self.dist.rank], {"train_loader": self.loader.generator})
        elif "sampler" not in resets:
            raise CheckpointError(
                f"cannot resume from {path}: it was written by {len(rng)} process(es) and this run has "
                f"{self.dist.world_size}, so batches and dropout masks would differ; resume with {len(rng)}, or add "
                "trainer.resume_reset=[sampler] to continue without an exact replay."
            )
        else:
            log.warning("trainer.resume_reset: the sampler starts epoch %d afresh, with new random states",
                        self.state.epoch + 1)
            seed_everything(self.tcfg.seed + self.dist.rank + self.state.step)
        for part in sorted(resets - {"sampler"}):
            log.warning("trainer.resume_reset: the %s starts afresh", part)
        self._refit_schedule(saved, resets)
        if self.is_main:
            self.history.forget_after(self.state.step)
        self.resumed = True
        log.info(
            "resumed from %s at step %d (epoch %d, %d batches into it), best valid BLEU %.2f",
            path, self.state.step, self.state.epoch + 1, self.state.position, self.state.best_bleu,
        )

    def _refit_schedule(self, saved: dict[str, Any], resets: frozenset[str]) -> None:
        """This run's optimizer hyper-parameters and peak rate over the restored ones, and a cosine schedule whose
        length changed re-fitted to go on from its current rate (optim.lr_multiplier's anchor); each change logged."""
        changed = {key: pair for key, pair in changed_settings(saved, self.cfg).items()
                   if not key.startswith("trainer.resume")}
        if changed:
            log.info("settings changed since the checkpoint, applied as given: %s",
                     ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items()))
        optimizer, scheduler, optim = self.step.optimizer, self.step.scheduler, self.cfg.optim
        for group in optimizer.param_groups:
            group["betas"], group["eps"] = tuple(optim.betas), optim.eps
        optimizer.param_groups[0]["weight_decay"] = optim.weight_decay  # the decayed group (optim.py)
        old_total = self._total_steps(saved_config(saved).trainer)
        if optim.schedule == "cosine" and "schedule" not in resets and old_total != self.total_steps:
            if scheduler.last_epoch >= optim.warmup_steps:
                before = schedule_of(optim, old_total, self.state.schedule_anchor)(scheduler.last_epoch)
                self.state.schedule_anchor = (scheduler.last_epoch + 1, before)
                log.info("cosine schedule: %s -> %s steps; it decays from %.3g x lr at update %d to its floor at "
                         "the new end, without a jump", old_total, self.total_steps, before, scheduler.last_epoch + 1)
        multiplier = schedule_of(optim, self.total_steps, self.state.schedule_anchor)
        refit_scheduler(scheduler, optimizer, optim.lr, multiplier)
        if "optim.lr" in changed:
            log.info("optim.lr %s -> %s: the schedule goes on at step %d with the new peak (lr now %.3g)",
                     *changed["optim.lr"], self.state.step, optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ training

    def _batches(self) -> Iterator[Batch]:
        """Training batches across epochs, from the saved position on; updates `state.epoch/position` as it goes."""
        max_epochs = self.tcfg.max_epochs
        while max_epochs is None or self.state.epoch < max_epochs:
            self.sampler.resume_at(self.state.epoch, self.state.position)
            if self.sampler.batches_per_epoch == 0:
                raise TrainingError("the training split yields no batches; check the data config and max_tokens.")
            for batch in self.loader:
                self.state.position += 1
                yield batch
            self.state.epoch += 1
            self.state.position = 0

    def _reset_interval(self) -> None:
        """Start a new logging interval; the running non-finite streak carries over."""
        self.interval.reset()
        self._interval_start = time.perf_counter()

    def _log_interval(self, progress: ProgressBar | None) -> None:
        """Read the interval's statistics (the one host synchronisation) and log them on rank 0.

        Raises TrainingError, on every rank alike, after `max_nonfinite_steps` consecutive non-finite steps.
        """
        stats = self.interval
        totals = torch.stack([stats.loss_sum, torch.tensor(float(stats.tokens), device=self.device)])
        anomalies = torch.stack([stats.nonfinite, stats.streak_max])
        distributed.all_reduce(totals, f"the training statistics of step {self.state.step}", "sum")
        distributed.all_reduce(anomalies, f"the non-finite counts of step {self.state.step}", "max")
        loss_sum, tokens = totals.tolist()
        nonfinite, streak_max = (int(v) for v in anomalies.tolist())
        finite_steps = stats.finite_steps.item()
        grad_norm = stats.grad_norm_sum.item() / finite_steps if finite_steps else math.nan
        elapsed = time.perf_counter() - self._interval_start
        self.state.nonfinite_steps += nonfinite
        self.state.tokens += int(tokens)
        loss = loss_sum / max(tokens, 1.0)
        lr = self.step.scheduler.get_last_lr()[0]
        tokens_per_s = tokens / max(elapsed, 1e-9)
        step = self.state.step
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
            # Real (unpadded) target tokens per update, all ranks and accumulated batches: what the budget buys.
            self.writer.add_scalar("train/target_tokens_per_step", tokens / max(stats.steps, 1), step)
            self.writer.add_scalar("train/nonfinite_steps", self.state.nonfinite_steps, step)
            epoch = self.state.epoch + self.state.position / max(self.sampler.batches_per_epoch, 1)
            self.writer.add_scalar("train/epoch", epoch, step)
        if progress is not None:
            progress.show(step, loss, lr, tokens_per_s, elapsed / max(stats.steps, 1))
        if nonfinite:
            log.warning(
                "step %d: %d step(s) with a non-finite loss or gradient skipped in the last %d (%d in total)",
                step, nonfinite, stats.steps, self.state.nonfinite_steps,
            )
        self._reset_interval()
        if streak_max >= self.tcfg.max_nonfinite_steps:
            raise TrainingError(
                f"stopped at step {step}: {streak_max} consecutive steps had a non-finite loss or gradient "
                f"(trainer.max_nonfinite_steps={self.tcfg.max_nonfinite_steps}); the model diverged. Lower optim.lr, "
                "raise optim.warmup_steps, keep trainer.grad_clip on or use trainer.precision=fp32, then resume "
                "from checkpoints/last.pt or start again."
            )

    def _save_last(self) -> Path:
        """Write checkpoints/last.pt at the current step without validating (interrupts, save_every_minutes)."""
        rng_states = self._rng_states()
        path = self.ckpt_dir / "last.pt"
        if self.is_main:
            with distributed.main_rank_only(f"saving {path}"):
                self.state.elapsed_seconds = self.rules.elapsed()
                save_checkpoint(path, self.training.payload(self.state, rng_states, {}))
                log.info("step %d: saved %s", self.state.step, path)
        distributed.barrier(f"rank 0 to save last.pt at step {self.state.step}")
        self.rules.saved()
        return path

    def _interrupted_at_once(self, doing: str) -> contextlib.AbstractContextManager:
        """A block that a signal stops at once (last.pt is up to date), instead of after the current step."""
        if self._stops is None:
            return contextlib.nullcontext()
        return self._stops.at_once(doing, self.ckpt_dir / "last.pt")

    def _wait_for_main_rank(self, what: str) -> None:
        """Every rank meets here after `what`, which rank 0 did alone with last.pt written by then: a signal
        while waiting stops a rank at once, so a rank whose peer hangs or died still ends on SIGTERM."""
        if self.dist.enabled:
            with self._interrupted_at_once(f"waiting for {what}"):
                distributed.barrier(what)

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

    def fit(self, stops: StopSignals | None = None) -> dict[str, Any]:
        """Train until a limit is reached, then validate, average, test and write results.json, on every rank.

        A signal in `stops` saves last.pt after the current step and raises TrainingInterrupted (see `_decide`);
        during the end of training it stops at once. A resumed run that finished training but not its end (e.g.
        killed during the final test) only does the end.
        """
        self._stops = stops
        self.rules.start_session(self.state.elapsed_seconds)
        completed, has_results = distributed.broadcast_object(
            (self.rules.completed_by(self.state), (self.run_dir / "results.json").is_file()),
            "rank 0's check whether the run is complete",
        )
        if completed and has_results:
            log.info(
                "the run in %s is already complete (%s; step %d, epoch %d, %.1f minutes); raise trainer.max_steps, "
                "trainer.max_epochs, trainer.time_limit_minutes or trainer.patience to train it further.",
                self.run_dir, completed, self.state.step, self.state.epoch, self.rules.elapsed() / 60,
            )
            return {}
        if completed:
            log.info(
                "training in %s is complete (%s at step %d) but it has no results.json: averaging and testing now",
                self.run_dir, completed, self.state.step,
            )
            reason = completed
        else:
            reason = self._train(stops)
        self._check_replicas()
        return self._finish(reason)

    def _train(self, stops: StopSignals | None) -> str:
        """The training loop and its last validation -> what stopped it."""
        self._reset_interval()
        self._out_of_memory_streak = 0
        eval_every, log_every = self.tcfg.eval_every, self.tcfg.log_every
        progress = ProgressBar(self.is_main, self.rules, initial=self.state.step)
        reason = "max_epochs"
        batches = self._batches()
        with logging_redirect_tqdm():
            try:
                while True:
                    if self.rules.steps_done(self.state.step):
                        reason = "max_steps"
                        break
                    window = list(itertools.islice(batches, self.accumulate))
                    if not window:
                        break
                    result = self._step(window)
                    if result.out_of_memory:
                        self._skipped_for_memory(result)
                        continue
                    self._out_of_memory_streak = 0
                    self.interval.add(result)
                    self.state.step += 1
                    progress.advance()
                    step = self.state.step
                    boundary = step % log_every == 0 or step % eval_every == 0
                    if boundary:
                        self._log_interval(progress)
                    stop = self._decide(boundary, stops)
                    if step % eval_every == 0:
                        stop = self._validate_and_save() or stop
                    if boundary and self.dist.enabled:
                        stop = distributed.broadcast_object(stop, f"rank 0's stop decision at step {step}")
                    if stop in ("signal", "save"):
                        path = self._save_last()
                    if stop == "signal":
                        raise TrainingInterrupted(
                            f"{stops.name or 'a signal'} stopped training at step {step}; saved {path}", path,
                            128 + (stops.received or 2),
                        )
                    if stop and stop != "save":
                        reason = stop
                        break
            finally:
                progress.close()
        if self.interval.steps:
            self._log_interval(None)
        log.info("training stopped at step %d (%s) after %.1f minutes", self.state.step, reason, self.rules.elapsed() / 60)
        if self.state.last_validated_step != self.state.step:
            self._validate_and_save()
        return reason

    def _step(self, window: list[Batch]) -> StepResult:
        """One update; running out of memory where the step cannot skip the batch is a TrainingError with advice."""
        try:
            return self.step(window)
        except torch.OutOfMemoryError as error:
            raise TrainingError(
                f"step {self.state.step + 1}: out of memory in the gradient all-reduce or the optimizer update, "
                f"where a batch cannot be skipped ({describe(window[-1])}). {self._memory_advice()}"
            ) from error

    def _memory_advice(self) -> str:
        return (
            f"Lower trainer.max_tokens (now {self.tcfg.max_tokens} tokens per batch and rank; raise "
            "trainer.accumulate to keep the update size), then start again, or resume from checkpoints/last.pt "
            "with trainer.resume_reset=[sampler] (the batches are cut anew)."
        )

    def _skipped_for_memory(self, result: StepResult) -> None:
        """Count a window skipped because a batch did not fit in memory; trainer.max_oom_steps of them in a row
        stop the run. Every rank gets here alike (the step's ranks agree on skipping)."""
        self.state.out_of_memory_steps += 1
        self._out_of_memory_streak += 1
        if result.failed_batch:
            log.warning(
                "rank %d, step %d: out of memory on a batch of %s; skipped it (%d skipped in total)",
                self.dist.rank, self.state.step + 1, result.failed_batch, self.state.out_of_memory_steps,
            )
        else:
            log.info("step %d: another rank ran out of memory (see its warning); every rank skipped its batch",
                     self.state.step + 1)
        limit = self.tcfg.max_oom_steps
        if self._out_of_memory_streak >= limit:
            raise TrainingError(
                f"stopped at step {self.state.step}: {self._out_of_memory_streak} batches in a row did not fit in "
                f"memory (trainer.max_oom_steps={limit}). {self._memory_advice()}"
            )

    def _check_replicas(self) -> None:
        """Under DDP, compare the ranks' weights bit for bit: a silent desynchronisation would waste the run."""
        if not self.dist.enabled:
            return
        digests = distributed.all_gather_object(
            distributed.weights_digest(self.model), f"every rank's weight digest at step {self.state.step}"
        )
        listing = ", ".join(f"rank{rank}={digest}" for rank, digest in enumerate(digests))
        if len(set(digests)) != 1:
            raise TrainingError(f"replica weights differ after step {self.state.step}: {listing}")
        log.info("replica weights identical on %d ranks at step %d (sha1: %s)", len(digests), self.state.step, listing)

    # ------------------------------------------------------------------ validation and the end of training

    def _validate_and_save(self) -> str | None:
        """Validate, log and checkpoint on rank 0 while the other ranks wait; returns a stop reason or None."""
        rng_states = self._rng_states()
        self.state.last_validated_step = self.state.step
        stop = None
        if self.is_main:
            with distributed.main_rank_only(f"the validation at step {self.state.step}"):
                stop = self._validate_on_main(rng_states)
        self._wait_for_main_rank(f"the end of rank 0's validation at step {self.state.step}")
        self._reset_interval()  # validation time does not count towards tokens/s
        return stop

    def _beats_best(self, metrics: dict[str, Any]) -> bool:
        """A higher BLEU than best.pt's, or the same BLEU with a lower validation loss (early on, every BLEU is 0)."""
        if metrics["bleu"] != self.state.best_bleu:
            return metrics["bleu"] > self.state.best_bleu
        return metrics["loss"] < self.state.best_loss

    def _record_best(self, metrics: dict[str, Any], averaged: bool) -> None:
        self.state.best_bleu, self.state.best_loss = metrics["bleu"], metrics["loss"]
        self.state.best_step = self.state.step
        self.state.best_averaged = averaged
        self.state.validations_since_best = 0

    def _validate_on_main(self, rng_states: list[dict[str, Any]]) -> str | None:
        started = time.perf_counter()
        metrics = self.evaluator.validate(self.model, self.state.step)
        improved = self._beats_best(metrics)
        if improved:
            self._record_best(metrics, averaged=False)
        else:
            self.state.validations_since_best += 1
        log.info(
            "step %d | valid loss %.3f | ppl %.2f | BLEU %.2f | chrF %.2f | best BLEU %.2f (step %d%s)",
            self.state.step, metrics["loss"], metrics["ppl"], metrics["bleu"], metrics["chrf"],
            self.state.best_bleu, self.state.best_step, ", averaged" if self.state.best_averaged else "",
        )
        self.state.validation_seconds += time.perf_counter() - started
        self.state.elapsed_seconds = self.rules.elapsed()
        payload = self.training.payload(self.state, rng_states, metrics)
        # last.pt goes last: whatever step it records, best.pt and the averaging history are as new.
        if improved:
            save_checkpoint(self.ckpt_dir / "best.pt", payload)
        self.history.remember(self.model, self.state.step)
        save_checkpoint(self.ckpt_dir / "last.pt", payload)
        self.writer.flush()
        patience = self.rules.patience
        if patience and self.state.validations_since_best >= patience:
            log.info("no better validation in %d validations: stopping early (trainer.patience)", patience)
            return "patience"
        return None

    def _average_checkpoints(self) -> None:
        """Evaluate the mean of the last validations' weights. When it beats best.pt it becomes best.pt, and
        last.pt records it as the best, so a resumed run does not replace it with a worse validation."""
        averaged = self.history.average()
        if averaged is None:
            return
        weights, steps = averaged
        self.model.load_state_dict(weights)
        metrics = self.evaluator.validate(self.model, self.state.step, prefix="valid_averaged", illustrate=False)
        log.info(
            "average of the weights at steps %s: valid BLEU %.2f, chrF %.2f, loss %.3f (best.pt: BLEU %.2f, loss %.3f)",
            ", ".join(map(str, steps)), metrics["bleu"], metrics["chrf"], metrics["loss"], self.state.best_bleu,
            self.state.best_loss,
        )
        if not self._beats_best(metrics):
            return
        self._record_best(metrics, averaged=True)
        last_path = self.ckpt_dir / "last.pt"
        last = load_checkpoint(last_path)  # this step's training state, written by its validation
        last["train_state"], last["best_valid_bleu"] = asdict(self.state), self.state.best_bleu
        best_path = self.ckpt_dir / "best.pt"
        save_checkpoint(best_path, {**last, "model": weights, "metrics": {**metrics, "averaged_steps": steps}})
        save_checkpoint(last_path, last)
        log.info("the averaged weights score higher: saved as %s, and %s records it as the best", best_path, last_path)

    def _finish(self, reason: str) -> dict[str, Any]:
        """The end of training, on every rank: rank 0 averages, tests and writes results.json while the others
        wait. Every checkpoint is written by then, so a signal stops it at once; a resume does what is left."""
        doing = "the end of training (averaging, the test, results.json)"
        results: dict[str, Any] = {}
        with self._interrupted_at_once(doing):
            if self.is_main:
                with distributed.main_rank_only(doing):
                    results = self._end_of_training(reason)
            self._wait_for_main_rank("rank 0's final test and results.json")
        return results

    def _end_of_training(self, reason: str) -> dict[str, Any]:
        """Rank 0: averaging, test of best.pt (beam search), BLEU by source length, results.json, hparams."""
        if self.tcfg.average_last > 0:
            self._average_checkpoints()
        averaged = self.state.best_averaged
        best_path = self.ckpt_dir / "best.pt"
        if not best_path.is_file():
            log.warning("%s is missing (deleted?); testing %s instead", best_path, self.ckpt_dir / "last.pt")
            best_path = self.ckpt_dir / "last.pt"
        best = load_checkpoint(best_path)
        self.model.load_state_dict(best["model"])
        description = f"best.pt from step {best['step']}" + (", averaged" if averaged else "")
        log.info("testing %s (beam %d)", description, self.tcfg.test_beam_size)
        test = self.evaluator.test(self.model, self.state.step, description)
        train_seconds = self.state.elapsed_seconds
        compute_seconds = max(train_seconds - self.state.validation_seconds, 1e-9)
        valid = best.get("metrics") or {}
        results = {  # flat keys, read by scripts/compare.py
            "model": self.cfg.model.name,
            "data": self.cfg.data.name,
            "run_dir": str(self.run_dir.resolve()),
            "parameters": self.num_parameters,
            "steps": self.state.step,
            "epochs": round(self.state.epoch + self.state.position / max(self.sampler.batches_per_epoch, 1), 3),
            "stopped_by": reason,
            "train_minutes": train_seconds / 60,
            "target_tokens_per_s": self.state.tokens / compute_seconds,
            "target_tokens_per_step": self.state.tokens / max(self.state.step, 1),
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.dist.world_size,
            "best_step": int(best["step"]),
            "averaged": averaged,
            "nonfinite_steps": self.state.nonfinite_steps,
            "out_of_memory_steps": self.state.out_of_memory_steps,
            "valid_loss": valid.get("loss"),
            "valid_ppl": valid.get("ppl"),
            "valid_bleu": valid.get("bleu"),
            "valid_chrf": valid.get("chrf"),
            "valid_sentences": valid.get("sentences"),
            **test,
        }
        with atomic_write(self.run_dir / "results.json") as handle:
            handle.write((json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())
        board.log_hparams(self.writer, self.cfg, results, self.state.step)
        log.info("results written to %s", self.run_dir / "results.json")
        return results

    def close(self) -> None:
        """Flush TensorBoard events, also when training ends with an error (the curves up to it stay readable)."""
        if self.writer is not None:
            self.writer.close()
