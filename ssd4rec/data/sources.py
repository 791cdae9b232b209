"""The paper's datasets, built from their official raw files into RecBole atomic files.

One pipeline for every dataset (documented in the README, section Datasets):

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

Lifelong sources (``kuairand-27k``, ``lfm-1b``) stream their multi-gigabyte logs
into integer ids (ssd4rec.data.streaming) and may truncate each history
(``source.max_seq_len``, ``source.keep``) before the filter. ``synthetic-lifelong``
is generated (ssd4rec.data.synthetic) instead of read.

Every build leaves ``OUT/NAME/.NAME.source.json``, the source options it used; a
later ``ensure_dataset`` with other source options regenerates a generated dataset
and refuses to reuse a raw one (it says how to rebuild it).

``ensure_dataset`` is what the training entry point calls; ``scripts/prepare_dataset.py``
is the command-line front end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ssd4rec.data.download import DEFAULT_TIMEOUT_S, RemoteFile
from ssd4rec.data.download import download as fetch_remote
from ssd4rec.data.filtering import FIVE_CORE, KEEP_CHOICES, BuildReport, clean_interactions, parse_intervals
from ssd4rec.data.readers import (
    INTER_HEADER,
    KUAIRAND_27K_ARCHIVE,
    LFM1B_ITEM_FIELDS,
    _file_input,
    _Input,
    _kuairand_from_dir,
    _kuairand_from_tar,
    _read_atomic,
    _zip_member,
    read_amazon_ratings_csv,
    read_amazon_reviews_json,
    read_atomic_stream,
    read_kuairand_27k_log,
    read_kuairand_27k_tar,
    read_kuairand_log,
    read_lfm1b_events,
    read_movielens_ratings,
    zip_member_stream,
)
from ssd4rec.data.synthetic import SyntheticParams, generate
from ssd4rec.errors import SSD4RecError

# The repository's datasets/ folder: per-dataset YAML files, and the default output.
REPO_DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"

KUAIRAND_STANDARD_LOGS = ("log_standard_4_08_to_4_21_pure", "log_standard_4_22_to_5_08_pure")
KUAIRAND_ALL_LOGS = KUAIRAND_STANDARD_LOGS + ("log_random_4_22_to_5_08_pure",)
KUAIRAND_27K_LOGS = (
    "log_standard_4_08_to_4_21_27k_part1", "log_standard_4_08_to_4_21_27k_part2",
    "log_standard_4_22_to_5_08_27k_part1", "log_standard_4_22_to_5_08_27k_part2",
    "log_random_4_22_to_5_08_27k",
)
# Rec-Mamba's data_process_kuairec.py reads this one file only.
KUAIRAND_27K_DEFAULT_LOGS = ("log_standard_4_08_to_4_21_27k_part1",)


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
    kind: str  # "movielens" | "amazon" | "kuairand" | "kuairand27k" | "lfm1b" | "synthetic" | "atomic"
    releases: tuple[Release, ...]
    default_interval: str | None
    homepage: str
    licence: str
    reference: Mapping | None = None
    reference_label: str = "reference"
    logs: tuple[str, ...] = ()  # the release's log files (source.logs), KuaiRand only
    default_logs: tuple[str, ...] = ()

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
    name="kuairand-27k",
    title="KuaiRand-27K",
    kind="kuairand27k",
    releases=(
        Release("27k", "KuaiRand-27K (Gao et al., CIKM 2022), KuaiRand-27K.tar.gz (9.9 GB) from Zenodo record "
                "10439422", RemoteFile("https://zenodo.org/records/10439422/files/KuaiRand-27K.tar.gz",
                                       KUAIRAND_27K_ARCHIVE, md5="3e3c799a24e2d23a4d2c757fbf9adf59"),
                (KUAIRAND_27K_ARCHIVE,)),
    ),
    default_interval=None,  # Rec-Mamba filters neither users nor items
    homepage="https://kuairand.com/",
    licence="CC BY-SA 4.0 (KuaiRand repository); not shipped with ssd4rec all the same",
    logs=KUAIRAND_27K_LOGS,
    default_logs=KUAIRAND_27K_DEFAULT_LOGS,
))

_register(DatasetSpec(
    name="lfm-1b",
    title="LFM-1b (listening events)",
    kind="lfm1b",
    releases=(
        Release("lfm-1b", "LFM-1b (Schedl, ICMR 2016), LFM-1b.zip (about 8 GB) -> LFM-1b_LEs.txt",
                RemoteFile("https://drive.jku.at/ssf/s/readFile/share/1056/266403063659030189/publicLink/LFM-1b.zip",
                           "LFM-1b.zip"),
                ("LFM-1b.zip", "LFM-1b_LEs.txt", "LFM-1b_LEs.txt.gz")),
    ),
    default_interval=None,
    homepage="http://www.cp.jku.at/datasets/LFM-1b/",
    licence="LFM-1b (JKU Linz): Last.fm API derivative (Last.fm API Terms of Service 4.1), for non-commercial "
            "research; no licence to redistribute",
))

_register(DatasetSpec(
    name="synthetic-lifelong",
    title="Synthetic lifelong histories (ssd4rec.data.synthetic)",
    kind="synthetic",
    releases=(Release("v1", "generated by ssd4rec.data.synthetic.generate (no raw file)", None),),
    default_interval=None,
    homepage="ssd4rec/data/synthetic.py",
    licence="generated data, no licence restriction",
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
    max_seq_len: int | None = None  # lifelong sources: keep each user's first/last max_seq_len
    keep: str = "last"
    max_users: int | None = None  # lfm-1b: only the first max_users users of the file
    interaction_type: str = "tracks"  # lfm-1b: tracks, albums or artists
    synthetic: SyntheticParams | None = None

    def source_record(self) -> dict:
        """The options that decide the rows of the built file (saved next to it)."""
        record = asdict(self)
        for key in ("user_inter_num_interval", "item_inter_num_interval"):
            record.pop(key)  # RecBole re-applies the filter at load time anyway
        record["logs"] = list(self.logs)
        return record


# Keys a dataset's `source:` mapping may hold, by kind (all accept `version`).
SOURCE_KEYS = {
    "kuairand": ("click_only", "logs"),
    "kuairand27k": ("click_only", "logs", "max_seq_len", "keep"),
    "lfm1b": ("interaction_type", "max_users", "max_seq_len", "keep"),
    "synthetic": tuple(SyntheticParams.__dataclass_fields__),
}


def default_options(name: str) -> SourceOptions:
    spec = get_spec(name)
    extra = {}
    if spec.default_logs:
        extra["logs"] = spec.default_logs
    if spec.kind == "synthetic":
        extra["synthetic"] = SyntheticParams()
    return SourceOptions(spec.default_version, spec.default_interval, spec.default_interval, **extra)


def _source_mapping(config: Mapping, origin: str) -> dict:
    """``source:`` plus flat ``source.KEY`` entries (``--source.KEY=VALUE`` on the command line), which win."""
    source = config.get("source") or {}
    if not isinstance(source, Mapping):
        raise SSD4RecError(f"{origin}: 'source' must be a mapping, found {source!r}")
    merged = dict(source)
    for key, value in config.items():
        if isinstance(key, str) and key.startswith("source."):
            merged[key[len("source."):]] = value
    return merged


def _optional_positive_int(value, key: str, origin: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SSD4RecError(f"{origin}: source.{key} must be a positive integer or null, found {value!r}")
    return value


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
    source = _source_mapping(config, origin)
    allowed = {"version", *SOURCE_KEYS.get(spec.kind, ())}
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
    known_logs = spec.logs or KUAIRAND_ALL_LOGS
    bad = [x for x in logs if x not in known_logs]
    if bad:
        raise SSD4RecError(
            f"{origin}: source.logs has unknown log(s) {bad}; {spec.title} logs are {list(known_logs)}"
        )
    keep = source.get("keep", base.keep)
    if keep not in KEEP_CHOICES:
        raise SSD4RecError(f"{origin}: source.keep must be one of {', '.join(KEEP_CHOICES)}, found {keep!r}")
    interaction_type = source.get("interaction_type", base.interaction_type)
    if interaction_type not in LFM1B_ITEM_FIELDS:
        raise SSD4RecError(f"{origin}: source.interaction_type must be one of "
                           f"{', '.join(LFM1B_ITEM_FIELDS)}, found {interaction_type!r}")
    synthetic = None
    if spec.kind == "synthetic":
        params = {k: v for k, v in source.items() if k != "version"}
        synthetic = SyntheticParams.from_mapping(params, origin)
    return SourceOptions(
        version, intervals["user_inter_num_interval"], intervals["item_inter_num_interval"], click_only, logs,
        max_seq_len=_optional_positive_int(source.get("max_seq_len", base.max_seq_len), "max_seq_len", origin),
        keep=keep,
        max_users=_optional_positive_int(source.get("max_users", base.max_users), "max_users", origin),
        interaction_type=interaction_type,
        synthetic=synthetic,
    )


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


# --------------------------------------------------------------------------- raw dispatch


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
    if spec.kind == "synthetic":
        raise SSD4RecError(f"{name} is generated (ssd4rec.data.synthetic), it has no raw file; do not pass one")
    if spec.kind == "kuairand":
        df = _read_kuairand(paths, opts, report)
    elif spec.kind == "kuairand27k":
        df = _read_kuairand_27k(paths, opts, report)
    elif spec.kind == "lfm1b":
        df = _read_lfm1b(paths, opts, report)
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


def _read_kuairand_27k(paths: list[Path], opts: SourceOptions, report: BuildReport) -> pd.DataFrame:
    """KuaiRand-27K from its archive, its data folder, log CSVs or an atomic copy, streamed."""
    if len(paths) == 1 and _is_atomic(paths[0]):
        df, n = read_atomic_stream(_file_input(paths[0]))
        report.sources.append(str(paths[0]))
        report.raw_rows = n
        return df
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        logs = {log: sorted(folder.rglob(f"{log}.csv")) or sorted(folder.rglob(f"{log}.csv.gz"))
                for log in opts.logs}
        missing = [log for log, hits in logs.items() if not hits]
        if missing:
            archives = sorted(folder.rglob(KUAIRAND_27K_ARCHIVE))
            if archives and len(missing) == len(opts.logs):
                return _read_kuairand_27k([archives[0]], opts, report)
            found = sorted(p.name for p in folder.rglob("*.csv"))
            raise SSD4RecError(
                f"{folder}: missing KuaiRand-27K log(s) {', '.join(m + '.csv' for m in missing)} "
                f"(source.logs); CSV files found: {found or 'none'}"
            )
        paths = [hits[0] for hits in logs.values()]
    if len(paths) == 1 and paths[0].name.endswith((".tar.gz", ".tgz", ".tar")):
        parts = read_kuairand_27k_tar(paths[0], opts.logs, opts.click_only)
        parts = [parts[log] for log in opts.logs]  # the order of source.logs, not of the archive
    else:
        parts = []
        for p in paths:
            if p.is_dir() or not _strip_gz(p.name).endswith(".csv"):
                raise SSD4RecError(
                    f"{p}: KuaiRand-27K is built from its log CSVs, their folder, or {KUAIRAND_27K_ARCHIVE}"
                )
            inp = _file_input(p)
            df, n = read_kuairand_27k_log(inp, opts.click_only)
            parts.append((df, n, inp.label))
    for _, n, label in parts:
        report.sources.append(label)
        report.raw_rows += n
    if opts.click_only:
        report.notes.append("KuaiRand-27K: only rows with is_click == 1 kept (source.click_only: true)")
    return pd.concat([df for df, _, _ in parts], ignore_index=True)


def _read_lfm1b(paths: list[Path], opts: SourceOptions, report: BuildReport) -> pd.DataFrame:
    """LFM-1b from LFM-1b.zip, LFM-1b_LEs.txt(.gz), a folder holding one, or an atomic copy, streamed."""
    if len(paths) != 1:
        raise SSD4RecError(f"lfm-1b is built from one raw file, got {len(paths)}: {[str(p) for p in paths]}")
    path = paths[0]
    if path.is_dir():
        path = _find_in_dir(get_spec("lfm-1b"), path)
    base = _strip_gz(path.name).lower()
    if _is_atomic(path):
        # RecSysDatasets' lfm1b-{tracks,albums,artists}.inter name the item column e.g. tracks_id.
        item_fields = ("item_id", f"{opts.interaction_type}_id")
        df, n = read_atomic_stream(_file_input(path), item_fields, opts.max_users)
        label = str(path)
    elif base.endswith(".zip"):
        inp = zip_member_stream(path, "LFM-1b_LEs.txt", "LFM-1b listening events")
        df, n = read_lfm1b_events(inp, opts.interaction_type, opts.max_users)
        label = inp.label
    elif base.endswith(".txt"):
        inp = _file_input(path)
        df, n = read_lfm1b_events(inp, opts.interaction_type, opts.max_users)
        label = inp.label
    else:
        raise SSD4RecError(f"{path}: not a raw format lfm-1b can be built from; expected LFM-1b.zip, "
                           f"LFM-1b_LEs.txt(.gz) or a .inter(.gz) file")
    report.sources.append(label)
    report.raw_rows = n
    report.notes.append(f"LFM-1b: items are {opts.interaction_type} (source.interaction_type)")
    if opts.max_users is not None:
        report.notes.append(f"LFM-1b: only the first {opts.max_users:,} users of the file kept (source.max_users)")
    return df


# --------------------------------------------------------------------------- writing


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name next to ``path`` (same file system, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def write_inter(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as a RecBole atomic .inter file, atomically (temporary file + os.replace)."""
    path = Path(path)
    for col in ("user_id", "item_id"):
        if df[col].dtype.kind in "iu":  # integer tokens (lifelong sources) cannot hold a tab
            continue
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
    """Read ``raw`` (or generate), clean it and write ``OUT/NAME/NAME.inter`` (overwriting atomically)."""
    opts = options or load_source_options(name)
    if get_spec(name).kind == "synthetic":
        if raw:
            raise SSD4RecError(f"{name} is generated (ssd4rec.data.synthetic), it has no raw file; do not pass one")
        df = generate(opts.synthetic or SyntheticParams())
        report = BuildReport(sources=[f"generated: {opts.synthetic or SyntheticParams()}"], raw_rows=len(df),
                             after_source_filter=len(df))
    else:
        df, report = read_raw(name, raw, opts)
    df = clean_interactions(df, opts.user_inter_num_interval, opts.item_inter_num_interval, report,
                            max_seq_len=opts.max_seq_len, keep=opts.keep)
    path = write_inter(df, Path(out) / name / f"{name}.inter")
    write_source_record(path, opts)
    return BuildResult(path, df, report)


def source_record_path(inter_path: Path) -> Path:
    return inter_path.with_name(f".{inter_path.name.removesuffix('.inter')}.source.json")


def write_source_record(inter_path: Path, opts: SourceOptions) -> Path:
    """Save the source options next to the .inter file (temporary file + rename, like the file)."""
    path = source_record_path(inter_path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(json.dumps(opts.source_record(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def source_record_mismatch(inter_path: Path, opts: SourceOptions) -> str | None:
    """How the source options of an existing build differ from ``opts`` (None: same, or no record)."""
    path = source_record_path(inter_path)
    if not path.is_file():
        return None  # built before records existed, or put there by hand: trusted as it is
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its record {path} is unreadable"
    wanted = json.loads(json.dumps(opts.source_record()))  # same JSON types as the saved one
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if not keys:
        return None
    return "; ".join(f"{k}: built with {saved.get(k)!r}, asked for {wanted.get(k)!r}" for k in keys)


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
        if spec.kind in ("kuairand", "kuairand27k"):
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
        stale = source_record_mismatch(target, opts)
        if stale is None:
            return str(data_dir)
        if spec.kind != "synthetic":
            raise SSD4RecError(
                f"{target} was built with other source options ({stale}); rebuild it with "
                f"`python scripts/prepare_dataset.py {name} --force --out {data_dir}` (or delete it), "
                f"or ask for the options it was built with"
            )
        # a generated dataset is simply generated again with the new parameters
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
    if spec.kind == "synthetic":
        return None  # generated, nothing to find
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
