"""The end of a run, on rank 0: the average of the last validations' weights, the test of best.pt, results.json.

Every checkpoint is written by the time it starts, so a resumed run that was stopped here only does this part.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from seq2seq.atomic import atomic_write
from seq2seq.checkpoint import load_checkpoint, save_checkpoint
from seq2seq.runtime import resident_memory
from seq2seq.training import board

if TYPE_CHECKING:
    from seq2seq.training.trainer import Trainer

log = logging.getLogger("seq2seq.train")


def average_checkpoints(trainer: Trainer) -> None:
    """Evaluate the mean of the last validations' weights. When it beats best.pt it becomes best.pt, and last.pt
    records it as the best, so a resumed run does not replace it with a worse validation."""
    keeper, counters = trainer.keeper, trainer.counters
    averaged = keeper.history.average()
    if averaged is None:
        return
    weights, steps = averaged
    trainer.model.load_state_dict(weights)
    metrics = keeper.evaluator.validate(trainer.model, counters.step, prefix="valid_averaged", illustrate=False)
    log.info(
        "average of the weights at steps %s: valid BLEU %.2f, chrF %.2f, loss %.3f (best.pt: BLEU %.2f, loss %.3f)",
        ", ".join(map(str, steps)), metrics["bleu"], metrics["chrf"], metrics["loss"], counters.best_bleu,
        counters.best_loss,
    )
    if not keeper.beats_best(counters, metrics):
        return
    keeper.record_best(counters, metrics, averaged=True)
    last = load_checkpoint(keeper.last_path)  # this step's training state, written by its validation
    last["train_state"], last["best_valid_bleu"] = asdict(counters), counters.best_bleu
    save_checkpoint(keeper.best_path, {**last, "model": weights, "metrics": {**metrics, "averaged_steps": steps}})
    save_checkpoint(keeper.last_path, last)
    log.info("the averaged weights score higher: saved as %s, and %s records it as the best", keeper.best_path,
             keeper.last_path)


def _peak_memory() -> float | None:
    memory = resident_memory()
    return None if memory is None else round(memory[1], 3)


def finish_run(trainer: Trainer, reason: str) -> dict[str, Any]:
    """Averaging, the test of best.pt (beam search, BLEU by source length), results.json and the hparams row."""
    cfg, counters, keeper = trainer.cfg, trainer.counters, trainer.keeper
    peak_in_training = _peak_memory()
    if cfg.trainer.average_last > 0:
        average_checkpoints(trainer)
    best_path = keeper.best_path
    if not best_path.is_file():
        log.warning("%s is missing (deleted?); testing %s instead", best_path, keeper.last_path)
        best_path = keeper.last_path
    best = load_checkpoint(best_path)
    trainer.model.load_state_dict(best["model"])
    description = f"best.pt from step {best['step']}" + (", averaged" if counters.best_averaged else "")
    log.info("testing %s (beam %d)", description, cfg.trainer.test_beam_size)
    test = keeper.evaluator.test(trainer.model, counters.step, description)
    compute_seconds = max(counters.elapsed_seconds - counters.validation_seconds, 1e-9)
    valid = best.get("metrics") or {}
    results = {  # flat keys, read by scripts/compare.py
        "model": cfg.model.name,
        "data": cfg.data.name,
        "run_dir": str(trainer.run_dir.resolve()),
        "parameters": keeper.parts.num_parameters,
        "steps": counters.step,
        "epochs": round(trainer.epochs_done(), 3),
        "stopped_by": reason,
        "train_minutes": counters.elapsed_seconds / 60,
        "target_tokens_per_s": counters.tokens / compute_seconds,
        "target_tokens_per_step": counters.tokens / max(counters.step, 1),
        "device": str(trainer.device),
        "precision": trainer.precision,
        "world_size": trainer.dist.world_size,
        "best_step": best["step"],
        "averaged": counters.best_averaged,
        "nonfinite_steps": counters.nonfinite_steps,
        "out_of_memory_steps": counters.out_of_memory_steps,
        # this process's peak resident memory (a resumed run's counts from its resume), GiB
        "peak_rss_gib_training": peak_in_training,
        "peak_rss_gib": _peak_memory(),
        **{f"valid_{name}": valid.get(name) for name in ("loss", "ppl", "bleu", "chrf", "sentences")},
        **test,
    }
    with atomic_write(trainer.run_dir / "results.json") as handle:
        handle.write((json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())
    board.log_hparams(keeper.writer, cfg, results, counters.step)
    if peak_in_training is not None:
        log.info("peak resident memory of this process: %.2f GiB while training, %.2f GiB with the end of the run",
                 results["peak_rss_gib_training"], results["peak_rss_gib"])
    log.info("results written to %s", trainer.run_dir / "results.json")
    return results
