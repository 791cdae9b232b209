"""Packed segments: B sequences laid end to end (T tokens), with a padded view on demand.

The lifelong backbones run their mixers on the packed stream (no padding, the kernels restart
at every change of ``seq_idx``), but the few per-sequence reductions that carry a recurrent
state from one window of a history into the next (``ssd4rec.modules.stateful``) are batched
matrix products over a (B, L) view; so are the backbones that have no sequence registers
(Mamba-1's kernel, RecBole's Transformer). :class:`Segments` holds both layouts and moves
tensors between them with one gather each way.

Shapes: B sequences, T = sum(lengths) tokens, L = max(lengths).
"""

import torch
import torch.nn.functional as F


class Segments:
    """The layout of B packed sequences.

    lengths:    (B,) int64, every length >= 1
    total:      T = sum(lengths), and max_len: L = max(lengths), both given as Python ints
                (the caller knows them on the host; reading them from a CUDA tensor would
                synchronise the device once per window)
    cu_seqlens: (B+1,) int64 offsets; seq_idx: (T,) int32; position: (T,) int64 position of
                each token within its sequence; last_index: (B,) each sequence's last token
    """

    def __init__(self, lengths, total, max_len):
        self.lengths = lengths.long()
        self.total = int(total)
        self.max_len = int(max_len)
        device = self.lengths.device
        self.cu_seqlens = F.pad(self.lengths.cumsum(0), (1, 0))
        seq = torch.repeat_interleave(torch.arange(self.lengths.numel(), device=device), self.lengths,
                                      output_size=self.total)
        self.seq_idx = seq.to(torch.int32)
        self.position = torch.arange(self.total, device=device) - self.cu_seqlens[:-1][seq]
        self.last_index = self.cu_seqlens[1:] - 1
        self._padded = None

    @property
    def batch(self):
        return self.lengths.numel()

    def padded_layout(self):
        """(index (B, L) into the packed stream, valid (B, L) bool); index is clamped on padding."""
        if self._padded is None:
            steps = torch.arange(self.max_len, device=self.lengths.device)
            valid = steps[None, :] < self.lengths[:, None]
            index = self.cu_seqlens[:-1, None] + torch.minimum(steps[None, :], self.lengths[:, None] - 1)
            self._padded = (index, valid)
        return self._padded

    def to_padded(self, x):
        """x: (T, ...) -> (B, L, ...), zeros on padding."""
        index, valid = self.padded_layout()
        out = x[index]
        return out * valid.reshape(*valid.shape, *([1] * (x.dim() - 1))).to(out.dtype)

    def to_packed(self, xp):
        """xp: (B, L, ...) -> (T, ...): the real positions, in packed order."""
        return xp[self.seq_idx.long(), self.position]

    def add_at_starts(self, x, values):
        """x: (T, ...) plus values: (B, m, ...) added at the first min(m, length) tokens of
        each sequence (token cu_seqlens[b] + j gets values[b, j]); out of place."""
        m = values.shape[1]
        steps = torch.arange(m, device=x.device)
        valid = steps[None, :] < self.lengths[:, None]  # (B, m)
        starts = self.cu_seqlens[:-1, None]
        index = torch.where(valid, starts + steps[None, :], starts)  # invalid ones add 0 at the start
        values = values * valid.reshape(*valid.shape, *([1] * (values.dim() - 2))).to(values.dtype)
        return x.index_add(0, index.reshape(-1), values.reshape(-1, *values.shape[2:]).to(x.dtype))
