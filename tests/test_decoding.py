"""Greedy and beam search: agreement with each other, the length penalty, length limits, attention alignment of
the chosen hypotheses, batching, and scores that match a rescoring by the model itself."""

from __future__ import annotations

import math

import pytest
import torch

from seq2seq.config import model_config
from seq2seq.inference.search import (Hypothesis, SearchTree, beam_search, decode, explore, greedy_decode,
                                      length_penalty_factor)
from seq2seq.models import build_model
from seq2seq.models.base import DecoderState, ModelOutput, Seq2SeqModel, masked_softmax

PAD, UNK, BOS, EOS, A, B = 0, 1, 2, 3, 4, 5
VOCAB = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the models here are tiny


class TableModel(Seq2SeqModel):
    """Fake model whose next-token distribution depends only on the position: row p of `probs` (clamped to the
    last row). Its "attention" at each step is one-hot on source position (previous token) mod (real length), so
    the attention rows of a hypothesis spell out its own history."""

    has_attention = True

    def __init__(self, probs: list[dict[int, float]]) -> None:
        super().__init__()
        table = torch.full((len(probs), VOCAB), 1e-6)
        for row, entries in enumerate(probs):
            for token, p in entries.items():
                table[row, token] = p
        self.register_buffer("log_table", (table / table.sum(-1, keepdim=True)).log())

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        return {"position": torch.zeros(src.size(0), dtype=torch.long), "src_mask": src_mask}

    def decode_step(self, state: DecoderState, prev_tokens: torch.Tensor):
        position, src_mask = state["position"], state["src_mask"]
        log_probs = self.log_table[position.clamp(max=self.log_table.size(0) - 1)]
        focus = prev_tokens % src_mask.sum(1)
        attention = torch.nn.functional.one_hot(focus, src_mask.size(1)).float()
        return log_probs, attention, {"position": position + 1, "src_mask": src_mask}


class MarkovModel(Seq2SeqModel):
    """Fake model with history-dependent choices and sentence-dependent lengths: next-token logits come from a
    fixed random transition table indexed by the previous token, EOS becomes likelier as the output approaches
    the source length, and attention centres on a position that depends on the previous token. `forward` is
    teacher forcing over `decode_step`, so searched hypotheses can be rescored exactly."""

    has_attention = True

    def __init__(self, vocab: int = 9, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("transition", torch.randn(vocab, vocab, generator=generator) * 1.5)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        position = torch.zeros(src.size(0), dtype=torch.long)
        return {"position": position, "src_mask": src_mask, "length": src_mask.sum(1)}

    def decode_step(self, state: DecoderState, prev_tokens: torch.Tensor):
        position, src_mask, length = state["position"], state["src_mask"], state["length"]
        logits = self.transition[prev_tokens].clone()
        logits[:, EOS] += 1.5 * (position + 1 - length).float()
        centre = (position + prev_tokens) % length
        scores = -(torch.arange(src_mask.size(1)) - centre.unsqueeze(1)).float().pow(2)
        attention = masked_softmax(scores, src_mask)
        return logits.log_softmax(-1), attention, {"position": position + 1, "src_mask": src_mask, "length": length}

    def forward(self, src, src_mask, tgt_in, return_attention=False) -> ModelOutput:
        state, log_probs, attention = self.encode(src, src_mask), [], []
        for t in range(tgt_in.size(1)):
            step_log_probs, step_attention, state = self.decode_step(state, tgt_in[:, t])
            log_probs.append(step_log_probs)
            attention.append(step_attention)
        return ModelOutput(torch.stack(log_probs, 1), {"cross": torch.stack(attention, 1)} if return_attention else {})


# Short [A] (prob .99 * .5) against long [A, B, B, B, B, B] (prob .99 * .45 * .99^5): the short one has the higher
# log-probability, the long one the higher GNMT-normalised score for alpha = 1.
SHORT_OR_LONG = [{A: 0.99}, {EOS: 0.5, B: 0.45}, {B: 0.99}, {B: 0.99}, {B: 0.99}, {B: 0.99}, {EOS: 0.99}]


def source(lengths: list[int], seed: int = 0, vocab: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    src_mask = torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)
    src = torch.randint(4, vocab, src_mask.shape, generator=generator).masked_fill(~src_mask, PAD)
    return src, src_mask


def random_model(name: str, seed: int = 0, vocab: int = 12, sharpen: float = 4.0) -> Seq2SeqModel:
    """A small untrained model; `sharpen` scales the output layer to make its choices less uniform."""
    cfg = {
        "rnn": {"name": "rnn", "embed_dim": 8, "hidden_size": 12, "encoder_layers": 1, "decoder_layers": 1},
        "bahdanau": {"name": "bahdanau", "embed_dim": 8, "hidden_size": 12, "attention_dim": 8},
        "transformer": {"name": "transformer", "d_model": 16, "num_heads": 2, "encoder_layers": 1,
                        "decoder_layers": 2, "ff_dim": 32, "max_positions": 64},
    }[name]
    torch.manual_seed(seed)
    model = build_model(model_config(cfg), 20, vocab)
    with torch.no_grad():
        model.output_projection.weight.mul_(sharpen)
    return model.eval()


def rescore(
    model: Seq2SeqModel, src: torch.Tensor, src_mask: torch.Tensor, tokens: list[int]
) -> tuple[float, torch.Tensor | None]:
    """Sum of the model's log-probabilities of tokens + EOS under teacher forcing, and its (T, S) attention."""
    tgt_in = torch.tensor([[BOS, *tokens]])
    tgt_out = torch.tensor([[*tokens, EOS]])
    with torch.no_grad():
        out = model(src, src_mask, tgt_in, return_attention=True)
    score = out.logits.log_softmax(-1).gather(-1, tgt_out.unsqueeze(-1)).sum().item()
    return score, out.attention["cross"][0] if model.has_attention else None


def test_length_penalty_changes_the_chosen_hypothesis() -> None:
    model = TableModel(SHORT_OR_LONG)
    src, src_mask = source([3])
    table = model.log_table
    short_raw = (table[0, A] + table[1, EOS]).item()
    long_raw = (table[0, A] + table[1, B] + table[2:6, B].sum() + table[6, EOS]).item()

    raw = beam_search(model, src, src_mask, beam_size=3, length_penalty=0.0, n_best=2)[0]
    assert [h.tokens for h in raw] == [[A], [A, B, B, B, B, B]]
    assert raw[0].score == pytest.approx(short_raw, abs=1e-4)

    normalised = beam_search(model, src, src_mask, beam_size=3, length_penalty=1.0, n_best=2)[0]
    assert [h.tokens for h in normalised] == [[A, B, B, B, B, B], [A]]
    assert normalised[0].score == pytest.approx(long_raw / ((5 + 7) / 6), abs=1e-4)
    assert normalised[1].score == pytest.approx(short_raw / ((5 + 2) / 6), abs=1e-4)

    greedy = greedy_decode(model, src, src_mask)[0]  # greedy never looks past the likelier EOS
    assert greedy.tokens == [A] and greedy.score == pytest.approx(short_raw, abs=1e-4)


def test_length_penalty_formula_is_gnmt() -> None:
    assert length_penalty_factor(1, 0.0) == 1.0
    assert length_penalty_factor(7, 1.0) == pytest.approx(2.0)
    assert length_penalty_factor(16, 0.5) == pytest.approx(math.sqrt(3.5))


@pytest.mark.parametrize("name", ["rnn", "bahdanau", "transformer"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_of_one_is_greedy(name: str, alpha: float) -> None:
    model = random_model(name)
    src, src_mask = source([5, 9, 2, 7], seed=1)
    greedy = greedy_decode(model, src, src_mask)
    beam = beam_search(model, src, src_mask, beam_size=1, length_penalty=alpha)
    assert [g.tokens for g in greedy] == [b[0].tokens for b in beam]
    for g, (b,) in zip(greedy, beam):
        assert b.score == pytest.approx(g.score / length_penalty_factor(len(g.tokens) + 1, alpha), abs=1e-4)
        if g.attention is None:
            assert b.attention is None
        else:
            torch.testing.assert_close(b.attention, g.attention)


def searched_models() -> dict[str, Seq2SeqModel]:
    """The fake Markov model (varied lengths and branching by construction) and untrained real models whose
    outputs happen to vary in length (seeded)."""
    return {
        "markov": MarkovModel(),
        "rnn": random_model("rnn", seed=0, vocab=8, sharpen=1.0),
        "bahdanau": random_model("bahdanau", seed=3, vocab=8, sharpen=2.0),
        "transformer": random_model("transformer", seed=5, vocab=8, sharpen=1.0),
    }


@pytest.mark.parametrize("name", ["markov", "rnn", "bahdanau", "transformer"])
def test_beam_hypotheses_are_sorted_distinct_and_rescore_exactly(name: str) -> None:
    """Each returned hypothesis' score and attention must be what the model gives that token sequence, which
    fails if beams, their scores or their attention histories get mixed up while reordering."""
    model = searched_models()[name]
    src, src_mask = source([6, 3, 8, 5], seed=2, vocab=9)
    alpha = 0.6
    results = beam_search(model, src, src_mask, beam_size=4, length_penalty=alpha, n_best=3)
    assert len(results) == 4
    for i, hypotheses in enumerate(results):
        assert len(hypotheses) == 3
        scores = [h.score for h in hypotheses]
        assert all(math.isfinite(s) for s in scores)
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hypotheses}) == 3
        real = src_mask[i]
        for h in hypotheses:
            assert all(t not in (PAD, BOS, EOS) for t in h.tokens)
            raw, attention = rescore(model, src[i : i + 1, real], src_mask[i : i + 1, real], h.tokens)
            assert h.score == pytest.approx(raw / length_penalty_factor(len(h.tokens) + 1, alpha), abs=1e-4)
            if attention is None:
                assert h.attention is None
            else:
                torch.testing.assert_close(h.attention, attention, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["markov", "bahdanau", "transformer"])
def test_batched_search_equals_one_sentence_at_a_time(name: str) -> None:
    """Sentences finish at different steps and leave the batch; the survivors must not be disturbed."""
    model = searched_models()[name]
    src, src_mask = source([7, 2, 5, 9, 4], seed=4, vocab=9)
    together = beam_search(model, src, src_mask, beam_size=3, n_best=2)
    lengths = set()
    for i in range(src.size(0)):
        real = src_mask[i]
        alone = beam_search(model, src[i : i + 1, real], src_mask[i : i + 1, real], beam_size=3, n_best=2)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        lengths.update(len(h.tokens) for h in alone)
        for a, t in zip(alone, together[i]):
            assert a.score == pytest.approx(t.score, abs=1e-4)
            torch.testing.assert_close(a.attention, t.attention, atol=1e-5, rtol=1e-5)
    assert len(lengths) > 2, "outputs of one length would not exercise sentences leaving the batch"


def expected_attention(hypothesis: Hypothesis, source_length: int) -> torch.Tensor:
    """TableModel's attention rows: one per step, one-hot on (token fed at that step) mod source length."""
    fed = [BOS, *hypothesis.tokens]
    return torch.nn.functional.one_hot(torch.tensor(fed) % source_length, source_length).float()


def test_attention_of_each_hypothesis_follows_its_own_history() -> None:
    model = TableModel(SHORT_OR_LONG)
    src, src_mask = source([3, 5, 2])
    for search in (
        lambda: [[h] for h in greedy_decode(model, src, src_mask)],
        lambda: beam_search(model, src, src_mask, beam_size=3, length_penalty=1.0, n_best=2),
    ):
        for i, hypotheses in enumerate(search()):
            length = int(src_mask[i].sum())
            for h in hypotheses:
                assert h.attention.shape == (len(h.tokens) + 1, length)
                torch.testing.assert_close(h.attention, expected_attention(h, length))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_output_length_is_capped_per_sentence(beam_size: int) -> None:
    model = TableModel([{A: 0.9, B: 0.1}])  # EOS is (almost) never likely: every output runs to its limit
    src, src_mask = source([2, 6, 4])
    results = decode(model, src, src_mask, beam_size, 1.0, max_len_a=1.5, max_len_b=2)
    assert [len(r[0].tokens) for r in results] == [5, 11, 8]  # floor(1.5 * S + 2)


class ShortPositions(TableModel):
    @property
    def max_target_positions(self) -> int:
        return 6  # BOS + at most 5 tokens


def test_output_length_is_capped_by_the_model_positions() -> None:
    model = ShortPositions([{A: 0.9, B: 0.1}])
    src, src_mask = source([3, 40])
    for results in (
        [[h] for h in greedy_decode(model, src, src_mask)],
        beam_search(model, src, src_mask, beam_size=2),
    ):
        assert [len(r[0].tokens) for r in results] == [5, 5]


def test_decode_dispatches_and_validates() -> None:
    model = random_model("bahdanau")
    src, src_mask = source([4, 6])
    greedy = greedy_decode(model, src, src_mask)
    assert [r[0].tokens for r in decode(model, src, src_mask, 1, 1.0, 1.5, 10)] == [g.tokens for g in greedy]
    with pytest.raises(ValueError, match="n_best"):
        decode(model, src, src_mask, 1, 1.0, 1.5, 10, n_best=2)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, src, src_mask, beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, src_mask, beam_size=0)


def test_decoding_uses_eval_mode_and_restores_training_mode() -> None:
    model = random_model("transformer")
    model.train()  # dropout 0.1 would make two decodings differ
    src, src_mask = source([5, 8], seed=7)
    first = beam_search(model, src, src_mask, beam_size=3)
    second = beam_search(model, src, src_mask, beam_size=3)
    assert [h[0].tokens for h in first] == [h[0].tokens for h in second]
    assert model.training
    assert first[0][0].attention is not None and not first[0][0].attention.requires_grad


def teacher_forced_log_probs(model: Seq2SeqModel, src: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(len(tokens) + 1, V) the model's next-token log-probabilities after BOS, BOS y1, ..."""
    with torch.no_grad():
        logits = model(src, torch.ones_like(src, dtype=torch.bool), torch.tensor([[BOS, *tokens]])).logits
    return logits[0].log_softmax(-1)


def check_tree(model: Seq2SeqModel, src: torch.Tensor, tree: SearchTree, top_k: int) -> None:
    """Every node's score adds its log-probability to its parent's, and every node the search extended lists
    the model's own top-k next words (PAD and BOS never among them) after its path."""
    for node in tree.nodes[1:]:
        assert node.score == pytest.approx(tree.nodes[node.parent].score + node.log_prob, abs=1e-4)
    for node in tree.nodes:
        if not node.next_words:
            continue
        path = []
        walk = node
        while walk.parent is not None:
            path.append(walk.token)
            walk = tree.nodes[walk.parent]
        expected = teacher_forced_log_probs(model, src, path[::-1])[-1]
        expected[[PAD, BOS]] = float("-inf")
        values, tokens = expected.topk(top_k)
        assert [t for t, _ in node.next_words] == tokens.tolist()
        assert [v for _, v in node.next_words] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("name", ["markov", "rnn", "bahdanau", "transformer"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_explore_finds_the_beam_search_result_and_records_its_tree(name: str, beam_size: int) -> None:
    model = searched_models()[name]
    for length in (3, 6, 8):
        src, src_mask = source([length], seed=length, vocab=9)
        alpha = 0.6
        tree = explore(model, src, src_mask, beam_size=beam_size, length_penalty=alpha, top_k=4)
        (best,) = beam_search(model, src, src_mask, beam_size=beam_size, length_penalty=alpha)[0]
        assert tree.best.tokens == best.tokens and tree.best.score == pytest.approx(best.score, abs=1e-5)
        path = [tree.nodes[i] for i in tree.best_path]
        assert [n.token for n in path[1:]] == [*best.tokens, EOS] and path[-1].final_score == pytest.approx(best.score)
        if best.attention is None:
            assert all(n.attention is None for n in path)
        else:
            torch.testing.assert_close(torch.tensor([n.attention for n in path[1:]]), best.attention)
        finished = [n for n in tree.nodes if n.final_score is not None]
        assert max(n.final_score for n in finished) == pytest.approx(best.score)
        assert len({n.index for n in tree.nodes if n.step == 2}) <= 2 * beam_size
        check_tree(model, src, tree, top_k=4)


@pytest.mark.parametrize("name", ["markov", "transformer"])
def test_a_forced_prefix_is_kept_and_the_search_goes_on_from_it(name: str) -> None:
    model = searched_models()[name]
    src, src_mask = source([6], seed=6, vocab=9)
    free = explore(model, src, src_mask, beam_size=1).best
    unlikely = min(range(4, 8), key=lambda t: teacher_forced_log_probs(model, src, [])[0, t].item())
    tree = explore(model, src, src_mask, beam_size=3, length_penalty=0.0, prefix=[unlikely, A], top_k=3)
    assert tree.best.tokens[:2] == [unlikely, A] and tree.prefix_length == 2
    first = tree.nodes[tree.best_path[1]]
    assert first.forced and first.token == unlikely and unlikely not in [t for t, _ in tree.nodes[0].next_words]
    assert not tree.nodes[tree.best_path[3]].forced
    raw, _ = rescore(model, src, src_mask, tree.best.tokens)
    assert tree.best.score == pytest.approx(raw, abs=1e-4)  # the forced words' log-probabilities count
    check_tree(model, src, tree, top_k=3)
    # Greedy continues a prefix it would have chosen itself exactly as it goes on without one.
    assert explore(model, src, src_mask, beam_size=1, prefix=free.tokens[:2]).best.tokens == free.tokens


def test_explore_refuses_what_it_cannot_search() -> None:
    model = ShortPositions([{A: 0.9, B: 0.1}])
    src, src_mask = source([3])
    with pytest.raises(ValueError, match="one sentence"):
        explore(model, *source([3, 4]))
    with pytest.raises(ValueError, match="not PAD, BOS or EOS"):
        explore(model, src, src_mask, prefix=[A, EOS])
    with pytest.raises(ValueError, match="at most 5"):
        explore(model, src, src_mask, prefix=[A] * 6)
    assert explore(model, src, src_mask, prefix=[B] * 5).best.tokens == [B] * 5  # the limit stretches to a prefix


def reference_greedy(model: Seq2SeqModel, src: torch.Tensor, max_len_a: float, max_len_b: float) -> Hypothesis:
    """Greedy search written as plainly as possible: one sentence (1, S) without padding, one step at a time."""
    limit = math.floor(src.size(1) * max_len_a + max_len_b)
    if model.max_target_positions is not None:
        limit = min(limit, model.max_target_positions - 1)
    state, prev, tokens, score, rows = model.encode(src, torch.ones_like(src, dtype=torch.bool)), BOS, [], 0.0, []
    for step in range(limit + 1):
        log_probs, attention, state = model.decode_step(state, torch.tensor([prev]))
        allowed = [EOS] if step == limit else [t for t in range(log_probs.size(-1)) if t not in (PAD, BOS)]
        prev = max(allowed, key=lambda t: log_probs[0, t].item())
        score += log_probs[0, prev].item()
        rows.append(attention)
        if prev == EOS:
            break
        tokens.append(prev)
    return Hypothesis(tokens, score, None if rows[0] is None else torch.cat(rows))


def reference_beam(model: Seq2SeqModel, src: torch.Tensor, beam: int, alpha: float, max_len_a: float,
                   max_len_b: float, n_best: int) -> list[Hypothesis]:
    """Beam search for one sentence (1, S) without padding, each beam decoded on its own: of the 2*beam best
    extensions, EOS ones within the first `beam` finish (the best `beam` finished are kept), the first `beam`
    others stay open; done when `beam` have finished and no open beam can beat the worst of them, or at the
    length limit (where only EOS may follow)."""
    limit = math.floor(src.size(1) * max_len_a + max_len_b)
    if model.max_target_positions is not None:
        limit = min(limit, model.max_target_positions - 1)
    # An open beam: (raw score, tokens, attention rows, decoder state).
    beams = [(0.0, [], [], model.encode(src, torch.ones_like(src, dtype=torch.bool)))]
    finished: list[Hypothesis] = []
    for step in range(limit + 1):
        extensions = []
        for raw, tokens, rows, state in beams:
            log_probs, attention, next_state = model.decode_step(state, torch.tensor([tokens[-1] if tokens else BOS]))
            allowed = [EOS] if step == limit else [t for t in range(log_probs.size(-1)) if t not in (PAD, BOS)]
            extensions += [(raw + log_probs[0, t].item(), tokens, [*rows, attention], next_state, t) for t in allowed]
        extensions = sorted(extensions, key=lambda e: e[0], reverse=True)[: 2 * beam]
        penalty = length_penalty_factor(step + 1, alpha)
        for raw, tokens, rows, _, token in extensions[:beam]:
            if token == EOS:
                attention = None if rows[0] is None else torch.cat(rows)
                finished.append(Hypothesis(tokens, raw / penalty, attention))
        finished = sorted(finished, key=lambda h: h.score, reverse=True)[:beam]
        beams = [(raw, [*tokens, token], rows, state) for raw, tokens, rows, state, token in extensions
                 if token != EOS][:beam]
        best_open = max((raw for raw, *_ in beams), default=-math.inf) / penalty
        if step == limit or (len(finished) == beam and best_open <= finished[-1].score):
            break
    return finished[:n_best]


def ragged_outputs(results: list[list[Hypothesis]]) -> bool:
    return len({len(h.tokens) for hypotheses in results for h in hypotheses}) > 2


@pytest.mark.parametrize("name", ["markov", "rnn", "bahdanau", "transformer"])
def test_batched_greedy_and_beam_equal_a_plain_reference(name: str) -> None:
    """The batched search (padding, sentences leaving at different steps, beams reordered with state tensors
    left in place) gives exactly the tokens, scores and attention of a one-sentence, one-beam-at-a-time search."""
    model = searched_models()[name]
    src, src_mask = source([7, 2, 5, 9, 4, 6], seed=11, vocab=9)
    greedy = greedy_decode(model, src, src_mask, max_len_a=1.0, max_len_b=3)
    beams = beam_search(model, src, src_mask, beam_size=3, length_penalty=0.6, max_len_a=1.0, max_len_b=3, n_best=2)
    assert ragged_outputs([[h] for h in greedy]) and ragged_outputs(beams)
    for i in range(src.size(0)):
        sentence = src[i : i + 1, src_mask[i]]
        expected = [reference_greedy(model, sentence, 1.0, 3)]
        expected_beams = reference_beam(model, sentence, 3, 0.6, 1.0, 3, n_best=2)
        for got, want in [*zip([greedy[i]], expected), *zip(beams[i], expected_beams, strict=True)]:
            assert got.tokens == want.tokens
            assert got.score == pytest.approx(want.score, abs=1e-4)
            if want.attention is None:
                assert got.attention is None
            else:
                torch.testing.assert_close(got.attention, want.attention, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_without_attention_gives_the_same_hypotheses(beam_size: int) -> None:
    model = searched_models()["transformer"]
    src, src_mask = source([6, 3, 8, 5], seed=2, vocab=9)
    with_attention = decode(model, src, src_mask, beam_size, 0.6, 1.5, 4, n_best=beam_size)
    without = decode(model, src, src_mask, beam_size, 0.6, 1.5, 4, n_best=beam_size, return_attention=False)
    for kept, dropped in zip(with_attention, without, strict=True):
        assert [(h.tokens, h.score) for h in kept] == [(h.tokens, h.score) for h in dropped]
        assert all(h.attention is not None for h in kept) and all(h.attention is None for h in dropped)


def test_int8_copy_quantises_the_linear_layers_and_leaves_the_model_alone() -> None:
    from seq2seq.inference.predict import quantize_int8

    model = random_model("transformer", seed=5, vocab=8, sharpen=1.0)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    quantized = quantize_int8(model)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    src, src_mask = source([6, 3, 8, 5], seed=2, vocab=9)
    exact = greedy_decode(model, src, src_mask)
    approximate = greedy_decode(quantized, src, src_mask)
    for e, a in zip(exact, approximate, strict=True):
        assert math.isfinite(a.score) and all(t not in (PAD, BOS, EOS) for t in a.tokens)
        torch.testing.assert_close(a.attention.sum(-1), torch.ones(len(a.tokens) + 1))
        if a.tokens == e.tokens:
            assert a.score == pytest.approx(e.score, rel=0.02)
