"""TiSSD: the time-aware SSD mixer of TiM4Rec (Fan et al., arXiv:2409.16182).

A Mamba2 block whose step size is modulated by the time gaps between interactions. With
``time_diff`` the (b, l, h) time input of the layer (h = heads):

    time_scale = MLP(time_diff)                           learned rescaling of the gaps
    time_dt    = act(conv2(act(conv1(time_diff * time_scale))))   two depthwise causal
                                                          convolutions, one channel per head
    dt_final   = dt * time_dt                             dt: the block's own step (in_proj),
                                                          before dt_bias and softplus (scan)
    next time  = Norm(g * time_diff + (1 - g) * time_dt), g = sigmoid(Gate(time_diff))

``TiSSD`` subclasses :class:`~ssd4rec.modules.mamba2.Mamba2Mixer`: the SSD parameters keep
their names and shapes (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``,
``out_proj``), so a Mamba2Mixer state_dict loads into a TiSSD (only the ``time_*`` entries
are new) and back. Without a time input (``time_diff=None``, or ``time_aware=False``) the
forward pass is exactly Mamba2Mixer's (tested bit for bit).

The position-axis layers (``MLP``, ``Gate``, ``Norm``) come in two kinds, ``time_mode``:

- ``"faithful"``: the published ones, over the position axis of right-padded rows of a fixed
  length ``seq_len`` (``Linear(seq_len, seq_len)``, ``LayerNorm(seq_len)``); they mix every
  position of a row, padding included, so they need fixed-length padded rows.
- ``"packed"``: length-agnostic ones for packed streams (see :mod:`ssd4rec.models.tim4rec`
  for why): a per-token MLP and gate over the h head channels, and a per-sequence
  normalisation from segment statistics (``seq_idx``) with a per-head gain and bias.

In both modes the convolutions and the scan take ``seq_idx``: nothing crosses from one
packed sequence into the next.

``time_output=False`` (the last layer of a stack) skips the gate and the norm, whose output
no later layer would read (in the official code they exist there and never get a gradient).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ssd4rec.data.time_gaps import segment_normalize
from ssd4rec.modules.mamba2 import CONV_BACKEND, Mamba2Mixer
from ssd4rec.ops import causal_conv1d

TIME_MODES = ("packed", "faithful")
CONV_ACTIVATIONS = ("silu", "hardswish")


# ---------------------------------------------------------------------------------------------
# Faithful: layers over the position axis of fixed-length rows. Time tensors are (b, l, h).
# ---------------------------------------------------------------------------------------------
class PositionMLP(nn.Module):
    """Dropout, Linear(l, l), SiLU, Linear(l, l) along the position axis of (b, l, h)."""

    def __init__(self, seq_len, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(seq_len, seq_len)
        self.fc2 = nn.Linear(seq_len, seq_len)

    def forward(self, t):
        t = t.transpose(1, 2)
        return self.fc2(F.silu(self.fc1(self.dropout(t)))).transpose(1, 2)


class PositionGate(nn.Module):
    """sigmoid(Linear(l, l or 1)) along the position axis: one gate per position
    (``per_position``, the official ``p2p_residual``) or one per row and head."""

    def __init__(self, seq_len, per_position, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(seq_len, seq_len if per_position else 1)

    def forward(self, t):
        return torch.sigmoid(self.proj(self.dropout(t.transpose(1, 2)))).transpose(1, 2)


class PositionNorm(nn.Module):
    """LayerNorm(l) along the position axis of (b, l, h); each row is one sequence."""

    def __init__(self, seq_len, eps):
        super().__init__()
        self.layer_norm = nn.LayerNorm(seq_len, eps=eps)

    def forward(self, t, seq_idx=None, num_segments=None):
        return self.layer_norm(t.transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Packed: per-token layers over the head channels, per-sequence statistics.
# ---------------------------------------------------------------------------------------------
class HeadMLP(nn.Module):
    """Dropout, Linear(h, k), SiLU, Linear(k, h) on each token's head vector."""

    def __init__(self, nheads, hidden, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(nheads, hidden)
        self.fc2 = nn.Linear(hidden, nheads)

    def forward(self, t):
        return self.fc2(F.silu(self.fc1(self.dropout(t))))


class HeadGate(nn.Module):
    """sigmoid(Linear(h, h)) on each token's head vector: one gate per token and head."""

    def __init__(self, nheads, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(nheads, nheads)

    def forward(self, t):
        return torch.sigmoid(self.proj(self.dropout(t)))


class SegmentNorm(nn.Module):
    """Standardise each channel over the positions of each sequence, then weight * x + bias.

    forward(t: (b, l, c), seq_idx: (b, l) or None, num_segments) -> (b, l, c); with seq_idx
    None each row is one sequence. See :func:`ssd4rec.data.time_gaps.segment_normalize`.
    """

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, t, seq_idx=None, num_segments=None):
        return segment_normalize(t, seq_idx, num_segments, self.eps) * self.weight + self.bias


# ---------------------------------------------------------------------------------------------
# The mixer
# ---------------------------------------------------------------------------------------------
class TiSSD(Mamba2Mixer):
    """Time-aware Mamba2 (SSD) mixer over packed or padded sequences.

    forward(u: (b, l, d_model), seq_idx: (b, l) int or None, time_diff: (b, l, nheads) or None,
    num_segments: int or None) -> (out: (b, l, d_model), next time input (b, l, nheads) or None)

    Args (beyond Mamba2Mixer's, passed through ``mixer_args``):
        time_aware: build the time branch; False gives a plain Mamba2Mixer with a tuple output.
        time_mode: "packed" or "faithful" (module docstring).
        seq_len: the row length of faithful mode (required there).
        time_output: build the gate and norm that produce the next layer's time input.
        time_dropout: dropout on the time input of the MLP and of the gate.
        per_position_gate: faithful mode only: one gate per position (official
            ``p2p_residual: True``) or one per row and head (False).
        time_hidden: hidden width of the packed per-token MLP (default 4 * nheads).
        time_norm_eps: epsilon of the time norm.
        conv_activation: "silu" (Mamba2, the paper) or "hardswish": the official code swaps
            SiLU for Hardswish in all three convolutions when nheads % 8 != 0 (its fallback
            from the fused causal_conv1d kernel), which its published configs (4 heads) hit.
        rmsnorm_eps: epsilon of the gated RMSNorm (Mamba2Mixer fixes 1e-5; the official
            TiM4Rec passes its ``norm_eps``).
    """

    def __init__(
        self,
        d_model,
        time_aware=True,
        time_mode="packed",
        seq_len=None,
        time_output=True,
        time_dropout=0.0,
        per_position_gate=False,
        time_hidden=None,
        time_norm_eps=1e-5,
        conv_activation="silu",
        rmsnorm_eps=1e-5,
        **mixer_args,
    ):
        super().__init__(d_model, **mixer_args)
        if time_mode not in TIME_MODES:
            raise ValueError(f"time_mode must be one of {TIME_MODES}, got {time_mode!r}")
        if conv_activation not in CONV_ACTIVATIONS:
            raise ValueError(f"conv_activation must be one of {CONV_ACTIVATIONS}, got {conv_activation!r}")
        self.norm.eps = rmsnorm_eps
        self.time_aware = time_aware
        self.time_mode = time_mode
        self.time_output = time_output
        self.conv_activation = conv_activation
        if not time_aware:
            return

        h = self.nheads
        d_conv = self.conv1d.kernel_size[0]
        conv_bias = self.conv1d.bias is not None
        self.time_conv1 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1, bias=conv_bias)
        self.time_conv2 = nn.Conv1d(h, h, d_conv, groups=h, padding=d_conv - 1, bias=conv_bias)
        if time_mode == "faithful":
            if not seq_len or seq_len < 1:
                raise ValueError("time_mode='faithful' needs seq_len, the fixed row length")
            self.seq_len = seq_len
            self.time_scale_mlp = PositionMLP(seq_len, time_dropout)
            if time_output:
                self.time_gate = PositionGate(seq_len, per_position_gate, time_dropout)
                self.time_norm = PositionNorm(seq_len, time_norm_eps)
        else:
            self.time_scale_mlp = HeadMLP(h, time_hidden or 4 * h, time_dropout)
            if time_output:
                self.time_gate = HeadGate(h, time_dropout)
                self.time_norm = SegmentNorm(h, time_norm_eps)

    def _conv(self, x, conv, seq_idx, backend=None):
        """Depthwise causal conv of x: (b, c, l) with ``conv``'s weights and the activation."""
        if backend is None:
            backend = CONV_BACKEND[self.backend]
        if self.conv_activation == "silu":
            return causal_conv1d(x, conv.weight.squeeze(1), conv.bias, seq_idx=seq_idx,
                                 activation="silu", backend=backend)
        out = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, seq_idx=seq_idx,
                            activation=None, backend=backend)
        return F.hardswish(out)

    def _time_conv_backend(self):
        # The causal_conv1d CUDA kernel reads (b, c, l) views of (b, l, c) tensors channel-last,
        # which it (and seq_idx in any layout) supports only for c % 8 == 0; the published
        # configs have 4 heads. The PyTorch conv over h channels is cheap, so use it then.
        return "torch" if self.backend == "torch" or self.nheads % 8 else "auto"

    def time_step(self, time_diff, seq_idx=None):
        """The multiplier of dt: time_diff (b, l, h) -> time_dt (b, l, h)."""
        backend = self._time_conv_backend()
        time_dt = time_diff * self.time_scale_mlp(time_diff)
        time_dt = self._conv(time_dt.transpose(1, 2), self.time_conv1, seq_idx, backend)
        time_dt = self._conv(time_dt, self.time_conv2, seq_idx, backend)
        return time_dt.transpose(1, 2)

    def forward(self, u, seq_idx=None, time_diff=None, num_segments=None):
        batch, length, _ = u.shape
        z, xBC, dt = self.project(u)
        xBC = self._conv(xBC.transpose(1, 2), self.conv1d, seq_idx).transpose(1, 2)

        next_time = None
        if self.time_aware and time_diff is not None:
            if time_diff.shape != (batch, length, self.nheads):
                raise ValueError(f"time_diff must be (b, l, nheads) = {(batch, length, self.nheads)}, "
                                 f"got {tuple(time_diff.shape)}")
            time_dt = self.time_step(time_diff, seq_idx)
            dt = dt * time_dt
            if self.time_output:
                gate = self.time_gate(time_diff)
                next_time = self.time_norm(gate * time_diff + (1 - gate) * time_dt, seq_idx, num_segments)
        return self.scan(xBC, dt, z, seq_idx), next_time
