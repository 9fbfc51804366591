"""Model families and `build_model`, which turns a family's typed config (its schema in seq2seq/config.py, checked
by `check_config` or read back by `saved_config`) into a model."""

from __future__ import annotations

from seq2seq.config import ModelConfig

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


def build_model(config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2SeqModel:
    """The model of family `config.name` (rnn | bahdanau | transformer) for these vocabularies.

    Raises ValueError for a vocabulary too small to hold the special tokens.
    """
    for side, size in (("source", src_vocab_size), ("target", tgt_vocab_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 4:
            raise ValueError(
                f"{side} vocabulary size {size!r} is too small; it must hold at least the 4 special tokens"
            )
    return MODELS[config.name](src_vocab_size, tgt_vocab_size, config)
