"""Padded lengths rounded up to a multiple: fewer shapes, the same budget, and the same loss as unpadded batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from seq2seq.data.batching import TokenBatchSampler, collate, padded_length
from seq2seq.config import model_config
from seq2seq.models import build_model
from seq2seq.training.update import token_loss

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
    model = build_model(model_config({"name": family, **TINY_MODELS[family]}), 32, 32).eval()
    examples = _examples(6)
    losses = []
    for multiple in (1, 8):
        batch = collate(examples, pad_multiple=multiple)
        with torch.no_grad():
            logits = model(batch.src, batch.src_mask, batch.tgt_in).logits
            losses.append(float(token_loss(logits, batch.tgt_out)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.corpus
@pytest.mark.parametrize("multiple", [1, 8])
def test_trainer_trains_on_batches_padded_and_budgeted_as_configured(corpus_path, cache, tmp_path, multiple):
    """The trainer's own training batches (not a loader built beside it): every length a multiple of
    trainer.pad_multiple, padded size within max_tokens, and a resumed epoch serves the tail of the same batches."""
    from hydra import compose, initialize_config_dir

    import seq2seq.train  # noqa: F401  (registers the config schema and resolvers)
    from seq2seq.paths import CONFIG_DIR
    from seq2seq.config import check_config
    from seq2seq.training.setup import build_trainer

    corpus = tmp_path / "slice.tsv"
    corpus.write_text("".join(corpus_path.open(encoding="utf-8").readlines()[:3000]), encoding="utf-8")
    overrides = [
        "model=transformer", *(f"model.{key}={value}" for key, value in TINY_MODELS["transformer"].items()),
        f"data.path={corpus}", "data.split.valid_size=100", "data.split.test_size=100",
        "tokenizer.src_vocab_size=1500", "tokenizer.tgt_vocab_size=400", "tokenizer.character_coverage=0.98",
        "trainer.max_tokens=400", f"trainer.pad_multiple={multiple}", "trainer.device=cpu",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = check_config(compose(config_name="train", overrides=overrides))
    trainer = build_trainer(cfg, tmp_path / "run", torch.device("cpu"), "fp32")
    batches = list(itertools.islice(trainer._batches(), 40))
    for batch in batches:
        for tensor in (batch.src, batch.tgt_in, batch.tgt_out):
            assert tensor.size(1) % multiple == 0
        assert batch.size * max(batch.src.size(1), batch.tgt_in.size(1)) <= 400
        assert batch.num_tgt_tokens <= batch.tgt_in.numel()
    if multiple == 8:
        assert any(batch.src.size(1) > int(batch.src_mask.sum(1).max()) for batch in batches), "nothing was padded"

    trainer.counters.position = 25
    resumed = list(itertools.islice(trainer._batches(), 15))
    assert [b.indices.tolist() for b in resumed] == [b.indices.tolist() for b in batches[25:]]
