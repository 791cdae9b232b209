"""Throughput of ssd_scan (forward + backward) against the naive recurrence loop.

Shapes follow the SSD4Rec paper: d_model 256, expand 2 -> 512 inner channels = 32 heads of
headdim 16, d_state 64, one group. One packed row of `length` tokens made of user histories
of random lengths (seq_idx), as in training with sequence registers.

    python scripts/bench_scan.py                       # CPU, float32
    python scripts/bench_scan.py --device cuda         # also times the Triton backend
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

try:
    import ssd4rec  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd4rec.ops import ssd_scan  # noqa: E402
from ssd4rec.ops.reference import ssd_recurrence_naive  # noqa: E402


def packed_seq_idx(length: int, mean_len: int, gen: torch.Generator) -> torch.Tensor:
    """(1, length) int32 ids of consecutive sequences with lengths ~ U[1, 2*mean_len]."""
    lens, total = [], 0
    while total < length:
        n = int(torch.randint(1, 2 * mean_len + 1, (1,), generator=gen))
        n = min(n, length - total)
        lens.append(n)
        total += n
    ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return ids[None].to(torch.int32)


def make_inputs(length, args, dtype, device, gen):
    h, p, n, g = args.heads, args.headdim, args.d_state, args.groups

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    inputs = dict(
        x=rnd(1, length, h, p),
        dt=rnd(1, length, h),
        A=(-torch.exp(torch.rand(h, generator=gen) * 2.7)).to(device, dtype).requires_grad_(),
        B=rnd(1, length, g, n, scale=n ** -0.5),
        C=rnd(1, length, g, n, scale=n ** -0.5),
        D=rnd(h),
        z=rnd(1, length, h, p),
        dt_bias=rnd(h, scale=0.5),
    )
    seq_idx = packed_seq_idx(length, args.mean_seq_len, gen).to(device)
    return inputs, seq_idx


def time_fwd_bwd(fn, inputs, repeats, warmup, device):
    """Median seconds of one forward + backward (gradients of all inputs)."""
    leaves = list(inputs.values())
    gy = None

    def step():
        nonlocal gy
        y = fn()
        if gy is None:
            gy = torch.randn_like(y)
        torch.autograd.grad(y, leaves, gy)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--headdim", type=int, default=16)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--mean-seq-len", type=int, default=50, help="mean packed history length")
    ap.add_argument("--naive-max-length", type=int, default=4096,
                    help="skip the (slow) naive loop above this many tokens")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    with_triton = device.type == "cuda"
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"chunk_size={args.chunk_size} h={args.heads} p={args.headdim} n={args.d_state} "
          f"g={args.groups} batch=1 (packed, mean seq len {args.mean_seq_len}), "
          f"forward+backward, median of {args.repeats} after {args.warmup} warm-up")

    cols = ["tokens", "torch ms", "torch tok/s", "naive ms", "naive tok/s", "speedup"]
    if with_triton:
        cols += ["triton ms", "triton tok/s"]
    print(" | ".join(f"{c:>12}" for c in cols))
    skipped, triton_error = [], None
    for length in args.lengths:
        gen = torch.Generator().manual_seed(args.seed)
        inputs, seq_idx = make_inputs(length, args, dtype, device, gen)
        kw = dict(seq_idx=seq_idx, dt_softplus=True)
        t_torch = time_fwd_bwd(lambda: ssd_scan(chunk_size=args.chunk_size, backend="torch", **inputs, **kw),
                               inputs, args.repeats, args.warmup, device)
        row = [f"{length:>12d}", f"{t_torch * 1e3:>12.2f}", f"{length / t_torch:>12.0f}"]
        if length <= args.naive_max_length:
            # the naive loop is deterministic in cost: fewer repeats keep the run short
            t_naive = time_fwd_bwd(lambda: ssd_recurrence_naive(**inputs, **kw), inputs,
                                   max(1, min(args.repeats, 3)), 1, device)
            row += [f"{t_naive * 1e3:>12.2f}", f"{length / t_naive:>12.0f}",
                    f"{t_naive / t_torch:>11.1f}x"]
        else:
            skipped.append(length)
            row += [f"{'skipped':>12}"] * 3
        if with_triton and triton_error is None:
            try:
                t_tr = time_fwd_bwd(lambda: ssd_scan(chunk_size=args.chunk_size, backend="triton", **inputs, **kw),
                                    inputs, args.repeats, args.warmup, device)
                row += [f"{t_tr * 1e3:>12.3f}", f"{length / t_tr:>12.0f}"]
            except RuntimeError as e:  # mamba_ssm missing: say so once, keep the table
                triton_error = str(e)
        if with_triton and triton_error is not None:
            row += [f"{'n/a':>12}"] * 2
        print(" | ".join(row), flush=True)
    if triton_error is not None:
        print(f"triton backend unavailable: {triton_error}")
    if skipped:
        print(f"naive recurrence skipped for lengths > --naive-max-length={args.naive_max_length}: {skipped}")


if __name__ == "__main__":
    main()
