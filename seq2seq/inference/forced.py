"""Forced decoding: a given target is fed to the model with teacher forcing, to read the attention it puts on the
source while producing exactly that target, and the loss it assigns to it.

This is the one place that does it. `attend` is what the inspector and the TensorBoard heatmaps call (the
model's own translation, or a reference, then one teacher-forced pass); `force` scores many pairs in batches
for alignment error (seq2seq/analysis/alignment.py). The pass is `Seq2SeqModel.forward`, the same computation
the trainer's loss comes from, so `Forced.loss` is the trainer's token loss of that pair (no label smoothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seq2seq.data.batching import collate
from seq2seq.data.tokenizer import PAD_ID
from seq2seq.inference import search
from seq2seq.inference.search import decode
from seq2seq.models.base import Seq2SeqModel, eval_mode

FORCED_BATCH_TOKENS = 4000  # source + target tokens per teacher-forced batch: (L, B, H, T, S) maps stay small


@dataclass
class Forced:
    """One pair after forced decoding. `tokens` is the target without "</s>"; `loss` the summed negative
    log-likelihood (nats) of `tokens` + "</s>"; `layers` the (L, H, T+1, S+1) float32 cross-attention (rows:
    the target pieces and the step that emits "</s>"; columns: the source pieces and the "</s>" the encoder is
    given), every layer and head of a Transformer, Bahdanau as one layer with one head, None without attention;
    `cut` the pieces of a given reference past the model's target positions, left out (0 if none)."""

    tokens: list[int]
    loss: float
    layers: np.ndarray | None
    cut: int = 0


def target_token_limit(model: Seq2SeqModel) -> int | None:
    """Longest target (pieces, before "</s>") the model has positions for (BOS takes one); None when unbounded."""
    return model.max_target_positions - 1 if model.max_target_positions else None


def _cross_maps(attention: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(B, L, H, T, S) cross-attention of a teacher-forced `ModelOutput.attention`, None when there is none."""
    if "cross_layers" in attention:
        return attention["cross_layers"].transpose(0, 1)
    if "cross" in attention:
        return attention["cross"][:, None, None]
    return None


@torch.inference_mode()
def _force_batch(model: Seq2SeqModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                 device: torch.device) -> list[Forced]:
    batch = collate([{"src_ids": src, "tgt_ids": tgt} for src, tgt in pairs]).to(device)
    output = model(batch.src, batch.src_mask, batch.tgt_in, return_attention=model.has_attention)
    nll = F.cross_entropy(output.logits.float().transpose(1, 2), batch.tgt_out, ignore_index=PAD_ID,
                          reduction="none").sum(dim=1)
    maps = _cross_maps(output.attention)
    maps = None if maps is None else maps.float().cpu().numpy()
    results = []
    for row, (src, tgt) in enumerate(pairs):
        layers = None if maps is None else maps[row, :, :, : len(tgt) + 1, : len(src) + 1].copy()
        results.append(Forced(tokens=list(tgt), loss=float(nll[row]), layers=layers))
    return results


def force(model: Seq2SeqModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device,
          max_tokens: int = FORCED_BATCH_TOKENS) -> list[Forced]:
    """Forced decoding of (source ids, target ids) pairs, both without "</s>", in input order, in batches of
    similar lengths up to `max_tokens` padded tokens. Padding changes nothing: masked keys get zero weight.
    A target longer than `target_token_limit` is a ValueError: callers cut it and say so, or skip it and count."""
    limit = target_token_limit(model)
    longest_target = max((len(tgt) for _, tgt in pairs), default=0)
    if limit is not None and longest_target > limit:
        raise ValueError(f"a target of {longest_target} pieces is forced through a model with positions for {limit}.")
    batches: list[list[int]] = []
    longest = 0
    for index in sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1]))):
        length = len(pairs[index][0]) + len(pairs[index][1]) + 2
        if batches and max(longest, length) * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(index)
            longest = max(longest, length)
        else:
            batches.append([index])
            longest = length
    results: list[Forced | None] = [None] * len(pairs)
    with eval_mode(model):
        for batch in batches:
            for index, result in zip(batch, _force_batch(model, [pairs[i] for i in batch], device)):
                results[index] = result
    return results  # type: ignore[return-value]  # every index is filled


@torch.inference_mode()
def attend(model: Seq2SeqModel, src_ids: Sequence[int], device: torch.device,
           reference_ids: Sequence[int] | None = None, beam_size: int = 1,
           length_penalty: float = search.LENGTH_PENALTY, max_len_a: float = search.MAX_LEN_A,
           max_len_b: int = search.MAX_LEN_B) -> Forced:
    """The attention behind one target for one source (ids without "</s>"): the reference when given (cut to the
    model's target positions, `Forced.cut` saying by how much), else the model's own translation (greedy, or
    beam search with `beam_size` > 1), scored once more by forced decoding."""
    limit = target_token_limit(model)
    if reference_ids is not None and limit is not None and len(reference_ids) > limit:
        result = force(model, [(list(src_ids), list(reference_ids[:limit]))], device)[0]
        result.cut = len(reference_ids) - limit
        return result
    if reference_ids is None:
        src = torch.tensor([[*src_ids, model.eos_id]], device=device)  # decode() runs in eval mode
        hypothesis = decode(model, src, torch.ones_like(src, dtype=torch.bool), beam_size=beam_size,
                            length_penalty=length_penalty, max_len_a=max_len_a, max_len_b=max_len_b)[0][0]
        reference_ids = hypothesis.tokens
    return force(model, [(list(src_ids), list(reference_ids))], device)[0]
