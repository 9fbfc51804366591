"""Rank 0's checkpoints: each validation scored and saved, best.pt kept for the best one, last.pt for resuming.

best.pt is the checkpoint with the highest validation BLEU, or at equal BLEU the lowest validation loss (early on,
every BLEU is 0); last.pt is written last at every validation, so whatever step it records, best.pt and the
averaging history are as new. `trainer.patience` counts validations since the best.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seq2seq.checkpoint import save_checkpoint
from seq2seq.runtime import resident_memory
from seq2seq.training import board
from seq2seq.training.limits import StoppingRules
from seq2seq.training.state import AveragingHistory, CheckpointParts, Counters
from seq2seq.training.validation import Evaluator

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("seq2seq.train")


class CheckpointKeeper:
    """Validation and the checkpoints it decides: best.pt, last.pt and the weights kept for averaging."""

    def __init__(self, folder: Path, parts: CheckpointParts, evaluator: Evaluator, history: AveragingHistory,
                 writer: SummaryWriter, rules: StoppingRules) -> None:
        self.folder = folder
        self.best_path, self.last_path = folder / "best.pt", folder / "last.pt"
        self.parts = parts
        self.evaluator = evaluator
        self.history = history
        self.writer = writer
        self.rules = rules

    @staticmethod
    def beats_best(counters: Counters, metrics: dict[str, Any]) -> bool:
        """A higher BLEU than best.pt's, or the same BLEU with a lower validation loss."""
        if metrics["bleu"] != counters.best_bleu:
            return metrics["bleu"] > counters.best_bleu
        return metrics["loss"] < counters.best_loss

    @staticmethod
    def record_best(counters: Counters, metrics: dict[str, Any], averaged: bool) -> None:
        counters.best_bleu, counters.best_loss = metrics["bleu"], metrics["loss"]
        counters.best_step = counters.step
        counters.best_averaged = averaged
        counters.validations_since_best = 0

    def validate(self, counters: Counters, rng_states: list[dict[str, Any]]) -> str | None:
        """Score the model, save best.pt if it is the best so far, remember its weights, save last.pt ->
        "patience" when trainer.patience validations in a row were no better, else None."""
        started = time.perf_counter()
        metrics = self.evaluator.validate(self.parts.model, counters.step)
        improved = self.beats_best(counters, metrics)
        if improved:
            self.record_best(counters, metrics, averaged=False)
        else:
            counters.validations_since_best += 1
        memory = resident_memory()
        if memory is not None:
            board.log_memory(self.writer, counters.step, *memory)
        log.info(
            "step %d | valid loss %.3f | ppl %.2f | BLEU %.2f | chrF %.2f | best BLEU %.2f (step %d%s)%s",
            counters.step, metrics["loss"], metrics["ppl"], metrics["bleu"], metrics["chrf"],
            counters.best_bleu, counters.best_step, ", averaged" if counters.best_averaged else "",
            "" if memory is None else " | RSS %.2f GiB (peak %.2f)" % memory,
        )
        counters.validation_seconds += time.perf_counter() - started
        counters.elapsed_seconds = self.rules.elapsed()
        payload = self.parts.payload(counters, rng_states, metrics)
        if improved:
            save_checkpoint(self.best_path, payload)
        self.history.remember(self.parts.model, counters.step)
        save_checkpoint(self.last_path, payload)
        self.writer.flush()
        patience = self.rules.patience
        if patience and counters.validations_since_best >= patience:
            log.info("no better validation in %d validations: stopping early (trainer.patience)", patience)
            return "patience"
        return None

    def save_last(self, counters: Counters, rng_states: list[dict[str, Any]]) -> None:
        """last.pt at the current step without validating (a signal, trainer.save_every_minutes)."""
        counters.elapsed_seconds = self.rules.elapsed()
        save_checkpoint(self.last_path, self.parts.payload(counters, rng_states, {}))
        log.info("step %d: saved %s", counters.step, self.last_path)
