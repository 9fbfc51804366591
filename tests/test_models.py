"""Behaviour of the three model families: shapes, masks, causality, incremental decoding, what the fixed-context
RNN can see, mixed precision, and that each one can actually learn (overfitting real corpus pairs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence
from hydra import compose, initialize_config_dir

from seq2seq.config import check_config, model_config
from seq2seq.inference.search import greedy_decode
from seq2seq.models import (
    BahdanauSeq2Seq,
    RNNSeq2Seq,
    TransformerSeq2Seq,
    build_model,
    count_parameters,
    map_state,
)
from seq2seq.models.base import eval_mode
from seq2seq.paths import CONFIG_DIR

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SRC_VOCAB, TGT_VOCAB = 23, 19

SMALL = {
    "rnn_gru": {"name": "rnn", "cell": "gru", "embed_dim": 12, "hidden_size": 16, "encoder_layers": 2,
                "decoder_layers": 2, "bidirectional": True, "dropout": 0.1},
    "rnn_lstm": {"name": "rnn", "cell": "lstm", "embed_dim": 12, "hidden_size": 16, "encoder_layers": 1,
                 "decoder_layers": 2, "bidirectional": False, "dropout": 0.1, "tie_output": True},
    "rnn_mean": {"name": "rnn", "embed_dim": 12, "hidden_size": 16, "encoder_layers": 1, "context": "mean"},
    "rnn_max": {"name": "rnn", "cell": "lstm", "embed_dim": 12, "hidden_size": 16, "context": "max"},
    "bahdanau_gru": {"name": "bahdanau", "cell": "gru", "embed_dim": 12, "hidden_size": 16, "attention_dim": 10,
                     "dropout": 0.1},
    "bahdanau_lstm": {"name": "bahdanau", "cell": "lstm", "embed_dim": 12, "hidden_size": 16, "attention_dim": 10,
                      "encoder_layers": 2, "decoder_layers": 2, "dropout": 0.1, "tie_output": True},
    "transformer_prenorm": {"name": "transformer", "d_model": 16, "num_heads": 4, "encoder_layers": 2,
                            "decoder_layers": 2, "ff_dim": 32, "dropout": 0.1, "attention_dropout": 0.1},
    "transformer_postnorm": {"name": "transformer", "d_model": 16, "num_heads": 2, "encoder_layers": 1,
                             "decoder_layers": 2, "ff_dim": 32, "norm_first": False, "positional": "learned",
                             "max_positions": 64, "tie_output": False},
}
ATTENTION = [key for key in SMALL if not key.startswith("rnn")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the models here are tiny


def small_model(key: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_config(SMALL[key]), SRC_VOCAB, TGT_VOCAB).eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three sentences of source lengths 7, 4, 6 (right-padded) and targets BOS + 5 tokens."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, SRC_VOCAB, (3, 7), generator=generator)
    src_mask = torch.arange(7) < torch.tensor([7, 4, 6]).unsqueeze(1)
    src = src.masked_fill(~src_mask, PAD)
    tgt_in = torch.randint(4, TGT_VOCAB, (3, 6), generator=generator)
    tgt_in[:, 0] = BOS
    return src, src_mask, tgt_in


# ---------------------------------------------------------------------------------------------- build_model


@pytest.mark.parametrize("name", ["rnn", "bahdanau", "transformer"])
def test_build_model_from_the_shipped_yaml(name: str, capsys: pytest.CaptureFixture) -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        config = check_config(compose("train", overrides=[f"model={name}"]))
    model = build_model(config.model, 40, 30)
    expected = {"rnn": RNNSeq2Seq, "bahdanau": BahdanauSeq2Seq, "transformer": TransformerSeq2Seq}[name]
    assert type(model) is expected
    assert model.has_attention is (name != "rnn")
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("cfg", "vocab", "message"),
    [
        ({"name": "lstm_attention"}, (30, 30), "unknown model.name"),
        ({"name": "transformer", "d_model": 30, "num_heads": 4}, (30, 30), "not divisible"),
        ({"name": "rnn", "hidden_size": -8}, (30, 30), "hidden_size"),
        ({"name": "bahdanau", "cell": "tanh"}, (30, 30), "cell"),
        ({"name": "transformer", "positional": "rotary"}, (30, 30), "positional"),
        ({"name": "rnn", "dropout": 1.5}, (30, 30), "dropout"),
        ({"name": "rnn", "hiden_size": 8}, (30, 30), "hiden_size"),
        ({"name": "transformer", "tie_output": "yes"}, (30, 30), "tie_output"),
        ({"name": "transformer", "share_embeddings": True}, (30, 31), "share_embeddings"),
        ({"name": "rnn"}, (0, 30), "vocabulary size"),
    ],
)
def test_build_model_rejects_bad_configs_readably(cfg: dict, vocab: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(model_config(cfg), *vocab)


def test_transformer_ties_and_shares_embeddings() -> None:
    cfg = {"name": "transformer", "d_model": 16, "num_heads": 2, "ff_dim": 32, "share_embeddings": True}
    model = build_model(model_config(cfg), 30, 30)
    assert model.src_embed is model.tgt_embed
    assert model.output_projection.weight is model.tgt_embed.weight
    untied = build_model(model_config({**cfg, "share_embeddings": False, "tie_output": False}), 30, 30)
    assert count_parameters(untied) == count_parameters(model) + 2 * 30 * 16


# ---------------------------------------------------------------------------------------------- shapes and masks


@pytest.mark.parametrize("key", list(SMALL))
def test_forward_shapes_and_dtypes(key: str) -> None:
    model = small_model(key)
    src, src_mask, tgt_in = padded_batch()
    out = model(src, src_mask, tgt_in, return_attention=True)
    assert out.logits.shape == (3, 6, TGT_VOCAB) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    if key.startswith("rnn"):
        assert out.attention == {}
        return
    assert out.attention["cross"].shape == (3, 6, 7) and out.attention["cross"].dtype == torch.float32
    if key.startswith("transformer"):
        layers, heads = SMALL[key]["decoder_layers"], SMALL[key]["num_heads"]
        assert out.attention["cross_layers"].shape == (layers, 3, heads, 6, 7)
        assert out.attention["self_layers"].shape == (layers, 3, heads, 6, 6)
        assert out.attention["encoder_layers"].shape == (SMALL[key]["encoder_layers"], 3, heads, 7, 7)
        assert torch.equal(out.attention["cross"], out.attention["cross_layers"][-1].mean(dim=1))
    assert model(src, src_mask, tgt_in).attention == {}


@pytest.mark.parametrize("key", ATTENTION)
def test_attention_sums_to_one_over_real_source_and_is_zero_on_padding(key: str) -> None:
    model = small_model(key)
    src, src_mask, tgt_in = padded_batch()
    attention = model(src, src_mask, tgt_in, return_attention=True).attention
    key_mask = src_mask[:, None, :]  # (B, 1, S)
    maps = {"cross": (attention["cross"], key_mask)}
    if "cross_layers" in attention:
        maps["cross_layers"] = (attention["cross_layers"], key_mask[:, None])
        maps["encoder_layers"] = (attention["encoder_layers"], key_mask[:, None])
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        maps["self_layers"] = (attention["self_layers"], causal)
    for name, (weights, allowed) in maps.items():
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), msg=name)
        assert (weights.masked_select(~allowed.expand_as(weights)) == 0).all(), f"{name} attends to masked keys"
        assert (weights.masked_select(allowed.expand_as(weights)) > 0).all(), f"{name} ignores a real key"


# ---------------------------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("key", list(SMALL))
def test_padding_does_not_change_the_logits(key: str) -> None:
    model = small_model(key)
    src, src_mask, tgt_in = padded_batch()
    full = model(src, src_mask, tgt_in).logits
    alone_src, alone_tgt = src[1:2, :4], tgt_in[1:2, :4]  # sentence 1: 4 real source tokens
    alone = model(alone_src, torch.ones_like(alone_src, dtype=torch.bool), alone_tgt).logits
    torch.testing.assert_close(full[1, :4], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", list(SMALL))
def test_changing_a_future_target_token_never_changes_earlier_outputs(key: str) -> None:
    model = small_model(key)
    src, src_mask, tgt_in = padded_batch()
    changed = tgt_in.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 4) % (TGT_VOCAB - 4) + 4
    before, after = model(src, src_mask, tgt_in).logits, model(src, src_mask, changed).logits
    torch.testing.assert_close(before[:, :3], after[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 3], after[:, 3]), "the changed token did not reach its own position"


@pytest.mark.parametrize("key", list(SMALL))
def test_incremental_decoding_matches_the_full_forward(key: str) -> None:
    model = small_model(key)
    src, src_mask, tgt_in = padded_batch()
    out = model(src, src_mask, tgt_in, return_attention=True)
    state = model.encode(src, src_mask)
    log_probs, attentions = [], []
    for t in range(tgt_in.size(1)):
        step_log_probs, step_attention, state = model.decode_step(state, tgt_in[:, t])
        assert step_log_probs.dtype == torch.float32
        log_probs.append(step_log_probs)
        attentions.append(step_attention)
    torch.testing.assert_close(torch.stack(log_probs, 1), out.logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    if model.has_attention:
        torch.testing.assert_close(torch.stack(attentions, 1), out.attention["cross"], atol=1e-5, rtol=1e-5)
    else:
        assert all(a is None for a in attentions)


def test_decoder_state_reorders_like_the_batch() -> None:
    """Beam search relies on index_select over dim 0 of every state tensor permuting the sentences."""
    for key in SMALL:
        model = small_model(key)
        src, src_mask, tgt_in = padded_batch()
        order = torch.tensor([2, 0, 1])
        state = model.encode(src, src_mask)
        _, _, state = model.decode_step(state, tgt_in[:, 0])
        reordered = map_state(state, lambda t: t.index_select(0, order))
        log_probs, _, _ = model.decode_step(reordered, tgt_in[order, 1])
        expected, _, _ = model.decode_step(state, tgt_in[:, 1])
        torch.testing.assert_close(log_probs, expected[order], atol=1e-5, rtol=1e-5, msg=key)


def test_transformer_attention_maps_do_not_change_the_logits() -> None:
    model = small_model("transformer_prenorm")
    src, src_mask, tgt_in = padded_batch()
    fast = model(src, src_mask, tgt_in).logits
    explicit = model(src, src_mask, tgt_in, return_attention=True).logits
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_transformer_rejects_sequences_longer_than_its_positions() -> None:
    model = small_model("transformer_postnorm")  # max_positions 64
    src = torch.full((1, 65), 5)
    with pytest.raises(ValueError, match="max_positions"):
        model(src, torch.ones_like(src, dtype=torch.bool), torch.full((1, 3), BOS))


# ---------------------------------------------------------------------------------------------- fixed context


def _source(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(4, SRC_VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    return src, torch.ones_like(src, dtype=torch.bool)


@pytest.mark.parametrize("key", ["rnn_gru", "rnn_lstm", "bahdanau_gru"])
def test_fixed_context_rnn_sees_the_source_only_through_the_final_state(key: str) -> None:
    """Swap in sentence A's final encoder state while sentence B (another length) runs through the encoder and its
    per-position outputs are replaced by noise. A fixed-context decoder must then produce A's logits exactly;
    a decoder with attention (Bahdanau, the control) reads per-position memory and does not."""
    model = small_model(key)
    src_a, mask_a = _source(5, seed=1)
    src_b, mask_b = _source(8, seed=2)
    tgt_in = torch.tensor([[BOS, 5, 6, 7]])
    logits_a = model(src_a, mask_a, tgt_in).logits
    logits_b = model(src_b, mask_b, tgt_in).logits
    assert not torch.allclose(logits_a, logits_b), "different sources should give different logits"

    captured = {}

    def capture(module: torch.nn.Module, args: tuple, out: tuple) -> None:
        captured["final"] = out[1]

    hook = model.encoder.rnn.register_forward_hook(capture)
    model(src_a, mask_a, tgt_in)
    hook.remove()

    def swap(module: torch.nn.Module, args: tuple, out: tuple) -> tuple:
        outputs, _ = out  # packed when the batch has padding, a plain tensor when it has none
        if isinstance(outputs, PackedSequence):
            return outputs._replace(data=torch.randn_like(outputs.data)), captured["final"]
        return torch.randn_like(outputs), captured["final"]

    hook = model.encoder.rnn.register_forward_hook(swap)
    logits_swapped = model(src_b, mask_b, tgt_in).logits
    hook.remove()
    if key.startswith("rnn"):
        torch.testing.assert_close(logits_swapped, logits_a, atol=0, rtol=0)
    else:
        assert not torch.allclose(logits_swapped, logits_a, atol=1e-3)


@pytest.mark.parametrize("key", ["rnn_gru", "rnn_mean", "rnn_max"])
def test_fixed_context_rnn_state_has_nothing_per_source_position(key: str) -> None:
    model = small_model(key)
    shapes = []
    for length in (3, 9):
        state = model.encode(*_source(length, seed=length))
        shapes.append({name: tuple(t.shape) for name, t in state.items()})
    assert shapes[0] == shapes[1]


# ---------------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("key", list(SMALL))
def test_forward_backward_under_bf16_autocast(key: str) -> None:
    model = small_model(key).train()
    src, src_mask, tgt_in = padded_batch()
    tgt_out = torch.roll(tgt_in, -1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(src, src_mask, tgt_in, return_attention=model.has_attention)
        loss = F.cross_entropy(out.logits.reshape(-1, TGT_VOCAB), tgt_out.reshape(-1), label_smoothing=0.1)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for name, weights in out.attention.items():
        assert weights.dtype == torch.float32, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.eval().encode(src, src_mask)
        log_probs, _, _ = model.decode_step(state, tgt_in[:, 0])
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()


# ---------------------------------------------------------------------------------------------- learning


def _real_pairs(corpus_path: Path, count: int = 16) -> list[tuple[str, str]]:
    """The first `count` short English->Chinese pairs with distinct sources and targets."""
    pairs: list[tuple[str, str]] = []
    seen_src, seen_tgt = set(), set()
    with corpus_path.open(encoding="utf-8") as lines:
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or not 3 <= len(fields[0]) <= 12 or not 1 <= len(fields[1]) <= 5:
                continue
            if fields[0] in seen_src or fields[1] in seen_tgt:
                continue
            seen_src.add(fields[0])
            seen_tgt.add(fields[1])
            pairs.append((fields[0], fields[1]))
            if len(pairs) == count:
                break
    assert len(pairs) == count, f"{corpus_path} has fewer than {count} short pairs"
    return pairs


def _char_batch(pairs: list[tuple[str, str]]) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Character vocabularies (after the 4 special ids) and padded tensors: src + EOS, BOS + tgt, tgt + EOS."""
    src_vocab = {c: i + 4 for i, c in enumerate(sorted({c for s, _ in pairs for c in s}))}
    tgt_vocab = {c: i + 4 for i, c in enumerate(sorted({c for _, t in pairs for c in t}))}
    src_ids = [[src_vocab[c] for c in s] + [EOS] for s, _ in pairs]
    tgt_ids = [[tgt_vocab[c] for c in t] for _, t in pairs]

    def pad(rows: list[list[int]]) -> torch.Tensor:
        width = max(map(len, rows))
        return torch.tensor([row + [PAD] * (width - len(row)) for row in rows])

    src = pad(src_ids)
    return (
        {"src": len(src_vocab) + 4, "tgt": len(tgt_vocab) + 4, "targets": tgt_ids},
        src,
        src != PAD,
        pad([[BOS] + t for t in tgt_ids]),
        pad([t + [EOS] for t in tgt_ids]),
    )


OVERFIT = {
    "rnn": {"name": "rnn", "embed_dim": 32, "hidden_size": 64, "encoder_layers": 1, "decoder_layers": 1,
            "dropout": 0.0},
    "bahdanau": {"name": "bahdanau", "embed_dim": 32, "hidden_size": 48, "attention_dim": 32, "dropout": 0.0},
    "transformer": {"name": "transformer", "d_model": 64, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2,
                    "ff_dim": 128, "dropout": 0.0, "max_positions": 32},
}


def _fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    vocab: int,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    tgt_in: torch.Tensor,
    tgt_out: torch.Tensor,
    max_steps: int = 400,
) -> float:
    """Full-batch training until the loss is near zero; returns the last loss."""
    for _ in range(max_steps):
        logits = model(src, src_mask, tgt_in).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), tgt_out.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return loss.item()


@pytest.mark.corpus
@pytest.mark.parametrize("name", list(OVERFIT))
def test_each_model_overfits_real_pairs_and_greedy_decodes_them(name: str, corpus_path: Path) -> None:
    info, src, src_mask, tgt_in, tgt_out = _char_batch(_real_pairs(corpus_path))
    torch.manual_seed(0)
    model = build_model(model_config(OVERFIT[name]), info["src"], info["tgt"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    torch.set_flush_denormal(True)  # near-zero loss means denormal gradients, which are slow on x86 CPUs
    try:
        loss = _fit(model, optimizer, info["tgt"], src, src_mask, tgt_in, tgt_out)
    finally:
        torch.set_flush_denormal(False)
    assert loss < 0.05, f"{name} did not fit 16 pairs: loss {loss:.3f}"
    decoded = [hypothesis.tokens for hypothesis in greedy_decode(model, src, src_mask)]
    assert decoded == info["targets"]


def test_eval_mode_turns_dropout_off_and_gives_the_mode_back_even_after_an_error() -> None:
    model = small_model("transformer_prenorm").train()
    with eval_mode(model):
        assert not model.training
    assert model.training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("decoding failed")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training
