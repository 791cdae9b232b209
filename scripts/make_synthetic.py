#!/usr/bin/env python
"""Generate the synthetic lifelong dataset (ssd4rec.data.synthetic) as a RecBole atomic file.

    python scripts/make_synthetic.py [--users N] [--items N] [--mean-length N] ... [--out DIR] [--stats]

Parameters not given come from datasets/synthetic-lifelong.yaml (``source:``). The
result is OUT/synthetic-lifelong/synthetic-lifelong.inter (written to a temporary
file, then renamed). Training on it needs the same parameters, since
``python main.py --dataset=synthetic-lifelong`` regenerates the file whenever its
parameters differ: the command to use is printed at the end. Exit status 2 with a
one-line message on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ssd4rec.data.sources import build_dataset, load_source_options  # noqa: E402
from ssd4rec.data.stats import dataset_stats, format_stats  # noqa: E402
from ssd4rec.data.synthetic import SyntheticParams  # noqa: E402
from ssd4rec.errors import SSD4RecError  # noqa: E402

NAME = "synthetic-lifelong"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate OUT/synthetic-lifelong/synthetic-lifelong.inter.")
    for field in dataclasses.fields(SyntheticParams):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=type(field.default),
                            metavar=type(field.default).__name__.upper(),
                            help=f"source.{field.name} (default: the dataset YAML's, else {field.default})")
    parser.add_argument("--out", default=str(REPO / "datasets"),
                        help="output folder, the RecBole data_path (default: %(default)s)")
    parser.add_argument("--config", metavar="YAML", help=f"dataset YAML (default: datasets/{NAME}.yaml)")
    parser.add_argument("--stats", action="store_true", help="print the statistics of the result")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    opts = load_source_options(NAME, args.config)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticParams)
             if getattr(args, f.name) is not None}
    params = SyntheticParams.from_mapping({**(opts.synthetic or SyntheticParams()).as_dict(), **given},
                                          origin="command line")
    result = build_dataset(NAME, None, args.out, dataclasses.replace(opts, synthetic=params))
    print(f"wrote {result.path} ({len(result.table):,} interactions)")
    if args.stats:
        print(format_stats(dataset_stats(result.table), title=f"{NAME} ({params})"))
    flags = " ".join(f"--source.{k}={v}" for k, v in given.items())
    print(f"train on it: python main.py --dataset={NAME} --data_path={args.out} {flags}".rstrip())
    print(f"done in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except SSD4RecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
