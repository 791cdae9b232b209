"""Issue #4: the all-heads SSD output pass (``ssd4rec.ops.ssd_scan_heads``), checked and timed.

The kernel computes mamba_ssm 2.3.2's ``_chunk_scan_fwd`` output (no z, one group, D per head)
with every head of a chunk in one program, so each chunk's (Q, Q) C·Bᵀ block is loaded once
instead of once per head; its docstring has the formula. This script

- checks it against a float64 loop of that formula on small shapes (``--check``; on a CPU
  under Triton's interpreter, which cannot run mamba_ssm's own kernels), and
- on a GPU, compares it with ``_chunk_scan_fwd`` at the ML-1M step's shape (bf16, 245,760
  tokens, mean history 120) and times both in alternating rounds in one process.

    TRITON_INTERPRET=1 python scripts/bench_scan_heads.py --check    # CPU: against a torch loop
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
    from ssd4rec.ops.ssd_scan_heads import scan_out_all_heads
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
        if seqlen == 37:  # one shape without the D term (the kernel's HAS_D=False variant)
            inputs = (*inputs[:6], None, inputs[7])
        out = scan_out_all_heads(*inputs)
        assert torch.isfinite(out).all()
        worst = max(worst, rel_err(out, reference(*(None if t is None else t.cpu() for t in inputs))))
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
