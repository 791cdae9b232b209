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
  two. With one mixer, both directions run in a single call on a batch of two rows,
  and the mixer's two per-token linear maps are shared as well: ``in_proj`` runs once
  and its output is reversed (in_proj(reverse(x)) = reverse(in_proj(x))), and the two
  directions are summed before one ``out_proj`` (out_proj(a) + beta out_proj(b) =
  out_proj(a + beta b), plus (1 + beta) times its bias if it has one).
- ``align_backward``: the official code adds ``bwd`` to ``fwd`` in the reversed
  order, without flipping it back, so position p of a sequence of length L receives
  the backward state of position L-1-p. At a sequence's last token, the one the
  model scores, that is the backward scan after reading the whole sequence. With
  ``align_backward=True`` the backward output is flipped back first, so position p
  gets the backward summary of items p..L-1 (at the last token: the last item
  only). The default, False, reproduces the official code.

``scan_scored_only``: the last layer's output is read at one token per sequence (the
scored one), and with shared directions its scan then computes the output there only
(``ssd4rec.ops.ssd_at``: one attention row per sequence in place of the whole scan): the
same function, in another order of summation. Its state still reads every token, so the
gradients reach every token as before.

``compile_glue``: the elementwise glue around each layer's scan through torch.compile
(``ssd4rec.modules.bissd_glue`` says what is compiled and what stays eager); same maths,
same parameters and state_dict.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ssd4rec.data.packing import segment_layout
from ssd4rec.modules import bissd_glue
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


class _ReverseRows(torch.autograd.Function):
    """x[reverse_index] for a reverse_index that is its own inverse (every sequence flipped
    in place): the backward pass is the same gather, not the scatter-add that autograd
    would use for a general index."""

    @staticmethod
    def forward(ctx, x, reverse_index):
        ctx.save_for_backward(reverse_index)
        return x[reverse_index]

    @staticmethod
    def backward(ctx, grad):
        (reverse_index,) = ctx.saved_tensors
        return grad[reverse_index], None


def reverse_rows(x, reverse_index):
    """x: (T, ...) packed, reverse_index: (T,) flipping every sequence -> (T, ...)"""
    return _ReverseRows.apply(x, reverse_index)


class BiSSDLayer(nn.Module):
    """One Bi-SSD layer on a packed stream x: (T, d_model).

    compile_glue (bool, a plain attribute: not in the state_dict): run the glue around the
    scan compiled (``bissd_glue``); with unshared directions only what follows the combine.
    scan_scored_only (bool, likewise): with shared directions, when the output is kept at one
    row per sequence (keep_index and cu_seqlens given), scan for those rows only (``ssd_at``).
    """

    def __init__(self, d_model, dropout, beta, shared_directions, align_backward, layer_norm_eps,
                 compile_glue=False, scan_scored_only=True, **mixer_args):
        super().__init__()
        self.beta = beta
        self.align_backward = align_backward
        self.compile_glue = compile_glue
        self.scan_scored_only = scan_scored_only
        self.forward_ssd = Mamba2Mixer(d_model, **mixer_args)
        self.backward_ssd = self.forward_ssd if shared_directions else Mamba2Mixer(d_model, **mixer_args)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, layer_norm_eps)

    @property
    def shared_directions(self):
        return self.backward_ssd is self.forward_ssd

    def mix(self, x, seq_idx, reverse_index, keep_index=None, cu_seqlens=None):
        """fwd + beta * bwd at every token, or only at the rows keep_index: (K,).

        x: (T, d_model), seq_idx: (T,) int32, reverse_index: (T,), cu_seqlens: (B+1,) or None
        -> (T or K, d_model)
        """
        if not self.shared_directions:
            fwd = self.forward_ssd(x[None], seq_idx[None])[0]
            bwd = self.backward_ssd(reverse_rows(x, reverse_index)[None], seq_idx[None])[0]
            if self.align_backward:
                bwd = reverse_rows(bwd, reverse_index)
            mixed = fwd + self.beta * bwd
            return mixed if keep_index is None else mixed[keep_index]

        mixer = self.forward_ssd
        projected = mixer.in_proj(x)  # (T, P), once for both directions
        both = torch.stack([projected, reverse_rows(projected, reverse_index)])  # (2, T, P)
        if self._scans_scored_only(keep_index, cu_seqlens):
            queries = self.query_index(keep_index, reverse_index)
            y, z = self._scan_both_at(*mixer.split_projection(both), seq_idx, queries, cu_seqlens)
            gated = mixer.norm(y, z)  # (2, K, d_inner), row 1 already at the rows it adds to
            combined = gated[0] + self.beta * gated[1]
        else:
            y, z = self._scan_both(*mixer.split_projection(both), seq_idx)
            gated = mixer.norm(y, z)
            bwd = reverse_rows(gated[1], reverse_index) if self.align_backward else gated[1]
            combined = gated[0] + self.beta * bwd  # (T, d_inner)
            if keep_index is not None:
                combined = combined[keep_index]
        out = F.linear(combined, mixer.out_proj.weight)
        if mixer.out_proj.bias is not None:
            out = out + (1 + self.beta) * mixer.out_proj.bias
        return out

    def _scan_both(self, z, xBC, dt, seq_idx):
        """The shared mixer's conv and scan on both directions at once (eager in either mode).

        z, xBC, dt: (2, T, .) in_proj's output split (``Mamba2Mixer.split_projection``), row 1
        reversed; seq_idx: (T,) int32 -> y: (2, T, d_inner) before the gated norm, z: its gate
        """
        mixer = self.forward_ssd
        seq_idx2 = seq_idx.expand(2, -1)
        return mixer.ssm(mixer.convolve(xBC, seq_idx2), dt, seq_idx2), z

    def _scans_scored_only(self, keep_index, cu_seqlens):
        """Whether this call scans for the kept rows only: one kept row per sequence, shared mixer."""
        return (self.scan_scored_only and self.shared_directions and keep_index is not None
                and cu_seqlens is not None and keep_index.shape[0] == cu_seqlens.shape[0] - 1)

    def query_index(self, keep_index, reverse_index):
        """(2, K): where each direction's row holds what the kept rows add. Row 1 is the reversed
        stream: the official unaligned combine reads it at the kept positions themselves, the
        aligned one at their mirror images (reverse_rows, then keep_index)."""
        return torch.stack([keep_index, reverse_index[keep_index] if self.align_backward else keep_index])

    def _scan_both_at(self, z, xBC, dt, seq_idx, queries, cu_seqlens):
        """_scan_both at the rows queries: (2, K) only -> y: (2, K, d_inner), z: (2, K, d_inner).

        The conv still runs on every token: the scan's state reads all of them.
        """
        mixer = self.forward_ssd
        rows = torch.arange(2, device=queries.device)[:, None]
        conv = mixer.convolve(xBC, seq_idx.expand(2, -1))
        return mixer.ssm_at(conv, dt, seq_idx, queries, cu_seqlens, self.compile_glue), z[rows, queries]

    def forward(self, x, seq_idx, reverse_index, keep_index=None, cu_seqlens=None):
        """x: (T, d_model), seq_idx: (T,) int32, reverse_index: (T,) -> (T, d_model), or
        (K, d_model) at the rows keep_index: (K,) only (what the last layer needs).

        cu_seqlens: (B+1,), given with a keep_index that holds one row of each sequence, in
        sequence order (keep_index[b] a token of sequence b): then the scan runs for those
        rows only (scan_scored_only)."""
        if self.compile_glue:
            return self._forward_compiled_glue(x, seq_idx, reverse_index, keep_index, cu_seqlens)
        mixed = self.mix(x, seq_idx, reverse_index, keep_index, cu_seqlens)
        if keep_index is not None:
            x = x[keep_index]
        h = self.dropout(self.layer_norm(mixed + x))
        return self.ffn(h)

    def _forward_compiled_glue(self, x, seq_idx, reverse_index, keep_index, cu_seqlens):
        """forward, same maths, the glue compiled: shapes as forward."""
        if not self.shared_directions:  # two whole mixers, eager; the rest compiled
            return bissd_glue.after_mix(self, x, self.mix(x, seq_idx, reverse_index, keep_index), keep_index)
        if self._scans_scored_only(keep_index, cu_seqlens):
            queries = self.query_index(keep_index, reverse_index)
            y, z = self._scan_both_at(*bissd_glue.both_directions(self, x, reverse_index), seq_idx, queries,
                                      cu_seqlens)
            return bissd_glue.scored_tail(self, x, y, z, keep_index)
        y, z = self._scan_both(*bissd_glue.both_directions(self, x, reverse_index), seq_idx)
        return bissd_glue.layer_tail(self, x, y, z, reverse_index, keep_index)


class BiSSDEncoder(nn.Module):
    """A stack of Bi-SSD layers over packed sequences; no RecBole dependency.

    forward(x: (T, d_model), cu_seqlens: (B+1,) int) -> (T, d_model)

    compile_glue: each layer's glue through torch.compile (``BiSSDLayer``).
    scan_scored_only: the last layer scans for output_index's rows only, when they are one per
    sequence (``BiSSDLayer``).
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
        compile_glue=False,
        scan_scored_only=True,
    ):
        super().__init__()
        mixer_args = dict(
            d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, chunk_size=chunk_size, backend=backend
        )
        self.layers = nn.ModuleList(
            BiSSDLayer(d_model, dropout, beta, shared_directions, align_backward, layer_norm_eps, compile_glue,
                       scan_scored_only, **mixer_args)
            for _ in range(num_layers)
        )

    def forward(self, x, cu_seqlens, seq_idx=None, reverse_index=None, output_index=None):
        """x: (T, d_model) packed; cu_seqlens: (B+1,). seq_idx and reverse_index
        ((T,) each) may be passed when already known, e.g. from a PackedBatch.

        Returns (T, d_model), or with output_index: (K,) only those rows, (K, d_model):
        then the last layer's out_proj, norms and FFN run on K rows instead of T, since
        they act per token and nothing after them reads the other rows. When output_index
        holds one row per sequence (K = B), row b must be a token of sequence b (each
        sequence's last token, as SSD4Rec scores): the last layer's scan then runs for those
        rows only (scan_scored_only). That is checked on a CPU; on a GPU it would cost a
        device-to-host sync per step.
        """
        if seq_idx is None or reverse_index is None:
            seq_idx, _, reverse_index = segment_layout(cu_seqlens, x.shape[0])
        last_layer = self.layers[-1]
        if not x.is_cuda and last_layer._scans_scored_only(output_index, cu_seqlens):
            owners = seq_idx[output_index].long()
            if not torch.equal(owners, torch.arange(len(owners))):
                raise ValueError("BiSSDEncoder: output_index holds one row per sequence, so row b must be a "
                                 f"token of sequence b; its rows belong to sequences {owners.tolist()[:8]}...")
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == last:
                x = layer(x, seq_idx, reverse_index, output_index, cu_seqlens)
            else:
                x = layer(x, seq_idx, reverse_index)
        return x
