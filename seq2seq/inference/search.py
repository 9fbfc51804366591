"""Greedy and beam-search decoding, written once for every `Seq2SeqModel` through `encode` / `decode_step`.

Both decode a whole batch of sentences at once (beam search as B*beam rows whose decoder state is reordered with
`map_state`). A sentence stops when it is done; finished sentences leave the batch, so long sentences do not
make short ones pay. The only host synchronisation is one small transfer of per-sentence flags per step.

What a step costs besides the model: the search keeps no growing per-row copies. Greedy writes each step's token
(and attention row) into per-sentence buffers; beam search keeps, per step, the token and parent row of every open
beam (and its attention row) and rebuilds a finished hypothesis by following parents back. Beam reordering skips
the state tensors `decode_step` hands back unchanged (the same objects it was given: the encoder's memory and
cross-attention keys and values), which are equal across the beams of a sentence and only need selecting when
sentences leave. With `return_attention=False` no attention is kept at all.

Lengths: a sentence with S real source tokens may produce at most floor(max_len_a * S + max_len_b) tokens
(also capped by the model's `max_target_positions`); at that point EOS is forced, and its log-probability counts.
PAD and BOS are never produced. The model is put in eval mode while decoding and handed back as it came.

Scores: greedy returns the sum of token log-probabilities (EOS included). Beam search ranks finished hypotheses by
that sum divided by the GNMT length penalty lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016), n = generated
tokens including EOS, alpha = `length_penalty`; alpha = 0 ranks by raw log-probability, larger alpha favours
longer outputs. The returned beam score is that normalised score.

`explore` is beam search of one sentence that also records its tree (every hypothesis it kept open or
finished, with its score, its attention and the top-k words its step proposed) and can force a target prefix
first ("what if the translation began like this?"): the same search loop, with the prefix's tokens the only
ones allowed at their steps. The attention page (seq2seq/analysis/page.py) draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from seq2seq.config import BEAM_SIZE, LENGTH_PENALTY, MAX_LEN_A, MAX_LEN_B  # the schema's decoding defaults
from seq2seq.models.base import DecoderState, Seq2SeqModel, eval_mode, map_state

TOP_K = 5  # next words `explore` records per step


@dataclass
class Hypothesis:
    """One output: tokens without BOS/EOS, its score (see module doc) and attention (T, S) float32 on the CPU,
    T = len(tokens) + 1 rows (each token, then the final EOS step) and one column per real source position
    (src_mask True); None for models without attention or when decoding was asked not to keep it."""

    tokens: list[int]
    score: float
    attention: torch.Tensor | None


def length_penalty_factor(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """GNMT length penalty ((5 + length) / 6) ** alpha; scores are divided by it."""
    return ((5 + length) / 6) ** alpha


def _max_lengths(model: Seq2SeqModel, src_mask: torch.Tensor, max_len_a: float, max_len_b: float) -> torch.Tensor:
    """(B,) longest allowed output per sentence, in tokens before EOS, on the CPU."""
    limits = torch.floor(src_mask.sum(dim=1).cpu() * max_len_a + max_len_b).long().clamp(min=0)
    if model.max_target_positions is not None:  # BOS + tokens must fit the model's positions
        limits = limits.clamp(max=model.max_target_positions - 1)
    return limits


def _force_tokens(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rows whose entry of `tokens` (a CPU long vector) is >= 0 may only produce that token (a forced prefix)."""
    rows = (tokens >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return log_probs
    on_device, chosen = rows.to(log_probs.device), tokens[rows].to(log_probs.device)
    kept = log_probs[on_device, chosen]
    forced = log_probs.index_fill(0, on_device, float("-inf"))
    forced[on_device, chosen] = kept
    return forced


def _restrict(log_probs: torch.Tensor, forced: torch.Tensor, model: Seq2SeqModel) -> torch.Tensor:
    """Never produce PAD or BOS; rows where `forced` (a CPU bool vector) is True may only produce EOS."""
    never = torch.zeros(log_probs.size(-1), dtype=torch.bool, device=log_probs.device)
    never[[model.pad_id, model.bos_id]] = True
    restricted = log_probs.masked_fill(never, float("-inf"))
    if bool(forced.any()):
        rows = forced.nonzero().squeeze(1).to(log_probs.device)
        eos = restricted[rows, model.eos_id]
        restricted[rows] = float("-inf")
        restricted[rows, model.eos_id] = eos
    return restricted


def _select(state: DecoderState, index: torch.Tensor) -> DecoderState:
    return map_state(state, lambda t: t.index_select(0, index))


@torch.inference_mode()
def greedy_decode(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    max_len_a: float = MAX_LEN_A,
    max_len_b: float = MAX_LEN_B,
    return_attention: bool = True,
) -> list[Hypothesis]:
    """Pick the most probable token at every step; one hypothesis per sentence, in input order."""
    if src.size(0) == 0:
        return []
    with eval_mode(model):
        batch, device = src.size(0), src.device
        limits = _max_lengths(model, src_mask, max_len_a, max_len_b)
        width = int(limits.max()) + 1  # longest possible output, EOS step included
        state = model.encode(src, src_mask)
        rows = torch.arange(batch)  # sentence of each active row, on the CPU
        rows_on_device = rows.to(device)
        prev = torch.full((batch,), model.bos_id, dtype=torch.long, device=device)
        scores = torch.zeros(batch, device=device)
        tokens = torch.full((batch, width), model.pad_id, dtype=torch.long, device=device)  # by sentence
        attention_buffer: torch.Tensor | None = None  # (batch, width, S) by sentence
        lengths = [0] * batch  # steps taken by each sentence, its EOS step included
        final_scores = [0.0] * batch
        for step in range(width):
            log_probs, attention, state = model.decode_step(state, prev)
            best, prev = _restrict(log_probs, limits[rows] <= step, model).max(dim=-1)
            scores = scores + best
            tokens[:, step].index_copy_(0, rows_on_device, prev)
            if attention is not None and return_attention:
                if attention_buffer is None:
                    attention_buffer = torch.zeros(batch, width, attention.size(-1), device=device)
                attention_buffer[:, step].index_copy_(0, rows_on_device, attention.float())
            finished = (prev == model.eos_id).cpu()
            if not finished.any():
                continue
            finished_rows = finished.nonzero().squeeze(1)
            for sentence, score in zip(rows[finished_rows].tolist(), scores.cpu()[finished_rows].tolist()):
                lengths[sentence], final_scores[sentence] = step + 1, score
            if bool(finished.all()):
                break
            keep = (~finished).nonzero().squeeze(1)
            rows = rows[keep]
            keep = keep.to(device)
            rows_on_device, prev, scores = (t.index_select(0, keep) for t in (rows_on_device, prev, scores))
            state = _select(state, keep)
        token_lists = tokens.cpu().tolist()
        return [
            Hypothesis(
                tokens=token_lists[i][: lengths[i] - 1],
                score=final_scores[i],
                attention=None if attention_buffer is None
                else attention_buffer[i, : lengths[i]][:, src_mask[i]].cpu(),
            )
            for i in range(batch)
        ]


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
    return_attention: bool = True,
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
    with eval_mode(model):
        search = _BeamSearch(model, src, src_mask, beam_size, length_penalty, n_best, return_attention)
        return search.run(_max_lengths(model, src_mask, max_len_a, max_len_b))


@dataclass
class SearchNode:
    """One hypothesis of a recorded search: `token` (None for the start, BOS) extends node `parent`. `log_prob`
    is the token's log-probability, `score` the sum of those of the path (the beam's score); a node whose token
    is EOS is a finished hypothesis, `final_score` its length-normalised score. `attention` is the source
    attention (one weight per source token, "</s>" included) of the step that chose `token` (None without
    attention); `next_words` the `top_k` (token, log-probability) the model proposed after this node, best
    first, whether the beam kept them or not ([] if the search never extended it). `forced`: part of the
    forced prefix."""

    index: int
    parent: int | None
    step: int
    token: int | None
    log_prob: float
    score: float
    forced: bool = False
    final_score: float | None = None
    attention: list[float] | None = None
    next_words: list[tuple[int, float]] | None = None


@dataclass
class SearchTree:
    """A recorded search of one sentence: every node (index 0 is the start); `best` the hypothesis the search
    returns (as `beam_search` would, prefix included; None if nothing finished: a model whose scores are NaN),
    `best_path` its nodes from the start to its EOS."""

    nodes: list[SearchNode]
    best: Hypothesis | None
    best_path: list[int]
    beam_size: int
    prefix_length: int


class _TreeRecorder:
    """What `explore` adds to `_BeamSearch` for a batch of one sentence: a node per kept or finished beam."""

    def __init__(self, top_k: int, prefix_length: int) -> None:
        self.top_k, self.prefix_length = top_k, prefix_length
        self.nodes = [SearchNode(index=0, parent=None, step=-1, token=None, log_prob=0.0, score=0.0)]
        self.row_nodes: list[int | None] = [0]  # the node each beam row continues (None: a row not yet open)
        self.attention: list[list[float]] | None = None

    def proposed(self, log_probs: torch.Tensor, attention: torch.Tensor | None, model: Seq2SeqModel) -> None:
        """The step's distributions (rows, V), what the model proposes before the search forces a prefix or
        an EOS at the length limit (PAD and BOS never): the top-k of every open row."""
        log_probs = _restrict(log_probs, torch.zeros(log_probs.size(0), dtype=torch.bool), model)
        values, tokens = log_probs.topk(min(self.top_k, log_probs.size(-1)), dim=-1)
        values, tokens = values.cpu().tolist(), tokens.cpu().tolist()
        self.attention = None if attention is None else attention.float().cpu().tolist()
        for row, node in enumerate(self.row_nodes):
            if node is not None:
                self.nodes[node].next_words = [(t, v) for t, v in zip(tokens[row], values[row]) if v > float("-inf")]

    def chosen(self, step: int, scores: torch.Tensor, tokens: torch.Tensor,
               parents: torch.Tensor, open_order: torch.Tensor, finishing: torch.Tensor, alpha: float) -> None:
        """The step's candidates (ranked, for the one sentence): those that finished and those kept open."""
        scores, tokens, parents = scores[0].cpu().tolist(), tokens[0].cpu().tolist(), parents[0].cpu().tolist()

        def add(rank: int) -> int:
            parent = self.row_nodes[parents[rank]]
            assert parent is not None  # candidates with a finite score extend an open row
            node = SearchNode(index=len(self.nodes), parent=parent, step=step, token=tokens[rank],
                              log_prob=scores[rank] - self.nodes[parent].score, score=scores[rank],
                              forced=step < self.prefix_length,
                              attention=None if self.attention is None else self.attention[parents[rank]])
            self.nodes.append(node)
            return node.index

        for rank in finishing[0].nonzero().squeeze(1).tolist():
            node = self.nodes[add(rank)]
            node.final_score = scores[rank] / length_penalty_factor(step + 1, alpha)
        self.row_nodes = [add(rank) if math.isfinite(scores[rank]) else None for rank in open_order[0].tolist()]

    def tree(self, best: Hypothesis | None, beam: int, eos_id: int) -> SearchTree:
        path: list[int] = []
        if best is not None:
            wanted = [*best.tokens, eos_id]
            finished = [n for n in self.nodes if n.final_score is not None and n.step == len(wanted) - 1]
            for node in sorted(finished, key=lambda n: -n.final_score):
                path = self.path(node.index)
                if [self.nodes[i].token for i in path[1:]] == wanted:
                    break
        return SearchTree(self.nodes, best, path, beam, self.prefix_length)

    def path(self, index: int) -> list[int]:
        """The nodes from the start to node `index`."""
        path = [index]
        while (parent := self.nodes[path[-1]].parent) is not None:
            path.append(parent)
        return path[::-1]


@torch.inference_mode()
def explore(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    beam_size: int = BEAM_SIZE,
    length_penalty: float = LENGTH_PENALTY,
    max_len_a: float = MAX_LEN_A,
    max_len_b: float = MAX_LEN_B,
    prefix: Sequence[int] = (),
    top_k: int = TOP_K,
) -> SearchTree:
    """Beam search of one sentence (`src` (1, S)) that records its tree; `prefix` (target ids without BOS/EOS)
    is forced first and the search goes on from it. Without a prefix the best hypothesis is `beam_search`'s.
    The length limit stretches to fit the prefix, within the model's positions."""
    if src.size(0) != 1:
        raise ValueError(f"explore searches one sentence at a time, got a batch of {src.size(0)}")
    if beam_size < 1 or top_k < 1:
        raise ValueError(f"beam_size={beam_size} and top_k={top_k} must be at least 1")
    if any(token in (model.pad_id, model.bos_id, model.eos_id) for token in prefix):
        raise ValueError("a forced prefix holds target words only, not PAD, BOS or EOS")
    limits = _max_lengths(model, src_mask, max_len_a, max_len_b).clamp(min=len(prefix))
    if model.max_target_positions is not None and len(prefix) > model.max_target_positions - 1:
        raise ValueError(f"the prefix has {len(prefix)} tokens; the model reads at most "
                         f"{model.max_target_positions - 1}")
    with eval_mode(model):
        search = _BeamSearch(model, src, src_mask, beam_size, length_penalty, 1, True,
                             prefixes=torch.tensor([list(prefix)], dtype=torch.long).view(1, -1),
                             recorder=_TreeRecorder(top_k, len(prefix)))
        results = search.run(limits)[0]
        return search.recorder.tree(results[0] if results else None, beam_size, model.eos_id)


class _StateReorder:
    """Reorders beam rows of the decoder state, skipping the tensors known to be equal across a sentence's beams.

    Those are the encoder's state expanded to the beams, for as long as `decode_step` hands each back as the very
    object it was given; the objects are held here, so their ids cannot be reused by new tensors."""

    def __init__(self, state: DecoderState) -> None:
        self.invariant = {id(t): t for t in _leaves(state)}

    def reorder(self, state: DecoderState, rows: torch.Tensor) -> DecoderState:
        """Beams move within their sentence: invariant tensors stay as they are."""
        self.invariant = {id(t): t for t in _leaves(state) if id(t) in self.invariant}
        return map_state(state, lambda t: t if id(t) in self.invariant else t.index_select(0, rows))

    def select(self, state: DecoderState, rows: torch.Tensor) -> DecoderState:
        """Whole sentences leave: every tensor is selected, invariant ones stay invariant."""
        kept: dict[int, torch.Tensor] = {}

        def pick(t: torch.Tensor) -> torch.Tensor:
            selected = t.index_select(0, rows)
            if id(t) in self.invariant:
                kept[id(selected)] = selected
            return selected

        state = map_state(state, pick)
        self.invariant = kept
        return state


def _leaves(state: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_state(state, lambda t: found.append(t) or t)
    return found


class _BeamSearch:
    """One batch of beam search. Rows are numbered afresh at every step; per step the search records each open
    row's token and parent row (`tokens[t][r]`, `parents[t][r]`: row r of step t + 1 extended row parents[t][r]
    of step t with tokens[t][r]) and, when kept, every row's attention, so finished hypotheses are only
    (step, row) pairs until their sentence is done."""

    def __init__(self, model: Seq2SeqModel, src: torch.Tensor, src_mask: torch.Tensor, beam: int, alpha: float,
                 n_best: int, return_attention: bool, prefixes: torch.Tensor | None = None,
                 recorder: _TreeRecorder | None = None) -> None:
        """`prefixes` (B, P) CPU: the tokens each sentence is forced to begin with (-1 past a shorter prefix);
        `recorder`: a batch of one sentence whose tree is recorded."""
        self.model, self.src_mask, self.beam, self.alpha, self.n_best = model, src_mask, beam, alpha, n_best
        self.return_attention = return_attention
        self.prefixes, self.recorder = prefixes, recorder
        self.device = src.device
        self.encoded = model.encode(src, src_mask)
        self.tokens: list[list[int]] = []
        self.parents: list[list[int]] = []
        self.attention: list[torch.Tensor] = []

    def run(self, limits: torch.Tensor) -> list[list[Hypothesis]]:
        model, beam, device, alpha = self.model, self.beam, self.device, self.alpha
        batch = limits.size(0)
        width = int(limits.max()) + 1  # longest possible history, EOS step included
        state = map_state(self.encoded, lambda t: t.repeat_interleave(beam, dim=0))
        reorder = _StateReorder(state)
        sentences = torch.arange(batch)  # per active sentence (N of them), on the CPU
        beam_scores = torch.full((batch, beam), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0  # all beams start identical: open only one so they do not duplicate each other
        prev = torch.full((batch * beam,), model.bos_id, dtype=torch.long, device=device)
        pool_scores = torch.full((batch, beam), float("-inf"), device=device)  # finished, normalised, best first
        pool_steps = torch.zeros(batch, beam, dtype=torch.long, device=device)  # the step that produced EOS
        pool_rows = torch.zeros(batch, beam, dtype=torch.long, device=device)  # the row that did, at that step
        results: list[list[Hypothesis]] = [[] for _ in range(batch)]
        ranks = torch.arange(2 * beam, device=device)

        for step in range(width):
            n = sentences.numel()
            log_probs, attention, state = model.decode_step(state, prev)
            if attention is not None and self.return_attention:
                self.attention.append(attention.float())
            vocab = log_probs.size(-1)
            if self.recorder is not None:
                self.recorder.proposed(log_probs, attention, model)
            log_probs = _restrict(log_probs, (limits[sentences] <= step).repeat_interleave(beam), model)
            if self.prefixes is not None and step < self.prefixes.size(1):
                log_probs = _force_tokens(log_probs, self.prefixes[sentences, step].repeat_interleave(beam))
            candidates = (log_probs + beam_scores.view(-1, 1)).view(n, beam * vocab)
            top_scores, top_index = candidates.topk(2 * beam, dim=1)
            top_beam, top_token = top_index // vocab, top_index % vocab
            is_eos = top_token == model.eos_id
            parents = top_beam + torch.arange(n, device=device).unsqueeze(1) * beam  # rows in the flat batch

            # Finished candidates (EOS within the top `beam`) compete with the pool for its `beam` places.
            finishing = (is_eos & top_scores.isfinite())[:, :beam]
            new_scores = torch.where(finishing, top_scores[:, :beam] / length_penalty_factor(step + 1, alpha),
                                     -torch.inf)
            merged_scores, merged_index = torch.cat([pool_scores, new_scores], dim=1).topk(beam, dim=1)

            # The `beam` best non-EOS candidates stay open.
            keep_order = (ranks + is_eos * 2 * beam).topk(beam, dim=1, largest=False).indices
            beam_scores = top_scores.gather(1, keep_order)
            open_parents = parents.gather(1, keep_order).view(-1)
            prev = top_token.gather(1, keep_order).view(-1)
            if self.recorder is not None:
                self.recorder.chosen(step, top_scores, top_token, parents, keep_order, finishing, alpha)

            best_open = beam_scores.max(dim=1).values / length_penalty_factor(step + 1, alpha)
            converged = merged_scores[:, -1].isfinite() & (best_open <= merged_scores[:, -1])
            flags = torch.cat([converged, finishing.any().view(1)]).cpu()  # the step's one host synchronisation
            done, any_finishing = flags[:-1] | (limits[sentences] <= step), bool(flags[-1])

            if any_finishing:
                pool_steps = torch.cat([pool_steps, torch.full_like(pool_steps, step)], dim=1).gather(1, merged_index)
                pool_rows = torch.cat([pool_rows, parents[:, :beam]], dim=1).gather(1, merged_index)
            pool_scores = merged_scores
            state = reorder.reorder(state, open_parents)

            if done.any():
                finished = done.nonzero().squeeze(1)
                self._collect(results, sentences[finished].tolist(), *(
                    t.index_select(0, finished.to(device)).cpu() for t in (pool_scores, pool_steps, pool_rows)
                ))
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                sentences = sentences[keep]
                keep = keep.to(device)
                keep_rows = (keep.unsqueeze(1) * beam + torch.arange(beam, device=device)).view(-1)
                beam_scores, pool_scores, pool_steps, pool_rows = (
                    t.index_select(0, keep) for t in (beam_scores, pool_scores, pool_steps, pool_rows)
                )
                state = reorder.select(state, keep_rows)
                open_parents, prev = open_parents.index_select(0, keep_rows), prev.index_select(0, keep_rows)
            self.tokens.append(prev.tolist())
            self.parents.append(open_parents.tolist())
        return results

    def _collect(self, results: list[list[Hypothesis]], sentences: list[int], scores: torch.Tensor,
                 steps: torch.Tensor, rows: torch.Tensor) -> None:
        """Rebuild the `n_best` best finished hypotheses of each done sentence from their (step, row) pairs."""
        for j, sentence in enumerate(sentences):
            for k in range(self.n_best):
                score = float(scores[j, k])
                if score == float("-inf"):
                    break
                path = self._path(int(steps[j, k]), int(rows[j, k]))
                results[sentence].append(
                    Hypothesis(
                        tokens=[self.tokens[t][path[t + 1]] for t in range(len(path) - 1)],
                        score=score,
                        attention=self._attention(path, sentence),
                    )
                )

    def _path(self, step: int, row: int) -> list[int]:
        """Rows of a hypothesis that produced EOS from `row` at `step`, at steps 0..step."""
        path = [row]
        for t in range(step - 1, -1, -1):
            path.append(self.parents[t][path[-1]])
        return path[::-1]

    def _attention(self, path: list[int], sentence: int) -> torch.Tensor | None:
        if not self.attention:
            return None
        rows = torch.stack([self.attention[t][row] for t, row in enumerate(path)])
        return rows[:, self.src_mask[sentence]].cpu()


def decode(
    model: Seq2SeqModel,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    beam_size: int,
    length_penalty: float,
    max_len_a: float,
    max_len_b: float,
    n_best: int = 1,
    return_attention: bool = True,
) -> list[list[Hypothesis]]:
    """Greedy when beam_size == 1 (cheaper, same result), beam search otherwise; n_best lists in input order."""
    if beam_size == 1:
        if n_best != 1:
            raise ValueError(f"n_best={n_best} needs beam_size >= n_best, but beam_size is 1")
        return [[h] for h in greedy_decode(model, src, src_mask, max_len_a, max_len_b, return_attention)]
    return beam_search(model, src, src_mask, beam_size, length_penalty, max_len_a, max_len_b, n_best,
                       return_attention)
