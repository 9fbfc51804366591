"""trainer.valid_max_sentences (and test_max_sentences) score a seeded sample spread over the split, not its
first rows."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from seq2seq.config import saved_config
from seq2seq.data.prepare import PreparedData
from seq2seq.data.split import spread_sample
from seq2seq.training.validation import Evaluator


class _Writer:
    """Takes any TensorBoard call and drops it."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def test_spread_sample_is_seeded_sorted_and_covers_the_split():
    first, again = spread_sample(1500, 100, seed=7), spread_sample(1500, 100, seed=7)
    assert np.array_equal(first, again) and np.all(np.diff(first) > 0) and len(first) == 100
    assert first.min() < 150 and first.max() > 1350  # spread over the split, not its first 100 rows
    assert not np.array_equal(first, spread_sample(1500, 100, seed=8))
    assert np.array_equal(spread_sample(40, None, seed=7), np.arange(40))
    assert np.array_equal(spread_sample(40, 90, seed=7), np.arange(40))


SIZE = 300


def split_rows() -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "src": [f"source {i}" for i in range(SIZE)], "tgt": [f"target {i}" for i in range(SIZE)],
        "src_ids": [[5] * (1 + i // 10) for i in range(SIZE)], "tgt_ids": [[6] for _ in range(SIZE)],
    })


@pytest.fixture
def evaluator(monkeypatch):
    data = PreparedData(datasets.DatasetDict({"valid": split_rows(), "test": split_rows()}), None, None, None, None)
    cfg = saved_config({
        "trainer": {"valid_max_sentences": 30, "test_max_sentences": 40, "seed": 11, "num_attention_samples": 0,
                    "valid_beam_size": 1, "test_beam_size": 1, "length_penalty": 1.0},
        "data": {"tgt_lang": "en", "name": "fake"},
    })
    evaluator = Evaluator(cfg, data, torch.device("cpu"), "fp32", _Writer())
    evaluator.decoded = []
    monkeypatch.setattr(evaluator, "loss", lambda model: (1.0, 2.7))
    monkeypatch.setattr(evaluator, "translate", lambda model, sources, beam, what="": evaluator.decoded.append(sources)
                        or [source.replace("source", "target") for source in sources])
    return evaluator


def test_validation_decodes_the_sample_with_its_references(evaluator):
    """Tatoeba's order puts the shortest sentences first: the first N rows would score only those."""
    metrics = evaluator.validate(None, step=1, illustrate=False)
    rows = spread_sample(SIZE, 30, seed=11).tolist()
    assert evaluator.decoded == [[f"source {i}" for i in rows]] and metrics["sentences"] == 30
    assert metrics["chrf"] == 100.0  # each hypothesis was scored against its own reference
    assert max(rows) > SIZE // 2


def test_a_capped_test_scores_a_sample_too(evaluator):
    results = evaluator.test(None, step=1, description="best.pt")
    rows = spread_sample(SIZE, 40, seed=11).tolist()
    assert evaluator.decoded == [[f"source {i}" for i in rows]] and results["test_sentences"] == 40
    assert results["test_chrf"] == 100.0
