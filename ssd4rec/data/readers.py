"""Raw-format readers: each official raw file (or archive member) into a user_id/item_id/timestamp table.

Every reader returns ``user_id``/``item_id`` tokens (strings; integers for the
streamed lifelong logs at the end of the module) and float ``timestamp`` seconds,
and fails with an SSD4RecError naming the file and the first bad line. Archives
(zip, tar.gz) and gzip-compressed files are read through ``_Input``.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from ssd4rec.data.streaming import FirstUsers, Table, compact, read_frames
from ssd4rec.errors import SSD4RecError

INTER_COLUMNS = ("user_id", "item_id", "timestamp")
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Input:
    """A readable raw stream: ``label`` names it in messages, ``open()`` gives fresh binary bytes."""

    label: str
    open: Callable[[], IO[bytes]]


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _file_input(path: Path) -> _Input:
    if not path.is_file():
        raise SSD4RecError(f"raw file {path} does not exist")
    if _is_gzip(path):
        import gzip

        return _Input(str(path), lambda: gzip.open(path, "rb"))
    return _Input(str(path), lambda: open(path, "rb"))


def _bytes_input(label: str, data: bytes) -> _Input:
    return _Input(label, lambda: io.BytesIO(data))


def _zip_member(path: Path, basename: str, what: str) -> _Input:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            matches = [n for n in names if n.rsplit("/", 1)[-1] == basename]
            if not matches:
                shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
                raise SSD4RecError(
                    f"{path}: the archive has no member {basename!r} ({what}); it holds: {shown or 'nothing'}"
                )
            member = sorted(matches, key=len)[0]
            data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise SSD4RecError(f"{path}: not a readable zip archive ({err}); expected {what}") from None
    return _bytes_input(f"{path}:{member}", data)


def _short(text: str, n: int = 80) -> str:
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= n else text[:n] + "...")


# --------------------------------------------------------------------------- delimited text


def _first_bad_line(inp: _Input, *, sep: str, header: bool, n_fields: int | None,
                    tokens: Sequence, numbers: Sequence, encoding: str) -> str | None:
    """Slow, line-by-line check used only after the fast reader failed: finds the first bad line."""
    with inp.open() as raw:
        token_idx: list[tuple[int, str]] = []
        number_idx: list[tuple[int, str]] = []
        if not header:
            token_idx = [(int(c), f"field {int(c) + 1}") for c in tokens]
            number_idx = [(int(c), f"field {int(c) + 1}") for c in numbers]
        for lineno, bline in enumerate(raw, 1):
            try:
                line = bline.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as err:
                return f"line {lineno}: not valid {encoding} text ({err.reason} at byte {err.start})"
            if lineno == 1 and header:
                names = line.split(sep)
                missing = [c for c in list(tokens) + list(numbers) if c not in names]
                if missing:
                    return (f"line 1 (header): missing column(s) {', '.join(map(repr, missing))}; "
                            f"found {names}")
                n_fields = len(names)
                token_idx = [(names.index(c), f"column {c!r}") for c in tokens]
                number_idx = [(names.index(c), f"column {c!r}") for c in numbers]
                continue
            if not line.strip():
                continue
            fields = line.split(sep)
            if n_fields is not None and len(fields) != n_fields:
                return (f"line {lineno}: expected {n_fields} fields separated by {sep!r}, "
                        f"found {len(fields)}: {_short(line)}")
            for i, what in token_idx:
                if not fields[i]:
                    return f"line {lineno}: {what} is empty: {_short(line)}"
            for i, what in number_idx:
                try:
                    value = float(fields[i])
                except ValueError:
                    value = float("nan")
                if not np.isfinite(value):
                    return f"line {lineno}: {what} should be a number, found {fields[i]!r}"
    return None


def _read_delimited(inp: _Input, *, sep: str, header: bool, tokens: Mapping[str, object],
                    numbers: Mapping[str, object], n_fields: int | None = None,
                    encoding: str = "utf-8", expect: str = "") -> pd.DataFrame:
    """Read the ``tokens`` (kept as strings) and ``numbers`` (float64) columns of a delimited file.

    ``tokens``/``numbers`` map output names to source columns (indices without a
    header, names with one). Fast pandas path; on any problem, a line-by-line pass
    finds the first bad line so that the error names it.
    """
    src_tokens, src_numbers = list(tokens.values()), list(numbers.values())
    usecols = src_tokens + src_numbers

    def fail(reason: str) -> SSD4RecError:
        bad = _first_bad_line(inp, sep=sep, header=header, n_fields=n_fields, tokens=src_tokens,
                              numbers=src_numbers, encoding=encoding)
        where = bad if bad is not None else reason
        return SSD4RecError(f"{inp.label}, {where}" + (f" (expected {expect})" if expect else ""))

    try:
        with inp.open() as raw:
            data = raw.read()
        if len(sep) > 1:  # pandas' fast parser needs a one-character separator
            text = data.decode(encoding).replace(sep, "\t")
            n_seps = text.count("\t")
            stream: IO = io.StringIO(text)
            psep, penc = "\t", None
        else:
            n_seps = data.count(sep.encode(encoding))
            stream, psep, penc = io.BytesIO(data), sep, encoding
        del data
        df = pd.read_csv(
            stream, sep=psep, header=0 if header else None, usecols=usecols,
            dtype={**{c: str for c in src_tokens}, **{c: "float64" for c in src_numbers}},
            na_filter=False, quoting=csv.QUOTE_NONE, engine="c", encoding=penc,
            skip_blank_lines=True,
        )
        del stream
    except pd.errors.EmptyDataError:
        raise SSD4RecError(f"{inp.label} is empty: no interactions" + (f" (expected {expect})" if expect else "")) from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as err:
        raise fail(f"cannot parse: {str(err).splitlines()[0]}") from None
    except (OSError, EOFError, zlib.error) as err:
        raise SSD4RecError(f"{inp.label}: cannot read it ({type(err).__name__}: {err}); truncated or corrupt?") from None
    if len(df) == 0:
        raise SSD4RecError(f"{inp.label} is empty: no interactions" + (f" (expected {expect})" if expect else ""))
    # pandas ignores surplus fields when usecols is given: every non-blank line must
    # hold exactly n_fields - 1 separators (the header, where present, sets n_fields).
    width = len(df.columns) if n_fields is None else n_fields
    if header:
        width = _header_width(inp, sep, encoding)
    if n_seps != (width - 1) * (len(df) + int(header)):
        raise fail("a line has the wrong number of fields")
    out = pd.DataFrame({name: df[col] for name, col in tokens.items()})
    for name, col in numbers.items():
        out[name] = df[col].to_numpy(dtype="float64")
    bad_token = np.zeros(len(df), dtype=bool)
    for name in tokens:
        bad_token |= (out[name] == "").to_numpy()
    bad_number = np.zeros(len(df), dtype=bool)
    for name in numbers:
        bad_number |= ~np.isfinite(out[name].to_numpy())
    if bad_token.any() or bad_number.any():
        raise fail("a row has an empty or non-numeric field")
    return out


def _header_width(inp: _Input, sep: str, encoding: str) -> int:
    with inp.open() as raw:
        for bline in raw:
            line = bline.decode(encoding, errors="replace").rstrip("\r\n")
            if line.strip():
                return line.count(sep) + 1
    return 0


# --------------------------------------------------------------------------- readers


def read_inter(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a RecBole atomic ``.inter`` (or ``.inter.gz``) file: user_id, item_id, timestamp."""
    return _read_atomic(_file_input(Path(path)))


def _read_header_line(inp: _Input) -> str:
    """The first line of an atomic file, decoded; errors name the file."""
    with inp.open() as raw:
        try:
            first = raw.readline().decode("utf-8").rstrip("\r\n")
        except (OSError, EOFError, zlib.error) as err:
            raise SSD4RecError(f"{inp.label}: cannot read it ({err}); truncated or corrupt?") from None
        except UnicodeDecodeError:
            raise SSD4RecError(f"{inp.label}, line 1 (header): not UTF-8 text") from None
    return first


def _read_atomic(inp: _Input) -> pd.DataFrame:
    first = _read_header_line(inp)
    if not first.strip():
        raise SSD4RecError(f"{inp.label} is empty: expected a RecBole header such as {INTER_HEADER!r}")
    columns = first.split("\t")
    names = [c.split(":", 1)[0] for c in columns]
    missing = [n for n in INTER_COLUMNS if n not in names]
    if missing:
        raise SSD4RecError(
            f"{inp.label}, line 1 (header): a RecBole .inter file needs the fields "
            f"{', '.join(INTER_COLUMNS)} (e.g. {INTER_HEADER!r}); missing {', '.join(missing)}, found {columns}"
        )
    col = {n: columns[names.index(n)] for n in INTER_COLUMNS}
    return _read_delimited(
        inp, sep="\t", header=True, tokens={"user_id": col["user_id"], "item_id": col["item_id"]},
        numbers={"timestamp": col["timestamp"]}, expect="tab-separated RecBole atomic rows",
    )


def read_movielens_ratings(inp: _Input) -> pd.DataFrame:
    """MovieLens ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, latin-1."""
    return _read_delimited(
        inp, sep="::", header=False, n_fields=4, tokens={"user_id": 0, "item_id": 1},
        numbers={"timestamp": 3}, encoding="latin-1", expect="UserID::MovieID::Rating::Timestamp",
    )


def read_amazon_ratings_csv(inp: _Input) -> pd.DataFrame:
    """Amazon 2014 ratings-only CSV: ``user,item,rating,unix time`` without a header."""
    return _read_delimited(
        inp, sep=",", header=False, n_fields=4, tokens={"user_id": 0, "item_id": 1},
        numbers={"timestamp": 3}, expect="user,item,rating,unix_time with no header",
    )


def read_amazon_reviews_json(inp: _Input) -> pd.DataFrame:
    """Amazon review JSON, one object per line (streamed).

    2014 and 2018 (5-core) files: ``reviewerID``, ``asin``, ``unixReviewTime`` (s);
    the 2014 files are often Python dict literals rather than JSON, which is read
    with ``ast.literal_eval``. 2023 JSONL: ``user_id``, ``parent_asin`` (falling
    back to ``asin``), ``timestamp`` in milliseconds.
    """
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    expect = "one JSON object (or Python dict literal) per line"
    try:
        with inp.open() as raw:
            for lineno, bline in enumerate(raw, 1):
                line = bline.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    try:
                        obj = ast.literal_eval(line.decode("utf-8"))
                    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError,
                            UnicodeDecodeError) as err:
                        raise SSD4RecError(
                            f"{inp.label}, line {lineno}: neither JSON nor a Python dict literal "
                            f"({type(err).__name__}); expected {expect}: {_short(line.decode('utf-8', 'replace'))}"
                        ) from None
                if not isinstance(obj, dict):
                    raise SSD4RecError(f"{inp.label}, line {lineno}: expected an object, found {type(obj).__name__}")
                if "reviewerID" in obj:
                    keys, scale = ("reviewerID", "asin", "unixReviewTime"), 1.0
                elif "user_id" in obj:
                    item_key = "parent_asin" if "parent_asin" in obj else "asin"
                    keys, scale = ("user_id", item_key, "timestamp"), 1000.0
                else:
                    raise SSD4RecError(
                        f"{inp.label}, line {lineno}: no 'reviewerID' (Amazon 2014/2018) or 'user_id' "
                        f"(Amazon 2023) key; found keys {sorted(obj)[:12]}"
                    )
                missing = [k for k in keys if obj.get(k) in (None, "")]
                if missing:
                    raise SSD4RecError(f"{inp.label}, line {lineno}: missing {', '.join(map(repr, missing))}")
                try:
                    t = float(obj[keys[2]]) / scale
                except (TypeError, ValueError):
                    t = float("nan")
                if not np.isfinite(t):
                    raise SSD4RecError(
                        f"{inp.label}, line {lineno}: {keys[2]!r} should be a number, found {obj[keys[2]]!r}"
                    )
                users.append(str(obj[keys[0]]))
                items.append(str(obj[keys[1]]))
                times.append(t)
    except (OSError, EOFError, zlib.error) as err:
        raise SSD4RecError(f"{inp.label}: cannot read it ({type(err).__name__}: {err}); truncated or corrupt?") from None
    if not users:
        raise SSD4RecError(f"{inp.label} is empty: no interactions (expected {expect})")
    return pd.DataFrame({"user_id": users, "item_id": items,
                         "timestamp": np.asarray(times, dtype="float64")})


def read_kuairand_log(inp: _Input, click_only: bool = True) -> tuple[pd.DataFrame, int]:
    """A KuaiRand log CSV (``user_id, video_id, ..., time_ms, is_click, ...``).

    Returns the (optionally clicks-only) interactions and the number of rows read.
    ``time_ms`` is converted to seconds.
    """
    numbers = {"time_ms": "time_ms"} | ({"is_click": "is_click"} if click_only else {})
    df = _read_delimited(
        inp, sep=",", header=True, tokens={"user_id": "user_id", "item_id": "video_id"},
        numbers=numbers, expect="KuaiRand log CSV with columns user_id, video_id, time_ms, is_click",
    )
    n = len(df)
    if click_only:
        df = df[df["is_click"].to_numpy() == 1]
    out = pd.DataFrame({"user_id": df["user_id"].to_numpy(), "item_id": df["item_id"].to_numpy(),
                        "timestamp": df["time_ms"].to_numpy() / 1000.0})
    return out, n


# --------------------------------------------------------------------------- KuaiRand logs


def _kuairand_from_dir(folder: Path, logs: Sequence[str]) -> list[_Input]:
    inputs, missing = [], []
    for log in logs:
        hits = sorted(folder.rglob(f"{log}.csv")) or sorted(folder.rglob(f"{log}.csv.gz"))
        if hits:
            inputs.append(_file_input(hits[0]))
        else:
            missing.append(log)
    if missing:
        tars = sorted(folder.rglob("KuaiRand-Pure.tar.gz"))
        if tars and len(missing) == len(logs):
            return _kuairand_from_tar(tars[0], logs)
        found = sorted(p.name for p in folder.rglob("*.csv"))
        raise SSD4RecError(
            f"{folder}: missing KuaiRand log(s) {', '.join(m + '.csv' for m in missing)} "
            f"(source.logs); CSV files found: {found or 'none'}"
        )
    return inputs


def _kuairand_from_tar(path: Path, logs: Sequence[str]) -> list[_Input]:
    wanted = {f"{log}.csv": log for log in logs}
    found: dict[str, _Input] = {}
    seen: list[str] = []
    try:
        with tarfile.open(path, mode="r|*") as tf:  # streaming: one pass over the archive
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile():
                    seen.append(base)
                if member.isfile() and base in wanted and base not in found:
                    fh = tf.extractfile(member)
                    found[base] = _bytes_input(f"{path}:{member.name}", fh.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise SSD4RecError(f"{path}: not a readable tar.gz archive ({err}); expected KuaiRand-Pure.tar.gz") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        shown = ", ".join(seen[:12]) + (" ..." if len(seen) > 12 else "")
        raise SSD4RecError(
            f"{path}: the archive has no member {', '.join(missing)} (source.logs); it holds: {shown or 'nothing'}"
        )
    return [found[f"{log}.csv"] for log in logs]


# --------------------------------------------------------------------------- lifelong logs, streamed
#
# KuaiRand-27K's logs (23 GB) and LFM-1b's listening events (about 10^9 lines) are read
# block by block (ssd4rec.data.streaming) into integer ids: their tokens are integers,
# and Python strings for 10^8 rows would not fit in memory.

KUAIRAND_27K_ARCHIVE = "KuaiRand-27K.tar.gz"
LFM1B_ITEM_FIELDS = {"artists": 1, "albums": 2, "tracks": 3}  # columns of LFM-1b_LEs.txt


def _stacked(users: list, items: list, times: list) -> pd.DataFrame:
    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    return pd.DataFrame({"user_id": cat(users, np.int64), "item_id": cat(items, np.int64),
                         "timestamp": cat(times, np.float64)})


def read_kuairand_27k_log(inp: _Input, click_only: bool = True,
                          block_bytes: int | None = None) -> tuple[pd.DataFrame, int]:
    """One KuaiRand-27K log CSV, streamed: (the interactions, the number of rows read).

    Columns used: ``user_id``, ``video_id`` (the item), ``time_ms`` (converted to
    seconds, fraction kept) and, with ``click_only``, ``is_click == 1``.
    """
    columns = {"user_id": "user_id", "item_id": "video_id", "time_ms": "time_ms"}
    if click_only:
        columns["is_click"] = "is_click"
    table = Table(sep=",", header=True, columns=columns, integers=frozenset(columns),
                  expect="KuaiRand log CSV with columns user_id, video_id, time_ms, is_click")
    users, items, times, n = [], [], [], 0
    for frame in read_frames(inp.label, inp.open, table, block_bytes):
        n += len(frame)
        if click_only:
            frame = frame[frame["is_click"].to_numpy() == 1]
        users.append(compact(frame["user_id"].to_numpy()))
        items.append(compact(frame["item_id"].to_numpy()))
        times.append(frame["time_ms"].to_numpy() / 1000.0)
    if n == 0:
        raise SSD4RecError(f"{inp.label} is empty: no interactions (expected {table.expect})")
    return _stacked(users, items, times), n


def read_lfm1b_events(inp: _Input, interaction_type: str = "tracks", max_users: int | None = None,
                      block_bytes: int | None = None) -> tuple[pd.DataFrame, int]:
    """LFM-1b_LEs.txt, streamed: (the listening events, the number of lines read).

    Tab-separated, no header: user-id, artist-id, album-id, track-id, timestamp
    (unix seconds). The item is the track (or album, artist: ``interaction_type``).
    ``max_users`` keeps the first users in file order only, while reading.
    """
    table = Table(sep="\t", header=False, n_fields=5,
                  columns={"user_id": 0, "item_id": LFM1B_ITEM_FIELDS[interaction_type], "timestamp": 4},
                  integers=frozenset({"user_id", "item_id", "timestamp"}),
                  expect="LFM-1b_LEs.txt lines: user-id, artist-id, album-id, track-id, timestamp (tab-separated)")
    return _read_user_item_time(inp, table, max_users, block_bytes)


def read_atomic_stream(inp: _Input, item_fields: Sequence[str] = ("item_id",), max_users: int | None = None,
                       block_bytes: int | None = None) -> tuple[pd.DataFrame, int]:
    """A RecBole .inter file with integer tokens, streamed (e.g. RecSysDatasets' lfm1b-tracks.inter).

    The item column is the first of ``item_fields`` in the header (``tracks_id`` in
    RecSysDatasets' LFM-1b files).
    """
    first = _read_header_line(inp)
    columns = first.split("\t")
    names = [c.split(":", 1)[0] for c in columns]
    item = next((f for f in item_fields if f in names), None)
    missing = [n for n in ("user_id", "timestamp") if n not in names] + ([] if item else [" or ".join(item_fields)])
    if missing:
        raise SSD4RecError(
            f"{inp.label}, line 1 (header): a RecBole .inter file needs user_id, {' or '.join(item_fields)} "
            f"and timestamp; missing {', '.join(missing)}, found {columns}"
        )
    table = Table(sep="\t", header=True,
                  columns={"user_id": columns[names.index("user_id")], "item_id": columns[names.index(item)],
                           "timestamp": columns[names.index("timestamp")]},
                  integers=frozenset({"user_id", "item_id"}),
                  expect="tab-separated RecBole atomic rows with integer user and item tokens")
    return _read_user_item_time(inp, table, max_users, block_bytes)


def _read_user_item_time(inp: _Input, table: Table, max_users: int | None,
                         block_bytes: int | None) -> tuple[pd.DataFrame, int]:
    keep = FirstUsers(max_users)
    users, items, times, n = [], [], [], 0
    for frame in read_frames(inp.label, inp.open, table, block_bytes):
        n += len(frame)
        frame = frame[keep.mask(frame["user_id"].to_numpy())]
        users.append(compact(frame["user_id"].to_numpy()))
        items.append(compact(frame["item_id"].to_numpy()))
        times.append(frame["timestamp"].to_numpy(dtype=np.float64))
    if n == 0:
        raise SSD4RecError(f"{inp.label} is empty: no interactions (expected {table.expect})")
    return _stacked(users, items, times), n


def zip_member_stream(path: Path, basename: str, what: str) -> _Input:
    """A zip member read as a stream (never loaded whole), e.g. LFM-1b.zip's 30 GB LFM-1b_LEs.txt."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError) as err:
        raise SSD4RecError(f"{path}: not a readable zip archive ({err}); expected {what}") from None
    matches = sorted((n for n in names if n.rsplit("/", 1)[-1] == basename), key=len)
    if not matches:
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise SSD4RecError(f"{path}: the archive has no member {basename!r} ({what}); it holds: {shown or 'nothing'}")

    class _Member:
        """The member's stream, closing its archive with it."""

        def __enter__(self):
            self.zf = zipfile.ZipFile(path)
            self.fh = self.zf.open(matches[0])
            return self.fh

        def __exit__(self, *exc):
            self.fh.close()
            self.zf.close()

    return _Input(f"{path}:{matches[0]}", _Member)


def read_kuairand_27k_tar(path: Path, logs: Sequence[str], click_only: bool,
                          block_bytes: int | None = None) -> dict[str, tuple[pd.DataFrame, int, str]]:
    """The ``logs`` of KuaiRand-27K.tar.gz in one streaming pass: log -> (table, rows read, label).

    The archive (9.9 GB) is never extracted: each wanted CSV member is parsed as it
    streams by.
    """
    wanted = {f"{log}.csv": log for log in logs}
    found: dict[str, tuple[pd.DataFrame, int, str]] = {}
    seen: list[str] = []
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile():
                    continue
                seen.append(base)
                if base in wanted and wanted[base] not in found:
                    fh = tf.extractfile(member)
                    label = f"{path}:{member.name}"
                    df, n = read_kuairand_27k_log(_Input(label, lambda fh=fh: fh), click_only, block_bytes)
                    found[wanted[base]] = (df, n, label)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise SSD4RecError(f"{path}: not a readable tar.gz archive ({err}); expected {KUAIRAND_27K_ARCHIVE}") from None
    missing = [name for name, log in wanted.items() if log not in found]
    if missing:
        shown = ", ".join(seen[:12]) + (" ..." if len(seen) > 12 else "")
        raise SSD4RecError(
            f"{path}: the archive has no member {', '.join(missing)} (source.logs); it holds: {shown or 'nothing'}"
        )
    return found
