"""The real datasets: statistics after the 5-core filter must match the known numbers.

Reads the atomic copies in ../shared/datasets (relative to the repository root),
or in $SSD4REC_SHARED_DATASETS. They are licensed data and are never copied into
the repository; where they are absent the tests skip and say why.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from ssd4rec.data.filtering import clean_interactions
from ssd4rec.data.readers import read_inter
from ssd4rec.data.sources import default_options, read_raw
from ssd4rec.data.stats import dataset_stats

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SSD4REC_SHARED_DATASETS") or REPO.parent / "shared" / "datasets")

CASES = {
    "ml-1m": ("ml-1m/ml-1m.inter.gz", 6040, 3416, 999611),
    "amazon-beauty": ("amazon-beauty/amazon-beauty.inter.gz", 22363, 12101, 198502),
    "amazon-video-games": ("amazon-video-games/amazon-video-games-2018.inter.gz", 50597, 16874, 453637),
}


def shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"{path} not found: the real datasets live outside the repository "
                    f"(../shared/datasets, or set SSD4REC_SHARED_DATASETS)")
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_five_core_statistics(name):
    rel, users, items, inters = CASES[name]
    df, report = read_raw(name, shared_file(rel), default_options(name))
    clean = clean_interactions(df, "[5,inf)", "[5,inf)", report)
    stats = dataset_stats(clean)
    assert (stats["users"], stats["items"], stats["interactions"]) == (users, items, inters)
    assert stats["min_seq_len"] >= 5
    assert clean.groupby("item_id").size().min() >= 5


def test_cli_on_a_real_copy(tmp_path, capsys):
    path = shared_file(CASES["amazon-beauty"][0])
    spec = importlib.util.spec_from_file_location("prepare_dataset", REPO / "scripts" / "prepare_dataset.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["amazon-beauty", "--raw", str(path), "--out", str(tmp_path), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "198,502" in out and "22,363" in out and "12,101" in out
    written = read_inter(tmp_path / "amazon-beauty" / "amazon-beauty.inter")
    assert len(written) == 198502
