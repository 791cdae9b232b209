"""LifelongRec's data: one training row per user on RecBole's own split, and a run end to end."""

from pathlib import Path

import pytest
import torch

from ssd4rec import compat
from ssd4rec.config import collect_values, make_recbole_config, parse_overrides
from ssd4rec.data.dataset import HISTORY_END_FIELD, PackedSequentialDataset
from ssd4rec.data.lifelong import LifelongDataset, last_row_per_user
from ssd4rec.data.sources import ensure_dataset
from ssd4rec.models import LifelongRec
from ssd4rec.run import build_dataset, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden_size=16", "--d_state=8", "--headdim=8", "--chunk_size=16", "--num_layers=1",
        "--inner_size=16", "--show_progress=False", "--seed=2024"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    ensure_dataset("ml-100k", str(path))
    return path


def built(dataset_class, data_dir, *argv):
    compat.apply()
    overrides = parse_overrides(["--model=LifelongRec", "--dataset=ml-100k", f"--data_path={data_dir}", *TINY, *argv])
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", overrides)
    config = make_recbole_config(LifelongRec, "ml-100k", values)
    return config, dataset_class(config).build()


def test_last_row_per_user():
    users = torch.tensor([0, 2, 0, 1, 2, 0])
    ends = torch.tensor([3, 9, 5, 7, 12, 4])
    assert last_row_per_user(users, ends).tolist() == [2, 3, 4]


def test_training_split_keeps_each_users_longest_row_and_evaluation_is_unchanged(data_dir):
    config, (train, valid, test) = built(LifelongDataset, data_dir)
    _, (p_train, p_valid, p_test) = built(PackedSequentialDataset, data_dir)
    uid, length = config["USER_ID_FIELD"], config["ITEM_LIST_LENGTH_FIELD"]
    users = p_train.inter_feat[uid]
    assert len(train) == users.unique().numel()  # one row per user
    assert torch.equal(train.inter_feat[uid].sort().values, users.unique())
    # each is the user's latest training row, the whole history before it (var_len: True)
    latest = torch.zeros(int(users.max()) + 1, dtype=torch.long).scatter_reduce(
        0, users, p_train.inter_feat[HISTORY_END_FIELD], reduce="amax")
    assert torch.equal(train.inter_feat[HISTORY_END_FIELD], latest[train.inter_feat[uid]])
    # ... whose targets at every position are all the user's training targets
    assert int(train.inter_feat[length].sum()) == len(p_train)
    for a, b in ((valid, p_valid), (test, p_test)):
        assert torch.equal(a.inter_feat[HISTORY_END_FIELD], b.inter_feat[HISTORY_END_FIELD])
        assert torch.equal(a.inter_feat[length], b.inter_feat[length])
    assert build_dataset(config, LifelongRec).__class__ is LifelongDataset


def test_one_epoch_end_to_end_with_sampled_evaluation(data_dir, tmp_path):
    result = run(["--model=LifelongRec", "--dataset=ml-100k", f"--data_path={data_dir}",
                  f"--checkpoint_dir={tmp_path}", "--epochs=1", "--backbone=ssd", *TINY])
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["model"] == "LifelongRec" and checkpoint["config"]["backbone"] == "ssd"
    assert "history_item" not in checkpoint["state_dict"]
