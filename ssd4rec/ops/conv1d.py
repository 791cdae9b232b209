"""Depthwise causal conv1d that never mixes packed sequences, in pure PyTorch.

    out[:, d, t] = act(bias[d] + sum_{k<w} weight[d, k] * x[:, d, t - (w-1) + k])

A tap contributes 0 if it falls before position 0 or on a token whose seq_idx differs from
seq_idx[t]. Same signature as ``causal_conv1d.causal_conv1d_fn``, whose CUDA kernel is used
on GPU when available.

Shapes: x (b, dim, l), weight (dim, w), bias (dim,), seq_idx (b, l).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d", "causal_conv1d_torch"]

_BACKENDS = ("auto", "torch", "cuda")
_ACTIVATIONS = (None, "silu", "swish")


@functools.lru_cache(maxsize=1)
def _load_cuda_conv1d() -> Tuple[Optional[Callable], Optional[str]]:
    """Import ``causal_conv1d.causal_conv1d_fn`` once: ``(fn, None)`` or ``(None, reason)``."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return causal_conv1d_fn, None


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        seq_idx: Optional[Tensor] = None,
                        activation: Optional[str] = None) -> Tensor:
    """Pure PyTorch version; computes in float32 (float64 stays float64), returns x's dtype.

    One depthwise ``F.conv1d`` computes every position as if the row were one sequence; the
    few positions whose window reaches back into another sequence (the first w-1 of each)
    are then computed again from their own sequence's taps and written over it. Their conv
    outputs are dropped, not corrected by subtraction, so nothing of another sequence reaches
    them (not even a NaN or inf) and no gradient flows back through a tap that crosses a
    boundary. The loop over masked taps it replaced multiplied a NaN of one sequence by a
    zero mask and so passed it on to the next; on CPU the two are about as fast (the README,
    section Kernels, has the numbers).

    On CUDA, finding those positions reads their count back to the host (one synchronisation
    per call); the causal_conv1d package, used there when it is installed, needs none.
    """
    b, dim, l = x.shape
    w = weight.shape[1]
    cd = torch.float64 if x.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
    wc = weight.to(cd)
    bc = None if bias is None else bias.to(cd)
    xpad = F.pad(x.to(cd), (w - 1, 0))  # (b, dim, l + w - 1): taps before position 0 read zeros
    # autocast would run the conv in bf16; the result is cast to x's dtype at the end instead
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = F.conv1d(xpad, wc[:, None, :], bc, groups=dim)  # (b, dim, l)
        if seq_idx is not None and w > 1:
            out = _recompute_boundaries(out, xpad, wc, bc, seq_idx)
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def _recompute_boundaries(out: Tensor, xpad: Tensor, weight: Tensor, bias: Optional[Tensor],
                          seq_idx: Tensor) -> Tensor:
    """``out`` with every position whose window crosses a change of seq_idx computed from the
    taps of its own sequence only.

    out: (b, dim, l), xpad: (b, dim, l + w - 1) (x with w - 1 zeros in front),
    weight: (dim, w), bias: (dim,) or None, seq_idx: (b, l). Returns (b, dim, l).
    """
    w, l = weight.shape[1], out.shape[-1]
    # The sequence each tap reads from; the zero padding counts as the row's first sequence.
    spad = torch.cat([seq_idx[:, :1].expand(-1, w - 1), seq_idx], dim=1)  # (b, l + w - 1)
    crosses = torch.zeros_like(seq_idx, dtype=torch.bool)  # (b, l)
    for k in range(w - 1):  # every lag, so that ids need not be sorted
        crosses |= spad[:, k:k + l] != seq_idx
    rows, cols = crosses.nonzero(as_tuple=True)  # (P,) each
    taps = torch.arange(w, device=out.device)
    window = xpad[rows[:, None], :, cols[:, None] + taps]  # (P, w, dim)
    own = spad[rows[:, None], cols[:, None] + taps] == seq_idx[rows, cols][:, None]  # (P, w)
    window = torch.where(own[:, :, None], window, window.new_zeros(()))
    fixed = torch.einsum("pkd,dk->pd", window, weight)  # (P, dim)
    if bias is not None:
        fixed = fixed + bias
    return out.transpose(1, 2).index_put((rows, cols), fixed).transpose(1, 2)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  seq_idx: Optional[Tensor] = None, activation: Optional[str] = None,
                  backend: str = "auto") -> Tensor:
    """Depthwise causal conv1d over packed sequences.

    Args:
        x: (b, dim, l).
        weight: (dim, w).
        bias: (dim,) or None.
        seq_idx: (b, l) int, non-decreasing along l; taps never cross a change of seq_idx.
        activation: None, "silu" or "swish".
        backend: "torch", "cuda" (the ``causal_conv1d`` package; CUDA tensors only) or
            "auto": the package when x is on CUDA, not float64, width in 2..4 (what its
            kernel supports) and the package imports; PyTorch otherwise.

    Returns:
        (b, dim, l) in x's dtype.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"need x (b, dim, l) and weight (dim, w), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must be (dim,), got {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"seq_idx must be (b, l) = {(x.shape[0], x.shape[2])}, "
                         f"got {tuple(seq_idx.shape)}")

    # The package's kernel takes widths 2..4, and with seq_idx only channel-last
    # inputs whose channel count is a multiple of 8 (16-byte aligned rows).
    kernel_ok = 2 <= weight.shape[1] <= 4 and (seq_idx is None or x.shape[1] % 8 == 0)
    want_cuda = backend == "cuda" or (
        backend == "auto" and x.is_cuda and x.dtype != torch.float64 and kernel_ok
    )
    if want_cuda:
        if not x.is_cuda:
            raise RuntimeError(
                f"causal_conv1d(backend='cuda') needs CUDA tensors, but x is on {x.device}; "
                "use backend='torch' (or 'auto') on CPU."
            )
        fn, reason = _load_cuda_conv1d()
        if fn is not None:
            if seq_idx is not None:
                # The CUDA kernel only supports seq_idx with channel-last memory.
                if x.stride(1) != 1 or x.stride(0) % 8 or x.stride(2) % 8:
                    x = x.transpose(1, 2).contiguous().transpose(1, 2)
                seq_idx = seq_idx.to(torch.int32).contiguous()
            elif x.stride(2) != 1 and (x.stride(1) != 1 or x.shape[1] % 8 or x.stride(0) % 8
                                       or x.stride(2) % 8):
                # Strided views the kernel would read as channel-last input it rejects: its
                # channel-last path needs a channel count that is a multiple of 8, and 16-byte
                # aligned rows (a (b, l, c) tensor transposed with c % 8 != 0, or Mamba-1's x,
                # 100 channels out of a 200-wide projection at hidden 50). Give it channel-first.
                x = x.contiguous()
            return fn(x, weight.contiguous(), bias, seq_idx=seq_idx, activation=activation)
        if backend == "cuda":
            raise RuntimeError(
                f"causal_conv1d(backend='cuda'): the causal_conv1d package is not available: {reason}"
            )
        warnings.warn(
            f"causal_conv1d package not available ({reason}); using the PyTorch conv on CUDA.",
            RuntimeWarning,
            stacklevel=2,
        )
    return causal_conv1d_torch(x, weight, bias=bias, seq_idx=seq_idx, activation=activation)
