"""Weighted sums over the sequences of a packed stream, in Triton, one program per sequence.

    out[r, k, f] = sum_{t in sequence k} w[r, t, f // P] * v[r, t, f]      (w absent: 1)

v: (R, T, F) with F = H * P and its last dim contiguous; w: (R, T, H) or None; cu_seqlens:
(K+1,) int, sequence k being tokens cu_seqlens[k]:cu_seqlens[k+1] of every row; out: (R, K, F)
in float32 (float64 when v is float64).

Why a kernel. ``ssd4rec.ops.ssd_at`` sums a (2, T, 512) product per sequence at every training
step. A program per (sequence, block of F) adds its sequence's tokens in a fixed order, so the
result does not depend on scheduling (``index_add_`` on CUDA adds with atomics, in an order that
changes from run to run), and it reads v and w once, where PyTorch would first write the
(R, T, F) float32 product out.
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tokens per loaded tile, and features per program. Under the interpreter, small, so that the
# tests' short sequences span several tiles and their few features several programs.
BLOCK_T = 4 if _INTERPRET else 32
BLOCK_F = 8 if _INTERPRET else 128


@triton.jit
def _segment_sum_kernel(
    v_ptr, w_ptr, cu_ptr, out_ptr,
    F, P,
    s_v_r, s_v_t,
    s_w_r, s_w_t,
    s_o_r, s_o_k,
    HAS_W: tl.constexpr, F64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One program: BLOCK_F features of one sequence of one row, its tokens BLOCK_T at a time."""
    pid_k, pid_f, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + pid_k)
    end = tl.load(cu_ptr + pid_k + 1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    acc_dtype = tl.float64 if F64 else tl.float32
    acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=acc_dtype)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < end)[:, None] & f_ok[None, :]
        tile = tl.load(v_ptr + pid_r * s_v_r + offs_t[:, None] * s_v_t + offs_f[None, :], mask=mask, other=0.0)
        tile = tile.to(acc_dtype)
        if HAS_W:
            weight = tl.load(w_ptr + pid_r * s_w_r + offs_t[:, None] * s_w_t + (offs_f // P)[None, :], mask=mask,
                             other=0.0)
            tile = tile * weight.to(acc_dtype)
        acc += tile
    tl.store(out_ptr + pid_r * s_o_r + pid_k * s_o_k + offs_f, tl.sum(acc, axis=0), mask=f_ok)


def segment_sum_triton(v, w, cu_seqlens):
    """v: (R, T, F), last dim contiguous; w: (R, T, H) or None (H divides F); cu_seqlens: (K+1,)
    -> (R, K, F), float32 (float64 for a float64 v)."""
    R, T, F = v.shape
    K = cu_seqlens.shape[0] - 1
    if v.stride(2) != 1:
        v = v.contiguous()
    f64 = v.dtype == torch.float64
    out = torch.empty(R, K, F, device=v.device, dtype=torch.float64 if f64 else torch.float32)
    if K == 0 or F == 0:
        return out
    if w is not None:
        w = w if w.stride(2) == 1 else w.contiguous()
        P, s_w_r, s_w_t = F // w.shape[2], w.stride(0), w.stride(1)
    else:
        P, s_w_r, s_w_t = 1, 0, 0
    grid = (K, triton.cdiv(F, BLOCK_F), R)
    _segment_sum_kernel[grid](
        v, v if w is None else w, cu_seqlens, out, F, P,  # without w, its pointer is never read
        v.stride(0), v.stride(1), s_w_r, s_w_t, out.stride(0), out.stride(1),
        HAS_W=w is not None, F64=f64, BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F,
    )
    return out
