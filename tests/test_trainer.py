"""Trainer pieces that a full run does not isolate: autocast routing and atomic saves."""

import types

import torch

from ssd4rec.trainer import AMP_DTYPES, Trainer, atomic_save, load_checkpoint


class RecordingModel:
    """calculate_loss records the autocast state it ran under."""

    def __init__(self):
        self.seen = None

    def calculate_loss(self, interaction):
        self.seen = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return torch.tensor(0.0)


def test_amp_bf16_runs_the_loss_under_bf16_autocast():
    fake = types.SimpleNamespace(device=torch.device("cpu"), amp_dtype=AMP_DTYPES["bf16"], model=RecordingModel())
    Trainer._autocast_loss(fake, interaction=None)
    assert fake.model.seen == (True, torch.bfloat16)
    assert AMP_DTYPES["none"] is None


def test_atomic_save_leaves_no_temporary_file_and_loads_weights_only(tmp_path):
    path = tmp_path / "run" / "best.pth"
    state = {"model": "SSD4Rec", "config": {"hidden_size": 8}, "state_dict": {"w": torch.ones(2)}, "epoch": 3}
    atomic_save(state, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pth"]
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
