"""Model families and `build_model`, which turns a Hydra `model` config into a model or a readable error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .bahdanau import BahdanauSeq2Seq
from .base import DecoderState, ModelOutput, Seq2SeqModel, count_parameters, map_state
from .rnn import CONTEXTS, RNNSeq2Seq
from .transformer import TransformerSeq2Seq

__all__ = [
    "BahdanauSeq2Seq",
    "DecoderState",
    "MODEL_OPTIONS",
    "ModelOutput",
    "RNNSeq2Seq",
    "Seq2SeqModel",
    "TransformerSeq2Seq",
    "build_model",
    "count_parameters",
    "map_state",
]

MODELS: dict[str, type[Seq2SeqModel]] = {
    "rnn": RNNSeq2Seq,
    "bahdanau": BahdanauSeq2Seq,
    "transformer": TransformerSeq2Seq,
}

# Per family: option -> kind of value. Options left out of the config take the constructor's default.
MODEL_OPTIONS: dict[str, dict[str, str]] = {
    "rnn": {
        "cell": "cell",
        "embed_dim": "size",
        "hidden_size": "size",
        "encoder_layers": "size",
        "decoder_layers": "size",
        "bidirectional": "bool",
        "context": "context",
        "dropout": "probability",
        "tie_output": "bool",
    },
    "bahdanau": {
        "cell": "cell",
        "embed_dim": "size",
        "hidden_size": "size",
        "encoder_layers": "size",
        "decoder_layers": "size",
        "attention_dim": "size",
        "dropout": "probability",
        "tie_output": "bool",
    },
    "transformer": {
        "d_model": "size",
        "num_heads": "size",
        "encoder_layers": "size",
        "decoder_layers": "size",
        "ff_dim": "size",
        "dropout": "probability",
        "attention_dropout": "probability",
        "norm_first": "bool",
        "positional": "positional",
        "max_positions": "size",
        "tie_output": "bool",
        "share_embeddings": "bool",
    },
}

CHOICES = {"cell": ("gru", "lstm"), "positional": ("sinusoidal", "learned"), "context": CONTEXTS}


def _check(name: str, key: str, kind: str, value: Any) -> None:
    where = f"model.{key}={value!r} ({name})"
    if kind == "size":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where} must be a positive integer")
    elif kind == "probability":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{where} must be a number in [0, 1)")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
    elif value not in CHOICES[kind]:
        raise ValueError(f"{where} is not one of {', '.join(CHOICES[kind])}")


def build_model(model_cfg: Mapping[str, Any], src_vocab_size: int, tgt_vocab_size: int) -> Seq2SeqModel:
    """Build the model named by `model_cfg.name` (rnn | bahdanau | transformer) from a DictConfig or dict.

    Raises ValueError naming the offending option for an unknown family, an unknown option (likely a typo)
    or a bad value.
    """
    cfg = dict(model_cfg.items())
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model.name={name!r}; choose one of {', '.join(MODELS)} (e.g. model=transformer)")
    options = MODEL_OPTIONS[name]
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for model {name}; known: {', '.join(options)}")
    for key, value in cfg.items():
        _check(name, key, options[key], value)
    for side, size in (("source", src_vocab_size), ("target", tgt_vocab_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 4:
            raise ValueError(
                f"{side} vocabulary size {size!r} is too small; it must hold at least the 4 special tokens"
            )
    return MODELS[name](src_vocab_size, tgt_vocab_size, **cfg)
