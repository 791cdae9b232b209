"""KuaiRand-27K and LFM-1b converters, and the streamed block reader under them.

Every fixture file is written here, in the exact raw format of the official files
(KuaiRand-27K: CSV logs with their header; LFM-1b: LFM-1b_LEs.txt, tab-separated,
no header), into tmp_path. The block size is shrunk so that even these small files
are read in many blocks.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssd4rec.data import streaming
from ssd4rec.data.readers import INTER_HEADER, read_inter
from ssd4rec.data.sources import (
    build_dataset,
    ensure_dataset,
    load_source_options,
    options_from_mapping,
    read_raw,
)
from ssd4rec.data.streaming import line_blocks
from ssd4rec.errors import SSD4RecError

REPO = Path(__file__).resolve().parents[1]
T0_MS = 1_649_390_000_000  # 2022-04-08, in milliseconds as KuaiRand's time_ms

KUAI_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,"
               "is_forward,is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,"
               "comment_stay_time,is_profile_enter,is_rand,tab")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """About three lines per block: every test crosses block boundaries."""
    monkeypatch.setattr(streaming, "DEFAULT_BLOCK_BYTES", 200)


def kuai_line(user, video, time_ms, click):
    return f"{user},{video},20220408,1200,{time_ms},{click},0,0,0,0,0,1,5000,9000,0,0,0,0,1"


def kuai_rows():
    """(user, video, time_ms, is_click): users 17 and 3 with clicks and skips, out of time order.

    User 17: clicks on 101..106 at t = 6, 1, 5, 2, 4, 3 (+ ms fractions), one skip.
    User 3: 3 clicks (201, 202, 203) and 2 skips. User 8: 2 clicks only (dropped by [3,inf)).
    """
    rows = [(17, 101, T0_MS + 6000, 1), (17, 102, T0_MS + 1001, 1), (3, 201, T0_MS + 500, 1),
            (17, 103, T0_MS + 5000, 1), (17, 999, T0_MS + 1500, 0), (3, 202, T0_MS + 700, 0),
            (17, 104, T0_MS + 2250, 1), (8, 301, T0_MS, 1), (3, 203, T0_MS + 900, 1),
            (17, 105, T0_MS + 4000, 1), (3, 204, T0_MS + 990, 0), (8, 302, T0_MS + 1, 1),
            (17, 106, T0_MS + 3000, 1), (3, 205, T0_MS + 999, 1)]
    return rows


def expected_clicks(rows, min_len=3):
    """What the .inter must hold: clicks, users by first appearance, time order, ms -> s."""
    clicks = [r for r in rows if r[3] == 1]
    users = list(dict.fromkeys(r[0] for r in clicks))
    counts = {u: sum(r[0] == u for r in clicks) for u in users}
    keep = [u for u in users if counts[u] >= min_len]
    out = []
    for u in keep:
        out += sorted((r for r in clicks if r[0] == u), key=lambda r: r[2])
    return [(str(u), str(v), t / 1000.0) for u, v, t, _ in out]


def write_kuai_27k(folder: Path, parts: dict[str, list]) -> Path:
    data = folder / "KuaiRand-27K" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for log, rows in parts.items():
        (data / f"{log}.csv").write_text("\n".join([KUAI_HEADER] + [kuai_line(*r) for r in rows]) + "\n")
    (data / "user_features_27k.csv").write_text("user_id,user_active_degree\n17,high_active\n")
    return folder / "KuaiRand-27K"


def inter_rows(path):
    df = read_inter(path)
    return list(zip(df["user_id"], df["item_id"], df["timestamp"].to_numpy()))


def assert_rows(got, want):
    assert [(u, i) for u, i, _ in got] == [(u, i) for u, i, _ in want]
    np.testing.assert_allclose([t for *_, t in got], [t for *_, t in want], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the block reader


def test_line_blocks_cover_the_stream_with_exact_line_numbers():
    rng = random.Random(0)
    lines = [("x" * rng.randrange(0, 40)).encode() for _ in range(300)]
    data = b"\n".join(lines) + b"\ntail without newline"
    for size in (1, 7, 64, 10_000):
        blocks = list(line_blocks(io.BytesIO(data), size))
        assert b"".join(b for _, b in blocks) == data
        expected_line = 1
        for first_line, block in blocks:
            assert first_line == expected_line
            assert block.endswith(b"\n") or block is blocks[-1][1]
            expected_line += block.count(b"\n")


# --------------------------------------------------------------------------- KuaiRand-27K


def test_kuairand_27k_folder_tar_and_csvs_give_the_same_file(tmp_path):
    rows = kuai_rows()
    folder = write_kuai_27k(tmp_path / "src", {"log_standard_4_08_to_4_21_27k_part1": rows})
    want = expected_clicks(rows)
    opts = load_source_options("kuairand-27k")
    out = build_dataset("kuairand-27k", folder, tmp_path / "a", opts)
    assert_rows(inter_rows(out.path), want)
    lines = out.path.read_text().splitlines()
    assert lines[0] == INTER_HEADER
    assert lines[1] == f"17\t102\t{(T0_MS + 1001) / 1000!r}"  # milliseconds kept exactly
    assert out.report.raw_rows == len(rows) and out.report.rows == len(want)

    tar_path = tmp_path / "KuaiRand-27K.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder, arcname="KuaiRand-27K")
    res = build_dataset("kuairand-27k", tar_path, tmp_path / "b", opts)
    assert res.path.read_bytes() == out.path.read_bytes()
    csv = folder / "data" / "log_standard_4_08_to_4_21_27k_part1.csv"
    res = build_dataset("kuairand-27k", [csv], tmp_path / "c", opts)
    assert res.path.read_bytes() == out.path.read_bytes()
    # gzip-compressed CSVs are read as well
    gz = tmp_path / "log_standard_4_08_to_4_21_27k_part1.csv.gz"
    gz.write_bytes(gzip.compress(csv.read_bytes()))
    res = build_dataset("kuairand-27k", [gz], tmp_path / "d", opts)
    assert res.path.read_bytes() == out.path.read_bytes()


def test_kuairand_27k_logs_in_source_order_all_rows_and_truncation(tmp_path):
    rows = kuai_rows()
    later = [(3, 206, T0_MS + 99_000, 1), (17, 107, T0_MS + 99_000, 1)]
    folder = write_kuai_27k(tmp_path / "src", {"log_standard_4_08_to_4_21_27k_part1": rows,
                                               "log_standard_4_22_to_5_08_27k_part1": later})
    config = {"source": {"logs": ["log_standard_4_22_to_5_08_27k_part1", "log_standard_4_08_to_4_21_27k_part1"]},
              "user_inter_num_interval": "[3,inf)"}
    res = build_dataset("kuairand-27k", folder, tmp_path / "a", options_from_mapping("kuairand-27k", config))
    # users by first appearance over the logs in source.logs order: 3 (later log first), then 17
    assert [u for u, _, _ in inter_rows(res.path)][:1] == ["3"]
    assert_rows(inter_rows(res.path), [r for r in expected_clicks(later + rows) if r[0] == "3"]
                + [r for r in expected_clicks(later + rows) if r[0] == "17"])

    # click_only: false keeps every exposure (what Rec-Mamba's script did)
    every = options_from_mapping("kuairand-27k", {"source": {"click_only": False}})
    res = build_dataset("kuairand-27k", folder, tmp_path / "b", every)
    assert len(read_inter(res.path)) == len(rows)

    # Rec-Mamba's KuaiRand<L>: each user's first L-1 interactions
    first = options_from_mapping("kuairand-27k", {"source": {"max_seq_len": 2, "keep": "first"},
                                                   "user_inter_num_interval": None})
    res = build_dataset("kuairand-27k", folder, tmp_path / "c", first)
    assert [(u, i) for u, i, _ in inter_rows(res.path)] == [("17", "102"), ("17", "104"), ("3", "201"),
                                                             ("3", "203"), ("8", "301"), ("8", "302")]
    assert res.report.truncated == 5 and "each user's first 2 interactions kept" in "\n".join(res.report.lines())
    last = options_from_mapping("kuairand-27k", {"source": {"max_seq_len": 2}, "user_inter_num_interval": None})
    res = build_dataset("kuairand-27k", folder, tmp_path / "d", last)
    assert [(u, i) for u, i, _ in inter_rows(res.path)][:2] == [("17", "103"), ("17", "101")]


def test_kuairand_27k_errors_name_file_and_line(tmp_path):
    good = [kuai_line(17, 100 + k, T0_MS + k, 1) for k in range(30)]
    csv = tmp_path / "log_standard_4_08_to_4_21_27k_part1.csv"
    bad = good[:20] + ["17,abc,20220408,1200,1649390000000,1,0,0,0,0,0,1,5000,9000,0,0,0,0,1"] + good[20:]
    csv.write_text("\n".join([KUAI_HEADER] + bad) + "\n")
    opts = load_source_options("kuairand-27k")
    with pytest.raises(SSD4RecError, match=r"_part1\.csv, line 22: column 'video_id' should be an integer, "
                                           r"found 'abc'"):
        read_raw("kuairand-27k", [csv], opts)
    csv.write_text("\n".join([KUAI_HEADER] + good[:25] + ["17,1,20220408"] + good[25:]) + "\n")
    with pytest.raises(SSD4RecError, match="line 27: expected 19 fields separated by ',', found 3"):
        read_raw("kuairand-27k", [csv], opts)
    csv.write_text("user_id,video_id,time_ms\n1,2,3\n")
    with pytest.raises(SSD4RecError, match=r"line 1 \(header\): missing column\(s\) 'is_click'"):
        read_raw("kuairand-27k", [csv], opts)
    csv.write_text(KUAI_HEADER + "\n")
    with pytest.raises(SSD4RecError, match="is empty"):
        read_raw("kuairand-27k", [csv], opts)
    csv.write_bytes(gzip.compress(("\n".join([KUAI_HEADER] + good * 20) + "\n").encode())[:300])
    with pytest.raises(SSD4RecError, match="truncated or corrupt"):
        read_raw("kuairand-27k", [csv], opts)

    folder = write_kuai_27k(tmp_path / "src", {"log_standard_4_08_to_4_21_27k_part2": kuai_rows()})
    with pytest.raises(SSD4RecError, match=r"missing KuaiRand-27K log\(s\) log_standard_4_08_to_4_21_27k_part1\.csv"):
        read_raw("kuairand-27k", folder, opts)
    tar_path = tmp_path / "KuaiRand-27K.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder, arcname="KuaiRand-27K")
    with pytest.raises(SSD4RecError, match=r"no member log_standard_4_08_to_4_21_27k_part1\.csv.*_part2\.csv"):
        read_raw("kuairand-27k", tar_path, opts)


def test_ensure_dataset_kuairand_27k_finds_the_archive_and_says_what_to_fetch(tmp_path):
    with pytest.raises(SSD4RecError, match=r"zenodo\.org/records/10439422/files/KuaiRand-27K\.tar\.gz"):
        ensure_dataset("kuairand-27k", str(tmp_path))
    folder = write_kuai_27k(tmp_path / "src", {"log_standard_4_08_to_4_21_27k_part1": kuai_rows()})
    (tmp_path / "kuairand-27k").mkdir()
    with tarfile.open(tmp_path / "kuairand-27k" / "KuaiRand-27K.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="KuaiRand-27K")
    ensure_dataset("kuairand-27k", str(tmp_path))
    assert_rows(inter_rows(tmp_path / "kuairand-27k" / "kuairand-27k.inter"), expected_clicks(kuai_rows()))


def test_a_build_with_other_source_options_is_not_reused(tmp_path):
    folder = write_kuai_27k(tmp_path / "kuairand-27k", {"log_standard_4_08_to_4_21_27k_part1": kuai_rows()})
    ensure_dataset("kuairand-27k", str(tmp_path), raw=str(folder))
    target = tmp_path / "kuairand-27k" / "kuairand-27k.inter"
    with pytest.raises(SSD4RecError, match=r"built with other source options \(click_only: built with True, "
                                           r"asked for False\).*prepare_dataset\.py kuairand-27k --force"):
        ensure_dataset("kuairand-27k", str(tmp_path), options={"source.click_only": False})
    # another filter is fine: RecBole applies user_inter_num_interval again when it loads the file
    ensure_dataset("kuairand-27k", str(tmp_path), options={"user_inter_num_interval": "[5,inf)"})
    # a file without a record (built before records existed, or copied by hand) is trusted
    Path(tmp_path / "kuairand-27k" / ".kuairand-27k.source.json").unlink()
    ensure_dataset("kuairand-27k", str(tmp_path), options={"source.click_only": False})
    assert len(read_inter(target)) == len(expected_clicks(kuai_rows()))


# --------------------------------------------------------------------------- LFM-1b


def lfm_events():
    """(user, artist, album, track, unix time), grouped by user as in LFM-1b_LEs.txt, times unsorted."""
    t = 1_385_212_958
    rows = []
    for user, n in ((31435741, 6), (2, 4), (1077, 5), (44, 2)):
        for k in range(n):
            rows.append((user, 10 + k % 3, 100 + k % 4, 1000 + (user + k) % 7, t + 60 * ((k * 5) % n)))
    rows.append((2, 11, 101, 1002, t + 7))  # the same track again later: re-listening, kept
    rows.append(rows[0])  # an exact duplicate (user, track, time): dropped
    return rows


def lfm_text(rows):
    return "".join("\t".join(map(str, r)) + "\n" for r in rows)


def expected_lfm(rows, column=3, users=None, min_len=3):
    seen = list(dict.fromkeys((r[0], r[column], r[4]) for r in rows))  # exact duplicates dropped
    order = list(dict.fromkeys(r[0] for r in rows))[:users]
    out = []
    for u in order:
        mine = sorted((r for r in seen if r[0] == u), key=lambda r: r[2])
        if len(mine) >= min_len:
            out += [(str(a), str(b), float(c)) for a, b, c in mine]
    return out


def test_lfm1b_zip_text_and_atomic_give_the_same_file(tmp_path):
    rows = lfm_events()
    zpath = tmp_path / "LFM-1b.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("LFM-1b_LEs.txt", lfm_text(rows))
        zf.writestr("LFM-1b_users.txt", "user_id\tcountry\n2\tAT\n")
    opts = options_from_mapping("lfm-1b", {"source": {"max_users": None}, "user_inter_num_interval": "[3,inf)"})
    res = build_dataset("lfm-1b", zpath, tmp_path / "a", opts)
    assert_rows(inter_rows(res.path), expected_lfm(rows))
    assert res.report.duplicates_dropped == 1 and res.report.raw_rows == len(rows)
    user, track, _ = expected_lfm(rows)[0]
    assert res.path.read_text().splitlines()[1] == f"{user}\t{track}\t1385212958"  # whole seconds, no ".0"

    text = tmp_path / "LFM-1b_LEs.txt"
    text.write_text(lfm_text(rows))
    assert build_dataset("lfm-1b", text, tmp_path / "b", opts).path.read_bytes() == res.path.read_bytes()
    # RecSysDatasets' lfm1b-tracks.inter (what Rec-Mamba started from): tracks_id is the item
    atomic = tmp_path / "lfm1b-tracks.inter"
    atomic.write_text("user_id:token\ttracks_id:token\ttimestamp:float\n"
                      + "".join(f"{u}\t{tr}\t{t}\n" for u, _, _, tr, t in rows))
    assert build_dataset("lfm-1b", atomic, tmp_path / "c", opts).path.read_bytes() == res.path.read_bytes()


def test_lfm1b_first_users_items_and_last_events(tmp_path):
    rows = lfm_events()
    text = tmp_path / "LFM-1b_LEs.txt"
    text.write_text(lfm_text(rows))
    opts = load_source_options("lfm-1b")  # the YAML: tracks, 25,001 users, [3,inf)
    assert (opts.max_users, opts.interaction_type, opts.user_inter_num_interval) == (25001, "tracks", "[3,inf)")
    two = options_from_mapping("lfm-1b", {"source": {"max_users": 2}, "user_inter_num_interval": None})
    res = build_dataset("lfm-1b", text, tmp_path / "a", two)
    assert sorted(set(read_inter(res.path)["user_id"])) == ["2", "31435741"]
    albums = options_from_mapping("lfm-1b", {"source": {"interaction_type": "albums", "max_users": None},
                                             "user_inter_num_interval": "[3,inf)"})
    res = build_dataset("lfm-1b", text, tmp_path / "b", albums)
    assert_rows(inter_rows(res.path), expected_lfm(rows, column=2))
    # Rec-Mamba's tracks<L>: each user's last L events
    last = options_from_mapping("lfm-1b", {"source": {"max_seq_len": 3, "max_users": None},
                                           "user_inter_num_interval": None})
    got = inter_rows(build_dataset("lfm-1b", text, tmp_path / "c", last).path)
    want = expected_lfm(rows, min_len=0)
    want = [r for u in dict.fromkeys(r[0] for r in want) for r in [x for x in want if x[0] == u][-3:]]
    assert_rows(got, want)


def test_lfm1b_errors(tmp_path):
    text = tmp_path / "LFM-1b_LEs.txt"
    lines = lfm_text(lfm_events()).splitlines()
    text.write_text("\n".join(lines[:12] + ["2\t11\t101\t1002"] + lines[12:]) + "\n")
    opts = load_source_options("lfm-1b")
    with pytest.raises(SSD4RecError, match=r"LFM-1b_LEs\.txt, line 13: expected 5 fields separated by '\\t', found 4"):
        read_raw("lfm-1b", text, opts)
    text.write_text("\n".join(lines[:15] + ["2\t11\t101\t1002\tyesterday"]) + "\n")
    with pytest.raises(SSD4RecError, match="line 16: field 5 should be an integer, found 'yesterday'"):
        read_raw("lfm-1b", text, opts)
    zpath = tmp_path / "LFM-1b.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("LFM-1b_tracks.txt", "1\tx\n")
    with pytest.raises(SSD4RecError, match=r"LFM-1b\.zip: the archive has no member 'LFM-1b_LEs\.txt'.*LFM-1b_tracks"):
        read_raw("lfm-1b", zpath, opts)
    atomic = tmp_path / "x.inter"
    atomic.write_text("user_id:token\tartists_id:token\ttimestamp:float\n1\t2\t3\n")
    with pytest.raises(SSD4RecError, match=r"needs user_id, item_id or tracks_id and timestamp"):
        read_raw("lfm-1b", atomic, opts)
    with pytest.raises(SSD4RecError, match="lfm-1b.*LFM-1b.zip"):
        ensure_dataset("lfm-1b", str(tmp_path / "nothing"))


def test_ensure_dataset_lfm1b_finds_the_zip(tmp_path):
    (tmp_path / "lfm-1b").mkdir()
    with zipfile.ZipFile(tmp_path / "lfm-1b" / "LFM-1b.zip", "w") as zf:
        zf.writestr("LFM-1b_LEs.txt", lfm_text(lfm_events()))
    ensure_dataset("lfm-1b", str(tmp_path))
    assert_rows(inter_rows(tmp_path / "lfm-1b" / "lfm-1b.inter"), expected_lfm(lfm_events()))


# --------------------------------------------------------------------------- options, YAML, CLI


def test_source_option_errors_for_lifelong_sources():
    with pytest.raises(SSD4RecError, match="source.keep must be one of first, last"):
        options_from_mapping("kuairand-27k", {"source": {"keep": "middle"}})
    with pytest.raises(SSD4RecError, match="source.max_seq_len must be a positive integer or null"):
        options_from_mapping("lfm-1b", {"source.max_seq_len": 0})
    with pytest.raises(SSD4RecError, match=r"source.logs has unknown log\(s\) \['log_standard_4_08_to_4_21_pure'\]"):
        options_from_mapping("kuairand-27k", {"source": {"logs": ["log_standard_4_08_to_4_21_pure"]}})
    with pytest.raises(SSD4RecError, match="source.interaction_type must be one of artists, albums, tracks"):
        options_from_mapping("lfm-1b", {"source": {"interaction_type": "songs"}})
    with pytest.raises(SSD4RecError, match=r"unknown key\(s\) source.click_only for lfm-1b"):
        options_from_mapping("lfm-1b", {"source": {"click_only": True}})
    with pytest.raises(SSD4RecError, match=r"unknown key\(s\) source.max_seq_len for kuairand"):
        options_from_mapping("kuairand", {"source.max_seq_len": 5})


@pytest.mark.parametrize("name", ["kuairand-27k", "lfm-1b", "synthetic-lifelong"])
def test_lifelong_dataset_yaml(name):
    path = REPO / "datasets" / f"{name}.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert cfg["protocol"] == "recmamba" and cfg["item_inter_num_interval"] is None
    assert cfg["MAX_ITEM_LIST_LENGTH"] == 2000 and cfg["var_len"] is False
    opts = load_source_options(name, path)
    if name == "kuairand-27k":
        assert "zenodo.org/records/10439422/files/KuaiRand-27K.tar.gz" in text and "CC BY-SA 4.0" in text
        assert opts.logs == ("log_standard_4_08_to_4_21_27k_part1",) and opts.click_only is True
    if name == "lfm-1b":
        assert "LFM-1b_LEs.txt" in text and "cp.jku.at/datasets/LFM-1b" in text
        assert opts.max_users == 25001


def test_prepare_dataset_cli_builds_kuairand_27k(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_dataset", REPO / "scripts" / "prepare_dataset.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    folder = write_kuai_27k(tmp_path / "src", {"log_standard_4_08_to_4_21_27k_part1": kuai_rows()})
    assert cli.main(["kuairand-27k", "--raw", str(folder), "--out", str(tmp_path / "out"), "--stats"]) == 0
    out = capsys.readouterr().out
    assert f"interactions written: {len(expected_clicks(kuai_rows()))}" in out and "max. sequence length" in out
