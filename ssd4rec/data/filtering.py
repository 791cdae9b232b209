"""Cleaning an interaction table: steps 2-4 of the pipeline in ``ssd4rec.data.sources``.

2. **de-duplicate**: rows with the same user, item *and* timestamp are kept once
   (the first in file order);
   **truncate** (lifelong sources, ``source.max_seq_len``): each user's first or
   last ``max_seq_len`` interactions in time order, as Rec-Mamba cuts its datasets;
3. **filter** with RecBole's iterative rule (``user_inter_num_interval`` /
   ``item_inter_num_interval``, ``[5,inf)`` = 5-core);
4. **order**: users in order of first appearance, each user's rows by timestamp (stable).

``BuildReport`` records what each step did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ssd4rec.data.readers import INTER_COLUMNS
from ssd4rec.errors import SSD4RecError

FIVE_CORE = "[5,inf)"


# --------------------------------------------------------------------------- report


@dataclass
class BuildReport:
    """What happened between the raw files and the written table (printed by ``--stats``)."""

    sources: list[str] = field(default_factory=list)
    raw_rows: int = 0
    after_source_filter: int = 0
    duplicates_dropped: int = 0
    truncated: int = 0
    truncation: str = ""
    filtered_out: int = 0
    filter_rounds: int = 0
    rows: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"raw files: {', '.join(self.sources)}", f"raw rows read: {self.raw_rows:,}"]
        if self.after_source_filter != self.raw_rows:
            out.append(f"after source filter: {self.after_source_filter:,}")
        out += [
            f"exact duplicates (user, item, timestamp) dropped: {self.duplicates_dropped:,}",
            *([f"removed by truncation ({self.truncation}): {self.truncated:,}"] if self.truncation else []),
            f"removed by the interaction-count filter: {self.filtered_out:,} in {self.filter_rounds} round(s)",
            f"interactions written: {self.rows:,}",
        ]
        return out + [f"note: {n}" for n in self.notes]


# --------------------------------------------------------------------------- filtering


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


def parse_intervals(text: str | None, key: str = "interval") -> list[tuple[float, bool, float, bool]] | None:
    """Parse RecBole's interval syntax (``"[5,inf)"``, several joined by ``;``)."""
    if text is None:
        return None
    out = []
    for part in str(text).split(";"):
        m = _INTERVAL.match(part)
        try:
            if not m:
                raise ValueError
            lo, hi = float(m.group(2)), float(m.group(3))
        except ValueError:
            raise SSD4RecError(
                f"{key}: {text!r} is not an interval such as \"[5,inf)\" (RecBole syntax: [A,B] / [A,B) / (A,B) / (A,B])"
            ) from None
        out.append((lo, m.group(1) == "[", hi, m.group(4) == "]"))
    return out


def _within(counts: np.ndarray, intervals) -> np.ndarray:
    ok = np.zeros(counts.shape, dtype=bool)
    for lo, lo_in, hi, hi_in in intervals:
        above = counts >= lo if lo_in else counts > lo
        below = counts <= hi if hi_in else counts < hi
        ok |= above & below
    return ok


def kcore_filter(df: pd.DataFrame, user_interval: str | None = FIVE_CORE,
                 item_interval: str | None = FIVE_CORE) -> tuple[pd.DataFrame, int]:
    """RecBole's iterative interaction-count filter; returns the kept rows and the rounds run.

    Each round counts interactions per user and per item over the kept rows and
    drops, simultaneously, all users and items whose count is outside their
    interval; it stops when a round drops nothing (RecBole's
    ``_filter_by_inter_num``). With lower bounds only, the result is the unique
    largest k-core, whatever the order of removals.
    """
    u_iv = parse_intervals(user_interval, "user_inter_num_interval")
    i_iv = parse_intervals(item_interval, "item_inter_num_interval")
    if (u_iv is None and i_iv is None) or len(df) == 0:
        return df, 0
    u_codes, u_uniq = pd.factorize(df["user_id"])
    i_codes, i_uniq = pd.factorize(df["item_id"])
    keep = np.ones(len(df), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        drop = np.zeros(len(df), dtype=bool)
        if u_iv is not None:
            counts = np.bincount(u_codes[keep], minlength=len(u_uniq))
            bad = (counts > 0) & ~_within(counts, u_iv)
            drop |= bad[u_codes]
        if i_iv is not None:
            counts = np.bincount(i_codes[keep], minlength=len(i_uniq))
            bad = (counts > 0) & ~_within(counts, i_iv)
            drop |= bad[i_codes]
        drop &= keep
        if not drop.any():
            break
        keep &= ~drop
    return df[keep].reset_index(drop=True), rounds


def clean_interactions(df: pd.DataFrame, user_interval: str | None = FIVE_CORE,
                       item_interval: str | None = FIVE_CORE,
                       report: BuildReport | None = None, *, max_seq_len: int | None = None,
                       keep: str = "last") -> pd.DataFrame:
    """De-duplicate, (truncate,) filter and order a user_id/item_id/timestamp table (module docstring, 2-4)."""
    report = report if report is not None else BuildReport()
    n0 = len(df)
    df = df.drop_duplicates(subset=list(INTER_COLUMNS), keep="first")
    report.duplicates_dropped = n0 - len(df)
    if max_seq_len is not None:
        n_before = len(df)
        df = truncate_histories(df, max_seq_len, keep)
        report.truncated = n_before - len(df)
        report.truncation = f"each user's {keep} {max_seq_len:,} interactions kept"
    n1 = len(df)
    df, rounds = kcore_filter(df, user_interval, item_interval)
    report.filtered_out = n1 - len(df)
    report.filter_rounds = rounds
    if len(df) == 0:
        raise SSD4RecError(
            f"no interactions left after the filter (user_inter_num_interval={user_interval!r}, "
            f"item_inter_num_interval={item_interval!r}); {n1} rows before it"
        )
    df = sort_interactions(df)
    report.rows = len(df)
    return df


def sort_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Users in first-appearance order, each user's rows by timestamp; stable (ties keep file order)."""
    codes, _ = pd.factorize(df["user_id"])
    order = np.argsort(df["timestamp"].to_numpy(), kind="stable")
    order = order[np.argsort(codes[order], kind="stable")]
    return df.iloc[order].reset_index(drop=True)


KEEP_CHOICES = ("first", "last")


def truncate_histories(df: pd.DataFrame, max_len: int, keep: str = "last") -> pd.DataFrame:
    """Each user's first or last ``max_len`` interactions in time order (ties: file order).

    The kept rows come back in the order of :func:`sort_interactions`.
    """
    if keep not in KEEP_CHOICES:
        raise SSD4RecError(f"source.keep: expected one of {', '.join(KEEP_CHOICES)}, found {keep!r}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise SSD4RecError(f"source.max_seq_len: expected a positive integer or null, found {max_len!r}")
    df = sort_interactions(df)
    codes, _ = pd.factorize(df["user_id"])  # runs of equal codes, in sorted order
    index = np.arange(len(df))
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    counts = np.diff(np.r_[starts, len(df)])
    position = index - np.repeat(starts, counts)
    if keep == "first":
        kept = position < max_len
    else:
        kept = position >= np.repeat(counts, counts) - max_len
    return df[kept].reset_index(drop=True)
