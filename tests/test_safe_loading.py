"""Checkpoints load with torch.load(weights_only=True): a file that asks to unpickle anything beyond tensors,
containers and NumPy RNG states is refused in one line, and files written by earlier versions still load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seq2seq.checkpoint import CheckpointError, load_checkpoint, load_model
from seq2seq.inference.predict import translate_sentences
from seq2seq.runtime import rng_state, set_rng_state
from seq2seq.training.state import AveragingHistory


class _WritesAFile:
    """Unpickling this runs exec(), which writes `marker`: what a malicious shared checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    payload = {"format_version": 1, "config": {}, "model": {}, "src_tokenizer": b"x", "tgt_tokenizer": b"x",
               "metrics": _WritesAFile(marker)}
    torch.save(payload, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(evil)
    assert str(error.value).startswith(f"refusing to load {evil}: it asks to unpickle exec, which could run")
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_translate_refuses_it_in_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    result = subprocess.run(
        [sys.executable, "-m", "seq2seq.translate", "--checkpoint", str(evil), "你好"],
        capture_output=True, text=True, timeout=120, env=os.environ, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "refusing to load" in result.stderr
    assert not marker.exists()


def test_checkpoints_of_the_previous_format_still_translate_and_resume(checkpoints, tmp_path):
    """A training checkpoint as earlier versions wrote it (torch.save with weights_only=False in mind): NumPy's
    RNG state as runtime.rng_state gives it, an optimizer state, no recorded normalisation."""
    base = torch.load(checkpoints["rnn"], weights_only=False)  # the test's own file, written just before
    np.random.seed(5)
    saved_rng = rng_state({"loader": torch.Generator().manual_seed(3)})
    expected_draw = np.random.rand(3)
    model = load_model(checkpoints["rnn"]).model
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.ones(1, 3, dtype=torch.long)
    model(ids, torch.ones(1, 3, dtype=torch.bool), ids[:, :2]).logits.sum().backward()
    optimizer.step()
    old = tmp_path / "old-last.pt"
    torch.save({**base, "optimizer": optimizer.state_dict(), "rng": [saved_rng], "train_state": {"step": 60}}, old)

    payload = load_checkpoint(old)
    set_rng_state(payload["rng"][0])
    assert np.allclose(np.random.rand(3), expected_draw)
    torch.optim.AdamW(model.parameters()).load_state_dict(payload["optimizer"])
    loaded = load_model(old)
    (translation,) = translate_sentences(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, ["我是学生。"])
    assert isinstance(translation.text, str)


def test_averaging_history_loads_safely(tmp_path):
    history = AveragingHistory(tmp_path, keep=2)
    layer = torch.nn.Linear(2, 2)
    for step in (1, 2):
        torch.nn.init.constant_(layer.weight, float(step))
        history.remember(layer, step)
    averaged, steps = history.average()
    assert steps == [1, 2] and torch.allclose(averaged["weight"], torch.full((2, 2), 1.5))
    malicious_checkpoint(tmp_path / "step_000000003.pt", tmp_path / "marker")
    with pytest.raises(CheckpointError, match="refusing to load"):
        history.average()
    assert not (tmp_path / "marker").exists()
