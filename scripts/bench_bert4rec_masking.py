"""BERT4Rec's training masks: RecBole's MaskItemSequence loop against ssd4rec's tensor ops.

Times one call of the transform on batches shaped like the real ones (compat item 6):
ML-1M (batch 1024, length 200, lengths uniform on 1..200, 3,417 item ids) and Amazon
Beauty (batch 1024, length 50, lengths uniform on 1..50, 12,102 item ids), mask_ratio 0.2,
each row of distinct items. Each branch is timed on its own: the masking branch
(ft_ratio 0) and the fine-tuning branch (ft_ratio 1, ``_append_mask_last``); BERT4Rec's
default ft_ratio 0.5 takes each half the time. Median over the runs, on the CPU.

With ``--loader`` and datasets/ml-1m/ml-1m.inter present, it also times iterating the real
BERT4Rec train dataloader of ML-1M (RecBole's indexing and collation included) for a few
batches with each transform.

    python scripts/bench_bert4rec_masking.py [--runs 7] [--loader]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import time

import torch

try:
    import ssd4rec  # noqa: F401  (applies the patches, ours included)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ssd4rec  # noqa: F401

import recbole.data.transform  # noqa: E402
from recbole.data.interaction import Interaction  # noqa: E402

SHAPES = [("ML-1M", 1024, 200, 3417), ("Amazon Beauty", 1024, 50, 12102)]


def recbole_transform_module():
    """A fresh copy of recbole/data/transform.py: RecBole's own loop, unpatched."""
    spec = importlib.util.spec_from_file_location("_recbole_transform_unpatched", recbole.data.transform.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Config(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class Dataset:
    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items


def make_batch(batch_size, max_len, n_items, gen):
    lengths = torch.randint(1, max_len + 1, (batch_size,), generator=gen)
    seq = torch.rand(batch_size, n_items - 1, generator=gen).argsort(dim=1)[:, :max_len] + 1
    seq[torch.arange(max_len) >= lengths[:, None]] = 0
    return {"item_id_list": seq, "item_length": lengths}


def time_transform(cls, batch, max_len, n_items, ft_ratio, runs):
    config = Config(ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list", ITEM_LIST_LENGTH_FIELD="item_length",
                    MAX_ITEM_LIST_LENGTH=max_len, mask_ratio=0.2, ft_ratio=ft_ratio)
    transform, dataset = cls(config), Dataset(n_items)
    times = []
    for _ in range(runs + 1):  # the first is warm-up
        interaction = Interaction({k: v.clone() for k, v in batch.items()})
        start = time.perf_counter()
        transform(dataset, interaction)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def time_loader(original, batches):
    from pathlib import Path

    from recbole.utils import init_seed

    from ssd4rec.config import collect_values, make_recbole_config, parse_overrides
    from ssd4rec.data.sampled_eval import data_preparation
    from ssd4rec.run import REPO_ROOT, build_dataset

    overrides = parse_overrides(["--model=BERT4Rec", "--dataset=ml-1m", "--data_path=datasets/", "--loss_type=CE"])
    values, _ = collect_values(REPO_ROOT / "config.yaml", REPO_ROOT / "datasets", overrides)
    config = make_recbole_config("BERT4Rec", "ml-1m", values)
    init_seed(config["seed"], config["reproducibility"])
    dataset = build_dataset(config, "BERT4Rec")
    train, _, _ = data_preparation(config, dataset)
    cls = recbole.data.transform.MaskItemSequence
    ours = (cls.__call__, cls._append_mask_last)
    theirs = (original.MaskItemSequence.__call__, original.MaskItemSequence._append_mask_last)
    results = {}
    for name, (call, append) in [("RecBole loop", theirs), ("ssd4rec", ours)]:
        cls.__call__, cls._append_mask_last = call, append
        try:
            iterator = iter(train)
            next(iterator)  # warm-up
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            results[name] = (time.perf_counter() - start) / batches * 1e3
        finally:
            cls.__call__, cls._append_mask_last = ours
    return results, len(train), config["train_batch_size"], train.transform.ft_ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--loader", action="store_true", help="also time the real ML-1M train dataloader")
    parser.add_argument("--loader-batches", type=int, default=20)
    args = parser.parse_args()
    original = recbole_transform_module()
    ours = recbole.data.transform.MaskItemSequence
    gen = torch.Generator().manual_seed(0)
    random.seed(0)
    print(f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; median of {args.runs} runs\n")
    print("| batch | branch | RecBole loop (ms) | ssd4rec (ms) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, batch_size, max_len, n_items in SHAPES:
        batch = make_batch(batch_size, max_len, n_items, gen)
        for branch, ft_ratio in [("mask", 0.0), ("fine-tune (ft_ratio)", 1.0)]:
            theirs = time_transform(original.MaskItemSequence, batch, max_len, n_items, ft_ratio, args.runs)
            mine = time_transform(ours, batch, max_len, n_items, ft_ratio, args.runs)
            print(f"| {name} {batch_size} x {max_len}, {n_items} items | {branch} | {theirs:.1f} | {mine:.2f} "
                  f"| {theirs / mine:.0f}x |")
    if args.loader:
        if not os.path.exists("datasets/ml-1m/ml-1m.inter"):
            print("\n(--loader: datasets/ml-1m/ml-1m.inter not found, skipped)")
            return
        results, n_batches, batch_size, ft_ratio = time_loader(original, args.loader_batches)
        print(f"\nML-1M BERT4Rec train dataloader ({n_batches} batches of {batch_size}, ft_ratio {ft_ratio}), "
              f"mean of {args.loader_batches} batches:\n")
        print("| transform | ms / batch | s / epoch |")
        print("|---|---:|---:|")
        for name, ms in results.items():
            print(f"| {name} | {ms:.1f} | {ms * n_batches / 1e3:.0f} |")


if __name__ == "__main__":
    main()
