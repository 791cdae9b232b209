"""SSD4Rec variants side by side in one process, against RecBole's SASRec, on ML-1M.

Every variant is the same SSD4Rec (config.yaml + datasets/<dataset>.yaml, var_len, batch
--batch-size) with a few config keys changed, built from the same seed on the same data
pipeline. After --warmup batches of each (Triton compile and autotune, torch.compile), the
script runs --repeats rounds; in each round every variant, then SASRec (hidden 256, 2 layers,
2 heads, L=200, CE), trains on the first --batches batches of an epoch at --precision. A run is
timed by its synchronised wall time over all its batches (the sync-free loop queues ahead of
the GPU, so per-batch host stamps would not say what the GPU did). The median over rounds,
times the batches of an epoch, estimates an epoch; ratios are taken within this one process.

Writes --out (JSON, after every run) and a markdown table beside it (same stem, .md).

Example (one H100; the glue compiled, chunk 128, and both, against the default):
    PYTHONPATH=. python3 scripts/bench_variants.py --out results/benchmark/variants_bf16.json \
        --variant glue=compile_glue=true --variant chunk128=chunk_size=128 \
        --variant both=compile_glue=true,chunk_size=128 --precision bf16
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (scripts/benchmark.py: the pipeline and the timed epoch)


def parse_variant(text):
    """'NAME=key=value,key=value' -> (NAME, {key: YAML value})."""
    from ssd4rec.config import parse_overrides

    name, sep, body = text.partition("=")
    if not sep or not name or not body:
        raise ValueError(f"--variant {text!r}: expected NAME=key=value[,key=value...]")
    return name, parse_overrides([f"--{item}" for item in body.split(",")])


def ssd4rec_variant(config, train_data, overrides):
    """A fresh SSD4Rec and Trainer with `overrides` applied to `config` (restored after)."""
    from recbole.utils import init_seed

    from ssd4rec.models.ssd4rec import SSD4Rec
    from ssd4rec.trainer import Trainer

    saved = {key: config[key] if key in config else None for key in overrides}
    for key, value in overrides.items():
        config[key] = value
    try:
        init_seed(config["seed"], config["reproducibility"])
        model = SSD4Rec(config, train_data._dataset).to(config["device"])
        return Trainer(config, model, tempfile.mkdtemp(prefix="bench-variant-"))
    finally:
        for key, value in saved.items():
            config[key] = value


def time_run(trainer, loader, batches, epoch, precision):
    """One run of the first `batches` batches: seconds per batch (synchronised wall time)."""
    field = trainer.model.ITEM_SEQ_LEN
    amp = None if precision == "fp32" else precision
    row = benchmark.timed_epoch(trainer, benchmark.FirstBatches(loader, batches), epoch, amp, None,
                                lambda inter: inter[field].sum())
    return dict(s_per_batch=row["time_s"] / max(row["batches"], 1), batches=row["batches"],
                tokens=row["tokens"], peak_gib=row["peak_gib"], reserved_gib=row["reserved_gib"],
                **{key: value for key, value in row.items() if key.startswith("graph")})


def markdown(results):
    lines = [f"Device: {results['env'].get('gpu', 'cpu')}; torch {results['env'].get('torch')}, "
             f"triton {results['env'].get('triton')}, mamba_ssm {results['env'].get('mamba_ssm')}. "
             f"{results['dataset']}, batch {results['batch_size']}, precision {results['precision']}, "
             f"SSD4Rec history <= {results['max_history_length']}; median of {results['repeats']} runs "
             f"of the first {results['batches']} batches each.", "",
             "| run | config changes | ms / batch (median) | runs (ms) | epoch s (est.) | peak GiB | "
             "/ default | / SASRec |", "|---|---|---:|---|---:|---:|---:|---:|"]
    default = results["summary"].get("default", {}).get("ms_per_batch")
    sasrec = results["summary"].get("SASRec", {}).get("ms_per_batch")
    for name, s in results["summary"].items():
        changes = ", ".join(f"{k}={v}" for k, v in results["variants"].get(name, {}).items()) or "-"
        runs = " / ".join(f"{r['s_per_batch'] * 1e3:.1f}" for r in results["runs"] if r["name"] == name)
        rel = f"{s['ms_per_batch'] / default:.3f}" if default else ""
        vs = f"{s['ms_per_batch'] / sasrec:.3f}" if sasrec and name != "SASRec" else ""
        lines.append(f"| {name} | {changes} | {s['ms_per_batch']:.1f} | {runs} | {s['epoch_s']:.1f} | "
                     f"{s['peak_gib'] or 0:.2f} | {rel} | {vs} |")
    return "\n".join(lines) + "\n"


def save(results, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(results, indent=1)), (out.with_suffix(".md"), markdown(results))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON results path (a .md table goes beside it)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=key=value[,key=value]",
                    help="an SSD4Rec variant; repeatable ('default', unchanged, always runs first)")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "tf32", "bf16"))
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--ssd-max-history", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=40, help="batches per timed run")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up batches per variant")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds")
    ap.add_argument("--no-sasrec", action="store_true", help="leave RecBole's SASRec out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="append", default=[], metavar="NAME",
                    help="after the rounds, torch.profiler over --profile-steps steps of this run "
                         "(a variant's name, default or SASRec); the table goes beside --out")
    ap.add_argument("--profile-steps", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        variants = dict(parse_variant(v) for v in args.variant)
    except Exception as err:  # parse_overrides raises SSD4RecError with the offending item
        ap.error(str(err))
    if "default" in variants or "SASRec" in variants:
        ap.error("--variant: 'default' and 'SASRec' are reserved names")
    variants = {"default": {}, **variants}
    unknown = [n for n in args.profile if n not in variants and not (n == "SASRec" and not args.no_sasrec)]
    if unknown:
        ap.error(f"--profile {unknown[0]!r}: not a run of this benchmark ({', '.join(variants)}, SASRec)")

    device = torch.device(args.device)
    benchmark.record_env(device)
    results = dict(env=benchmark.RESULTS["env"], dataset=args.dataset, batch_size=args.batch_size,
                   precision=args.precision, max_history_length=args.ssd_max_history,
                   batches=args.batches, repeats=args.repeats, variants=variants, runs=[], summary={})
    config, _, train_data, _, t_data = benchmark.build_pipeline(
        "SSD4Rec", {"train_batch_size": args.batch_size, "var_len": True,
                    "max_history_length": args.ssd_max_history}, args)
    trainers = {name: ssd4rec_variant(config, train_data, overrides) for name, overrides in variants.items()}
    loaders = {name: train_data for name in trainers}
    total_batches = {name: len(train_data) for name in trainers}
    if not args.no_sasrec:
        name, settings = benchmark.BASELINES["sasrec"]
        _, trainers[name], loaders[name], _, _ = benchmark.build_pipeline(
            name, {"train_batch_size": args.batch_size, **settings}, args)
        total_batches[name] = len(loaders[name])
    results["train_batches"] = total_batches

    epoch = 0
    for name, trainer in trainers.items():
        t0 = time.perf_counter()
        time_run(trainer, loaders[name], args.warmup, epoch, args.precision)
        epoch += 1
        benchmark.log(f"warm-up {name}: {time.perf_counter() - t0:.1f} s for {args.warmup} batches")
    for repeat in range(args.repeats):
        for name, trainer in trainers.items():
            row = dict(name=name, repeat=repeat, **time_run(trainer, loaders[name], args.batches, epoch,
                                                             args.precision))
            epoch += 1
            results["runs"].append(row)
            benchmark.log(f"#{repeat} {name:10s} {row['s_per_batch'] * 1e3:7.1f} ms/batch, "
                          f"peak {row['peak_gib'] or 0:.1f} GiB")
            save(results, args.out)
    for name in trainers:
        runs = [r for r in results["runs"] if r["name"] == name]
        med = statistics.median(r["s_per_batch"] for r in runs)
        results["summary"][name] = dict(ms_per_batch=med * 1e3, epoch_s=med * total_batches[name],
                                        peak_gib=max((r["peak_gib"] or 0) for r in runs))
    save(results, args.out)
    print(markdown(results), flush=True)
    for name in args.profile:
        path = Path(args.out).with_name(f"{Path(args.out).stem}.profile_{name}.txt")
        results.setdefault("profiles", {})[name] = benchmark.profile_steps(
            trainers[name], loaders[name], args.profile_steps, device, path, args.precision)
        save(results, args.out)


if __name__ == "__main__":
    main()
