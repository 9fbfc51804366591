"""Padded lengths rounded up to a multiple: fewer shapes, the same budget, and the same loss as unpadded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from seq2seq.data.batching import TokenBatchSampler, collate, padded_length
from seq2seq.models import build_model
from seq2seq.training.step import token_loss

from conftest import TINY_MODELS


def _examples(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"src_ids": rng.integers(4, 30, rng.integers(1, 40)).tolist(), "tgt_ids": rng.integers(4, 30, rng.integers(1, 40)).tolist()}
        for _ in range(count)
    ]


@pytest.mark.parametrize("multiple", [1, 8])
def test_sampler_batches_fit_the_budget_in_rounded_lengths(multiple):
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(1, 120, 3000), rng.integers(1, 120, 3000)
    sampler = TokenBatchSampler(src, tgt, max_tokens=600, shuffle=True, seed=3, pad_multiple=multiple)
    seen = []
    for batch in sampler:
        longest = padded_length(int(max(np.max(src[batch]), np.max(tgt[batch]))) + 1, multiple)
        assert len(batch) * longest <= 600
        seen.extend(batch)
    assert sorted(seen) == list(range(3000))


def test_rounding_cuts_the_number_of_distinct_shapes():
    rng = np.random.default_rng(2)
    src, tgt = rng.integers(1, 60, 5000), rng.integers(1, 60, 5000)
    examples = [{"src_ids": [5] * s, "tgt_ids": [6] * t} for s, t in zip(src, tgt)]

    def shapes(multiple: int) -> set[tuple]:
        sampler = TokenBatchSampler(src, tgt, max_tokens=800, shuffle=True, seed=0, pad_multiple=multiple)
        found = set()
        for batch in sampler:
            collated = collate([examples[i] for i in batch], pad_multiple=multiple)
            assert collated.src.size(1) % multiple == 0 and collated.tgt_in.size(1) % multiple == 0
            found.add((tuple(collated.src.shape), tuple(collated.tgt_in.shape)))
        return found

    assert len(shapes(8)) < len(shapes(1)) / 2


def test_collate_rounds_both_sides_and_keeps_the_tokens():
    batch = collate([{"src_ids": [5, 6, 7], "tgt_ids": [8]}, {"src_ids": [9], "tgt_ids": [10] * 9}], pad_multiple=8)
    assert batch.src.shape == (2, 8) and batch.tgt_in.shape == (2, 16)
    assert batch.num_src_tokens == 6 and batch.num_tgt_tokens == 12
    assert batch.src[0, :4].tolist() == [5, 6, 7, 3] and batch.src[0, 4:].eq(0).all()


@pytest.mark.parametrize("family", ["rnn", "bahdanau", "transformer"])
def test_extra_padding_leaves_the_loss_unchanged(family):
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": family, **TINY_MODELS[family]}), 32, 32).eval()
    examples = _examples(6)
    losses = []
    for multiple in (1, 8):
        batch = collate(examples, pad_multiple=multiple)
        with torch.no_grad():
            logits = model(batch.src, batch.src_mask, batch.tgt_in).logits
            losses.append(float(token_loss(logits, batch.tgt_out)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
