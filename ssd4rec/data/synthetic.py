"""Synthetic lifelong histories: a seeded generator with structure a sequential model can learn.

No download, no licence: ``python main.py --dataset=synthetic-lifelong`` builds it.
The generative story (every draw comes from one ``numpy`` generator seeded with
``seed``, so the same parameters always give the same file):

* **items** have a popularity weight ``rank ** -zipf`` (ranks shuffled) and belong to
  one of ``clusters`` clusters (genres), all of them non-empty;
* **a sparse Markov chain**: every item has ``successors`` next-item candidates drawn
  uniformly from its own cluster, with Dirichlet transition probabilities;
* **users** have a length drawn from a log-normal with mean ``mean_length`` (spread
  ``length_sigma``), clipped to ``[min_length, max_length]``, and a long-term taste:
  ``tastes`` favourite clusters with Dirichlet weights;
* **each step** follows the chain from the previous item with probability
  ``p_markov``; else draws a favourite cluster and an item in it by popularity with
  probability ``p_taste``; else an item by global popularity (noise);
* **timestamps**: a user starts within 30 days of ``start`` and waits an exponential
  gap with mean ``mean_gap`` seconds (at least 1 s) between interactions.

A first-order transition model therefore beats popularity on held-out items, a
model of the whole history can also learn the taste, and the length distribution
reaches lifelong scale (thousands of items per user).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

from ssd4rec.errors import SSD4RecError


@dataclass(frozen=True)
class SyntheticParams:
    """Parameters of :func:`generate`; ``datasets/synthetic-lifelong.yaml`` sets them under ``source:``."""

    users: int = 1000
    items: int = 5000
    mean_length: int = 1000
    length_sigma: float = 0.5
    min_length: int = 20
    max_length: int = 10000
    zipf: float = 1.1
    clusters: int = 50
    successors: int = 5
    p_markov: float = 0.5
    p_taste: float = 0.35
    tastes: int = 3
    seed: int = 2024
    start: int = 1_600_000_000
    mean_gap: float = 600.0

    @classmethod
    def from_mapping(cls, mapping: Mapping, origin: str = "the config") -> "SyntheticParams":
        """Read and check the parameters; unknown keys and bad values raise SSD4RecError naming the key."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise SSD4RecError(
                f"{origin}: unknown key(s) {', '.join('source.' + str(k) for k in unknown)} for the synthetic "
                f"generator; allowed: {', '.join('source.' + k for k in known)}"
            )
        values = {}
        for name, value in mapping.items():
            default = known[name].default
            if isinstance(default, int):
                ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                want = "an integer"
            else:
                ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
                want = "a number"
            if not ok:
                raise SSD4RecError(f"{origin}: source.{name} must be {want}, found {value!r}")
            values[name] = type(default)(value)
        params = cls(**values)
        params.check(origin)
        return params

    def check(self, origin: str = "the config") -> None:
        def fail(key, expected):
            raise SSD4RecError(f"{origin}: source.{key} must be {expected}, found {getattr(self, key)!r}")

        for key in ("users", "items", "mean_length", "clusters", "successors", "tastes"):
            if getattr(self, key) < 1:
                fail(key, "a positive integer")
        if self.min_length < 3:
            fail("min_length", "at least 3 (leave-one-out needs a training, a validation and a test item)")
        if self.max_length < self.min_length:
            fail("max_length", f"at least min_length ({self.min_length})")
        if self.clusters > self.items:
            fail("clusters", f"at most items ({self.items})")
        if self.successors > self.items:
            fail("successors", f"at most items ({self.items})")
        for key in ("length_sigma", "zipf", "mean_gap"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                fail(key, "a non-negative number")
        for key in ("p_markov", "p_taste"):
            if not 0 <= getattr(self, key) <= 1:
                fail(key, "a probability in [0, 1]")
        if self.p_markov + self.p_taste > 1:
            fail("p_taste", f"at most 1 - p_markov ({1 - self.p_markov:g})")
        if self.seed < 0:
            fail("seed", "a non-negative integer")

    def as_dict(self) -> dict:
        return asdict(self)


def _sample_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: the first index whose cumulative weight exceeds u (u in [0, 1))."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _row_choice(cdf_rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise inverse-CDF sampling: cdf_rows (n, k) cumulative, u (n,) -> (n,) column indices."""
    return np.minimum((u[:, None] >= cdf_rows).sum(axis=1), cdf_rows.shape[1] - 1)


class _ClusterSampler:
    """Draws an item of a given cluster with probability proportional to its popularity."""

    def __init__(self, cluster: np.ndarray, weight: np.ndarray, n_clusters: int):
        self.items = np.argsort(cluster, kind="stable")  # items grouped by cluster
        sizes = np.bincount(cluster, minlength=n_clusters)
        self.end = np.cumsum(sizes)
        self.begin = self.end - sizes
        w = weight[self.items]
        running = np.cumsum(w)
        before = np.repeat(running[self.begin] - w[self.begin], sizes)  # weight of earlier clusters
        total = np.repeat(np.add.reduceat(w, self.begin), sizes)
        # cluster c occupies (c, c + 1] of one increasing axis; its last item ends exactly at c + 1
        self.cdf = np.repeat(np.arange(n_clusters, dtype=np.float64), sizes) + (running - before) / total
        self.cdf[self.end - 1] = np.arange(1, n_clusters + 1, dtype=np.float64)

    def sample(self, clusters: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.cdf, clusters + u, side="right")
        pos = np.clip(pos, self.begin[clusters], self.end[clusters] - 1)  # rounding at c + 1
        return self.items[pos]


def generate(params: SyntheticParams) -> pd.DataFrame:
    """user_id, item_id (integer tokens from 1) and timestamp (seconds) of every interaction.

    Rows are grouped by user (1, 2, ...), each user's in time order.
    """
    p = params
    rng = np.random.default_rng(p.seed)

    # Items: popularity and clusters (balanced, so that none is empty).
    weight = (rng.permutation(p.items) + 1.0) ** -p.zipf
    cluster = (np.arange(p.items) % p.clusters)[rng.permutation(p.items)]
    in_cluster = _ClusterSampler(cluster, weight, p.clusters)
    popular = np.cumsum(weight) / weight.sum()

    # Sparse Markov chain: `successors` candidates per item, uniform within its cluster (so
    # that the chain says something popularity does not).
    uniform_in_cluster = _ClusterSampler(cluster, np.ones(p.items), p.clusters)
    succ = uniform_in_cluster.sample(np.repeat(cluster, p.successors), rng.random(p.items * p.successors))
    succ = succ.reshape(p.items, p.successors)
    trans_cdf = np.cumsum(rng.dirichlet(np.ones(p.successors), size=p.items), axis=1)

    # Users: lengths and tastes.
    mu = math.log(p.mean_length) - p.length_sigma ** 2 / 2  # so that the mean is mean_length
    lengths = np.clip(np.rint(rng.lognormal(mu, p.length_sigma, size=p.users)), p.min_length, p.max_length)
    lengths = lengths.astype(np.int64)
    taste = rng.integers(p.clusters, size=(p.users, p.tastes))
    taste_cdf = np.cumsum(rng.dirichlet(np.ones(p.tastes), size=p.users), axis=1)

    # Sequences, one step for all active users at a time; users longest first, so the
    # active users at step t are a prefix of `order`.
    order = np.argsort(-lengths, kind="stable")
    offsets = np.zeros(p.users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])  # CSR layout in user order
    items = np.empty(offsets[-1], dtype=np.int64)
    active = np.searchsorted(-lengths[order], -np.arange(lengths.max()), side="left")  # lengths > t
    previous = np.zeros(p.users, dtype=np.int64)  # indexed by position in `order`
    for t in range(int(lengths.max())):
        n = int(active[t])
        users = order[:n]
        mode, u1, u2 = rng.random(n), rng.random(n), rng.random(n)
        chosen = np.empty(n, dtype=np.int64)
        markov = mode < p.p_markov if t else np.zeros(n, dtype=bool)
        taste_step = ~markov & (mode < p.p_markov + p.p_taste)
        noise = ~markov & ~taste_step
        prev = previous[:n]
        chosen[markov] = succ[prev[markov], _row_choice(trans_cdf[prev[markov]], u1[markov])]
        tu = users[taste_step]
        fav = taste[tu, _row_choice(taste_cdf[tu], u1[taste_step])]
        chosen[taste_step] = in_cluster.sample(fav, u2[taste_step])
        chosen[noise] = _sample_cdf(popular, u2[noise])
        previous[:n] = chosen
        items[offsets[users] + t] = chosen

    # Timestamps: a start within 30 days, then gaps of at least one second.
    starts = p.start + rng.integers(0, 30 * 86400, size=p.users)
    gaps = np.maximum(1, np.ceil(rng.exponential(p.mean_gap, size=len(items)))).astype(np.int64)
    user_of = np.repeat(np.arange(p.users), lengths)
    elapsed = np.cumsum(gaps)
    first = offsets[:-1]
    times = starts[user_of] + elapsed - elapsed[first][user_of]  # a user's first interaction at its start
    return pd.DataFrame({"user_id": user_of + 1, "item_id": items + 1, "timestamp": times.astype(np.float64)})
