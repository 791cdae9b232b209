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

# Up to this many chunks the inter-chunk pass is one (c, c) segment-sum matrix product (O(c^2)
# work, but a single matmul); above, it is blocked: matrix form inside blocks of
# _STATE_PASSING_BLOCK chunks, and the same recursively across blocks (see _state_passing).
# Module level so tests can force either path.
_MATRIX_STATE_PASSING_MAX_CHUNKS = 64
_STATE_PASSING_BLOCK = 16

# The chunk size only changes how the scan is evaluated, not its result (up to rounding). The
# intra-chunk term costs O(q) per token and per head in (q, q) tensors, which dominate on CPU
# beyond q = 64 for the paper's sizes (h=32, p=16, n=64: q = 256 is ~2.5x slower than 64), so
# the PyTorch path evaluates larger chunks as chunks of this size. None disables the cap.
_TORCH_MAX_CHUNK: Optional[int] = 64

_BACKENDS = ("auto", "torch", "triton", "triton_heads")


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


@functools.lru_cache(maxsize=1)
def _load_triton_heads_scan() -> Tuple[Optional[Callable], Optional[str]]:
    """``ssd4rec.ops.ssd_scan_heads.ssd_scan_all_heads`` (mamba_ssm's scan with our all-heads
    output pass and backward pair kernel), imported once; ``(None, reason)`` where triton or
    mamba_ssm is missing."""
    fn, reason = _load_triton_scan()  # mamba_ssm's import quirk is handled there, once
    if fn is None:
        return None, reason
    try:
        from ssd4rec.ops.ssd_scan_heads import ssd_scan_all_heads
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return ssd_scan_all_heads, None


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
    Used on chunk-level decays only (T = chunks), where a cumsum over a whole packed row
    can be large enough for the difference form to lose digits; inside a chunk the cheaper
    difference form is used (see _ssd_chunked).
    """
    T = a.size(-1)
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    # a_rep[..., i, j] = a[..., i]; keep only rows i > j, then sum down the rows.
    a_rep = a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0)
    return a_rep.cumsum(dim=-2).masked_fill(~keep, -math.inf)


def _chunk_keep(last: Optional[Tensor], c: int, device) -> Tensor:
    """(c, c) or (b, 1, c, c) bool: may the state at the end of chunk j reach the end of chunk z?

    Yes iff j <= z and, with packed sequences, both chunks end in the same sequence
    (seq_idx is non-decreasing, so then every token in between is of that sequence too).
    """
    keep = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    if last is not None:
        keep = (keep & (last[:, :, None] == last[:, None, :]))[:, None]  # (b, 1, c, c)
    return keep


def _state_passing(decay: Tensor, states: Tensor, last: Optional[Tensor]) -> Tensor:
    """Inter-chunk scan: the state at the end of every chunk.

    decay: (b, H, c) log decay of each whole chunk; states: (b, H, c, P) the state each chunk
    produces from zero (P = p * n); last: (b, c) seq_idx of each chunk's last token, or None.
    Returns S: (b, H, c, P) with S_z = sum_{j<=z, same seq} exp(sum_{k=j+1..z} decay_k) states_j.

    Up to _MATRIX_STATE_PASSING_MAX_CHUNKS chunks this is one (c, c) matrix product. Beyond,
    the (c, c) matrix would cost O(c^2) and a loop over chunks costs O(c) tiny kernels (and as
    many autograd nodes), so the chunks are grouped into blocks of _STATE_PASSING_BLOCK and the
    same decomposition as the chunked scan itself is applied one level up:
      1. within each block, the matrix form (as if each block started from zero);
      2. the blocks' end states are passed across blocks: a scan of the same kind over
         c / K entries, done by a recursive call;
      3. the state entering each block is decayed to each chunk end of the block and added
         where that chunk still belongs to the sequence the incoming state was built from.
    """
    b, H, c, P = states.shape
    if c == 1:
        return states
    if c <= _MATRIX_STATE_PASSING_MAX_CHUNKS:
        decay_chunk = torch.exp(_segsum(decay, _chunk_keep(last, c, decay.device)))  # (b, H, c_z, c_j)
        return decay_chunk @ states  # (b, H, c, P)

    K = max(2, _STATE_PASSING_BLOCK)
    pad = (-c) % K
    if pad:
        # Trailing padded chunks: no decay input, zero states, and the last real chunk's seq;
        # they come after every real chunk, so they change nothing (the scan is causal).
        decay = F.pad(decay, (0, pad))
        states = F.pad(states, (0, 0, 0, pad))
        if last is not None:
            last = torch.cat([last, last[:, -1:].expand(b, pad)], dim=1)
    nb = (c + pad) // K
    decay = decay.reshape(b, H, nb, K)
    states = states.reshape(b, H, nb, K, P)
    if last is not None:
        last = last.reshape(b, nb, K)

    # 1. Within blocks, from a zero state at each block's start.
    keep = _chunk_keep(None if last is None else last.reshape(b * nb, K), K, decay.device)
    if last is not None:
        keep = keep.reshape(b, nb, 1, K, K).transpose(1, 2)  # (b, 1, nb, K, K)
    local = torch.exp(_segsum(decay, keep)) @ states  # (b, H, nb, K, P)

    # 2. State at the end of each block: the block-end local states scanned across blocks.
    #    The block's decay is the sum of its chunks' (exact, no cancellation), and the block
    #    keeps/drops incoming state by its last chunk's seq, like a chunk does.
    block_end = _state_passing(decay.sum(-1), local[:, :, :, -1],
                               None if last is None else last[:, :, -1])  # (b, H, nb, P)
    carry = torch.cat([torch.zeros_like(block_end[:, :, :1]), block_end[:, :, :-1]], dim=2)  # entering each block

    # 3. Decay of the incoming state to the end of each chunk of the block: exp(sum of decays
    #    from the block start through the chunk), zero once a new sequence has started.
    into = decay.cumsum(-1)  # (b, H, nb, K)
    if last is not None:
        prev_last = torch.cat([last[:, :1, -1], last[:, :-1, -1]], dim=1)  # (b, nb): seq of carry
        into = into.masked_fill(~(last == prev_last[..., None])[:, None], -math.inf)
    out = torch.addcmul(local, torch.exp(into)[..., None], carry[:, :, :, None])  # (b, H, nb, K, P)
    return out.reshape(b, H, nb * K, P)[:, :, :c]


class _IntraChunk(torch.autograd.Function):
    """The quadratic (diagonal block) term of the chunked scan, with a hand-written backward.

    forward(dA, CB, xdt, drop) -> y with, for cs = cumsum(dA) within the chunk,
        L[l, s] = exp(cs_l - cs_s), 0 where drop[l, s]     (decay from s to l)
        y_l = sum_s CB[l, s] * L[l, s] * xdt_s

    dA: (b, g, r, c, q) log decay of each step; CB: (b, g, c, q, q) C_l . B_s, shared by the
    r heads of a group; xdt: (b, g, r, c, q, p); drop: bool, broadcastable to
    (b, g, r, c, q, q), True above the diagonal and across sequences. Returns (b, g, r, c, q, p).

    The (q, q)-per-head tensors dominate the scan's cost (memory traffic, not flops), so this
    is written to touch them as few times as possible: L is masked and exponentiated in place,
    and the backward works from T = dM * M, the gradient wrt each exponent (M = CB * L is 0
    where dropped, so no mask is needed there), instead of autograd's separate exp /
    masked_fill / sub steps.

    Forward: the exponent is a difference of cumsums, masked to -inf before exp, like
    mamba_ssm's kernel: cs only sums one chunk, so the difference loses ~eps * |cs| (relative),
    and exp never sees the positive entries above the diagonal.
    Backward: dA_k enters the exponents of all (l, s) with s < k <= l, so
    grad dA_k = sum_{l >= k} sum_{s < k} T[l, s], summed as such (a cumsum along s, then down
    the rows). Going through d/dcs (row sums minus column sums, then a reverse cumsum) would be
    one pass cheaper but cancels: ~100x larger float32 error in the gradients of A and dt.
    """

    @staticmethod
    def forward(ctx, dA: Tensor, CB: Tensor, xdt: Tensor, drop: Tensor) -> Tensor:
        cs = dA.cumsum(dim=-1)  # (b, g, r, c, q)
        L = cs[..., :, None] - cs[..., None, :]  # (b, g, r, c, q_l, q_s)
        L.masked_fill_(drop, -math.inf).exp_()
        M = L * CB[:, :, None]  # (b, g, r, c, q_l, q_s)
        ctx.save_for_backward(L, M, xdt)
        return M @ xdt  # (b, g, r, c, q, p)

    @staticmethod
    def backward(ctx, gy: Tensor):
        L, M, xdt = ctx.saved_tensors
        need_dA, need_cb, need_x, _ = ctx.needs_input_grad
        g_dA = g_cb = g_x = None
        if need_x:
            g_x = M.transpose(-1, -2) @ gy  # (b, g, r, c, q_s, p)
        if need_dA or need_cb:
            T = gy @ xdt.transpose(-1, -2)  # dM: (b, g, r, c, q_l, q_s)
            if need_cb:
                g_cb = (T * L).sum(dim=2)  # (b, g, c, q_l, q_s): summed over the group's heads
            if need_dA:
                q = T.shape[-1]
                T.mul_(M).cumsum_(dim=-1)  # T[l, j] = sum_{s <= j} dM * M
                # keep rows l > j, sum down the rows: entry j is grad dA_{j+1}
                upper = torch.ones(q, q, dtype=torch.bool, device=T.device).triu()
                S = T.masked_fill_(upper, 0.0).sum(dim=-2)  # (b, g, r, c, q)
                g_dA = F.pad(S[..., :-1], (1, 0))  # dA_0 (chunk start) is in no exponent
        return g_dA, g_cb, g_x, None


# --------------------------------------------------------------------------------------------
# Pure PyTorch chunked scan
# --------------------------------------------------------------------------------------------
def _ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                 seq_idx: Optional[Tensor]) -> Tensor:
    """The SSD core, no D / z.

    x: (b, l, h, p), dt: (b, l, h) (already processed), A: (h,), B, C: (b, l, g, n),
    seq_idx: (b, l) or None. All floating inputs share one dtype. Returns y: (b, l, h, p).

    Internally heads come first, (b, g, r, c, q, ...): every per-head product below is then a
    batched matmul over contiguous (q, q) / (q, p) matrices, with no permute copies of the
    (q, q)-sized tensors, which dominate the cost.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = int(chunk_size) if _TORCH_MAX_CHUNK is None else min(int(chunk_size), _TORCH_MAX_CHUNK)

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
    x = x.reshape(b, c, q, g, r, p).permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, q, p)
    dt = dt.reshape(b, c, q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, q)
    B = B.reshape(b, c, q, g, n).transpose(1, 3).transpose(2, 3)  # (b, g, c, q, n)
    C = C.reshape(b, c, q, g, n).transpose(1, 3).transpose(2, 3)  # (b, g, c, q, n)
    A = A.reshape(g, r, 1, 1)

    dA = dt * A  # (b, g, r, c, q): log decay of each step
    dA_cs = dA.cumsum(dim=-1)  # (b, g, r, c, q): log decay from chunk start through step
    xdt = (x * dt[..., None]).contiguous()  # (b, g, r, c, q, p): the input term dt_t * x_t

    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        sidx = seq_idx.reshape(b, c, q)
        same = sidx[..., :, None] == sidx[..., None, :]  # (b, c, q, q)
        keep = (causal & same)[:, None, None]  # (b, 1, 1, c, q, q)
    else:
        keep = causal

    # 1. Intra-chunk (diagonal blocks): y_l = sum_{s<=l, same seq} C_l.B_s * exp(sum dA_(s,l]) * dt_s x_s
    CB = C @ B.transpose(-1, -2)  # (b, g, c, q_l, q_s)
    y = _IntraChunk.apply(dA, CB, xdt, ~keep)  # (b, g, r, c, q, p)

    # 2. Chunk states: decay from each position to the end of its chunk (the last row of the
    # intra-chunk decay matrix), zero for positions of an earlier sequence than the chunk's last.
    to_end = (dA_cs[..., -1:] - dA_cs).masked_fill(~keep[..., -1, :], -math.inf)  # (b, g, r, c, q)
    decay_states = to_end.exp()  # (b, g, r, c, q)
    states = torch.einsum("bgrcsp,bgcsn->bgrcpn", xdt * decay_states[..., None], B)  # (b, g, r, c, p, n)

    # 3. Inter-chunk state passing: state at the end of chunk z is
    #    S_z = sum_{j<=z, same seq} exp(sum_{k=j+1..z} dA_chunk_k) * states_j.
    last = sidx[..., -1] if seq_idx is not None else None  # (b, c): seq of each chunk's last position
    s_end = _state_passing(dA_cs[..., -1].reshape(b, h, c), states.reshape(b, h, c, p * n), last)
    s_end = s_end.reshape(b, g, r, c, p, n)

    # 4. State -> output: y_l += exp(dA_cs_l) * C_l . s_in, where s_in, the state entering chunk
    # z, is the state at the end of chunk z-1 (none enters chunk 0: slicing instead of shifting
    # the state tensor saves a copy of it). Only positions of the sequence the incoming state
    # belongs to (the last seq of the previous chunk) read it.
    if c > 1:
        decay_out = dA_cs[:, :, :, 1:]  # (b, g, r, c-1, q)
        if seq_idx is not None:
            reads = (sidx[:, 1:] == last[:, :-1, None])[:, None, None]  # (b, 1, 1, c-1, q)
            decay_out = decay_out.masked_fill(~reads, -math.inf)
        y_off = torch.einsum("bgcln,bgrcpn->bgrclp", C[:, :, 1:], s_end[:, :, :, :-1])  # (b, g, r, c-1, q, p)
        y = torch.cat([y[:, :, :, :1], y[:, :, :, 1:] + y_off * decay_out.exp()[..., None]], dim=3)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * q, h, p)
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
    # The scan is computed in `cd` on purpose: under autocast its matmuls would
    # drop to bf16/fp16 and, worse, hand a low-precision gradient to the
    # hand-written backward of the intra-chunk term.
    with torch.autocast(device_type=x.device.type, enabled=False):
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
        backend: "torch" (this module), "triton" (mamba_ssm, CUDA only), "triton_heads"
            (mamba_ssm's kernels with the output pass and the backward's pair gradients of
            ``ssd_scan_heads``, all heads of a chunk in one program; one group, D of shape
            (h,), no z) or "auto": Triton when x is on CUDA, not float64 (the kernels
            accumulate in float32) and mamba_ssm imports; the PyTorch path otherwise.

    Returns:
        y: (b, l, h, p) in x's dtype.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    want_triton = backend in ("triton", "triton_heads") or (
        backend == "auto" and x.is_cuda and x.dtype != torch.float64
    )
    if want_triton:
        if not x.is_cuda:
            raise RuntimeError(
                f"ssd_scan(backend={backend!r}) needs CUDA tensors, but x is on {x.device}; "
                "use backend='torch' (or 'auto') on CPU."
            )
        fn, reason = _load_triton_heads_scan() if backend == "triton_heads" else _load_triton_scan()
        if fn is not None:
            if seq_idx is not None:
                seq_idx = seq_idx.to(torch.int32).contiguous()
            return fn(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, seq_idx=seq_idx,
                      dt_softplus=dt_softplus, dt_limit=dt_limit)
        if backend != "auto":
            raise RuntimeError(
                f"ssd_scan(backend={backend!r}): the Triton kernels (mamba_ssm.ops.triton."
                f"ssd_combined{', ssd4rec.ops.ssd_scan_heads' if backend == 'triton_heads' else ''})"
                f" are not available: {reason}"
            )
        warnings.warn(
            f"mamba_ssm Triton SSD kernel not available ({reason}); "
            "using the slower PyTorch ssd_scan on CUDA.",
            RuntimeWarning,
            stacklevel=2,
        )
    return ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                          seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit)


def all_heads_shapes_supported(headdim: int, d_state: int, chunk_size: int) -> bool:
    """Whether ``ssd_scan_heads``' kernels take these sizes: each is a whole tile dimension of
    theirs (``tl.arange``, ``tl.dot``), so a power of two of at least 16."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (headdim, d_state, chunk_size))


def uses_all_heads_kernels(backend: str, is_cuda: bool, dtype: torch.dtype, ngroups: int,
                           D: Optional[Tensor], headdim: int, d_state: int, chunk_size: int) -> bool:
    """Whether ``ssd_scan_xbc`` runs ``ssd_scan_heads``' kernels: when asked ("triton_heads", on
    CUDA with one group; they raise a ValueError for sizes they do not take, and other cases go
    on to ``ssd_scan``, which explains what is missing), or for "auto" on CUDA wherever they
    apply (one group, D of shape (h,) or none, not float64, ``all_heads_shapes_supported``,
    chunk_size at least 64) and import. They compute what mamba_ssm's do (tested on the GPU),
    and an ML-1M step is about 0.6x as long with them (results/MEASUREMENTS.md, session 16).
    ``ssd_scan``'s own "auto" keeps mamba_ssm's kernels: its other callers (LinRec's
    attention, the lifelong mixer's stateful scan) were not measured."""
    if not is_cuda or ngroups != 1:
        return False
    if backend == "triton_heads":
        return True
    # chunk >= 64: the chunk sizes their GPU tests and measurements cover (64 to 256); smaller
    # ones pass the interpreter's checks but have not run on a GPU.
    return (backend == "auto" and dtype != torch.float64 and (D is None or D.dim() == 1)
            and all_heads_shapes_supported(headdim, d_state, chunk_size) and chunk_size >= 64
            and _load_triton_heads_scan()[0] is not None)


def ssd_scan_xbc(xBC: Tensor, dt: Tensor, A: Tensor, headdim: int, chunk_size: int, ngroups: int = 1,
                 D: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                 seq_idx: Optional[Tensor] = None, dt_softplus: bool = False,
                 dt_limit: Tuple[float, float] = (0.0, float("inf")), backend: str = "auto") -> Tensor:
    """``ssd_scan`` on the convolution's output as one tensor, as a Mamba2 mixer holds it.

    xBC: (b, l, h*p + 2*g*n) = [x | B | C]; dt: (b, l, h); the rest as ``ssd_scan`` (no z)
    -> y: (b, l, h, p).

    With backend "triton_heads", or "auto" where those kernels apply (``uses_all_heads_kernels``),
    the scan takes xBC whole and its backward writes the gradients of x, B and C into one tensor
    (``ssd_scan_heads.SSDScanAllHeadsXBC``), where split views would make autograd concatenate
    them. Every other case splits xBC and runs ``ssd_scan``: same values and gradients.
    """
    batch, length, width = xBC.shape
    nheads = dt.shape[-1]
    d_inner = nheads * headdim
    d_state = (width - d_inner) // (2 * ngroups)
    if uses_all_heads_kernels(backend, xBC.is_cuda, xBC.dtype, ngroups, D, headdim, d_state, chunk_size):
        fn, reason = _load_triton_heads_scan()
        if fn is None:
            raise RuntimeError(f"ssd_scan(backend='triton_heads'): the Triton kernels are not available: {reason}")
        from ssd4rec.ops.ssd_scan_heads import ssd_scan_all_heads_xbc  # importable: fn loaded above

        return ssd_scan_all_heads_xbc(xBC, dt, A, headdim, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx,
                                      dt_softplus=dt_softplus, dt_limit=dt_limit)
    x, B, C = torch.split(xBC, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    return ssd_scan(x.reshape(batch, length, nheads, headdim), dt, A,
                    B.reshape(batch, length, ngroups, d_state), C.reshape(batch, length, ngroups, d_state),
                    chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=dt_softplus,
                    dt_limit=dt_limit, backend=backend)
