"""Benchmark of SSD4Rec against RecBole's SASRec and GRU4Rec on ML-1M, in one process.

Parts (run in the order given by --parts; results are written to --out after every part,
so a run cut off at a time limit keeps what it finished):

  ssd4rec   ML-1M through RecBole at the paper config (config.yaml + datasets/ml-1m.yaml,
            var_len True, batch 1024; --ssd-max-history 200 keeps the last 200 items of each
            history, as the official code does): PackedSequentialDataset, data_preparation,
            SSD4Rec and our Trainer; its _train_epoch (the sync-free loop, as config.yaml's
            sync_free_step: True; see the part step), timed with CUDA synchronisation. fp32
            epochs (--epochs; epoch 0 includes the Triton compile and autotune of this
            process if no earlier part ran the kernels), full-ranking evaluations of the
            test split (all 6,040 users), a torch.profiler table of a few fp32 training
            steps, then one epoch per --amp mode: tf32 (cuBLAS TF32 matmuls) or bf16 (the
            loss computation under torch.autocast(bfloat16); parameters, backward and
            optimizer as in fp32). An epoch that would outrun its cap (--epoch-caps,
            --amp-max-s) is stopped after the batch in progress and extrapolated to the full
            epoch from the steady per-batch time of the second half of its timed batches
            (batches are shuffled, so the timed ones are a random sample); the outputs say
            which numbers are extrapolated.
  step      the training loops compared on the same SSD4Rec pipeline (as ssd4rec, in one
            process): RecBole's own Trainer._train_epoch (sync_free_step False: loss.item() and
            a NaN check every step) against ours (True: the loss read once per run, batches
            copied to the GPU one ahead from pinned memory). After --step-warmup batches of
            each (Triton compile and autotune), --step-repeats rounds of one run of each loop,
            a run being the first --step-batches batches of an epoch, per --step-precisions
            mode. Compared by each run's synchronised wall time over all its batches (s per
            batch), not per-batch stamps: without syncs the host runs ahead of the GPU.
  encoder   BiSSDEncoder (d_model 256, 2 layers, d_state 64, headdim 16, expand 2, shared
            directions, dropout 0.2, train mode) forward+backward on packed batches of equal-
            length sequences (--lengths) with the same total tokens (--tokens): tokens/s and
            peak memory, per precision (--precisions: fp32 = torch's default, TF32 off; tf32 =
            cuBLAS TF32 matmuls; bf16 = bf16 autocast).
  sweep     time per token and peak memory against sequence length (--sweep-lengths, synthetic
            histories, --sweep-tokens tokens per step, fp32, forward+backward): our encoder on
            the packed stream against SASRec's (RecBole's TransformerEncoder, hidden 256, 2
            layers, 2 heads, causal mask as SASRec builds it) on (tokens / L, L) rows. An out
            of memory is recorded as such.
  mixer     one Mamba2 mixer alone: ours (Mamba2Mixer) vs mamba_ssm's fused Mamba2, (1, T)
            tokens packed as sequences of 200, forward+backward.
  sasrec    RecBole's SASRec on ML-1M (hidden 256, 2 layers, 2 heads, L=200, CE, batch 1024,
            fp32), epochs through the same Trainer (--sasrec-max-s caps each), for the ratio;
            then one epoch per --baseline-amp mode (tf32, bf16, as SSD4Rec's --amp) and, with
            --baseline-anomaly, one fp32 epoch with autograd anomaly mode on: RecBole 1.2.1
            switches it on when it imports its sequential models (sine.py), so that is the
            speed a plain RecBole run gets; ssd4rec.compat switches it off for every other run.
  gru4rec   RecBole's GRU4Rec on ML-1M (embedding 64, hidden 128, L=200, CE, batch 1024, fp32),
            likewise (--gru4rec-max-s).

Besides the JSON (--out), it writes benchmark.csv and benchmark.md beside it: one row per
measurement (what, model, precision, length, seconds, tokens/s, peak GiB, note).
`--plot DIR` (no GPU needed; matplotlib, `pip install -e ".[bench]"`) turns DIR/benchmark.csv
into DIR/benchmark.png: time per token and peak memory against length.

Examples (one H100; mamba_ssm, causal_conv1d, recbole installed; datasets/ml-1m/ml-1m.inter built):
    PYTHONPATH=. python3 scripts/benchmark.py --out results/benchmark/bench.json        # everything
    PYTHONPATH=. python3 scripts/benchmark.py --out bench.json --parts ssd4rec,sasrec,gru4rec,sweep \
        --ssd-max-history 200 --epoch-caps 60 --amp bf16 --amp-max-s 40 --budget-s 540
    PYTHONPATH=. python3 scripts/benchmark.py --out results/step/bench.json --parts step \
        --ssd-max-history 200 --step-batches 50 --step-repeats 3 --step-precisions fp32,bf16
    python scripts/benchmark.py --plot results/benchmark
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T_START = time.perf_counter()
RESULTS = {"args": None, "env": {}, "notes": []}
_STATE = {"triton_used": False}


def log(msg=""):
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def elapsed():
    return time.perf_counter() - T_START


def save(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(tmp, path)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device):
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def reserved_gib(device):
    """The most memory the caching allocator held (what nvidia-smi sees of it): with CUDA
    graphs the peak of allocated memory misses the graphs' pool, which replays reuse
    without allocating."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_reserved() / 2**30


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def tf32_mode(precision):
    """cuBLAS TF32 matmuls on for precision 'tf32' only (torch's default is off), for the
    whole measurement: forward and backward."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def autocast_for(precision, device):
    """bf16 autocast for precision 'bf16' (forward only, as recommended), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def record_env(device):
    env = RESULTS["env"]
    env["torch"] = torch.__version__
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
    # mamba_ssm must be imported through ssd4rec's loader first (it works around mamba_ssm's
    # import of the Mamba-1 extension); a plain `import mamba_ssm` before it would fail and
    # leave half the package in sys.modules.
    from ssd4rec.ops.conv1d import _load_cuda_conv1d
    from ssd4rec.ops.ssd_scan import _load_triton_scan

    env["ssd_scan_triton"] = _load_triton_scan()[1] or "ok"
    env["conv1d_cuda"] = _load_cuda_conv1d()[1] or "ok"
    from importlib import metadata

    for dist in ("triton", "mamba_ssm", "causal_conv1d", "recbole", "numpy", "pandas"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "not installed"
    env["allow_tf32_default"] = torch.backends.cuda.matmul.allow_tf32
    env["device"] = str(device)
    log(f"env: {env}")


# --------------------------------------------------------------------------------------------
# encoder / mixer throughput
# --------------------------------------------------------------------------------------------
def time_steps(step, device, warmup, repeats):
    """(first call s, [per-step s]) with CUDA events (host clock + sync on CPU)."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return first, times


def bench_encoder(args, device):
    from ssd4rec.data.packing import segment_layout
    from ssd4rec.modules import BiSSDEncoder

    torch.manual_seed(0)
    encoder = BiSSDEncoder(d_model=256, num_layers=2, d_state=64, d_conv=4, expand=2, headdim=16,
                           chunk_size=256, dropout=0.2, beta=0.1, shared_directions=True,
                           align_backward=False, layer_norm_eps=1e-12).to(device).train()
    rows = RESULTS.setdefault("encoder", [])
    RESULTS["encoder_triton_warm_before"] = _STATE["triton_used"]
    for prec in args.precisions:
        for length in args.lengths:
            if elapsed() > args.budget_s - 20:
                RESULTS["notes"].append(f"encoder {prec} L={length} skipped: out of time budget")
                continue
            nseq = max(1, args.tokens // length)
            total = nseq * length
            cu = torch.arange(0, total + 1, length, device=device)
            seq_idx, _, reverse_index = segment_layout(cu, total)
            gen = torch.Generator(device=device).manual_seed(length)
            x = torch.randn(total, 256, device=device, generator=gen).requires_grad_()
            gy = torch.randn(total, 256, device=device, generator=gen)

            def step():
                encoder.zero_grad(set_to_none=True)
                x.grad = None
                with autocast_for(prec, device):
                    out = encoder(x, cu, seq_idx, reverse_index)
                out.backward(gy.to(out.dtype))

            reset_peak(device)
            with tf32_mode(prec):
                first, times = time_steps(step, device, args.warmup, args.repeats)
            _STATE["triton_used"] = True
            med = statistics.median(times)
            row = dict(precision=prec, seq_len=length, sequences=nseq, tokens=total,
                       first_call_s=round(first, 3), median_s=med,
                       min_s=min(times), max_s=max(times), repeats=len(times),
                       tokens_per_s=total / med, peak_gib=peak_gib(device))
            rows.append(row)
            log(f"encoder {prec:5s} L={length:5d} x{nseq:5d} T={total}: {med * 1e3:8.1f} ms "
                f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) "
                f"{total / med / 1e6:6.2f} M tok/s, peak {row['peak_gib'] or 0:.1f} GiB, first {first:.1f} s")
            del x, gy, seq_idx, reverse_index
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        by_len = {r["seq_len"]: r for r in rows if r["precision"] == prec}
        lo, hi = min(args.lengths), max(args.lengths)
        if lo in by_len and hi in by_len:
            ratio = (by_len[hi]["median_s"] / by_len[hi]["tokens"]) / (by_len[lo]["median_s"] / by_len[lo]["tokens"])
            RESULTS.setdefault("encoder_per_token_ratio", {})[f"{prec} L{hi}/L{lo}"] = ratio
            log(f"encoder {prec}: per-token time L={hi} / L={lo} = {ratio:.3f}")


def bench_mixer(args, device):
    from ssd4rec.modules import Mamba2Mixer
    from ssd4rec.ops.ssd_scan import _load_triton_scan

    mixers = {}
    torch.manual_seed(0)
    mixers["ours (Mamba2Mixer)"] = Mamba2Mixer(256, d_state=64, d_conv=4, expand=2, headdim=16).to(device)
    if _load_triton_scan()[0] is not None:
        try:
            from mamba_ssm.modules.mamba2 import Mamba2

            mixers["mamba_ssm Mamba2 (fused)"] = Mamba2(256, d_state=64, d_conv=4, expand=2, headdim=16).to(device)
        except ImportError as err:
            RESULTS["notes"].append(f"mamba_ssm Mamba2 not importable: {err}")
    rows = RESULTS.setdefault("mixer", [])
    total = (args.tokens // 200) * 200
    seq_idx = torch.arange(total, device=device, dtype=torch.int32).div(200, rounding_mode="floor")[None]
    for prec in [p for p in args.precisions if p != "tf32"]:
        for name, mixer in mixers.items():
            if elapsed() > args.budget_s - 15:
                RESULTS["notes"].append(f"mixer {name} {prec} skipped: out of time budget")
                continue
            u = torch.randn(1, total, 256, device=device).requires_grad_()
            gy = torch.randn(1, total, 256, device=device)

            def step():
                mixer.zero_grad(set_to_none=True)
                u.grad = None
                with autocast_for(prec, device):
                    out = mixer(u, seq_idx=seq_idx)
                out.backward(gy.to(out.dtype))

            reset_peak(device)
            with tf32_mode(prec):
                first, times = time_steps(step, device, args.warmup, args.repeats)
            _STATE["triton_used"] = True
            med = statistics.median(times)
            rows.append(dict(mixer=name, precision=prec, tokens=total, median_s=med,
                             tokens_per_s=total / med, peak_gib=peak_gib(device), first_call_s=first))
            log(f"mixer {name:26s} {prec}: {med * 1e3:7.1f} ms, {total / med / 1e6:6.2f} M tok/s fwd+bwd, "
                f"peak {peak_gib(device) or 0:.1f} GiB")
            del u, gy


# --------------------------------------------------------------------------------------------
# RecBole pipelines
# --------------------------------------------------------------------------------------------
class _StopEpoch(Exception):
    pass


def _stub_tensorboard_if_missing():
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as err:
        import recbole.trainer.trainer as rt

        class _NoWriter:
            def __getattr__(self, name):
                return lambda *a, **k: None

        rt.get_tensorboard = lambda logger: _NoWriter()
        RESULTS["notes"].append(f"tensorboard missing ({err}); RecBole's SummaryWriter stubbed "
                                "(only fit() writes to it; nothing timed here uses it)")


def build_pipeline(model_name, overrides, args):
    """config -> dataset -> data_preparation -> model -> our Trainer, as ssd4rec.run.run does."""
    from ssd4rec import compat

    compat.apply()
    from recbole.data import data_preparation
    from recbole.utils import get_model, init_logger, init_seed

    from ssd4rec.config import collect_values, make_recbole_config
    from ssd4rec.data.sources import ensure_dataset
    from ssd4rec.run import build_dataset, resolve_model
    from ssd4rec.trainer import Trainer

    _stub_tensorboard_if_missing()
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets",
                               {"model": model_name, "dataset": args.dataset, **overrides})
    model_class = resolve_model(model_name)
    values["data_path"] = ensure_dataset(args.dataset, values.get("data_path") or "datasets/",
                                         download=False, options=values)
    config = make_recbole_config(model_class, args.dataset, values)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logging.getLogger().setLevel(logging.WARNING)  # keep RecBole's per-epoch chatter out of the log
    t0 = time.perf_counter()
    dataset = build_dataset(config, model_class)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    t_data = time.perf_counter() - t0
    init_seed(config["seed"], config["reproducibility"])
    cls = get_model(model_class) if isinstance(model_class, str) else model_class
    model = cls(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model, tempfile.mkdtemp(prefix=f"bench-{model_name}-"))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{model_name}: data {t_data:.1f} s, {len(train_data)} train batches, "
        f"{len(train_data._dataset)} training samples, {n_params / 1e6:.2f} M params, device {config['device']}")
    return config, trainer, train_data, test_data, t_data


def timed_epoch(trainer, train_data, epoch_idx, amp, max_s, token_counter):
    """One epoch of the Trainer's _train_epoch (stopped early past max_s), synchronised.

    The loop is the trainer's: the sync-free one unless trainer.sync_free_step is False. With
    it the host runs ahead of the GPU, so the per-batch stamps (batch_start_s and the steady
    rate taken from them) say when a step was queued; time_s is synchronised at both ends.

    amp: None (fp32, torch's default: TF32 off), "tf32" (cuBLAS TF32 matmuls for the whole
    epoch) or "bf16" (the loss computation under torch.autocast(bfloat16); backward and the
    optimizer step as RecBole does them, parameters stay fp32, no grad scaler needed).
    Returns a dict with the measured time, the batches done and the extrapolated full epoch.
    """
    model = trainer.model
    device = trainer.device
    done = [0]
    stamps = []
    tokens = [0.0]

    class Counted:
        """train_data, each batch stamped and its tokens counted (on the host) as the loop
        draws it; with the one-batch prefetch, while the step before it is being queued."""
        shuffle, sampler = train_data.shuffle, train_data.sampler

        def __len__(self):
            return len(train_data)

        def __iter__(self):
            for interaction in train_data:
                now = time.perf_counter() - t0
                if max_s is not None and done[0] > 0 and now > max_s:
                    raise _StopEpoch
                stamps.append(now)
                done[0] += 1
                tokens[0] += float(token_counter(interaction))
                yield interaction

    def loss_func(interaction):
        if amp == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return model.calculate_loss(interaction)
        return model.calculate_loss(interaction)

    # CUDA graphs (graph_step) capture the model's own loss, which a loss_func would bypass:
    # with them the trainer's loss runs, its autocast set to this epoch's precision.
    graphs = getattr(trainer, "graphed_steps", None)
    saved_amp = getattr(trainer, "amp_dtype", None)
    if graphs is not None:
        trainer.amp_dtype = graphs.amp_dtype = torch.bfloat16 if amp == "bf16" else None
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    partial = False
    loss = None
    try:
        with tf32_mode("tf32" if amp == "tf32" else "fp32"):
            loss = trainer._train_epoch(Counted(), epoch_idx, loss_func=None if graphs is not None else loss_func,
                                        show_progress=False)
    except _StopEpoch:
        partial = True
    finally:
        if graphs is not None:
            trainer.amp_dtype = graphs.amp_dtype = saved_amp
    sync(device)
    t = time.perf_counter() - t0
    n_total = len(train_data)
    n = done[0]
    row = dict(epoch=epoch_idx, amp=amp or "fp32", time_s=t, batches=n, batches_total=n_total,
               partial=partial, tokens=tokens[0], peak_gib=peak_gib(device), reserved_gib=reserved_gib(device),
               mean_loss=None if loss is None else loss / n,
               # seconds from epoch start at which batch 1, 2, 3, 5, 9, ... was drawn from the loader
               batch_start_s={str(k): round(stamps[k - 1], 3) for k in (1, 2, 3, 5, 9, 17, 33, 65, 129)
                              if k <= len(stamps)})
    if graphs is not None:  # totals over the trainer's life: steps replayed, batches left eager
        row.update(graph_replays=graphs.replays, graph_eager=graphs.eager, graphs=len(graphs.graphs),
                   graph_capture_memory=list(graphs.capture_memory))
    if n > 0:
        row["tokens_per_s"] = row["tokens"] / t
        row["s_per_batch"] = t / n
    if n > 1:
        # steady rate from the second half of the timed batches: Triton compile/autotune
        # (the first batch of a process, and a few later ones that meet new integer
        # specialisations) stays out of it
        k = n // 2
        steady = (t - stamps[k]) / (n - k)
        row["steady_s_per_batch"] = steady
        row["steady_epoch_s"] = n_total * steady
    if partial and n > 1:
        row["est_full_epoch_s"] = t + (n_total - n) * row["steady_s_per_batch"]
    elif partial and n == 1:
        row["est_full_epoch_s"] = t * n_total
    else:
        row["est_full_epoch_s"] = t
    return row


def evaluate_timed(trainer, test_data, label):
    device = trainer.device
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    sync(device)
    t = time.perf_counter() - t0
    users = len(test_data._dataset)  # one test row per user (leave-one-out)
    row = dict(label=label, time_s=t, users=users, peak_gib=peak_gib(device),
               result={k: float(v) for k, v in (result or {}).items()})
    log(f"eval {label}: {t:.2f} s for the full-ranking test evaluation ({users} users): {row['result']}")
    return row


def profile_steps(trainer, train_data, steps, device, path, precision="fp32"):
    """torch.profiler over a few training steps, the same work as RecBole's loop, at precision
    fp32, tf32 or bf16 (as timed_epoch's modes)."""
    from torch.profiler import ProfilerActivity, profile

    model, opt = trainer.model, trainer.optimizer
    model.train()
    it = iter(train_data)
    batches = [next(it) for _ in range(steps + 2)]
    # data loading alone (collate + host->device copy), the same batches
    sync(device)
    t0 = time.perf_counter()
    moved = [b.to(device) for b in batches]
    sync(device)
    t_copy = (time.perf_counter() - t0) / len(batches)
    # The loader's iterator is made (and its first batch drawn) before the clock starts: making
    # it draws the epoch's permutation, a one-off per epoch that divided over a few steps read
    # as 20 ms of collate per batch in sessions 13-14 (the collate itself is 1 to 2 ms).
    it = iter(train_data)
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    t_load = (time.perf_counter() - t0) / steps

    def one(inter):
        opt.zero_grad()
        with tf32_mode(precision), autocast_for(precision, device):
            loss = model.calculate_loss(inter)
        loss.item()
        with tf32_mode(precision):
            loss.backward()
        opt.step()

    for inter in moved[:2]:
        one(inter)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for inter in moved[2:]:
            one(inter)
        sync(device)
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    # kernels only (operator rows would count the same kernels a second time)
    from torch.autograd import DeviceType

    busy = sum(getattr(e, dev_attr, 0) for e in ka if getattr(e, "device_type", None) == DeviceType.CUDA) / 1e6
    sort_key = dev_attr if device.type == "cuda" else "self_cpu_time_total"
    table = ka.table(sort_by=sort_key, row_limit=60)
    with open(path, "w") as f:
        f.write(f"{steps} training steps, wall {wall:.3f} s, GPU kernel time {busy:.3f} s "
                f"({100 * busy / wall:.0f}% busy)\n")
        f.write(f"data loader: {t_load * 1e3:.1f} ms/batch (collate), host->device {t_copy * 1e3:.1f} ms/batch\n\n")
        f.write(table)
    rows = []
    for e in sorted(ka, key=lambda e: -getattr(e, sort_key, 0))[:50]:
        rows.append(dict(name=e.key[:90], self_device_ms=getattr(e, dev_attr, 0) / 1e3 / steps,
                         calls_per_step=e.count / steps))
    log(f"profile: {steps} steps wall {wall:.3f} s, GPU busy {busy:.3f} s ({100 * busy / wall:.0f}%), "
        f"loader {t_load * 1e3:.1f} ms/batch, h2d {t_copy * 1e3:.1f} ms/batch")
    return dict(steps=steps, wall_s=wall, gpu_kernel_s=busy, loader_s_per_batch=t_load,
                h2d_s_per_batch=t_copy, top=rows)


def bench_ssd4rec(args, device):
    """SSD4Rec epochs in the order: --epochs fp32 epochs, then one per --amp mode; the test
    evaluations (--evals) run after the first epoch, so that each precision's run from the
    same seed gives its test metrics after one epoch."""
    res = RESULTS.setdefault("ssd4rec", {})
    res["triton_warm_before"] = _STATE["triton_used"]
    config, trainer, train_data, test_data, t_data = build_pipeline(
        "SSD4Rec", {"train_batch_size": args.batch_size, "var_len": True,
                    "max_history_length": args.ssd_max_history, **args.ssd_set}, args)
    res["max_history_length"] = args.ssd_max_history
    res["config_overrides"] = args.ssd_set
    res["data_prep_s"] = t_data
    res["train_batches"] = len(train_data)
    res["train_samples"] = len(train_data._dataset)
    field = trainer.model.ITEM_SEQ_LEN
    res["epochs"] = []
    res["eval"] = []

    def counter(inter):
        return inter[field].sum()

    modes = [None] * args.epochs + list(args.amp)
    for epoch, amp in enumerate(modes):
        if elapsed() > args.budget_s - 30:
            RESULTS["notes"].append(f"ssd4rec {amp or 'fp32'} epoch {epoch} skipped: out of time budget")
            continue
        if amp is None:
            cap = args.epoch_caps[min(epoch, len(args.epoch_caps) - 1)] if args.epoch_caps else 1e9
        else:
            cap = args.amp_max_s
        cap = min(cap, max(20.0, args.budget_s - elapsed() - args.reserve_s))
        row = timed_epoch(trainer, train_data, epoch, amp, cap, counter)
        row["triton_warm_before"] = _STATE["triton_used"]
        _STATE["triton_used"] = True
        res["epochs"].append(row)
        _log_epoch("SSD4Rec", row)
        save(args.out)
        if epoch == 0:
            for i in range(args.evals):
                if elapsed() > args.budget_s - 15:
                    break
                res["eval"].append(evaluate_timed(trainer, test_data, f"test #{i + 1} after epoch 0 ({row['amp']})"))
                save(args.out)
            if args.profile_steps and elapsed() < args.budget_s - 30:
                res["profile"] = profile_steps(trainer, train_data, args.profile_steps, trainer.device,
                                               args.profile_out, args.profile_amp)
                save(args.out)
    del trainer


class FirstBatches:
    """The first ``limit`` batches of a RecBole training loader, with what _train_epoch
    uses of a loader: iteration, len, shuffle, sampler."""

    def __init__(self, loader, limit):
        self.loader, self.limit = loader, limit
        self.shuffle, self.sampler = loader.shuffle, loader.sampler

    def __len__(self):
        return min(self.limit, len(self.loader))

    def __iter__(self):
        for done, batch in enumerate(self.loader):
            if done == len(self):
                break
            yield batch


STEP_LOOPS = {False: "RecBole loop", True: "sync-free loop"}


def bench_step(args, device):
    """RecBole's training loop (sync_free_step False) against ours (True) on one SSD4Rec
    pipeline: --step-repeats rounds, each timing the first --step-batches batches of an epoch
    with one loop, then the other. Compared by the synchronised wall time over all the
    batches of a run: with the sync-free loop the host runs ahead of the GPU, so the
    per-batch start stamps of timed_epoch say when a step was queued, not when it ran."""
    res = RESULTS.setdefault("step", {})
    config, trainer, train_data, _, t_data = build_pipeline(
        "SSD4Rec", {"train_batch_size": args.batch_size, "var_len": True,
                    "max_history_length": args.ssd_max_history, **args.ssd_set}, args)
    res.update(max_history_length=args.ssd_max_history, data_prep_s=t_data, train_batches=len(train_data),
               step_batches=args.step_batches, config_overrides=args.ssd_set, runs=[])
    field = trainer.model.ITEM_SEQ_LEN

    def counter(inter):
        return inter[field].sum()

    epoch = 0
    for amp in args.step_precisions:
        amp = None if amp == "fp32" else amp
        # Warm-up (Triton compile and autotune, the allocator's first blocks), both loops.
        for sync_free in (False, True):
            trainer.sync_free_step = sync_free
            timed_epoch(trainer, FirstBatches(train_data, args.step_warmup), epoch, amp, None, counter)
            epoch += 1
        _STATE["triton_used"] = True
        for repeat in range(args.step_repeats):
            for sync_free in (False, True):
                if elapsed() > args.budget_s - 20:
                    RESULTS["notes"].append(
                        f"step {amp or 'fp32'} repeat {repeat} skipped: out of time budget")
                    continue
                trainer.sync_free_step = sync_free
                capped = FirstBatches(train_data, args.step_batches)
                row = timed_epoch(trainer, capped, epoch, amp, None, counter)
                epoch += 1
                row.update(loop=STEP_LOOPS[sync_free], sync_free_step=sync_free, repeat=repeat,
                           s_per_batch=row["time_s"] / max(row["batches"], 1))
                for key in ("batch_start_s", "steady_s_per_batch", "steady_epoch_s", "est_full_epoch_s"):
                    row.pop(key, None)  # host-side stamps: not what the GPU did (see above)
                res["runs"].append(row)
                log(f"step {row['amp']} {row['loop']:14s} #{repeat}: {row['time_s']:.2f} s for "
                    f"{row['batches']} batches, {row['s_per_batch'] * 1e3:.1f} ms/batch, "
                    f"{row.get('tokens_per_s', 0) / 1e6:.2f} M tok/s")
                save(args.out)
        runs = [r for r in res["runs"] if r["amp"] == (amp or "fp32")]
        medians = {loop: statistics.median(r["s_per_batch"] for r in runs if r["loop"] == loop)
                   for loop in STEP_LOOPS.values() if any(r["loop"] == loop for r in runs)}
        if len(medians) == 2:
            speedup = medians["RecBole loop"] / medians["sync-free loop"]
            res.setdefault("speedup", {})[amp or "fp32"] = speedup
            log(f"step {amp or 'fp32'}: median ms/batch RecBole loop {medians['RecBole loop'] * 1e3:.1f}, "
                f"sync-free loop {medians['sync-free loop'] * 1e3:.1f}: {speedup:.3f}x")
    trainer.sync_free_step = True
    del trainer


BASELINES = {
    "sasrec": ("SASRec", {"hidden_size": 256, "inner_size": 256, "n_layers": 2, "n_heads": 2,
                          "MAX_ITEM_LIST_LENGTH": 200, "loss_type": "CE"}),
    "gru4rec": ("GRU4Rec", {"embedding_size": 64, "hidden_size": 128, "num_layers": 1,
                            "dropout_prob": 0.3, "MAX_ITEM_LIST_LENGTH": 200, "loss_type": "CE"}),
}


def bench_baseline(part, args, device):
    """Epochs of a RecBole baseline on the same data, batch size and Trainer as SSD4Rec."""
    name, settings = BASELINES[part]
    res = RESULTS.setdefault(part, {})
    overrides = {"train_batch_size": args.batch_size, **settings}
    config, trainer, train_data, test_data, t_data = build_pipeline(name, overrides, args)
    res["data_prep_s"] = t_data
    res["train_batches"] = len(train_data)
    res["config"] = {k: config[k] for k in settings} | {"train_batch_size": config["train_batch_size"]}
    field = trainer.model.ITEM_SEQ_LEN
    res["epochs"] = []
    max_s = getattr(args, f"{part}_max_s")
    # (precision, anomaly mode) per epoch: fp32 epochs, one per --baseline-amp mode, and with
    # --baseline-anomaly one fp32 epoch with autograd anomaly detection on, as every RecBole
    # run has it: recbole.model.sequential_recommender's sine.py switches it on at import
    # (ssd4rec.compat switches it off again for everyone, the other epochs included).
    modes = [(None, False)] * getattr(args, f"{part}_epochs") + [(a, False) for a in args.baseline_amp]
    if args.baseline_anomaly:
        modes.append((None, True))
    for epoch, (amp, anomaly) in enumerate(modes):
        if elapsed() > args.budget_s - 30:
            RESULTS["notes"].append(f"{part} {amp or 'fp32'} epoch skipped: out of time budget")
            break
        cap = min(max_s, max(20.0, args.budget_s - elapsed() - 10))
        with torch.autograd.set_detect_anomaly(anomaly):
            row = timed_epoch(trainer, train_data, epoch, amp, cap, lambda inter: inter[field].sum())
        row["anomaly_mode"] = anomaly
        if anomaly:
            row["amp"] += "+anomaly"
        row["note"] = f"tokens = real (unpadded) history items; {name} computes on 200 padded positions per sample"
        if anomaly:
            row["note"] += "; autograd anomaly mode on, as RecBole 1.2.1 leaves it"
        res["epochs"].append(row)
        _log_epoch(name, row)
        save(args.out)
    if args.evals and elapsed() < args.budget_s - 15:
        res["eval"] = [evaluate_timed(trainer, test_data, f"{name} test")]


def bench_sweep(args, device):
    """Time per token and peak memory against length: our encoder vs SASRec's, fp32."""
    from recbole.model.layers import TransformerEncoder

    from ssd4rec.data.packing import segment_layout
    from ssd4rec.modules import BiSSDEncoder

    torch.manual_seed(0)
    ours = BiSSDEncoder(d_model=256, num_layers=2, d_state=64, d_conv=4, expand=2, headdim=16,
                        chunk_size=256, dropout=0.2, beta=0.1).to(device).train()
    sasrec = TransformerEncoder(n_layers=2, n_heads=2, hidden_size=256, inner_size=256,
                                hidden_dropout_prob=0.2, attn_dropout_prob=0.2, hidden_act="gelu",
                                layer_norm_eps=1e-12).to(device).train()
    rows = RESULTS.setdefault("sweep", [])
    for length in args.sweep_lengths:
        nseq = max(1, args.sweep_tokens // length)
        total = nseq * length
        for model in ("SSD4Rec encoder", "SASRec encoder"):
            if elapsed() > args.budget_s - 20:
                RESULTS["notes"].append(f"sweep {model} L={length} skipped: out of time budget")
                continue
            gen = torch.Generator(device=device).manual_seed(length)
            row = dict(model=model, seq_len=length, sequences=nseq, tokens=total)
            try:
                if model.startswith("SSD4Rec"):
                    cu = torch.arange(0, total + 1, length, device=device)
                    seq_idx, _, reverse_index = segment_layout(cu, total)
                    x = torch.randn(total, 256, device=device, generator=gen).requires_grad_()

                    def step():
                        ours.zero_grad(set_to_none=True)
                        ours(x, cu, seq_idx, reverse_index).square().mean().backward()
                else:
                    x = torch.randn(nseq, length, 256, device=device, generator=gen).requires_grad_()
                    # SASRec's mask: (B, 1, L, L), causal, 0 where attended and -10000 elsewhere
                    causal = torch.tril(torch.ones(length, length, device=device, dtype=torch.bool))
                    mask = torch.where(causal, 0.0, -10000.0)[None, None].expand(nseq, 1, length, length)

                    def step():
                        sasrec.zero_grad(set_to_none=True)
                        sasrec(x, mask, output_all_encoded_layers=False)[-1].square().mean().backward()

                reset_peak(device)
                first, times = time_steps(step, device, 1, args.sweep_repeats)
                med = statistics.median(times)
                row.update(median_s=med, us_per_token=med / total * 1e6, tokens_per_s=total / med,
                           peak_gib=peak_gib(device), status="ok")
                log(f"sweep {model:16s} L={length:5d} x{nseq:4d}: {med * 1e3:8.1f} ms, "
                    f"{med / total * 1e9:7.1f} ns/token, peak {row['peak_gib'] or 0:.1f} GiB")
            except torch.cuda.OutOfMemoryError:
                row.update(status="out of memory", peak_gib=None)
                log(f"sweep {model} L={length}: out of memory")
            rows.append(row)
            x = step = mask = None  # noqa: F841  (free before the next size)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save(args.out)
    for model in ("SSD4Rec encoder", "SASRec encoder"):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        if len(ok) >= 2:
            ref = next((r for r in ok if r["seq_len"] == 200), ok[0])
            for r in ok:
                r["per_token_vs_ref"] = r["us_per_token"] / ref["us_per_token"]
                r["ref_len"] = ref["seq_len"]


def _log_epoch(name, row):
    msg = (f"{name} epoch {row['epoch']} ({row['amp']}): {row['time_s']:.1f} s for {row['batches']}/"
           f"{row['batches_total']} batches")
    if row["batches"]:
        msg += f", {row['s_per_batch'] * 1e3:.0f} ms/batch, {row['tokens'] / 1e6:.1f} M tokens"
        msg += f", {row['tokens_per_s'] / 1e6:.2f} M tok/s"
    if row.get("peak_gib") is not None:
        msg += f", peak {row['peak_gib']:.1f} GiB"
    if row["partial"]:
        msg += f"; PARTIAL, extrapolated full epoch {row.get('est_full_epoch_s', float('nan')):.1f} s"
    log(msg)


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def print_tables():
    lines = ["", "=" * 100, "SUMMARY", f"device: {RESULTS['env'].get('gpu', 'cpu')}, torch {RESULTS['env'].get('torch')}, "
             f"triton {RESULTS['env'].get('triton')}, mamba_ssm {RESULTS['env'].get('mamba_ssm')}"]
    if RESULTS.get("encoder"):
        lines += ["", "BiSSDEncoder fwd+bwd (d_model 256, 2 layers, d_state 64, headdim 16, expand 2, shared)",
                  f"{'prec':5s} {'L':>5s} {'seqs':>5s} {'tokens':>7s} {'ms/step':>9s} {'M tok/s':>8s} "
                  f"{'peak GiB':>8s} {'1st call s':>10s}"]
        for r in RESULTS["encoder"]:
            lines.append(f"{r['precision']:5s} {r['seq_len']:5d} {r['sequences']:5d} {r['tokens']:7d} "
                         f"{r['median_s'] * 1e3:9.1f} {r['tokens_per_s'] / 1e6:8.2f} {r['peak_gib'] or 0:8.2f} "
                         f"{r['first_call_s']:10.1f}")
        for k, v in RESULTS.get("encoder_per_token_ratio", {}).items():
            lines.append(f"per-token time ratio {k}: {v:.3f}")
    if RESULTS.get("mixer"):
        lines += ["", "one Mamba2 mixer fwd+bwd, (1, T) packed as sequences of 200"]
        for r in RESULTS["mixer"]:
            lines.append(f"{r['mixer']:28s} {r['precision']:5s} T={r['tokens']} {r['median_s'] * 1e3:8.1f} ms "
                         f"{r['tokens_per_s'] / 1e6:6.2f} M tok/s peak {r['peak_gib'] or 0:.1f} GiB")
    for name in ("ssd4rec", "sasrec", "gru4rec"):
        res = RESULTS.get(name)
        if not res:
            continue
        lines += ["", f"{name} on {RESULTS['args']['dataset']} (Trainer._train_epoch, batch "
                      f"{RESULTS['args']['batch_size']}); data prep {res.get('data_prep_s', 0):.1f} s, "
                      f"{res.get('train_batches')} batches/epoch"]
        lines.append(f"{'epoch':>5s} {'prec':5s} {'timed s':>8s} {'batches':>9s} {'epoch s':>8s} "
                     f"{'steady s':>8s} {'M tok/s':>8s} {'peak GiB':>8s}  note")
        for r in res.get("epochs", []):
            note = "partial: epoch s extrapolated" if r["partial"] else "full epoch"
            lines.append(f"{r['epoch']:5d} {r['amp']:5s} {r['time_s']:8.1f} {r['batches']:4d}/{r['batches_total']:4d} "
                         f"{r.get('est_full_epoch_s', float('nan')):8.1f} {r.get('steady_epoch_s', float('nan')):8.1f} "
                         f"{r.get('tokens_per_s', 0) / 1e6:8.2f} {r['peak_gib'] or 0:8.1f}  {note}")
        lines.append("(epoch s: the epoch as run, warm-up included; steady s: batches/epoch x the per-batch "
                     "time of the second half of the timed batches; M tok/s: real tokens / timed s)")
        for r in res.get("eval", []):
            lines.append(f"eval {r['label']}: {r['time_s']:.2f} s ({r['users']} users, full ranking)")
        if res.get("profile"):
            p = res["profile"]
            lines.append(f"profile: {p['steps']} steps {p['wall_s']:.2f} s wall, GPU kernels {p['gpu_kernel_s']:.2f} s; "
                         f"loader {p['loader_s_per_batch'] * 1e3:.0f} ms/batch, h2d {p['h2d_s_per_batch'] * 1e3:.1f} ms/batch")
    ratios = epoch_ratios()
    if ratios:
        lines += ["", "SSD4Rec epoch / baseline epoch, same precision, this run (< 1: SSD4Rec faster)"]
        for r in ratios:
            lines.append(f"{r['precision']:14s} {r['baseline']:8s} SSD4Rec {r['ssd4rec_s']:7.1f} s, "
                         f"{r['baseline']} {r['baseline_s']:7.1f} s: {r['ratio']:.3f}")
    step = RESULTS.get("step")
    if step and step.get("runs"):
        args = RESULTS["args"]
        lines += ["", f"training loops on {args['dataset']} (SSD4Rec, batch {args['batch_size']}, first "
                      f"{step['step_batches']} batches of an epoch per run; synchronised wall time)"]
        for r in step["runs"]:
            lines.append(f"{r['amp']:5s} {r['loop']:14s} #{r['repeat']}: {r['time_s']:7.2f} s, "
                         f"{r['batches']:4d} batches, {r['s_per_batch'] * 1e3:8.1f} ms/batch, "
                         f"{r.get('tokens_per_s', 0) / 1e6:6.2f} M tok/s")
        for prec, speedup in step.get("speedup", {}).items():
            lines.append(f"{prec}: sync-free loop {speedup:.3f}x the RecBole loop (median ms/batch)")
    if RESULTS["notes"]:
        lines += ["", "notes:"] + [f"- {n}" for n in RESULTS["notes"]]
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


def epoch_ratios():
    """SSD4Rec's epoch time over each baseline's, per precision both ran (warm SSD4Rec epochs
    only; a baseline epoch with anomaly mode on is compared with SSD4Rec's fp32 epoch)."""
    ssd = {}
    for r in (RESULTS.get("ssd4rec") or {}).get("epochs", []):
        warm = r.get("triton_warm_before", False) or r["epoch"] > 0
        if warm and r.get("est_full_epoch_s"):
            ssd[r["amp"]] = min(ssd.get(r["amp"], float("inf")), r["est_full_epoch_s"])
    rows = []
    for part, label in (("sasrec", "SASRec"), ("gru4rec", "GRU4Rec")):
        for r in (RESULTS.get(part) or {}).get("epochs", []):
            prec = r["amp"].replace("+anomaly", "")
            if prec in ssd and r.get("est_full_epoch_s"):
                rows.append(dict(precision=r["amp"], baseline=label, ssd4rec_s=ssd[prec],
                                 baseline_s=r["est_full_epoch_s"], ratio=ssd[prec] / r["est_full_epoch_s"]))
    return rows


CSV_FIELDS = ("what", "model", "precision", "seq_len", "seconds", "steady_seconds", "tokens",
              "tokens_per_s", "us_per_token", "peak_gib", "note")


def result_rows():
    """Every measurement in RESULTS as one flat row (CSV_FIELDS)."""
    rows = []
    for part, label in (("ssd4rec", "SSD4Rec"), ("sasrec", "SASRec"), ("gru4rec", "GRU4Rec")):
        res = RESULTS.get(part) or {}
        model = label
        if part == "ssd4rec" and res.get("max_history_length"):
            model += f" (history <= {res['max_history_length']})"
        for r in res.get("epochs", []):
            note = (f"extrapolated from {r['batches']}/{r['batches_total']} batches" if r["partial"]
                    else "full epoch")
            if r["epoch"] == 0 and part == "ssd4rec" and not r.get("triton_warm_before", False):
                note += "; includes Triton warm-up"
            if r.get("anomaly_mode"):
                note += "; autograd anomaly mode on (RecBole 1.2.1's default)"
            rows.append(dict(what="train epoch", model=model, precision=r["amp"], seq_len="",
                             seconds=r.get("est_full_epoch_s"), steady_seconds=r.get("steady_epoch_s"),
                             tokens=r.get("tokens"), tokens_per_s=r.get("tokens_per_s"),
                             us_per_token="", peak_gib=r.get("peak_gib"), note=note))
        for r in res.get("eval", []):
            rows.append(dict(what="full-ranking eval", model=model, precision="fp32", seq_len="",
                             seconds=r["time_s"], steady_seconds="", tokens="", tokens_per_s="",
                             us_per_token="", peak_gib=r.get("peak_gib"), note=f"{r['users']} users"))
    step = RESULTS.get("step") or {}
    step_model = "SSD4Rec"
    if step.get("max_history_length"):
        step_model += f" (history <= {step['max_history_length']})"
    for r in step.get("runs", []):
        rows.append(dict(what="train steps", model=step_model, precision=r["amp"], seq_len="",
                         seconds=r["s_per_batch"], steady_seconds="", tokens=r.get("tokens"),
                         tokens_per_s=r.get("tokens_per_s"), us_per_token="", peak_gib=r.get("peak_gib"),
                         note=f"{r['loop']} (sync_free_step {r['sync_free_step']}), s per batch over "
                              f"{r['batches']} batches, run {r['repeat']}"))
    for r in RESULTS.get("encoder", []):
        rows.append(dict(what="encoder step", model="SSD4Rec encoder", precision=r["precision"],
                         seq_len=r["seq_len"], seconds=r["median_s"], steady_seconds="", tokens=r["tokens"],
                         tokens_per_s=r["tokens_per_s"], us_per_token=r["median_s"] / r["tokens"] * 1e6,
                         peak_gib=r.get("peak_gib"), note=f"{r['sequences']} sequences"))
    for r in RESULTS.get("sweep", []):
        rows.append(dict(what="length sweep", model=r["model"], precision="fp32", seq_len=r["seq_len"],
                         seconds=r.get("median_s"), steady_seconds="", tokens=r["tokens"],
                         tokens_per_s=r.get("tokens_per_s"), us_per_token=r.get("us_per_token"),
                         peak_gib=r.get("peak_gib"),
                         note=r["status"] if r["status"] != "ok" else
                         f"per-token time {r.get('per_token_vs_ref', float('nan')):.2f}x that at "
                         f"L={r.get('ref_len')}"))
    for r in RESULTS.get("mixer", []):
        rows.append(dict(what="mixer step", model=r["mixer"], precision=r["precision"], seq_len=200,
                         seconds=r["median_s"], steady_seconds="", tokens=r["tokens"],
                         tokens_per_s=r["tokens_per_s"], us_per_token=r["median_s"] / r["tokens"] * 1e6,
                         peak_gib=r.get("peak_gib"), note=""))
    return rows


def _fmt(value):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def write_tables(out_json):
    """benchmark.csv and benchmark.md beside the JSON, through temporary files."""
    import csv

    folder = Path(out_json).parent
    rows = result_rows()
    tmp = folder / "benchmark.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
    os.replace(tmp, folder / "benchmark.csv")
    env = RESULTS["env"]
    lines = [f"Device: {env.get('gpu', 'cpu')}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"mamba_ssm {env.get('mamba_ssm')}, causal_conv1d {env.get('causal_conv1d')}.", "",
             "| " + " | ".join(CSV_FIELDS) + " |", "|" + "---|" * len(CSV_FIELDS)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in CSV_FIELDS) + " |" for r in rows]
    tmp = folder / "benchmark.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / "benchmark.md")


def plot(folder):
    """benchmark.png from benchmark.csv: time per token and peak memory against length."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    with open(folder / "benchmark.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["what"] == "length sweep"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for model in sorted({r["model"] for r in rows}):
        ok = [r for r in rows if r["model"] == model and r["us_per_token"]]
        lengths = [int(r["seq_len"]) for r in ok]
        ax_t.plot(lengths, [float(r["us_per_token"]) * 1e3 for r in ok], "o-", label=model)
        if all(r["peak_gib"] for r in ok):  # peak memory is known on CUDA only
            ax_m.plot(lengths, [float(r["peak_gib"]) for r in ok], "o-", label=model)
        oom = [int(r["seq_len"]) for r in rows if r["model"] == model and r["note"] == "out of memory"]
        for length in oom:
            ax_m.axvline(length, color="red", linestyle=":")
            ax_m.annotate(f"{model}: OOM", (length, 0), rotation=90, fontsize=7, color="red")
    for ax, label in ((ax_t, "ns per token (fwd+bwd)"), (ax_m, "peak GPU memory (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("sequence length (same tokens per step)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = folder / "benchmark.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, folder / "benchmark.png")
    print(f"wrote {folder / 'benchmark.png'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON results path (benchmark.csv and .md go beside it)")
    ap.add_argument("--plot", metavar="DIR", help="only make DIR/benchmark.png from DIR/benchmark.csv")
    ap.add_argument("--parts", default="ssd4rec,sasrec,gru4rec,sweep,encoder",
                    help="comma list of ssd4rec,step,encoder,sweep,mixer,sasrec,gru4rec")
    ap.add_argument("--ssd-max-history", type=int, default=None,
                    help="SSD4Rec keeps the last N items of each history (official code: 200)")
    ap.add_argument("--sweep-lengths", default="50,200,1000,2000,5000")
    ap.add_argument("--sweep-tokens", type=int, default=100_000, help="tokens per sweep step")
    ap.add_argument("--sweep-repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--lengths", default="200,1000,2000,5000")
    ap.add_argument("--tokens", type=int, default=256_000, help="packed tokens per encoder call")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32,tf32,bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2, help="fp32 SSD4Rec epochs")
    ap.add_argument("--epoch-caps", default="",
                    help="comma list: seconds after which fp32 epoch i is stopped and extrapolated "
                         "(the last value repeats; empty: full epochs)")
    ap.add_argument("--amp", default="", help="comma list of tf32,bf16: one extra SSD4Rec epoch each")
    ap.add_argument("--amp-max-s", type=float, default=1e9, help="cap of each --amp epoch (s)")
    ap.add_argument("--evals", type=int, default=2, help="timed full-ranking test evaluations")
    ap.add_argument("--sasrec-epochs", type=int, default=1)
    ap.add_argument("--sasrec-max-s", type=float, default=1e9, help="cap of each SASRec epoch (s)")
    ap.add_argument("--baseline-amp", default="",
                    help="comma list of tf32,bf16: one extra epoch each of every baseline part")
    ap.add_argument("--baseline-anomaly", action="store_true",
                    help="one extra fp32 baseline epoch with autograd anomaly mode on (RecBole's default)")
    ap.add_argument("--gru4rec-epochs", type=int, default=1)
    ap.add_argument("--gru4rec-max-s", type=float, default=1e9, help="cap of each GRU4Rec epoch (s)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="the whole script's time budget")
    ap.add_argument("--reserve-s", type=float, default=30.0,
                    help="time kept free after an SSD4Rec epoch (evaluation etc.)")
    ap.add_argument("--step-batches", type=int, default=50, help="batches per timed run of the step part")
    ap.add_argument("--step-warmup", type=int, default=5, help="warm-up batches of each loop (step part)")
    ap.add_argument("--step-repeats", type=int, default=3, help="timed runs of each loop (step part)")
    ap.add_argument("--step-precisions", default="fp32", help="comma list of fp32,tf32,bf16 (step part)")
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--profile-amp", default="fp32", choices=("fp32", "tf32", "bf16"),
                    help="precision of the profiled steps")
    ap.add_argument("--ssd-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an SSD4Rec config key (YAML value) in the ssd4rec and step parts, "
                         "e.g. --ssd-set chunk_size=64 or --ssd-set compile_glue=true; repeatable")
    ap.add_argument("--profile-out", default=None, help="profiler table path (default: beside --out)")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    if not args.out:
        ap.error("--out is required (or --plot DIR)")
    args.sweep_lengths = [int(v) for v in args.sweep_lengths.split(",")]
    args.parts = [p for p in args.parts.split(",") if p]
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.amp = [a for a in args.amp.split(",") if a]
    args.baseline_amp = [a for a in args.baseline_amp.split(",") if a]
    from ssd4rec.config import parse_overrides
    from ssd4rec.errors import SSD4RecError

    try:  # read as main.py reads --key=value (YAML values, 1e-3 a float)
        args.ssd_set = parse_overrides([f"--{item}" for item in args.ssd_set])
    except SSD4RecError as err:
        ap.error(f"--ssd-set: {err}")
    for mode in args.amp + args.baseline_amp:
        if mode not in ("tf32", "bf16"):
            ap.error(f"--amp/--baseline-amp: expected tf32 or bf16, got {mode!r}")
    args.step_precisions = [p for p in args.step_precisions.split(",") if p]
    args.epoch_caps = [float(v) for v in args.epoch_caps.split(",") if v]
    args.profile_out = args.profile_out or str(Path(args.out).with_name("profile.txt"))
    RESULTS["args"] = vars(args)
    device = torch.device(args.device)
    record_env(device)
    save(args.out)
    parts = {"encoder": bench_encoder, "mixer": bench_mixer, "ssd4rec": bench_ssd4rec, "sweep": bench_sweep,
             "step": bench_step,
             "sasrec": lambda a, d: bench_baseline("sasrec", a, d),
             "gru4rec": lambda a, d: bench_baseline("gru4rec", a, d)}
    for part in args.parts:
        if elapsed() > args.budget_s - 20:
            RESULTS["notes"].append(f"part {part} skipped: out of time budget")
            continue
        log(f"--- part {part}")
        try:
            parts[part](args, device)
        except Exception as err:  # keep going: one broken part must not lose the others
            import traceback

            traceback.print_exc()
            RESULTS.setdefault("errors", {})[part] = f"{type(err).__name__}: {err}"
        save(args.out)
        write_tables(args.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    RESULTS["epoch_ratios"] = epoch_ratios()
    RESULTS["total_s"] = elapsed()
    save(args.out)
    write_tables(args.out)
    print_tables()


if __name__ == "__main__":
    main()
