"""Packed segments: B sequences laid end to end (T tokens), with a padded view on demand.

The lifelong backbones run their mixers on the packed stream (no padding, the kernels restart
at every change of ``seq_idx``), but the few per-sequence reductions that carry a recurrent
state from one window of a history into the next (``ssd4rec.modules.stateful``) are batched
matrix products over a (B, L) view; so are the backbones that have no sequence registers
(Mamba-1's kernel, RecBole's Transformer). :class:`Segments` holds both layouts and moves
tensors between them with one gather each way.

A third layout, :class:`RowLayout` (``Segments.row_layout``), lays the same sequences out as R
rows of Lr tokens, whole sequences in packed order, for the SSD mixer's scan: see there why.

Shapes: B sequences, T = sum(lengths) tokens, L = max(lengths).
"""

import numpy as np
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
    host_lengths: the same lengths on the host (numpy or a list), or None; only
                ``row_layout`` reads them (it plans on the host). LifelongRec has them anyway
                (it plans its windows from them), so passing them costs no device read.
    """

    def __init__(self, lengths, total, max_len, host_lengths=None):
        self.lengths = lengths.long()
        self.total = int(total)
        self.max_len = int(max_len)
        self.host_lengths = None if host_lengths is None else np.asarray(host_lengths, dtype=np.int64)
        self._rows = {}
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

    def row_layout(self, target):
        """The sequences as rows of about ``target`` tokens (:class:`RowLayout`), or None when
        that is one row (target falsy, or everything fits one): the packed stream itself.

        Planned on the host from ``host_lengths``; built once per target and kept (the layers
        of a window, and a checkpointed window's recompute, share it). Without host lengths, a
        CPU tensor is read (free); on CUDA that read would synchronise the device, so it is an
        error instead.
        """
        if not target:
            return None
        if target not in self._rows:
            lengths = self.host_lengths
            if lengths is None:
                if self.lengths.device.type != "cpu":
                    raise ValueError("Segments.row_layout needs host_lengths for lengths on "
                                     f"{self.lengths.device} (reading them would synchronise the device)")
                lengths = self.lengths.numpy()
            row, start, used = plan_rows(lengths, target)
            self._rows[target] = RowLayout(self, row, start, used) if used.size > 1 else None
        return self._rows[target]

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


# --------------------------------------------------------------------------------------------
# Rows for the scan
# --------------------------------------------------------------------------------------------
def _greedy_rows(lengths, limit):
    """Sequences, in order, into rows of at most ``limit`` tokens (greedy).

    lengths: (B,) numpy int64, every >= 1. A row takes the next sequence unless that would
    take it past ``limit``; a sequence longer than ``limit`` gets a row of its own.
    Returns (row (B,), start (B,), used (R,)): each sequence's row and first token's offset
    in it, and each row's token count.
    """
    row = np.empty(len(lengths), dtype=np.int64)
    start = np.empty(len(lengths), dtype=np.int64)
    used = [0]
    for i, n in enumerate(lengths.tolist()):
        if used[-1] and used[-1] + n > limit:
            used.append(0)
        row[i], start[i] = len(used) - 1, used[-1]
        used[-1] += n
    return row, start, np.asarray(used, dtype=np.int64)


def plan_rows(lengths, target):
    """Whole sequences, in packed order, into contiguous rows of at most ``target`` tokens
    (a longer sequence alone in its row); every row is padded at its end to the longest.

    lengths: (B,) host ints, every >= 1; target: > 0. Returns (row (B,), start (B,),
    used (R,)) as ``_greedy_rows``.

    Why not just the greedy at ``target``: its last row holds what is left over, and padding
    every row to the longest can cost almost a whole row (T = 100,000 tokens of sequences of
    2,000 at target 32,768: rows of 32,000 and a last one of 4,000, 28% padding). The greedy
    also runs at the balanced limits ceil(T / k) for the few row counts k from ceil(T / target)
    up (each <= target, so the rule above holds for all of them), and the plan with the fewest
    padded tokens R * Lr wins (then the fewest rows); there: k = 5, rows of 20,000, no padding.
    O(B) host work per candidate (a few hundred sequences a batch).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total <= target:  # one row: the packed stream itself
        return np.zeros_like(lengths), np.cumsum(lengths) - lengths, np.asarray([total], dtype=np.int64)
    first = -(-total // target)
    limits = {target} | {-(-total // k) for k in range(first, first + 4)}
    best, best_key = None, None
    for limit in sorted(limits, reverse=True):
        plan = _greedy_rows(lengths, limit)
        used = plan[2]
        key = (used.size * int(used.max()), used.size)  # padded tokens, then rows
        if best_key is None or key < best_key:
            best, best_key = plan, key
    return best


def _to_device(array, device):
    """A host int64 array to ``device`` without synchronising it: a blocking host-to-CUDA
    copy waits for the stream; from pinned memory, non_blocking, it is queued like a kernel."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Permute(torch.autograd.Function):
    """out = x[index] (dim 0), zero at the positions ``zero``; backward: grad[back], zero at
    ``back_zero``. With (index, back) a permutation and its inverse, plus positions that only
    one side has (the rows' padding), the gradient is that inverse gather, not the scatter-add
    autograd would use for a general index (``bissd._ReverseRows`` does the same for its own
    permutation)."""

    @staticmethod
    def forward(ctx, x, index, zero, back, back_zero):
        ctx.save_for_backward(back, back_zero)
        return _gather(x, index, zero)

    @staticmethod
    def backward(ctx, grad):
        back, back_zero = ctx.saved_tensors
        return _gather(grad, back, back_zero), None, None, None, None


def _gather(x, index, zero):
    """x[index] with the positions ``zero`` (a possibly empty index) set to 0."""
    out = x[index]
    return out.index_fill_(0, zero, 0) if zero.numel() else out


class RowLayout:
    """The B sequences of a :class:`Segments` as R rows of Lr tokens, for the SSD scan.

    Why. mamba_ssm's chunked scan passes the state from chunk to chunk in a loop over all
    chunks of a row, with few programs in parallel (heads x batch x a few blocks): on one
    packed row of 512,000 tokens (LifelongRec's batch of 256 histories of 2,000) that loop is
    2,000 chunks long and latency bound (~7 ms of a ~67 ms H100 step, issue #7). As R rows the
    loop is R times shorter and the rows run in parallel. Whole sequences stay together, in
    packed order, so with seq_idx per row the scan and the convolution compute what they
    compute on the one row, up to rounding.

    Built from a host plan (``plan_rows``: each sequence's row and start, each row's length);
    the per-token maps are computed on the device from one small copy of per-sequence
    offsets, so nothing is read back from the device.

    index:   (R * Lr,) int64, the packed token at each row position; padding points at token 0
             and is zeroed by ``to_rows``
    inverse: (T,) int64, each packed token's row position (``from_rows``)
    padding: (P,) int64, the row positions of the padding, P = R * Lr - T, all at row ends
    seq_idx: (R, Lr) int32, the packed seq_idx per row, non-decreasing; padding gets B (after
             every real sequence, so no real token reads it: the scan and conv are causal and
             restart where seq_idx changes)
    """

    def __init__(self, seg, row, start, used):
        self.rows, self.row_len = int(used.size), int(used.max())
        R, Lr, B = self.rows, self.row_len, seg.batch
        pad = Lr - used  # (R,) padding of each row, at its end
        first_pad = np.repeat(np.arange(R) * Lr + used - np.cumsum(pad) + pad, pad)
        padding = first_pad + np.arange(int(pad.sum()))  # row position of every padding token
        host = _to_device(np.concatenate([row * Lr + start, padding]), seg.lengths.device)
        offset, self.padding = host[:B], host[B:]  # offset: each sequence's first row position
        self.inverse = offset[seg.seq_idx.long()] + seg.position  # (T,)
        index = torch.zeros(R * Lr, dtype=torch.long, device=self.inverse.device)
        self.index = index.index_copy_(0, self.inverse, torch.arange(seg.total, device=index.device))
        seq_idx = seg.seq_idx[self.index]
        if self.padding.numel():
            seq_idx.index_fill_(0, self.padding, B)
        self.seq_idx = seq_idx.view(R, Lr)

    def to_rows(self, x):
        """x: (T, ...) packed -> (R, Lr, ...), zeros on padding; backward gathers back."""
        out = _Permute.apply(x, self.index, self.padding, self.inverse, self.padding[:0])
        return out.unflatten(0, (self.rows, self.row_len))

    def from_rows(self, x):
        """x: (R, Lr, ...) -> (T, ...) the real tokens in packed order; padding is dropped
        (its gradient is 0)."""
        return _Permute.apply(x.flatten(0, 1), self.inverse, self.padding[:0], self.index, self.padding)
