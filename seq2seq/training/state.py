"""What a training checkpoint carries beyond the weights (the counters, the parts it saves), and the averaging history.

How a run resumes from it is `resume.py`'s; the file format itself (atomic writes, version checks, rebuilding a
model to translate) is `checkpoint.py`'s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from seq2seq.checkpoint import load_torch_file, save_checkpoint
from seq2seq.config import RunConfig, TrainerConfig
from seq2seq.data.tokenizer import Tokenizer


@dataclass
class Counters:
    """Where a run stands (steps, sampler position, best validation, time): saved in checkpoints so a resumed run
    carries on exactly."""

    step: int = 0
    epoch: int = 0  # sampler epoch of the next batch
    position: int = 0  # batches of that epoch already consumed
    best_bleu: float = -math.inf
    best_step: int = 0
    best_loss: float = math.inf  # validation loss of best.pt: breaks ties in BLEU
    best_averaged: bool = False  # best.pt holds the average of the last validations' weights
    validations_since_best: int = 0
    nonfinite_steps: int = 0
    out_of_memory_steps: int = 0  # windows skipped because a batch did not fit in memory
    elapsed_seconds: float = 0.0  # wall clock of training (validations included), summed over sessions
    validation_seconds: float = 0.0
    tokens: int = 0  # target tokens trained on, all ranks
    last_validated_step: int = -1
    # (update, factor): a cosine schedule re-fitted at a resume that changed its length decays from this factor
    # at this update to its floor at the new end (optim.lr_multiplier), so the rate never jumps.
    schedule_anchor: tuple[int, float] | None = None
    # The cosine schedule's last update when the time limit ends the run before the step budget: re-estimated
    # from the run's pace every log interval (Trainer._follow_time_limit), so the rate reaches its floor as time
    # runs out. None: the step budget (total_steps) is the end.
    planned_steps: int | None = None


@dataclass
class CheckpointParts:
    """The objects a checkpoint saves and a resume restores, besides the counters."""

    cfg: RunConfig
    model: torch.nn.Module
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    world_size: int
    num_parameters: int
    device: torch.device
    precision: str

    def payload(self, counters: Counters, rng_states: list[dict[str, Any]], metrics: dict[str, Any]) -> dict:
        """A checkpoint that translates on its own and resumes exactly (`rng_states`: one per rank, rank order)."""
        return {
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "src_tokenizer": self.src_tok.proto,
            "tgt_tokenizer": self.tgt_tok.proto,
            "src_normalization": self.src_tok.normalization,
            "tgt_normalization": self.tgt_tok.normalization,
            "step": counters.step,
            "epoch": counters.epoch,
            "best_valid_bleu": counters.best_bleu,
            "metrics": metrics,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_states,
            "sampler": {"epoch": counters.epoch, "position": counters.position},
            "train_state": asdict(counters),
            "runtime": {"device": self.device.type, "precision": self.precision},
            "world_size": self.world_size,
            "num_parameters": self.num_parameters,
        }


def total_steps(trainer_cfg: TrainerConfig, steps_per_epoch: int) -> int | None:
    """Updates a run makes when it is bounded by steps or epochs (for the cosine schedule and the ETA); a time
    limit may end it sooner (Counters.planned_steps)."""
    bounds = [bound for bound in (trainer_cfg.max_steps,
                                  trainer_cfg.max_epochs and trainer_cfg.max_epochs * steps_per_epoch) if bound]
    return min(bounds) if bounds else None


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point entries; other entries (counters, integer buffers) from the last."""
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = (torch.stack([state[key].double() for state in states]).mean(0)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


class AveragingHistory:
    """The weights of the last `keep` validations as small files (checkpoints/average/step_*.pt), so the
    end-of-training average survives a resume."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder = folder
        self.keep = keep

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob("step_*.pt"))

    @staticmethod
    def _step(path: Path) -> int:
        return int(path.stem.split("_")[1])

    def remember(self, model: torch.nn.Module, step: int) -> None:
        if self.keep <= 0:
            return
        save_checkpoint(self.folder / f"step_{step:09d}.pt", {"model": model.state_dict(), "step": step})
        for old in self._files()[: -self.keep]:
            old.unlink()

    def forget_after(self, step: int) -> None:
        """After a resume: weights saved past `step` belong to the abandoned continuation."""
        for stale in self._files():
            if self._step(stale) > step:
                stale.unlink()

    def average(self) -> tuple[dict[str, torch.Tensor], list[int]] | None:
        """The mean of the remembered weights and their steps; None with fewer than two."""
        files = self._files()
        if len(files) < 2:
            return None
        states = [load_torch_file(f)["model"] for f in files]
        return average_state_dicts(states), [self._step(f) for f in files]
