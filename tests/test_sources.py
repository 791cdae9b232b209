"""Raw-format readers, 5-core filter, de-duplication/order, atomic writing, ensure_dataset.

Every fixture file is written here, into tmp_path: no real data is used or committed.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ssd4rec.data.filtering import clean_interactions, kcore_filter, parse_intervals
from ssd4rec.data.readers import INTER_HEADER, read_inter
from ssd4rec.data.sources import (
    SourceOptions,
    build_dataset,
    ensure_dataset,
    get_spec,
    load_source_options,
    options_from_mapping,
    read_raw,
    write_inter,
)
from ssd4rec.data.stats import dataset_stats, format_stats
from ssd4rec.errors import SSD4RecError

REPO = Path(__file__).resolve().parents[1]
T0 = 1_000_000_000


# --------------------------------------------------------------------------- fixture data


def core_rows():
    """6 users x 5 items (a 5-core) plus user 7, who falls out in the second filter round.

    User 7 rated four core items and item 999, which nobody else has: round 1
    drops item 999 (1 interaction), round 2 drops user 7 (now 4), round 3 drops nothing.
    """
    rows = []
    for u in range(1, 7):
        for k, i in enumerate(range(101, 106)):
            rows.append((str(u), str(i), T0 + 1000 * u + 10 * k))
    for k, i in enumerate([101, 102, 103, 104, 999]):
        rows.append(("7", str(i), T0 + 9000 + k))
    return rows


def raw_rows():
    """core_rows shuffled, with one exact duplicate and one repeat at a later time."""
    rows = core_rows()
    rows.append(("3", "102", T0 + 3000 + 500))  # re-consumption at another time: kept
    rng = random.Random(0)
    rng.shuffle(rows)
    rows.insert(5, rows[2])  # exact duplicate (user, item, timestamp): dropped
    return rows


def expected_table():
    kept = [r for r in core_rows() if r[0] != "7" and r[1] != "999"] + [("3", "102", T0 + 3000 + 500)]
    order = []
    for r in raw_rows():  # users in order of first appearance in the raw file
        if r[0] not in order and r[0] != "7":
            order.append(r[0])
    kept.sort(key=lambda r: (order.index(r[0]), r[2]))
    return pd.DataFrame({"user_id": [r[0] for r in kept], "item_id": [r[1] for r in kept],
                         "timestamp": [float(r[2]) for r in kept]})


def write_ratings_dat(path, rows):
    text = "".join(f"{u}::{i}::{(int(i) % 5) + 1}::{t}\n" for u, i, t in rows)
    path.write_bytes(text.encode("latin-1"))
    return path


def write_ml_zip(path, rows, member="ml-1m/ratings.dat"):
    buf = io.StringIO()
    for u, i, t in rows:
        buf.write(f"{u}::{i}::4::{t}\n")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-1m/movies.dat", "1::Caf\xe9 (1995)::Drama\n".encode("latin-1"))
        zf.writestr(member, buf.getvalue().encode("latin-1"))
    return path


def write_amazon_csv(path, rows):
    path.write_text("".join(f"A{u},B{i},5.0,{t}\n" for u, i, t in rows))
    return path


def write_amazon_2014(path, rows):
    """Python dict literals, as in many 2014 files (not valid JSON: single quotes)."""
    lines = [
        str({"reviewerID": f"A{u}", "asin": f"B{i}", "reviewerName": "O'Neil", "helpful": [0, 0],
             "reviewText": 'it\'s "fine"', "overall": 5.0, "summary": "ok",
             "unixReviewTime": t, "reviewTime": "01 1, 2001"})
        for u, i, t in rows
    ]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_amazon_2018(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for u, i, t in rows:
            fh.write(json.dumps({"overall": 5.0, "verified": True, "reviewerID": f"A{u}",
                                 "asin": f"B{i}", "unixReviewTime": t, "style": {"Format:": " DVD"}}) + "\n")
    return path


def write_amazon_2023(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for u, i, t in rows:
            fh.write(json.dumps({"rating": 5.0, "title": "t", "text": "x", "images": [],
                                 "asin": f"C{i}", "parent_asin": f"B{i}", "user_id": f"A{u}",
                                 "timestamp": t * 1000, "helpful_vote": 0, "verified_purchase": True}) + "\n")
    return path


KUAI_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,"
               "is_forward,is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,"
               "comment_stay_time,is_profile_enter,is_rand,tab")


def kuai_lines(rows, click=1):
    return [f"{u},{i},20220408,1200,{t * 1000},{click},0,0,0,0,0,1,5000,9000,0,0,0,0,1" for u, i, t in rows]


def write_kuairand_logs(folder, rows):
    """Two standard logs (rows split between them) plus non-click rows of a user 8."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    noise = [("8", str(i), T0 + 20000 + k) for k, i in enumerate(range(101, 106))]
    a = folder / "log_standard_4_08_to_4_21_pure.csv"
    b = folder / "log_standard_4_22_to_5_08_pure.csv"
    a.write_text("\n".join([KUAI_HEADER] + kuai_lines(rows[:half]) + kuai_lines(noise, click=0)) + "\n")
    b.write_text("\n".join([KUAI_HEADER] + kuai_lines(rows[half:])) + "\n")
    (folder / "log_random_4_22_to_5_08_pure.csv").write_text(KUAI_HEADER + "\n")
    return a, b


def write_atomic(path, rows, gz=False):
    text = INTER_HEADER + "\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def amazon_ids(df, prefix_user="A", prefix_item="B"):
    df = df.copy()
    df["user_id"] = prefix_user + df["user_id"]
    df["item_id"] = prefix_item + df["item_id"]
    return df


def assert_same(got: pd.DataFrame, want: pd.DataFrame):
    assert list(got.columns) == ["user_id", "item_id", "timestamp"]
    assert got["user_id"].tolist() == want["user_id"].tolist()
    assert got["item_id"].tolist() == want["item_id"].tolist()
    np.testing.assert_array_equal(got["timestamp"].to_numpy(dtype=float), want["timestamp"].to_numpy(dtype=float))


def five_core(name="ml-1m", **kw):
    base = dict(version=get_spec(name).default_version, user_inter_num_interval="[5,inf)",
                item_inter_num_interval="[5,inf)")
    base.update(kw)
    return SourceOptions(**base)


# --------------------------------------------------------------------------- readers


FORMATS = {
    "ratings.dat": ("ml-1m", lambda p: write_ratings_dat(p / "ratings.dat", raw_rows()), "", ""),
    "ml-1m.zip": ("ml-1m", lambda p: write_ml_zip(p / "ml-1m.zip", raw_rows()), "", ""),
    "ratings_Beauty.csv": ("amazon-beauty", lambda p: write_amazon_csv(p / "ratings_Beauty.csv", raw_rows()), "A", "B"),
    "reviews_Beauty_5.json.gz (2014, dict literals)":
        ("amazon-beauty", lambda p: write_amazon_2014(p / "reviews_Beauty_5.json.gz", raw_rows()), "A", "B"),
    "Video_Games_5.json.gz (2018)":
        ("amazon-video-games", lambda p: write_amazon_2018(p / "Video_Games_5.json.gz", raw_rows()), "A", "B"),
    "Video_Games.jsonl (2023, ms)":
        ("amazon-video-games", lambda p: write_amazon_2023(p / "Video_Games.jsonl", raw_rows()), "A", "B"),
    "kuairand logs": ("kuairand", lambda p: list(write_kuairand_logs(p / "logs", raw_rows())), "", ""),
    "kuairand folder": ("kuairand", lambda p: [write_kuairand_logs(p / "KuaiRand-Pure" / "data", raw_rows()),
                                               p / "KuaiRand-Pure"][1], "", ""),
    "atomic .inter": ("ml-1m", lambda p: write_atomic(p / "x.inter", raw_rows()), "", ""),
    "atomic .inter.gz": ("amazon-video-games", lambda p: write_atomic(p / "x.inter.gz", raw_rows(), gz=True), "", ""),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gives_the_same_clean_table(tmp_path, fmt):
    name, make, pu, pi = FORMATS[fmt]
    raw = make(tmp_path)
    df, report = read_raw(name, raw, five_core(name))
    clean = clean_interactions(df, "[5,inf)", "[5,inf)", report)
    want = expected_table()
    if pu:
        want = amazon_ids(want, pu, pi)
    assert_same(clean, want)
    assert report.duplicates_dropped == 1
    assert report.filtered_out == 5  # item 999's row, then user 7's four others
    assert report.filter_rounds == 3
    assert report.rows == 31


def test_kuairand_tar_gz_and_click_only(tmp_path):
    logs = tmp_path / "src" / "KuaiRand-Pure" / "data"
    write_kuairand_logs(logs, raw_rows())
    tar_path = tmp_path / "KuaiRand-Pure.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(tmp_path / "src" / "KuaiRand-Pure", arcname="KuaiRand-Pure")
    df, report = read_raw("kuairand", tar_path, five_core("kuairand"))
    assert report.raw_rows == len(raw_rows()) + 5
    assert "8" not in set(df["user_id"])  # non-clicks dropped
    assert_same(clean_interactions(df), expected_table())
    # the KuaiRand timestamps are milliseconds: seconds are kept exactly (sub-second part too)
    all_rows = five_core("kuairand", click_only=False)
    df2, _ = read_raw("kuairand", tar_path, all_rows)
    assert set(df2[df2["user_id"] == "8"]["item_id"]) == {"101", "102", "103", "104", "105"}
    assert len(clean_interactions(df2)) == 31 + 5


def test_kuairand_millisecond_timestamps_survive_the_round_trip(tmp_path):
    header = "user_id,video_id,time_ms,is_click\n"
    lines = [f"{u},{i},{(T0 + 10 * u + k) * 1000 + 123},1" for u in range(1, 6) for k, i in enumerate(range(1, 6))]
    f = tmp_path / "log_standard_4_08_to_4_21_pure.csv"
    f.write_text(header + "\n".join(lines) + "\n")
    res = build_dataset("kuairand", [f], tmp_path / "out", five_core("kuairand"))
    back = read_inter(res.path)
    assert back["timestamp"].iloc[0] == pytest.approx(T0 + 10 + 0.123, abs=1e-6)
    assert res.path.read_text().splitlines()[1].split("\t")[2] == f"{(T0 + 10) + 0.123!r}"


def test_amazon_2023_uses_parent_asin_and_milliseconds(tmp_path):
    f = write_amazon_2023(tmp_path / "x.jsonl", [("1", "7", T0)])
    df, _ = read_raw("amazon-video-games", f, five_core("amazon-video-games"))
    assert df.iloc[0].tolist() == ["A1", "B7", float(T0)]


# --------------------------------------------------------------------------- filtering


def recbole_like_reference(rows, k_user, k_item):
    """Slow reference: RecBole's rule, written out with Counters."""
    from collections import Counter

    rows = list(rows)
    while True:
        uc = Counter(r[0] for r in rows)
        ic = Counter(r[1] for r in rows)
        bad_u = {u for u, c in uc.items() if c < k_user}
        bad_i = {i for i, c in ic.items() if c < k_item}
        if not bad_u and not bad_i:
            return rows
        rows = [r for r in rows if r[0] not in bad_u and r[1] not in bad_i]


@pytest.mark.parametrize("seed", range(5))
def test_kcore_matches_recbole_rule_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.zipf(1.6, n) % 300
    items = rng.zipf(1.4, n) % 200
    rows = [(str(u), str(i), float(k)) for k, (u, i) in enumerate(zip(users, items))]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    got, _ = kcore_filter(df, "[5,inf)", "[3,inf)")
    want = recbole_like_reference(rows, 5, 3)
    assert sorted(map(tuple, got.itertuples(index=False))) == sorted(want)
    if len(got):
        assert got.groupby("user_id").size().min() >= 5
        assert got.groupby("item_id").size().min() >= 3


def test_intervals_with_upper_bounds_and_errors():
    assert parse_intervals("[5,inf)") == [(5.0, True, float("inf"), False)]
    assert parse_intervals("(0,3];[10,20]") == [(0.0, False, 3.0, True), (10.0, True, 20.0, True)]
    assert parse_intervals(None) is None
    df = pd.DataFrame({"user_id": ["a"] * 3 + ["b"] * 6, "item_id": list("xyzxyzxyz"),
                       "timestamp": np.arange(9.0)})
    got, _ = kcore_filter(df, "[1,5]", None)
    assert set(got["user_id"]) == {"a"}
    with pytest.raises(SSD4RecError, match="user_inter_num_interval"):
        kcore_filter(df, "5+", None)


def test_dedup_and_stable_time_order(tmp_path):
    rows = [("u2", "a", 5), ("u1", "b", 3), ("u1", "c", 1), ("u1", "d", 3), ("u1", "b", 3), ("u2", "a", 9)]
    df, report = read_raw("ml-1m", write_atomic(tmp_path / "t.inter", rows), five_core())
    out = clean_interactions(df, None, None, report)
    # users by first appearance (u2 first); ties at t=3 keep file order (b before d)
    assert list(out.itertuples(index=False, name=None)) == [
        ("u2", "a", 5.0), ("u2", "a", 9.0), ("u1", "c", 1.0), ("u1", "b", 3.0), ("u1", "d", 3.0)]
    assert report.duplicates_dropped == 1


def test_everything_filtered_out_is_an_error(tmp_path):
    f = write_atomic(tmp_path / "few.inter", [("1", "1", 1), ("2", "2", 2)])
    with pytest.raises(SSD4RecError, match="no interactions left"):
        build_dataset("ml-1m", f, tmp_path / "out", five_core())


# --------------------------------------------------------------------------- errors


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "ratings.dat"
    f.write_text("1::10::5::978300760\n1::11::3::978302109\n1::12::978301968\n")
    with pytest.raises(SSD4RecError, match=r"ratings\.dat, line 3: expected 4 fields") as exc:
        read_raw("ml-1m", f, five_core())
    assert str(f) in str(exc.value)

    f.write_text("1::10::5::978300760\n\n1::11::3::978302109::7\n")
    with pytest.raises(SSD4RecError, match="line 3: expected 4 fields"):
        read_raw("ml-1m", f, five_core())

    csv_file = tmp_path / "ratings_Beauty.csv"
    csv_file.write_text("A1,B1,5.0,1360000000\nA2,B2,5.0,yesterday\n")
    with pytest.raises(SSD4RecError, match=r"ratings_Beauty\.csv, line 2: field 4 should be a number"):
        read_raw("amazon-beauty", csv_file, five_core("amazon-beauty"))

    csv_file.write_text("A1,,5.0,1360000000\n")
    with pytest.raises(SSD4RecError, match="line 1: field 2 is empty"):
        read_raw("amazon-beauty", csv_file, five_core("amazon-beauty"))


def test_malformed_json_and_missing_keys(tmp_path):
    f = tmp_path / "reviews_Beauty_5.json.gz"
    with gzip.open(f, "wt") as fh:
        fh.write('{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n{"reviewerID": "A", "asin": \n')
    with pytest.raises(SSD4RecError, match=r"reviews_Beauty_5\.json\.gz, line 2: neither JSON nor a Python dict"):
        read_raw("amazon-beauty", f, five_core("amazon-beauty"))
    with gzip.open(f, "wt") as fh:
        fh.write('{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n\n{"reviewerID": "A", "overall": 5}\n')
    with pytest.raises(SSD4RecError, match="line 3: missing 'asin', 'unixReviewTime'"):
        read_raw("amazon-beauty", f, five_core("amazon-beauty"))
    with gzip.open(f, "wt") as fh:
        fh.write('{"foo": 1}\n')
    with pytest.raises(SSD4RecError, match="line 1: no 'reviewerID'"):
        read_raw("amazon-beauty", f, five_core("amazon-beauty"))
    with gzip.open(f, "wt") as fh:
        fh.write('{"reviewerID": "A", "asin": "B", "unixReviewTime": "soon"}\n')
    with pytest.raises(SSD4RecError, match="line 1: 'unixReviewTime' should be a number"):
        read_raw("amazon-beauty", f, five_core("amazon-beauty"))


def test_kuairand_missing_column_and_bad_value(tmp_path):
    f = tmp_path / "log_standard_4_08_to_4_21_pure.csv"
    f.write_text("user_id,video_id,time_ms\n1,2,1649390000000\n")
    with pytest.raises(SSD4RecError, match=r"line 1 \(header\): missing column\(s\) 'is_click'"):
        read_raw("kuairand", [f], five_core("kuairand"))
    f.write_text("user_id,video_id,time_ms,is_click\n1,2,1649390000000,1\n1,3,,1\n")
    with pytest.raises(SSD4RecError, match="line 3: column 'time_ms' should be a number"):
        read_raw("kuairand", [f], five_core("kuairand"))


def test_kuairand_missing_log_in_folder_and_tar(tmp_path):
    folder = tmp_path / "k"
    folder.mkdir()
    (folder / "log_standard_4_08_to_4_21_pure.csv").write_text(KUAI_HEADER + "\n")
    with pytest.raises(SSD4RecError, match="missing KuaiRand log.*log_standard_4_22_to_5_08_pure.csv"):
        read_raw("kuairand", folder, five_core("kuairand"))
    tar_path = tmp_path / "KuaiRand-Pure.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder, arcname="KuaiRand-Pure/data")
    with pytest.raises(SSD4RecError, match="no member log_standard_4_22_to_5_08_pure.csv"):
        read_raw("kuairand", tar_path, five_core("kuairand"))


def test_empty_files(tmp_path):
    for name, fname, opts in [("ml-1m", "ratings.dat", five_core()),
                              ("amazon-beauty", "ratings_Beauty.csv", five_core("amazon-beauty")),
                              ("amazon-beauty", "reviews_Beauty_5.json", five_core("amazon-beauty")),
                              ("ml-1m", "e.inter", five_core())]:
        f = tmp_path / fname
        f.write_text("")
        with pytest.raises(SSD4RecError, match=rf"{fname} is empty"):
            read_raw(name, f, opts)
    header_only = write_atomic(tmp_path / "h.inter", [])
    with pytest.raises(SSD4RecError, match=r"h\.inter is empty"):
        read_raw("ml-1m", header_only, five_core())
    gz = tmp_path / "ratings.dat.gz"
    with gzip.open(gz, "wb"):
        pass
    with pytest.raises(SSD4RecError, match="is empty"):
        read_raw("ml-1m", gz, five_core())


def test_zip_missing_member_and_bad_zip(tmp_path):
    z = write_ml_zip(tmp_path / "ml-1m.zip", core_rows(), member="ml-1m/ratings_renamed.dat")
    with pytest.raises(SSD4RecError, match=r"ml-1m\.zip: the archive has no member 'ratings\.dat'.*movies\.dat"):
        read_raw("ml-1m", z, five_core())
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SSD4RecError, match="not a readable zip"):
        read_raw("ml-1m", bad, five_core())


def test_truncated_gzip_is_reported(tmp_path):
    f = write_atomic(tmp_path / "t.inter.gz", core_rows() * 50, gz=True)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SSD4RecError, match="truncated or corrupt|t.inter.gz"):
        read_raw("ml-1m", f, five_core())


def test_atomic_header_without_timestamp(tmp_path):
    f = tmp_path / "x.inter"
    f.write_text("user_id:token\titem_id:token\trating:float\n1\t2\t3\n")
    with pytest.raises(SSD4RecError, match=r"x\.inter, line 1 \(header\).*missing timestamp"):
        read_raw("ml-1m", f, five_core())


def test_wrong_format_for_dataset(tmp_path):
    f = write_amazon_csv(tmp_path / "ratings_Beauty.csv", core_rows())
    with pytest.raises(SSD4RecError, match="not a raw format ml-1m can be built from"):
        read_raw("ml-1m", f, five_core())
    with pytest.raises(SSD4RecError, match="does not exist"):
        read_raw("ml-1m", tmp_path / "nope.zip", five_core())


def test_unknown_dataset_name(tmp_path):
    for call in (lambda: get_spec("ml-2m"), lambda: ensure_dataset("ml-2m", str(tmp_path)),
                 lambda: load_source_options("netflix")):
        with pytest.raises(SSD4RecError, match=r"unknown dataset .*known datasets: amazon-beauty, "
                                               r"amazon-video-games, kuairand, kuairand-27k, lfm-1b, ml-100k, "
                                               r"ml-1m, synthetic-lifelong"):
            call()


# --------------------------------------------------------------------------- writing


def test_atomic_output_format(tmp_path):
    res = build_dataset("ml-1m", write_ratings_dat(tmp_path / "ratings.dat", raw_rows()), tmp_path / "out", five_core())
    assert res.path == tmp_path / "out" / "ml-1m" / "ml-1m.inter"
    lines = res.path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert len(lines) == 1 + 31
    assert all(len(line.split("\t")) == 3 for line in lines)
    assert "." not in lines[1].split("\t")[2]  # whole seconds written as integers
    # no temporary file left; the source options of the build sit next to the file
    assert sorted(p.name for p in res.path.parent.iterdir()) == [".ml-1m.source.json", "ml-1m.inter"]
    assert_same(read_inter(res.path), expected_table())


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "d" / "d.inter"
    df = expected_table()
    write_inter(df, target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        write_inter(df.iloc[:3], target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["d.inter"]


def test_tokens_with_tabs_are_refused(tmp_path):
    df = pd.DataFrame({"user_id": ["a\tb"], "item_id": ["x"], "timestamp": [1.0]})
    with pytest.raises(SSD4RecError, match="tab or newline"):
        write_inter(df, tmp_path / "x.inter")


# --------------------------------------------------------------------------- ensure_dataset


def test_ensure_dataset_existing_file_is_left_alone(tmp_path):
    (tmp_path / "ml-1m").mkdir()
    target = write_atomic(tmp_path / "ml-1m" / "ml-1m.inter", [("1", "1", 1)])
    mtime = target.stat().st_mtime_ns
    assert ensure_dataset("ml-1m", str(tmp_path)) == str(tmp_path)
    assert target.stat().st_mtime_ns == mtime


def test_ensure_dataset_from_raw_argument(tmp_path):
    (tmp_path / "dl").mkdir()
    raw = write_ml_zip(tmp_path / "dl" / "ml-1m.zip", raw_rows())
    out = tmp_path / "data"
    assert ensure_dataset("ml-1m", str(out), raw=str(raw), options=five_core()) == str(out)
    assert_same(read_inter(out / "ml-1m" / "ml-1m.inter"), expected_table())


@pytest.mark.parametrize("where", ["amazon-beauty", "raw"])
def test_ensure_dataset_finds_raw_files_in_data_path(tmp_path, where):
    folder = tmp_path / where
    folder.mkdir()
    write_amazon_2014(folder / "reviews_Beauty_5.json.gz", raw_rows())
    ensure_dataset("amazon-beauty", str(tmp_path), options=five_core("amazon-beauty"))
    assert_same(read_inter(tmp_path / "amazon-beauty" / "amazon-beauty.inter"), amazon_ids(expected_table()))


def test_ensure_dataset_finds_an_atomic_copy(tmp_path):
    folder = tmp_path / "amazon-video-games"
    folder.mkdir()
    write_atomic(folder / "amazon-video-games-2018.inter.gz", raw_rows(), gz=True)
    ensure_dataset("amazon-video-games", str(tmp_path), options={"source": {"version": "2018"}})
    assert len(read_inter(folder / "amazon-video-games.inter")) == 31


def test_ensure_dataset_kuairand_folder(tmp_path):
    write_kuairand_logs(tmp_path / "kuairand" / "KuaiRand-Pure" / "data", raw_rows())
    ensure_dataset("kuairand", str(tmp_path), options={"source": {"click_only": True}})
    assert_same(read_inter(tmp_path / "kuairand" / "kuairand.inter"), expected_table())


def test_ensure_dataset_ml100k_from_recbole(tmp_path):
    ensure_dataset("ml-100k", str(tmp_path))
    df = read_inter(tmp_path / "ml-100k" / "ml-100k.inter")
    stats = dataset_stats(df)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    first = (tmp_path / "ml-100k" / "ml-100k.inter").read_text().splitlines()[0]
    assert first == INTER_HEADER


def test_ensure_dataset_missing_says_what_to_fetch(tmp_path):
    with pytest.raises(SSD4RecError) as exc:
        ensure_dataset("ml-1m", str(tmp_path))
    msg = str(exc.value)
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg
    assert str(tmp_path.resolve() / "ml-1m" / "ml-1m.zip") in msg
    with pytest.raises(SSD4RecError, match=r"zenodo\.org/records/10439422/files/KuaiRand-Pure\.tar\.gz"):
        ensure_dataset("kuairand", str(tmp_path))
    with pytest.raises(SSD4RecError, match=r"reviews_Video_Games_5\.json\.gz"):
        ensure_dataset("amazon-video-games", str(tmp_path), options={"source": {"version": "2014"}})
    assert not (tmp_path / "ml-1m" / "ml-1m.inter").exists()


# --------------------------------------------------------------------------- options and YAML


DATASET_YAML = {
    "ml-1m": (200, 0.2, True, 0.1, 2),
    "amazon-beauty": (50, 0.4, False, 0.2, 1),
    "amazon-video-games": (50, 0.4, False, 0.1, 1),
    "kuairand": (50, 0.2, True, 0.2, 2),
}


@pytest.mark.parametrize("name", list(DATASET_YAML))
def test_dataset_yaml_has_the_official_settings(name):
    path = REPO / "datasets" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#"), "a comment header names the source and version"
    cfg = yaml.safe_load(text)
    keys = ("MAX_ITEM_LIST_LENGTH", "dropout_prob", "norm_embedding", "maskratio", "num_layers")
    assert tuple(cfg[k] for k in keys) == DATASET_YAML[name]
    assert cfg["beta"] == 0.1
    assert isinstance(cfg["norm_embedding"], bool)
    opts = load_source_options(name, path)
    assert opts.user_inter_num_interval == opts.item_inter_num_interval == "[5,inf)"
    assert opts.version == get_spec(name).default_version
    if name == "kuairand":
        assert opts.click_only is True
        assert opts.logs == ("log_standard_4_08_to_4_21_pure", "log_standard_4_22_to_5_08_pure")


def test_source_option_errors(tmp_path):
    with pytest.raises(SSD4RecError, match=r"unknown key\(s\) source\.click_only for ml-1m"):
        options_from_mapping("ml-1m", {"source": {"click_only": True}})
    with pytest.raises(SSD4RecError, match="no source version '2099'; known: '2018', '2014'"):
        options_from_mapping("amazon-video-games", {"source": {"version": "2099"}})
    with pytest.raises(SSD4RecError, match="source.click_only must be true or false"):
        options_from_mapping("kuairand", {"source": {"click_only": "yes"}})
    with pytest.raises(SSD4RecError, match="source.logs has unknown log"):
        options_from_mapping("kuairand", {"source": {"logs": ["log_x"]}})
    with pytest.raises(SSD4RecError, match="user_inter_num_interval"):
        options_from_mapping("ml-1m", {"user_inter_num_interval": "five"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [1, 2\n")
    with pytest.raises(SSD4RecError, match=r"bad\.yaml: not valid YAML"):
        load_source_options("ml-1m", bad)
    opts = options_from_mapping("kuairand", {"source": {"logs": ["log_random_4_22_to_5_08_pure.csv"],
                                                        "click_only": False}, "item_inter_num_interval": None})
    assert opts.logs == ("log_random_4_22_to_5_08_pure",) and opts.item_inter_num_interval is None


# --------------------------------------------------------------------------- stats and CLI


def test_stats_and_table():
    df = expected_table()
    st = dataset_stats(df)
    assert st["users"] == 6 and st["items"] == 5 and st["interactions"] == 31
    assert st["max_seq_len"] == 6 and st["min_seq_len"] == 5
    assert st["avg_seq_len"] == pytest.approx(31 / 6)
    assert st["sparsity"] == pytest.approx(1 - 31 / 30)
    assert st["first_date"] == "2001-09-09" and st["last_date"] == "2001-09-09"
    ms = df.assign(timestamp=df["timestamp"] * 1000)
    assert dataset_stats(ms)["first_date"] == "2001-09-09"
    typed = df.rename(columns={"user_id": "user_id:token", "item_id": "item_id:token", "timestamp": "timestamp:float"})
    assert dataset_stats(typed) == st
    table = format_stats(st, title="t", reference={"users": 6}, reference_label="paper")
    assert "users" in table and "paper" in table and "31" in table
    assert format_stats(st, markdown=True).splitlines()[0] == "| statistic | value |"


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_dataset", REPO / "scripts" / "prepare_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_builds_and_prints_stats(tmp_path, capsys):
    cli = load_cli()
    raw = write_ml_zip(tmp_path / "ml-1m.zip", raw_rows())
    out = tmp_path / "out"
    assert cli.main(["ml-1m", "--raw", str(raw), "--out", str(out), "--stats"]) == 0
    text = capsys.readouterr().out
    assert "interactions written: 31" in text and "avg. sequence length" in text and "expected" in text
    assert cli.main(["ml-1m", "--out", str(out)]) == 0
    assert "already exists" in capsys.readouterr().out
    assert cli.main(["ml-1m", "--out", str(out), "--stats"]) == 0
    assert "31" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    cli = load_cli()
    assert cli.main(["ml-3m", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'ml-3m'" in capsys.readouterr().err
    assert cli.main(["kuairand", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "KuaiRand-Pure.tar.gz" in err and str(tmp_path.resolve() / "kuairand") in err
