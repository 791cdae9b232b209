"""Does mamba_ssm's Triton SSD scan get faster at headdim 16 if its autotuners may pick 16-wide tiles?

mamba_ssm 2.3.2 tunes its scan kernels for headdim 64: no autotune config has a tile narrower
than 32, so at SSD4Rec's headdim 16 every hdim-wide tile is at least half padding. This script
times one forward + backward of ``ssd_scan`` (both directions of one ML-1M batch: 245,760
tokens as 2 rows, 32 heads of 16, d_state 64, bf16) with the stock configs, then adds to every
autotuned kernel of the scan a copy of each config whose BLOCK_SIZE_N or BLOCK_SIZE_K is 32,
narrowed to 16, retunes, and times again. The two tunings are then timed in alternating rounds
(each autotuner's chosen configs swapped in and out, no retuning), and the outputs and input
gradients of both are compared.

Run on a GPU, alone:
    PYTHONPATH=. python3 scripts/bench_scan_tiles.py --chunk-size 128 256
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import make_inputs, time_fwd_bwd  # noqa: E402
from ssd4rec.ops import ssd_scan  # noqa: E402

NARROW = ("BLOCK_SIZE_N", "BLOCK_SIZE_K")


def scan_autotuners():
    """{name: Autotuner} of every autotuned kernel in mamba_ssm's SSD modules."""
    from triton.runtime.autotuner import Autotuner

    from ssd4rec.ops.ssd_scan import _load_triton_scan  # mamba_ssm's import quirk handled there

    _, error = _load_triton_scan()
    if error:
        sys.exit(f"mamba_ssm's Triton scan is not importable: {error}")
    from mamba_ssm.ops.triton import ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined, ssd_state_passing

    found = {}
    for module in (ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined, ssd_state_passing):
        for name, obj in vars(module).items():
            while obj is not None and not isinstance(obj, Autotuner):  # under @triton.heuristics
                obj = getattr(obj, "fn", None)
            if obj is not None:
                found[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = obj
    return found


def narrowed(configs):
    """Copies of the configs with one 32-wide tile dimension (NARROW) set to 16, deduplicated."""
    import triton

    def ident(c):
        return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages

    seen = {ident(c) for c in configs}
    extra = []
    for c in configs:
        for dim in NARROW:
            if c.kwargs.get(dim) == 32:
                new = triton.Config({**c.kwargs, dim: 16}, num_warps=c.num_warps, num_stages=c.num_stages,
                                    pre_hook=c.pre_hook)
                if ident(new) not in seen:
                    seen.add(ident(new))
                    extra.append(new)
    return extra


def run_grads(fn, inputs):
    y = fn()
    gy = torch.randn(y.shape, generator=torch.Generator(device=y.device).manual_seed(1), device=y.device,
                     dtype=y.dtype)
    grads = torch.autograd.grad(y, list(inputs.values()), gy)
    return [y.detach()] + [g.detach() for g in grads]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=245_760)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[128, 256], dest="chunk_sizes")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of each tuning")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--headdim", type=int, default=16)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--mean-seq-len", type=int, default=120)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_scan_tiles.py needs a CUDA GPU with mamba_ssm (Triton kernels); none here")
    device = torch.device("cuda")
    tuners = scan_autotuners()
    inputs, seq_idx = make_inputs(args.tokens, args.rows, args, torch.bfloat16, device, torch.Generator().manual_seed(0))
    fns = {q: (lambda q=q: ssd_scan(chunk_size=q, backend="triton", seq_idx=seq_idx, dt_softplus=True, **inputs))
           for q in args.chunk_sizes}

    times = {}
    outs = {}
    for q, fn in fns.items():  # stock configs: tune, then keep each autotuner's choices
        times[("stock", q)] = [time_fwd_bwd(fn, inputs, args.repeats, 3, device)]
        outs[("stock", q)] = run_grads(fn, inputs)
    stock_cache = {k: dict(t.cache) for k, t in tuners.items()}
    added = {}
    for k, t in tuners.items():
        extra = narrowed(t.configs)
        added[k] = len(extra)
        t.configs.extend(extra)
        t.cache.clear()
    for q, fn in fns.items():  # retune with the narrow tiles allowed
        times[("narrow", q)] = [time_fwd_bwd(fn, inputs, args.repeats, 3, device)]
        outs[("narrow", q)] = run_grads(fn, inputs)
    narrow_cache = {k: dict(t.cache) for k, t in tuners.items()}
    for _ in range(args.rounds):  # alternate the two tunings, no retuning
        for label, caches in (("stock", stock_cache), ("narrow", narrow_cache)):
            for k, t in tuners.items():
                t.cache = dict(caches[k])
            for q, fn in fns.items():
                times[(label, q)].append(time_fwd_bwd(fn, inputs, args.repeats, 1, device))

    print("\nconfigs chosen with narrow tiles allowed (kernel: key -> config), * = a narrowed one")
    for k, t in tuners.items():
        for key, cfg in narrow_cache[k].items():
            star = "*" if any(cfg.kwargs.get(d) == 16 for d in NARROW) else " "
            print(f"{star} {k} (+{added[k]} configs): {key} -> {cfg}")
    print(f"\n{args.tokens} tokens as {args.rows} rows, h={args.heads} p={args.headdim} n={args.d_state}, bf16, "
          f"fwd+bwd; median of the tuning run and {args.rounds} alternating rounds (ms)")
    print(f"{'chunk':>5} | {'stock ms':>9} | {'narrow ms':>9} | {'narrow/stock':>12} | rel. diff y, grads (narrow vs stock)")
    for q in args.chunk_sizes:
        s = statistics.median(times[("stock", q)]) * 1e3
        n = statistics.median(times[("narrow", q)]) * 1e3
        diffs = [rel_err(a, b) for a, b in zip(outs[("narrow", q)], outs[("stock", q)])]
        print(f"{q:5d} | {s:9.2f} | {n:9.2f} | {n / s:12.3f} | max {max(diffs):.2e} (y {diffs[0]:.2e})")
        print(f"      runs stock {[round(t * 1e3, 2) for t in times[('stock', q)]]}, "
              f"narrow {[round(t * 1e3, 2) for t in times[('narrow', q)]]}")


if __name__ == "__main__":
    main()
