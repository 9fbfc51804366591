"""Checkpoints that carry everything needed to translate or resume, written so a crash never corrupts one.

A checkpoint is one `torch.save` file holding:
  format_version, seq2seq_version   — to refuse files this code cannot read, with a clear message;
  config                            — the whole composed Hydra config as plain containers;
  model                             — the model's state_dict;
  src_tokenizer, tgt_tokenizer      — the SentencePiece model protos (bytes), so a copied file still translates;
  src_normalization, tgt_normalization — each side's Unicode normalisation (absent from older files: NFKC on both);
  step, epoch, best_valid_bleu, metrics;
  optimizer, scheduler, scaler, rng — training state for an exact resume (absent from inference-only exports).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from seq2seq import __version__
from seq2seq.atomic import atomic_write
from seq2seq.data.tokenizer import LEGACY_NORMALIZATION, Tokenizer
from seq2seq.models import build_model
from seq2seq.models.base import Seq2SeqModel

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "model", "src_tokenizer", "tgt_tokenizer")


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or written by an incompatible version."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically, so a crash or kill during the save keeps the previous checkpoint intact."""
    payload = {"format_version": FORMAT_VERSION, "seq2seq_version": __version__, **payload}
    try:
        with atomic_write(path) as handle:
            torch.save(payload, handle)
    except (OSError, RuntimeError) as error:  # torch reports a failed write (e.g. a full disk) as RuntimeError
        cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        kept = f"the previous {Path(path).name} is intact" if Path(path).exists() else "nothing was written"
        raise CheckpointError(
            f"cannot write checkpoint {path}: {cause}; {kept}. Free disk space or fix the permissions, then "
            "continue with trainer.resume=auto."
        ) from error


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint, turning every way it can be unusable into a CheckpointError that names the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path}. Training writes checkpoints to "
            "runs/<data>/<model>/<timestamp>/checkpoints/{best,last}.pt."
        )
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as {path}/checkpoints/best.pt.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or is not a seq2seq checkpoint ({error}). "
            "Use another checkpoint (last.pt or best.pt of the run) or retrain."
        ) from error
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is a PyTorch file but not a seq2seq checkpoint (expected keys {REQUIRED_KEYS}).")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']} (written by seq2seq "
            f"{payload.get('seq2seq_version', '?')}); this seq2seq {__version__} reads format {FORMAT_VERSION}. "
            "Translate it with the version that wrote it, or retrain."
        )
    return payload


def checkpoint_tokenizers(payload: dict[str, Any]) -> tuple[Tokenizer, Tokenizer]:
    """The source and target tokenizers a checkpoint was trained with, each with the normalisation it records;
    files written before it was recorded normalised both sides with NFKC."""
    src, tgt = (
        Tokenizer.from_proto(payload[f"{side}_tokenizer"], payload.get(f"{side}_normalization", LEGACY_NORMALIZATION))
        for side in ("src", "tgt")
    )
    return src, tgt


@dataclass
class LoadedModel:
    """A model ready to translate, with the tokenizers and configuration it was trained with."""

    model: Seq2SeqModel
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    config: DictConfig
    checkpoint: dict[str, Any]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the trained model from a checkpoint alone (no run folder or cache needed)."""
    payload = load_checkpoint(path)
    try:
        config = OmegaConf.create(payload["config"])
        src_tokenizer, tgt_tokenizer = checkpoint_tokenizers(payload)
        model = build_model(config.model, src_tokenizer.vocab_size, tgt_tokenizer.vocab_size)
    except (ValueError, KeyError, AttributeError, RuntimeError) as error:
        raise CheckpointError(
            f"cannot rebuild a model from {path}: {error}. Was it written by seq2seq's trainer?"
        ) from error
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: the weights do not fit the model its config describes ({error}). "
            "The file was probably edited or written by an incompatible version."
        ) from error
    model.to(device).eval()
    return LoadedModel(model, src_tokenizer, tgt_tokenizer, config, payload)
