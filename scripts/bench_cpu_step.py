"""CPU training-step throughput of the Bi-SSD encoder (forward + backward), optionally against
a baseline copy of the ops, interleaved in one process so both see the same machine load.

    python scripts/bench_cpu_step.py                                   # current code only
    python scripts/bench_cpu_step.py --baseline /tmp/base              # current vs baseline

``--baseline DIR`` holds older copies of ssd_scan.py, conv1d.py and mamba2.py (e.g. from
``git show HEAD:ssd4rec/ops/ssd_scan.py``). The same encoder (same weights) is timed with the
current mixer forward / ops and with the baseline ones, alternating run by run; the table
shows medians and the output difference between the two.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time

import torch

try:
    import ssd4rec  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ssd4rec.modules.mamba2 as mamba2_mod  # noqa: E402
from ssd4rec.data.packing import cu_seqlens_from_lengths  # noqa: E402
from ssd4rec.modules import BiSSDEncoder  # noqa: E402

CONFIGS = {
    # name: (d_model, d_state, headdim, chunk, n_seqs, max_len)
    "small": (64, 32, 16, 32, 512, 20),
    "tiny": (32, 16, 16, 32, 512, 20),
    "paper64": (256, 64, 16, 64, 64, 200),
    "paper128": (256, 64, 16, 128, 64, 200),
    "paper256": (256, 64, 16, 256, 64, 200),
}


def load_baseline(dirname):
    """Import the baseline files as stand-alone modules; returns a patching context."""
    def load(name):
        spec = importlib.util.spec_from_file_location(f"_baseline_{name}", os.path.join(dirname, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    scan, conv, mixer = load("ssd_scan"), load("conv1d"), load("mamba2")

    @contextlib.contextmanager
    def patched():
        saved = (mamba2_mod.ssd_scan, mamba2_mod.causal_conv1d, mamba2_mod.Mamba2Mixer.forward,
                 mamba2_mod.GatedRMSNorm.forward)
        # the baseline mixer forward reads ssd_scan / causal_conv1d from its own globals; the
        # current mixer's convolve / ssm (which BiSSDEncoder calls directly) from this module's
        mixer.ssd_scan, mixer.causal_conv1d = scan.ssd_scan, conv.causal_conv1d
        mamba2_mod.ssd_scan, mamba2_mod.causal_conv1d = scan.ssd_scan, conv.causal_conv1d
        mamba2_mod.Mamba2Mixer.forward = mixer.Mamba2Mixer.forward
        mamba2_mod.GatedRMSNorm.forward = mixer.GatedRMSNorm.forward
        try:
            yield
        finally:
            (mamba2_mod.ssd_scan, mamba2_mod.causal_conv1d, mamba2_mod.Mamba2Mixer.forward,
             mamba2_mod.GatedRMSNorm.forward) = saved

    return patched


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["small", "tiny", "paper64", "paper128", "paper256"],
                    choices=list(CONFIGS))
    ap.add_argument("--baseline", default=None, help="folder with baseline ssd_scan.py, conv1d.py, mamba2.py")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    variants = {"new": contextlib.nullcontext}
    if args.baseline:
        variants["base"] = load_baseline(args.baseline)
    print(f"threads={torch.get_num_threads()} fwd+bwd of BiSSDEncoder (1 layer, shared directions), "
          f"median of {args.repeats} after {args.warmup} warm-up, variants interleaved")
    for name in args.configs:
        d_model, d_state, headdim, chunk, n_seqs, max_len = CONFIGS[name]
        torch.manual_seed(args.seed)
        enc = BiSSDEncoder(d_model, num_layers=1, d_state=d_state, headdim=headdim,
                           chunk_size=chunk, dropout=args.dropout)
        lengths = torch.randint(1, max_len + 1, (n_seqs,))
        cu = cu_seqlens_from_lengths(lengths)
        T = int(cu[-1])
        x = torch.randn(T, d_model, requires_grad=True)
        gy = torch.randn(T, d_model)

        def step(ctx, seed=None):
            with ctx():
                if seed is not None:
                    torch.manual_seed(seed)
                y = enc(x, cu)
                y.backward(gy)
            return y

        # same dropout masks for both variants: outputs must agree to rounding
        outs = {}
        for v, ctx in variants.items():
            enc.zero_grad(set_to_none=True)
            x.grad = None
            outs[v] = step(ctx, seed=123).detach()
        diff = ""
        if "base" in outs:
            d = ((outs["new"] - outs["base"]).norm() / outs["base"].norm()).item()
            diff = f"  rel diff {d:.1e}"
        for _ in range(args.warmup):
            for ctx in variants.values():
                step(ctx)
        times = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v, ctx in variants.items():
                enc.zero_grad(set_to_none=True)
                x.grad = None
                t0 = time.perf_counter()
                step(ctx)
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) for v, t in times.items()}
        cols = "  ".join(f"{v} {med[v] * 1e3:8.1f} ms {T / med[v]:8.0f} tok/s" for v in variants)
        speed = f"  speedup {med['base'] / med['new']:.2f}x" if "base" in med else ""
        print(f"{name:>9} d={d_model} n={d_state} p={headdim} q={chunk} T={T}:  {cols}{speed}{diff}",
              flush=True)


if __name__ == "__main__":
    main()
