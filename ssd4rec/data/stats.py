"""Statistics of an interaction table, as reported in sequential-recommendation papers.

``dataset_stats(df)`` takes a DataFrame with the columns ``user_id``, ``item_id``
and ``timestamp`` (RecBole's typed names such as ``user_id:token`` work too) and
returns a plain dict; ``format_stats`` turns that dict into a small text table,
optionally next to reference numbers (a paper's table, or a known copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from ssd4rec.errors import SSD4RecError

# Timestamps above this are taken to be milliseconds (1e11 s is the year 5138).
_MS_THRESHOLD = 1e11

STAT_LABELS = {
    "users": "users",
    "items": "items",
    "interactions": "interactions",
    "avg_seq_len": "avg. sequence length",
    "max_seq_len": "max. sequence length",
    "min_seq_len": "min. sequence length",
    "sparsity": "sparsity",
    "first_date": "first interaction (UTC)",
    "last_date": "last interaction (UTC)",
}


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if name in df.columns:
        return df[name]
    for col in df.columns:
        if str(col).split(":", 1)[0] == name:
            return df[col]
    raise SSD4RecError(
        f"dataset_stats needs a column {name!r} (or {name}:<type>); the table has {list(df.columns)}"
    )


def _date(ts: float) -> str:
    seconds = ts / 1000.0 if abs(ts) > _MS_THRESHOLD else ts
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d")


def dataset_stats(df: pd.DataFrame) -> dict:
    """Users, items, interactions, sequence lengths, sparsity and time range of ``df``.

    Sequence length is the number of interactions of a user. Sparsity is
    ``1 - interactions / (users * items)``. Dates are UTC days (``YYYY-MM-DD``);
    timestamps larger than 1e11 are read as milliseconds.
    """
    users = _column(df, "user_id")
    items = _column(df, "item_id")
    n = len(df)
    if n == 0:
        return {
            "users": 0, "items": 0, "interactions": 0, "avg_seq_len": 0.0, "max_seq_len": 0,
            "min_seq_len": 0, "sparsity": 1.0, "first_date": None, "last_date": None,
        }
    user_codes, user_uniques = pd.factorize(users)
    n_users = len(user_uniques)
    n_items = int(pd.unique(items).size)
    lengths = np.bincount(user_codes, minlength=n_users)
    stats = {
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "avg_seq_len": n / n_users,
        "max_seq_len": int(lengths.max()),
        "min_seq_len": int(lengths.min()),
        "sparsity": 1.0 - n / (n_users * n_items),
        "first_date": None,
        "last_date": None,
    }
    try:
        times = pd.to_numeric(_column(df, "timestamp"), errors="coerce")
    except SSD4RecError:
        return stats
    if times.notna().any():
        stats["first_date"] = _date(float(times.min()))
        stats["last_date"] = _date(float(times.max()))
    return stats


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "sparsity":
        return f"{100.0 * value:.4f}%"
    if key == "avg_seq_len":
        return f"{value:.2f}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def format_stats(
    stats: Mapping,
    title: str | None = None,
    reference: Mapping | None = None,
    reference_label: str = "reference",
    markdown: bool = False,
) -> str:
    """Render ``stats`` (from :func:`dataset_stats`) as an aligned text or Markdown table.

    With ``reference`` (a mapping with some of the same keys) a second column
    shows those numbers, e.g. the paper's, for comparison.
    """
    header = ["statistic", "value"] + ([reference_label] if reference else [])
    rows = []
    for key, label in STAT_LABELS.items():
        if key not in stats:
            continue
        row = [label, _fmt(key, stats[key])]
        if reference:
            row.append(_fmt(key, reference.get(key)))
        rows.append(row)
    if markdown:
        lines = [f"**{title}**", ""] if title else []
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [title] if title else []
    out += [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)
