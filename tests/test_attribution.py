"""Gradient attributions (seq2seq/analysis/attribution.py) on tiny untrained models of every family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from seq2seq.analysis.attribution import METHODS, attributions, embedding_attributions
from seq2seq.config import model_config
from seq2seq.models import build_model

PAD = 0
SRC, TGT = [5, 9, 7, 12, 6], [4, 8, 11]  # 5 source and 3 target tokens: a map is 4 x 6 with the "</s>" row and column
FAMILIES = {
    "rnn": {"name": "rnn", "embed_dim": 12, "hidden_size": 16, "encoder_layers": 2, "decoder_layers": 2},
    "bahdanau": {"name": "bahdanau", "cell": "lstm", "embed_dim": 12, "hidden_size": 16, "attention_dim": 10},
    "transformer": {"name": "transformer", "d_model": 16, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2,
                    "ff_dim": 32},
}
SHARED = {**FAMILIES["transformer"], "share_embeddings": True}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the models here are tiny


def tiny(config: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_config(config), 20, 20).eval()


def forced_log_probabilities(model: torch.nn.Module, src: list[int], tgt: list[int]) -> torch.Tensor:
    """log p(y_t | y_<t, x) of every target token and "</s>", by the model's own forward (no hooks)."""
    source = torch.tensor([[*src, model.eos_id]])
    with torch.no_grad():
        logits = model(source, torch.ones_like(source, dtype=torch.bool), torch.tensor([[model.bos_id, *tgt]])).logits
    return F.log_softmax(logits, dim=-1)[0].gather(-1, torch.tensor([*tgt, model.eos_id])[:, None])[:, 0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", [*FAMILIES, "transformer with shared embeddings"])
def test_every_family_gets_a_map_shaped_like_attention_with_rows_summing_to_one(family: str, method: str) -> None:
    model = tiny(FAMILIES.get(family, SHARED))
    result = attributions(model, SRC, TGT, method)
    assert result.shape == (len(TGT) + 1, len(SRC) + 1)
    assert torch.isfinite(result).all() and (result >= 0).all()
    torch.testing.assert_close(result.sum(dim=-1), torch.ones(len(TGT) + 1))
    assert not model.training  # given back in eval mode


@pytest.mark.parametrize("family", FAMILIES)
def test_integrated_gradients_add_up_to_the_change_from_an_all_zero_source(family: str) -> None:
    """Completeness: row t sums (over positions and dimensions) to log p(y_t | x) - log p(y_t | zero source), the
    latter computed by a copy of the model whose source embeddings are all zero."""
    model = tiny(FAMILIES[family])
    baseline = copy.deepcopy(model)
    with torch.no_grad():
        baseline.source_embedding.weight.zero_()
    expected = forced_log_probabilities(model, SRC, TGT) - forced_log_probabilities(baseline, SRC, TGT)
    raw = embedding_attributions(model, SRC, TGT, "integrated-gradients")
    assert raw.shape == (len(TGT) + 1, len(SRC) + 1, model.source_embedding.embedding_dim)
    assert expected.abs().max() > 0.01  # the source matters, so the check below is not 0 = 0
    # the path integral is approximated on 50 points: within 5 % of the largest change
    torch.testing.assert_close(raw.sum(dim=(1, 2)), expected, atol=0.05 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_source_token_embedded_as_the_baseline_gets_no_attribution(family: str) -> None:
    """The padding id embeds to the zero vector, the integration's starting point: input x gradient and
    integrated gradients give it nothing, while the gradient itself (saliency) is not zero there."""
    model = tiny(FAMILIES[family])
    src = [5, 9, PAD, 12, 6]
    for method in ("input-x-gradient", "integrated-gradients"):
        assert attributions(model, src, TGT, method)[:, 2].abs().max() < 1e-6
    assert attributions(model, src, TGT, "saliency")[:, 2].min() > 0


@pytest.mark.parametrize("method", METHODS)
def test_shared_embeddings_are_attributed_on_the_source_side_only(method: str) -> None:
    """With one embedding for both sides, only its source call is explained: the same as a model whose source
    embedding is a separate copy of the same weights."""
    shared = tiny(SHARED)
    separate = tiny(FAMILIES["transformer"])
    separate.load_state_dict(shared.state_dict())  # its src_embed.weight is the shared one
    torch.testing.assert_close(attributions(shared, SRC, TGT, method), attributions(separate, SRC, TGT, method))


def test_an_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="saliency, input-x-gradient, integrated-gradients"):
        attributions(tiny(FAMILIES["rnn"]), SRC, TGT, "attention")
