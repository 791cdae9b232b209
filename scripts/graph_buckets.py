"""How many CUDA-graph buckets (graph_step) a dataset's training epoch meets, and how much
of it is padding; computed on the host from a RecBole .inter file, no GPU needed.

Training samples are every prefix of a user's history but the last two (leave-one-out:
validation and test), as SSD4Rec's dataset builds them; batches are random draws of
--batch-size samples, as RecBole's shuffled loader makes them.

    python scripts/graph_buckets.py datasets/ml-1m/ml-1m.inter --max-history 200
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssd4rec.graph_step import bucket_tokens  # noqa: E402


def prefix_lengths(inter_file, max_history=None):
    """(samples,) history length of every training sample of the file's users."""
    try:
        users = pd.read_csv(inter_file, sep="\t", usecols=[0]).iloc[:, 0].to_numpy()
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise SystemExit(f"{inter_file}: cannot read a RecBole .inter file ({err})")
    _, counts = np.unique(users, return_counts=True)
    lengths = np.concatenate([np.arange(1, n - 2) for n in counts if n > 3])
    return lengths if max_history is None else np.minimum(lengths, max_history)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inter_file", help="a RecBole .inter file (gzip is fine)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--max-history", type=int, default=None, help="max_history_length (default: whole histories)")
    ap.add_argument("--epochs", type=int, default=3, help="shuffled epochs to draw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    lengths = prefix_lengths(args.inter_file, args.max_history)
    rng = np.random.default_rng(args.seed)
    tokens = []
    for _ in range(args.epochs):
        shuffled = lengths[rng.permutation(len(lengths))]
        sums = np.add.reduceat(shuffled, np.arange(0, len(shuffled), args.batch_size))
        tokens.extend(sums[:-1] if len(shuffled) % args.batch_size else sums)  # the short last batch runs eagerly
    tokens = np.asarray(tokens)
    buckets = np.array([bucket_tokens(int(t)) for t in tokens])
    print(f"{args.inter_file}: {len(lengths):,} training samples, batch {args.batch_size}, history <= "
          f"{args.max_history or 'all'}: tokens a batch {tokens.mean():,.0f} (std {tokens.std():,.0f}); "
          f"{len(set(buckets.tolist()))} buckets over {args.epochs} epochs; padding "
          f"{(buckets - tokens).sum() / tokens.sum():.2%} of the tokens")


if __name__ == "__main__":
    main()
