"""The core of the Mamba-1 selective scan as a Triton kernel pair (forward and backward).

It computes exactly what ``selective_scan._SelectiveScanCore`` computes, for one variable
group of B / C (Mamba4Rec's setting); delta arrives with its bias and softplus applied:

    h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t        h_t: (d, n) per batch row, h_{-1} = 0
    y_t = sum_n C_t[n] h_t[:, n]

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); all float32
    -> y: (b, d, l) and the last state (b, d, n) (no gradient flows through it)

Backward, in reverse time, with G_t = dL/dh_t and g_dA_t = dL/d(delta_t A):

    G_t = gy_t C_t + exp(delta_{t+1} A) G_{t+1}         g_dA_t = G_t * exp(delta_t A) * h_{t-1}
    gA = sum_{b,t} g_dA_t delta_t                        gC_t[n] = sum_d gy_t[d] h_t[d, n]
    gdelta_t = sum_n g_dA_t A + (sum_n G_t B_t) u_t      gu_t = (sum_n G_t B_t) delta_t
    gB_t[n] = sum_d G_t[d, n] delta_t u_t

Why this design. The PyTorch core materialises (T, b, d, n) block tensors in global memory for
every step's decay, input and state; at Mamba4Rec's ML-1M shape (b=1024, d=128, n=32, l=200)
that traffic dominates an epoch. Here one program owns a (BLOCK_D, n) tile of one batch row's
state, keeps it in registers and loops over time inside the kernel, so per step it reads only
BLOCK_D values of u and delta (and gy) and n values of B and C, and writes BLOCK_D outputs.
Grid: (b, cdiv(d, BLOCK_D)). n and d need not be powers of two (masked; padded rows and
columns have A = 0, u = delta = B = C = 0, so their state stays 0 and their decay 1).

Saved state: the forward stores the state entering every chunk of CHUNK steps, (b, nchunks,
d, n) float32, instead of every state, (b, l, d, n) (CHUNK=1 is that simpler design). The
backward walks the chunks in reverse; for each it recomputes the chunk's states from its
checkpoint into a per-program scratch tile (CHUNK, BLOCK_D, n_pow2), which is written and
read back at once (mostly from L2), then runs the reverse recurrence over them. At the ML-1M
shape with CHUNK=8 that keeps 0.42 GB of checkpoints (+ 0.13 GB of scratch during the
backward) instead of 3.4 GB; the cost is one more cheap pass of the recurrence, which on an
H100 less global-memory traffic more than repaid (4 warps: CHUNK=8 5.1 ms, CHUNK=1 6.0 ms).

Layout: u, delta, gy and y are handled as time-major (b, l, d) copies, B and C as (b, l, n):
a step's BLOCK_D channels (and n states) are then contiguous, one coalesced load per step,
where the (b, d, l) inputs would put them l elements apart. The transposed copies are
O(b d l), negligible next to the scan.

Measured (one H100, float32, forward + backward of the core at b=1024, d=128, n=32, l=200,
``scripts/bench_selective_scan.py``): 3.96 ms and 1.5 GB peak against 43.6 ms and 9.4 GB for
the PyTorch core. Among BLOCK_D 16 / 32 / 64, CHUNK 1 / 4 / 8 / 16 / 32 and 1 to 8 warps,
one warp per program of 32 channels was fastest (more warps only split a tile that is
already small); CHUNK=8 gives up 10% against CHUNK=4 (3.59 ms, 1.8 GB) for 0.34 GB less.

Cross-program sums (gB, gC over the d-blocks of a row, gA over the batch) go to per-program
partial buffers that torch sums afterwards, not tl.atomic_add: the result is deterministic
(float atomics add in arbitrary order) and the buffers are small (gB, gC: (b, d / BLOCK_D,
l, n); gA: (b, d, n)).

Triton is imported lazily (``_load_triton_selective_scan``), so importing ssd4rec never needs
it; ``ssd4rec.ops.selective_scan`` dispatches here (backend "triton", or "auto" on CUDA when
mamba_ssm's ``selective_scan_cuda`` is missing).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["selective_scan_triton_core"]

# Channels per program. 32 keeps the (BLOCK_D, n) state tile small enough for the registers
# of one warp at n = 32 and gives b * d / 32 programs (4096 at the ML-1M shape) to hide each
# step's latency. The three values were the fastest of a sweep on an H100 (module docstring).
BLOCK_D = 32
# Steps between the forward's saved states (see the module docstring).
CHUNK = 8
NUM_WARPS = 1


@functools.lru_cache(maxsize=1)
def _kernels():
    """Define and return the two jitted kernels (imports triton; raises ImportError without it).

    The kernels are defined here rather than at module level so that importing this module
    needs no triton; ``triton`` / ``tl`` become module globals first, which is where the jit
    compiler looks names up.
    """
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, y_ptr, last_ptr, ckpt_ptr,
                    d, n, l, n_chunks,
                    SAVE: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STATIC_CHUNKS: tl.constexpr):
        """u, dl, y: (b, l, d); A: (d, n); B, C: (b, l, n); last: (b, d, n);
        ckpt: (b, n_chunks, d, n), the state entering each chunk (only when SAVE)."""
        pid_b = tl.program_id(0).to(tl.int64)  # int64: b * l * d * n passes 2**31 at large b
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < d
        n_ok = offs_n < n
        dn_ok = d_ok[:, None] & n_ok[None, :]
        dn = offs_d[:, None] * n + offs_n[None, :]
        A = tl.load(A_ptr + dn, mask=dn_ok, other=0.0)
        row_d = pid_b * l * d + offs_d  # (b, l, d) at t = 0; + t * d
        row_n = pid_b * l * n + offs_n  # (b, l, n) at t = 0; + t * n
        ckpt = ckpt_ptr + pid_b * n_chunks * d * n + dn
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(n_chunks if STATIC_CHUNKS == 0 else STATIC_CHUNKS):  # see _static_chunks
            if SAVE:
                tl.store(ckpt + c * d * n, h, mask=dn_ok)
            for k in range(CHUNK):
                t = c * CHUNK + k
                # past l (last chunk): everything loads as 0, so the step leaves h unchanged
                td_ok = d_ok & (t < l)
                tn_ok = n_ok & (t < l)
                u = tl.load(u_ptr + row_d + t * d, mask=td_ok, other=0.0)
                dl = tl.load(dl_ptr + row_d + t * d, mask=td_ok, other=0.0)
                Bt = tl.load(B_ptr + row_n + t * n, mask=tn_ok, other=0.0)
                Ct = tl.load(C_ptr + row_n + t * n, mask=tn_ok, other=0.0)
                h = tl.exp(dl[:, None] * A) * h + (dl * u)[:, None] * Bt[None, :]
                tl.store(y_ptr + row_d + t * d, tl.sum(h * Ct[None, :], axis=1), mask=td_ok)
        tl.store(last_ptr + pid_b * d * n + dn, h, mask=dn_ok)

    @triton.jit
    def _bwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, gy_ptr, ckpt_ptr, scratch_ptr,
                    gu_ptr, gdl_ptr, gA_ptr, gB_ptr, gC_ptr,
                    d, n, l, n_chunks, n_dblocks,
                    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    STATIC_CHUNKS: tl.constexpr):
        """u, dl, gy, gu, gdl: (b, l, d); A: (d, n); B, C: (b, l, n); ckpt: (b, n_chunks, d, n);
        scratch: (b, n_dblocks, CHUNK, BLOCK_D, BLOCK_N); partial sums gA: (b, d, n) and
        gB, gC: (b, n_dblocks, l, n)."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < d
        n_ok = offs_n < n
        dn_ok = d_ok[:, None] & n_ok[None, :]
        dn = offs_d[:, None] * n + offs_n[None, :]
        A = tl.load(A_ptr + dn, mask=dn_ok, other=0.0)
        row_d = pid_b * l * d + offs_d
        row_n = pid_b * l * n + offs_n
        part_n = (pid_b * n_dblocks + pid_d) * l * n + offs_n  # gB / gC partials; + t * n
        ckpt = ckpt_ptr + pid_b * n_chunks * d * n + dn
        # This program's scratch tile, unmasked (it is allocated padded); + k * BLOCK_D * BLOCK_N
        scratch = (scratch_ptr + (pid_b * n_dblocks + pid_d) * CHUNK * BLOCK_D * BLOCK_N
                   + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :])

        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # exp(delta_{t+1} A) G_{t+1}
        gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for cc in range(n_chunks if STATIC_CHUNKS == 0 else STATIC_CHUNKS):
            c = n_chunks - 1 - cc
            # Recompute the chunk's states: slot k holds h_{c*CHUNK + k - 1}, the state that
            # step c*CHUNK + k starts from.
            h = tl.load(ckpt + c * d * n, mask=dn_ok, other=0.0)
            tl.store(scratch, h)
            for k in range(CHUNK - 1):
                t = c * CHUNK + k
                td_ok = d_ok & (t < l)
                u = tl.load(u_ptr + row_d + t * d, mask=td_ok, other=0.0)
                dl = tl.load(dl_ptr + row_d + t * d, mask=td_ok, other=0.0)
                Bt = tl.load(B_ptr + row_n + t * n, mask=n_ok & (t < l), other=0.0)
                h = tl.exp(dl[:, None] * A) * h + (dl * u)[:, None] * Bt[None, :]
                tl.store(scratch + (k + 1) * BLOCK_D * BLOCK_N, h)
            # Threads may read back slots other threads wrote (the layouts of store and load
            # need not match): make the writes visible to the whole program.
            tl.debug_barrier()
            for kk in range(CHUNK):
                k = CHUNK - 1 - kk
                t = c * CHUNK + k
                # past l: gy = 0 and the carry is still 0 there (the tail is visited first),
                # so G = 0 and nothing is stored
                td_ok = d_ok & (t < l)
                tn_ok = n_ok & (t < l)
                u = tl.load(u_ptr + row_d + t * d, mask=td_ok, other=0.0)
                dl = tl.load(dl_ptr + row_d + t * d, mask=td_ok, other=0.0)
                gy = tl.load(gy_ptr + row_d + t * d, mask=td_ok, other=0.0)
                Bt = tl.load(B_ptr + row_n + t * n, mask=tn_ok, other=0.0)
                Ct = tl.load(C_ptr + row_n + t * n, mask=tn_ok, other=0.0)
                h_prev = tl.load(scratch + k * BLOCK_D * BLOCK_N)
                a = tl.exp(dl[:, None] * A)
                du = dl * u
                h = a * h_prev + du[:, None] * Bt[None, :]  # h_t, recomputed (cheaper than a load)
                G = gy[:, None] * Ct[None, :] + carry
                g_dA = G * a * h_prev
                gA += g_dA * dl[:, None]
                GB = tl.sum(G * Bt[None, :], axis=1)  # dL/d(delta_t u_t), per channel
                tl.store(gdl_ptr + row_d + t * d, tl.sum(g_dA * A, axis=1) + GB * u, mask=td_ok)
                tl.store(gu_ptr + row_d + t * d, GB * dl, mask=td_ok)
                tl.store(gB_ptr + part_n + t * n, tl.sum(G * du[:, None], axis=0), mask=tn_ok)
                tl.store(gC_ptr + part_n + t * n, tl.sum(gy[:, None] * h, axis=0), mask=tn_ok)
                carry = a * G
            # the next chunk's recomputation overwrites slots that other threads may still read
            tl.debug_barrier()
        tl.store(gA_ptr + pid_b * d * n + dn, gA, mask=dn_ok)

    return _fwd_kernel, _bwd_kernel


def _static_chunks(n_chunks: int) -> int:
    """The chunk count as a compile-time constant under Triton's CPU interpreter, 0 (use the
    runtime argument) when compiled. The interpreter passes scalar arguments as 1-element numpy
    arrays, which numpy 2 refuses to turn into a ``range`` bound; compiled, a constant would
    cost one compilation per sequence length."""
    return n_chunks if os.environ.get("TRITON_INTERPRET") == "1" else 0


def _block_n(n: int) -> int:
    return max(2, 1 << (n - 1).bit_length())  # tl.arange needs a power of two


class _SelectiveScanTriton(torch.autograd.Function):
    """Same contract as ``selective_scan._SelectiveScanCore`` for variable B, C:
    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); float32 -> y: (b, d, l), last: (b, d, n)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, block_d, chunk, num_warps):
        # Under autocast nothing here may drop to half precision: the scan runs in float32.
        with torch.autocast(device_type=u.device.type, enabled=False):
            b, d, l = u.shape
            n = A.shape[1]
            fwd, _ = _kernels()
            u_t = u.float().transpose(1, 2).contiguous()  # (b, l, d)
            dl_t = delta.float().transpose(1, 2).contiguous()
            B_t = B.float().transpose(1, 2).contiguous()  # (b, l, n)
            C_t = C.float().transpose(1, 2).contiguous()
            A_c = A.float().contiguous()
            n_chunks = -(-l // chunk)
            grad = any(ctx.needs_input_grad[:5])
            y = torch.empty_like(u_t)
            last = u_t.new_empty(b, d, n)
            ckpt = u_t.new_empty(b, n_chunks, d, n) if grad else last  # unused when not saving
            fwd[(b, -(-d // block_d))](u_t, dl_t, A_c, B_t, C_t, y, last, ckpt, d, n, l, n_chunks,
                                       SAVE=grad, CHUNK=chunk, BLOCK_D=block_d,
                                       BLOCK_N=_block_n(n), STATIC_CHUNKS=_static_chunks(n_chunks),
                                       num_warps=num_warps)
            if grad:
                ctx.save_for_backward(u_t, dl_t, A_c, B_t, C_t, ckpt)
                ctx.config = (block_d, chunk, num_warps)
            ctx.mark_non_differentiable(last)
            return y.transpose(1, 2), last

    @staticmethod
    def backward(ctx, gy, _g_last):
        with torch.autocast(device_type=gy.device.type, enabled=False):
            u_t, dl_t, A_c, B_t, C_t, ckpt = ctx.saved_tensors
            block_d, chunk, num_warps = ctx.config
            b, l, d = u_t.shape
            n = A_c.shape[1]
            n_dblocks = -(-d // block_d)
            block_n = _block_n(n)
            _, bwd = _kernels()
            gy_t = gy.float().transpose(1, 2).contiguous()  # (b, l, d)
            gu = torch.empty_like(u_t)
            gdl = torch.empty_like(u_t)
            gA_part = u_t.new_empty(b, d, n)
            gB_part = u_t.new_empty(b, n_dblocks, l, n)
            gC_part = u_t.new_empty(b, n_dblocks, l, n)
            scratch = u_t.new_empty(b, n_dblocks, chunk, block_d, block_n)
            bwd[(b, n_dblocks)](u_t, dl_t, A_c, B_t, C_t, gy_t, ckpt, scratch,
                                gu, gdl, gA_part, gB_part, gC_part,
                                d, n, l, ckpt.shape[1], n_dblocks,
                                CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
                                STATIC_CHUNKS=_static_chunks(ckpt.shape[1]), num_warps=num_warps)
            gB = gB_part.sum(1) if n_dblocks > 1 else gB_part[:, 0]  # (b, l, n)
            gC = gC_part.sum(1) if n_dblocks > 1 else gC_part[:, 0]
            return (gu.transpose(1, 2), gdl.transpose(1, 2), gA_part.sum(0),
                    gB.transpose(1, 2), gC.transpose(1, 2), None, None, None)


def selective_scan_triton_core(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               block_d: Optional[int] = None, chunk: Optional[int] = None,
                               num_warps: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The Triton core: u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); float32 ->
    (y: (b, d, l), last state: (b, d, n)), differentiable in the five inputs (not through
    the last state). ``block_d`` (a power of two), ``chunk`` and ``num_warps`` override
    BLOCK_D, CHUNK and NUM_WARPS (tests, benchmarks)."""
    if u.dim() != 3 or B.dim() != 3 or C.dim() != 3 or A.dim() != 2:
        raise ValueError("the Triton selective scan takes u, delta: (b, d, l), A: (d, n) and "
                         "B, C: (b, n, l) (one variable group); got shapes "
                         f"{[tuple(t.shape) for t in (u, delta, A, B, C)]}")
    if u.shape[-1] == 0:
        raise ValueError("the Triton selective scan needs l >= 1")
    block_d = BLOCK_D if block_d is None else block_d
    chunk = CHUNK if chunk is None else chunk
    num_warps = NUM_WARPS if num_warps is None else num_warps
    if block_d < 1 or block_d & (block_d - 1) or chunk < 1:
        raise ValueError(f"block_d must be a power of two and chunk >= 1, got {block_d}, {chunk}")
    return _SelectiveScanTriton.apply(u, delta, A, B, C, block_d, chunk, num_warps)


@functools.lru_cache(maxsize=1)
def _load_triton_selective_scan() -> Tuple[Optional[Callable], Optional[str]]:
    """The Triton core, its kernels defined once: ``(fn, None)``, or ``(None, reason)`` where
    triton does not import."""
    try:
        _kernels()
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return selective_scan_triton_core, None
