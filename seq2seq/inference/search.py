"""Greedy and beam-search decoding, written once for every `Seq2SeqModel` through `encode` / `decode_step`.

Both decode a whole batch of sentences at once (beam search as B*beam rows whose decoder state is reordered with
`map_state`). A sentence stops when it is done; finished sentences leave the batch, so long sentences do not
make short ones pay. The only host synchronisation is one small transfer of per-sentence flags per step.

Lengths: a sentence with S real source tokens may produce at most floor(max_len_a * S + max_len_b) tokens
(also capped by the model's `max_target_positions`); at that point EOS is forced, and its log-probability counts.
PAD and BOS are never produced. The model is put in eval mode while decoding and handed back as it came.

Scores: greedy returns the sum of token log-probabilities (EOS included). Beam search ranks finished hypotheses by
that sum divided by the GNMT length penalty lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016), n = generated
tokens including EOS, alpha = `length_penalty`; alpha = 0 ranks by raw log-probability, larger alpha favours
longer outputs. The returned beam score is that normalised score.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seq2seq.config import BEAM_SIZE, LENGTH_PENALTY, MAX_LEN_A, MAX_LEN_B  # the schema's decoding defaults
from seq2seq.models.base import Seq2SeqModel, map_state


@dataclass
class Hypothesis:
    """One output: tokens without BOS/EOS, its score (see module doc) and attention (T, S) float32 on the CPU,
    T = len(tokens) + 1 rows (each token, then the final EOS step) and one column per real source position
    (src_mask True); None for models without attention."""

    tokens: list[int]
    score: float
    attention: torch.Tensor | None


def length_penalty_factor(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """GNMT length penalty ((5 + length) / 6) ** alpha; scores are divided by it."""
    return ((5 + length) / 6) ** alpha


@contextmanager
def _eval_mode(model: Seq2SeqModel) -> Iterator[None]:
    """Decode without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _max_lengths(model: Seq2SeqModel, src_mask: torch.Tensor, max_len_a: float, max_len_b: float) -> torch.Tensor:
    """(B,) longest allowed output per sentence, in tokens before EOS."""
    limits = torch.floor(src_mask.sum(dim=1) * max_len_a + max_len_b).long().clamp(min=0)
    if model.max_target_positions is not None:  # BOS + tokens must fit the model's positions
        limits = limits.clamp(max=model.max_target_positions - 1)
    return limits


def _restrict(log_probs: torch.Tensor, force_eos: torch.Tensor, model: Seq2SeqModel) -> torch.Tensor:
    """Never produce PAD or BOS; rows where `force_eos` is True may only produce EOS."""
    not_eos = torch.ones(log_probs.size(-1), dtype=torch.bool, device=log_probs.device)
    not_eos[model.eos_id] = False
    never = torch.zeros_like(not_eos)
    never[[model.pad_id, model.bos_id]] = True
    return log_probs.masked_fill((force_eos.unsqueeze(1) & not_eos) | never, float("-inf"))


def _attention_rows(attention: torch.Tensor | None, length: int, src_mask: torch.Tensor) -> torch.Tensor | None:
    if attention is None:
        return None
    return attention[:length][:, src_mask].float().cpu()


@torch.inference_mode()
def greedy_decode(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    max_len_a: float = MAX_LEN_A,
    max_len_b: float = MAX_LEN_B,
) -> list[Hypothesis]:
    """Pick the most probable token at every step; one hypothesis per sentence, in input order."""
    if src.size(0) == 0:
        return []
    with _eval_mode(model):
        batch = src.size(0)
        device = src.device
        limits = _max_lengths(model, src_mask, max_len_a, max_len_b)
        state = model.encode(src, src_mask)
        rows = torch.arange(batch, device=device)  # sentence of each active row
        prev = torch.full((batch,), model.bos_id, dtype=torch.long, device=device)
        scores = torch.zeros(batch, device=device)
        tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
        history: torch.Tensor | None = None
        results: list[Hypothesis | None] = [None] * batch
        step = 0
        while rows.numel():
            log_probs, attention, state = model.decode_step(state, prev)
            log_probs = _restrict(log_probs, step >= limits, model)
            best, prev = log_probs.max(dim=-1)
            scores = scores + best
            tokens = torch.cat([tokens, prev.unsqueeze(1)], dim=1)
            if attention is not None:
                step_attention = attention.float().unsqueeze(1)
                history = step_attention if history is None else torch.cat([history, step_attention], dim=1)
            finished = (prev == model.eos_id).cpu()
            step += 1
            if not finished.any():
                continue
            finished_rows = finished.nonzero().squeeze(1).tolist()
            sentence_ids = rows.cpu().tolist()
            row_tokens, row_scores = tokens.cpu(), scores.cpu()
            for row in finished_rows:
                sentence = sentence_ids[row]
                results[sentence] = Hypothesis(
                    tokens=row_tokens[row, :-1].tolist(),
                    score=float(row_scores[row]),
                    attention=_attention_rows(
                        history[row] if history is not None else None, step, src_mask[sentence]
                    ),
                )
            keep = (~finished).nonzero().squeeze(1).to(device)
            state = map_state(state, lambda t: t.index_select(0, keep))
            rows, prev, scores, tokens, limits = (t.index_select(0, keep) for t in (rows, prev, scores, tokens, limits))
            if history is not None:
                history = history.index_select(0, keep)
        return results  # type: ignore[return-value]


@torch.inference_mode()
def beam_search(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    beam_size: int = BEAM_SIZE,
    length_penalty: float = LENGTH_PENALTY,
    max_len_a: float = MAX_LEN_A,
    max_len_b: float = MAX_LEN_B,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search over all sentences at once; per sentence the `n_best` best hypotheses, best first.

    At each step every open beam proposes its extensions; of the 2*beam best, EOS-ending ones ranked within the
    top `beam` are finished (kept aside, up to `beam` per sentence) and the `beam` best others stay open.
    A sentence is done once it holds `beam` finished hypotheses and its best open beam, scored at its current
    length, cannot beat the worst of them (log-probabilities only fall as a beam grows; exact for alpha = 0,
    the usual heuristic otherwise), or when it reaches its length limit. With beam_size=1 this is greedy.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be at least 1")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best} must be between 1 and beam_size={beam_size}")
    if src.size(0) == 0:
        return []
    with _eval_mode(model):
        return _beam_search(model, src, src_mask, beam_size, length_penalty, max_len_a, max_len_b, n_best)


def _beam_search(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    beam: int,
    alpha: float,
    max_len_a: float,
    max_len_b: float,
    n_best: int,
) -> list[list[Hypothesis]]:
    batch, device = src.size(0), src.device
    limits = _max_lengths(model, src_mask, max_len_a, max_len_b)
    width = int(limits.max()) + 1  # longest possible history, EOS step included
    state = map_state(model.encode(src, src_mask), lambda t: t.repeat_interleave(beam, dim=0))

    # Per active sentence (N of them) and per active row (N * beam).
    sentences = torch.arange(batch, device=device)
    beam_scores = torch.full((batch, beam), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: open only one so they do not duplicate each other
    tokens = torch.empty(batch * beam, 0, dtype=torch.long, device=device)
    prev = torch.full((batch * beam,), model.bos_id, dtype=torch.long, device=device)
    history: torch.Tensor | None = None  # (N * beam, step, S) attention of each open beam
    pool_scores = torch.full((batch, beam), float("-inf"), device=device)  # finished, normalised, best first
    pool_lengths = torch.zeros(batch, beam, dtype=torch.long, device=device)
    pool_tokens = torch.full((batch, beam, width), model.pad_id, dtype=torch.long, device=device)
    pool_attention: torch.Tensor | None = None
    results: list[list[Hypothesis]] = [[] for _ in range(batch)]
    ranks = torch.arange(2 * beam, device=device)

    for step in range(width):
        n = sentences.numel()
        log_probs, attention, state = model.decode_step(state, prev)
        vocab = log_probs.size(-1)
        log_probs = _restrict(log_probs, (step >= limits).repeat_interleave(beam), model)
        candidates = (beam_scores.view(-1, 1) + log_probs).view(n, beam * vocab)
        top_scores, top_index = candidates.topk(2 * beam, dim=1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == model.eos_id
        parents = top_beam + torch.arange(n, device=device).unsqueeze(1) * beam  # rows in the flat batch

        # Finished candidates (EOS within the top `beam`) compete with the pool for its `beam` places.
        finishing = (is_eos & top_scores.isfinite())[:, :beam]
        new_scores = torch.where(finishing, top_scores[:, :beam] / length_penalty_factor(step + 1, alpha), -torch.inf)
        merged_scores, merged_index = torch.cat([pool_scores, new_scores], dim=1).topk(beam, dim=1)

        # The `beam` best non-EOS candidates stay open.
        keep_order = (ranks + is_eos * 2 * beam).topk(beam, dim=1, largest=False).indices
        beam_scores = top_scores.gather(1, keep_order)
        open_parents = parents.gather(1, keep_order).view(-1)
        prev = top_token.gather(1, keep_order).view(-1)

        best_open = beam_scores.max(dim=1).values / length_penalty_factor(step + 1, alpha)
        done = (merged_scores[:, -1].isfinite() & (best_open <= merged_scores[:, -1])) | (step >= limits)
        flags = torch.cat([done, finishing.any().view(1)]).cpu()  # the step's one host synchronisation
        done_cpu, any_finishing = flags[:-1], bool(flags[-1])

        if attention is not None:
            attention = attention.float()
        if any_finishing:
            parent_rows = parents[:, :beam]
            candidate_tokens = F.pad(tokens[parent_rows.reshape(-1)], (0, width - step), value=model.pad_id)
            all_tokens = torch.cat([pool_tokens, candidate_tokens.view(n, beam, width)], dim=1)
            pool_tokens = all_tokens.gather(1, merged_index.unsqueeze(-1).expand(-1, -1, width))
            all_lengths = torch.cat([pool_lengths, torch.full_like(pool_lengths, step)], dim=1)
            pool_lengths = all_lengths.gather(1, merged_index)
            if attention is not None:
                source_len = attention.size(-1)
                if pool_attention is None:
                    pool_attention = attention.new_zeros(n, beam, width, source_len)
                finished_history = attention[parent_rows.reshape(-1)].unsqueeze(1)  # the EOS step's row
                if history is not None:
                    finished_history = torch.cat([history[parent_rows.reshape(-1)], finished_history], dim=1)
                finished_history = F.pad(finished_history, (0, 0, 0, width - step - 1)).view(n, beam, width, source_len)
                all_attention = torch.cat([pool_attention, finished_history], dim=1)
                index = merged_index[:, :, None, None].expand(-1, -1, width, source_len)
                pool_attention = all_attention.gather(1, index)
        pool_scores = merged_scores

        tokens = torch.cat([tokens.index_select(0, open_parents), prev.unsqueeze(1)], dim=1)
        state = map_state(state, lambda t: t.index_select(0, open_parents))
        if attention is not None:
            step_attention = attention.index_select(0, open_parents).unsqueeze(1)
            history = step_attention if history is None else torch.cat([history.index_select(0, open_parents),
                                                                        step_attention], dim=1)

        if not done_cpu.any():
            continue
        finished_sentences = done_cpu.nonzero().squeeze(1)
        scores_cpu, lengths_cpu = pool_scores.cpu(), pool_lengths.cpu()
        tokens_cpu = pool_tokens[finished_sentences.to(device)].cpu()
        ids = sentences.cpu()
        for j, i in enumerate(finished_sentences.tolist()):
            sentence = int(ids[i])
            for k in range(n_best):
                score = float(scores_cpu[i, k])
                if score == float("-inf"):
                    break
                length = int(lengths_cpu[i, k])
                results[sentence].append(
                    Hypothesis(
                        tokens=tokens_cpu[j, k, :length].tolist(),
                        score=score,
                        attention=_attention_rows(
                            pool_attention[i, k] if pool_attention is not None else None,
                            length + 1,
                            src_mask[sentence],
                        ),
                    )
                )
        if bool(done_cpu.all()):
            break
        keep = (~done_cpu).nonzero().squeeze(1).to(device)
        keep_rows = (keep.unsqueeze(1) * beam + torch.arange(beam, device=device)).view(-1)
        sentences, limits, beam_scores, pool_scores, pool_lengths, pool_tokens = (
            t.index_select(0, keep) for t in (sentences, limits, beam_scores, pool_scores, pool_lengths, pool_tokens)
        )
        if pool_attention is not None:
            pool_attention = pool_attention.index_select(0, keep)
        state = map_state(state, lambda t: t.index_select(0, keep_rows))
        tokens, prev = tokens.index_select(0, keep_rows), prev.index_select(0, keep_rows)
        if history is not None:
            history = history.index_select(0, keep_rows)
    return results


def decode(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    beam_size: int,
    length_penalty: float,
    max_len_a: float,
    max_len_b: float,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Greedy when beam_size == 1 (cheaper, same result), beam search otherwise; n_best lists in input order."""
    if beam_size == 1:
        if n_best != 1:
            raise ValueError(f"n_best={n_best} needs beam_size >= n_best, but beam_size is 1")
        return [[hypothesis] for hypothesis in greedy_decode(model, src, src_mask, max_len_a, max_len_b)]
    return beam_search(model, src, src_mask, beam_size, length_penalty, max_len_a, max_len_b, n_best)
