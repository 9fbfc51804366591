"""Decoding with CTranslate2 (`--engine ctranslate2`): `search.decode`'s contract over a `ctranslate2.Translator` of
the exported model, so batching, truncation, tokenization and output stay the one path of `translate_sentences`.

How its results are made to be ours:
  - lengths: our limit is per sentence (floor(a * S + b) tokens, then EOS is forced), CTranslate2's per call, so
    each call holds the sentences of one limit L. A hypothesis that stops at L tokens without EOS is rescored with
    the EOS ours forces after them (`score_batch`);
  - PAD and BOS, which ours never produces, are not suppressed: suppressing renormalises every step's
    log-probabilities and would shift every score. A sentence with one in a hypothesis (rare: neither is ever a
    training target) is decoded again with both suppressed. EOS is allowed from the first step, the input is never cut;
  - scores: greedy returns the sum of log-probabilities, EOS included. For beam search CTranslate2 divides by
    length ** penalty while we divide by the GNMT ((5 + n) / 6) ** alpha, so it is asked for all `beam`
    hypotheses with their sums (penalty 1 over n tokens, EOS included, undone exactly; penalty 0 when alpha is 0,
    which also keeps its early stop) and they are ranked here by our penalty;
  - what stays different: the scores of a sentence decoded again (see above), and with alpha > 0 CTranslate2's beam
    search stops once `beam` hypotheses are finished where ours goes on until no open beam can beat them, so a
    later, longer winner of ours can be missing. CTranslate2 returns no attention.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from seq2seq.inference.search import Hypothesis, _max_lengths, length_penalty_factor
from seq2seq.models.base import Seq2SeqModel

COMPUTE_TYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


class CTranslate2Decoder:
    """Decodes batches of our token ids with a CTranslate2 model exported from the same checkpoint."""

    def __init__(self, model_dir: Path, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, device: torch.device,
                 compute_type: str, threads: int) -> None:
        import ctranslate2

        self.compute_type = compute_type
        self.translator = ctranslate2.Translator(
            str(model_dir), device=device.type, device_index=device.index or 0, compute_type=compute_type,
            inter_threads=1, intra_threads=threads,
        )
        self.src_pieces = src_tokenizer.pieces(range(src_tokenizer.vocab_size))
        self.tgt_pieces = tgt_tokenizer.pieces(range(tgt_tokenizer.vocab_size))
        self.tgt_ids = {piece: i for i, piece in enumerate(self.tgt_pieces)}
        self.never = [[self.tgt_pieces[PAD_ID]], [self.tgt_pieces[BOS_ID]]]

    def __call__(self, model: Seq2SeqModel, src: torch.Tensor, src_mask: torch.Tensor, beam_size: int,
                 length_penalty: float, max_len_a: float, max_len_b: float, n_best: int = 1,
                 return_attention: bool = True) -> list[list[Hypothesis]]:
        """As `search.decode`: per sentence the `n_best` best hypotheses, best first; attention is always None."""
        limits = _max_lengths(model, src_mask, max_len_a, max_len_b).tolist()
        rows = src.cpu().tolist()
        lengths = src_mask.sum(dim=1).tolist()  # real tokens, the appended EOS included
        sources = [[self.src_pieces[i] for i in row[: length - 1]] for row, length in zip(rows, lengths)]
        by_limit: dict[int, list[int]] = defaultdict(list)
        for index, limit in enumerate(limits):
            by_limit[limit].append(index)
        results: list[list[Hypothesis]] = [[] for _ in rows]
        for limit, indices in by_limit.items():
            batch = [sources[i] for i in indices]
            for index, hypotheses in zip(indices, self._decode(batch, limit, beam_size, length_penalty, n_best)):
                results[index] = hypotheses
        return results

    def _decode(self, sources: list[list[str]], limit: int, beam_size: int, alpha: float,
                n_best: int) -> list[list[Hypothesis]]:
        """Sentences that share the length limit `limit`; those whose output holds PAD or BOS again with both
        suppressed."""
        decoded = self._translate(sources, limit, beam_size, alpha, n_best, suppress=False)
        again = [i for i, hypotheses in enumerate(decoded) if hypotheses is None]
        if again:
            redone = self._translate([sources[i] for i in again], limit, beam_size, alpha, n_best, suppress=True)
            for i, hypotheses in zip(again, redone):
                decoded[i] = hypotheses
        return decoded

    def _translate(self, sources: list[list[str]], limit: int, beam_size: int, alpha: float, n_best: int,
                   suppress: bool) -> list[list[Hypothesis] | None]:
        """One CTranslate2 call; None for a sentence with PAD or BOS in a hypothesis (unless suppressed)."""
        raw_sums = beam_size == 1 or alpha == 0
        outputs = self.translator.translate_batch(
            sources, beam_size=beam_size, num_hypotheses=beam_size, length_penalty=0 if raw_sums else 1,
            max_decoding_length=max(limit, 1), min_decoding_length=0, return_end_token=True, return_scores=True,
            suppress_sequences=self.never if suppress else None, max_input_length=0, max_batch_size=0,
        )
        candidates: list[dict[tuple[int, ...], float]] = []  # per sentence: tokens -> sum of log-probabilities
        cut: list[tuple[int, tuple[int, ...]]] = []  # (sentence, tokens) that reached the limit without EOS
        for sentence, output in enumerate(outputs):
            found: dict[tuple[int, ...], float] = {}
            for pieces, score in zip(output.hypotheses, output.scores):
                ids = tuple(self.tgt_ids[piece] for piece in pieces)
                if ids and ids[-1] == EOS_ID:
                    found[ids[:-1]] = score if raw_sums else score * len(ids)
                else:  # ours forces EOS after `limit` tokens
                    cut.append((sentence, ids[:limit]))
            candidates.append(found)
        if cut:
            scored = self.translator.score_batch(
                [sources[sentence] for sentence, _ in cut],
                [[self.tgt_pieces[i] for i in ids] for _, ids in cut], max_input_length=0,
            )
            for (sentence, ids), result in zip(cut, scored):
                candidates[sentence].setdefault(ids, sum(result.log_probs))
        decoded: list[list[Hypothesis] | None] = []
        for found in candidates:
            if not suppress and any(PAD_ID in ids or BOS_ID in ids for ids in found):
                decoded.append(None)
                continue
            if beam_size > 1:
                found = {ids: raw / length_penalty_factor(len(ids) + 1, alpha) for ids, raw in found.items()}
            best = sorted(found.items(), key=lambda item: item[1], reverse=True)[:n_best]
            decoded.append([Hypothesis(tokens=list(ids), score=float(score), attention=None) for ids, score in best])
        return decoded
