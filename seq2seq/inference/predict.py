"""Translate a stream of sentences with a trained model: the one path shared by validation, `translate` and `evaluate`.

Sentences are read `chunk_size` at a time from any iterable, so a file of millions of lines streams through with
bounded memory. Inside a chunk they are sorted by length and batched under a token budget (little padding, few
model calls), decoded, and handed back in input order.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
from tqdm import tqdm

from seq2seq.inference import search
from seq2seq.data.batching import collate
from seq2seq.data.tokenizer import EOS_ID, Tokenizer
from seq2seq.inference.search import Hypothesis, decode
from seq2seq.models.base import Seq2SeqModel, eval_mode
from seq2seq.runtime import CONCRETE_PRECISIONS, autocast

log = logging.getLogger(__name__)

MAX_SOURCE_TOKENS = 250  # longer inputs are truncated: training data is cleaned to a few hundred characters


@dataclass
class TranslatedHypothesis:
    """One candidate translation. `attention` is (T, S) float32 on the CPU: a row per target piece (plus a last
    row for the end of sentence when decoding reports it), a column per entry of `Translation.src_pieces`."""

    text: str
    pieces: list[str]
    score: float
    attention: torch.Tensor | None = None

    @property
    def attention_pieces(self) -> list[str]:
        """Row labels of `attention`: the target pieces, and "</s>" when the end-of-sentence step is included."""
        if self.attention is not None and self.attention.shape[0] == len(self.pieces) + 1:
            return [*self.pieces, "</s>"]
        return list(self.pieces)


@dataclass
class Translation:
    """A source sentence and its hypotheses, best first. `src_pieces` are the pieces the model saw, after any
    truncation and ending with the "</s>" the encoder is given (as in training), so they label attention columns;
    an empty sentence has none."""

    source: str
    src_pieces: list[str]
    hypotheses: list[TranslatedHypothesis] = field(default_factory=list)
    truncated: bool = False

    @property
    def best(self) -> TranslatedHypothesis:
        return self.hypotheses[0]

    @property
    def text(self) -> str:
        return self.hypotheses[0].text if self.hypotheses else ""

    @property
    def num_src_tokens(self) -> int:
        """Source subword tokens, the final "</s>" not counted."""
        return max(len(self.src_pieces) - 1, 0)


def source_token_limit(
    model: Seq2SeqModel, max_len_a: float = search.MAX_LEN_A, max_len_b: int = search.MAX_LEN_B
) -> int:
    """Longest source (in tokens, before the appended EOS) this model is given: MAX_SOURCE_TOKENS, and no more than
    its positional tables allow on the source side or for the longest target decoding may then produce
    (a * S + b, plus BOS)."""
    limit = MAX_SOURCE_TOKENS
    if model.max_source_positions:
        limit = min(limit, model.max_source_positions - 1)
    target_positions = model.max_target_positions
    if target_positions and max_len_a > 0:
        limit = min(limit, math.floor((target_positions - 1 - max_len_b) / max_len_a))
    return max(limit, 1)


def quantize_int8(model: Seq2SeqModel) -> Seq2SeqModel:
    """A copy of `model` for CPU inference whose Linear layers multiply in int8 (weights quantised once, activations
    per call; PyTorch's dynamic quantisation). Faster on CPUs, a little less accurate: see README "Speed levers"."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _batches(order: list[int], lengths: list[int], max_tokens: int, max_sentences: int | None) -> Iterator[list[int]]:
    """Consecutive runs of `order` (sorted by length) whose padded size B * (longest + EOS) fits `max_tokens`."""
    batch: list[int] = []
    longest = 0
    for index in order:
        grown = max(longest, lengths[index] + 1)
        full = max_sentences is not None and len(batch) >= max_sentences
        if batch and ((len(batch) + 1) * grown > max_tokens or full):
            yield batch
            batch, grown = [], lengths[index] + 1
        batch.append(index)
        longest = grown
    if batch:
        yield batch


def translate_sentences(
    model: Seq2SeqModel,
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    sentences: Iterable[str],
    *,
    beam_size: int = search.BEAM_SIZE,
    length_penalty: float = search.LENGTH_PENALTY,
    max_len_a: float = search.MAX_LEN_A,
    max_len_b: int = search.MAX_LEN_B,
    n_best: int = 1,
    max_tokens: int = 4096,
    max_sentences: int | None = None,
    device: str | torch.device = "cpu",
    chunk_size: int = 2000,
    precision: str = "fp32",
    max_source_tokens: int | None = None,
    attention: bool = True,
    decoder: Callable[..., list[list[Hypothesis]]] = decode,
) -> Iterator[Translation]:
    """Yield one Translation per input sentence, in input order, reading `chunk_size` sentences at a time.

    Empty (or whitespace-only) sentences give an empty translation without calling the model. Sources longer
    than `max_source_tokens` (default: `source_token_limit(model)`) are truncated, with one warning per call.
    `max_tokens` bounds B * (longest source + EOS) of a batch; `max_sentences` optionally bounds B. `precision`
    bf16/fp16 decodes under autocast (on CPUs without native bf16 that is slower than fp32). `attention=False`
    keeps no attention (hypotheses carry None), which callers that only want the text decode faster with.
    `decoder` decodes a batch as `search.decode` does (the CTranslate2 engine is another one).
    """
    if beam_size < 1 or n_best < 1 or chunk_size < 1 or max_tokens < 1:
        raise ValueError("beam_size, n_best, chunk_size and max_tokens must all be at least 1.")
    if n_best > beam_size:
        raise ValueError(f"n_best ({n_best}) cannot exceed beam_size ({beam_size}).")
    if precision not in CONCRETE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(CONCRETE_PRECISIONS)}, got {precision!r}.")
    device = torch.device(device)
    limit = max_source_tokens or source_token_limit(model, max_len_a, max_len_b)
    state = {"warned": False}
    with eval_mode(model):
        iterator = iter(sentences)
        while chunk := list(islice(iterator, chunk_size)):
            yield from _translate_chunk(
                model, src_tok, tgt_tok, chunk, state, limit=limit, beam_size=beam_size,
                length_penalty=length_penalty, max_len_a=max_len_a, max_len_b=max_len_b, n_best=n_best,
                max_tokens=max(max_tokens, limit + 1), max_sentences=max_sentences, device=device, precision=precision,
                attention=attention, decoder=decoder,
            )


def _translate_chunk(
    model: Seq2SeqModel, src_tok: Tokenizer, tgt_tok: Tokenizer, chunk: list[str], state: dict, *, limit: int,
    beam_size: int, length_penalty: float, max_len_a: float, max_len_b: int, n_best: int, max_tokens: int,
    max_sentences: int | None, device: torch.device, precision: str, attention: bool,
    decoder: Callable[..., list[list[Hypothesis]]],
) -> list[Translation]:
    """Translate one chunk; the returned list is in the chunk's order."""
    chunk = [sentence if isinstance(sentence, str) else str(sentence) for sentence in chunk]
    nonempty = [i for i, sentence in enumerate(chunk) if src_tok.normalize(sentence)]
    ids: list[list[int]] = [[] for _ in chunk]
    for i, encoded in zip(nonempty, src_tok.encode_batch([chunk[i] for i in nonempty])):
        ids[i] = encoded
    truncated = [len(ids[i]) > limit for i in range(len(chunk))]
    if any(truncated) and not state["warned"]:
        first = truncated.index(True)
        log.warning(
            "an input has %d source tokens; inputs longer than %d tokens are truncated to fit the model "
            "(this warning is shown once): %.60s...", len(ids[first]), limit, chunk[first],
        )
        state["warned"] = True
    ids = [row[:limit] for row in ids]
    results = [
        Translation(
            sentence, src_tok.pieces([*ids[i], EOS_ID]) if ids[i] else [],
            [TranslatedHypothesis("", [], 0.0, None)], truncated[i],
        )
        for i, sentence in enumerate(chunk)
    ]
    lengths = [len(row) for row in ids]
    order = sorted((i for i in range(len(chunk)) if lengths[i] > 0), key=lambda i: lengths[i])
    with torch.inference_mode(), autocast(device, precision):
        for batch in _batches(order, lengths, max_tokens, max_sentences):
            inputs = collate([{"src_ids": ids[i], "index": i} for i in batch]).to(device)
            nbests = decoder(
                model, inputs.src, inputs.src_mask, beam_size=beam_size, length_penalty=length_penalty,
                max_len_a=max_len_a, max_len_b=max_len_b, n_best=n_best, return_attention=attention,
            )
            for i, hypotheses in zip(batch, nbests):
                results[i].hypotheses = [
                    _to_translated(hypothesis, tgt_tok, lengths[i] + 1)
                    for hypothesis in sorted(hypotheses, key=lambda h: h.score, reverse=True)
                ]
    return results


def _to_translated(hypothesis: Hypothesis, tgt_tok: Tokenizer, src_len: int) -> TranslatedHypothesis:
    attention = hypothesis.attention
    if attention is not None:
        attention = attention.detach()[:, :src_len].float().cpu()
    return TranslatedHypothesis(
        text=tgt_tok.decode(hypothesis.tokens),
        pieces=tgt_tok.pieces(hypothesis.tokens),
        score=float(hypothesis.score),
        attention=attention,
    )


def with_progress(translations: Iterable[Translation], total: int, what: str) -> Iterator[Translation]:
    """`translations` with a progress bar on stderr when it is a terminal (tqdm's rule), so a long final
    validation, test or evaluation shows how far it is; nothing is printed into logs or pipes."""
    with tqdm(translations, total=total, desc=what, unit="sent", file=sys.stderr, disable=None, leave=False) as bar:
        yield from bar
