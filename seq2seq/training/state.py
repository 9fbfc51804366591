"""What a training checkpoint holds beyond the weights, how a run resumes from it, and the averaging history.

Exact resume: a checkpoint holds the model, optimizer, scheduler, scaler, every rank's RNG states (the global
ones and its DataLoader's generator) and the sampler position (epoch + batches consumed in it), taken between
two updates, so a resumed run replays the same batches with the same dropout masks as an uninterrupted one.
The file format itself (atomic writes, version checks, rebuilding a model to translate) is `checkpoint.py`'s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from seq2seq.checkpoint import (
    CheckpointError, checkpoint_tokenizers, load_checkpoint, load_torch_file, save_checkpoint,
)
from seq2seq.config import TrainConfig, saved_config
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.training.runs import data_source

TRAINING_KEYS = ("optimizer", "scheduler", "rng", "train_state")


@dataclass
class TrainState:
    """Counters that go into checkpoints so a resumed run carries on exactly."""

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


@dataclass
class Training:
    """The objects a checkpoint saves and a resume restores, besides the counters."""

    cfg: TrainConfig
    model: torch.nn.Module
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    world_size: int
    num_parameters: int

    def payload(self, state: TrainState, rng_states: list[dict[str, Any]], metrics: dict[str, Any]) -> dict:
        """A checkpoint that translates on its own and resumes exactly (`rng_states`: one per rank, rank order)."""
        return {
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "src_tokenizer": self.src_tok.proto,
            "tgt_tokenizer": self.tgt_tok.proto,
            "src_normalization": self.src_tok.normalization,
            "tgt_normalization": self.tgt_tok.normalization,
            "step": state.step,
            "epoch": state.epoch,
            "best_valid_bleu": state.best_bleu,
            "metrics": metrics,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_states,
            "sampler": {"epoch": state.epoch, "position": state.position},
            "train_state": asdict(state),
            "world_size": self.world_size,
            "num_parameters": self.num_parameters,
        }

    def restore(
        self, path: Path, resets: frozenset[str] = frozenset()
    ) -> tuple[TrainState, list[dict[str, Any]], dict[str, Any]]:
        """Load weights, optimizer, scheduler and scaler from `path` -> the saved counters, per-rank RNG states and
        the config the checkpoint was written with. `resets` (trainer.resume_reset) leaves the optimizer or the
        schedule as freshly built, and the sampler at the start of its epoch.

        Every way the file cannot continue this configuration is a CheckpointError saying what to do.
        """
        payload = load_checkpoint(path, map_location="cpu")
        for key in TRAINING_KEYS:
            if payload.get(key) is None:
                raise CheckpointError(
                    f"{path} holds no training state ({key} is missing): it can translate but not resume training. "
                    "Resume from checkpoints/last.pt of a run, or start a new run."
                )
        if checkpoint_tokenizers(payload) != (self.src_tok, self.tgt_tok):
            raise CheckpointError(
                f"{path} was trained with other SentencePiece models or normalisation than data={self.cfg.data.name} "
                "and this tokenizer config produce; resume with the data and tokenizer settings of that run."
            )
        try:
            self.model.load_state_dict(payload["model"])
            if "optimizer" not in resets:
                self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[-1].strip()[:200]  # torch lists every key; one says enough
            raise CheckpointError(
                f"{path} does not fit the configured {self.cfg.model.name} model ({first}). Resume with the "
                "model settings the checkpoint was trained with (see its run's .hydra/config.yaml)."
            ) from error
        if "schedule" not in resets:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        state = TrainState(**payload["train_state"])
        if "sampler" in resets:
            state.position = 0
        if "schedule" in resets:
            state.schedule_anchor = None
        return state, payload["rng"], payload["config"]


# Settings a resume cannot continue exactly, with the trainer.resume_reset that continues anyway (None: nothing
# can, the weights or vocabularies are those of that setting). Checked by prefix: "model." is every model key.
_RESUME_RULES: tuple[tuple[str, str | None, str], ...] = (
    ("model.", None, "the weights belong to that model"),
    ("tokenizer.", None, "the vocabularies belong to that tokenizer"),
    ("data source", "sampler", "it was trained on another corpus"),
    ("data.src_lang", None, "the model translates the other way"),
    ("data.tgt_lang", None, "the model translates the other way"),
    ("data.", "sampler", "the training split and its batches differ"),
    ("trainer.max_tokens", "sampler", "the saved batch position points into other batches"),
    ("trainer.accumulate", "sampler", "the saved batch position points into other updates"),
    ("trainer.pad_multiple", "sampler", "the saved batch position points into other batches"),
    ("trainer.seed", "sampler", "later epochs would shuffle differently"),
    ("optim.schedule", "schedule", "the learning-rate schedule would change its course"),
    ("optim.warmup_steps", "schedule", "the learning-rate schedule would change its course"),
    ("optim.min_lr_ratio", "schedule", "the learning-rate schedule would change its course"),
)
_NOT_COMPARED = ("data.name", "data.path", "data.mirror_path", "data.download_url", "data.download_member",
                 "data.num_proc", "data.alignments_path")  # name: languages; corpus: `data_source`; AER: not trained on


def flat_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"group.key": value}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(path: Path, cfg: TrainConfig) -> None:
    """Refuse, before anything is built or written, a checkpoint this config cannot continue exactly, in one line
    naming the first setting that differs: a model, tokenizer or direction change always, a change of the data,
    batching or schedule unless trainer.resume_reset asks for that part to start afresh. Other settings (optim.lr,
    max_steps, validation, ...) apply as given (`Trainer._resume` logs them). The weights are checked by
    `Training.restore`."""
    resets = cfg.trainer.resets
    saved = load_checkpoint(path, map_location="cpu")["config"]
    theirs = flat_settings(saved)
    ours = flat_settings(asdict(cfg))
    theirs["data source"], ours["data source"] = data_source(saved_config(saved).data), data_source(cfg.data)
    for setting in ours:
        if setting in _NOT_COMPARED or setting not in theirs or theirs[setting] == ours[setting]:
            continue  # a key the checkpoint predates cannot be compared
        rule = next((rule for rule in _RESUME_RULES if setting.startswith(rule[0])), None)
        if rule is None or rule[1] in resets:
            continue
        _prefix, reset, why = rule
        advice = (
            f"resume with the checkpoint's value, or add trainer.resume_reset=[{reset}] to continue without "
            "an exact replay" if reset else "resume with that run's settings (its .hydra/config.yaml), or start a "
            "new run without trainer.resume"
        )
        raise CheckpointError(
            f"cannot resume from {path}: {setting} differs (checkpoint: {theirs[setting]}, this run: "
            f"{ours[setting]}) and {why}; {advice}."
        )


def changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings of this run that differ from the checkpoint's: {key: (checkpoint, this run)}."""
    theirs = flat_settings(saved)
    ours = flat_settings(asdict(cfg))
    return {key: (theirs[key], value) for key, value in ours.items() if key in theirs and theirs[key] != value}


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
