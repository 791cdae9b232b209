"""The Bi-SSD encoder of SSD4Rec over packed variable-length sequences.

One layer (Qu et al., 2024, Sec. 4):

    fwd = SSD(x)                    the sequences read first to last
    bwd = SSD'(reverse(x))          each sequence read last to first
    h   = Dropout(LayerNorm(fwd + beta * bwd + x))
    out = LayerNorm(h + Dropout(W2 GELU(W1 h)))  then Dropout   (4x FFN)

``reverse`` flips every sequence in place inside the packed stream, so sequence
boundaries (seq_idx) stay where they are and nothing leaks between sequences.

Two choices the paper leaves open, both offered here:

- ``shared_directions``: one SSD mixer for both directions (the official code) or
  two. With one mixer, both directions run in a single call on a batch of two rows.
- ``align_backward``: the official code adds ``bwd`` to ``fwd`` in the reversed
  order, without flipping it back, so position p of a sequence of length L receives
  the backward state of position L-1-p. At a sequence's last token, the one the
  model scores, that is the backward scan after reading the whole sequence. With
  ``align_backward=True`` the backward output is flipped back first, so position p
  gets the backward summary of items p..L-1 (at the last token: the last item
  only). The default, False, reproduces the official code.
"""

import torch
from torch import nn

from ssd4rec.data.packing import segment_layout
from ssd4rec.modules.mamba2 import Mamba2Mixer


class FeedForward(nn.Module):
    """Position-wise FFN with residual: LayerNorm(x + Dropout(W2 GELU(W1 x))), then Dropout."""

    def __init__(self, d_model, inner_size, dropout, layer_norm_eps):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x):
        """x: (..., d_model) -> (..., d_model)"""
        h = self.w_2(self.dropout(self.activation(self.w_1(x))))
        return self.dropout(self.layer_norm(h + x))


class BiSSDLayer(nn.Module):
    """One Bi-SSD layer on a packed stream x: (T, d_model)."""

    def __init__(self, d_model, dropout, beta, shared_directions, align_backward, layer_norm_eps, **mixer_args):
        super().__init__()
        self.beta = beta
        self.align_backward = align_backward
        self.forward_ssd = Mamba2Mixer(d_model, **mixer_args)
        self.backward_ssd = self.forward_ssd if shared_directions else Mamba2Mixer(d_model, **mixer_args)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, layer_norm_eps)

    @property
    def shared_directions(self):
        return self.backward_ssd is self.forward_ssd

    def forward(self, x, seq_idx, reverse_index):
        """x: (T, d_model), seq_idx: (T,) int32, reverse_index: (T,) -> (T, d_model)"""
        x_reversed = x[reverse_index]
        if self.shared_directions:
            both = self.forward_ssd(torch.stack([x, x_reversed]), seq_idx.expand(2, -1))
            fwd, bwd = both[0], both[1]
        else:
            fwd = self.forward_ssd(x[None], seq_idx[None])[0]
            bwd = self.backward_ssd(x_reversed[None], seq_idx[None])[0]
        if self.align_backward:
            bwd = bwd[reverse_index]
        h = self.dropout(self.layer_norm(fwd + self.beta * bwd + x))
        return self.ffn(h)


class BiSSDEncoder(nn.Module):
    """A stack of Bi-SSD layers over packed sequences; no RecBole dependency.

    forward(x: (T, d_model), cu_seqlens: (B+1,) int) -> (T, d_model)
    """

    def __init__(
        self,
        d_model,
        num_layers=2,
        d_state=64,
        d_conv=4,
        expand=2,
        headdim=16,
        chunk_size=256,
        dropout=0.2,
        beta=0.1,
        shared_directions=True,
        align_backward=False,
        layer_norm_eps=1e-12,
        backend="auto",
    ):
        super().__init__()
        mixer_args = dict(
            d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, chunk_size=chunk_size, backend=backend
        )
        self.layers = nn.ModuleList(
            BiSSDLayer(d_model, dropout, beta, shared_directions, align_backward, layer_norm_eps, **mixer_args)
            for _ in range(num_layers)
        )

    def forward(self, x, cu_seqlens, seq_idx=None, reverse_index=None):
        """x: (T, d_model) packed; cu_seqlens: (B+1,). seq_idx and reverse_index
        ((T,) each) may be passed when already known, e.g. from a PackedBatch."""
        if seq_idx is None or reverse_index is None:
            seq_idx, _, reverse_index = segment_layout(cu_seqlens, x.shape[0])
        for layer in self.layers:
            x = layer(x, seq_idx, reverse_index)
        return x
