"""The SSD scan's chunk-to-chunk state passing as a parallel scan over chunks.

The chunked SSD scan carries one state per (row, head) from chunk to chunk:

    S[c] = a[c] * S[c - 1] + u[c]        a[c] = exp(dA_last[c]) * [seq(c) == seq(c - 1)]

with u[c] the state chunk c builds from its own tokens (``_chunk_state_fwd``), dA_last[c] the
chunk's summed dt * A, and seq(c) the sequence of chunk c's last token: a state never passes
into another packed sequence. The output pass reads out[c] = S[c - 1], the state entering chunk
c (out[0] = 0: no initial state).

Why. mamba_ssm's ``_state_passing_fwd`` and ``_bwd`` loop over the chunks one after another in
each program (one per row, head and block of the state's channels). SSD4Rec packs a whole
batch into one row per direction, so that loop is about 950 chunks long at an ML-1M batch
(chunk 128) and only 2 x 32 x 16 programs share the GPU: each step waits on the load before it.
The recurrence is associative, ((a1, u1) then (a2, u2)) = (a1 a2, a2 u1 + u2), so the kernels
here take CHUNKS chunks at a time with ``tl.associative_scan`` and carry only the last state
from one tile of chunks to the next.

The backward runs the same recurrence from the end. With D[c] = dL/dS[c] and dout[c] = dL/dout[c]:

    D[c] = a[c + 1] * D[c + 1] + dout[c + 1]      (D[last] = 0: no final-state gradient)
    du[c] = D[c]                                  (the gradient of chunk c's own state)
    ddA_last[c] = a[c] * sum_channels(D[c] * out[c])

Shapes: states, u, dout: (b, nchunks, h, dim) with dim = headdim * d_state; dA_last: (b, h,
nchunks) float32; seq_idx: (b, l) int32. Same arguments and results as mamba_ssm's functions for
no initial and no final state (``state_passing_fwd``, ``state_passing_bwd``).
"""

import os

import torch
import triton
import triton.language as tl

# Channels per program; fixed (not tuned) so that ddA's partial sums per channel block always
# cover the same blocks.
BLOCK_DIM = 64
# The CPU interpreter (tests) runs one small config; its autotuner would need a GPU to time.
AUTOTUNE_CONFIGS = ([triton.Config({"CHUNKS": 16})] if os.environ.get("TRITON_INTERPRET") == "1" else
                    [triton.Config({"CHUNKS": c}, num_warps=w) for c in (32, 64, 128) for w in (2, 4, 8)])
# As in ssd_scan_heads: the chunk count and seq_idx's row stride change with every batch and
# only bound masks or offset a few loads, so they are not specialised on.
UNSPECIALIZED = ["nchunks", "seqlen", "s_seq_b"]


@triton.jit
def _linear_combine(a_left, u_left, a_right, u_right):
    """(a_left, u_left) followed by (a_right, u_right) for S -> a S + u."""
    return a_left * a_right, a_right * u_left + u_right


@triton.jit
def _decay(dA_ptr, seq_ptr, chunk, nchunks, seqlen, chunk_size, s_dA_c, s_seq_l):
    """a[chunk] (see the module docstring) for a vector of chunk indices; 0 outside 1..nchunks-1."""
    ok = (chunk >= 1) & (chunk < nchunks)
    dA = tl.load(dA_ptr + chunk * s_dA_c, mask=ok, other=0.0).to(tl.float32)
    seq_end = tl.load(seq_ptr + (tl.minimum((chunk + 1) * chunk_size, seqlen) - 1) * s_seq_l, mask=ok, other=0)
    seq_before = tl.load(seq_ptr + (chunk * chunk_size - 1) * s_seq_l, mask=ok, other=-1)
    return tl.where(ok & (seq_end == seq_before), tl.exp(dA), 0.0)


@triton.autotune(configs=AUTOTUNE_CONFIGS, key=["dim"])
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _state_passing_fwd_kernel(
    u_ptr, out_ptr, dA_ptr, seq_ptr,
    dim, nchunks, seqlen, chunk_size,
    s_u_b, s_u_c, s_u_h, s_u_d,
    s_out_b, s_out_c, s_out_h, s_out_d,
    s_dA_b, s_dA_h, s_dA_c,
    s_seq_b, s_seq_l,
    BLOCK_DIM: tl.constexpr, CHUNKS: tl.constexpr,
):
    """One program: one row, one head, BLOCK_DIM channels, every chunk CHUNKS at a time."""
    pid_d, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    d_ok = offs_d < dim
    u_base = u_ptr + pid_b * s_u_b + pid_h * s_u_h + offs_d[None, :] * s_u_d
    out_base = out_ptr + pid_b * s_out_b + pid_h * s_out_h + offs_d[None, :] * s_out_d
    dA_base = dA_ptr + pid_b * s_dA_b + pid_h * s_dA_h
    seq_base = seq_ptr + pid_b * s_seq_b
    tl.store(out_ptr + pid_b * s_out_b + pid_h * s_out_h + offs_d * s_out_d, tl.zeros((BLOCK_DIM,), dtype=tl.float32),
             mask=d_ok)  # no initial state
    carry = tl.zeros((BLOCK_DIM,), dtype=tl.float32)  # S[first chunk of the tile - 1]
    for first in range(0, nchunks, CHUNKS):
        chunk = first + tl.arange(0, CHUNKS)
        c_ok = chunk < nchunks
        u = tl.load(u_base + chunk[:, None] * s_u_c, mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        a = _decay(dA_base, seq_base, chunk, nchunks, seqlen, chunk_size, s_dA_c, s_seq_l)
        decay_from_start, local = tl.associative_scan((tl.broadcast_to(a[:, None], (CHUNKS, BLOCK_DIM)), u), 0,
                                                      _linear_combine)
        states = local + decay_from_start * carry[None, :]  # S[chunk]
        # S[chunk] enters chunk + 1
        tl.store(out_base + (chunk + 1)[:, None] * s_out_c, states, mask=(chunk + 1 < nchunks)[:, None] & d_ok[None, :])
        # Past the last chunk a = 0 and u = 0, so only the tile's last real chunk is kept here.
        carry = tl.sum(tl.where((chunk == tl.minimum(first + CHUNKS, nchunks) - 1)[:, None], states, 0.0), axis=0)


@triton.autotune(configs=AUTOTUNE_CONFIGS, key=["dim"])
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _state_passing_bwd_kernel(
    out_ptr, dout_ptr, dA_ptr, seq_ptr, du_ptr, ddA_ptr,
    dim, nchunks, seqlen, chunk_size,
    s_out_b, s_out_c, s_out_h, s_out_d,
    s_dout_b, s_dout_c, s_dout_h, s_dout_d,
    s_dA_b, s_dA_h, s_dA_c,
    s_seq_b, s_seq_l,
    s_ddA_b, s_ddA_h, s_ddA_c,
    BLOCK_DIM: tl.constexpr, CHUNKS: tl.constexpr,
):
    """One program: one row, one head, BLOCK_DIM channels, every chunk from the last, CHUNKS at a
    time. du shares out's strides; ddA gets this program's channels' partial sum."""
    pid_d, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    d_ok = offs_d < dim
    out_base = out_ptr + pid_b * s_out_b + pid_h * s_out_h + offs_d[None, :] * s_out_d
    du_base = du_ptr + pid_b * s_out_b + pid_h * s_out_h + offs_d[None, :] * s_out_d
    dout_base = dout_ptr + pid_b * s_dout_b + pid_h * s_dout_h + offs_d[None, :] * s_dout_d
    dA_base = dA_ptr + pid_b * s_dA_b + pid_h * s_dA_h
    seq_base = seq_ptr + pid_b * s_seq_b
    ddA_base = ddA_ptr + pid_b * s_ddA_b + pid_h * s_ddA_h + pid_d
    carry = tl.zeros((BLOCK_DIM,), dtype=tl.float32)  # D[last chunk of the tile + 1]
    for done in range(0, nchunks, CHUNKS):
        # Row i of the tile is chunk last - done - i: the scan runs from the end.
        chunk = nchunks - 1 - done - tl.arange(0, CHUNKS)
        c_ok = chunk >= 0
        mask = c_ok[:, None] & d_ok[None, :]
        # D[chunk] = a[chunk + 1] D[chunk + 1] + dout[chunk + 1]; both 0 past the last chunk.
        a_next = _decay(dA_base, seq_base, chunk + 1, nchunks, seqlen, chunk_size, s_dA_c, s_seq_l)
        dout_next = tl.load(dout_base + (chunk + 1)[:, None] * s_dout_c,
                            mask=(c_ok & (chunk + 1 < nchunks))[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        decay_from_start, local = tl.associative_scan(
            (tl.broadcast_to(a_next[:, None], (CHUNKS, BLOCK_DIM)), dout_next), 0, _linear_combine)
        grads = local + decay_from_start * carry[None, :]  # D[chunk]
        tl.store(du_base + chunk[:, None] * s_out_c, grads.to(du_ptr.dtype.element_ty), mask=mask)
        out = tl.load(out_base + chunk[:, None] * s_out_c, mask=mask, other=0.0).to(tl.float32)
        a = _decay(dA_base, seq_base, chunk, nchunks, seqlen, chunk_size, s_dA_c, s_seq_l)
        tl.store(ddA_base + chunk * s_ddA_c, a * tl.sum(grads * out, axis=1), mask=c_ok)
        # Before the first chunk a = 0 and dout = 0, so the tile's last row keeps D[first chunk].
        carry = tl.sum(tl.where((chunk == tl.maximum(nchunks - done - CHUNKS, 0))[:, None], grads, 0.0), axis=0)


def state_passing_fwd(states, dA_last, seq_idx, chunk_size):
    """states: (b, nchunks, h, dim), u per chunk; dA_last: (b, h, nchunks) float32; seq_idx:
    (b, l) int32 -> out: (b, nchunks, h, dim) float32, the state entering each chunk."""
    batch, nchunks, nheads, dim = states.shape
    assert dA_last.shape == (batch, nheads, nchunks) and seq_idx.shape[0] == batch
    out = torch.empty(batch, nchunks, nheads, dim, device=states.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, BLOCK_DIM), batch, nheads)
    _state_passing_fwd_kernel[grid](
        states, out, dA_last, seq_idx, dim, nchunks, seq_idx.shape[1], chunk_size,
        *states.stride(), *out.stride(), *dA_last.stride(), *seq_idx.stride(), BLOCK_DIM=BLOCK_DIM)
    return out


def state_passing_bwd(out, dA_last, dout, seq_idx, chunk_size, dtype):
    """The backward of ``state_passing_fwd`` with no final-state gradient.

    out: (b, nchunks, h, dim) its result; dout: its gradient, same shape; dtype: of the returned
    du. Returns du: (b, nchunks, h, dim), the gradient of each chunk's own state, and ddA_last:
    (b, h, nchunks) float32, as mamba_ssm's ``_state_passing_bwd`` with dstates_dtype = dtype.
    """
    batch, nchunks, nheads, dim = out.shape
    assert dout.shape == out.shape and dA_last.shape == (batch, nheads, nchunks)
    out = out if out.stride(-1) == 1 else out.contiguous()
    du = torch.empty_like(out, dtype=dtype)
    assert du.stride() == out.stride()
    blocks = triton.cdiv(dim, BLOCK_DIM)
    ddA_part = torch.empty(batch, nheads, nchunks, blocks, device=out.device, dtype=torch.float32)
    _state_passing_bwd_kernel[(blocks, batch, nheads)](
        out, dout, dA_last, seq_idx, du, ddA_part, dim, nchunks, seq_idx.shape[1], chunk_size,
        *out.stride(), *dout.stride(), *dA_last.stride(), *seq_idx.stride(),
        ddA_part.stride(0), ddA_part.stride(1), ddA_part.stride(2), BLOCK_DIM=BLOCK_DIM)
    return du, ddA_part.sum(dim=-1)
