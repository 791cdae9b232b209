"""The seq_idx-aware causal conv: PyTorch fallback against the causal_conv1d CUDA kernel.

Forward + backward of ``ssd4rec.ops.conv1d`` at the shape one SSD4Rec training step gives it
on ML-1M at the paper config: batch 1024 histories of at most 200 items (about 124 K tokens,
mean length 121), both directions stacked (2 rows), 640 channels (512 inner + 2 x 64 for B
and C), width 4. Times with CUDA events after warm-up, the median over rotating input sets,
and checks each backend against a float64 run of the PyTorch version on the same inputs.

    python scripts/bench_conv.py                   # needs a GPU; the CUDA kernel if installed
    python scripts/bench_conv.py --device cpu      # the PyTorch version only, for a dry run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

try:
    import ssd4rec  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd4rec.ops.conv1d import _load_cuda_conv1d, causal_conv1d  # noqa: E402


def packed_seq_idx(rows: int, length: int, mean_len: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, length) int32 ids of consecutive histories of lengths ~ U[1, 2*mean_len]."""
    out = []
    for _ in range(rows):
        lens = torch.randint(1, 2 * mean_len + 1, (2 * length // mean_len + 2,), generator=gen)
        ids = torch.repeat_interleave(torch.arange(len(lens)), lens)[:length]
        out.append(ids)
    return torch.stack(out).to(torch.int32)


def make_inputs(args, dtype, device, gen):
    """x (rows, dim, l) channel-last in memory, as the model's in_proj output is; weight
    (dim, w); bias (dim,); seq_idx (rows, l); dout (rows, dim, l)."""
    rows, dim, l, w = args.rows, args.dim, args.tokens, args.width
    x = torch.randn(rows, l, dim, generator=gen).to(device, dtype).transpose(1, 2)
    weight = (torch.randn(dim, w, generator=gen) * w ** -0.5).to(device, dtype)
    bias = (torch.randn(dim, generator=gen) * 0.1).to(device, dtype)
    seq_idx = packed_seq_idx(rows, l, args.mean_len, gen).to(device)
    dout = torch.randn(rows, l, dim, generator=gen).to(device, dtype).transpose(1, 2)
    return x, weight, bias, seq_idx, dout


def step(backend, x, weight, bias, seq_idx, dout):
    """One forward + backward; returns (out, dx, dweight, dbias)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    out = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu", backend=backend)
    dx, dw, db = torch.autograd.grad(out, (x, weight, bias), dout)
    return out, dx, dw, db


def rel_err(got, ref):
    return float((got.detach().double() - ref.detach()).norm() / ref.detach().norm())


def time_ms(fn, sets, device, warmup, repeats):
    """Median milliseconds of fn(*inputs) over `repeats` runs, rotating among input sets."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    if device.type != "cuda":
        import time

        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(*sets[i % len(sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=124_000)
    parser.add_argument("--mean-len", type=int, default=121)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated between runs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    backends = ["torch"]
    if device.type == "cuda":
        fn, reason = _load_cuda_conv1d()
        if fn is not None:
            backends.append("cuda")
        else:
            print(f"causal_conv1d package not available ({reason}): PyTorch version only")
        print(torch.cuda.get_device_name(device), "torch", torch.__version__)

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        sets = [make_inputs(args, dtype, device, gen) for _ in range(args.sets)]
        # float64 reference: the PyTorch version on upcast copies of the first set
        ref = step("torch", *(t.double() if t.is_floating_point() else t for t in sets[0]))
        for backend in backends:
            got = step(backend, *sets[0])
            errors = [rel_err(g, r) for g, r in zip(got, ref)]
            ms = time_ms(lambda *s: step(backend, *s), sets, device, args.warmup, args.repeats)
            again = time_ms(lambda *s: step(backend, *s), sets, device, 1, args.repeats)
            rows.append((dtype_name, backend, ms, again, max(errors)))

    tokens = args.rows * args.tokens
    print(f"\n{args.rows} rows x {args.tokens} tokens x {args.dim} channels, width {args.width}, "
          f"silu, forward + backward, median of {args.repeats}")
    print("| dtype | backend | ms (run 1) | ms (run 2) | M tokens/s | max rel. error vs float64 |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype_name, backend, ms, again, err in rows:
        print(f"| {dtype_name} | {backend} | {ms:.2f} | {again:.2f} | {tokens / ms / 1e3:.1f} | {err:.1e} |")
    for dtype_name in args.dtypes:
        by = {b: ms for d, b, ms, _, _ in rows if d == dtype_name}
        if "cuda" in by:
            print(f"{dtype_name}: PyTorch / CUDA kernel = {by['torch'] / by['cuda']:.2f}x")


if __name__ == "__main__":
    main()
