"""Issue #4: SSD scan passes with all heads of a chunk in one program, checked and timed.

- ``fwd``: the output pass of ``ssd4rec.ops.ssd_scan_heads`` (``backend: triton_heads``), which
  computes mamba_ssm 2.3.2's ``_chunk_scan_fwd`` output (no z, one group, D per head); its
  docstring has the formula.
- ``dx``: a prototype, in this file, of the backward's dx pass, mamba_ssm's
  ``_chunk_scan_chunk_state_bwd_dx`` (dx, ddt, dD), the largest kernel of a training step.
- ``ddacs``: a prototype of the backward's ddA pass, mamba_ssm's
  ``_chunk_scan_bwd_ddAcs_stable``. The two prototypes are not used by the model until they
  are timed here on a GPU.
- ``backward`` (GPU only): the whole scan backward with both prototypes in place of
  mamba_ssm's kernels (``scan_backward``), against the same steps with mamba_ssm's kernels,
  which are first checked against mamba_ssm's own ``_mamba_chunk_scan_combined_bwd``.

Each loads a chunk's (Q, Q) C·Bᵀ block once instead of once per head. This script

- checks each against a float64 loop of its formula on small shapes (``--check``; on a CPU
  under Triton's interpreter, which cannot run mamba_ssm's own kernels), and
- on a GPU, compares each with mamba_ssm's kernel at the ML-1M step's shape (bf16, 245,760
  tokens, mean history 120) and times both in alternating rounds in one process.

    TRITON_INTERPRET=1 python scripts/bench_scan_heads.py --check    # CPU: against the loops
    PYTHONPATH=. python3 scripts/bench_scan_heads.py                 # GPU: against mamba_ssm, timed

The inputs of ``random_inputs`` (float32 unless asked):

    CB: (batch, nchunks, 1, Q, Q) float32, C[t]·B[s], already 0 across sequences
    x: (batch, seqlen, H, P); dt, dA (the chunk's cumulative dt*A): (batch, H, nchunks, Q) float32
    C: (batch, seqlen, 1, N); state_in: (batch, nchunks, H, P, N); D: (H,); seq: (batch, seqlen) int32
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import packed_seq_idx  # noqa: E402  (scripts/, this file's folder)

try:
    import triton
    import triton.language as tl
    from ssd4rec.ops.ssd_scan_heads import AUTOTUNE_CONFIGS, scan_out_all_heads
except ImportError as err:  # the CPU install has no triton
    if __name__ == "__main__":
        sys.exit(f"bench_scan_heads.py needs triton ({err}); on a CPU: pip install triton, then "
                 "TRITON_INTERPRET=1 python scripts/bench_scan_heads.py --check")
    raise


def reference(cb, x, dt, dA, C, states, D, seq_idx):
    """``ssd4rec.ops.ssd_scan_heads``' formula as a loop over chunks, in float64."""
    batch, seqlen, nheads, p = x.shape
    q = cb.shape[-1]
    y = torch.zeros(batch, seqlen, nheads, p, dtype=torch.float64)
    x64, C64 = x.double(), C[:, :, 0].double()
    for c in range(cb.shape[1]):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        w = hi - lo
        block = torch.tril(cb[:, c, 0, :w, :w].double())                          # (b, t, s)
        a = dA[:, :, c, :w].double()                                             # (b, h, t)
        decay = torch.exp(torch.clamp(a[..., :, None] - a[..., None, :], max=0.0))
        weights = block[:, None] * decay * dt[:, :, c, None, :w].double()        # (b, h, t, s)
        y[:, lo:hi] = torch.einsum("bhts,bshp->bthp", weights, x64[:, lo:hi])
        if c > 0:
            carries = (seq_idx[:, lo:hi] == seq_idx[:, lo - 1:lo]).double()      # (b, t)
            inter = torch.einsum("btn,bhpn->bthp", C64[:, lo:hi], states[:, c].double())
            y[:, lo:hi] += inter * (torch.exp(a).transpose(1, 2) * carries[..., None])[..., None]
    return y if D is None else y + x64 * D.double()[:, None]


def random_inputs(batch, seqlen, nheads, p, n, q, mean_len, device, dtype, gen):
    """Valid inputs: sequence ids along each row, C·Bᵀ zeroed across sequences (as mamba_ssm's
    _bmm_chunk_fwd with seq_idx makes it), decaying cumulative dA within each chunk."""
    nchunks = -(-seqlen // q)
    seq_idx = packed_seq_idx(batch, seqlen, mean_len, gen).long()
    B = torch.randn(batch, nchunks * q, n, generator=gen) * n ** -0.5
    C = torch.randn(batch, nchunks * q, n, generator=gen) * n ** -0.5
    padded = torch.nn.functional.pad(seq_idx, (0, nchunks * q - seqlen), value=-1)
    Bc, Cc, sc = (t.view(batch, nchunks, q, *t.shape[2:]) for t in (B, C, padded))
    cb = torch.einsum("bctn,bcsn->bcts", Cc, Bc) * (sc[..., :, None] == sc[..., None, :])
    dt = torch.rand(batch, nheads, nchunks, q, generator=gen) * 0.2
    dt.view(batch, nheads, nchunks * q)[..., seqlen:] = 0.0  # past the row's end, as _chunk_cumsum_fwd leaves it
    A = -torch.exp(torch.rand(nheads, generator=gen) * 2.0)
    dA = torch.cumsum(dt * A[None, :, None, None], dim=-1)
    x = torch.randn(batch, seqlen, nheads, p, generator=gen)
    states = torch.randn(batch, nchunks, nheads, p, n, generator=gen)
    D = torch.randn(nheads, generator=gen)
    to = dict(device=device)
    return (cb[:, :, None].contiguous().to(**to), x.to(dtype=dtype, **to), dt.to(**to), dA.to(**to),
            C[:, :seqlen, None].to(dtype=dtype, **to), states.to(dtype=dtype, **to), D.to(**to),
            seq_idx.to(torch.int32).to(**to))


# --------------------------------------------------------------------------------------------
# Prototype: the backward's dx pass with all heads of a chunk in one program
# --------------------------------------------------------------------------------------------
# mamba_ssm's ``_chunk_scan_chunk_state_bwd_dx`` (the largest kernel of an SSD4Rec training
# step) also runs one program per (chunk, head) and reloads the chunk's C·Bᵀ for every head.
# For token s of chunk c and head h, with t over the chunk's tokens at or after s:
#
#     g[s, h]  = sum_{t >= s} CB[t, s] exp(min(dA[h, t] - dA[h, s], 0)) dout[t, h]
#                + [seq(s) == seq(last token of c)] exp(min(dA[h, last] - dA[h, s], 0)) B[s] . dstates[c, h]
#     dx[s, h] = g[s, h] dt[h, s] + D[h] dout[s, h]
#     ddt[h, s] = sum_p g[s, h, p] x[s, h, p]            dD[h] = sum_{s, p} dout[s, h, p] x[s, h, p]
#
#     CB: (b, nchunks, 1, Q, Q) float32; x, dout: (b, l, H, P); dt, dA: (b, H, nchunks, Q) float32
#     B: (b, l, 1, N); dstates: (b, nchunks, H, P, N); D: (H,); seq: (b, l) int32
# Not used by the model: timed against mamba_ssm's kernel on a GPU first (main, --passes dx).
@triton.autotune(configs=AUTOTUNE_CONFIGS, key=["NHEADS", "Q", "P", "N"])
@triton.jit
def _dx_all_heads_kernel(
    cb_ptr, x_ptr, dout_ptr, dt_ptr, dA_ptr, B_ptr, dst_ptr, D_ptr, seq_ptr,
    dx_ptr, ddt_ptr, dD_ptr,
    seqlen,
    s_cb_b, s_cb_c, s_cb_m, s_cb_k,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dt_b, s_dt_h, s_dt_c, s_dt_q,
    s_B_b, s_B_l, s_B_n,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_seq_b, s_seq_l,
    s_dD_b, s_dD_c, s_dD_m,
    HAS_D: tl.constexpr,
    NHEADS: tl.constexpr, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program: BLOCK_M tokens s of one chunk of one batch row, every head. x, dout and dx
    share x's strides; ddt shares dt's."""
    pid_m, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = pid_c * Q
    limit = tl.minimum(Q, seqlen - start)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # the tokens s
    offs_k = tl.arange(0, Q)                            # the tokens t
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)
    m_ok, k_ok = offs_m < limit, offs_k < limit

    # Shared by every head: C·Bᵀ transposed (rows s, columns t >= s), B rows, sequence ids.
    cbT = tl.load(cb_ptr + pid_b * s_cb_b + pid_c * s_cb_c + offs_k[None, :] * s_cb_m + offs_m[:, None] * s_cb_k,
                  mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    cbT = tl.where(offs_k[None, :] >= offs_m[:, None], cbT, 0.0)
    b_rows = tl.load(B_ptr + pid_b * s_B_b + (start + offs_m)[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                     mask=m_ok[:, None], other=0.0)
    seq_m = tl.load(seq_ptr + pid_b * s_seq_b + (start + offs_m) * s_seq_l, mask=m_ok, other=-1)
    seq_last = tl.load(seq_ptr + pid_b * s_seq_b + (start + limit - 1) * s_seq_l)
    reaches_end = seq_m == seq_last  # token s's sequence is the one whose state leaves the chunk

    dt_base = dt_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    dA_base = dA_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    for h in range(0, NHEADS):
        dA_m = tl.load(dA_base + h * s_dt_h + offs_m * s_dt_q, mask=m_ok, other=0.0)
        dA_k = tl.load(dA_base + h * s_dt_h + offs_k * s_dt_q, mask=k_ok, other=0.0)
        dA_last = tl.load(dA_base + h * s_dt_h + (limit - 1) * s_dt_q)
        dt_m = tl.load(dt_base + h * s_dt_h + offs_m * s_dt_q, mask=m_ok, other=0.0)
        head = pid_b * s_x_b + h * s_x_h
        dout_k = tl.load(dout_ptr + head + (start + offs_k)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                         mask=k_ok[:, None], other=0.0)
        # min(., 0): below the diagonal the difference is positive and masked anyway (see the forward)
        weights = cbT * tl.exp(tl.minimum(dA_k[None, :] - dA_m[:, None], 0.0))
        acc = tl.dot(weights.to(dout_k.dtype), dout_k)                              # (BLOCK_M, P)
        dstate = tl.load(dst_ptr + pid_b * s_st_b + pid_c * s_st_c + h * s_st_h
                         + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p)   # (N, P)
        scale = tl.where(reaches_end, tl.exp(tl.minimum(dA_last - dA_m, 0.0)), 0.0)
        acc += tl.dot(b_rows, dstate.to(b_rows.dtype)) * scale[:, None]
        x_m = tl.load(x_ptr + head + (start + offs_m)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                      mask=m_ok[:, None], other=0.0).to(tl.float32)
        tl.store(ddt_ptr + pid_b * s_dt_b + pid_c * s_dt_c + h * s_dt_h + offs_m * s_dt_q,
                 tl.sum(acc * x_m, axis=1), mask=m_ok)
        dx = acc * dt_m[:, None]
        if HAS_D:
            dout_m = tl.load(dout_ptr + head + (start + offs_m)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                             mask=m_ok[:, None], other=0.0).to(tl.float32)
            dx += dout_m * tl.load(D_ptr + h).to(tl.float32)
            # one partial sum per (program, head): the host adds them, no atomics
            tl.store(dD_ptr + pid_b * s_dD_b + pid_c * s_dD_c + pid_m * s_dD_m + h, tl.sum(tl.sum(dout_m * x_m, axis=1)))
        tl.store(dx_ptr + head + (start + offs_m)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                 dx.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None])


def dx_all_heads(cb, x, dout, dt, dA, B, dstates, D, seq_idx):
    """The dx pass (formula above) -> dx: (b, l, H, P) in x's dtype, ddt: (b, H, nchunks, Q)
    float32, dD: (H,) float32 or None. Shapes as above; one group only."""
    batch, seqlen, nheads, p = x.shape
    _, nchunks, groups, q, _ = cb.shape
    n = B.shape[-1]
    assert groups == 1 and B.shape[2] == 1, "one group (SSD4Rec's setting) only"
    assert dt.stride() == dA.stride() and dout.stride() == x.stride()
    dx = torch.empty_like(x)
    ddt = torch.zeros_like(dt)
    # per (b, chunk, row block, head); sized for the narrowest row block any config uses
    dD_part = torch.zeros(batch, nchunks, triton.cdiv(q, 16), nheads, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(q, meta["BLOCK_M"]), nchunks, batch)  # noqa: E731
    _dx_all_heads_kernel[grid](
        cb, x, dout, dt, dA, B, dstates, D if D is not None else x, seq_idx, dx, ddt, dD_part, seqlen,
        cb.stride(0), cb.stride(1), cb.stride(3), cb.stride(4),
        *x.stride(), *dt.stride(),
        B.stride(0), B.stride(1), B.stride(3),
        *dstates.stride(), *seq_idx.stride(),
        dD_part.stride(0), dD_part.stride(1), dD_part.stride(2),
        HAS_D=D is not None, NHEADS=nheads, Q=q, P=p, N=n)
    return dx, ddt, (dD_part.sum(dim=(0, 1, 2)) if D is not None else None)


def reference_dx(cb, x, dout, dt, dA, B, dstates, D, seq_idx):
    """The dx pass's formula as a loop over chunks, in float64 -> (dx, ddt, dD)."""
    batch, seqlen, nheads, p = x.shape
    q = cb.shape[-1]
    g = torch.zeros(batch, seqlen, nheads, p, dtype=torch.float64)
    x64, dout64, B64 = x.double(), dout.double(), B[:, :, 0].double()
    dt64 = torch.zeros(batch, seqlen, nheads, dtype=torch.float64)
    for c in range(cb.shape[1]):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        w = hi - lo
        block = torch.triu(cb[:, c, 0, :w, :w].double().transpose(1, 2))          # (b, s, t), t >= s
        a = dA[:, :, c, :w].double()                                             # (b, h, s)
        decay = torch.exp(torch.clamp(a[..., None, :] - a[..., :, None], max=0.0))  # (b, h, s, t)
        g[:, lo:hi] = torch.einsum("bhst,bthp->bshp", block[:, None] * decay, dout64[:, lo:hi])
        reaches = (seq_idx[:, lo:hi] == seq_idx[:, hi - 1:hi]).double()          # (b, s)
        to_end = torch.exp(torch.clamp(a[..., -1:] - a, max=0.0)).transpose(1, 2)  # (b, s, h)
        inter = torch.einsum("bsn,bhpn->bshp", B64[:, lo:hi], dstates[:, c].double())
        g[:, lo:hi] += inter * (to_end * reaches[..., None])[..., None]
        dt64[:, lo:hi] = dt[:, :, c, :w].double().transpose(1, 2)
    dx = g * dt64[..., None]
    ddt_tokens = (g * x64).sum(-1)                                               # (b, l, h)
    ddt = torch.zeros(dt.shape, dtype=torch.float64)
    for c in range(cb.shape[1]):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        ddt[:, :, c, :hi - lo] = ddt_tokens[:, lo:hi].transpose(1, 2)
    if D is None:
        return dx, ddt, None
    return dx + dout64 * D.double()[:, None], ddt, (dout64 * x64).sum(dim=(0, 1, 3))


def random_dx_inputs(batch, seqlen, nheads, p, n, q, mean_len, device, dtype, gen):
    """random_inputs' tensors in the dx pass's roles (C's random tensor serves as B, the states
    as dstates: the formula is linear in each), plus a random dout."""
    cb, x, dt, dA, B, dstates, D, seq_idx = random_inputs(batch, seqlen, nheads, p, n, q, mean_len, device, dtype, gen)
    dout = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    return cb, x, dout, dt, dA, B, dstates, D, seq_idx


# --------------------------------------------------------------------------------------------
# Prototype: the backward's ddA pass (mamba_ssm's _chunk_scan_bwd_ddAcs_stable), all heads
# --------------------------------------------------------------------------------------------
# The other per-head reader of C·Bᵀ in the backward (dcb, dC and dB already loop over the heads
# inside one program). The gradient of the chunk's cumulative dA through the decays of the
# output pass: with M[t, s] = (dout[t, h] . x[s, h]) CB[t, s] dt[h, s] exp(dA[h, t] - dA[h, s]),
#
#     ddA[h, j] = sum_{t >= j} sum_{s < j} M[t, s]        (j >= 1; ddA[h, 0] = 0)
#
# since exp(dA[t] - dA[s]) depends on the increments of dA at s+1 .. t.
#     x, dout: (b, l, H, P); dt, dA: (b, H, nchunks, Q) float32; CB: (b, nchunks, 1, Q, Q) -> ddA like dt
@triton.autotune(configs=AUTOTUNE_CONFIGS, key=["NHEADS", "Q", "P"])
@triton.jit
def _ddacs_all_heads_kernel(
    cb_ptr, x_ptr, dout_ptr, dt_ptr, dA_ptr, part_ptr,
    seqlen,
    s_cb_b, s_cb_c, s_cb_m, s_cb_k,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dt_b, s_dt_h, s_dt_c, s_dt_q,
    s_pt_b, s_pt_h, s_pt_c, s_pt_m,
    NHEADS: tl.constexpr, Q: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program: BLOCK_M rows t of one chunk of one batch row, all columns s, every head;
    writes its rows' part of ddA (the host adds the parts). x and dout share strides."""
    pid_m, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = pid_c * Q
    limit = tl.minimum(Q, seqlen - start)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # the rows t
    offs_k = tl.arange(0, Q)                            # the columns s
    offs_p = tl.arange(0, P)
    m_ok, k_ok = offs_m < limit, offs_k < limit

    cb = tl.load(cb_ptr + pid_b * s_cb_b + pid_c * s_cb_c + offs_m[:, None] * s_cb_m + offs_k[None, :] * s_cb_k,
                 mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    strictly_below = offs_m[:, None] > offs_k[None, :]  # s < t
    dt_base = dt_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    dA_base = dA_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    for h in range(0, NHEADS):
        head = pid_b * s_x_b + h * s_x_h
        dout_m = tl.load(dout_ptr + head + (start + offs_m)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                         mask=m_ok[:, None], other=0.0)
        xT = tl.load(x_ptr + head + (start + offs_k)[None, :] * s_x_l + offs_p[:, None] * s_x_p,
                     mask=k_ok[None, :], other=0.0)                                   # (P, Q)
        dA_m = tl.load(dA_base + h * s_dt_h + offs_m * s_dt_q, mask=m_ok, other=0.0)
        dA_k = tl.load(dA_base + h * s_dt_h + offs_k * s_dt_q, mask=k_ok, other=0.0)
        dt_k = tl.load(dt_base + h * s_dt_h + offs_k * s_dt_q, mask=k_ok, other=0.0)
        pair = tl.dot(dout_m, xT) * cb * dt_k[None, :] * tl.exp(tl.minimum(dA_m[:, None] - dA_k[None, :], 0.0))
        pair = tl.where(strictly_below, pair, 0.0)
        # column j-1 of the running sum over s, kept where t >= j: sum_{s < j} M[t, s]
        upto = tl.where(strictly_below, tl.cumsum(pair, axis=1), 0.0)
        ddA_shifted = tl.sum(upto, axis=0)                   # index s holds ddA[s + 1]
        part = part_ptr + pid_b * s_pt_b + h * s_pt_h + pid_c * s_pt_c + pid_m * s_pt_m
        tl.store(part + 1 + offs_k, ddA_shifted, mask=offs_k < Q - 1)


def ddacs_all_heads(cb, x, dout, dt, dA):
    """The ddA pass (formula above) -> ddA: (b, H, nchunks, Q) float32."""
    batch, seqlen, nheads, p = x.shape
    _, nchunks, groups, q, _ = cb.shape
    assert groups == 1, "one group (SSD4Rec's setting) only"
    assert dt.stride() == dA.stride() and dout.stride() == x.stride()
    # per (b, head, chunk, row block); sized for the narrowest row block any config uses
    parts = torch.zeros(batch, nheads, nchunks, triton.cdiv(q, 16), q, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(q, meta["BLOCK_M"]), nchunks, batch)  # noqa: E731
    _ddacs_all_heads_kernel[grid](
        cb, x, dout, dt, dA, parts, seqlen,
        cb.stride(0), cb.stride(1), cb.stride(3), cb.stride(4),
        *x.stride(), *dt.stride(), *parts.stride()[:4],
        NHEADS=nheads, Q=q, P=p)
    return parts.sum(dim=3)


def reference_ddacs(cb, x, dout, dt, dA):
    """The ddA pass's formula as a loop over chunks, in float64."""
    batch, seqlen, nheads, p = x.shape
    q = cb.shape[-1]
    ddA = torch.zeros(dt.shape, dtype=torch.float64)
    for c in range(cb.shape[1]):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        w = hi - lo
        a = dA[:, :, c, :w].double()
        dots = torch.einsum("bthp,bshp->bhts", dout[:, lo:hi].double(), x[:, lo:hi].double())
        pair = dots * cb[:, c, 0, None, :w, :w].double() * dt[:, :, c, None, :w].double()
        pair = torch.tril(pair * torch.exp(torch.clamp(a[..., :, None] - a[..., None, :], max=0.0)), diagonal=-1)
        for j in range(1, w):
            ddA[:, :, c, j] = pair[..., j:, :j].sum(dim=(-1, -2))
    return ddA


# float32 in the interpreter; on a GPU, Triton's float32 dots run in TF32 (10-bit mantissa)
TOLERANCE = {"cpu": 1e-5, "cuda": 5e-3}


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def check(device="cpu", dtype=torch.float32, seed=0):
    """The kernel against the float64 loop on a few small shapes; returns the worst error."""
    worst = 0.0
    for (batch, seqlen, nheads, p, n, q) in ((2, 100, 3, 16, 16, 32), (1, 64, 2, 16, 32, 64), (1, 37, 1, 16, 16, 16)):
        inputs = random_inputs(batch, seqlen, nheads, p, n, q, 9, device, dtype, torch.Generator().manual_seed(seed))
        if seqlen == 37:  # one shape without the D term (the kernel's HAS_D=False variant)
            inputs = (*inputs[:6], None, inputs[7])
        out = scan_out_all_heads(*inputs)
        assert torch.isfinite(out).all()
        worst = max(worst, rel_err(out, reference(*(None if t is None else t.cpu() for t in inputs))))
    return worst


def check_dx(device="cpu", dtype=torch.float32, seed=0):
    """The dx prototype against its float64 loop (dx, ddt and dD); returns the worst error."""
    worst = 0.0
    for (batch, seqlen, nheads, p, n, q) in ((2, 100, 3, 16, 16, 32), (1, 64, 2, 16, 32, 64), (1, 37, 1, 16, 16, 16)):
        inputs = random_dx_inputs(batch, seqlen, nheads, p, n, q, 9, device, dtype, torch.Generator().manual_seed(seed))
        if seqlen == 37:  # one shape without the D term
            inputs = (*inputs[:7], None, inputs[8])
        ours = dx_all_heads(*inputs)
        ref = reference_dx(*(None if t is None else t.cpu() for t in inputs))
        for a, r in zip(ours, ref):
            if r is not None:
                assert torch.isfinite(a).all()
                worst = max(worst, rel_err(a, r))
    return worst


def compare(name, theirs, ours, repeats):
    """Relative differences of each output, then both timed in alternating rounds (median ms)."""
    out_theirs, out_ours = theirs(), ours()
    out_theirs = out_theirs if isinstance(out_theirs, tuple) else (out_theirs,)
    out_ours = out_ours if isinstance(out_ours, tuple) else (out_ours,)
    errs = [rel_err(a, b) for a, b in zip(out_ours, out_theirs) if b is not None]
    times = {"mamba_ssm": [], "all heads": []}
    for _ in range(3):
        for who, fn in (("mamba_ssm", theirs), ("all heads", ours)):
            times[who].append(triton.testing.do_bench(fn, warmup=25, rep=repeats * 5, return_mode="median"))
    t_theirs, t_ours = (statistics.median(times[k]) for k in ("mamba_ssm", "all heads"))
    print(f"{name}: mamba_ssm {t_theirs:.3f} ms, all heads {t_ours:.3f} ms ({t_ours / t_theirs:.2f}x), "
          f"relative difference {' / '.join(f'{e:.2e}' for e in errs)} (bf16)", flush=True)


# --------------------------------------------------------------------------------------------
# The whole scan backward with the prototypes in place of mamba_ssm's per-head kernels (GPU)
# --------------------------------------------------------------------------------------------
def scan_backward(dy, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, all_heads=True):
    """Gradients (dx, ddt, dA, dB, dC, dD, ddt_bias) of the SSD scan without z, one group and no
    initial state: the steps of mamba_ssm 2.3.2's ``_mamba_chunk_scan_combined_bwd`` (recompute
    the forward's cumsum, C·Bᵀ and states; dstates through the state passing; then each input's
    gradient), with ``dx_all_heads`` and ``ddacs_all_heads`` for its two per-head C·Bᵀ kernels
    when ``all_heads``. For timing the prototypes end to end; dt_softplus on, no dt limit.
    dy, x: (b, l, H, P); dt: (b, l, H); A, D, dt_bias: (H,); B, C: (b, l, 1, N); seq_idx: (b, l)."""
    import mamba_ssm.ops.triton.ssd_combined as m

    batch, seqlen, nheads, p = x.shape
    n = B.shape[-1]
    dA_cs, dt_soft = m._chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=True)
    CB = m._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    nchunks = CB.shape[1]
    chunk_states = m._chunk_state_fwd(B, x, dt_soft, dA_cs, seq_idx=seq_idx, states_in_fp32=True)
    states_in, _ = m._state_passing_fwd(chunk_states.reshape(batch, nchunks, nheads, p * n), dA_cs[:, :, :, -1],
                                        seq_idx=seq_idx, chunk_size=chunk_size)
    # the gradient reaching each chunk's outgoing state, through the state passing
    dstates_out = m._chunk_scan_bwd_dstates(C, dA_cs, dy, seq_idx=seq_idx, dtype=states_in.dtype)
    dstates, ddA_chunk_end, _, states_in = m._state_passing_bwd(
        states_in, dA_cs[:, :, :, -1], dstates_out.reshape(batch, nchunks, nheads, p * n), seq_idx=seq_idx,
        has_initial_states=False, dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk_size)
    states_in = states_in.reshape(batch, nchunks, nheads, p, n)
    dstates = dstates.reshape(batch, nchunks, nheads, p, n)
    if all_heads:
        dx, ddt_soft, dD = dx_all_heads(CB, x, dy, dt_soft, dA_cs, B, dstates, D, seq_idx)
    else:
        dx, ddt_soft, dD = m._chunk_scan_chunk_state_bwd_dx(x, dt_soft, dA_cs, B, CB, dy, dstates, D=D, seq_idx=seq_idx)
    dB_states, ddA_from_states = m._chunk_state_bwd_db(x, dt_soft, dA_cs, dstates, seq_idx=seq_idx, B=B, ngroups=1)
    dC_states, ddA_into_chunk = m._chunk_scan_bwd_dC(states_in, dA_cs, dy, seq_idx=seq_idx, C=C, ngroups=1)
    dCB = m._chunk_scan_bwd_dcb(x, dt_soft, dA_cs, dy, seq_idx=seq_idx, ngroups=1).to(CB.dtype)
    dB = m._bmm_chunk_bwd(C, dCB, residual=dB_states, out=torch.empty_like(B))
    dC = m._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_states, out=torch.empty_like(C))
    ddA_into_chunk[..., -1] += ddA_chunk_end
    ddA = ddacs_all_heads(CB, x, dy, dt_soft, dA_cs) if all_heads else m._chunk_scan_bwd_ddAcs_stable(x, dt_soft, dA_cs, dy, CB)
    ddA += ddA_from_states + ddA_into_chunk.flip([-1]).cumsum(dim=-1).flip([-1])
    ddt, dA, ddt_bias = m._chunk_cumsum_bwd(ddA, ddt_soft, dt, A, dt_bias=dt_bias, dt_softplus=True)
    return dx, ddt, dA, dB, dC, dD, ddt_bias


def check_ddacs(device="cpu", dtype=torch.float32, seed=0):
    """The ddA prototype against its float64 loop; returns the worst error."""
    worst = 0.0
    for (batch, seqlen, nheads, p, n, q) in ((2, 100, 3, 16, 16, 32), (1, 64, 2, 16, 32, 64), (1, 37, 1, 16, 16, 16)):
        cb, x, dout, dt, dA, *_ = random_dx_inputs(batch, seqlen, nheads, p, n, q, 9, device, dtype,
                                                  torch.Generator().manual_seed(seed))
        ours = ddacs_all_heads(cb, x, dout, dt, dA)
        assert torch.isfinite(ours).all()
        worst = max(worst, rel_err(ours, reference_ddacs(*(t.cpu() for t in (cb, x, dout, dt, dA)))))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the kernels against the loops (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--passes", nargs="+", default=["fwd", "dx", "ddacs", "backward"],
                    choices=["fwd", "dx", "ddacs", "backward"],
                    help="fwd: the output pass (ssd4rec.ops.ssd_scan_heads); dx, ddacs: the backward's "
                         "prototypes; backward: the whole scan backward with both (GPU only)")
    ap.add_argument("--tokens", type=int, default=245_760)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[128, 256], dest="chunk_sizes")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    checks = {"fwd": check, "dx": check_dx, "ddacs": check_ddacs}
    if args.check or not torch.cuda.is_available():
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("no GPU: run the check with TRITON_INTERPRET=1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if not any(p in checks for p in args.passes):
            sys.exit("--passes backward runs mamba_ssm's kernels: GPU only (no --check)")
        errs = {p: checks[p](device) for p in args.passes if p in checks}
        for p, err in errs.items():
            print(f"{p} kernel vs float64 loop: worst relative error {err:.2e}")
        sys.exit(0 if max(errs.values()) < TOLERANCE[device] else 1)

    from ssd4rec.ops.ssd_scan import _load_triton_scan

    _, error = _load_triton_scan()  # mamba_ssm's import quirk handled there
    if error:
        sys.exit(f"mamba_ssm's Triton scan is not importable: {error}")
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_ddAcs_stable, _chunk_scan_fwd
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx

    for p in args.passes:
        if p in checks:
            print(f"{p} check (fp32, tf32 dots): worst relative error {checks[p]('cuda'):.2e}", flush=True)
    gen = torch.Generator().manual_seed(1)
    length = args.tokens // args.rows
    for q in args.chunk_sizes:
        inputs = random_dx_inputs(args.rows, length, 32, 16, 64, q, 120, "cuda", torch.bfloat16, gen)
        cb, x, dout, dt, dA, BC, states, D, seq_idx = inputs
        if "fwd" in args.passes:  # BC as C, states as the states entering each chunk
            compare(f"chunk {q}, output pass (_chunk_scan_fwd)",
                    lambda: _chunk_scan_fwd(cb, x, dt, dA, BC, states, D=D, seq_idx=seq_idx)[0],
                    lambda: scan_out_all_heads(cb, x, dt, dA, BC, states, D, seq_idx), args.repeats)
        if "dx" in args.passes:  # BC as B, states as dstates; outputs dx, ddt, dD
            compare(f"chunk {q}, dx pass (_chunk_scan_chunk_state_bwd_dx)",
                    lambda: _chunk_scan_chunk_state_bwd_dx(x, dt, dA, BC, cb, dout, states, D=D, seq_idx=seq_idx),
                    lambda: dx_all_heads(*inputs), args.repeats)
        if "backward" in args.passes:  # the scan's own inputs, as the model feeds them under bf16 autocast
            x_, dt_, B_, C_ = (torch.randn(args.rows, length, *shape, generator=gen).to("cuda", torch.bfloat16) * scale
                               for shape, scale in (((32, 16), 1.0), ((32,), 0.5), ((1, 64), 0.125), ((1, 64), 1.0)))
            A_ = -torch.exp(torch.rand(32, generator=gen) * 2.7).cuda()
            D_, bias_ = torch.randn(32, generator=gen).cuda(), (torch.randn(32, generator=gen) * 0.5).cuda()
            dy_ = torch.randn(x_.shape, generator=gen).to("cuda", torch.bfloat16)
            args_ = (dy_, x_, dt_, A_, B_, C_, q, D_, bias_, seq_idx)
            # first, that scan_backward's own steps are mamba_ssm's backward (bit for bit, up to
            # its nondeterministic atomics)
            from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd
            grads = _mamba_chunk_scan_combined_bwd(dy_, x_, dt_, A_, B_, C_, torch.empty_like(x_), q, D=D_,
                                                   dt_bias=bias_, seq_idx=seq_idx, dt_softplus=True)
            theirs = [grads[i] for i in (0, 1, 2, 3, 4, 5, 7)]
            print(f"chunk {q}: scan_backward(all_heads=False) against _mamba_chunk_scan_combined_bwd: "
                  + " / ".join(f"{rel_err(a, b):.1e}" for a, b in zip(scan_backward(*args_, all_heads=False), theirs)),
                  flush=True)
            compare(f"chunk {q}, whole scan backward (dx, ddt, dA, dB, dC, dD, ddt_bias)",
                    lambda: scan_backward(*args_, all_heads=False), lambda: scan_backward(*args_), args.repeats)
        if "ddacs" in args.passes:
            compare(f"chunk {q}, ddA pass (_chunk_scan_bwd_ddAcs_stable)",
                    lambda: _chunk_scan_bwd_ddAcs_stable(x, dt, dA, dout, cb),
                    lambda: ddacs_all_heads(cb, x, dout, dt, dA), args.repeats)


if __name__ == "__main__":
    main()
