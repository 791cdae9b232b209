"""The paper's datasets, built from their official raw files into RecBole atomic files.

One pipeline for every dataset (documented in ``docs/datasets.md``):

1. **read** the official raw file(s) into a table of ``user_id`` (token),
   ``item_id`` (token) and ``timestamp`` (float seconds since the epoch; sources
   in milliseconds are divided by 1000, so no precision is lost). KuaiRand keeps
   clicks only when ``source.click_only`` is true;
2. **de-duplicate**: rows with the same user, item *and* timestamp are kept once
   (the first in file order). Repeated interactions at different times are real
   re-consumption and are kept;
3. **filter** with RecBole's iterative rule (``user_inter_num_interval`` /
   ``item_inter_num_interval``, ``[5,inf)`` = 5-core): each round drops, at the
   same time, every user and every item whose current count is outside its
   interval, until a round drops nothing;
4. **order**: users in order of first appearance in the raw file, each user's
   interactions by timestamp; the sort is stable, so ties keep raw file order
   (RecBole's own sorts are stable too, so this is the order the model sees);
5. **write** ``OUT/NAME/NAME.inter`` (tab-separated, header
   ``user_id:token\\titem_id:token\\ttimestamp:float``) to a temporary file in
   the same folder that is renamed onto the target only once it is complete.

``ensure_dataset`` is what the training entry point calls; ``scripts/prepare_dataset.py``
is the command-line front end.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import io
import json
import os
import re
import tarfile
import secrets
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from ssd4rec.data.download import DEFAULT_TIMEOUT_S, RemoteFile
from ssd4rec.data.download import download as fetch_remote
from ssd4rec.errors import SSD4RecError

INTER_COLUMNS = ("user_id", "item_id", "timestamp")
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
FIVE_CORE = "[5,inf)"
# The repository's datasets/ folder: per-dataset YAML files, and the default output.
REPO_DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"

KUAIRAND_STANDARD_LOGS = ("log_standard_4_08_to_4_21_pure", "log_standard_4_22_to_5_08_pure")
KUAIRAND_ALL_LOGS = KUAIRAND_STANDARD_LOGS + ("log_random_4_22_to_5_08_pure",)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Release:
    """One official release of a dataset's raw data (selected by ``source.version``)."""

    version: str
    description: str
    remote: RemoteFile | None
    local_names: tuple[str, ...] = ()  # raw file names recognised in data_path/<name>/ or data_path/raw/


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    kind: str  # "movielens" | "amazon" | "kuairand" | "atomic"
    releases: tuple[Release, ...]
    default_interval: str | None
    homepage: str
    licence: str
    reference: Mapping | None = None
    reference_label: str = "reference"

    @property
    def default_version(self) -> str:
        return self.releases[0].version

    def release(self, version: str) -> Release:
        for rel in self.releases:
            if rel.version == version:
                return rel
        known = ", ".join(repr(r.version) for r in self.releases)
        raise SSD4RecError(f"dataset {self.name!r} has no source version {version!r}; known: {known}")


_SNAP = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
_UCSD_2018 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/categoryFilesSmall/"
_UCSD_2023 = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/review_categories/"
_AMAZON_LICENCE = (
    "McAuley lab (UCSD) Amazon review data: distributed for research use by its authors only, "
    "with a request to cite them; no licence to redistribute"
)


def _amazon_2014(category: str) -> tuple[Release, Release]:
    five = f"reviews_{category}_5.json.gz"
    ratings = f"ratings_{category}.csv"
    return (
        Release("2014", f"Amazon 2014 (McAuley et al.) 5-core reviews, {five}",
                RemoteFile(_SNAP + five, five), (five, five[: -len(".gz")])),
        Release("2014-ratings", f"Amazon 2014 ratings-only CSV (all ratings, not 5-core), {ratings}",
                RemoteFile(_SNAP + ratings, ratings), (ratings, ratings + ".gz")),
    )


DATASETS: dict[str, DatasetSpec] = {}


def _register(spec: DatasetSpec) -> None:
    DATASETS[spec.name] = spec


_register(DatasetSpec(
    name="ml-1m",
    title="MovieLens 1M",
    kind="movielens",
    releases=(
        Release("2003", "MovieLens 1M (GroupLens, released 2003-02), ml-1m.zip -> ml-1m/ratings.dat",
                RemoteFile("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "ml-1m.zip",
                           md5="c4d9eecfca2ab87c1945afe126590906"),
                ("ml-1m.zip", "ratings.dat")),
    ),
    default_interval=FIVE_CORE,
    homepage="https://grouplens.org/datasets/movielens/1m/",
    licence="GroupLens MovieLens usage licence: research use; redistribution needs GroupLens' permission",
    reference={"users": 6040, "items": 3416, "interactions": 999611},
    reference_label="expected",
))

_register(DatasetSpec(
    name="amazon-beauty",
    title="Amazon Beauty",
    kind="amazon",
    releases=_amazon_2014("Beauty"),
    default_interval=FIVE_CORE,
    homepage="https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html",
    licence=_AMAZON_LICENCE,
    reference={"users": 22363, "items": 12101, "interactions": 198502},
    reference_label="expected",
))

_register(DatasetSpec(
    name="amazon-video-games",
    title="Amazon Video Games",
    kind="amazon",
    releases=(
        Release("2018", "Amazon 2018 (Ni et al.) 5-core reviews, Video_Games_5.json.gz",
                RemoteFile(_UCSD_2018 + "Video_Games_5.json.gz", "Video_Games_5.json.gz"),
                ("Video_Games_5.json.gz", "Video_Games_5.json")),
        *_amazon_2014("Video_Games"),
        Release("2023", "Amazon Reviews 2023 (Hou et al.) Video_Games.jsonl.gz (all reviews, not 5-core)",
                RemoteFile(_UCSD_2023 + "Video_Games.jsonl.gz", "Video_Games.jsonl.gz"),
                ("Video_Games.jsonl.gz", "Video_Games.jsonl")),
    ),
    default_interval=FIVE_CORE,
    homepage="https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/",
    licence=_AMAZON_LICENCE,
    reference={"users": 50597, "items": 16874, "interactions": 453637},
    reference_label="expected",
))

_register(DatasetSpec(
    name="kuairand",
    title="KuaiRand-Pure",
    kind="kuairand",
    releases=(
        Release("pure", "KuaiRand-Pure (Gao et al., CIKM 2022), KuaiRand-Pure.tar.gz from Zenodo record 10439422",
                RemoteFile("https://zenodo.org/records/10439422/files/KuaiRand-Pure.tar.gz",
                           "KuaiRand-Pure.tar.gz"),
                ("KuaiRand-Pure.tar.gz",)),
    ),
    default_interval=FIVE_CORE,
    homepage="https://kuairand.com/",
    licence="CC BY-SA 4.0 (KuaiRand repository); not shipped with ssd4rec all the same",
    reference={"users": 23951, "items": 7111, "interactions": 1134420, "avg_seq_len": 47.4,
               "max_seq_len": 809},
    reference_label="paper",
))

_register(DatasetSpec(
    name="ml-100k",
    title="MovieLens 100K (RecBole's bundled copy)",
    kind="atomic",
    releases=(Release("recbole", "the copy shipped in RecBole's wheel (recbole/dataset_example/ml-100k)",
                      None, ("ml-100k.inter.gz",)),),
    default_interval=None,  # converted as is: RecBole's quick-start numbers stay valid
    homepage="https://grouplens.org/datasets/movielens/100k/",
    licence="GroupLens MovieLens usage licence (the copy comes with RecBole)",
))


def known_datasets() -> list[str]:
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; unknown names raise SSD4RecError listing the known ones."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise SSD4RecError(
            f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}"
        ) from None


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SourceOptions:
    """How to turn raw files into the .inter file; read from ``datasets/NAME.yaml``.

    ``version``, ``click_only`` and ``logs`` come from the YAML's ``source:`` mapping;
    the two intervals are RecBole's own top-level keys, so RecBole re-applying
    them at load time is a no-op.
    """

    version: str
    user_inter_num_interval: str | None
    item_inter_num_interval: str | None
    click_only: bool = True
    logs: tuple[str, ...] = KUAIRAND_STANDARD_LOGS


def default_options(name: str) -> SourceOptions:
    spec = get_spec(name)
    return SourceOptions(spec.default_version, spec.default_interval, spec.default_interval)


def options_from_mapping(name: str, config: Mapping, origin: str = "the config") -> SourceOptions:
    """Build SourceOptions for ``name`` from a parsed config (e.g. the dataset YAML)."""
    spec = get_spec(name)
    base = default_options(name)
    if not isinstance(config, Mapping):
        raise SSD4RecError(f"{origin}: expected a mapping of keys to values, found {type(config).__name__}")
    intervals = {}
    for key in ("user_inter_num_interval", "item_inter_num_interval"):
        value = config.get(key, getattr(base, key))
        if value is not None:
            if not isinstance(value, str):
                raise SSD4RecError(f"{origin}: {key} must be a string such as \"[5,inf)\" or null, found {value!r}")
            parse_intervals(value, f"{origin}: {key}")
        intervals[key] = value
    source = config.get("source") or {}
    if not isinstance(source, Mapping):
        raise SSD4RecError(f"{origin}: 'source' must be a mapping, found {source!r}")
    allowed = {"version"} | ({"click_only", "logs"} if spec.kind == "kuairand" else set())
    unknown = sorted(set(source) - allowed)
    if unknown:
        raise SSD4RecError(
            f"{origin}: unknown key(s) source.{', source.'.join(map(str, unknown))} for {name}; "
            f"allowed: {', '.join('source.' + k for k in sorted(allowed))}"
        )
    version = str(source.get("version", base.version))
    spec.release(version)  # validates
    click_only = source.get("click_only", base.click_only)
    if not isinstance(click_only, bool):
        raise SSD4RecError(f"{origin}: source.click_only must be true or false, found {click_only!r}")
    logs = source.get("logs", list(base.logs))
    if isinstance(logs, str) or not isinstance(logs, Sequence) or not logs:
        raise SSD4RecError(f"{origin}: source.logs must be a non-empty list of log names, found {logs!r}")
    logs = tuple(str(x).removesuffix(".csv") for x in logs)
    bad = [x for x in logs if x not in KUAIRAND_ALL_LOGS]
    if bad:
        raise SSD4RecError(
            f"{origin}: source.logs has unknown log(s) {bad}; KuaiRand-Pure logs are {list(KUAIRAND_ALL_LOGS)}"
        )
    return SourceOptions(version, intervals["user_inter_num_interval"],
                         intervals["item_inter_num_interval"], click_only, logs)


def load_source_options(name: str, yaml_path: str | os.PathLike[str] | None = None) -> SourceOptions:
    """Options for ``name`` from ``yaml_path`` (default: the repository's ``datasets/NAME.yaml``).

    Without a YAML file (e.g. ml-100k), the registry defaults are used.
    """
    get_spec(name)
    path = Path(yaml_path) if yaml_path is not None else REPO_DATASETS_DIR / f"{name}.yaml"
    if not path.is_file():
        if yaml_path is not None:
            raise SSD4RecError(f"dataset config {path} does not exist")
        return default_options(name)
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise SSD4RecError(f"{path}: not valid YAML: {err}") from None
    return options_from_mapping(name, config, origin=str(path))


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


def _read_atomic(inp: _Input) -> pd.DataFrame:
    with inp.open() as raw:
        try:
            first = raw.readline().decode("utf-8").rstrip("\r\n")
        except (OSError, EOFError, zlib.error) as err:
            raise SSD4RecError(f"{inp.label}: cannot read it ({err}); truncated or corrupt?") from None
        except UnicodeDecodeError:
            raise SSD4RecError(f"{inp.label}, line 1 (header): not UTF-8 text") from None
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


# --------------------------------------------------------------------------- raw dispatch


@dataclass
class BuildReport:
    """What happened between the raw files and the written table (printed by ``--stats``)."""

    sources: list[str] = field(default_factory=list)
    raw_rows: int = 0
    after_source_filter: int = 0
    duplicates_dropped: int = 0
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
            f"removed by the interaction-count filter: {self.filtered_out:,} in {self.filter_rounds} round(s)",
            f"interactions written: {self.rows:,}",
        ]
        return out + [f"note: {n}" for n in self.notes]


_ATOMIC_SUFFIXES = (".inter", ".inter.gz")


def _is_atomic(path: Path) -> bool:
    return path.name.endswith(_ATOMIC_SUFFIXES)


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def read_raw(name: str, raw: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
             options: SourceOptions | None = None) -> tuple[pd.DataFrame, BuildReport]:
    """Read the raw file(s) of dataset ``name`` into a user_id/item_id/timestamp table.

    ``raw`` is one path (a file, an archive, or a folder holding the raw files) or,
    for KuaiRand, several log CSVs. The format follows from the file name.
    """
    spec = get_spec(name)
    opts = options or load_source_options(name)
    paths = [Path(raw)] if isinstance(raw, (str, os.PathLike)) else [Path(p) for p in raw]
    if not paths:
        raise SSD4RecError(f"no raw file given for {name}")
    for p in paths:
        if not p.exists():
            raise SSD4RecError(f"raw path {p} does not exist")
    report = BuildReport()
    if spec.kind == "kuairand":
        df = _read_kuairand(paths, opts, report)
    else:
        if len(paths) != 1:
            raise SSD4RecError(f"{name} is built from one raw file, got {len(paths)}: {[str(p) for p in paths]}")
        path = paths[0]
        if path.is_dir():
            path = _find_in_dir(spec, path)
        df = _read_single(spec, path)
        report.sources.append(str(path))
    report.raw_rows = report.raw_rows or len(df)
    report.after_source_filter = len(df)
    return df, report


def _find_in_dir(spec: DatasetSpec, folder: Path) -> Path:
    names = [n for rel in spec.releases for n in rel.local_names]
    for n in names:
        hits = sorted(folder.rglob(n))
        if hits:
            return hits[0]
    atomic = sorted(p for p in folder.rglob(f"{spec.name}*.inter*") if _is_atomic(p))
    if atomic:
        return atomic[0]
    raise SSD4RecError(
        f"{folder}: no raw file for {spec.name} in this folder; expected one of {', '.join(names)} "
        f"or {spec.name}*.inter(.gz)"
    )


def _read_single(spec: DatasetSpec, path: Path) -> pd.DataFrame:
    name = path.name
    base = _strip_gz(name).lower()
    if _is_atomic(path):
        return _read_atomic(_file_input(path))
    if spec.kind == "movielens":
        if base.endswith(".zip"):
            return read_movielens_ratings(_zip_member(path, "ratings.dat", "MovieLens ratings.dat"))
        if base.endswith(".dat"):
            return read_movielens_ratings(_file_input(path))
        expected = "ml-1m.zip, ratings.dat or a .inter(.gz) file"
    elif spec.kind == "amazon":
        if base.endswith(".csv"):
            return read_amazon_ratings_csv(_file_input(path))
        if base.endswith((".json", ".jsonl")):
            return read_amazon_reviews_json(_file_input(path))
        expected = "an Amazon ratings .csv, a reviews .json(.gz) / .jsonl(.gz), or a .inter(.gz) file"
    else:
        expected = "a RecBole .inter(.gz) file"
    raise SSD4RecError(f"{path}: not a raw format {spec.name} can be built from; expected {expected}")


def _read_kuairand(paths: list[Path], opts: SourceOptions, report: BuildReport) -> pd.DataFrame:
    if len(paths) == 1 and _is_atomic(paths[0]):
        df = _read_atomic(_file_input(paths[0]))
        report.sources.append(str(paths[0]))
        return df
    inputs: list[_Input] = []
    if len(paths) == 1 and paths[0].is_dir():
        inputs = _kuairand_from_dir(paths[0], opts.logs)
    elif len(paths) == 1 and paths[0].name.endswith((".tar.gz", ".tgz", ".tar")):
        inputs = _kuairand_from_tar(paths[0], opts.logs)
    else:
        for p in paths:
            if p.is_dir() or not _strip_gz(p.name).endswith(".csv"):
                raise SSD4RecError(
                    f"{p}: KuaiRand is built from its log CSVs, their folder, or KuaiRand-Pure.tar.gz"
                )
            inputs.append(_file_input(p))
    frames = []
    for inp in inputs:
        df, n = read_kuairand_log(inp, click_only=opts.click_only)
        report.sources.append(inp.label)
        report.raw_rows += n
        frames.append(df)
    if opts.click_only:
        report.notes.append("KuaiRand: only rows with is_click == 1 kept (source.click_only: true)")
    return pd.concat(frames, ignore_index=True)


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
                       report: BuildReport | None = None) -> pd.DataFrame:
    """De-duplicate, filter and order a user_id/item_id/timestamp table (module docstring, 2-4)."""
    report = report if report is not None else BuildReport()
    n0 = len(df)
    df = df.drop_duplicates(subset=list(INTER_COLUMNS), keep="first")
    report.duplicates_dropped = n0 - len(df)
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


# --------------------------------------------------------------------------- writing


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name next to ``path`` (same file system, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def write_inter(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as a RecBole atomic .inter file, atomically (temporary file + os.replace)."""
    path = Path(path)
    for col in ("user_id", "item_id"):
        bad = df[col].astype(str).str.contains(r"[\t\r\n]", regex=True)
        if bad.any():
            raise SSD4RecError(
                f"cannot write {path}: a {col} contains a tab or newline ({df[col][bad].iloc[0]!r})"
            )
    ts = df["timestamp"].to_numpy(dtype="float64")
    if np.all(np.floor(ts) == ts) and np.all(np.abs(ts) < 2.0**53):
        ts_col = ts.astype(np.int64)  # whole seconds are written without a trailing ".0"
    else:
        ts_col = ts
    out = pd.DataFrame({"u": df["user_id"].to_numpy(), "i": df["item_id"].to_numpy(), "t": ts_col})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as fh:
            fh.write(INTER_HEADER + "\n")
            out.to_csv(fh, sep="\t", header=False, index=False, lineterminator="\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- building


@dataclass
class BuildResult:
    path: Path
    table: pd.DataFrame
    report: BuildReport


def build_dataset(name: str, raw, out: str | os.PathLike[str],
                  options: SourceOptions | None = None) -> BuildResult:
    """Read ``raw``, clean it and write ``OUT/NAME/NAME.inter`` (overwriting atomically)."""
    opts = options or load_source_options(name)
    df, report = read_raw(name, raw, opts)
    df = clean_interactions(df, opts.user_inter_num_interval, opts.item_inter_num_interval, report)
    path = write_inter(df, Path(out) / name / f"{name}.inter")
    return BuildResult(path, df, report)


def _recbole_ml100k() -> Path | None:
    found = importlib.util.find_spec("recbole")
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        p = Path(loc) / "dataset_example" / "ml-100k" / "ml-100k.inter"
        if p.is_file():
            return p
    return None


def find_local_raw(name: str, data_path: str | os.PathLike[str],
                   options: SourceOptions | None = None) -> Path | None:
    """A raw file (or KuaiRand log folder) for ``name`` already in ``data_path/NAME/`` or ``data_path/raw/``."""
    spec = get_spec(name)
    opts = options or load_source_options(name)
    rel = spec.release(opts.version)
    data_dir = Path(data_path)
    for folder in (data_dir / name, data_dir / "raw"):
        if not folder.is_dir():
            continue
        for fname in rel.local_names:
            if (folder / fname).is_file():
                return folder / fname
        if spec.kind == "kuairand":
            if all(any(folder.rglob(f"{log}.csv*")) for log in opts.logs):
                return folder
        candidates = [folder / f"{name}.inter.gz"] + sorted(folder.glob(f"{name}-*.inter.gz"))
        for cand in candidates:
            if cand.is_file():
                return cand
    return None


def missing_dataset_message(name: str, data_path: str | os.PathLike[str],
                            options: SourceOptions | None = None) -> str:
    spec = get_spec(name)
    opts = options or load_source_options(name)
    rel = spec.release(opts.version)
    data_dir = Path(data_path).resolve()
    target = data_dir / name / f"{name}.inter"
    looked = f"{data_dir / name} and {data_dir / 'raw'}"
    msg = f"{target} does not exist and no raw file for it was found in {looked}. "
    if rel.remote is not None:
        msg += (
            f"Download {rel.remote.url} ({rel.description}) and put it at {data_dir / name / rel.remote.filename}; "
            f"or run `python scripts/prepare_dataset.py {name} --download`, "
            f"or pass --raw PATH to a copy you already have."
        )
    else:
        msg += f"Pass --raw PATH to a RecBole .inter file for {name}."
    return msg


def ensure_dataset(name: str, data_path: str, raw: str | None = None, download: bool = False, *,
                   options: SourceOptions | Mapping | None = None, progress: bool = True) -> str:
    """Make sure ``<data_path>/<name>/<name>.inter`` exists and return ``data_path`` for RecBole.

    In order: nothing to do if the file is there; else build it from ``raw`` if
    given; else from raw files already in ``data_path/<name>/`` or
    ``data_path/raw/``; else (ml-100k) from RecBole's bundled copy; else download
    the official file if ``download`` is true; else raise SSD4RecError saying
    which file to fetch from which URL and where to put it. ``options`` defaults
    to the repository's ``datasets/<name>.yaml`` (a mapping is read like that YAML).
    """
    spec = get_spec(name)
    if isinstance(options, Mapping):
        opts = options_from_mapping(name, options)
    else:
        opts = options or load_source_options(name)
    data_dir = Path(data_path)
    target = data_dir / name / f"{name}.inter"
    if target.is_file():
        return str(data_dir)
    source = resolve_raw(name, data_dir, raw=raw, download=download, options=opts, progress=progress)
    build_dataset(spec.name, source, data_dir, opts)
    return str(data_dir)


def resolve_raw(name: str, data_path: str | os.PathLike[str], raw=None, download: bool = False, *,
                options: SourceOptions | None = None, progress: bool = True,
                timeout: float = DEFAULT_TIMEOUT_S):
    """Where to build ``name`` from: ``raw``, a local raw file, RecBole's copy, or a fresh download."""
    spec = get_spec(name)
    opts = options or load_source_options(name)
    if raw:
        return raw
    local = find_local_raw(name, data_path, opts)
    if local is not None:
        return local
    if spec.kind == "atomic" and name == "ml-100k":
        bundled = _recbole_ml100k()
        if bundled is not None:
            return bundled
    rel = spec.release(opts.version)
    if download and rel.remote is not None:
        dest = Path(data_path) / name / rel.remote.filename
        return fetch_remote(rel.remote, dest, progress=progress, timeout=timeout)
    raise SSD4RecError(missing_dataset_message(name, data_path, opts))
