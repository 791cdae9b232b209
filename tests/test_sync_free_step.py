"""The sync-free training loop (``sync_free_step: True``) against RecBole's own (False).

Both train one epoch of a tiny SSD4Rec on a few ml-100k users from the same seed; they must
give the same summed loss and the same parameters. The CUDA side (no host synchronisation
inside a step) is tested in tests/test_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssd4rec import compat
from ssd4rec.config import collect_values, make_recbole_config, parse_overrides
from ssd4rec.data.packing import HOST_TOTAL_TOKENS, host_total_tokens
from ssd4rec.data.sources import ensure_dataset
from ssd4rec.errors import SSD4RecError
from ssd4rec.models import SSD4Rec
from ssd4rec.trainer import Trainer, prefetch

ROOT = Path(__file__).resolve().parents[1]
# 52 users with at most 21 interactions each: a few batches of 64 rows.
TINY = ["--dataset=ml-100k", "--hidden_size=16", "--d_state=8", "--headdim=8", "--chunk_size=16",
        "--num_layers=1", "--train_batch_size=64", "--user_inter_num_interval=\"[5,21]\"",
        "--show_progress=False", "--epochs=1", "--gpu_id="]  # the CPU, also where a GPU is visible

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    ensure_dataset("ml-100k", str(path))
    return path


def build(data_dir, tmp_path, sync_free, *argv):
    """(trainer, training loader) of an untrained tiny SSD4Rec, seeded as ssd4rec.run does."""
    compat.apply()
    from recbole.utils import init_seed

    from ssd4rec.data.sampled_eval import data_preparation
    from ssd4rec.run import build_dataset

    overrides = parse_overrides([*TINY, f"--data_path={data_dir}", f"--sync_free_step={sync_free}", *argv])
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", overrides)
    config = make_recbole_config(SSD4Rec, "ml-100k", values)
    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, build_dataset(config, SSD4Rec))
    init_seed(config["seed"], config["reproducibility"])
    model = SSD4Rec(config, train._dataset)
    trainer = Trainer(config, model, tmp_path / f"run-{sync_free}")
    assert trainer.sync_free_step is sync_free
    return trainer, train


def one_epoch(data_dir, tmp_path, sync_free, loss_func=None):
    trainer, train = build(data_dir, tmp_path, sync_free)
    loss = trainer._train_epoch(train, 0, loss_func=loss_func)
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return loss, params, trainer, train


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_one_epoch_equals_recboles_loop(data_dir, tmp_path):
    ours, ours_params, trainer, train = one_epoch(data_dir, tmp_path, True)
    theirs, theirs_params, recbole_trainer, _ = one_epoch(data_dir, tmp_path, False)
    assert len(train) >= 3  # several steps, so that the prefetch runs ahead
    assert isinstance(ours, float) and isinstance(theirs, float)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert_same_params(ours_params, theirs_params)
    assert trainer.steps_trained == recbole_trainer.steps_trained == len(train)
    assert trainer.rows_trained == recbole_trainer.rows_trained == len(train._dataset)
    assert len(trainer.epoch_seconds) == 1


def test_tuple_losses_are_summed_part_by_part(data_dir, tmp_path):
    def two_parts(model):
        def loss_func(interaction):
            loss = model.calculate_loss(interaction)
            return loss, 0.5 * loss

        return loss_func

    results = {}
    for sync_free in (True, False):
        trainer, train = build(data_dir, tmp_path, sync_free)
        loss = trainer._train_epoch(train, 0, loss_func=two_parts(trainer.model))
        results[sync_free] = loss, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    (ours, ours_params), (theirs, theirs_params) = results[True], results[False]
    assert isinstance(ours, tuple) and len(ours) == 2 and all(isinstance(v, float) for v in ours)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours[1] == pytest.approx(0.5 * ours[0], rel=1e-6)
    assert_same_params(ours_params, theirs_params)


def test_a_loss_of_shape_one_sums_to_a_float(data_dir, tmp_path):
    """RecBole reads a loss with .item(), so (1,) works as well as (); e.g. RecBole's Pop."""
    trainer, train = build(data_dir, tmp_path, True)
    loss = trainer._train_epoch(train, 0, loss_func=lambda i: trainer.model.calculate_loss(i).reshape(1))
    assert isinstance(loss, float) and loss > 0


@pytest.mark.parametrize("sync_free", [True, False])
def test_nan_loss_raises(data_dir, tmp_path, sync_free):
    trainer, train = build(data_dir, tmp_path, sync_free)
    calls = [0]

    def nan_on_second_batch(interaction):
        calls[0] += 1
        loss = trainer.model.calculate_loss(interaction)
        return loss * float("nan") if calls[0] == 2 else loss

    with pytest.raises(ValueError, match="Training loss is nan") as err:
        trainer._train_epoch(train, 3, loss_func=nan_on_second_batch)
    if sync_free:
        assert "epoch 3" in str(err.value)
        assert calls[0] == len(train)  # read once, at the end of the epoch


def test_prefetch_sums_lengths_on_the_host_and_pack_uses_them(data_dir, tmp_path, monkeypatch):
    trainer, train = build(data_dir, tmp_path, True)
    field = trainer.model.ITEM_SEQ_LEN
    batches = list(train)
    moved = list(prefetch(batches, torch.device("cpu"), field))
    assert len(moved) == len(batches)
    for original, batch in zip(batches, moved):
        assert torch.equal(original[field], batch[field])
        assert getattr(batch, HOST_TOTAL_TOKENS) == host_total_tokens(batch) == int(original[field].sum())
    assert host_total_tokens(batches[0]) is None  # what the loader gives carries none
    assert list(prefetch([], torch.device("cpu"), field)) == []

    import ssd4rec.models.ssd4rec as ssd4rec_module

    seen = []
    pack_batch = ssd4rec_module.pack_batch

    def recording_pack_batch(history_item, history_time, history_end, lengths, **kwargs):
        seen.append((kwargs.get("total_tokens"), int(lengths.sum())))
        return pack_batch(history_item, history_time, history_end, lengths, **kwargs)

    monkeypatch.setattr(ssd4rec_module, "pack_batch", recording_pack_batch)
    trainer._train_epoch(train, 0)
    assert len(seen) == len(batches)
    assert all(isinstance(given, int) and given == actual for given, actual in seen)
    # Without the attribute (evaluation batches, RecBole's loop) pack counts T itself.
    trainer.model.pack(batches[0])
    assert seen[-1][0] is None


def test_sync_free_step_must_be_a_boolean():
    with pytest.raises(SSD4RecError, match="sync_free_step"):
        collect_values(ROOT / "config.yaml", ROOT / "datasets", parse_overrides(["--sync_free_step=1"]))
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", {})
    assert values["sync_free_step"] is True
