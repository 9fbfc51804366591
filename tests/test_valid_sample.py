"""trainer.valid_max_sentences scores a seeded sample spread over the validation split, not its first rows."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from omegaconf import OmegaConf

from seq2seq.data.prepare import PreparedData
from seq2seq.data.split import spread_sample
from seq2seq.training.validation import Evaluator


class _Writer:
    def add_scalar(self, *args: object) -> None:
        pass


def test_spread_sample_is_seeded_sorted_and_covers_the_split():
    first, again = spread_sample(1500, 100, seed=7), spread_sample(1500, 100, seed=7)
    assert np.array_equal(first, again) and np.all(np.diff(first) > 0) and len(first) == 100
    assert first.min() < 150 and first.max() > 1350  # spread over the split, not its first 100 rows
    assert not np.array_equal(first, spread_sample(1500, 100, seed=8))
    assert np.array_equal(spread_sample(40, None, seed=7), np.arange(40))
    assert np.array_equal(spread_sample(40, 90, seed=7), np.arange(40))


def test_validation_decodes_the_sample_with_its_references(monkeypatch):
    """Tatoeba's order puts the shortest sentences first: the first N rows would score only those."""
    size = 300
    valid = datasets.Dataset.from_dict({
        "src": [f"source {i}" for i in range(size)], "tgt": [f"target {i}" for i in range(size)],
        "src_ids": [[5] * (1 + i // 10) for i in range(size)], "tgt_ids": [[6] for _ in range(size)],
    })
    data = PreparedData(datasets.DatasetDict({"valid": valid}), None, None, None, None)
    cfg = OmegaConf.create({
        "trainer": {"valid_max_sentences": 30, "seed": 11, "num_attention_samples": 0, "valid_beam_size": 1},
        "data": {"tgt_lang": "en"},
    })
    evaluator = Evaluator(cfg, data, torch.device("cpu"), "fp32", _Writer())
    decoded: list[list[str]] = []
    monkeypatch.setattr(evaluator, "loss", lambda model: (1.0, 2.7))
    monkeypatch.setattr(evaluator, "translate", lambda model, sources, beam: decoded.append(sources) or
                        [source.replace("source", "target") for source in sources])
    metrics = evaluator.validate(None, step=1, illustrate=False)

    rows = spread_sample(size, 30, seed=11).tolist()
    assert decoded == [[f"source {i}" for i in rows]] and metrics["sentences"] == 30
    assert metrics["chrf"] == 100.0  # each hypothesis was scored against its own reference
    assert max(rows) > size // 2
