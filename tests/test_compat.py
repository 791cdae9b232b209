"""The RecBole 1.2.1 patches of ssd4rec.compat, each checked on its own."""

import numpy as np
import torch
import pandas as pd
import pytest

import ssd4rec  # noqa: F401  (applies the patches)
from ssd4rec import compat


def test_config_compatibility_settings_is_replaced_and_builds_aliases():
    from recbole.config import Config

    assert Config.compatibility_settings is compat._compatibility_settings
    compat._compatibility_settings(None)
    # RecBole's metrics code uses these legacy names.
    assert np.float is np.float64
    assert np.dtype(np.int) == np.dtype(np.int64)
    assert np.zeros(2, dtype=np.float).dtype == np.float64


def test_fill_nan_fills_under_copy_on_write():
    from recbole.data.dataset import Dataset
    from recbole.utils import FeatureType

    class Holder:
        pass

    holder = Holder()
    holder.inter_feat = pd.DataFrame({"user_id": [1.0, np.nan, 3.0], "rating": [1.0, np.nan, 5.0]})
    holder.feat_name_list = ["inter_feat"]
    holder.field2type = {"user_id": FeatureType.TOKEN, "rating": FeatureType.FLOAT}
    with pd.option_context("mode.copy_on_write", True) if pd.__version__ < "3" else _nothing():
        Dataset._fill_nan(holder)
    assert holder.inter_feat["user_id"].tolist() == [1.0, 0.0, 3.0]
    assert holder.inter_feat["rating"].tolist() == [1.0, 3.0, 5.0]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_recbole_config_builds_on_this_numpy():
    from ssd4rec.config import make_recbole_config

    config = make_recbole_config("SASRec", "ml-100k", {"train_neg_sample_args": None, "loss_type": "CE"})
    assert config["model"] == "SASRec"


def test_an_empty_gpu_id_is_the_cpu():
    """`--gpu_id=` parses to None; RecBole must get '' (its CPU), not the string 'None'."""
    from ssd4rec.config import make_recbole_config, parse_overrides

    config = make_recbole_config("SASRec", "ml-100k", {"train_neg_sample_args": None, "loss_type": "CE",
                                                       **parse_overrides(["--gpu_id="])})
    assert config["gpu_id"] == "" and config["device"].type == "cpu"


def test_apply_is_idempotent():
    compat.apply()
    compat.apply()
    from recbole.data.dataset import Dataset

    assert Dataset._fill_nan is compat._fill_nan


@pytest.mark.parametrize("version", ["numpy", "pandas", "torch"])
def test_versions_are_the_modern_ones_we_claim(version):
    """The suite is meant to run on numpy 2, pandas >= 2 and torch >= 2.6."""
    import torch

    major = {"numpy": np.__version__, "pandas": pd.__version__, "torch": torch.__version__}[version].split(".")
    floor = {"numpy": (2, 0), "pandas": (2, 0), "torch": (2, 6)}[version]
    assert (int(major[0]), int(major[1])) >= floor


def test_recbole_sequential_models_leave_anomaly_mode_off():
    """RecBole's sine.py turns autograd anomaly mode on at import; ssd4rec.compat turns it off
    (a fresh interpreter: the mode is process-wide)."""
    import subprocess
    import sys

    code = ("import torch, ssd4rec; from recbole.utils import get_model; get_model('SASRec'); "
            "print(torch.is_anomaly_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
    code = "import torch; import recbole.model.sequential_recommender; print(torch.is_anomaly_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"  # RecBole alone: what we undo


def _recbole_reconstruct_test_data(mask_token, item_seq, item_seq_len):
    """RecBole 1.2.1's BERT4Rec.reconstruct_test_data, its loop verbatim in effect."""
    padding = torch.zeros(item_seq.size(0), dtype=torch.long)
    item_seq = torch.cat((item_seq, padding.unsqueeze(-1)), dim=-1)
    for batch_id, last_position in enumerate(item_seq_len):
        item_seq[batch_id][last_position] = mask_token
    return item_seq[:, 1:]


def test_bert4rec_test_sequences_match_recboles_loop():
    from recbole.model.sequential_recommender.bert4rec import BERT4Rec

    assert BERT4Rec.reconstruct_test_data is compat._reconstruct_test_data
    generator = torch.Generator().manual_seed(0)
    batch, max_len, n_items = 64, 12, 30
    lengths = torch.randint(1, max_len + 1, (batch,), generator=generator)
    lengths[:3] = torch.tensor([1, max_len, max_len - 1])  # shortest, full, one short of full
    items = torch.randint(1, n_items, (batch, max_len), generator=generator)
    items[torch.arange(max_len) >= lengths[:, None]] = 0  # left-aligned, 0-padded
    holder = type("Holder", (), {"mask_token": n_items})()

    ours = compat._reconstruct_test_data(holder, items.clone(), lengths)
    theirs = _recbole_reconstruct_test_data(n_items, items.clone(), lengths)
    assert torch.equal(ours, theirs)
    # A full history keeps its last L-1 items, then the mask token.
    assert torch.equal(ours[1], torch.cat((items[1, 1:], torch.tensor([n_items]))))
