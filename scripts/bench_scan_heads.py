"""Prototype for issue #4: the SSD scan's output pass with every head of a chunk in one program.

Why. At SSD4Rec's shapes (32 heads of 16 channels, one group, d_state 64) mamba_ssm's
``_chunk_scan_fwd`` runs one program per (chunk, head), and its grid puts the heads outermost:
each program reloads its chunk's (Q, Q) C·Bᵀ block, the same for all 32 heads, and by the time
the next head comes round the block has left the L2 cache. At chunk 128 that is about 4 GB of
C·Bᵀ reads per call for one ML-1M batch. This kernel loads each chunk's C·Bᵀ rows (and C)
once and loops over the heads. The exp of the decay mask is still computed per head, so if
that, not the memory traffic, is what costs, this will not pay. The backward kernels read
C·Bᵀ the same way; they are worth rewriting only if this forward pass shows the gain.

What it computes, for chunk c of a row, rows t and columns s of the chunk, head h:

    y[t, h] = sum_{s <= t} CB[t, s] * exp(min(dA[h, t] - dA[h, s], 0)) * dt[h, s] * x[s, h]
              + [seq(t) == seq(first token of c - 1)] * exp(dA[h, t]) * C[t] . state_in[c, h]
              + D[h] * x[t, h]

    CB: (batch, nchunks, 1, Q, Q) float32, C[t]·B[s], already 0 across sequences
    x: (batch, seqlen, H, P); dt, dA (the chunk's cumulative dt*A): (batch, H, nchunks, Q) float32
    C: (batch, seqlen, 1, N); state_in: (batch, nchunks, H, P, N); D: (H,); seq: (batch, seqlen) int32

the inputs and output of mamba_ssm 2.3.2's ``_chunk_scan_fwd`` without z (one group, D per head).

    TRITON_INTERPRET=1 python scripts/bench_scan_heads.py --check    # CPU: against a torch loop
    PYTHONPATH=. python3 scripts/bench_scan_heads.py                 # GPU: against mamba_ssm, timed
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
except ImportError as err:  # the CPU install has no triton
    if __name__ == "__main__":
        sys.exit(f"bench_scan_heads.py needs triton ({err}); on a CPU: pip install triton, then "
                 "TRITON_INTERPRET=1 python scripts/bench_scan_heads.py --check")
    raise


# One config under the CPU interpreter: the autotuner's benchmarking needs a GPU.
CONFIGS = ([triton.Config({"BLOCK_M": 16})] if os.environ.get("TRITON_INTERPRET") == "1" else
           [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
            for m in (16, 32, 64) for w in (2, 4, 8) for s in (1, 2)])


@triton.autotune(configs=CONFIGS, key=["NHEADS", "Q", "P", "N"])
@triton.jit
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
    NHEADS: tl.constexpr, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
):
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
        weights = cb * tl.exp(tl.minimum(dA_m[:, None] - dA_k[None, :], 0.0)) * dt_k[None, :]
        acc = tl.dot(weights.to(x_k.dtype), x_k)                                   # (BLOCK_M, P)
        state = tl.load(st_ptr + pid_b * s_st_b + pid_c * s_st_c + h * s_st_h
                        + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p)     # (N, P)
        carry = tl.where(carries, tl.exp(dA_m), 0.0)
        acc += tl.dot(c_rows, state.to(c_rows.dtype)) * carry[:, None]
        x_m = tl.load(x_h + (start + offs_m)[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                      mask=m_ok[:, None], other=0.0).to(tl.float32)
        acc += x_m * tl.load(D_ptr + h).to(tl.float32)
        tl.store(out_ptr + pid_b * s_o_b + (start + offs_m)[:, None] * s_o_l + h * s_o_h + offs_p[None, :] * s_o_p,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def scan_out_all_heads(cb, x, dt, dA, C, states, D, seq_idx):
    """y: (batch, seqlen, H, P), shapes as in the module docstring (one group only)."""
    batch, seqlen, nheads, p = x.shape
    _, nchunks, groups, q, _ = cb.shape
    n = C.shape[-1]
    assert groups == 1 and C.shape[2] == 1, "one group (SSD4Rec's setting) only"
    assert dt.stride() == dA.stride()
    out = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(q, meta["BLOCK_M"]), nchunks, batch)  # noqa: E731
    _scan_out_all_heads_kernel[grid](
        cb, x, dt, dA, C, states, D, seq_idx, out, seqlen,
        cb.stride(0), cb.stride(1), cb.stride(3), cb.stride(4),
        *x.stride(), *dt.stride(),
        C.stride(0), C.stride(1), C.stride(3),
        *states.stride(), *seq_idx.stride(), *out.stride(),
        NHEADS=nheads, Q=q, P=p, N=n)
    return out


def reference(cb, x, dt, dA, C, states, D, seq_idx):
    """The module docstring's formula as a loop over chunks, in float64."""
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
    return y + x64 * D.double()[:, None]


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
    A = -torch.exp(torch.rand(nheads, generator=gen) * 2.0)
    dA = torch.cumsum(dt * A[None, :, None, None], dim=-1)
    x = torch.randn(batch, seqlen, nheads, p, generator=gen)
    states = torch.randn(batch, nchunks, nheads, p, n, generator=gen)
    D = torch.randn(nheads, generator=gen)
    to = dict(device=device)
    return (cb[:, :, None].contiguous().to(**to), x.to(dtype=dtype, **to), dt.to(**to), dA.to(**to),
            C[:, :seqlen, None].to(dtype=dtype, **to), states.to(dtype=dtype, **to), D.to(**to),
            seq_idx.to(torch.int32).to(**to))


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
        out = scan_out_all_heads(*inputs)
        assert torch.isfinite(out).all()
        worst = max(worst, rel_err(out, reference(*(t.cpu() for t in inputs))))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the kernel against the loop (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--tokens", type=int, default=245_760)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[128, 256], dest="chunk_sizes")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if args.check or not torch.cuda.is_available():
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("no GPU: run the check with TRITON_INTERPRET=1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        err = check(device)
        print(f"kernel vs float64 loop: worst relative error {err:.2e}")
        sys.exit(0 if err < TOLERANCE[device] else 1)

    from ssd4rec.ops.ssd_scan import _load_triton_scan

    _, error = _load_triton_scan()  # mamba_ssm's import quirk handled there
    if error:
        sys.exit(f"mamba_ssm's Triton scan is not importable: {error}")
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_fwd

    print(f"check (fp32, tf32 dots): worst relative error {check('cuda'):.2e}")
    gen = torch.Generator().manual_seed(1)
    length = args.tokens // args.rows
    for q in args.chunk_sizes:
        inputs = random_inputs(args.rows, length, 32, 16, 64, q, 120, "cuda", torch.bfloat16, gen)
        cb, x, dt, dA, C, states, D, seq_idx = inputs
        theirs = lambda: _chunk_scan_fwd(cb, x, dt, dA, C, states, D=D, seq_idx=seq_idx)[0]  # noqa: E731
        ours = lambda: scan_out_all_heads(*inputs)  # noqa: E731
        err = rel_err(ours(), theirs())
        times = {"mamba_ssm": [], "all heads": []}
        for _ in range(3):  # alternate, median of each
            for name, fn in (("mamba_ssm", theirs), ("all heads", ours)):
                times[name].append(triton.testing.do_bench(fn, warmup=25, rep=args.repeats * 5, return_mode="median"))
        t_theirs, t_ours = (statistics.median(times[k]) for k in ("mamba_ssm", "all heads"))
        print(f"chunk {q}: mamba_ssm _chunk_scan_fwd {t_theirs:.3f} ms, all heads {t_ours:.3f} ms "
              f"({t_ours / t_theirs:.2f}x), relative difference {err:.2e} (bf16)")


if __name__ == "__main__":
    main()
