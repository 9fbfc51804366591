"""RNN encoder-decoder with additive attention (Bahdanau, Cho & Bengio 2015).

A bidirectional encoder gives one annotation h_j per source position. At each target step the previous decoder
state s scores every annotation with v . tanh(W_s s + W_h h_j); the softmax of those scores (exactly zero on
padding) weighs the annotations into a context vector, which is fed to the recurrent cell together with the
previous target embedding. A deep output layer reads (new state, context, previous embedding).

The recurrence makes a Python loop over target steps unavoidable, so everything that does not depend on the
step happens outside it: target embeddings, the key projection W_h h (once per sentence) and the output layer
(once over all steps). Recurrent cells run in float32 on CPU even under autocast (see models/rnn.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.config import BahdanauConfig

from .base import DecoderState, ModelOutput, Seq2SeqModel, masked_softmax
from .rnn import DecoderStart, RNNEncoder, recurrent_precision

CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}


class BahdanauSeq2Seq(Seq2SeqModel):
    """Bidirectional GRU/LSTM encoder, additive attention, attention-fed GRU/LSTM decoder with deep output."""

    has_attention = True

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, config: BahdanauConfig) -> None:
        super().__init__()
        cell, embed_dim, hidden_size, dropout = config.cell, config.embed_dim, config.hidden_size, config.dropout
        attention_dim = config.attention_dim
        self.cell = cell
        self.encoder = RNNEncoder(src_vocab_size, embed_dim, hidden_size, config.encoder_layers, True, cell, dropout)
        memory_size = self.encoder.output_size
        self.key_projection = nn.Linear(memory_size, attention_dim, bias=False)  # W_h
        self.query_projection = nn.Linear(hidden_size, attention_dim)  # W_s (its bias is the score's bias)
        self.energy = nn.Linear(attention_dim, 1, bias=False)  # v
        self.init_state = DecoderStart(memory_size, hidden_size, config.decoder_layers, cell)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, embed_dim, padding_idx=self.pad_id)
        self.cells = nn.ModuleList(
            CELLS[cell](embed_dim + memory_size if layer == 0 else hidden_size, hidden_size)
            for layer in range(config.decoder_layers)
        )
        self.readout = nn.Linear(hidden_size + memory_size + embed_dim, embed_dim)
        self.output_projection = nn.Linear(embed_dim, tgt_vocab_size)
        if config.tie_output:
            self.output_projection.weight = self.tgt_embed.weight
        self.dropout = nn.Dropout(dropout)

    @property
    def source_embedding(self) -> nn.Module:
        return self.encoder.embed

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        """State = annotations, their projected keys, the mask and the decoder's initial (B, layers, H) state(s)
        (from the encoder's final states, as Bahdanau et al. initialise s_0 from the backward encoder)."""
        memory, final = self.encoder(src, src_mask, need_outputs=True)
        return {"memory": memory, "keys": self.key_projection(memory), "src_mask": src_mask, **self.init_state(final)}

    def _step(
        self,
        state: DecoderState,
        hidden: list[torch.Tensor],
        cell: list[torch.Tensor],
        embedded: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One recurrence; updates `hidden`/`cell` (per-layer (B, H) float lists) in place.
        -> new top state s_i (B, H), context c_i (B, 2H), attention weights (B, S) float32."""
        query = self.query_projection(hidden[-1]).unsqueeze(1)
        scores = self.energy(torch.tanh(state["keys"] + query)).squeeze(-1)
        weights = masked_softmax(scores, state["src_mask"])
        memory = state["memory"]
        context = torch.bmm(weights.unsqueeze(1).to(memory.dtype), memory).squeeze(1)
        autocast_ctx, dtype = recurrent_precision(embedded)
        x = torch.cat([embedded.to(dtype), context.to(dtype)], dim=-1)
        with autocast_ctx:
            for layer, rnn_cell in enumerate(self.cells):
                if layer > 0:
                    x = self.dropout(x)
                if self.cell == "lstm":
                    hidden[layer], cell[layer] = rnn_cell(x, (hidden[layer].to(dtype), cell[layer].to(dtype)))
                else:
                    hidden[layer] = rnn_cell(x, hidden[layer].to(dtype))
                x = hidden[layer]
        return x, context, weights

    def _output(self, states: torch.Tensor, contexts: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Deep output: (s_i, c_i, E y_{i-1}) -> logits, for any leading shape."""
        features = torch.cat([states, contexts.to(states.dtype), embedded.to(states.dtype)], dim=-1)
        readout = torch.tanh(self.readout(features))
        return self.output_projection(self.dropout(readout))

    def decode_step(
        self, state: DecoderState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        embedded = self.dropout(self.tgt_embed(prev_tokens))
        hidden = list(state["hidden"].unbind(1))
        cell = list(state["cell"].unbind(1)) if self.cell == "lstm" else []
        top, context, weights = self._step(state, hidden, cell, embedded)
        logits = self._output(top, context, embedded)
        new_state = dict(state, hidden=torch.stack(hidden, dim=1))
        if self.cell == "lstm":
            new_state["cell"] = torch.stack(cell, dim=1)
        return F.log_softmax(logits.float(), dim=-1), weights, new_state

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False
    ) -> ModelOutput:
        state = self.encode(src, src_mask)
        embedded = self.dropout(self.tgt_embed(tgt_in))
        hidden = list(state["hidden"].unbind(1))
        cell = list(state["cell"].unbind(1)) if self.cell == "lstm" else []
        tops, contexts, weights = [], [], []
        for t in range(tgt_in.size(1)):
            top, context, step_weights = self._step(state, hidden, cell, embedded[:, t])
            tops.append(top)
            contexts.append(context)
            weights.append(step_weights)
        logits = self._output(torch.stack(tops, 1), torch.stack(contexts, 1), embedded)
        attention = {"cross": torch.stack(weights, 1)} if return_attention else {}
        return ModelOutput(logits=logits.float(), attention=attention)
