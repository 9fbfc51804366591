"""Fixed-context encoder-decoder (Sutskever et al. 2014; Cho et al. 2014).

The encoder reads the whole source and sums it up in one vector: its top layer's final state (both directions when
bidirectional; `context="final"`, as in the papers), or the mean or element-wise maximum of its top layer's states
over the source positions (`"mean"`, `"max"`, sentence-embedding style; on the default data `max` learned no faster
than `final`, see README "Results"). Bridged to the decoder's size with a Linear+tanh, that one vector ("context")
is everything the decoder knows of the source: it initialises the decoder (one more Linear+tanh gives each decoder
layer, and an LSTM's cell, its own start) and, as in Cho et al., it is concatenated to the decoder input and to the
output layer at every step. There is no attention and no per-position memory, which is exactly what makes long
sentences hard for this model.

Recurrent layers run in float32 on CPU even under autocast: bf16 GRU/LSTM kernels are slower than fp32 on some
CPUs and buy these loop-bound models little where they are faster (docs/results.md), while the Linear layers
around them still use bf16.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import RNNConfig
from seq2seq.data.tokenizer import PAD_ID

from .base import DecoderState, ModelOutput, Seq2SeqModel

RNN_CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


def recurrent_precision(x: torch.Tensor) -> tuple[contextlib.AbstractContextManager, torch.dtype]:
    """Autocast context and input dtype for a recurrent layer fed `x`, its floating-point input (embeddings,
    never token ids): float32 with autocast off on CPU (see module doc); elsewhere x's own dtype, autocast
    deciding (cuDNN RNNs are fast in half precision)."""
    if not x.is_floating_point():
        raise TypeError(f"recurrent_precision takes the recurrent layer's float input, got {x.dtype}")
    if x.device.type == "cpu":
        return torch.autocast("cpu", enabled=False), torch.float32
    return contextlib.nullcontext(), x.dtype


class RNNEncoder(nn.Module):
    """Embeddings + (bi)directional GRU/LSTM, over packed sequences when the batch has padding, so padding never
    reaches any state."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        cell: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.rnn = RNN_CELLS[cell](
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.num_directions

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor, need_outputs: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> per-position outputs (B, S, dirs*H) float32 (None unless `need_outputs`) and the top layer's
        final hidden state (B, dirs*H), both directions concatenated (the backward one has read the whole
        sentence right to left)."""
        lengths = src_mask.sum(dim=1).cpu()
        if bool((lengths == 0).any()):
            raise ValueError("a source sentence has no real tokens (src_mask all False); drop empty sentences")
        x = self.dropout(self.embed(src))
        autocast_ctx, dtype = recurrent_precision(x)
        x = x.to(dtype)
        unpadded = bool((lengths == src.size(1)).all())  # length-sorted batches mostly are: packing buys nothing
        with autocast_ctx:
            if unpadded:
                outputs, final = self.rnn(x)
            else:
                packed_out, final = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        hidden = final[0] if isinstance(final, tuple) else final  # LSTM: (h, c); the context is built from h
        top = hidden.view(self.num_layers, self.num_directions, src.size(0), -1)[-1]
        top = top.transpose(0, 1).reshape(src.size(0), self.output_size)
        if not need_outputs:
            return None, top
        if not unpadded:
            outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=src.size(1))
        return outputs, top


class DecoderStart(nn.Linear):
    """A recurrent decoder's first state from one summary vector of the source: a Linear+tanh gives each decoder
    layer, and an LSTM's cell, its own start. A Linear itself, so its weights keep their checkpoint names."""

    def __init__(self, summary_size: int, hidden_size: int, layers: int, cell: str) -> None:
        self.states = 2 if cell == "lstm" else 1  # an LSTM starts from a cell state too
        super().__init__(summary_size, self.states * layers * hidden_size)
        self.layers, self.hidden_size = layers, hidden_size

    def forward(self, summary: torch.Tensor) -> DecoderState:
        """summary (B, summary_size) -> {"hidden"[, "cell"]: (B, layers, H)}."""
        start = torch.tanh(super().forward(summary)).view(summary.size(0), self.states, self.layers, self.hidden_size)
        return {"hidden": start[:, 0], "cell": start[:, 1]} if self.states == 2 else {"hidden": start[:, 0]}


class RNNSeq2Seq(Seq2SeqModel):
    """GRU/LSTM encoder-decoder whose decoder sees the source only through one fixed context vector."""

    has_attention = False

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, config: RNNConfig) -> None:
        super().__init__()
        cell, embed_dim, hidden_size, dropout = config.cell, config.embed_dim, config.hidden_size, config.dropout
        self.cell = cell
        self.context = config.context
        self.encoder = RNNEncoder(
            src_vocab_size, embed_dim, hidden_size, config.encoder_layers, config.bidirectional, cell, dropout
        )
        self.bridge = nn.Linear(self.encoder.output_size, hidden_size)
        self.init_state = DecoderStart(hidden_size, hidden_size, config.decoder_layers, cell)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, embed_dim, padding_idx=self.pad_id)
        self.decoder_rnn = RNN_CELLS[cell](
            embed_dim + hidden_size,
            hidden_size,
            num_layers=config.decoder_layers,
            batch_first=True,
            dropout=dropout if config.decoder_layers > 1 else 0.0,
        )
        # Readout from (decoder state, context, previous target embedding), sized embed_dim so it can be tied.
        self.readout = nn.Linear(2 * hidden_size + embed_dim, embed_dim)
        self.output_projection = nn.Linear(embed_dim, tgt_vocab_size)
        if config.tie_output:
            self.output_projection.weight = self.tgt_embed.weight
        self.dropout = nn.Dropout(dropout)

    @property
    def source_embedding(self) -> nn.Module:
        return self.encoder.embed

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        """State = the context vector and the decoder's initial (B, layers, H) state(s); nothing per position."""
        outputs, final = self.encoder(src, src_mask, need_outputs=self.context != "final")
        context = torch.tanh(self.bridge(self._summary(outputs, final, src_mask)))
        return {"context": context, **self.init_state(context)}

    def _summary(self, outputs: torch.Tensor | None, final: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """The one vector (B, dirs*H) the source is reduced to, by `self.context`; padding never counts."""
        if self.context == "final":
            return final
        mask = src_mask.unsqueeze(-1)
        if self.context == "mean":
            return (outputs * mask).sum(dim=1) / mask.sum(dim=1)
        return outputs.masked_fill(~mask, float("-inf")).amax(dim=1)

    def _decode(self, state: DecoderState, tokens: torch.Tensor) -> tuple[torch.Tensor, DecoderState]:
        """Run the decoder over tokens (B, T) from `state` -> logits (B, T, V) and the state after the last one."""
        context = state["context"]
        embedded = self.dropout(self.tgt_embed(tokens))
        context_seq = context.unsqueeze(1).expand(-1, tokens.size(1), -1)
        autocast_ctx, dtype = recurrent_precision(embedded)
        rnn_input = torch.cat([embedded.to(dtype), context_seq.to(dtype)], dim=-1)
        h0 = state["hidden"].transpose(0, 1).to(dtype).contiguous()
        with autocast_ctx:
            if self.cell == "lstm":
                c0 = state["cell"].transpose(0, 1).to(dtype).contiguous()
                outputs, (h, c) = self.decoder_rnn(rnn_input, (h0, c0))
            else:
                outputs, h = self.decoder_rnn(rnn_input, h0)
        new_state = {"context": context, "hidden": h.transpose(0, 1)}
        if self.cell == "lstm":
            new_state["cell"] = c.transpose(0, 1)
        readout = torch.tanh(self.readout(torch.cat([outputs, context_seq.to(dtype), embedded.to(dtype)], dim=-1)))
        return self.output_projection(self.dropout(readout)), new_state

    def decode_step(
        self, state: DecoderState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, None, DecoderState]:
        logits, new_state = self._decode(state, prev_tokens.unsqueeze(1))
        return F.log_softmax(logits[:, 0].float(), dim=-1), None, new_state

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False
    ) -> ModelOutput:
        logits, _ = self._decode(self.encode(src, src_mask), tgt_in)
        return ModelOutput(logits=logits.float())
