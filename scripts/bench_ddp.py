"""Data-parallel speed-up of SSD4Rec training: 1 GPU against N GPUs, in one invocation.

For each process count in --gpus (default 1,2) this starts that many fresh processes
(torch.multiprocessing, spawn), one a GPU (NCCL; gloo with --device cpu). Every process
builds the run as ``python main.py --nproc=N`` does: config.yaml + datasets/<dataset>.yaml
+ the --key=value overrides, PackedSequentialDataset, RecBole's dataloaders (with
several processes each rank draws train_batch_size / N rows a step: the global batch
stays train_batch_size), SSD4Rec and our Trainer (DDP through ssd4rec.distributed). Then:

  1. warm-up: --warmup-batches untimed training steps in every process, where mamba_ssm's
     Triton kernels compile and autotune (minutes the first time; per process);
  2. --epochs timed epochs of RecBole's Trainer._train_epoch, each cut to its first
     --max-batches global batches (all of them without the flag). The trainer
     synchronises CUDA before and after; an epoch's time is that of the slowest rank.

Reported per process count: the timed batches and the batches of a full epoch, history
tokens trained on (all ranks), seconds, tokens/s, seconds per batch, seconds per epoch
(measured if the whole epoch ran, else EXTRAPOLATED: batches per epoch x seconds per
timed batch), peak GPU memory; and the speed-up of N processes over 1 (tokens/s ratio,
and epoch-time ratio). The timed batches of the runs differ (each draws its own
permutation), so tokens/s is the fair comparison. Writes OUT/bench_ddp.json and
OUT/bench_ddp.md after each process count, so a run cut short keeps what it finished.

Examples:
    # 2 GPUs (recbole, mamba_ssm, causal_conv1d installed; datasets/ml-1m/ml-1m.inter built)
    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python3 scripts/bench_ddp.py --out bench_ddp --max-batches 200
    # CPU smoke test with gloo, tiny model
    python scripts/bench_ddp.py --out /tmp/b --device cpu --dataset ml-100k --max-batches 3 \\
        --warmup-batches 1 --hidden_size=16 --d_state=16 --train_batch_size=256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# This workplace's GPU hosts must keep NVLink multicast off (it can take shared GPUs out
# of service); their environment sets these, and spawned processes inherit them.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

T_START = time.perf_counter()


def log(message):
    print(f"[{time.perf_counter() - T_START:7.1f}s] {message}", flush=True)


class FirstBatches:
    """The first ``limit`` batches of a RecBole training loader (all if None), counting
    the history tokens each rank packs: sum of item_length over the batch's rows.

    Offers what RecBole's ``_train_epoch`` uses of a loader: iteration, len, shuffle, sampler.
    """

    def __init__(self, loader, limit, length_field):
        self.loader, self.limit, self.length_field = loader, limit, length_field
        self.shuffle, self.sampler = loader.shuffle, loader.sampler
        self.tokens = self.batches = 0

    def __len__(self):
        return len(self.loader) if self.limit is None else min(self.limit, len(self.loader))

    def __iter__(self):
        for batch in self.loader:
            if self.batches == len(self):
                break
            self.tokens += int(batch[self.length_field].sum())
            self.batches += 1
            yield batch


def build(overrides):
    """(config, train_data, trainer, world) for this process, as ssd4rec.run.run builds them."""
    import torch

    from ssd4rec import compat, distributed

    compat.apply()
    from recbole.data import data_preparation
    from recbole.utils import get_model, init_seed

    from ssd4rec.config import collect_values, make_recbole_config
    from ssd4rec.data.sources import ensure_dataset
    from ssd4rec.run import build_dataset, resolve_model
    from ssd4rec.trainer import Trainer

    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", overrides)
    model_class = resolve_model(values.get("model") or "SSD4Rec")
    world = distributed.plan(values)
    distributed.start(world, values)
    with distributed.rank_zero_first():
        values["data_path"] = ensure_dataset(values["dataset"], values.get("data_path") or "datasets/",
                                             download=False, options=values)
    config = make_recbole_config(model_class, values["dataset"], values)
    distributed.configure(config, world)
    torch.backends.cuda.matmul.allow_tf32 = bool(values.get("tf32"))
    torch.backends.cudnn.allow_tf32 = bool(values.get("tf32"))
    init_seed(config["seed"], config["reproducibility"])
    distributed.init_logger(config)
    logging.getLogger().setLevel(logging.WARNING)  # RecBole's per-epoch chatter stays out
    dataset = build_dataset(config, model_class)
    train_data, _, _ = data_preparation(config, dataset)
    distributed.configure_loader(train_data, config)
    init_seed(config["seed"] + world.rank, config["reproducibility"])
    cls = get_model(model_class) if isinstance(model_class, str) else model_class
    model = cls(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model, tempfile.mkdtemp(prefix="bench-ddp-"))
    return config, train_data, trainer, world


def peak_gib(device):
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def worker(local_rank, nproc, port, args, overrides, queue):
    """One process of a run on nproc processes; local rank 0 reports to the launcher."""
    import torch

    if nproc > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                          LOCAL_WORLD_SIZE=str(nproc), RANK=str(local_rank), LOCAL_RANK=str(local_rank))
    from ssd4rec import distributed

    tag = f"[{nproc} proc, rank {local_rank}]"
    say = log if local_rank == 0 else (lambda message: None)
    t0 = time.perf_counter()
    config, train_data, trainer, world = build(overrides)
    device = trainer.device
    field = config["ITEM_LIST_LENGTH_FIELD"]
    say(f"{tag} data and model ready in {time.perf_counter() - t0:.1f} s: {len(train_data)} batches an epoch "
        f"of {config['train_batch_size']} rows ({config['train_batch_size'] // world.size} a rank), "
        f"{len(train_data._dataset)} training rows, device {device}")

    t0 = time.perf_counter()
    warm = FirstBatches(train_data, args.warmup_batches, field)
    if args.warmup_batches > 0:
        trainer._train_epoch(warm, 0)
    say(f"{tag} warm-up: {warm.batches} batches in {time.perf_counter() - t0:.1f} s (compile/autotune)")

    epochs = []
    for epoch in range(1, args.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        capped = FirstBatches(train_data, args.max_batches, field)
        graphs = trainer.graphed_steps
        replays_before = graphs.replays if graphs is not None else 0
        trainer._train_epoch(capped, epoch)
        ranks = distributed.gather({"seconds": trainer.epoch_seconds[-1], "tokens": capped.tokens,
                                    "batches": capped.batches, "peak_gib": peak_gib(device),
                                    "graph_replays": graphs.replays - replays_before if graphs is not None else 0,
                                    "graphs": len(graphs.graphs) if graphs is not None else 0})
        seconds = max(r["seconds"] for r in ranks)
        tokens = sum(r["tokens"] for r in ranks)
        row = {
            "epoch": epoch,
            "timed_batches": capped.batches,
            "batches_per_epoch": len(train_data),
            "whole_epoch": capped.batches == len(train_data),
            "seconds": seconds,
            "seconds_per_rank": [r["seconds"] for r in ranks],
            "tokens": tokens,
            "tokens_per_rank": [r["tokens"] for r in ranks],
            "tokens_per_s": tokens / seconds,
            "seconds_per_batch": seconds / capped.batches,
            "seconds_per_epoch": seconds / capped.batches * len(train_data),
            "peak_gib_per_rank": [r["peak_gib"] for r in ranks],
            # steps replayed from CUDA graphs (graph_step), and graphs held, per rank
            "graph_replays_per_rank": [r["graph_replays"] for r in ranks],
            "graphs_per_rank": [r["graphs"] for r in ranks],
        }
        epochs.append(row)
        label = "measured" if row["whole_epoch"] else "extrapolated"
        say(f"{tag} epoch {epoch}: {capped.batches}/{len(train_data)} batches, {tokens} tokens in {seconds:.2f} s: "
            f"{row['tokens_per_s']:,.0f} tokens/s, {row['seconds_per_batch'] * 1e3:.1f} ms/batch, "
            f"{row['seconds_per_epoch']:.1f} s/epoch ({label}); rank seconds {row['seconds_per_rank']}; "
            f"graphed steps {row['graph_replays_per_rank']}, graphs {row['graphs_per_rank']}")
    if local_rank == 0:
        queue.put({
            "processes": world.size,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": world.backend if world.size > 1 else None,
            "rows_per_rank_step": config["train_batch_size"] // world.size,
            "graph_step": trainer.graph_step,
            "gradients": "flat all-reduce" if trainer.flat_gradients is not None else (
                "DDP reducer" if world.size > 1 else None),
            "warmup_batches": warm.batches,
            "epochs": epochs,
        })
    distributed.stop()


def summarise(phase):
    """Totals over the timed epochs of one process count."""
    epochs = phase["epochs"]
    seconds = sum(e["seconds"] for e in epochs)
    batches = sum(e["timed_batches"] for e in epochs)
    tokens = sum(e["tokens"] for e in epochs)
    return {
        "timed_batches": batches,
        "batches_per_epoch": epochs[0]["batches_per_epoch"],
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "seconds_per_batch": seconds / batches,
        "seconds_per_epoch": seconds / batches * epochs[0]["batches_per_epoch"],
        "seconds_per_epoch_is": "measured" if all(e["whole_epoch"] for e in epochs) else "extrapolated",
        "peak_gib": max((g for e in epochs for g in e["peak_gib_per_rank"] if g is not None), default=None),
    }


def write(out, results):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "bench_ddp.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "bench_ddp.json")
    lines = [
        f"# SSD4Rec data-parallel training, {results['dataset']}",
        "",
        f"Config: config.yaml + datasets/{results['dataset']}.yaml, overrides {results['overrides']}; "
        f"global batch {results['train_batch_size']} rows; {results['warmup_batches']} warm-up batches per "
        f"process; epochs cut to their first {results['max_batches'] or 'all'} batches.",
        "",
        "| processes | device | gradients (graph_step) | rows a rank a step | timed batches (of an epoch) | tokens | seconds "
        "| tokens/s | ms/batch | s/epoch | peak GiB | speed-up (tokens/s) | speed-up (s/epoch) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, phase in sorted(results["phases"].items(), key=lambda kv: int(kv[0])):
        s = phase["summary"]
        up = results["speedup"].get(n, {})
        peak = "-" if s["peak_gib"] is None else f"{s['peak_gib']:.1f}"
        lines.append(
            f"| {n} | {phase['device_name']} | {phase.get('gradients') or '-'} ({phase.get('graph_step')}) "
            f"| {phase['rows_per_rank_step']} | {s['timed_batches']} "
            f"({s['batches_per_epoch']}) | {s['tokens']:,} | {s['seconds']:.2f} | {s['tokens_per_s']:,.0f} "
            f"| {s['seconds_per_batch'] * 1e3:.1f} | {s['seconds_per_epoch']:.1f} ({s['seconds_per_epoch_is']}) "
            f"| {peak} | {up.get('tokens_per_s', float('nan')):.2f}x | {up.get('seconds_per_epoch', float('nan')):.2f}x |"
        )
    lines += ["", "s/epoch is extrapolated (batches per epoch x seconds per timed batch) unless marked measured."]
    (out / "bench_ddp.md").write_text("\n".join(lines) + "\n")


def environment():
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    from importlib import metadata

    for name in ("triton", "mamba_ssm", "causal_conv1d", "recbole"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env.update({k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "CUDA_VISIBLE_DEVICES")})
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other --key=value arguments override the config, as in main.py.")
    parser.add_argument("--out", required=True, help="folder for bench_ddp.json and bench_ddp.md")
    parser.add_argument("--gpus", default="1,2", help="process counts to compare, e.g. 1,2 (GPUs on CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per process count")
    parser.add_argument("--max-batches", type=int, default=None, help="time only the first K global batches of an epoch")
    parser.add_argument("--warmup-batches", type=int, default=10, help="untimed steps per process before timing")
    args, rest = parser.parse_known_args(argv)

    import torch

    from ssd4rec.config import parse_overrides
    from ssd4rec.distributed import free_port

    overrides = {"dataset": args.dataset, "show_progress": False, **parse_overrides(rest)}
    if args.device == "cpu":
        overrides["gpu_id"] = ""  # RecBole's CPU switch; gloo between the processes
    counts = [int(n) for n in args.gpus.split(",")]
    if args.device == "cuda" and max(counts) > torch.cuda.device_count():
        parser.error(f"--gpus {args.gpus} needs {max(counts)} GPUs, {torch.cuda.device_count()} visible")
    if args.epochs < 1 or (args.max_batches is not None and args.max_batches < 1) or args.warmup_batches < 0:
        parser.error("--epochs and --max-batches must be >= 1, --warmup-batches >= 0")

    from ssd4rec.config import collect_values

    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", overrides)
    results = {
        "dataset": args.dataset, "overrides": {k: v for k, v in overrides.items() if k != "dataset"},
        "train_batch_size": values["train_batch_size"], "max_batches": args.max_batches,
        "warmup_batches": args.warmup_batches, "epochs": args.epochs, "argv": sys.argv[1:] if argv is None else argv,
        "env": environment(), "phases": {}, "speedup": {},
    }
    log(f"environment: {results['env']}")
    out = Path(args.out)
    ctx = torch.multiprocessing.get_context("spawn")
    for n in counts:
        log(f"--- {n} process(es) on {args.device} ---")
        queue = ctx.SimpleQueue()
        torch.multiprocessing.spawn(worker, args=(n, free_port("127.0.0.1"), args, overrides, queue),
                                    nprocs=n, join=True)
        phase = queue.get()
        phase["summary"] = summarise(phase)
        results["phases"][str(n)] = phase
        base = results["phases"].get(str(counts[0]))
        for m, other in results["phases"].items():
            results["speedup"][m] = {
                "tokens_per_s": other["summary"]["tokens_per_s"] / base["summary"]["tokens_per_s"],
                "seconds_per_epoch": base["summary"]["seconds_per_epoch"] / other["summary"]["seconds_per_epoch"],
            }
        write(out, results)
        s = phase["summary"]
        log(f"{n} process(es): {s['tokens_per_s']:,.0f} tokens/s, {s['seconds_per_epoch']:.1f} s/epoch "
            f"({s['seconds_per_epoch_is']}); speed-up over {counts[0]}: "
            f"{results['speedup'][str(n)]['tokens_per_s']:.2f}x (tokens/s)")
    log(f"wrote {out / 'bench_ddp.json'} and {out / 'bench_ddp.md'}")
    return results


if __name__ == "__main__":
    main()
