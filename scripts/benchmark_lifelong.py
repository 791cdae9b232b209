"""Memory and time of LifelongRec's backbones on lifelong histories (issue #7, Rec-Mamba's setting).

For every backbone (--backbones: ssd, sasrec, linrec, mamba) and maximum length L (--lengths:
512, 2,000, 5,000, 10,000) it measures, in one process:

  train  all-position training steps (LifelongRec.calculate_loss, backward, Adam step) on
         batches of whole histories of exactly L items: mean time per step, the epoch time
         that gives, and the peak GPU memory of the timed steps;
  eval   Rec-Mamba's evaluation (uni1000): the last position of each history scored against
         its target and 1,000 candidate items (LifelongRec.predict on 1,001 rows per user,
         each history encoded once), no gradients: time per batch, epoch time, peak memory.

Data: synthetic, generated here as tensors: histories of L uniformly random items out of
--items (10,000), one store as PackedSequentialDataset builds it. Timing needs no learnable
structure. (ssd4rec/data/synthetic.py, when it lands, makes RecBole .inter files for runs
through main.py; this script times the model alone.)

Batches keep the tokens per batch comparable: Rec-Mamba's batch of 256 histories at L = 2,000
is 512,000 tokens (--tokens-per-batch), so a batch holds max(1, 512,000 // L) histories
(1,000 at 512, 256 at 2,000, 102 at 5,000, 51 at 10,000), at most --users. An epoch is
--users histories (10,000): epoch time = mean step time x users / batch. The eval batch holds
the same number of users. MAX_ITEM_LIST_LENGTH = L (--window to set the window separately):
each history is one window.

Model: ssd4rec/models/lifelongrec.yaml (hidden 50, 2 blocks, dropout 0.2, loss BCE, ...), with
backend auto: on CUDA the ssd backbone runs mamba_ssm's Triton SSD kernels and causal_conv1d;
mamba runs mamba_ssm's selective_scan_cuda if it is installed, else our Triton scan core where
triton imports, else the PyTorch scan (the env line of the output says which); the yaml's compile_glue: auto compiles the ssd backbone's
elementwise glue with torch.compile on CUDA (the warm-up steps absorb the compile; --set
compile_glue=false for eager). sasrec is RecBole's TransformerEncoder, causal mask, fp32.
Precision: fp32 everywhere by default, but mamba_ssm's Triton kernels run their float32 dot
products in TF32 (Triton's default) while cuBLAS matmuls stay fp32 unless --tf32; run once
with --tf32 to compare both sides in TF32.

Method: per (backbone, L), --warmup untimed steps first (mamba_ssm's Triton kernels compile
and autotune on first use per shape, for minutes), then up to --max-batches timed steps, each
between torch.cuda.synchronize() calls; a measurement stops early after --max-s seconds of
timed steps (at least one). Peak memory: torch.cuda.max_memory_allocated after
reset_peak_memory_stats, over the timed steps (weights, optimizer state and the small data
store included). A CUDA out-of-memory error is caught and recorded as OOM (training and
evaluation separately); the process goes on. --budget-s stops starting new measurements.

Output (--out DIR, rewritten after every measurement, so a run cut off keeps what it finished):
results.csv, results.md (with each backbone's memory and time as % of sasrec's at the same
L, and the issue's targets at L = 2,000), env.json. Order, for a run cut short: the first two
--backbones (ssd, sasrec) at L = 2,000, then at the longer lengths, then the shorter ones; then
each further backbone at all lengths. --plot makes DIR/benchmark_lifelong.png
from results.csv (matplotlib, `pip install -e ".[bench]"`), without measuring.

Examples:
    PYTHONPATH=. python3 scripts/benchmark_lifelong.py --out $OUT/lifelong          # one H100
    PYTHONPATH=. python scripts/benchmark_lifelong.py --device cpu --lengths 64,128 --users 8 \\
        --warmup 1 --max-batches 2 --out /tmp/bench_smoke                           # smoke test (CPU)
    python scripts/benchmark_lifelong.py --plot --out $OUT/lifelong
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ssd4rec.config import parse_overrides  # noqa: E402 (after the sys.path line)
from ssd4rec.errors import SSD4RecError  # noqa: E402

T_START = time.perf_counter()
BACKBONES = ("ssd", "sasrec", "linrec", "mamba")
FIELDS = [
    "backbone", "max_len", "batch_seqs", "tokens_per_batch", "users",
    "train_status", "train_step_ms", "train_epoch_s", "train_tokens_per_s", "train_peak_gib", "train_steps_timed",
    "eval_status", "eval_batch_ms", "eval_epoch_s", "eval_peak_gib", "eval_batches_timed",
    "loss", "amp", "device", "note",
]


def log(msg):
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# The model on synthetic data
# ----------------------------------------------------------------------------------------------
class SyntheticStore:
    """What LifelongRec reads from its dataset: the item count and a history store holding
    `users` histories of L random items, each followed by its target."""

    def __init__(self, users, length, n_items, device, generator):
        self.n_items = n_items
        self.users, self.length = users, length
        items = torch.randint(1, n_items, (users * (length + 1),), generator=generator)
        self.history_item = items.to(device)
        self.history_time = torch.arange(items.numel(), dtype=torch.float64, device=device)

    def num(self, field):
        return self.n_items

    def history_store(self):
        return self.history_item, self.history_time

    def rows(self, index):
        """Interaction rows of the given users: their whole history, target after it."""
        end = (index + 1) * (self.length + 1) - 1
        return {"history_end": end, "item_length": torch.full_like(end, self.length)}


def model_config(args, backbone, length, device):
    from ssd4rec.config import MODEL_CONFIG_DIR, read_yaml

    values = read_yaml(MODEL_CONFIG_DIR / "lifelongrec.yaml")
    values.pop("dataset_overrides", None)
    values.update({
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "device": device,
        "backbone": backbone, "MAX_ITEM_LIST_LENGTH": args.window or length, "backend": args.backend,
        "loss_type": args.loss or values.get("loss_type", "BCE"),
    })
    if args.hidden:
        values["hidden_size"] = args.hidden
    values.update(args.set)
    return values


def describe_env(device):
    from ssd4rec.ops.conv1d import _load_cuda_conv1d
    from ssd4rec.ops.selective_scan import selective_scan_implementation
    from ssd4rec.ops.ssd_scan import _load_triton_scan

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        fn, reason = _load_triton_scan()
        env["ssd_scan"] = "mamba_ssm Triton" if fn is not None else f"PyTorch ({reason})"
        fn, reason = _load_cuda_conv1d()
        env["conv1d"] = "causal_conv1d CUDA" if fn is not None else f"PyTorch ({reason})"
        env["selective_scan"] = selective_scan_implementation(device)
        try:
            import mamba_ssm

            env["mamba_ssm"] = mamba_ssm.__version__
        except Exception as err:  # noqa: BLE001 - only describing the environment
            env["mamba_ssm"] = f"not importable: {err}"
    else:
        env["cpu_threads"] = torch.get_num_threads()
        env["kernels"] = "PyTorch (CPU)"
    return env


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def is_oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def timed(device, fn, warmup, steps, max_s, deadline):
    """Run fn `warmup` times, then time up to `steps` calls (at least one, stopping after
    max_s seconds or at the deadline). Returns (list of seconds, peak GiB or None)."""
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak(device)
    times = []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_s or time.perf_counter() > deadline:
            break
    return times, peak_gib(device)


def measure(args, backbone, length, device, deadline):
    from ssd4rec.models.lifelong import LifelongRec

    batch = max(1, min(args.users, args.tokens_per_batch // length))
    row = {"backbone": backbone, "max_len": length, "batch_seqs": batch, "tokens_per_batch": batch * length,
           "users": args.users, "loss": None, "amp": args.amp, "device": str(device), "note": ""}
    generator = torch.Generator().manual_seed(args.seed)
    store = SyntheticStore(2 * batch, length, args.items, device, generator)  # batches are drawn from it
    torch.manual_seed(args.seed)
    config = model_config(args, backbone, length, device)
    row["loss"] = config["loss_type"]
    model = LifelongRec(config, store).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["learning_rate"]))
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    draw = torch.Generator().manual_seed(args.seed + 1)
    steps_per_epoch = args.users / batch

    def batch_rows():
        return {k: v.to(device) for k, v in store.rows(torch.randperm(store.users, generator=draw)[:batch]).items()}

    def train_step():
        interaction = batch_rows()
        optimizer.zero_grad(set_to_none=True)
        with amp:
            loss = model.calculate_loss(interaction)
        loss.backward()
        optimizer.step()

    candidates = 1 + args.eval_negatives

    def eval_step():
        rows = batch_rows()
        repeated = {k: v.repeat_interleave(candidates) for k, v in rows.items()}
        target = model.history_item[rows["history_end"]]
        negatives = torch.randint(1, args.items, (batch, candidates - 1), device=device)
        repeated["item_id"] = torch.cat([target[:, None], negatives], 1).reshape(-1)
        with torch.no_grad(), amp:
            scores = model.predict(repeated).reshape(batch, candidates)
        return (scores[:, 1:] > scores[:, :1]).sum(1)  # ranks, as the evaluator needs them

    # training
    model.train()
    try:
        times, peak = timed(device, train_step, args.warmup, args.max_batches, args.max_s, deadline)
        step = statistics.mean(times)
        row.update(train_status="ok", train_step_ms=round(1e3 * step, 2),
                   train_epoch_s=round(step * steps_per_epoch, 3),
                   train_tokens_per_s=round(batch * length / step), train_steps_timed=len(times),
                   train_peak_gib=None if peak is None else round(peak, 3))
    except Exception as err:  # noqa: BLE001 - recorded, and the next measurement goes on
        row.update(train_status="OOM" if is_oom(err) else "error")
        row["note"] += f"train: {type(err).__name__}: {str(err).splitlines()[0][:160]} "
    if args.profile and row.get("train_status") == "ok" and (backbone, length) == args.profile_job:
        profile_steps(train_step, device, args.out / f"profile_{backbone}_{length}.txt")
    optimizer.zero_grad(set_to_none=True)
    free_memory(device)

    # evaluation
    model.eval()
    try:
        times, peak = timed(device, eval_step, 1, args.max_batches, args.max_s, deadline)
        step = statistics.mean(times)
        row.update(eval_status="ok", eval_batch_ms=round(1e3 * step, 2),
                   eval_epoch_s=round(step * steps_per_epoch, 3), eval_batches_timed=len(times),
                   eval_peak_gib=None if peak is None else round(peak, 3))
    except Exception as err:  # noqa: BLE001
        row.update(eval_status="OOM" if is_oom(err) else "error")
        row["note"] += f"eval: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    del model, optimizer, store
    free_memory(device)
    return row


def profile_steps(step, device, path, steps=3):
    """torch.profiler over `steps` warm training steps: the kernels by total device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    path.write_text(f"{steps} training steps\n{table}\n")
    log(f"profile: {path}")


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def write_csv(rows, path):
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in FIELDS})
    tmp.replace(path)


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value, digits=2):
    v = _num(value)
    return "" if v is None else f"{v:,.{digits}f}"


def ratios(rows):
    """{(backbone, L): (memory %, time %)} of sasrec's at the same L, where both trained."""
    base = {r["max_len"]: r for r in rows if r["backbone"] == "sasrec" and r.get("train_status") == "ok"}
    out = {}
    for r in rows:
        b = base.get(r["max_len"])
        if b is None or r.get("train_status") != "ok" or r["backbone"] == "sasrec":
            continue
        mem = (100 * _num(r["train_peak_gib"]) / _num(b["train_peak_gib"])
               if _num(r.get("train_peak_gib")) and _num(b.get("train_peak_gib")) else None)
        # same batches and users at the same L: the ratio of epoch times is that of step times
        tim = (100 * _num(r["train_step_ms"]) / _num(b["train_step_ms"])
               if _num(r.get("train_step_ms")) and _num(b.get("train_step_ms")) else None)
        out[(r["backbone"], r["max_len"])] = (mem, tim)
    return out


def write_markdown(rows, env, args, path):
    lines = [
        "# LifelongRec backbones: memory and time per epoch",
        "",
        f"Device: {env.get('gpu', env['device'])}; torch {env['torch']}; "
        + "; ".join(f"{k}: {env[k]}" for k in ("ssd_scan", "conv1d", "selective_scan", "mamba_ssm", "kernels")
                    if k in env) + ".",
        f"Synthetic histories of exactly L items ({args.items:,} items); {args.tokens_per_batch:,} tokens "
        f"per training batch (histories per batch = tokens // L); an epoch = {args.users:,} histories; "
        f"eval = uni{args.eval_negatives} (1 + {args.eval_negatives} candidates per user). "
        f"Loss {rows[0]['loss'] if rows else ''}, amp {args.amp}, TF32 {'on' if args.tf32 else 'off'}"
        + (f"; model config overrides (--set): {args.set}." if args.set else "."),
        "",
        "| backbone | L | batch | train step (ms) | train epoch (s) | tokens/s | train peak (GiB) "
        "| eval batch (ms) | eval epoch (s) | eval peak (GiB) | memory % sasrec | time % sasrec |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rel = ratios(rows)
    for r in rows:
        mem, tim = rel.get((r["backbone"], r["max_len"]), (None, None))
        ok_t, ok_e = r.get("train_status") == "ok", r.get("eval_status") == "ok"
        lines.append(
            f"| {r['backbone']} | {r['max_len']:,} | {r['batch_seqs']} "
            f"| {_fmt(r.get('train_step_ms'), 1) if ok_t else r.get('train_status')} "
            f"| {_fmt(r.get('train_epoch_s'), 1) if ok_t else r.get('train_status')} "
            f"| {_fmt(r.get('train_tokens_per_s'), 0) if ok_t else ''} "
            f"| {_fmt(r.get('train_peak_gib')) if ok_t else r.get('train_status')} "
            f"| {_fmt(r.get('eval_batch_ms'), 1) if ok_e else r.get('eval_status')} "
            f"| {_fmt(r.get('eval_epoch_s'), 1) if ok_e else r.get('eval_status')} "
            f"| {_fmt(r.get('eval_peak_gib')) if ok_e else r.get('eval_status')} "
            f"| {_fmt(mem, 1)} | {_fmt(tim, 1)} |")
    notes = [f"- {r['backbone']} L={r['max_len']}: {r['note'].strip()}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + notes
    target = rel.get(("ssd", 2000))
    if target is not None:
        mem, tim = target
        verdict = ("met" if mem is not None and tim is not None and mem <= 25 and tim <= 40 else "NOT met")
        lines += ["", f"Issue #7 target at L = 2,000 (ssd <= 25% of sasrec's memory and <= 40% of its "
                      f"time per epoch): memory {_fmt(mem, 1)}%, time {_fmt(tim, 1)}%: {verdict}."]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def plot(out):
    """DIR/results.csv -> DIR/benchmark_lifelong.png: epoch time and peak memory against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("train_epoch_s", "train_status", "training time per epoch (s)"),
              ("train_peak_gib", "train_status", "peak memory, training (GiB)"),
              ("eval_epoch_s", "eval_status", "evaluation time per epoch (s)")]
    for ax, (key, status, title) in zip(axes, panels):
        for backbone in dict.fromkeys(r["backbone"] for r in rows):
            mine = [r for r in rows if r["backbone"] == backbone]
            ok = sorted((int(r["max_len"]), float(r[key])) for r in mine if r[status] == "ok" and r[key])
            line = None
            if ok:
                line, = ax.plot(*zip(*ok), marker="o", label=backbone)
            failed = [int(r["max_len"]) for r in mine if r[status] not in ("ok", "")]
            for x in failed:
                top = max((float(r[key]) for r in rows if r[status] == "ok" and r[key]), default=1.0)
                ax.scatter([x], [top], marker="x", s=80, color=line.get_color() if line else "k")
                ax.annotate(f"{backbone}: {next(r[status] for r in mine if int(r['max_len']) == x)}",
                            (x, top), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("max length L (tokens per history)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:  # e.g. memory on CPU, which the script does not measure
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    path = out / "benchmark_lifelong.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", flush=True)
    return path


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (results.csv, results.md, env.json)")
    p.add_argument("--plot", action="store_true", help="only make OUT/benchmark_lifelong.png from OUT/results.csv")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--backbones", default=",".join(BACKBONES), help="in this order at each length")
    p.add_argument("--lengths", default="512,2000,5000,10000")
    p.add_argument("--users", type=int, default=10000, help="histories per epoch")
    p.add_argument("--items", type=int, default=10000)
    p.add_argument("--tokens-per-batch", type=int, default=256 * 2000)
    p.add_argument("--window", type=int, default=0, help="MAX_ITEM_LIST_LENGTH (0: = L, one window)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per measurement")
    p.add_argument("--max-batches", type=int, default=5, help="timed steps (and eval batches) per measurement")
    p.add_argument("--max-s", type=float, default=20.0, help="stop timing a phase after this many seconds")
    p.add_argument("--budget-s", type=float, default=math.inf, help="start no measurement after this many seconds")
    p.add_argument("--eval-negatives", type=int, default=1000)
    p.add_argument("--loss", choices=("BCE", "CE"), default=None, help="default: the yaml's loss_type")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: the yaml's, 50)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls (cuBLAS) on GPU")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config key (YAML value), e.g. --set headdim=50; repeatable")
    p.add_argument("--profile", default="", metavar="BACKBONE:L",
                   help="also write OUT/profile_BACKBONE_L.txt: torch.profiler over 3 training steps")
    args = p.parse_args(argv)
    try:  # read as main.py reads --key=value (YAML values, 1e-3 a float)
        args.set = parse_overrides([f"--{item.strip()}" for item in args.set])
    except SSD4RecError as err:
        p.error(f"--set: {err}")
    args.profile_job = None
    if args.profile:
        backbone, sep, length = args.profile.partition(":")
        if not sep or not length.isdigit():
            p.error(f"--profile {args.profile!r}: expected BACKBONE:L, e.g. ssd:2000")
        args.profile_job = (backbone, int(length))
    return args


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(args.out)
        return 0
    from ssd4rec import compat

    compat.apply()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown:
        raise SystemExit(f"--backbones: unknown {unknown}; expected some of {', '.join(BACKBONES)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    env = describe_env(device)
    env["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if not (isinstance(v, float) and math.isinf(v))}
    (args.out / "env.json").write_text(json.dumps(env, indent=1))
    log(f"env: {json.dumps({k: v for k, v in env.items() if k != 'args'})}")
    deadline = T_START + args.budget_s
    rows = []
    # In the order the issue needs them if the budget runs out: the first two backbones (ssd,
    # sasrec: the comparison) at every length, then each other backbone at every length;
    # lengths as L = 2,000 (the targets), then longer (does it run at all), then shorter.
    order = sorted(lengths, key=lambda n: (n != 2000, n < 2000, n if n > 2000 else -n))
    jobs = [(b, n) for n in order for b in backbones[:2]] + [(b, n) for b in backbones[2:] for n in order]
    for backbone, length in jobs:
        if time.perf_counter() > deadline:
            log(f"budget reached: skipping {backbone} L={length}")
            rows.append({"backbone": backbone, "max_len": length, "users": args.users, "train_status": "skipped",
                         "eval_status": "skipped", "batch_seqs": max(1, min(args.users, args.tokens_per_batch // length)),
                         "loss": args.loss, "amp": args.amp, "device": str(device), "note": "budget"})
        else:
            log(f"{backbone} L={length}: measuring")
            row = measure(args, backbone, length, device, deadline)
            rows.append(row)
            log(f"{backbone} L={length}: train {row.get('train_status')} "
                f"{row.get('train_step_ms', '')} ms/step, epoch {row.get('train_epoch_s', '')} s, "
                f"peak {row.get('train_peak_gib') or 'n/a'} GiB | eval {row.get('eval_status')} "
                f"{row.get('eval_batch_ms', '')} ms/batch, peak {row.get('eval_peak_gib') or 'n/a'} GiB"
                + (f" | {row['note'].strip()}" if row.get("note") else ""))
        write_csv(rows, args.out / "results.csv")
        write_markdown(rows, env, args, args.out / "results.md")
    log(f"done: {args.out / 'results.md'}")
    print((args.out / "results.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
