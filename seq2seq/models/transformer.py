"""Transformer encoder-decoder (Vaswani et al. 2017) in one file, with our own layers rather than nn.Transformer.

Training uses `F.scaled_dot_product_attention` (fused kernels, no (T, S) weight tensor kept); only when the caller
asks for attention maps do the layers compute the softmax explicitly and hand the weights back, so looking at
attention never slows a normal training step. Incremental decoding caches each layer's self-attention keys and
values (growing by one position per step) and its cross-attention keys and values (computed once in `encode`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.config import TransformerConfig

from .base import DecoderState, ModelOutput, Seq2SeqModel, masked_softmax


class MultiHeadAttention(nn.Module):
    """Multi-head attention; self-attention projects q, k, v with one fused matmul, cross-attention fuses k, v."""

    def __init__(self, d_model: int, num_heads: int, attention_dropout: float, self_attention: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.attention_dropout = attention_dropout
        if self_attention:
            self.qkv_projection = nn.Linear(d_model, 3 * d_model)
        else:
            self.q_projection = nn.Linear(d_model, d_model)
            self.kv_projection = nn.Linear(d_model, 2 * d_model)
        self.out_projection = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, T, parts*D) -> `parts` tensors (B, H, T, D/H)."""
        batch, length, _ = x.shape
        return x.view(batch, length, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def project_self(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._heads(self.qkv_projection(x), 3)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.q_projection(x), 1)[0]

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.kv_projection(memory), 2)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, T, d), k/v (B, H, S, d), key_mask (B, S) True on real keys -> output (B, T, D) and, if
        `need_weights`, float32 weights (B, H, T, S) before attention dropout."""
        dropout_p = self.attention_dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
            if causal:
                mask = mask.tril()
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :]
            weights = masked_softmax(scores, mask)
            out = torch.matmul(F.dropout(weights, dropout_p, self.training).to(v.dtype), v)
        else:
            attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)
        batch, _, length, _ = out.shape
        return self.out_projection(out.transpose(1, 2).reshape(batch, length, -1)), weights


class FeedForward(nn.Module):
    """Position-wise ReLU MLP. No dropout inside, as in the paper: on CPU drawing the dropout mask of the wide
    hidden layer costs about 5% of a training step."""

    def __init__(self, d_model: int, ff_dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, ff_dim)
        self.down = nn.Linear(ff_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)))


class ResidualLayer(nn.Module):
    """What the encoder and decoder layers share: every sub-layer is wrapped in a residual connection, pre-norm
    x + dropout(f(norm(x))) or post-norm norm(x + dropout(f(x))), each with its own LayerNorm."""

    def __init__(self, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def residual(
        self, x: torch.Tensor, norm: nn.LayerNorm, sublayer: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    ) -> tuple[torch.Tensor, Any]:
        """x after one wrapped `sublayer`, which maps its input to (output, anything to hand back)."""
        output, extra = sublayer(norm(x) if self.norm_first else x)
        x = x + self.dropout(output)
        return (x if self.norm_first else norm(x)), extra


class EncoderLayer(ResidualLayer):
    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float, attention_dropout: float,
                 norm_first: bool) -> None:
        super().__init__(dropout, norm_first)
        self.self_attention = MultiHeadAttention(d_model, num_heads, attention_dropout, self_attention=True)
        self.feed_forward = FeedForward(d_model, ff_dim)
        self.self_norm = nn.LayerNorm(d_model)
        self.ff_norm = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, src_mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, weights = self.residual(x, self.self_norm, lambda h: self.self_attention.attend(
            *self.self_attention.project_self(h), key_mask=src_mask, need_weights=need_weights
        ))
        x, _ = self.residual(x, self.ff_norm, lambda h: (self.feed_forward(h), None))
        return x, weights


class DecoderLayer(ResidualLayer):
    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float, attention_dropout: float,
                 norm_first: bool) -> None:
        super().__init__(dropout, norm_first)
        self.self_attention = MultiHeadAttention(d_model, num_heads, attention_dropout, self_attention=True)
        self.cross_attention = MultiHeadAttention(d_model, num_heads, attention_dropout, self_attention=False)
        self.feed_forward = FeedForward(d_model, ff_dim)
        self.self_norm = nn.LayerNorm(d_model)
        self.cross_norm = nn.LayerNorm(d_model)
        self.ff_norm = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        src_mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, D). Without `cache`, T positions attend causally to each other (teacher forcing); with a
        cache of earlier keys/values (B, H, t, d), x is the single next position and attends to all of them.
        -> output, self weights, cross weights, and the keys/values of every position seen so far."""

        def attend_to_targets(h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
            q, k, v = self.self_attention.project_self(h)
            if cache is not None:
                k = torch.cat([cache[0].to(k.dtype), k], dim=2)
                v = torch.cat([cache[1].to(v.dtype), v], dim=2)
            attended, weights = self.self_attention.attend(q, k, v, causal=cache is None, need_weights=need_weights)
            return attended, (weights, (k, v))

        x, (self_weights, keys_values) = self.residual(x, self.self_norm, attend_to_targets)
        x, cross_weights = self.residual(x, self.cross_norm, lambda h: self.cross_attention.attend(
            self.cross_attention.project_query(h), *memory_kv, key_mask=src_mask, need_weights=need_weights
        ))
        x, _ = self.residual(x, self.ff_norm, lambda h: (self.feed_forward(h), None))
        return x, self_weights, cross_weights, keys_values


def sinusoidal_positions(max_positions: int, d_model: int) -> torch.Tensor:
    """(max_positions, d_model) table of Vaswani et al.: sin on even, cos on odd dimensions."""
    position = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_positions, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table


class TransformerSeq2Seq(Seq2SeqModel):
    has_attention = True

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, config: TransformerConfig) -> None:
        super().__init__()
        d_model, max_positions, norm_first = config.d_model, config.max_positions, config.norm_first
        if config.share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings=true needs one vocabulary, but the source has {src_vocab_size} entries and the "
                f"target {tgt_vocab_size}; train a joint tokenizer (tokenizer.joint=true) or set share_embeddings=false"
            )
        self.d_model = d_model
        self.max_positions = max_positions
        self.embed_scale = math.sqrt(d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model, padding_idx=self.pad_id)
        self.src_embed = (
            self.tgt_embed if config.share_embeddings
            else nn.Embedding(src_vocab_size, d_model, padding_idx=self.pad_id)
        )
        if config.positional == "sinusoidal":
            self.register_buffer("position_table", sinusoidal_positions(max_positions, d_model), persistent=False)
            self.learned_positions = None
        else:
            self.learned_positions = nn.Embedding(max_positions, d_model)
        layer_args = (d_model, config.num_heads, config.ff_dim, config.dropout, config.attention_dropout, norm_first)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(config.decoder_layers))
        # Pre-norm leaves the residual stream unnormalised, so each stack ends with a LayerNorm.
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.output_projection = nn.Linear(d_model, tgt_vocab_size, bias=False)
        self._init_weights()
        if config.tie_output:
            self.output_projection.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        """Xavier-uniform projections, N(0, d^-1/2) embeddings (so that scaling by sqrt(d) gives unit variance)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedding in (self.src_embed, self.tgt_embed):
            nn.init.normal_(embedding.weight, std=self.d_model**-0.5)
            nn.init.zeros_(embedding.weight[self.pad_id])
        if self.learned_positions is not None:
            nn.init.normal_(self.learned_positions.weight, std=self.d_model**-0.5)

    @property
    def max_source_positions(self) -> int:
        return self.max_positions

    @property
    def max_target_positions(self) -> int:
        return self.max_positions

    @property
    def source_embedding(self) -> nn.Module:
        return self.src_embed

    def _embed(self, embedding: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        length = offset + tokens.size(1)
        if length > self.max_positions:
            raise ValueError(
                f"a sequence of {length} tokens exceeds model.max_positions={self.max_positions}; "
                "filter longer sentences out or train with a larger model.max_positions"
            )
        if self.learned_positions is not None:
            positions = self.learned_positions.weight[offset:length]
        else:
            positions = self.position_table[offset:length]
        return self.dropout(embedding(tokens) * self.embed_scale + positions)

    def _encode(self, src: torch.Tensor, src_mask: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, list]:
        x = self._embed(self.src_embed, src)
        weights = []
        for layer in self.encoder_layers:
            x, layer_weights = layer(x, src_mask, need_weights=need_weights)
            weights.append(layer_weights)
        return self.encoder_norm(x), weights

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        """State = per-layer cross-attention keys/values of the memory and empty self-attention caches."""
        memory, _ = self._encode(src, src_mask, need_weights=False)
        cross = [layer.cross_attention.project_memory(memory) for layer in self.decoder_layers]
        empty = cross[0][0][:, :, :0]
        return {
            "src_mask": src_mask,
            "cross_k": [k for k, _ in cross],
            "cross_v": [v for _, v in cross],
            "self_k": [empty] * len(cross),
            "self_v": [empty] * len(cross),
        }

    def decode_step(
        self, state: DecoderState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        position = state["self_k"][0].size(2)
        x = self._embed(self.tgt_embed, prev_tokens.unsqueeze(1), offset=position)
        self_k, self_v = [], []
        last = len(self.decoder_layers) - 1
        for i, layer in enumerate(self.decoder_layers):
            x, _, cross_weights, (k, v) = layer(
                x,
                (state["cross_k"][i], state["cross_v"][i]),
                state["src_mask"],
                cache=(state["self_k"][i], state["self_v"][i]),
                need_weights=i == last,
            )
            self_k.append(k)
            self_v.append(v)
        logits = self.output_projection(self.decoder_norm(x[:, 0]))
        new_state = dict(state, self_k=self_k, self_v=self_v)
        return F.log_softmax(logits.float(), dim=-1), cross_weights[:, :, 0].mean(dim=1), new_state

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False
    ) -> ModelOutput:
        memory, encoder_weights = self._encode(src, src_mask, need_weights=return_attention)
        x = self._embed(self.tgt_embed, tgt_in)
        self_weights, cross_weights = [], []
        for layer in self.decoder_layers:
            memory_kv = layer.cross_attention.project_memory(memory)
            x, layer_self, layer_cross, _ = layer(x, memory_kv, src_mask, need_weights=return_attention)
            self_weights.append(layer_self)
            cross_weights.append(layer_cross)
        logits = self.output_projection(self.decoder_norm(x)).float()
        if not return_attention:
            return ModelOutput(logits=logits)
        cross_layers = torch.stack(cross_weights)
        attention = {
            "cross": cross_layers[-1].mean(dim=1),
            "cross_layers": cross_layers,
            "self_layers": torch.stack(self_weights),
            "encoder_layers": torch.stack(encoder_weights),
        }
        return ModelOutput(logits=logits, attention=attention)
