"""PackedSequentialDataset: max_history_length truncates histories like the official code; its
rows, indexed as RecBole's loaders index them, are RecBole's."""

from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.data.dataset import Dataset

from ssd4rec import compat
from ssd4rec.config import collect_values, make_recbole_config, parse_overrides
from ssd4rec.data.dataset import HISTORY_END_FIELD, PackedSequentialDataset
from ssd4rec.data.sources import ensure_dataset
from ssd4rec.models import SSD4Rec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    ensure_dataset("ml-100k", str(path))
    return path


def splits(data_dir, *argv):
    compat.apply()
    overrides = parse_overrides(["--dataset=ml-100k", f"--data_path={data_dir}", "--var_len=True", *argv])
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", overrides)
    config = make_recbole_config(SSD4Rec, "ml-100k", values)
    return config, PackedSequentialDataset(config).build()


def test_max_history_length_keeps_the_last_items_of_every_history(data_dir):
    config, whole = splits(data_dir)
    _, cut = splits(data_dir, "--max_history_length=7")
    length = config["ITEM_LIST_LENGTH_FIELD"]
    for a, b in zip(whole, cut):
        assert torch.equal(a.inter_feat[HISTORY_END_FIELD], b.inter_feat[HISTORY_END_FIELD])
        assert torch.equal(a.inter_feat[length].clamp(max=7), b.inter_feat[length])
    assert int(whole[0].inter_feat[length].max()) > 7  # the cut did cut something


def test_rows_at_an_index_array_are_recboles(data_dir):
    """The tensor-indexed fast path (__getitem__) gives RecBole's own rows, field by field, for the
    int arrays its loaders pass (shuffled, repeated, the last row, int32 or int64)."""
    _, (train, valid, _) = splits(data_dir)
    rng = np.random.default_rng(0)
    for dataset in (train, valid):
        n = len(dataset)
        for index in (rng.permutation(n)[:300], np.array([n - 1, 0, 0, 5]), rng.integers(0, n, 50).astype(np.int32)):
            ours, theirs = dataset[index], Dataset.__getitem__(dataset, index)
            assert sorted(ours.interaction) == sorted(theirs.interaction) and len(ours) == len(index)
            for key in theirs.interaction:
                assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
