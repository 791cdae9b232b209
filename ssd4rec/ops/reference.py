"""Naive loop-over-time references for the ops, used by the tests and the benchmark.

They implement the definitions literally (one time step per Python iteration, in the input
dtype) and share no code with the fast kernels, so a bug in one is unlikely to be hidden by
the same bug in the other.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssd_recurrence_naive", "causal_conv1d_naive"]


def ssd_recurrence_naive(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         dt_bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                         dt_softplus: bool = False,
                         dt_limit: Tuple[float, float] = (0.0, float("inf"))) -> Tensor:
    """Selective SSM recurrence, one step at a time.

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T     (h_{t-1} := 0 where seq_idx changes)
        y_t = h_t C_t + D x_t,   then y_t *= silu(z_t)

    x: (b, l, h, p), dt: (b, l, h), A: (h,), B, C: (b, l, g, n), D: (h,) or (h, p),
    z: (b, l, h, p), dt_bias: (h,), seq_idx: (b, l). Returns y: (b, l, h, p).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = torch.clamp(dt, dt_limit[0], dt_limit[1])
    # head i reads group i // (h // g)
    Bh = B.repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.repeat_interleave(h // g, dim=2)  # (b, l, h, n)

    # Unbind the time axis once: indexing x[:, t] inside the loop would make autograd build a
    # full-size zero gradient per step, i.e. an O(l^2) backward that flatters the fast kernel.
    xs, dts, Bs, Cs = x.unbind(1), dt.unbind(1), Bh.unbind(1), Ch.unbind(1)
    zs = z.unbind(1) if z is not None else None
    if D is not None:
        Dp = D[:, None] if D.dim() == 1 else D  # (h, 1) or (h, p)

    state = x.new_zeros(b, h, p, n)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            cont = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)  # (b,)
            state = state * cont[:, None, None, None]
        decay = torch.exp(dts[t] * A)  # (b, h)
        inp = (dts[t][..., None] * xs[t])[..., None] * Bs[t][:, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inp
        y = (state * Cs[t][:, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y = y + xs[t] * Dp
        if zs is not None:
            y = y * (zs[t] * torch.sigmoid(zs[t]))
        ys.append(y)
    return torch.stack(ys, dim=1)


def causal_conv1d_naive(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        seq_idx: Optional[Tensor] = None,
                        activation: Optional[str] = None) -> Tensor:
    """Depthwise causal conv1d, one output position at a time.

    out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (w-1) + k]), where taps
    before position 0 or in another sequence (seq_idx differs from seq_idx[t]) are skipped.

    x: (b, dim, l), weight: (dim, w), bias: (dim,), seq_idx: (b, l). Returns (b, dim, l).
    """
    b, dim, l = x.shape
    w = weight.shape[1]
    xs = x.unbind(-1)  # unbind once (see ssd_recurrence_naive)
    ws = weight.unbind(-1)
    outs = []
    for t in range(l):
        acc = x.new_zeros(b, dim)
        if bias is not None:
            acc = acc + bias
        for k in range(w):
            src = t - (w - 1) + k
            if src < 0:
                continue
            term = ws[k] * xs[src]  # (b, dim)
            if seq_idx is not None:
                term = term * (seq_idx[:, src] == seq_idx[:, t]).to(x.dtype)[:, None]
            acc = acc + term
        outs.append(acc)
    out = torch.stack(outs, dim=-1)
    if activation in ("silu", "swish"):
        out = out * torch.sigmoid(out)
    elif activation is not None:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return out
