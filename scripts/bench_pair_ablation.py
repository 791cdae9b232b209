"""Issue #4: where the time of the backward's pair kernel goes (``_pair_grads_all_heads_kernel``
in ``ssd4rec.ops.ssd_scan_heads``), by ablation.

Each variant is the kernel's source with one part cut out (its results are wrong on purpose:
this times, it does not check). All run with the configuration the autotuner picks for the
unchanged kernel, in alternating rounds in one process, at the ML-1M step's shape (bf16,
245,760 tokens in 2 rows, mean history 120, 32 heads of 16, d_state 64). Then the unchanged
kernel under every autotuning configuration, to show their spread. GPU only:

    PYTHONPATH=. python3 scripts/bench_pair_ablation.py --chunk-size 64

Variants: ``no_ddA`` (the decays' gradient: the pairs times C·Bᵀ and their row and column
sums), ``no_pairs`` (the pairs dout[t] . x[s] altogether: dCB and ddA), ``no_dB`` (B's gradient
through the chunk states), ``no_exp`` (the decays' exponential), ``no_dx_dot`` (the dot that
gives dx). A variant whose text no longer matches the kernel stops the script: update the
mutations with the kernel.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan_heads import random_dx_inputs  # noqa: E402  (scripts/, this file's folder)

ROWS_SUM = "tl.sum(pair, axis=0) + tl.where(offs_k == limit - 1, tl.sum(E), 0.0))"
COLS_SUM = "-tl.sum(pair, axis=1) - E, mask=offs_m < Q)"
NO_ROWS = "tl.sum(E) + 0.0 * offs_k)"
NO_COLS = "- E, mask=offs_m < Q)"
MUTATIONS = {
    "unchanged": [],
    "no_ddA": [("        pair *= cbT\n", ""), (ROWS_SUM, NO_ROWS), (COLS_SUM, NO_COLS)],
    "no_pairs": [("        pair = tl.dot(x_m, tl.trans(dout_k)) * decay * dt_m[:, None]", "        pair = 0.0"),
                 ("        dcbT += pair\n", ""), ("        pair *= cbT\n", ""), (ROWS_SUM, NO_ROWS), (COLS_SUM, NO_COLS)],
    "no_dB": [("        dB += tl.dot(x_m, tl.trans(dstate.to(x_m.dtype))) * (to_end * dt_m)[:, None]", "        dB += 0.0")],
    "no_exp": [("tl.exp(tl.minimum(dA_k[None, :] - dA_m[:, None], 0.0))", "tl.minimum(dA_k[None, :] - dA_m[:, None], 0.0)")],
    "no_dx_dot": [("        acc = tl.dot((cbT * decay).to(dout_k.dtype), dout_k)",
                   "        acc = tl.zeros((BLOCK_M, P), dtype=tl.float32) + tl.sum(cbT * decay, axis=1)[:, None]")],
}


def load_variant(source, name, mutations, folder):
    """The module's source with the mutations applied, imported from a file of its own (Triton
    reads a kernel's source from its file)."""
    for old, new in mutations:
        if old not in source:
            sys.exit(f"variant {name}: the kernel no longer contains {old.strip()[:70]!r}")
        source = source.replace(old, new)
    path = os.path.join(folder, f"pair_ablation_{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"pair_ablation_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=245_760)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_pair_ablation.py times GPU kernels: no GPU here")
    import triton

    from ssd4rec.ops import ssd_scan_heads

    inputs = random_dx_inputs(2, args.tokens // 2, 32, 16, 64, args.chunk_size, 120, "cuda", torch.bfloat16,
                              torch.Generator().manual_seed(1))
    ssd_scan_heads.pair_grads_all_heads(*inputs)  # autotunes
    best = ssd_scan_heads._pair_grads_all_heads_kernel.best_config
    print(f"chunk {args.chunk_size}, the autotuner's config: {best}", flush=True)
    source = open(ssd_scan_heads.__file__).read()
    with tempfile.TemporaryDirectory() as folder:
        variants = {}
        for name, mutations in MUTATIONS.items():
            variants[name] = load_variant(source, name, mutations, folder)
            variants[name]._pair_grads_all_heads_kernel.configs = [best]
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, module in variants.items():
                times[name].append(triton.testing.do_bench(lambda: module.pair_grads_all_heads(*inputs),
                                                           warmup=25, rep=100, return_mode="median"))
        for name in variants:
            print(f"  {name}: {statistics.median(times[name]):.3f} ms", flush=True)
        for i, config in enumerate(ssd_scan_heads._pair_grads_all_heads_kernel.configs):
            module = load_variant(source, f"config{i}", [], folder)
            module._pair_grads_all_heads_kernel.configs = [config]
            ms = triton.testing.do_bench(lambda: module.pair_grads_all_heads(*inputs), warmup=10, rep=50,
                                         return_mode="median")
            print(f"  unchanged, config {config}: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
