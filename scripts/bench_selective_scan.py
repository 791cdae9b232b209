"""The Triton core of the Mamba-1 selective scan (``ssd4rec.ops.selective_scan_triton``),
checked and timed against the PyTorch core (``selective_scan._SelectiveScanCore``).

- ``--check``: the Triton core against a float64 loop of the recurrence with autograd (y, last
  state and the five gradients) on small shapes chosen to hit the masks and the chunking
  (d and n not powers of two, several d-blocks, l = 1, chunks not dividing l, one step per
  chunk), then ``selective_scan(backend="triton")`` (delta bias, softplus, D, z) against
  ``backend="torch"``. On a CPU this runs under Triton's interpreter; tests/
  test_selective_scan_triton.py calls it.
- default (CUDA): forward + backward of the PyTorch core and the Triton core at Mamba4Rec's
  ML-1M shape (b=1024, d=128, n=32, l=200, float32), timed with CUDA events after warm-up in
  alternating rounds in one process; prints the median ms of each, the ratio, the peak memory
  of each and the largest differences between their outputs and gradients.

    TRITON_INTERPRET=1 PYTHONPATH=. python scripts/bench_selective_scan.py --check   # CPU
    PYTHONPATH=. python3 scripts/bench_selective_scan.py                              # GPU
    PYTHONPATH=. python3 scripts/bench_selective_scan.py --block-d 16 32 64 --chunk 1 16  # GPU sweep
"""

import argparse
import importlib
import itertools
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the modules (ssd4rec.ops.selective_scan is also the name of the function the package exports)
ss = importlib.import_module("ssd4rec.ops.selective_scan")
sst = importlib.import_module("ssd4rec.ops.selective_scan_triton")

# Worst relative error (norm of the difference / norm of the float64 reference) allowed.
# Both are float32 against float64; on a GPU tl.exp is the hardware's approximate exp2.
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}
QUANTITIES = ("y", "last", "gu", "gdelta", "gA", "gB", "gC")

# (b, d, l, n, block_d, chunk): 3 d-blocks with a ragged one (24 = 8 + 8 + 8, 40 = 16 + 16 + 8),
# n = 5, 32 and 4; l = 1 with a chunk longer than l; chunk = 1 (every state saved); chunks
# that do not divide l; d smaller than one block.
CHECK_SHAPES = ((2, 24, 7, 5, 8, 3), (1, 3, 1, 5, 16, 16), (2, 16, 10, 4, 16, 1),
                (2, 40, 33, 32, 16, 16), (3, 20, 12, 6, 32, 5))


def loop_reference(u, delta, A, B, C):
    """The recurrence one step at a time, in the inputs' dtype, with autograd:
    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l) -> y: (b, d, l), last state: (b, d, n)."""
    b, d, l = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1), h


def random_inputs(b, d, l, n, gen, dtype=torch.float64, device="cpu"):
    """u, delta (softplus'd, as the core receives it), A (S4D-like, negative), B, C."""
    u = torch.randn(b, d, l, generator=gen, dtype=torch.float64)
    delta = F.softplus(torch.randn(b, d, l, generator=gen, dtype=torch.float64) - 1.0)
    A = -torch.exp(torch.randn(d, n, generator=gen, dtype=torch.float64) * 0.5)
    B = torch.randn(b, n, l, generator=gen, dtype=torch.float64)
    C = torch.randn(b, n, l, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (u, delta, A, B, C)]


def errors(ours, ref):
    """(max abs, relative) difference: relative = norm of the difference / norm of ref (the
    absolute norm where ref is 0, e.g. gA at l = 1)."""
    a, r = ours.detach().double().cpu(), ref.detach().double().cpu()
    diff = (a - r).norm().item()
    denom = r.norm().item()
    return (a - r).abs().max().item(), diff / denom if denom > 0 else diff


def outputs_and_grads(fn, inputs, gy):
    """fn(*inputs) -> (y, last); returns [y, last, gu, gdelta, gA, gB, gC]."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    y, last = fn(*leaves)
    return [y, last, *torch.autograd.grad(y, leaves, gy)]


def check(device="cpu", verbose=True):
    """The Triton core against the float64 loop, then the whole selective_scan against the
    PyTorch one; returns the worst relative error."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for b, d, l, n, block_d, chunk in CHECK_SHAPES:
        inputs = random_inputs(b, d, l, n, gen)
        gy = torch.randn(b, d, l, generator=gen, dtype=torch.float64)
        ref = outputs_and_grads(loop_reference, inputs, gy)
        ours = outputs_and_grads(
            lambda *t: sst.selective_scan_triton_core(*t, block_d=block_d, chunk=chunk),
            [t.float().to(device) for t in inputs], gy.float().to(device))
        errs = [errors(o, r) for o, r in zip(ours, ref)]
        assert all(torch.isfinite(o).all() for o in ours)
        worst = max(worst, max(e[1] for e in errs))
        if verbose:
            print(f"b={b} d={d} l={l} n={n} block_d={block_d} chunk={chunk}: max abs / rel error "
                  + ", ".join(f"{q} {a:.1e}/{r:.1e}" for q, (a, r) in zip(QUANTITIES, errs)))
        with torch.no_grad():  # the forward without saving states gives the same y and state
            y, last = sst.selective_scan_triton_core(*[t.float().to(device) for t in inputs],
                                                     block_d=block_d, chunk=chunk)
        worst = max(worst, errors(y, ours[0])[1], errors(last, ours[1])[1])

    # The glue (delta bias, softplus, D, z) around the Triton core, against backend="torch".
    b, d, l, n = 2, 24, 9, 5
    u, delta, A, B, C = random_inputs(b, d, l, n, gen, torch.float32, device)
    extra = dict(D=torch.randn(d, generator=gen).to(device), z=torch.randn(b, d, l, generator=gen).to(device),
                 delta_bias=(torch.randn(d, generator=gen) * 0.5).to(device))
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    gy = torch.randn(b, d, l, generator=gen).to(device)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, A, B, C, *extra.values())]
        y, last = ss.selective_scan(**dict(zip(names, leaves)), delta_softplus=True,
                                    return_last_state=True, backend=backend)
        results[backend] = [y, last, *torch.autograd.grad(y, leaves, gy)]
    errs = [errors(a, r) for a, r in zip(results["triton"], results["torch"])]
    worst = max(worst, max(e[1] for e in errs))
    if verbose:
        print("selective_scan(backend='triton') vs backend='torch' (bias, softplus, D, z): "
              + ", ".join(f"{q} {r:.1e}" for q, (_, r) in zip(("y", "last") + tuple(f"g{k}" for k in names), errs)))
    return worst


def time_rounds(fns, rounds, repeats):
    """Median ms per call of each fn in fns (dict name -> callable), rounds alternating."""
    times = {name: [] for name in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for name, fn in fns.items():
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / repeats)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_memory_mib(fn):
    """Peak CUDA memory allocated during fn(), above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench(args):
    gen = torch.Generator().manual_seed(1)
    b, d, n, l = args.batch, args.d, args.n, args.length
    # What Mamba4Rec's core receives: delta = softplus(dt + bias) around mamba_ssm's init
    # range [1e-3, 1e-1], A = -[1, ..., n] (S4D-real), u, B, C of unit scale.
    dt = torch.exp(torch.rand(d, generator=gen) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    bias = dt + torch.log(-torch.expm1(-dt))
    delta = F.softplus(torch.randn(b, d, l, generator=gen) * 0.5 + bias[:, None])
    inputs = [torch.randn(b, d, l, generator=gen), delta,
              -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
              torch.randn(b, n, l, generator=gen), torch.randn(b, n, l, generator=gen)]
    inputs = [t.cuda().requires_grad_(True) for t in inputs]
    gy = torch.randn(b, d, l, generator=gen).cuda()

    def step(core):
        def run():
            y, _ = core(*inputs)
            return [y, *torch.autograd.grad(y, inputs, gy)]
        return run

    cores = {"torch": step(ss._SelectiveScanCore.apply)}
    for block_d, chunk, warps in itertools.product(args.block_d, args.chunk, args.num_warps):
        cores[f"triton d{block_d} c{chunk} w{warps}"] = step(
            lambda *t, bd=block_d, c=chunk, w=warps: sst.selective_scan_triton_core(
                *t, block_d=bd, chunk=c, num_warps=w))
    print(f"b={b} d={d} n={n} l={l} float32, forward + backward; {torch.cuda.get_device_name()}", flush=True)
    ref = cores["torch"]()
    for name, fn in cores.items():
        if name == "torch":
            continue
        errs = [errors(a, r) for a, r in zip(fn(), ref)]
        print(f"{name} vs torch core: max abs / rel difference "
              + ", ".join(f"{q} {a:.1e}/{r:.1e}" for q, (a, r) in zip(("y", "gu", "gdelta", "gA", "gB", "gC"), errs)),
              flush=True)
    del ref
    memory = {name: peak_memory_mib(fn) for name, fn in cores.items()}
    for fn in cores.values():  # warm-up (compilation, allocator)
        for _ in range(2):
            fn()
    ms = time_rounds(cores, args.rounds, args.repeats)
    for name in cores:
        print(f"{name}: {ms[name]:.2f} ms ({ms[name] / ms['torch']:.3f}x torch), "
              f"peak memory {memory[name]:.0f} MiB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="only check against the float64 loop (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128, help="channels (Mamba4Rec: d_inner = 2 * 64)")
    ap.add_argument("--n", type=int, default=32, help="state size")
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--block-d", type=int, nargs="+", default=[sst.BLOCK_D], dest="block_d")
    ap.add_argument("--chunk", type=int, nargs="+", default=[sst.CHUNK])
    ap.add_argument("--num-warps", type=int, nargs="+", default=[sst.NUM_WARPS], dest="num_warps")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    _, reason = sst._load_triton_selective_scan()
    if reason:
        sys.exit(f"bench_selective_scan.py needs triton ({reason}); on a CPU: pip install triton, "
                 "then TRITON_INTERPRET=1 python scripts/bench_selective_scan.py --check")
    if args.check or not torch.cuda.is_available():
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("no GPU: run the check with TRITON_INTERPRET=1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        worst = check(device)
        print(f"Triton selective scan vs float64 loop ({device}): worst relative error {worst:.2e}")
        sys.exit(0 if worst < TOLERANCE[device] else 1)
    bench(args)


if __name__ == "__main__":
    main()
