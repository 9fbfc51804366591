"""The training loop: token-budget batches, validation with BLEU, checkpoints, the final test.

One `Trainer` runs on every rank. All ranks train; rank 0 alone logs, validates, decodes and writes files while
the others wait at a barrier, and every decision to stop is broadcast from rank 0 so ranks never disagree.

The update itself is `step.TrainStep` (no host synchronisation inside); the loop reads the interval's device-side
statistics only every `log_every` steps. Throughput (train/tokens_per_s, results.json) counts target tokens
(y + EOS) of all ranks per second of training. Checkpoint contents and resume are `state.py`'s;
TensorBoard drawing is `board.py`'s; validation and the test `validation.py`'s; devices, precision and random
state `runtime.py`'s.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seq2seq.training import board, distributed
from seq2seq.atomic import atomic_write
from seq2seq.checkpoint import load_checkpoint, save_checkpoint
from seq2seq.config import ConfigError
from seq2seq.data.batching import Batch, TokenBatchSampler, collate, make_loader
from seq2seq.data.prepare import PreparedData, prepare_data
from seq2seq.models import build_model, count_parameters
from seq2seq.models.base import Seq2SeqModel
from seq2seq.training.runs import StopSignals, TrainingInterrupted, share_main_rank_folder
from seq2seq.runtime import (
    RuntimeSettingError, configure_device, resolve_device, resolve_precision, rng_state,
    seed_everything, set_rng_state,
)
from seq2seq.training.step import IntervalStats, TrainStep
from seq2seq.training.state import AveragingHistory, Training, TrainState
from seq2seq.training.validation import Evaluator

log = logging.getLogger("seq2seq.train")


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""


class _SkipBatches(Sampler[list[int]]):
    """The sampler's batches for one epoch, without the first `skip` (already trained on before a resume)."""

    def __init__(self, sampler: TokenBatchSampler, skip: int) -> None:
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for position, batch in enumerate(self.sampler):
            if position >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_from: Path | None = None) -> None:
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
        self.dist = distributed.init_distributed(self.device.type)
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

        seed_everything(int(self.tcfg.seed))  # identical initial weights on every rank
        try:
            self.model: Seq2SeqModel = build_model(cfg.model, self.src_tok.vocab_size, self.tgt_tok.vocab_size)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self.model.to(self.device)
        self.num_parameters = count_parameters(self.model)
        log.info(
            "model %s: %s trainable parameters | device %s, precision %s, %d thread(s)%s",
            cfg.model.name, f"{self.num_parameters:,}", self.device, self.precision, torch.get_num_threads(),
            f", {self.dist.world_size} ranks" if self.dist.enabled else "",
        )

        self.loader = make_loader(
            self.data.splits["train"], int(self.tcfg.max_tokens), shuffle=True, seed=int(self.tcfg.seed),
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.sampler: TokenBatchSampler = self.loader.batch_sampler
        self.accumulate = int(self.tcfg.accumulate)
        self.steps_per_epoch = max(math.ceil(len(self.sampler) / self.accumulate), 1)
        self.total_steps = self._total_steps()

        self.step = TrainStep.from_config(self.model, cfg, self.device, self.precision, self.dist.enabled, self.total_steps)
        self.training = Training(
            cfg, self.model, self.src_tok, self.tgt_tok, self.step.optimizer, self.step.scheduler, self.step.scaler,
            self.dist.world_size, self.num_parameters,
        )
        self.history = AveragingHistory(self.ckpt_dir / "average", int(self.tcfg.average_last))
        self.state = TrainState()
        self.resumed = False
        if resume_from is not None:
            self._resume(resume_from)
        # Different dropout masks per rank; after a resume the restored RNG states take over instead.
        if not self.resumed:
            seed_everything(int(self.tcfg.seed) + self.dist.rank)

        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            purge = {"purge_step": self.state.step + 1} if self.resumed else {}
            self.writer = SummaryWriter(log_dir=str(self.run_dir), **purge)
            self.evaluator = Evaluator(cfg, self.data, self.device, self.precision, self.writer)
        self.interval = IntervalStats(self.device)
        self._elapsed_base = self.state.elapsed_seconds
        self._session_start = time.perf_counter()
        self._interval_start = time.perf_counter()

    # ------------------------------------------------------------------ setup

    def _configure_threads(self) -> None:
        """trainer.num_threads, else OMP_NUM_THREADS (torchrun sets 1 per process unless told otherwise), else
        PyTorch's default (one thread per physical core) split between the processes on this machine."""
        requested = self.tcfg.get("num_threads")
        if requested:
            torch.set_num_threads(int(requested))
        elif self.device.type == "cpu" and self.dist.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // self.dist.local_world_size))

    def _prepare_data(self) -> PreparedData:
        """Rank 0 builds the tokenized cache first; the other ranks then load it instead of racing to build it."""
        if not self.is_main:
            distributed.barrier()
        try:
            prepared = prepare_data(self.cfg, log=log.info if self.is_main else lambda message: None)
        except ValueError as error:  # e.g. a vocabulary too small for the corpus' characters
            raise ConfigError(f"cannot prepare data={self.cfg.data.name}: {error}") from error
        if self.is_main:
            distributed.barrier()
        return prepared

    def _total_steps(self) -> int | None:
        """Updates the run will make when it is bounded by steps or epochs (for the cosine schedule and the ETA)."""
        bounds = []
        if self.tcfg.max_steps:
            bounds.append(int(self.tcfg.max_steps))
        if self.tcfg.max_epochs:
            bounds.append(int(self.tcfg.max_epochs) * self.steps_per_epoch)
        return min(bounds) if bounds else None

    # ------------------------------------------------------------------ checkpoints

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (global ones and its DataLoader's), in rank order."""
        return distributed.all_gather_object(rng_state({"train_loader": self.loader.generator}))

    def _resume(self, path: Path) -> None:
        self.state, rng = self.training.restore(path)
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank], {"train_loader": self.loader.generator})
        else:
            log.warning(
                "%s was written by %d rank(s), this run has %d: training continues from its weights and "
                "optimizer state, but batches and dropout masks differ from an uninterrupted run.",
                path, len(rng), self.dist.world_size,
            )
            seed_everything(int(self.tcfg.seed) + self.dist.rank + self.state.step)
        if self.is_main:
            self.history.forget_after(self.state.step)
        self.resumed = True
        log.info(
            "resumed from %s at step %d (epoch %d, %d batches into it), best valid BLEU %.2f",
            path, self.state.step, self.state.epoch + 1, self.state.position, self.state.best_bleu,
        )

    # ------------------------------------------------------------------ training

    def _batches(self) -> Iterator[Batch]:
        """Training batches across epochs, from the saved position on; updates `state.epoch/position` as it goes."""
        max_epochs = int(self.tcfg.max_epochs) if self.tcfg.max_epochs else None
        while max_epochs is None or self.state.epoch < max_epochs:
            self.sampler.set_epoch(self.state.epoch)
            if len(self.sampler) == 0:
                raise TrainingError("the training split yields no batches; check the data config and max_tokens.")
            loader = DataLoader(
                self.loader.dataset, batch_sampler=_SkipBatches(self.sampler, self.state.position), collate_fn=collate,
                num_workers=0, pin_memory=self.device.type == "cuda", generator=self.loader.generator,
            )
            for batch in loader:
                self.state.position += 1
                yield batch
            self.state.epoch += 1
            self.state.position = 0

    def _reset_interval(self) -> None:
        """Start a new logging interval; the running non-finite streak carries over."""
        self.interval.reset()
        self._interval_start = time.perf_counter()

    def _log_interval(self, progress: tqdm | None) -> None:
        """Read the interval's statistics (the one host synchronisation) and log them on rank 0.

        Raises TrainingError, on every rank alike, after `max_nonfinite_steps` consecutive non-finite steps.
        """
        stats = self.interval
        totals = torch.stack([stats.loss_sum, torch.tensor(float(stats.tokens), device=self.device)])
        anomalies = torch.stack([stats.nonfinite, stats.streak_max])
        distributed.all_reduce(totals, "sum")
        distributed.all_reduce(anomalies, "max")
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
            self.writer.add_scalar("train/nonfinite_steps", self.state.nonfinite_steps, step)
            self.writer.add_scalar("train/epoch", self.state.epoch + self.state.position / max(len(self.sampler), 1), step)
        if progress is not None:
            postfix = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
            if self.tcfg.time_limit_minutes:
                left = max(float(self.tcfg.time_limit_minutes) * 60 - self._elapsed(), 0.0)
                postfix["time left"] = f"{left / 60:.1f}min"
                # The bar's total (and so its ETA) is the step the time limit will stop at, at this pace.
                reachable = step + int(left * stats.steps / max(elapsed, 1e-9))
                progress.total = min(reachable, self.total_steps or reachable)
            progress.set_postfix(postfix, refresh=False)
        if nonfinite:
            log.warning(
                "step %d: %d step(s) with a non-finite loss or gradient skipped in the last %d (%d in total)",
                step, nonfinite, stats.steps, self.state.nonfinite_steps,
            )
        self._reset_interval()
        if streak_max >= int(self.tcfg.max_nonfinite_steps):
            raise TrainingError(
                f"stopped at step {step}: {streak_max} consecutive steps had a non-finite loss or gradient "
                f"(trainer.max_nonfinite_steps={self.tcfg.max_nonfinite_steps}); the model diverged. Lower optim.lr, "
                "raise optim.warmup_steps, keep trainer.grad_clip on or use trainer.precision=fp32, then resume "
                "from checkpoints/last.pt or start again."
            )

    def _elapsed(self) -> float:
        """Wall-clock seconds of training, validations included, summed over resumed sessions."""
        return self._elapsed_base + (time.perf_counter() - self._session_start)

    def _time_is_up(self) -> bool:
        limit = self.tcfg.time_limit_minutes
        return bool(limit) and self._elapsed() >= float(limit) * 60

    def _budget_reached(self) -> bool:
        if self.tcfg.max_steps and self.state.step >= int(self.tcfg.max_steps):
            return True
        return bool(self.tcfg.max_epochs) and self.state.epoch >= int(self.tcfg.max_epochs)

    def _save_last(self) -> Path:
        """Write checkpoints/last.pt at the current step without validating (interrupts, save_every_minutes)."""
        rng_states = self._rng_states()
        path = self.ckpt_dir / "last.pt"
        if self.is_main:
            self.state.elapsed_seconds = self._elapsed()
            save_checkpoint(path, self.training.payload(self.state, rng_states, {}))
            log.info("step %d: saved %s", self.state.step, path)
        distributed.barrier()
        self._saved_at = time.perf_counter()
        return path

    def _decide(self, boundary: bool, stops: StopSignals | None) -> str | None:
        """After a step: "signal", "time_limit_minutes", "save" (trainer.save_every_minutes) or None. Under DDP
        only at log boundaries, where rank 0's answer is broadcast."""
        if self.dist.enabled and not boundary:
            return None
        if stops is not None and stops.received:
            return "signal"
        if self._time_is_up():
            return "time_limit_minutes"
        minutes = self.tcfg.get("save_every_minutes")
        return "save" if minutes and time.perf_counter() - self._saved_at >= float(minutes) * 60 else None

    def fit(self, stops: StopSignals | None = None) -> dict[str, Any]:
        """Train until a limit is reached, then validate, average, test and write results.json (rank 0). A signal
        in `stops` saves last.pt after the current step and raises TrainingInterrupted (see `_decide`)."""
        self._saved_at = time.perf_counter()
        self._elapsed_base = self.state.elapsed_seconds
        self._session_start = time.perf_counter()
        if self._budget_reached() or self._time_is_up():
            log.info(
                "the run in %s is already complete (step %d, epoch %d, %.1f minutes); raise trainer.max_steps, "
                "trainer.max_epochs or trainer.time_limit_minutes to train it further.",
                self.run_dir, self.state.step, self.state.epoch, self._elapsed() / 60,
            )
            return {}
        self._reset_interval()
        max_steps = int(self.tcfg.max_steps) if self.tcfg.max_steps else None
        eval_every, log_every = int(self.tcfg.eval_every), int(self.tcfg.log_every)
        progress = None
        if self.is_main:
            progress = tqdm(
                total=self.total_steps, initial=self.state.step, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.05,
            )
        reason = "max_epochs"
        batches = self._batches()
        with logging_redirect_tqdm():
            try:
                while True:
                    if max_steps is not None and self.state.step >= max_steps:
                        reason = "max_steps"
                        break
                    window = list(itertools.islice(batches, self.accumulate))
                    if not window:
                        break
                    self.interval.add(self.step(window))
                    self.state.step += 1
                    if progress is not None:
                        progress.update(1)
                    step = self.state.step
                    boundary = step % log_every == 0 or step % eval_every == 0
                    if boundary:
                        self._log_interval(progress)
                    stop = self._decide(boundary, stops)
                    if step % eval_every == 0:
                        stop = self._validate_and_save() or stop
                    if boundary and self.dist.enabled:
                        stop = distributed.broadcast_object(stop)  # rank 0 decides for all
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
                if progress is not None:
                    progress.close()
        if self.interval.steps:
            self._log_interval(None)
        log.info("training stopped at step %d (%s) after %.1f minutes", self.state.step, reason, self._elapsed() / 60)
        if self.state.last_validated_step != self.state.step:
            self._validate_and_save()
        self._check_replicas()
        results = self._finish(reason) if self.is_main else {}
        distributed.barrier()
        return results

    def _check_replicas(self) -> None:
        """Under DDP, compare the ranks' weights bit for bit: a silent desynchronisation would waste the run."""
        if not self.dist.enabled:
            return
        digests = distributed.all_gather_object(distributed.weights_digest(self.model))
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
            started = time.perf_counter()
            metrics = self.evaluator.validate(self.model, self.state.step)
            improved = metrics["bleu"] > self.state.best_bleu
            if improved:
                self.state.best_bleu, self.state.best_step = metrics["bleu"], self.state.step
                self.state.validations_since_best = 0
            else:
                self.state.validations_since_best += 1
            log.info(
                "step %d | valid loss %.3f | ppl %.2f | BLEU %.2f | chrF %.2f | best BLEU %.2f (step %d)",
                self.state.step, metrics["loss"], metrics["ppl"], metrics["bleu"], metrics["chrf"],
                self.state.best_bleu, self.state.best_step,
            )
            self.state.validation_seconds += time.perf_counter() - started
            self.state.elapsed_seconds = self._elapsed()
            payload = self.training.payload(self.state, rng_states, metrics)
            # last.pt goes last: whatever step it records, best.pt and the averaging history are as new.
            if improved:
                save_checkpoint(self.ckpt_dir / "best.pt", payload)
            self.history.remember(self.model, self.state.step)
            save_checkpoint(self.ckpt_dir / "last.pt", payload)
            self.writer.flush()
            patience = self.tcfg.patience
            if patience and self.state.validations_since_best >= int(patience):
                log.info("no BLEU improvement in %d validations: stopping early (trainer.patience)", patience)
                stop = "patience"
        distributed.barrier()
        self._reset_interval()  # validation time does not count towards tokens/s
        return stop

    def _average_checkpoints(self) -> bool:
        """Evaluate the mean of the last validation weights; keep it as best.pt when it beats the best BLEU."""
        averaged = self.history.average()
        if averaged is None:
            return False
        weights, steps = averaged
        self.model.load_state_dict(weights)
        metrics = self.evaluator.validate(self.model, self.state.step, prefix="valid_averaged", illustrate=False)
        log.info(
            "average of the weights at steps %s: valid BLEU %.2f, chrF %.2f (best single checkpoint %.2f)",
            ", ".join(map(str, steps)), metrics["bleu"], metrics["chrf"], self.state.best_bleu,
        )
        if metrics["bleu"] <= self.state.best_bleu:
            return False
        payload = self.training.payload(self.state, self._rng_states(), {**metrics, "averaged_steps": steps})
        save_checkpoint(self.ckpt_dir / "best.pt", payload)
        log.info("the averaged weights score higher: saved as %s", self.ckpt_dir / "best.pt")
        self.state.best_bleu = metrics["bleu"]
        return True

    def _finish(self, reason: str) -> dict[str, Any]:
        """Rank 0: averaging, test of best.pt (beam search), BLEU by source length, results.json, hparams."""
        averaged = int(self.tcfg.average_last) > 0 and self._average_checkpoints()
        best_path = self.ckpt_dir / "best.pt"
        if not best_path.is_file():
            log.warning("%s is missing (deleted?); testing %s instead", best_path, self.ckpt_dir / "last.pt")
            best_path = self.ckpt_dir / "last.pt"
        best = load_checkpoint(best_path)
        self.model.load_state_dict(best["model"])
        description = f"best.pt from step {best['step']}" + (", averaged" if averaged else "")
        test = self.evaluator.test(self.model, self.state.step, description)
        train_seconds = self.state.elapsed_seconds
        compute_seconds = max(train_seconds - self.state.validation_seconds, 1e-9)
        valid = best.get("metrics") or {}
        results = {  # flat keys, read by scripts/compare.py
            "model": str(self.cfg.model.name),
            "data": str(self.cfg.data.name),
            "run_dir": str(self.run_dir.resolve()),
            "parameters": self.num_parameters,
            "steps": self.state.step,
            "epochs": round(self.state.epoch + self.state.position / max(len(self.sampler), 1), 3),
            "stopped_by": reason,
            "train_minutes": train_seconds / 60,
            "target_tokens_per_s": self.state.tokens / compute_seconds,
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.dist.world_size,
            "best_step": int(best["step"]),
            "averaged": averaged,
            "nonfinite_steps": self.state.nonfinite_steps,
            "valid_loss": valid.get("loss"),
            "valid_ppl": valid.get("ppl"),
            "valid_bleu": valid.get("bleu"),
            "valid_chrf": valid.get("chrf"),
            "valid_sentences": valid.get("sentences"),
            **test,
        }
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        board.log_hparams(self.writer, self.cfg, results, self.state.step)
        log.info("results written to %s", self.run_dir / "results.json")
        return results

    def close(self) -> None:
        """Flush TensorBoard events, also when training ends with an error (the curves up to it stay readable)."""
        if self.writer is not None:
            self.writer.close()
