"""Reading multi-gigabyte delimited logs in bounded memory, with exact line numbers in errors.

The raw logs of the lifelong datasets (KuaiRand-27K: 23 GB of CSV; LFM-1b: about a
billion tab-separated listening events) do not fit in memory as text. They are
read as a stream of line-aligned blocks (64 MiB by default); each block is parsed
by pandas' C parser into numeric columns only, so memory holds the selected
columns of the rows kept, never the text. A block that fails to parse is checked
line by line to name the file and the exact line of the problem, as the
whole-file readers in :mod:`ssd4rec.data.readers` do.
"""

from __future__ import annotations

import csv
import io
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Callable

import numpy as np
import pandas as pd

from ssd4rec.errors import SSD4RecError

DEFAULT_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class Table:
    """What to read from a delimited file.

    ``columns`` maps output names to source columns: header names when ``header``
    is true, 0-based indices otherwise. ``integers`` are the output columns parsed
    as int64 (ids, flags, millisecond times); the others are float64.
    ``n_fields`` is required without a header (the header sets it otherwise).
    """

    sep: str
    header: bool
    columns: Mapping[str, object]
    integers: frozenset = frozenset()
    n_fields: int | None = None
    expect: str = ""


def line_blocks(raw: IO[bytes], block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block) for consecutive blocks that end at a line end."""
    line_no, carry = 1, b""
    while True:
        chunk = raw.read(block_bytes)
        if not chunk:
            if carry:
                yield line_no, carry
            return
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # one line longer than a block: keep reading
            carry = data
            continue
        carry = data[cut:]
        yield line_no, data[:cut]
        line_no += data.count(b"\n", 0, cut)


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _describe(column, header: bool) -> str:
    return f"column {column!r}" if header else f"field {int(column) + 1}"


def _first_bad_line(block: bytes, first_line: int, table: Table, width: int, index: Sequence[int]) -> str | None:
    """The first malformed line of ``block`` (its line number counted from ``first_line``)."""
    sources = list(table.columns.values())
    kinds = [name in table.integers for name in table.columns]
    for offset, bline in enumerate(block.split(b"\n")):
        lineno = first_line + offset
        try:
            line = bline.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            return f"line {lineno}: not valid UTF-8 text ({err.reason} at byte {err.start})"
        if not line.strip():
            continue
        fields = line.split(table.sep)
        if len(fields) != width:
            return (f"line {lineno}: expected {width} fields separated by {table.sep!r}, "
                    f"found {len(fields)}: {_short(line)}")
        for i, src, is_int in zip(index, sources, kinds):
            value = fields[i].strip()
            what = _describe(src, table.header)
            if is_int:
                try:
                    int(value)
                except ValueError:
                    return f"line {lineno}: {what} should be an integer, found {fields[i]!r}"
            else:
                try:
                    number = float(value)
                except ValueError:
                    number = float("nan")
                if not np.isfinite(number):
                    return f"line {lineno}: {what} should be a number, found {fields[i]!r}"
    return None


def _parse_block(label: str, block: bytes, first_line: int, table: Table, width: int,
                 index: Sequence[int]) -> pd.DataFrame:
    def fail(reason: str) -> SSD4RecError:
        bad = _first_bad_line(block, first_line, table, width, index)
        last_line = first_line + block.rstrip(b"\n").count(b"\n")
        where = bad or f"lines {first_line}-{last_line}: {reason}"
        return SSD4RecError(f"{label}, {where}" + (f" (expected {table.expect})" if table.expect else ""))

    names = list(table.columns)
    dtypes = {i: ("int64" if name in table.integers else "float64") for i, name in zip(index, names)}
    try:
        df = pd.read_csv(io.BytesIO(block), sep=table.sep, header=None, usecols=sorted(set(index)),
                         dtype=dtypes, engine="c", quoting=csv.QUOTE_NONE, na_filter=False,
                         skip_blank_lines=True, encoding="utf-8")
    except pd.errors.EmptyDataError:
        return pd.DataFrame({name: np.empty(0, dtype=dtypes[i]) for i, name in zip(index, names)})
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError, OverflowError) as err:
        raise fail(f"cannot parse: {str(err).splitlines()[0]}") from None
    # pandas ignores surplus fields when usecols is given: every non-blank line must hold width - 1 separators.
    if block.count(table.sep.encode()) != (width - 1) * len(df):
        raise fail("a line has the wrong number of fields")
    out = pd.DataFrame({name: df[i].to_numpy() for i, name in zip(index, names)})
    floats = [name for name in names if name not in table.integers]
    if floats and not np.isfinite(out[floats].to_numpy()).all():
        raise fail("a number is not finite")
    return out


def read_frames(label: str, open_stream: Callable[[], IO[bytes]], table: Table,
                block_bytes: int | None = None) -> Iterator[pd.DataFrame]:
    """Yield one DataFrame (the ``table.columns``, numeric) per block of the file.

    ``block_bytes`` defaults to ``DEFAULT_BLOCK_BYTES`` (read when called, so tests can shrink it).

    Raises SSD4RecError naming ``label`` and the line for malformed input, a
    missing header column, or an unreadable (truncated, corrupt) stream.
    """
    try:
        with open_stream() as raw:
            width, index = table.n_fields, None
            if not table.header:
                if width is None:
                    raise ValueError("Table.n_fields is required without a header")
                index = [int(c) for c in table.columns.values()]
            for first_line, block in line_blocks(raw, block_bytes or DEFAULT_BLOCK_BYTES):
                if index is None:  # the header is the first line of the first block
                    end = block.find(b"\n")
                    head = block if end < 0 else block[:end]
                    try:
                        names = head.decode("utf-8").rstrip("\r").split(table.sep)
                    except UnicodeDecodeError:
                        raise SSD4RecError(f"{label}, line 1 (header): not UTF-8 text") from None
                    names = [n.strip() for n in names]
                    missing = [c for c in table.columns.values() if c not in names]
                    if missing:
                        raise SSD4RecError(
                            f"{label}, line 1 (header): missing column(s) {', '.join(map(repr, missing))}; "
                            f"found {names}" + (f" (expected {table.expect})" if table.expect else "")
                        )
                    width = len(names)
                    index = [names.index(c) for c in table.columns.values()]
                    block, first_line = block[end + 1:] if end >= 0 else b"", 2
                    if not block:
                        continue
                yield _parse_block(label, block, first_line, table, width, index)
    except (OSError, EOFError, zlib.error) as err:
        raise SSD4RecError(f"{label}: cannot read it ({type(err).__name__}: {err}); truncated or corrupt?") from None


class FirstUsers:
    """Keeps the rows of the first ``limit`` distinct users, in order of first appearance.

    Applied block by block while streaming, so the rows of other users are never kept.
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.accepted = np.empty(0, dtype=np.int64)

    def mask(self, users: np.ndarray) -> np.ndarray:
        if self.limit is None:
            return np.ones(len(users), dtype=bool)
        room = self.limit - len(self.accepted)
        if room > 0:
            first_seen = pd.unique(users)  # order of first appearance
            new = first_seen[~np.isin(first_seen, self.accepted)][:room]
            self.accepted = np.concatenate([self.accepted, new.astype(np.int64)])
        return np.isin(users, self.accepted)


def compact(values: np.ndarray) -> np.ndarray:
    """int32 when every value fits (halves the memory of ids), else the array as it is."""
    if values.dtype.kind == "i" and len(values) and values.min() >= np.iinfo(np.int32).min \
            and values.max() <= np.iinfo(np.int32).max:
        return values.astype(np.int32)
    return values
