"""GPU benchmark of SSD4Rec: encoder throughput and real ML-1M training epochs, in one process.

Parts (run in the order given by --parts; results are written to --out after every part,
so a run cut off at a time limit keeps what it finished):

  ssd4rec   ML-1M through RecBole at the paper config (config.yaml + datasets/ml-1m.yaml,
            var_len True, batch 1024): PackedSequentialDataset, data_preparation, SSD4Rec and
            our Trainer; RecBole's own _train_epoch loop, timed with CUDA synchronisation.
            fp32 epochs (--epochs; epoch 0 includes the Triton compile/autotune of this
            process if no earlier part ran the kernels), full-ranking evaluations of the test
            split (all 6,040 users), a torch.profiler table of a few fp32 training steps, then
            one epoch per --amp mode: tf32 (cuBLAS TF32 matmuls) or bf16 (the loss computation
            wrapped in torch.autocast(bfloat16); parameters, backward and optimizer as in fp32).
            An epoch that would outrun its cap (--epoch-caps, --amp-max-s) is stopped after the
            batch in progress and extrapolated to the full epoch from the steady per-batch time
            of the second half of its timed batches (batches are shuffled, so the timed ones
            are a random sample); the JSON and the table say which numbers are extrapolated.
  encoder   BiSSDEncoder (d_model 256, 2 layers, d_state 64, headdim 16, expand 2, shared
            directions, dropout 0.2, train mode) forward+backward on packed batches of equal-
            length sequences (--lengths) with the same total tokens (--tokens): tokens/s and
            peak memory, per precision (--precisions: fp32 = torch's default, TF32 off; tf32 =
            cuBLAS TF32 matmuls; bf16 = bf16 autocast).
  mixer     one Mamba2 mixer alone: ours (Mamba2Mixer) vs mamba_ssm's fused Mamba2, (1, T)
            tokens packed as sequences of 200, forward+backward.
  sasrec    RecBole's SASRec on ML-1M (hidden 256, 2 layers, 2 heads, L=200, CE, batch 1024,
            fp32), one epoch through the same Trainer (--sasrec-max-s caps it), for the ratio.

Examples (one H100; mamba_ssm, causal_conv1d, recbole installed; datasets/ml-1m/ml-1m.inter built):
    PYTHONPATH=. python3 scripts/bench_gpu.py --out bench.json                # everything, full epochs
    PYTHONPATH=. python3 scripts/bench_gpu.py --out bench.json --parts ssd4rec,encoder,mixer \
        --epoch-caps 330,60 --amp tf32 --amp-max-s 40 --precisions fp32,tf32 --budget-s 500
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
    """One epoch of RecBole's Trainer._train_epoch (stopped early past max_s), synchronised.

    amp: None (fp32, torch's default: TF32 off), "tf32" (cuBLAS TF32 matmuls for the whole
    epoch) or "bf16" (the loss computation under torch.autocast(bfloat16); backward and the
    optimizer step as RecBole does them, parameters stay fp32, no grad scaler needed).
    Returns a dict with the measured time, the batches done and the extrapolated full epoch.
    """
    model = trainer.model
    device = trainer.device
    done = [0]
    stamps = []
    tokens = torch.zeros((), dtype=torch.float64, device=device)

    def loss_func(interaction):
        now = time.perf_counter() - t0
        if max_s is not None and done[0] > 0 and now > max_s:
            raise _StopEpoch
        stamps.append(now)
        done[0] += 1
        tokens.add_(token_counter(interaction))
        if amp == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return model.calculate_loss(interaction)
        return model.calculate_loss(interaction)

    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    partial = False
    loss = None
    try:
        with tf32_mode("tf32" if amp == "tf32" else "fp32"):
            loss = trainer._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=False)
    except _StopEpoch:
        partial = True
    sync(device)
    t = time.perf_counter() - t0
    n_total = len(train_data)
    n = done[0]
    row = dict(epoch=epoch_idx, amp=amp or "fp32", time_s=t, batches=n, batches_total=n_total,
               partial=partial, tokens=float(tokens), peak_gib=peak_gib(device),
               mean_loss=None if loss is None else loss / n,
               # seconds from epoch start at which batch 1, 2, 4, 8, ... started
               batch_start_s={str(k): round(stamps[k - 1], 3) for k in (1, 2, 3, 5, 9, 17, 33, 65, 129)
                              if k <= len(stamps)})
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


def profile_steps(trainer, train_data, steps, device, path):
    """torch.profiler over a few training steps, the same work as RecBole's loop."""
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
    t0 = time.perf_counter()
    it = iter(train_data)
    for _ in range(steps):
        next(it)
    t_load = (time.perf_counter() - t0) / steps

    def one(inter):
        opt.zero_grad()
        loss = model.calculate_loss(inter)
        loss.item()
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
    table = ka.table(sort_by=sort_key, row_limit=30)
    with open(path, "w") as f:
        f.write(f"{steps} training steps, wall {wall:.3f} s, GPU kernel time {busy:.3f} s "
                f"({100 * busy / wall:.0f}% busy)\n")
        f.write(f"data loader: {t_load * 1e3:.1f} ms/batch (collate), host->device {t_copy * 1e3:.1f} ms/batch\n\n")
        f.write(table)
    rows = []
    for e in sorted(ka, key=lambda e: -getattr(e, sort_key, 0))[:25]:
        rows.append(dict(name=e.key[:90], self_device_ms=getattr(e, dev_attr, 0) / 1e3 / steps,
                         calls_per_step=e.count / steps))
    log(f"profile: {steps} steps wall {wall:.3f} s, GPU busy {busy:.3f} s ({100 * busy / wall:.0f}%), "
        f"loader {t_load * 1e3:.1f} ms/batch, h2d {t_copy * 1e3:.1f} ms/batch")
    return dict(steps=steps, wall_s=wall, gpu_kernel_s=busy, loader_s_per_batch=t_load,
                h2d_s_per_batch=t_copy, top=rows)


def bench_ssd4rec(args, device):
    res = RESULTS.setdefault("ssd4rec", {})
    res["triton_warm_before"] = _STATE["triton_used"]
    config, trainer, train_data, test_data, t_data = build_pipeline(
        "SSD4Rec", {"train_batch_size": args.batch_size, "var_len": True}, args)
    res["data_prep_s"] = t_data
    res["train_batches"] = len(train_data)
    res["train_samples"] = len(train_data._dataset)
    field = trainer.model.ITEM_SEQ_LEN
    res["epochs"] = []

    def counter(inter):
        return inter[field].sum()

    for epoch in range(args.epochs):
        if elapsed() > args.budget_s - 30:
            RESULTS["notes"].append(f"ssd4rec fp32 epoch {epoch} skipped: out of time budget")
            break
        cap = args.epoch_caps[min(epoch, len(args.epoch_caps) - 1)] if args.epoch_caps else 1e9
        cap = min(cap, max(20.0, args.budget_s - elapsed() - args.reserve_s))
        row = timed_epoch(trainer, train_data, epoch, None, cap, counter)
        _STATE["triton_used"] = True
        res["epochs"].append(row)
        _log_epoch("SSD4Rec", row)
        save(args.out)
    res["eval"] = []
    for i in range(args.evals):
        if elapsed() > args.budget_s - 15:
            break
        res["eval"].append(evaluate_timed(trainer, test_data, f"test #{i + 1}"))
        save(args.out)
    if args.profile_steps and elapsed() < args.budget_s - 30:
        res["profile"] = profile_steps(trainer, train_data, args.profile_steps, trainer.device, args.profile_out)
        save(args.out)
    for i, amp in enumerate(args.amp):
        if elapsed() > args.budget_s - 30:
            RESULTS["notes"].append(f"ssd4rec {amp} epoch skipped: out of time budget")
            continue
        cap = min(args.amp_max_s, max(20.0, args.budget_s - elapsed() - args.reserve_s))
        row = timed_epoch(trainer, train_data, args.epochs + i, amp, cap, counter)
        row["triton_warm_before"] = _STATE["triton_used"]
        _STATE["triton_used"] = True
        res["epochs"].append(row)
        _log_epoch("SSD4Rec", row)
        save(args.out)
    del trainer


def bench_sasrec(args, device):
    res = RESULTS.setdefault("sasrec", {})
    overrides = {"train_batch_size": args.batch_size, "hidden_size": 256, "inner_size": 256,
                 "n_layers": 2, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 200, "loss_type": "CE"}
    config, trainer, train_data, test_data, t_data = build_pipeline("SASRec", overrides, args)
    res["data_prep_s"] = t_data
    res["train_batches"] = len(train_data)
    res["config"] = {k: config[k] for k in ("hidden_size", "inner_size", "n_layers", "n_heads",
                                            "MAX_ITEM_LIST_LENGTH", "loss_type", "train_batch_size",
                                            "hidden_dropout_prob", "attn_dropout_prob")}
    field = trainer.model.ITEM_SEQ_LEN
    res["epochs"] = []
    for epoch in range(args.sasrec_epochs):
        if elapsed() > args.budget_s - 30:
            RESULTS["notes"].append("sasrec epoch skipped: out of time budget")
            break
        cap = min(args.sasrec_max_s, max(20.0, args.budget_s - elapsed() - 10))
        row = timed_epoch(trainer, train_data, epoch, None, cap, lambda inter: inter[field].sum())
        row["note"] = "tokens = real (unpadded) history items; SASRec computes on 200 padded positions per sample"
        res["epochs"].append(row)
        _log_epoch("SASRec", row)
        save(args.out)


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
    for name in ("ssd4rec", "sasrec"):
        res = RESULTS.get(name)
        if not res:
            continue
        lines += ["", f"{name} on {RESULTS['args']['dataset']} (RecBole Trainer._train_epoch, batch 1024); data prep "
                      f"{res.get('data_prep_s', 0):.1f} s, {res.get('train_batches')} batches/epoch"]
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
    if RESULTS["notes"]:
        lines += ["", "notes:"] + [f"- {n}" for n in RESULTS["notes"]]
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--parts", default="ssd4rec,encoder,mixer", help="comma list of ssd4rec,encoder,mixer,sasrec")
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
    ap.add_argument("--budget-s", type=float, default=1e9, help="the whole script's time budget")
    ap.add_argument("--reserve-s", type=float, default=30.0,
                    help="time kept free after an SSD4Rec epoch (evaluation etc.)")
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--profile-out", default=None, help="profiler table path (default: beside --out)")
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.amp = [a for a in args.amp.split(",") if a]
    args.epoch_caps = [float(v) for v in args.epoch_caps.split(",") if v]
    args.profile_out = args.profile_out or str(Path(args.out).with_name("profile.txt"))
    RESULTS["args"] = vars(args)
    device = torch.device(args.device)
    record_env(device)
    save(args.out)
    parts = {"encoder": bench_encoder, "mixer": bench_mixer, "ssd4rec": bench_ssd4rec, "sasrec": bench_sasrec}
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
        if device.type == "cuda":
            torch.cuda.empty_cache()
    RESULTS["total_s"] = elapsed()
    save(args.out)
    print_tables()


if __name__ == "__main__":
    main()
