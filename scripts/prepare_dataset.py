#!/usr/bin/env python
"""Build one of the paper's datasets as a RecBole atomic file from its official raw file(s).

    python scripts/prepare_dataset.py NAME [--raw PATH ...] [--out DIR] [--stats] [--download]

NAME is ml-1m, amazon-beauty, amazon-video-games, kuairand or ml-100k. The result
is OUT/NAME/NAME.inter (default OUT: this repository's datasets/ folder). Source
options (release version, KuaiRand's click_only/logs, the interaction-count
filter) come from datasets/NAME.yaml. See the README, section Datasets.

Without --raw, an existing OUT/NAME/NAME.inter is left alone (use --force to
rebuild it); raw files already in OUT/NAME/ or OUT/raw/ are used; --download
fetches the official file. Exit status 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ssd4rec.data.download import DEFAULT_TIMEOUT_S  # noqa: E402
from ssd4rec.data.readers import read_inter  # noqa: E402
from ssd4rec.data.sources import (  # noqa: E402
    build_dataset,
    get_spec,
    known_datasets,
    load_source_options,
    resolve_raw,
)
from ssd4rec.data.stats import dataset_stats, format_stats  # noqa: E402
from ssd4rec.errors import SSD4RecError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build OUT/NAME/NAME.inter (RecBole atomic file) from official raw data.",
    )
    parser.add_argument("name", metavar="NAME", help="dataset: " + ", ".join(known_datasets()))
    parser.add_argument(
        "--raw", nargs="+", action="extend", metavar="PATH",
        help="raw file, archive or folder (KuaiRand: the log CSVs, their folder or the tar.gz; "
             "any dataset: a RecBole .inter/.inter.gz file); rebuilds even if the output exists",
    )
    parser.add_argument("--out", default=str(REPO / "datasets"),
                        help="output folder, the RecBole data_path (default: %(default)s)")
    parser.add_argument("--stats", action="store_true",
                        help="print the statistics of the filtered dataset")
    parser.add_argument("--download", action="store_true",
                        help="download the official raw file when no local copy is found")
    parser.add_argument("--force", action="store_true",
                        help="rebuild OUT/NAME/NAME.inter even if it exists")
    parser.add_argument("--config", metavar="YAML",
                        help="dataset YAML with the source options (default: datasets/NAME.yaml)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="download connect/read timeout in seconds (default: %(default)s)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    spec = get_spec(args.name)
    opts = load_source_options(spec.name, args.config)
    out = Path(args.out)
    target = out / spec.name / f"{spec.name}.inter"
    result = None
    if args.raw or args.force or not target.is_file():
        source = resolve_raw(spec.name, out, raw=args.raw, download=args.download, options=opts,
                             timeout=args.timeout)
        result = build_dataset(spec.name, source, out, opts)
        print(f"wrote {result.path} ({len(result.table):,} interactions)")
    else:
        print(f"{target} already exists; nothing to do (--force or --raw rebuilds it)")
    if args.stats:
        if result is not None:
            print("\n".join(result.report.lines()))
            table = result.table
        else:
            table = read_inter(target)
        filt = (f"user_inter_num_interval={opts.user_inter_num_interval}, "
                f"item_inter_num_interval={opts.item_inter_num_interval}")
        print()
        print(format_stats(dataset_stats(table), title=f"{spec.name} ({filt})",
                           reference=spec.reference, reference_label=spec.reference_label))
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
