"""Model families and `build_model`, which turns a Hydra `model` config into a model or a readable error; the
keys each family takes, their types and defaults are its schema in seq2seq/config.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from seq2seq.config import model_config

from .bahdanau import BahdanauSeq2Seq
from .base import DecoderState, ModelOutput, Seq2SeqModel, count_parameters, map_state
from .rnn import RNNSeq2Seq
from .transformer import TransformerSeq2Seq

__all__ = [
    "BahdanauSeq2Seq",
    "DecoderState",
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


def build_model(model_cfg: Mapping[str, Any], src_vocab_size: int, tgt_vocab_size: int) -> Seq2SeqModel:
    """Build the model named by `model_cfg.name` (rnn | bahdanau | transformer) from a DictConfig or dict; keys left
    out take the family's defaults (seq2seq/config.py), so checkpoints from before a key existed still build.

    Raises ValueError (a ConfigError) naming the offending key for an unknown family, an unknown key (with the
    closest known one) or a value that cannot work.
    """
    config = model_config(model_cfg)
    for side, size in (("source", src_vocab_size), ("target", tgt_vocab_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 4:
            raise ValueError(
                f"{side} vocabulary size {size!r} is too small; it must hold at least the 4 special tokens"
            )
    return MODELS[config.name](src_vocab_size, tgt_vocab_size, config)
