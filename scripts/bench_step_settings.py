"""Host-side settings of SSD4Rec's training step, side by side in one process (GPU).

The ML-1M bf16 step on an H100 runs about 18 ms of GPU kernels in a 22 to 27 ms step (session
18): the host's dispatch, not the GPU, sets the pace, and it differs from machine to machine. So
settings that change host work are compared here in one process, on one trainer, in
alternating rounds of --batches batches (after a warm-up of each):

  default        what the code does: fused Adam, the scored-only scan's weights compiled
  eager_weights  ssd4rec.ops.ssd_at's elementwise parts eager (its ``_run`` bypassed)
  cublaslt       torch.backends.cuda.preferred_blas_library("cublaslt") for the matmuls
  foreach_adam   torch.optim.Adam(fused=False): PyTorch's default foreach implementation
  loader_worker  the training batches from a loader with RecBole's `worker: 1` (the collate
                 in a worker process, off the thread that launches the step)

--mm-host: instead, the host time to enqueue one bf16 matmul of the step's in_proj and FFN
shapes, the token count repeated or new at every call (whether cuBLAS's per-shape setup costs
host time when every batch has another length).

    PYTHONPATH=. python3 scripts/bench_step_settings.py
    PYTHONPATH=. python3 scripts/bench_step_settings.py --mm-host
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_variants  # noqa: E402  (scripts/: the variant trainer and the timed run)
import benchmark  # noqa: E402

from ssd4rec.ops import ssd_at  # noqa: E402

SETTINGS = ["default", "eager_weights", "cublaslt", "foreach_adam", "loader_worker"]


def mm_host(rounds=2, calls=200):
    """Print the host microseconds per torch.mm enqueue (and wall per call) for three patterns."""
    W1 = torch.randn(1184, 256, device="cuda", dtype=torch.bfloat16)  # in_proj at hidden 256
    W2 = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)  # the FFN's first matmul
    base = torch.randn(140000, 256, device="cuda", dtype=torch.bfloat16)
    patterns = {"same T": [120000] * calls,
                "new T each call": [100000 + 37 * i for i in range(calls)],
                "T rounded to 4096": [(100000 + 37 * i + 4095) // 4096 * 4096 for i in range(calls)]}
    for r in range(rounds):  # round 0 includes CUDA and cuBLAS initialisation
        for name, sizes in patterns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for T in sizes:
                torch.mm(base[:T], W1.T)
                torch.mm(base[:T], W2.T)
            enqueued = time.perf_counter()
            torch.cuda.synchronize()
            n = 2 * len(sizes)
            print(f"round {r} {name:18s}: host {(enqueued - t0) / n * 1e6:7.1f} us/call, "
                  f"wall {(time.perf_counter() - t0) / n * 1e6:7.1f} us/call", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=100, help="batches per timed run")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--mm-host", action="store_true", help="the matmul enqueue timing only")
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    args = ap.parse_args()
    if args.mm_host:
        return mm_host()
    args.dataset, args.device, args.ssd_max_history, args.batch_size = "ml-1m", "cuda", 200, 1024
    benchmark.record_env(torch.device("cuda"))
    config, _, train_data, _, _ = benchmark.build_pipeline(
        "SSD4Rec", {"train_batch_size": 1024, "var_len": True, "max_history_length": 200}, args)
    trainer = bench_variants.ssd4rec_variant(config, train_data, {})
    loaders = {name: train_data for name in args.settings}
    if "loader_worker" in args.settings:
        _, _, loaders["loader_worker"], _, _ = benchmark.build_pipeline(
            "SSD4Rec", {"train_batch_size": 1024, "var_len": True, "max_history_length": 200, "worker": 1}, args)
    compiled_run, fused = ssd_at._run, trainer.optimizer
    foreach = torch.optim.Adam(trainer.model.parameters(), lr=config["learning_rate"], fused=False)

    def apply(name):
        ssd_at._run = (lambda fn, compiled, *a: fn(*a)) if name == "eager_weights" else compiled_run
        torch.backends.cuda.preferred_blas_library("cublaslt" if name == "cublaslt" else "default")
        trainer.optimizer = foreach if name == "foreach_adam" else fused

    epoch, runs = 0, {name: [] for name in args.settings}
    for name in args.settings:
        apply(name)
        t0 = time.perf_counter()
        bench_variants.time_run(trainer, loaders[name], 8, epoch, "bf16")
        epoch += 1
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(args.rounds):
        for name in args.settings:
            apply(name)
            row = bench_variants.time_run(trainer, loaders[name], args.batches, epoch, "bf16")
            epoch += 1
            runs[name].append(row["s_per_batch"] * 1e3)
            print(f"#{r} {name:14s} {runs[name][-1]:.2f} ms/batch", flush=True)
    apply("default")
    for name in args.settings:
        print(f"{name:14s} median {statistics.median(runs[name]):.2f} ms/batch, runs "
              + " / ".join(f"{v:.2f}" for v in runs[name]))


if __name__ == "__main__":
    main()
