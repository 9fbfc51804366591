"""Checkpoints that carry everything needed to translate or resume, written so a crash never corrupts one.

A checkpoint is one `torch.save` file holding:
  format_version, seq2seq_version   — to refuse files this code cannot read, with a clear message;
  config                            — the whole typed config as plain containers (`saved_config` reads it back);
  model                             — the model's state_dict;
  src_tokenizer, tgt_tokenizer      — the SentencePiece model protos (bytes), so a copied file still translates;
  src_normalization, tgt_normalization — each side's Unicode normalisation (absent from older files: NFKC on both);
  step, epoch, best_valid_bleu, metrics;
  optimizer, scheduler, scaler, rng — training state for an exact resume (absent from inference-only exports).
  train_state, runtime              — the run's counters, and the device type and precision it trained in.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seq2seq import __version__
from seq2seq.atomic import atomic_write
from seq2seq.config import RunConfig, saved_config
from seq2seq.data.tokenizer import LEGACY_NORMALIZATION, Tokenizer
from seq2seq.errors import UsageError
from seq2seq.models import build_model
from seq2seq.models.base import Seq2SeqModel

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "model", "src_tokenizer", "tgt_tokenizer")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(UsageError):
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


def _numpy_rng_globals() -> list[Any]:
    """What NumPy's RNG state (`np.random.get_state()`, in every training checkpoint's "rng") needs beyond
    tensors and plain containers: an array of uint32 and its dtype, under NumPy 1's and NumPy 2's module names."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def load_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` with `weights_only=True`: tensors, numbers, text, containers and NumPy RNG states only, so a
    shared file cannot run code when loaded. Anything else is a CheckpointError naming what it asked for."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign pickle: refused below
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"GLOBAL ([\w.]+)", str(error))
        if "Weights only load failed" not in str(error) or unsupported is None:
            raise _unreadable(path) from error
        raise CheckpointError(
            f"refusing to load {path}: it asks to unpickle {unsupported.group(1)}, which could run arbitrary code; "
            "seq2seq checkpoints hold only tensors, numbers, text and RNG states. Use a checkpoint from a source "
            "you trust, written by seq2seq's trainer."
        ) from error
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}.") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError, TypeError) as error:
        raise _unreadable(path) from error  # what the weights-only unpickler raises on bytes that are no pickle


def _unreadable(path: Path) -> CheckpointError:
    """A file torch cannot read, described in our own words: torch's text names internals and can advise loading
    with weights_only=False, which would let a shared file run code."""
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if not head:
        what = "the file is empty"
    elif head == ZIP_MAGIC:
        what = "the file is truncated or damaged (an interrupted copy or write)"
    else:
        what = "the file is not a seq2seq checkpoint"
    return CheckpointError(
        f"cannot read checkpoint {path}: {what}. Use another checkpoint (last.pt or best.pt of the run) or retrain."
    )


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
    payload = load_torch_file(path, map_location)
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
    config: RunConfig  # as saved, laid over today's defaults (`saved_config`)
    checkpoint: dict[str, Any]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the trained model from a checkpoint alone (no run folder or cache needed)."""
    payload = load_checkpoint(path)
    try:
        config = saved_config(payload["config"])
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
