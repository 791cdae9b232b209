"""The scan backward's last step for the decays, in one kernel: the gradient with respect to each
chunk's cumulative dA, summed from the parts the other kernels leave, turned into the gradient
with respect to each step's dA by a reverse cumulative sum.

Why. ``ssd_scan_heads._backward`` took this step as seven PyTorch operations (a sum over the
pair kernel's row blocks, two additions, an indexed addition, flip, cumsum, flip), each a pass
over a (b, H, nchunks, Q) float32 tensor, 31 MB per layer at the ML-1M step's shape. In session
16's H100 profile ``torch.cumsum`` alone took 0.7 ms a layer, against about 0.02 ms to move its
bytes. Here one program reads a tile of chunks of one head once and writes ddA once: 0.049
against 0.854 ms for the seven operations on the H100 (``scripts/bench_scan_heads.py --passes
ddA``, results/MEASUREMENTS.md).

For row b, head h, chunk c, positions i and j of the chunk (Q of them):

    ddAcs[i] = sum_k rows[k, i] + cols[i] + into[i] + [i == Q - 1] end
    ddA[j]   = sum_{i >= j} ddAcs[i]

    rows: (b, H, nchunks, K, Q), the pair kernel's per-row-block sums (``pair_grads_all_heads``)
    cols: (b, H, nchunks, Q), its per-token sums
    into: (b, H, nchunks, Q), the state pass's term (``state_grads_all_heads``)
    end:  (b, H, nchunks), the state passing's gradient of each chunk's total decay
          (``state_passing_bwd``); it lands on the chunk's last position, as mamba_ssm puts it
    ddA:  (b, H, nchunks, Q) float32, what mamba_ssm's ``_chunk_cumsum_bwd`` takes

The reverse cumulative sum is Triton's scan over a tile loaded from memory (session 11's
prototype got a cumulative sum wrong on the GPU, where it followed a dot in the same kernel).
"""

import os

import torch
import triton
import triton.language as tl

# Chunks per program: a (16, 64) float32 tile at chunk 64. Under the interpreter, smaller, so
# that the tests' few chunks still span several programs.
BLOCK_C = 2 if os.environ.get("TRITON_INTERPRET") == "1" else 16


@triton.jit(do_not_specialize=["nchunks"])
def _ddA_steps_kernel(
    rows_ptr, cols_ptr, into_ptr, end_ptr, out_ptr,
    nchunks,
    s_rw_b, s_rw_h, s_rw_c, s_rw_k, s_rw_q,
    s_cl_b, s_cl_h, s_cl_c, s_cl_q,
    s_in_b, s_in_h, s_in_c, s_in_q,
    s_end_b, s_end_h, s_end_c,
    s_o_b, s_o_h, s_o_c, s_o_q,
    K: tl.constexpr, Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_C chunks of one head of one row."""
    pid_c, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_q = tl.arange(0, Q)
    c_ok = offs_c < nchunks
    mask = c_ok[:, None]
    cols = tl.load(cols_ptr + pid_b * s_cl_b + pid_h * s_cl_h + offs_c[:, None] * s_cl_c + offs_q[None, :] * s_cl_q,
                   mask=mask, other=0.0)
    into = tl.load(into_ptr + pid_b * s_in_b + pid_h * s_in_h + offs_c[:, None] * s_in_c + offs_q[None, :] * s_in_q,
                   mask=mask, other=0.0)
    total = cols + into
    rows_base = rows_ptr + pid_b * s_rw_b + pid_h * s_rw_h + offs_c[:, None] * s_rw_c + offs_q[None, :] * s_rw_q
    for k in tl.static_range(K):
        total += tl.load(rows_base + k * s_rw_k, mask=mask, other=0.0)
    end = tl.load(end_ptr + pid_b * s_end_b + pid_h * s_end_h + offs_c * s_end_c, mask=c_ok, other=0.0)
    total += tl.where(offs_q[None, :] == Q - 1, end[:, None], 0.0)
    ddA = tl.cumsum(total, axis=1, reverse=True)
    tl.store(out_ptr + pid_b * s_o_b + pid_h * s_o_h + offs_c[:, None] * s_o_c + offs_q[None, :] * s_o_q,
             ddA, mask=mask)


def ddA_steps(rows, cols, into, end):
    """ddA per step from its parts (the module docstring's formula; shapes there), float32.
    Any strides: rows is usually a slice of a wider buffer."""
    batch, nheads, nchunks, k, q = rows.shape
    assert cols.shape == into.shape == (batch, nheads, nchunks, q) and end.shape == (batch, nheads, nchunks)
    assert all(t.dtype == torch.float32 for t in (rows, cols, into, end))
    out = torch.empty(batch, nheads, nchunks, q, device=cols.device, dtype=torch.float32)
    _ddA_steps_kernel[(triton.cdiv(nchunks, BLOCK_C), nheads, batch)](
        rows, cols, into, end, out, nchunks,
        *rows.stride(), *cols.stride(), *into.stride(), *end.stride(), *out.stride(),
        K=k, Q=q, BLOCK_C=BLOCK_C)
    return out


def ddA_steps_reference(rows, cols, into, end):
    """The same in PyTorch operations, as ``ssd_scan_heads._backward`` took it until session 17."""
    ddAcs = rows.sum(dim=3) + cols + into
    ddAcs[..., -1] += end
    return ddAcs.flip([-1]).cumsum(dim=-1).flip([-1])
