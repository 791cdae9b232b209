"""Chunked SSD scan (Mamba-2 "state space duality") in pure PyTorch, with sequence registers.

The scan computes, per head, the selective state space recurrence

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        h_t: (p, n)
    y_t = h_t C_t + D * x_t                                   y_t: (p,)
    y_t = y_t * silu(z_t)                                     (only when z is given)

with the state reset to 0 wherever ``seq_idx`` changes, so several user histories can be
packed into one row without leaking state between them.

Instead of looping over time, the sequence is cut into chunks of ``chunk_size`` tokens and
the recurrence is evaluated with the block decomposition of the Mamba-2 paper (the same
four steps as mamba_ssm's ``ssd_minimal.py``):

1. intra-chunk output: a masked "attention-like" quadratic term C_l^T B_s * decay(l, s);
2. chunk states: the state each chunk would produce starting from 0;
3. inter-chunk state passing: a scan over the chunk states (decayed across whole chunks);
4. state -> output: the state entering each chunk, decayed to and read out at each position.

Sequence boundaries are handled in every step: (1) masks the decay matrix where seq_idx
differs; (2) only counts positions belonging to the chunk's last sequence; (3) only passes
a chunk's state to later chunks whose last position has the same seq_idx; (4) only reads the
incoming state at positions whose seq_idx equals the seq_idx it was built from.

Shapes (same names as mamba_ssm): b batch, l length, h heads, p head dim, g groups,
n state size, c number of chunks, q chunk size, r = h // g heads per group.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import types
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssd_scan", "ssd_scan_torch"]

# Above this many chunks the inter-chunk pass uses a Python loop over chunks (O(c)) instead of
# the (c, c) segment-sum matrix (O(c^2) work, but one einsum). Module level so tests can force
# either path.
_MATRIX_STATE_PASSING_MAX_CHUNKS = 64

_BACKENDS = ("auto", "torch", "triton")


# --------------------------------------------------------------------------------------------
# Triton backend (mamba_ssm), imported lazily
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _load_triton_scan() -> Tuple[Optional[Callable], Optional[str]]:
    """Import mamba_ssm's Triton ``mamba_chunk_scan_combined`` once.

    Returns ``(fn, None)`` when it imports, else ``(None, reason)`` where reason keeps the
    original ImportError text (e.g. triton or einops missing) for the error message.
    """
    placeholder = None
    try:
        try:
            import selective_scan_cuda  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name != "selective_scan_cuda":
                raise
            # mamba_ssm/__init__.py (2.3.x) imports the Mamba-1 CUDA extension
            # ``selective_scan_cuda`` unconditionally, although the Mamba-2 Triton kernels
            # never touch it. Stand in for it only for the duration of this import so a
            # Triton-only install still loads; the placeholder has no attributes, so any
            # Mamba-1 op would still fail loudly (AttributeError), never silently.
            placeholder = types.ModuleType("selective_scan_cuda")
            placeholder.__doc__ = "ssd4rec placeholder: the real extension is not installed."
            sys.modules["selective_scan_cuda"] = placeholder
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        if placeholder is not None and sys.modules.get("selective_scan_cuda") is placeholder:
            del sys.modules["selective_scan_cuda"]
    return mamba_chunk_scan_combined, None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precisions are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _process_dt(dt: Tensor, dt_bias: Optional[Tensor], dt_softplus: bool,
                dt_limit: Tuple[float, float]) -> Tensor:
    """dt: (b, l, h) -> (b, l, h), exactly as mamba_ssm's ``_chunk_cumsum_fwd``:
    add the bias, softplus (linear above 20, as the kernel does), then clamp to dt_limit."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt, beta=1.0, threshold=20.0)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _segsum(a: Tensor, keep: Tensor) -> Tensor:
    """Stable segment sum, masked.

    a: (..., T) -> out: (..., T, T) with out[..., i, j] = sum_{k=j+1..i} a[..., k] where
    ``keep[..., i, j]`` (a boolean mask that must imply i >= j), and -inf elsewhere.

    Summing the entries directly (instead of cumsum(a)[i] - cumsum(a)[j]) avoids
    cancellation, and masking to -inf before exp means exp never sees the positive
    differences of the upper triangle (or of other sequences) that could overflow.
    """
    T = a.size(-1)
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    # a_rep[..., i, j] = a[..., i]; keep only rows i > j, then sum down the rows.
    a_rep = a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0)
    return a_rep.cumsum(dim=-2).masked_fill(~keep, -math.inf)


def _state_passing_loop(decay: Tensor, states: Tensor, pass_mask: Optional[Tensor]) -> Tensor:
    """Sequential scan over chunks, O(c).

    decay: (b, h', c) log decay of each whole chunk, states: (b, c, h', p, n) chunk states,
    pass_mask: (b, c) bool, True where chunk z may receive the state of chunk z-1.
    Returns the state at the end of every chunk, (b, c, h', p, n).
    """
    a = decay.exp()  # (b, h', c)
    if pass_mask is not None:
        a = a * pass_mask[:, None, :]
    # unbind once: indexing inside the loop would make autograd materialise a full-size
    # zero gradient of `states` per chunk (O(c^2) memory traffic in backward)
    a_z = a[..., None, None].unbind(dim=2)  # c x (b, h', 1, 1)
    states_z = states.unbind(dim=1)  # c x (b, h', p, n)
    s = states_z[0]
    out = [s]
    for zi in range(1, len(states_z)):
        s = a_z[zi] * s + states_z[zi]
        out.append(s)
    return torch.stack(out, dim=1)


# --------------------------------------------------------------------------------------------
# Pure PyTorch chunked scan
# --------------------------------------------------------------------------------------------
def _ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                 seq_idx: Optional[Tensor]) -> Tensor:
    """The SSD core, no D / z.

    x: (b, l, h, p), dt: (b, l, h) (already processed), A: (h,), B, C: (b, l, g, n),
    seq_idx: (b, l) or None. All floating inputs share one dtype. Returns y: (b, l, h, p).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = int(chunk_size)

    # Pad to whole chunks. Padding sits after every real token and has x = 0, dt = 0, so it
    # adds nothing to any real position (the scan is causal); its outputs are cut off.
    pad = (-l) % q
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (l + pad) // q

    # Split heads into (group, head-in-group) so B, C are never repeated per head:
    # C^T B is computed once per group and shared by its r heads.
    x = x.reshape(b, c, q, g, r, p)
    dt = dt.reshape(b, c, q, g, r)
    B = B.reshape(b, c, q, g, n)
    C = C.reshape(b, c, q, g, n)
    A = A.reshape(g, r)

    dA = (dt * A).permute(0, 3, 4, 1, 2)  # (b, g, r, c, q): log decay of each step
    dA_cs = dA.cumsum(dim=-1)  # (b, g, r, c, q): log decay from chunk start through step
    xdt = x * dt[..., None]  # (b, c, q, g, r, p): the input term dt_t * x_t

    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        sidx = seq_idx.reshape(b, c, q)
        same = sidx[..., :, None] == sidx[..., None, :]  # (b, c, q, q)
        keep = (causal & same)[:, None, None]  # (b, 1, 1, c, q, q)
    else:
        keep = causal

    # 1. Intra-chunk (diagonal blocks): y_l = sum_{s<=l, same seq} C_l.B_s * exp(sum dA_(s,l]) * dt_s x_s
    L = torch.exp(_segsum(dA, keep))  # (b, g, r, c, q_l, q_s)
    CB = torch.einsum("bclgn,bcsgn->bgcls", C, B)  # (b, g, c, q_l, q_s)
    M = CB[:, :, None] * L  # (b, g, r, c, q_l, q_s)
    y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", M, xdt)  # (b, c, q, g, r, p)

    # 2. Chunk states: the last row of L is exactly the decay from each position to the end
    # of its chunk, already zeroed for positions of an earlier sequence than the chunk's last.
    decay_states = L[..., -1, :].permute(0, 3, 4, 1, 2)  # (b, c, q, g, r)
    states = torch.einsum("bcsgrp,bcsgn->bcgrpn", xdt * decay_states[..., None], B)  # (b, c, g, r, p, n)

    # 3. Inter-chunk state passing: state at the end of chunk z is
    #    S_z = sum_{j<=z, same seq} exp(sum_{k=j+1..z} dA_chunk_k) * states_j.
    dA_chunk = dA_cs[..., -1]  # (b, g, r, c): log decay of each whole chunk
    if seq_idx is not None:
        last = sidx[..., -1]  # (b, c): seq of each chunk's last position
    if c == 1:
        s_end = states
    elif c <= _MATRIX_STATE_PASSING_MAX_CHUNKS:
        ckeep = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        if seq_idx is not None:
            # seq_idx is non-decreasing, so equal last-seq means every token in between is
            # in the same sequence and the state may flow from chunk j to chunk z.
            ckeep = (ckeep & (last[:, :, None] == last[:, None, :]))[:, None, None]  # (b, 1, 1, c, c)
        decay_chunk = torch.exp(_segsum(dA_chunk, ckeep))  # (b, g, r, c_z, c_j)
        s_end = torch.einsum("bgrzj,bjgrpn->bzgrpn", decay_chunk, states)  # (b, c, g, r, p, n)
    else:
        pass_mask = None
        if seq_idx is not None:
            pass_mask = torch.ones_like(last, dtype=torch.bool)
            pass_mask[:, 1:] = last[:, 1:] == last[:, :-1]
        s_end = _state_passing_loop(
            dA_chunk.reshape(b, h, c), states.reshape(b, c, h, p, n), pass_mask
        ).reshape(b, c, g, r, p, n)
    # State entering chunk z = state at the end of chunk z-1 (zero for the first chunk).
    s_in = torch.cat([torch.zeros_like(s_end[:, :1]), s_end[:, :-1]], dim=1)  # (b, c, g, r, p, n)

    # 4. State -> output: y_l += exp(dA_cs_l) * C_l . s_in, only at positions of the sequence
    # the incoming state belongs to (the last seq of the previous chunk).
    decay_out = dA_cs
    if seq_idx is not None and c > 1:
        prev_last = torch.cat([last[:, :1], last[:, :-1]], dim=1)  # (b, c)
        reads = (sidx == prev_last[..., None])[:, None, None]  # (b, 1, 1, c, q)
        decay_out = decay_out.masked_fill(~reads, -math.inf)
    decay_out = decay_out.exp().permute(0, 3, 4, 1, 2)  # (b, c, q, g, r)
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, s_in) * decay_out[..., None]  # (b, c, q, g, r, p)

    y = (y_diag + y_off).reshape(b, c * q, h, p)
    return y[:, :l]


def ssd_scan_torch(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   dt_bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                   dt_softplus: bool = False,
                   dt_limit: Tuple[float, float] = (0.0, float("inf"))) -> Tensor:
    """Pure PyTorch chunked SSD scan; see :func:`ssd_scan` for arguments.

    Computes in float32 (float64 if any input is float64) and returns x's dtype.
    """
    _check_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, seq_idx)
    cd = _compute_dtype(x, dt, A, B, C, D, z, dt_bias)
    dt = _process_dt(dt.to(cd), None if dt_bias is None else dt_bias.to(cd), dt_softplus, dt_limit)
    xc = x.to(cd)
    y = _ssd_chunked(xc, dt, A.to(cd), B.to(cd), C.to(cd), chunk_size, seq_idx)
    if D is not None:
        Dc = D.to(cd)
        y = y + xc * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)


def _check_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, seq_idx) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (b, l, h, p), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (b, l, h) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (h,) = {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"B and C must both be (b, l, g, n) with (b, l) = {(b, l)}, "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    if h % B.shape[2] != 0:
        raise ValueError(f"heads ({h}) must be divisible by groups ({B.shape[2]})")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (h,) or (h, p), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must match x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"dt_bias must be (h,), got {tuple(dt_bias.shape)}")
    if seq_idx is not None:
        if seq_idx.shape != (b, l):
            raise ValueError(f"seq_idx must be (b, l) = {(b, l)}, got {tuple(seq_idx.shape)}")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             D: Optional[Tensor] = None, z: Optional[Tensor] = None,
             dt_bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
             dt_softplus: bool = False, dt_limit: Tuple[float, float] = (0.0, float("inf")),
             backend: str = "auto") -> Tensor:
    """SSD scan with the semantics of mamba_ssm's ``mamba_chunk_scan_combined``.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) raw step sizes (bias / softplus / clamp applied here).
        A: (h,) per-head decay rate (negative for a stable scan).
        B, C: (b, l, g, n); head i uses group i // (h // g).
        chunk_size: chunk length q; any sequence length works (padded internally).
        D: (h,) or (h, p) skip connection, added before the gate.
        z: (b, l, h, p) gate; y *= silu(z).
        dt_bias: (h,) added to dt before softplus.
        seq_idx: (b, l) int, non-decreasing along l; the state restarts where it changes.
        dt_softplus: apply softplus to dt (+ dt_bias).
        dt_limit: clamp range for the processed dt; (0, inf) means no clamp.
        backend: "torch" (this module), "triton" (mamba_ssm, CUDA only) or "auto": Triton
            when x is on CUDA, not float64 (the kernels accumulate in float32) and mamba_ssm
            imports; the PyTorch path otherwise.

    Returns:
        y: (b, l, h, p) in x's dtype.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    want_triton = backend == "triton" or (
        backend == "auto" and x.is_cuda and x.dtype != torch.float64
    )
    if want_triton:
        if not x.is_cuda:
            raise RuntimeError(
                f"ssd_scan(backend='triton') needs CUDA tensors, but x is on {x.device}; "
                "use backend='torch' (or 'auto') on CPU."
            )
        fn, reason = _load_triton_scan()
        if fn is not None:
            if seq_idx is not None:
                seq_idx = seq_idx.to(torch.int32).contiguous()
            return fn(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, seq_idx=seq_idx,
                      dt_softplus=dt_softplus, dt_limit=dt_limit)
        if backend == "triton":
            raise RuntimeError(
                "ssd_scan(backend='triton'): mamba_ssm's Triton kernel "
                f"(mamba_ssm.ops.triton.ssd_combined) is not available: {reason}"
            )
        warnings.warn(
            f"mamba_ssm Triton SSD kernel not available ({reason}); "
            "using the slower PyTorch ssd_scan on CUDA.",
            RuntimeWarning,
            stacklevel=2,
        )
    return ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                          seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit)
