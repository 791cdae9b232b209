"""Throughput of ssd_scan (forward + backward) against the naive recurrence loop.

Shapes follow the SSD4Rec paper: d_model 256, expand 2 -> 512 inner channels = 32 heads of
headdim 16, d_state 64, one group. One packed row of `length` tokens made of user histories
of random lengths (seq_idx), as in training with sequence registers.

    python scripts/bench_scan.py                       # CPU, float32
    python scripts/bench_scan.py --device cuda         # also times the Triton backend
    python scripts/bench_scan.py --device cuda --dtype bfloat16 --backends triton \
        --lengths 245760 --rows 2 32 --chunk-size 64 256   # layouts and chunk sizes
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys

import torch

try:
    import ssd4rec  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark import time_steps  # noqa: E402  (scripts/, this file's folder)
from ssd4rec.ops import ssd_scan  # noqa: E402
from ssd4rec.ops.reference import ssd_recurrence_naive  # noqa: E402


def packed_seq_idx(rows: int, length: int, mean_len: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, length) int32: each row holds consecutive sequences with lengths ~ U[1, 2*mean_len],
    numbered within the row (as ``RowLayout`` lays out whole histories)."""
    out = []
    for _ in range(rows):
        lens, total = [], 0
        while total < length:
            n = min(int(torch.randint(1, 2 * mean_len + 1, (1,), generator=gen)), length - total)
            lens.append(n)
            total += n
        out.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(out).to(torch.int32)


def make_inputs(tokens, rows, args, dtype, device, gen):
    """The scan's inputs for `tokens` tokens laid out as (rows, tokens // rows)."""
    h, p, n, g = args.heads, args.headdim, args.d_state, args.groups
    b, length = rows, tokens // rows

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    inputs = dict(
        x=rnd(b, length, h, p),
        dt=rnd(b, length, h),
        A=(-torch.exp(torch.rand(h, generator=gen) * 2.7)).to(device, dtype).requires_grad_(),
        B=rnd(b, length, g, n, scale=n ** -0.5),
        C=rnd(b, length, g, n, scale=n ** -0.5),
        D=rnd(h),
        z=rnd(b, length, h, p),
        dt_bias=rnd(h, scale=0.5),
    )
    seq_idx = packed_seq_idx(b, length, args.mean_seq_len, gen).to(device)
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

    _, times = time_steps(step, device, warmup, repeats)  # CUDA events on a GPU
    return statistics.median(times)


def _append_csv(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096],
                    help="tokens per call, all rows together")
    ap.add_argument("--rows", type=int, nargs="+", default=[1],
                    help="lay each length out as this many rows of whole sequences (batch dim)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[64], dest="chunk_sizes",
                    help="one or more chunk sizes; the torch backend evaluates chunks above 64 "
                         "as chunks of 64 (ssd_scan._TORCH_MAX_CHUNK)")
    ap.add_argument("--backends", default=None,
                    help="comma list of torch, naive, triton (default: torch,naive, plus triton on CUDA)")
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
    ap.add_argument("--csv", default=None, help="also append the rows to this CSV file")
    args = ap.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = (args.backends.split(",") if args.backends
                else ["torch", "naive"] + (["triton"] if device.type == "cuda" else []))
    unknown = set(backends) - {"torch", "naive", "triton"}
    if unknown:
        ap.error(f"--backends: unknown {sorted(unknown)}; expected torch, naive, triton")
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"h={args.heads} p={args.headdim} n={args.d_state} g={args.groups} "
          f"packed sequences of mean length {args.mean_seq_len}, "
          f"forward+backward, median of {args.repeats} after {args.warmup} warm-up")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), "torch", torch.__version__)

    cols = ["tokens", "rows", "chunk", "backend", "ms", "tok/s"]
    print(" | ".join(f"{c:>10}" for c in cols), flush=True)
    skipped, triton_error = [], None
    for length in args.lengths:
        for rows in args.rows:
            if length % rows:
                ap.error(f"--lengths {length} is not a multiple of --rows {rows}")
            gen = torch.Generator().manual_seed(args.seed)
            inputs, seq_idx = make_inputs(length, rows, args, dtype, device, gen)
            kw = dict(seq_idx=seq_idx, dt_softplus=True)
            for chunk in args.chunk_sizes:
                for backend in backends:
                    if backend == "naive":
                        if chunk != args.chunk_sizes[0]:
                            continue  # the naive loop has no chunks: once per layout
                        if length > args.naive_max_length:
                            skipped.append(length)
                            continue
                        # deterministic in cost: fewer repeats keep the run short
                        fn, reps, warm = (lambda: ssd_recurrence_naive(**inputs, **kw)), max(1, min(args.repeats, 3)), 1
                    else:
                        if backend == "triton" and triton_error is not None:
                            continue
                        fn = (lambda b=backend, q=chunk: ssd_scan(chunk_size=q, backend=b, **inputs, **kw))
                        reps, warm = args.repeats, args.warmup
                    try:
                        t = time_fwd_bwd(fn, inputs, reps, warm, device)
                    except RuntimeError as e:
                        if backend != "triton":
                            raise
                        triton_error = str(e)  # mamba_ssm missing: say so once, keep the table
                        continue
                    row = dict(tokens=length, rows=rows, chunk=chunk if backend != "naive" else "",
                               backend=backend, ms=round(t * 1e3, 3), tok_per_s=round(length / t))
                    print(" | ".join(f"{v!s:>10}" for v in row.values()), flush=True)
                    if args.csv:  # row by row: a run cut off at its time limit keeps what it measured
                        _append_csv(args.csv, {**row, "dtype": args.dtype, "device": str(device)})
    if triton_error is not None:
        print(f"triton backend unavailable: {triton_error}")
    if skipped:
        print(f"naive recurrence skipped for lengths > --naive-max-length={args.naive_max_length}: "
              f"{sorted(set(skipped))}")


if __name__ == "__main__":
    main()
