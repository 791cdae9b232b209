"""The SSD scan with its forward output pass and the backward's passes over token pairs computed
for all heads of a chunk in one program.

Why. At SSD4Rec's shapes (32 heads of 16 channels, one group, d_state 64) mamba_ssm's
``_chunk_scan_fwd`` runs one Triton program per (chunk, head) with the heads outermost in its
grid, so every program reloads its chunk's (q, q) C·Bᵀ block, which is the same for all heads,
after it has left the L2 cache. The kernel here loads each chunk's C·Bᵀ rows and C once and
loops over the heads. On one H100, bf16, at the ML-1M step's shape (245,760 tokens, mean
history 120), it takes 1.04 ms against mamba_ssm's 1.96 ms at chunk 128 and 2.05 against
2.48 ms at chunk 256 (``scripts/bench_scan_heads.py``, results/MEASUREMENTS.md).

The backward's largest kernel, mamba_ssm's ``_chunk_scan_chunk_state_bwd_dx`` (dx, ddt, dD),
reloaded C·Bᵀ per head in the same way, and three more of its kernels read the same tiles:
``pair_grads_all_heads`` below does the work of all four in one program per chunk block (4.83
against 6.31 ms at chunk 128, same script and shape; its formulas are above its kernel).

``state_grads_all_heads`` does the same for the backward's two passes over the chunk states
(mamba_ssm's ``_chunk_scan_bwd_dstates`` and ``_chunk_scan_bwd_dC``: 0.52 against 1.29 ms),
``chunk_states_all_heads`` for the forward's chunk states (``_chunk_state_fwd``, which reloads
B per head: 0.27 against 0.68 ms at chunk 128, 0.37 against 0.79 at chunk 64).
``ssd4rec.ops.state_passing`` replaces the serial state passing in both directions, and
``ssd4rec.ops.ddA_steps`` sums the decays' gradient from its parts and takes its reverse
cumulative sum in one kernel.

Everything else is mamba_ssm's: the chunk cumsum and C·Bᵀ in the forward (kept, with the
states, for the backward, which mamba_ssm computes again), and the backward's C·Bᵀ products
and cumsum steps, taken in the order of its ``_mamba_chunk_scan_combined_bwd`` (``_backward``).
``ssd_scan(backend="triton_heads")`` and ``ssd_scan_xbc`` (which takes [x | B | C] whole and
returns its gradient as one tensor) are the entry points; they support what SSD4Rec uses: one
group, D of shape (h,) or none, no z, no initial state.

What the kernel computes, for chunk c of a row, rows t and columns s of the chunk, head h:

    y[t, h] = sum_{s <= t} CB[t, s] * exp(min(dA[h, t] - dA[h, s], 0)) * dt[h, s] * x[s, h]
              + [seq(t) == seq(first token of c - 1)] * exp(dA[h, t]) * C[t] . state_in[c, h]
              + D[h] * x[t, h]

    CB: (b, nchunks, 1, q, q) float32, C[t]·B[s], already 0 across sequences
    x: (b, l, h, p); dt, dA (the chunk's cumulative dt*A): (b, h, nchunks, q) float32
    C: (b, l, 1, n); state_in: (b, nchunks, h, p, n); D: (h,); seq: (b, l) int32

Imported lazily (it needs triton and mamba_ssm): see ``ssd_scan._load_triton_heads_scan``.
"""

import os
import sys

import torch
import triton
import triton.language as tl

from ssd4rec.ops.ddA_steps import ddA_steps
from ssd4rec.ops.ssd_scan import all_heads_shapes_supported
from ssd4rec.ops.state_passing import state_passing_bwd, state_passing_fwd

# One config under Triton's CPU interpreter (tests): its autotuner would need a GPU to time.
# Used by both kernels of this module.
AUTOTUNE_CONFIGS = ([triton.Config({"BLOCK_M": 16})] if os.environ.get("TRITON_INTERPRET") == "1" else
                    [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
                     for m in (16, 32, 64) for w in (2, 4, 8) for s in (1, 2)])

# Triton compiles a kernel again for every new pattern of its integer arguments (== 1, divisible
# by 16). The token count and seq_idx's row stride change with every batch, and in an ML-1M
# benchmark the first batch whose count was a multiple of 16 cost a ~2 s recompile of both
# kernels in the middle of a timed round. The token count only bounds masks, and the stride
# only offsets the few int32 seq_idx loads of a program, where alignment buys nothing, so both
# kernels are compiled once, for any value.
UNSPECIALIZED = ["seqlen", "s_seq_b"]


@triton.autotune(configs=AUTOTUNE_CONFIGS, key=["NHEADS", "Q", "P", "N"])
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _scan_out_all_heads_kernel(
    cb_ptr, x_ptr, dt_ptr, dA_ptr, C_ptr, st_ptr, D_ptr, seq_ptr, out_ptr,
    seqlen,
    s_cb_b, s_cb_c, s_cb_m, s_cb_k,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dt_b, s_dt_h, s_dt_c, s_dt_q,
    s_C_b, s_C_l, s_C_n,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_seq_b, s_seq_l,
    s_o_b, s_o_l, s_o_h, s_o_p,
    HAS_D: tl.constexpr,
    NHEADS: tl.constexpr, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program: BLOCK_M rows of one chunk of one batch row, every head."""
    pid_m, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = pid_c * Q
    limit = tl.minimum(Q, seqlen - start)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, Q)
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)
    m_ok, k_ok = offs_m < limit, offs_k < limit

    # What every head shares: this block of C·Bᵀ rows (causal part), C, the sequence ids.
    cb = tl.load(cb_ptr + pid_b * s_cb_b + pid_c * s_cb_c + offs_m[:, None] * s_cb_m + offs_k[None, :] * s_cb_k,
                 mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    cb = tl.where(offs_k[None, :] <= offs_m[:, None], cb, 0.0)
    c_rows = tl.load(C_ptr + pid_b * s_C_b + (start + offs_m)[:, None] * s_C_l + offs_n[None, :] * s_C_n,
                     mask=m_ok[:, None], other=0.0)
    seq_m = tl.load(seq_ptr + pid_b * s_seq_b + (start + offs_m) * s_seq_l, mask=m_ok, other=-1)
    seq_prev = tl.load(seq_ptr + pid_b * s_seq_b + (start - 1) * s_seq_l, mask=pid_c > 0, other=-2)
    carries = (seq_m == seq_prev) & (pid_c > 0)  # the state entering the chunk belongs to row t's sequence

    dt_base = dt_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    dA_base = dA_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    for h in range(0, NHEADS):
        dA_m = tl.load(dA_base + h * s_dt_h + offs_m * s_dt_q, mask=m_ok, other=0.0)
        dA_k = tl.load(dA_base + h * s_dt_h + offs_k * s_dt_q, mask=k_ok, other=0.0)
        dt_k = tl.load(dt_base + h * s_dt_h + offs_k * s_dt_q, mask=k_ok, other=0.0)
        x_h = x_ptr + pid_b * s_x_b + h * s_x_h
        x_k = tl.load(x_h + (start + offs_k)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                      mask=k_ok[:, None], other=0.0)
        # min(., 0): above the diagonal the difference is positive and masked anyway; clamping
        # keeps exp from overflowing to inf, which times the 0 of the mask would be NaN.
        weights = cb * tl.exp(tl.minimum(dA_m[:, None] - dA_k[None, :], 0.0)) * dt_k[None, :]
        acc = tl.dot(weights.to(x_k.dtype), x_k)                                   # (BLOCK_M, P)
        state = tl.load(st_ptr + pid_b * s_st_b + pid_c * s_st_c + h * s_st_h
                        + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p)     # (N, P)
        carry = tl.where(carries, tl.exp(dA_m), 0.0)
        acc += tl.dot(c_rows, state.to(c_rows.dtype)) * carry[:, None]
        if HAS_D:
            x_m = tl.load(x_h + (start + offs_m)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                          mask=m_ok[:, None], other=0.0).to(tl.float32)
            acc += x_m * tl.load(D_ptr + h).to(tl.float32)
        tl.store(out_ptr + pid_b * s_o_b + (start + offs_m)[:, None] * s_o_l + h * s_o_h + offs_p[None, :] * s_o_p,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def scan_out_all_heads(cb, x, dt, dA, C, states, D, seq_idx):
    """The output pass (the module docstring's formula) -> y: (b, l, h, p) in x's dtype.

    cb: (b, nchunks, 1, q, q); x: (b, l, h, p); dt, dA: (b, h, nchunks, q) with equal strides;
    C: (b, l, 1, n); states: (b, nchunks, h, p, n); D: (h,) or None; seq_idx: (b, l) int32.
    """
    batch, seqlen, nheads, p = x.shape
    _, nchunks, groups, q, _ = cb.shape
    n = C.shape[-1]
    if groups != 1 or C.shape[2] != 1:
        raise ValueError(f"the all-heads scan supports one group, got {groups}")
    if dt.stride() != dA.stride():
        raise ValueError("dt and dA must share strides (both come from _chunk_cumsum_fwd)")
    out = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(q, meta["BLOCK_M"]), nchunks, batch)  # noqa: E731
    _scan_out_all_heads_kernel[grid](
        cb, x, dt, dA, C, states, D if D is not None else x, seq_idx, out, seqlen,
        cb.stride(0), cb.stride(1), cb.stride(3), cb.stride(4),
        *x.stride(), *dt.stride(),
        C.stride(0), C.stride(1), C.stride(3),
        *states.stride(), *seq_idx.stride(), *out.stride(),
        HAS_D=D is not None, NHEADS=nheads, Q=q, P=p, N=n)
    return out


# --------------------------------------------------------------------------------------------
# The backward's passes over C·Bᵀ, for all heads of a chunk in one program
# --------------------------------------------------------------------------------------------
# mamba_ssm runs four backward kernels over each chunk's tokens that read the same x, dout and
# dstates, three of them one program per (chunk, head): ``_chunk_scan_chunk_state_bwd_dx`` (dx,
# ddt, dD; the largest kernel of an SSD4Rec training step), ``_chunk_scan_bwd_dcb`` (the
# gradient of C·Bᵀ, a sum over heads), ``_chunk_scan_bwd_ddAcs_stable`` (the decays' gradient)
# and ``_chunk_state_bwd_db`` (B's gradient through the chunk states, and their decays'). This
# kernel reads each chunk's C·Bᵀ once and computes all of it. For token s of chunk c and head h,
# with t over the chunk's tokens, last the chunk's last token, and
#     decay[h, s, t] = exp(min(dA[h, t] - dA[h, s], 0))  (t >= s; 0 otherwise)
#     to_end[h, s]  = [seq(s) == seq(last)] exp(min(dA[h, last] - dA[h, s], 0)):
#
#     g[s, h]  = sum_{t >= s} CB[t, s] decay[h, s, t] dout[t, h] + to_end[h, s] dstates[c, h] B[s]
#     dx[s, h] = g[s, h] dt[h, s] + D[h] dout[s, h]
#     ddt[h, s] = sum_p g[s, h, p] x[s, h, p]            dD[h] = sum_{s, p} dout[s, h, p] x[s, h, p]
#     dCB[t, s] = [seq(t) == seq(s)] sum_h (dout[t, h] . x[s, h]) decay[h, s, t] dt[h, s]
#     dB_states[s] = sum_h to_end[h, s] dt[h, s] x[s, h] dstates[c, h]
#     M[h, s, t] = (dout[t, h] . x[s, h]) CB[t, s] decay[h, s, t] dt[h, s]
#     E[h, s]    = to_end[h, s] dt[h, s] x[s, h] . (dstates[c, h] B[s])
#     ddAcs[h, i] = sum_s M[h, s, i] - sum_t M[h, i, t] - E[h, i] + [i == last] sum_s E[h, s]
#
# ddAcs is the gradient with respect to the cumulative dA itself (dA[t] raises, dA[s] lowers the
# decay of each pair, and dA[last] raises, dA[s] lowers each token's decay to the chunk's end);
# the caller turns it into mamba_ssm's per-step ddA (sum_{s < j <= t} M[h, s, t] + sum_{s < j}
# E[h, s]) with the reverse cumulative sum it already takes for the C term's ddA. Only plain sums
# inside the kernel: the GPU got a cumulative sum after a dot wrong in session 11's prototype.
#
#     CB: (b, nchunks, 1, Q, Q) float32; x, dout: (b, l, H, P); dt, dA: (b, H, nchunks, Q) float32
#     B: (b, l, 1, N); dstates: (b, nchunks, H, P, N); D: (H,); seq: (b, l) int32
@triton.autotune(configs=AUTOTUNE_CONFIGS, key=["NHEADS", "Q", "P", "N"])
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _pair_grads_all_heads_kernel(
    cb_ptr, x_ptr, dout_ptr, dt_ptr, dA_ptr, B_ptr, dst_ptr, D_ptr, seq_ptr,
    dx_ptr, ddt_ptr, dD_ptr, dcbT_ptr, rows_ptr, cols_ptr, dB_ptr,
    seqlen,
    s_cb_b, s_cb_c, s_cb_m, s_cb_k,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_do_b, s_do_l, s_do_h, s_do_p,
    s_dx_b, s_dx_l, s_dx_h, s_dx_p,
    s_dt_b, s_dt_h, s_dt_c, s_dt_q,
    s_B_b, s_B_l, s_B_n,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_seq_b, s_seq_l,
    s_dD_b, s_dD_c, s_dD_m,
    s_rw_b, s_rw_h, s_rw_c, s_rw_m,
    s_dcb_b, s_dcb_c, s_dcb_m,
    s_dB_b, s_dB_l,
    HAS_D: tl.constexpr,
    NHEADS: tl.constexpr, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program: BLOCK_M tokens s of one chunk of one batch row, every head. x, dout and dx
    have strides of their own (dx may be a slice of a wider gradient buffer); ddt and cols share
    dt's; dcbT's rows are the tokens s, its columns t."""
    pid_m, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = pid_c * Q
    limit = tl.minimum(Q, seqlen - start)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # the tokens s
    offs_k = tl.arange(0, Q)                            # the tokens t
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)
    m_ok, k_ok = offs_m < limit, offs_k < limit
    causal = offs_k[None, :] >= offs_m[:, None]

    # Shared by every head: C·Bᵀ transposed (rows s, columns t >= s), B rows, sequence ids.
    cbT = tl.load(cb_ptr + pid_b * s_cb_b + pid_c * s_cb_c + offs_k[None, :] * s_cb_m + offs_m[:, None] * s_cb_k,
                  mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    b_rows = tl.load(B_ptr + pid_b * s_B_b + (start + offs_m)[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                     mask=m_ok[:, None], other=0.0)
    seq_m = tl.load(seq_ptr + pid_b * s_seq_b + (start + offs_m) * s_seq_l, mask=m_ok, other=-1)
    seq_k = tl.load(seq_ptr + pid_b * s_seq_b + (start + offs_k) * s_seq_l, mask=k_ok, other=-2)
    seq_last = tl.load(seq_ptr + pid_b * s_seq_b + (start + limit - 1) * s_seq_l)
    reaches_end = seq_m == seq_last  # token s's sequence is the one whose state leaves the chunk

    dt_base = dt_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    dA_base = dA_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    dcbT = tl.zeros((BLOCK_M, Q), dtype=tl.float32)
    dB = tl.zeros((BLOCK_M, N), dtype=tl.float32)
    for h in range(0, NHEADS):
        dA_m = tl.load(dA_base + h * s_dt_h + offs_m * s_dt_q, mask=m_ok, other=0.0)
        dA_k = tl.load(dA_base + h * s_dt_h + offs_k * s_dt_q, mask=k_ok, other=0.0)
        dA_last = tl.load(dA_base + h * s_dt_h + (limit - 1) * s_dt_q)
        dt_m = tl.load(dt_base + h * s_dt_h + offs_m * s_dt_q, mask=m_ok, other=0.0)
        head = pid_b * s_x_b + h * s_x_h
        dout_head = dout_ptr + pid_b * s_do_b + h * s_do_h
        dout_k = tl.load(dout_head + (start + offs_k)[:, None] * s_do_l + offs_p[None, :] * s_do_p,
                         mask=k_ok[:, None], other=0.0)
        x_m = tl.load(x_ptr + head + (start + offs_m)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                      mask=m_ok[:, None], other=0.0)
        # min(., 0): below the diagonal the difference is positive and masked anyway (see the forward)
        decay = tl.where(causal, tl.exp(tl.minimum(dA_k[None, :] - dA_m[:, None], 0.0)), 0.0)
        acc = tl.dot((cbT * decay).to(dout_k.dtype), dout_k)                        # (BLOCK_M, P)
        dstate = tl.load(dst_ptr + pid_b * s_st_b + pid_c * s_st_c + h * s_st_h
                         + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p)   # (N, P)
        to_end = tl.where(reaches_end, tl.exp(tl.minimum(dA_last - dA_m, 0.0)), 0.0)
        from_state = tl.dot(b_rows, dstate.to(b_rows.dtype)) * to_end[:, None]        # (BLOCK_M, P)
        acc += from_state
        x_m32 = x_m.to(tl.float32)
        dB += tl.dot(x_m, tl.trans(dstate.to(x_m.dtype))) * (to_end * dt_m)[:, None]  # (BLOCK_M, N)
        E = tl.sum(from_state * x_m32, axis=1) * dt_m                                # (BLOCK_M,)
        tl.store(ddt_ptr + pid_b * s_dt_b + pid_c * s_dt_c + h * s_dt_h + offs_m * s_dt_q,
                 tl.sum(acc * x_m32, axis=1), mask=m_ok)
        dx = acc * dt_m[:, None]
        if HAS_D:
            dout_m = tl.load(dout_head + (start + offs_m)[:, None] * s_do_l + offs_p[None, :] * s_do_p,
                             mask=m_ok[:, None], other=0.0).to(tl.float32)
            dx += dout_m * tl.load(D_ptr + h).to(tl.float32)
            # one partial sum per (program, head): the host adds them, no atomics
            tl.store(dD_ptr + pid_b * s_dD_b + pid_c * s_dD_c + pid_m * s_dD_m + h, tl.sum(tl.sum(dout_m * x_m32, axis=1)))
        tl.store(dx_ptr + pid_b * s_dx_b + h * s_dx_h + (start + offs_m)[:, None] * s_dx_l + offs_p[None, :] * s_dx_p,
                 dx.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None])
        # The pairs (s, t): dout[t] . x[s] for this head, then dCB's and ddAcs's terms.
        pair = tl.dot(x_m, tl.trans(dout_k)) * decay * dt_m[:, None]                # (BLOCK_M, Q)
        dcbT += pair
        # ddAcs's terms take the pairs in float32, both from the same values: the reverse
        # cumulative sum that turns them into ddA cancels the large sums of its rows against
        # those of its columns, so any rounding one side does and the other does not is left
        # over. (Session 16 tried the rows from bf16 dots and the columns from ddt, which saved
        # 10 to 18% of the kernel's time: the whole backward's ddt, dA and ddt_bias then
        # differed from mamba_ssm's by 0.06 to 0.8, relative, in bf16.)
        pair *= cbT
        # ddAcs at t: this block's part of sum_s M[s, t] and of sum_s E[s] (the host adds the
        # blocks); at s: the whole of -sum_t M[s, t] - E[s], since every t is in this program.
        tl.store(rows_ptr + pid_b * s_rw_b + h * s_rw_h + pid_c * s_rw_c + pid_m * s_rw_m + offs_k,
                 tl.sum(pair, axis=0) + tl.where(offs_k == limit - 1, tl.sum(E), 0.0))
        tl.store(cols_ptr + pid_b * s_dt_b + pid_c * s_dt_c + h * s_dt_h + offs_m * s_dt_q,
                 -tl.sum(pair, axis=1) - E, mask=offs_m < Q)
    # C·Bᵀ is 0 across sequences whatever C and B are, so its gradient there is 0 too. Rows and
    # columns past the row's end hold 0 (x and dout were loaded as 0 there).
    dcbT = tl.where(seq_m[:, None] == seq_k[None, :], dcbT, 0.0)
    tl.store(dcbT_ptr + pid_b * s_dcb_b + pid_c * s_dcb_c + offs_m[:, None] * s_dcb_m + offs_k[None, :],
             dcbT, mask=offs_m[:, None] < Q)
    tl.store(dB_ptr + pid_b * s_dB_b + (start + offs_m)[:, None] * s_dB_l + offs_n[None, :], dB, mask=m_ok[:, None])


def _pair_grads(cb, x, dout, dt, dA, B, dstates, D, seq_idx, dx=None):
    """``pair_grads_all_heads`` with ddAcs left in its two parts, for ``ddA_steps`` to add: rows:
    (b, H, nchunks, K, Q), the sums over each of the K row blocks of the tuned config; cols: (b,
    H, nchunks, Q)."""
    batch, seqlen, nheads, p = x.shape
    _, nchunks, groups, q, _ = cb.shape
    n = B.shape[-1]
    assert groups == 1 and B.shape[2] == 1, "one group (SSD4Rec's setting) only"
    assert dt.stride() == dA.stride()
    dx = torch.empty_like(x) if dx is None else dx
    ddt = torch.zeros_like(dt)
    cols = torch.empty_like(dt)  # every position written
    # Partial sums per (b, chunk, row block, head) and (b, head, chunk, row block, t), sized for
    # the narrowest row block any config uses. Only the blocks of the config that ran are read:
    # the autotuner runs every config on these buffers, and a config with narrower row blocks
    # leaves sums in slots a wider one does not write (seen on the H100: dD off by 1.6,
    # relative, in the call that autotuned, when all of dD_part was summed).
    dD_part = torch.empty(batch, nchunks, triton.cdiv(q, 16), nheads, device=x.device, dtype=torch.float32)
    rows = torch.empty(batch, nheads, nchunks, triton.cdiv(q, 16), q, device=x.device, dtype=torch.float32)
    dcbT = torch.empty(batch, nchunks, q, q, device=x.device, dtype=torch.float32)
    dB_states = torch.empty(batch, seqlen, 1, n, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(q, meta["BLOCK_M"]), nchunks, batch)  # noqa: E731
    _pair_grads_all_heads_kernel[grid](
        cb, x, dout, dt, dA, B, dstates, D if D is not None else x, seq_idx, dx, ddt, dD_part, dcbT, rows, cols,
        dB_states, seqlen,
        cb.stride(0), cb.stride(1), cb.stride(3), cb.stride(4),
        *x.stride(), *dout.stride(), *dx.stride(), *dt.stride(),
        B.stride(0), B.stride(1), B.stride(3),
        *dstates.stride(), *seq_idx.stride(),
        dD_part.stride(0), dD_part.stride(1), dD_part.stride(2),
        *rows.stride()[:4], *dcbT.stride()[:3], dB_states.stride(0), dB_states.stride(1),
        HAS_D=D is not None, NHEADS=nheads, Q=q, P=p, N=n)
    blocks = triton.cdiv(q, _pair_grads_all_heads_kernel.best_config.kwargs["BLOCK_M"])
    dD = dD_part[:, :, :blocks].sum(dim=(0, 1, 2)) if D is not None else None
    return dx, ddt, dD, dcbT.unsqueeze(2).transpose(-1, -2), dB_states, rows[:, :, :, :blocks], cols


def pair_grads_all_heads(cb, x, dout, dt, dA, B, dstates, D, seq_idx, dx=None):
    """The backward's C·Bᵀ passes (formulas above) for one group.

    dx: where to write x's gradient, (b, l, H, P) of any strides (a view into a buffer that
    holds the gradients of x, B and C side by side), or None for a new tensor.
    Returns dx: (b, l, H, P) in x's dtype; ddt: (b, H, nchunks, Q) float32 (the chunk-local
    part, before mamba_ssm's ``_chunk_cumsum_bwd``); dD: (H,) float32 or None; dCB: (b, nchunks,
    1, Q, Q) float32 as mamba_ssm's ``_chunk_scan_bwd_dcb`` returns it (a transposed view);
    dB_states: (b, l, 1, N) float32, as ``_chunk_state_bwd_db`` returns it; ddAcs: (b, H, nchunks,
    Q) float32, the gradient with respect to dA itself.
    """
    *grads, rows, cols = _pair_grads(cb, x, dout, dt, dA, B, dstates, D, seq_idx, dx)
    return (*grads, rows.sum(dim=3) + cols)


# --------------------------------------------------------------------------------------------
# The backward's passes over the chunk states, for all heads of a chunk in one program
# --------------------------------------------------------------------------------------------
# mamba_ssm's ``_chunk_scan_bwd_dstates`` (one program per chunk and head) and
# ``_chunk_scan_bwd_dC`` (programs per chunk and token block) both read dout, the decays and C
# for the C term of the output, y[t] += [seq(t) == seq(start - 1)] exp(dA[h, t]) C[t] .
# state_in[c, h]. With from_prev[t] = [seq(t) == seq(start - 1)] and c > 0 (the state entering
# chunk 0 is 0, and so is its gradient's use):
#
#     scale[h, t]        = from_prev[t] exp(dA[h, t])
#     dstate_in[c, h]    = sum_t scale[h, t] dout[t, h]^T C[t]                      (P, N)
#     dC_states[t]       = sum_h scale[h, t] dout[t, h] . state_in[c, h]            (N,)
#     ddAcs_in[h, t]     = scale[h, t] (dout[t, h] . state_in[c, h]) . C[t]
#
# dstate_in feeds the state passing's backward, which no longer has to run first: dC reads
# the forward's states, kept. As mamba_ssm, the scaled dout and the states are rounded to
# dout's dtype before their dots.
#
#     C: (b, l, 1, N); dA: (b, H, nchunks, Q) float32; dout: (b, l, H, P);
#     states: (b, nchunks, H, P, N) float32; seq: (b, l) int32
@triton.autotune(configs=[triton.Config({}, num_warps=4)] if os.environ.get("TRITON_INTERPRET") == "1" else
                 [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)],
                 key=["NHEADS", "Q", "P", "N"])
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _state_grads_all_heads_kernel(
    C_ptr, dA_ptr, dout_ptr, st_ptr, seq_ptr, dst_ptr, dC_ptr, ddA_ptr,
    seqlen,
    s_C_b, s_C_l, s_C_n,
    s_dA_b, s_dA_h, s_dA_c, s_dA_q,
    s_do_b, s_do_l, s_do_h, s_do_p,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_seq_b, s_seq_l,
    s_dC_b, s_dC_l,
    NHEADS: tl.constexpr, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
):
    """One program: one chunk of one batch row, every head. dstates shares states' strides, ddA
    dA's; dC is (b, l, N) with unit stride over N."""
    pid_c, pid_b = tl.program_id(0), tl.program_id(1)
    start = pid_c * Q
    limit = tl.minimum(Q, seqlen - start)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)
    q_ok = offs_q < limit
    c_rows = tl.load(C_ptr + pid_b * s_C_b + (start + offs_q)[:, None] * s_C_l + offs_n[None, :] * s_C_n,
                     mask=q_ok[:, None], other=0.0)
    seq_q = tl.load(seq_ptr + pid_b * s_seq_b + (start + offs_q) * s_seq_l, mask=q_ok, other=-1)
    seq_prev = tl.load(seq_ptr + pid_b * s_seq_b + (start - 1) * s_seq_l, mask=pid_c > 0, other=-2)
    from_prev = (seq_q == seq_prev) & (pid_c > 0)
    dC = tl.zeros((Q, N), dtype=tl.float32)
    for h in range(0, NHEADS):
        dA = tl.load(dA_ptr + pid_b * s_dA_b + h * s_dA_h + pid_c * s_dA_c + offs_q * s_dA_q, mask=q_ok, other=0.0)
        scale = tl.where(from_prev, tl.exp(dA), 0.0)
        dout = tl.load(dout_ptr + pid_b * s_do_b + h * s_do_h + (start + offs_q)[:, None] * s_do_l
                       + offs_p[None, :] * s_do_p, mask=q_ok[:, None], other=0.0)
        scaled = (dout.to(tl.float32) * scale[:, None]).to(dout.dtype)
        state_base = pid_b * s_st_b + pid_c * s_st_c + h * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :] * s_st_n
        tl.store(dst_ptr + state_base, tl.dot(tl.trans(scaled), c_rows.to(dout.dtype)))         # (P, N)
        dc = tl.dot(dout, tl.load(st_ptr + state_base).to(dout.dtype)) * scale[:, None]        # (Q, N)
        dC += dc
        tl.store(ddA_ptr + pid_b * s_dA_b + h * s_dA_h + pid_c * s_dA_c + offs_q * s_dA_q,
                 tl.sum(dc * c_rows.to(tl.float32), axis=1))
    tl.store(dC_ptr + pid_b * s_dC_b + (start + offs_q)[:, None] * s_dC_l + offs_n[None, :], dC, mask=q_ok[:, None])


def state_grads_all_heads(C, dA, dout, states, seq_idx):
    """The backward's passes over the chunk states (formulas above) for one group.

    C: (b, l, 1, N); dA: (b, H, nchunks, Q) float32; dout: (b, l, H, P); states: (b, nchunks, H,
    P, N), the states entering each chunk; seq_idx: (b, l) int32. Returns dstates: (b, nchunks,
    H, P, N) float32, the gradient of the state entering each chunk (mamba_ssm's
    ``_chunk_scan_bwd_dstates``, except 0 at chunk 0, whose state is 0); dC_states: (b, l, 1, N)
    float32 and ddAcs: (b, H, nchunks, Q) float32 (``_chunk_scan_bwd_dC``).
    """
    batch, seqlen, nheads, p = dout.shape
    _, _, nchunks, q = dA.shape
    n = C.shape[-1]
    assert C.shape[2] == 1, "one group (SSD4Rec's setting) only"
    states = states if states.is_contiguous() else states.contiguous()
    dstates = torch.empty_like(states, dtype=torch.float32)
    dC = torch.empty(batch, seqlen, 1, n, device=C.device, dtype=torch.float32)
    ddA = torch.empty_like(dA)
    _state_grads_all_heads_kernel[(nchunks, batch)](
        C, dA, dout, states, seq_idx, dstates, dC, ddA, seqlen,
        C.stride(0), C.stride(1), C.stride(3), *dA.stride(), *dout.stride(), *states.stride(), *seq_idx.stride(),
        dC.stride(0), dC.stride(1), NHEADS=nheads, Q=q, P=p, N=n)
    return dstates, dC, ddA


# --------------------------------------------------------------------------------------------
# The forward's chunk states, for all heads of a chunk in one program
# --------------------------------------------------------------------------------------------
# mamba_ssm's ``_chunk_state_fwd`` runs one program per (chunk, head) and so reloads each chunk's
# B for every head. The state a chunk passes on is built from the tokens of its last token's
# sequence only (an earlier sequence's state never leaves the chunk):
#
#     scale[h, s]  = [seq(s) == seq(last)] exp(min(dA[h, last] - dA[h, s], 0)) dt[h, s]
#     u[c, h]      = sum_s (scale[h, s] x[s, h])^T B[s]                              (P, N)
#
# The scaled x is rounded to x's dtype before the dot; mamba_ssm scales and rounds B instead
# (the same single rounding of a product, on the narrower operand: Q x P against Q x N).
#
#     x: (b, l, H, P); B: (b, l, 1, N); dt, dA: (b, H, nchunks, Q) float32; seq: (b, l) int32
@triton.autotune(configs=[triton.Config({}, num_warps=4)] if os.environ.get("TRITON_INTERPRET") == "1" else
                 [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2, 3)],
                 key=["NHEADS", "Q", "P", "N"])
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _chunk_states_all_heads_kernel(
    x_ptr, B_ptr, dt_ptr, dA_ptr, seq_ptr, st_ptr,
    seqlen,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_B_b, s_B_l, s_B_n,
    s_dt_b, s_dt_h, s_dt_c, s_dt_q,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_seq_b, s_seq_l,
    NHEADS: tl.constexpr, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
):
    """One program: one chunk of one batch row, every head. dA shares dt's strides."""
    pid_c, pid_b = tl.program_id(0), tl.program_id(1)
    start = pid_c * Q
    limit = tl.minimum(Q, seqlen - start)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)
    q_ok = offs_q < limit
    b_rows = tl.load(B_ptr + pid_b * s_B_b + (start + offs_q)[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                     mask=q_ok[:, None], other=0.0)
    seq_q = tl.load(seq_ptr + pid_b * s_seq_b + (start + offs_q) * s_seq_l, mask=q_ok, other=-1)
    seq_last = tl.load(seq_ptr + pid_b * s_seq_b + (start + limit - 1) * s_seq_l)
    reaches_end = seq_q == seq_last
    dt_base = dt_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    dA_base = dA_ptr + pid_b * s_dt_b + pid_c * s_dt_c
    for h in range(0, NHEADS):
        dA_q = tl.load(dA_base + h * s_dt_h + offs_q * s_dt_q, mask=q_ok, other=0.0)
        dA_last = tl.load(dA_base + h * s_dt_h + (limit - 1) * s_dt_q)
        dt_q = tl.load(dt_base + h * s_dt_h + offs_q * s_dt_q, mask=q_ok, other=0.0)
        scale = tl.where(reaches_end, tl.exp(tl.minimum(dA_last - dA_q, 0.0)) * dt_q, 0.0)
        x_q = tl.load(x_ptr + pid_b * s_x_b + h * s_x_h + (start + offs_q)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                      mask=q_ok[:, None], other=0.0)
        scaled = (x_q.to(tl.float32) * scale[:, None]).to(x_q.dtype)
        state = tl.dot(tl.trans(scaled), b_rows.to(x_q.dtype))                               # (P, N)
        tl.store(st_ptr + pid_b * s_st_b + pid_c * s_st_c + h * s_st_h + offs_p[:, None] * s_st_p
                 + offs_n[None, :] * s_st_n, state)


def chunk_states_all_heads(x, B, dt, dA, seq_idx):
    """Each chunk's own state (formula above): mamba_ssm's ``_chunk_state_fwd`` with
    ``states_in_fp32=True``, for one group.

    x: (b, l, H, P); B: (b, l, 1, N); dt, dA: (b, H, nchunks, Q) float32 with equal strides;
    seq_idx: (b, l) int32 -> states: (b, nchunks, H, P, N) float32, contiguous.
    """
    batch, seqlen, nheads, p = x.shape
    _, _, nchunks, q = dt.shape
    n = B.shape[-1]
    assert B.shape[2] == 1, "one group (SSD4Rec's setting) only"
    assert dt.stride() == dA.stride()
    states = torch.empty(batch, nchunks, nheads, p, n, device=x.device, dtype=torch.float32)
    _chunk_states_all_heads_kernel[(nchunks, batch)](
        x, B, dt, dA, seq_idx, states, seqlen,
        *x.stride(), B.stride(0), B.stride(1), B.stride(3), *dt.stride(), *states.stride(), *seq_idx.stride(),
        NHEADS=nheads, Q=q, P=p, N=n)
    return states


def _mamba():
    """mamba_ssm.ops.triton.ssd_combined, imported through ``ssd_scan._load_triton_scan`` (which
    handles mamba_ssm's import quirk). Not at the top of this file, so that the kernel above can
    be tested under Triton's CPU interpreter without mamba_ssm."""
    from ssd4rec.ops.ssd_scan import _load_triton_scan

    fn, reason = _load_triton_scan()
    if fn is None:
        raise ImportError(f"mamba_ssm's Triton scan is not importable: {reason}")
    return sys.modules["mamba_ssm.ops.triton.ssd_combined"]


def _chunk_intermediates(x, dt, A, B, C, chunk_size, dt_bias, seq_idx, dt_softplus, dt_limit):
    """The forward's steps before the output pass (no initial state, one group): mamba_ssm's
    chunk cumsum and C·Bᵀ, our chunk states and state passing.

    Returns dA_cs, dt_proc: (b, h, nchunks, q) float32; CB: (b, nchunks, 1, q, q) float32;
    states: (b, nchunks, h, p, n) float32, the state entering each chunk.
    """
    m = _mamba()
    dA_cs, dt_proc = m._chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                         dt_limit=dt_limit)
    states = chunk_states_all_heads(x, B, dt_proc, dA_cs, seq_idx)
    b, c, h, p, n = states.shape
    # float32, as the backward wants them; the output pass rounds them to C's dtype as it loads
    # them, as mamba_ssm's forward stores them (to nearest even either way)
    states = state_passing_fwd(states.reshape(b, c, h, p * n), dA_cs[:, :, :, -1], seq_idx, chunk_size)
    CB = m._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    return dA_cs, dt_proc, CB, states.reshape(b, c, h, p, n)


def _forward(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit):
    """mamba_ssm's ``_mamba_chunk_scan_combined_fwd`` (no z, no initial state) with the output
    pass replaced by ``scan_out_all_heads``. Returns y: (b, l, h, p) and
    ``_chunk_intermediates``' tensors, which the backward reads (mamba_ssm computes them again)."""
    saved = _chunk_intermediates(x, dt, A, B, C, chunk_size, dt_bias, seq_idx, dt_softplus, dt_limit)
    dA_cs, dt_proc, CB, states = saved
    return scan_out_all_heads(CB, x, dt_proc, dA_cs, C, states, D, seq_idx), saved


def _backward(dy, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit, saved=None,
              grads_out=(None, None, None)):
    """Gradients (dx, ddt, dA, dB, dC, dD, ddt_bias): the steps of mamba_ssm 2.3.2's
    ``_mamba_chunk_scan_combined_bwd`` for no z, no initial state and one group, with
    ``pair_grads_all_heads`` in place of its ``_chunk_scan_chunk_state_bwd_dx``,
    ``_chunk_scan_bwd_dcb``, ``_chunk_scan_bwd_ddAcs_stable`` and ``_chunk_state_bwd_db``,
    ``state_grads_all_heads`` in place of its ``_chunk_scan_bwd_dstates`` and
    ``_chunk_scan_bwd_dC``, ``ssd4rec.ops.state_passing`` in place of its serial state
    passing, and ``ssd4rec.ops.ddA_steps`` for the reverse cumulative sum of the decays' gradient.

    saved: ``_chunk_intermediates``' tensors from the forward; None computes them again, as
    mamba_ssm does. grads_out: tensors to write dx, dB and dC into (views of one buffer, see
    ``SSDScanAllHeadsXBC``), None for new ones.
    dy, x: (b, l, h, p); dt: (b, l, h); A, D, dt_bias: (h,); B, C: (b, l, 1, n); seq_idx: (b, l)."""
    m = _mamba()
    batch, seqlen, nheads, p = x.shape
    n = B.shape[-1]
    dx_out, dB_out, dC_out = grads_out
    if dy.stride(-1) != 1:  # as mamba_ssm's entry point; every kernel here takes dy's strides
        dy = dy.contiguous()
    if saved is None:
        saved = _chunk_intermediates(x, dt, A, B, C, chunk_size, dt_bias, seq_idx, dt_softplus, dt_limit)
    dA_cs, dt_proc, CB, states = saved
    nchunks = CB.shape[1]
    # The C term's gradients: of the state entering each chunk, of C, of the decays; then the
    # state gradients through the state passing.
    dstates, dC_states, ddAcs_into_chunk = state_grads_all_heads(C, dA_cs, dy, states, seq_idx)
    dstates, ddA_chunk_end = state_passing_bwd(
        states.reshape(batch, nchunks, nheads, p * n), dA_cs[:, :, :, -1],
        dstates.reshape(batch, nchunks, nheads, p * n), seq_idx, chunk_size, x.dtype)
    dstates = dstates.reshape(batch, nchunks, nheads, p, n)
    dx, ddt_proc, dD, dCB, dB_states, ddAcs_rows, ddAcs_cols = _pair_grads(CB, x, dy, dt_proc, dA_cs, B, dstates,
                                                                           D, seq_idx, dx=dx_out)
    dB = m._bmm_chunk_bwd(C, dCB, residual=dB_states, out=torch.empty_like(B) if dB_out is None else dB_out)
    dC = m._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_states,
                          out=torch.empty_like(C) if dC_out is None else dC_out)
    # Gradients with respect to the cumulative dA, turned into per-step ones by a reverse
    # cumulative sum (dA_cs[j] is the sum of the steps up to j), in one kernel.
    ddA = ddA_steps(ddAcs_rows, ddAcs_cols, ddAcs_into_chunk, ddA_chunk_end)
    ddt, dA, ddt_bias = m._chunk_cumsum_bwd(ddA, ddt_proc, dt, A, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                            dt_limit=dt_limit)
    return dx, ddt, dA, dB, dC, dD, ddt_bias


class SSDScanAllHeads(torch.autograd.Function):
    """Forward: ``_forward``; backward: ``_backward`` with the forward's chunk cumsum, C·Bᵀ and
    states kept (about 0.45 GB per layer at an ML-1M batch of 1,024 histories of at most 200,
    both directions), where mamba_ssm computes them again."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit):
        y, saved = _forward(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seq_idx, *saved)
        ctx.settings = (chunk_size, dt_softplus, dt_limit)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, B, C, D, dt_bias, seq_idx, *saved = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit = ctx.settings
        dx, ddt, dA, dB, dC, dD, ddt_bias = _backward(dy, x, dt, A, B, C, chunk_size, D, dt_bias,
                                                      seq_idx, dt_softplus, dt_limit, saved)
        return dx, ddt, dA, dB, dC, None, dD, ddt_bias, None, None, None


def _split_xbc(xBC, nheads, headdim):
    """xBC: (b, l, h*p + 2n), the convolution's output [x | B | C] for one group -> views x: (b, l,
    h, p), B, C: (b, l, 1, n)."""
    d_inner = nheads * headdim
    d_state = (xBC.shape[-1] - d_inner) // 2
    x, B, C = torch.split(xBC, [d_inner, d_state, d_state], dim=-1)
    return x.unflatten(-1, (nheads, headdim)), B.unsqueeze(2), C.unsqueeze(2)


class SSDScanAllHeadsXBC(torch.autograd.Function):
    """``SSDScanAllHeads`` on [x | B | C] as one tensor (the convolution's output), so that the
    backward writes dx, dB and dC side by side into one gradient. Split outside, autograd would
    concatenate the three: a copy of the whole (b, l, h*p + 2n) gradient per layer, and one
    more of x, which mamba_ssm's kernels wanted with dy's strides (about 1.9 ms of a 34 ms
    ML-1M step on the H100, session 14's profile)."""

    @staticmethod
    def forward(ctx, xBC, dt, A, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit, headdim):
        x, B, C = _split_xbc(xBC, dt.shape[-1], headdim)
        y, saved = _forward(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit)
        ctx.save_for_backward(xBC, dt, A, D, dt_bias, seq_idx, *saved)
        ctx.settings = (chunk_size, dt_softplus, dt_limit, headdim)
        return y

    @staticmethod
    def backward(ctx, dy):
        xBC, dt, A, D, dt_bias, seq_idx, *saved = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit, headdim = ctx.settings
        nheads = dt.shape[-1]
        x, B, C = _split_xbc(xBC, nheads, headdim)
        dxBC = torch.empty_like(xBC, memory_format=torch.contiguous_format)
        _, ddt, dA, _, _, dD, ddt_bias = _backward(dy, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus,
                                                   dt_limit, saved, grads_out=_split_xbc(dxBC, nheads, headdim))
        return dxBC, ddt, dA, None, dD, ddt_bias, None, None, None, None


def _check_supported(ngroups, D, headdim, d_state, chunk_size):
    if not all_heads_shapes_supported(headdim, d_state, chunk_size):
        raise ValueError(f"ssd_scan(backend='triton_heads') needs headdim, d_state and chunk_size "
                         f"to be powers of two of at least 16 (its kernels' tiles), got {headdim}, "
                         f"{d_state} and {chunk_size}; use backend='triton'")
    if ngroups != 1:
        raise ValueError(f"ssd_scan(backend='triton_heads') supports one group (ngroups=1), got "
                         f"{ngroups}; use backend='triton'")
    if D is not None and D.dim() != 1:
        raise ValueError(f"ssd_scan(backend='triton_heads') takes D of shape (h,), got "
                         f"{tuple(D.shape)}; use backend='triton'")


def _seq_idx_or_zeros(seq_idx, shape, device):
    if seq_idx is None:
        return torch.zeros(shape, dtype=torch.int32, device=device)
    return seq_idx.to(torch.int32).contiguous()


def ssd_scan_all_heads(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, seq_idx=None,
                       dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """``mamba_chunk_scan_combined``'s signature and result, for what this kernel supports.

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, 1, n); D: (h,) or None;
    seq_idx: (b, l) int or None (one sequence per row) -> y: (b, l, h, p).
    """
    if z is not None:
        raise ValueError("ssd_scan(backend='triton_heads') does not take z (SSD4Rec gates after "
                         "the scan); use backend='triton'")
    _check_supported(B.shape[2], D, x.shape[-1], B.shape[-1], chunk_size)
    # The layouts mamba_ssm's kernels expect (as in its own entry point).
    B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (B, C))
    if x.stride(-1) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    return SSDScanAllHeads.apply(x, dt, A, B, C, chunk_size, D, dt_bias,
                                 _seq_idx_or_zeros(seq_idx, x.shape[:2], x.device), dt_softplus, dt_limit)


def ssd_scan_all_heads_xbc(xBC, dt, A, headdim, chunk_size, D=None, dt_bias=None, seq_idx=None,
                           dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """``ssd_scan_all_heads`` on the convolution's output [x | B | C] (one group), whose gradient
    comes back as one tensor (``SSDScanAllHeadsXBC``).

    xBC: (b, l, h*p + 2n); dt: (b, l, h); A: (h,); D: (h,) or None; seq_idx: (b, l) or None
    -> y: (b, l, h, p).
    """
    _check_supported(1, D, headdim, (xBC.shape[-1] - dt.shape[-1] * headdim) // 2, chunk_size)
    if xBC.stride(-1) != 1:
        xBC = xBC.contiguous()
    return SSDScanAllHeadsXBC.apply(xBC, dt, A, chunk_size, D, dt_bias,
                                    _seq_idx_or_zeros(seq_idx, xBC.shape[:2], xBC.device), dt_softplus, dt_limit,
                                    headdim)
