"""The one interface every translation model implements, so training and decoding never ask which model it is.

Tensors are batch-first. Masks are boolean with True on real tokens. Decoder state is a dict whose tensors
all have the batch (or batch*beam) on dimension 0, so search can reorder hypotheses without knowing the model.

Numerics: models may run under `torch.autocast` (bf16 on CPU). Softmaxes over attention scores and the
log-softmax of `decode_step` are always computed in float32, and `ModelOutput.logits` is returned as float32,
so a loss computed from it is accurate even outside the autocast region.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID  # the tokenizers' special ids, defined there once

DecoderState = dict[str, Any]

# What every report says of a model without attention (has_attention False), after "the <name> model has no attention".
NO_ATTENTION = "its decoder sees the source only through one fixed context vector, so there is no alignment to draw"


@dataclass
class ModelOutput:
    """Teacher-forced result: logits (B, T, V) float32 and, when asked, named attention maps (float32)."""

    logits: torch.Tensor
    attention: dict[str, torch.Tensor] = field(default_factory=dict)


class Seq2SeqModel(nn.Module):
    """Encoder-decoder translation model.

    attention maps (when `return_attention=True`), per model family:
      - "cross": (B, T, S) target-to-source attention, one row per target position, summing to 1 over the real
        source positions and exactly 0 on padding. Bahdanau: the additive attention of each step.
        Transformer: the mean over heads of the LAST decoder layer's cross-attention — the layer whose
        context feeds the output projection directly, which is why it is the usual stand-in for an alignment
        (earlier layers are often diffuse); every layer and head is in "cross_layers".
      - transformer only: "cross_layers" (L, B, H, T, S), "self_layers" (L, B, H, T, T) (causal: zero above
        the diagonal), "encoder_layers" (L, B, H, S, S) (zero on padded keys).
    The fixed-context RNN has none and returns an empty dict. `decode_step` returns the matching per-step
    row of "cross" (B, S), or None for the fixed-context RNN.
    """

    has_attention: bool = False
    pad_id: int = PAD_ID  # the tokenizers' special ids: one vocabulary layout for every model
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    @property
    def max_source_positions(self) -> int | None:
        """Longest source (EOS included) the model can encode; None when unbounded. Inputs are cut to it."""
        return None

    @property
    def max_target_positions(self) -> int | None:
        """Longest target (BOS included) the model can score; None when unbounded. Decoding caps lengths by it."""
        return None

    @property
    def source_embedding(self) -> nn.Module:
        """The embedding that turns source ids into vectors. `encode` and `forward` call it on the source before
        anything else (before any target embedding, even when the two share weights), which is where gradient
        attributions to source tokens are taken (seq2seq/analysis/attribution.py)."""
        raise NotImplementedError

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        """Run the encoder once; the returned state is what `decode_step` starts from."""
        raise NotImplementedError

    def decode_step(
        self, state: DecoderState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, DecoderState]:
        """One incremental step: prev_tokens (B,) -> float32 log-probabilities (B, V), attention over source
        (B, S) or None, and the next state. Feeding BOS, y1, y2, ... reproduces `forward` position by position.
        State tensors are never modified in place: what changes is a new tensor, and what does not (the encoder's
        memory) is handed back as the same object, which beam search then does not reorder."""
        raise NotImplementedError

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False
    ) -> ModelOutput:
        """Teacher forcing: src (B, S), src_mask (B, S), tgt_in (B, T) = BOS + y -> logits (B, T, V)."""
        raise NotImplementedError


def map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor in a (nested) decoder state, e.g. `lambda t: t.index_select(0, order)`."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {key: map_state(value, fn) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(value, fn) for value in state)
    return state


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run without dropout, then give the model back in the mode it came in (training or not)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters; tied weights (e.g. shared embeddings) are counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 softmax of `scores` over the last dimension with exactly zero weight where `mask` is False.

    -inf works in every floating dtype (a finite "large negative" would overflow fp16 or be too small for
    fp32 logits); every query must see at least one real key, which holds as sources are never empty.
    """
    return scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1)
