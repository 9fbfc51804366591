"""Gradient attributions of a translation to its source tokens, the explanations that stand beside attention.

For a target forced through the model (its own translation or a given reference, as `inference.forced` does for
attention), the attribution of target step t to source position s says how much log p(y_t | y_<t, x) owes to the
embedding of source token s. The methods are Captum's (any PyTorch model; Kokhlikyan et al. 2020):
  - `saliency`: |gradient| of the log-probability with respect to the embedding (Simonyan et al. 2014);
  - `input-x-gradient`: embedding times gradient (Shrikumar et al. 2016);
  - `integrated-gradients`: embedding times the gradient averaged along the straight path from an all-zero
    source embedding (Sundararajan et al. 2017); over positions and dimensions a row sums to
    log p(y_t | x) - log p(y_t | zero source), up to the path integral's error (completeness).
Every family is explained the same way, at the output of its source embedding (`Seq2SeqModel.source_embedding`),
so the fixed-context RNN, which has no attention, is explained too. An attribution vector is reduced to its L2
norm over the embedding dimensions and each row is divided by its sum (as inseq does), so a map reads like an
attention map: rows are the target pieces and the step that emits "</s>", columns the source pieces and the
"</s>" the encoder is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.models.base import Seq2SeqModel, eval_mode

ATTENTION = "attention"
METHODS = ("saliency", "input-x-gradient", "integrated-gradients")
EXPLANATIONS = (ATTENTION, *METHODS)  # what `inspect --explain` draws; attention is read by forced decoding
INTEGRATION_STEPS = 50  # Captum's default number of points on the integrated-gradients path
BATCH_TOKENS = 20_000  # source + target tokens per batch of path points: bounds the memory of one backward pass


@contextmanager
def _source_embedded_as(module: nn.Module, embeddings: torch.Tensor) -> Iterator[None]:
    """The next call of `module` (the source's embedding, which every family computes first) returns
    `embeddings` instead, so gradients reach those vectors; later calls (a shared target embedding) are left as
    they are."""

    def substitute(_module: nn.Module, _inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        handle.remove()
        return embeddings

    handle = module.register_forward_hook(substitute)
    try:
        yield
    finally:
        handle.remove()


def _forced_log_probabilities(model: Seq2SeqModel, src_ids: Sequence[int],
                              tgt_ids: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function Captum differentiates: source embeddings (B, S+1, E) -> log-probabilities (B, T+1) of the
    forced target y_1..y_T, "</s>" under teacher forcing."""
    device = next(model.parameters()).device
    src = torch.tensor([[*src_ids, model.eos_id]], device=device)
    tgt_in = torch.tensor([[model.bos_id, *tgt_ids]], device=device)
    tgt_out = torch.tensor([[*tgt_ids, model.eos_id]], device=device)

    def log_probabilities(embeddings: torch.Tensor) -> torch.Tensor:
        count = embeddings.size(0)
        with _source_embedded_as(model.source_embedding, embeddings):
            logits = model(src.expand(count, -1), torch.ones(count, src.size(1), dtype=torch.bool, device=device),
                           tgt_in.expand(count, -1)).logits
        return F.log_softmax(logits.float(), dim=-1).gather(-1, tgt_out.expand(count, -1)[..., None])[..., 0]

    return log_probabilities


def embedding_attributions(model: Seq2SeqModel, src_ids: Sequence[int], tgt_ids: Sequence[int],
                           method: str) -> torch.Tensor:
    """(T+1, S+1, E) float32 attributions of each forced target step to each source embedding dimension, by
    one of METHODS; `src_ids` and `tgt_ids` without "</s>"."""
    from captum.attr import InputXGradient, IntegratedGradients, Saliency  # it loads pyplot: not for training's AER

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; one of {', '.join(METHODS)}.")
    if not src_ids:
        raise ValueError("attributions need at least one source token.")
    forward = _forced_log_probabilities(model, src_ids, tgt_ids)
    rows = len(tgt_ids) + 1
    with eval_mode(model), torch.backends.cudnn.flags(enabled=False):  # cuDNN RNNs have no backward in eval mode
        with torch.no_grad():
            source = torch.tensor([[*src_ids, model.eos_id]], device=next(model.parameters()).device)
            embedded = model.source_embedding(source).float()
        inputs = embedded.repeat(rows, 1, 1).requires_grad_()  # one copy per target step: row t explains target t
        targets = list(range(rows))
        if method == "saliency":
            result = Saliency(forward).attribute(inputs, target=targets, abs=True)
        elif method == "input-x-gradient":
            result = InputXGradient(forward).attribute(inputs, target=targets)
        else:
            tokens_per_point = len(src_ids) + len(tgt_ids) + 2
            result = IntegratedGradients(forward).attribute(
                inputs, target=targets, n_steps=INTEGRATION_STEPS,
                internal_batch_size=max(rows, BATCH_TOKENS // tokens_per_point))
    return result.detach().float()


def attributions(model: Seq2SeqModel, src_ids: Sequence[int], tgt_ids: Sequence[int], method: str) -> torch.Tensor:
    """(T+1, S+1) map of how much each forced target step owes to each source token (`embedding_attributions`
    reduced to L2 norms, each row summing to 1; a row nothing influences stays 0), the shape of an attention
    map of the same pair."""
    norms = embedding_attributions(model, src_ids, tgt_ids, method).norm(dim=-1)
    return norms / norms.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)
