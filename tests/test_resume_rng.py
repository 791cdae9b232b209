"""A resumed run continues exactly as if it had never stopped: last.pth carries the RNG states.

Each model trains N epochs uninterrupted, then again killed before epoch K and resumed from
its last.pth through ``ssd4rec.run`` (a fresh Trainer, fresh dataloaders, every RNG seeded
again by ``init_seed``, as in a new process). The per-epoch losses, the RNG states at the
start of every epoch and the final weights must be identical: on CPU the same draws give
bit-identical arithmetic. On a GPU the RNG states must still match exactly, but SSD4Rec's
kernels (mamba_ssm's Triton backward accumulates with atomics) differ in the last bits from run
to run even without a resume (seen on the H100: epoch 1 of two fresh runs, 37.884852 against
37.884851), so there losses and weights are compared to a tolerance. Without the RNG states, a resumed run replayed the shuffles and
dropout masks of epochs 0, 1, ... (the losses of the epochs after a resume then differ).

Data: ml-100k (shipped with RecBole) cut to its 52 users with 5..21 interactions, 9 steps
an epoch; models at hidden 16, dropout 0.2 (config.yaml's) and more for the baseline.
"""

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd4rec import run as run_module
from ssd4rec.data.bert4rec_masking import masking_generator_state
from ssd4rec.trainer import Trainer

EPOCHS, KILLED_AT = 4, 2
TINY = ['--user_inter_num_interval="[5,21]"', "--hidden_size=16", "--d_state=8", "--headdim=8",
        "--chunk_size=16", "--num_layers=1", "--MAX_ITEM_LIST_LENGTH=10", "--inner_size=32", "--n_layers=1",
        "--n_heads=1", "--train_batch_size=64", "--stopping_step=100", "--show_progress=False", "--seed=7"]
MODELS = {
    "SSD4Rec": [],
    # RecBole's own models through the same trainer: dropout in every layer, and for BERT4Rec
    # the masking transform's own generator (ssd4rec.data.bert4rec_masking).
    "SASRec": ["--hidden_dropout_prob=0.3", "--attn_dropout_prob=0.3"],
    "BERT4Rec": ["--hidden_dropout_prob=0.3", "--attn_dropout_prob=0.3"],
}


class _Killed(RuntimeError):
    pass


def _rng_snapshot(train_data):
    """Every stream a training epoch draws from, as comparable values."""
    return {
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state().tolist(),
        "loader": train_data.generator.get_state().tolist(),
        "masking": None if (m := masking_generator_state(train_data.transform)) is None else m.tolist(),
        "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
    }


class Recorder:
    """ssd4rec.run's Trainer, recording each epoch's starting RNG states, optionally killed
    at the start of an epoch (before it draws anything)."""

    def __init__(self, monkeypatch, kill_at=None):
        self.trainers = []
        recorder = self

        class RecordingTrainer(Trainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.epoch_rng = {}
                recorder.trainers.append(self)

            def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
                if epoch_idx == kill_at:
                    raise _Killed(epoch_idx)
                self.epoch_rng[epoch_idx] = _rng_snapshot(train_data)
                return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)

        monkeypatch.setattr(run_module, "Trainer", RecordingTrainer)

    @property
    def trainer(self):
        (trainer,) = self.trainers
        return trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rng_data")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """RecBole writes log/ and log_tensorboard/ into the working directory; one thread on a
    busy 2-core machine (tiny ops)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _args(model, data_dir, *extra):
    return ["--dataset=ml-100k", f"--model={model}", f"--data_path={data_dir}", *TINY, *MODELS[model], *extra]


def _uninterrupted(model, data_dir, tmp, monkeypatch):
    recorder = Recorder(monkeypatch)
    run_module.run(_args(model, data_dir, f"--epochs={EPOCHS}", f"--run_dir={tmp / 'full'}",
                         f"--checkpoint_dir={tmp / 'saved'}"))
    return recorder.trainer, tmp / "full" / "last.pth"


def _killed(model, data_dir, tmp, monkeypatch):
    """A run of EPOCHS epochs that died before epoch KILLED_AT: its last.pth, unfinished."""
    recorder = Recorder(monkeypatch, kill_at=KILLED_AT)
    with pytest.raises(_Killed):
        run_module.run(_args(model, data_dir, f"--epochs={EPOCHS}", f"--run_dir={tmp / 'killed'}",
                             f"--checkpoint_dir={tmp / 'saved'}"))
    last = tmp / "killed" / "last.pth"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == KILLED_AT - 1 and state["finished"] is False
    return recorder.trainer, last


def _resume(model, data_dir, last, monkeypatch):
    recorder = Recorder(monkeypatch)
    run_module.run(_args(model, data_dir, f"--checkpoint={last}", f"--epochs={EPOCHS}"))
    return recorder.trainer


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(model, data_dir, in_tmp, monkeypatch):
    full, full_last = _uninterrupted(model, data_dir, in_tmp, monkeypatch)
    killed, last = _killed(model, data_dir, in_tmp, monkeypatch)
    resumed = _resume(model, data_dir, last, monkeypatch)

    assert sorted(resumed.train_loss_dict) == list(range(KILLED_AT, EPOCHS))
    for epoch in range(KILLED_AT, EPOCHS):
        assert resumed.epoch_rng[epoch] == full.epoch_rng[epoch], f"epoch {epoch} starts from other RNG states"
    pieces = {**killed.train_loss_dict, **resumed.train_loss_dict}
    ours, theirs = torch.load(last, weights_only=True), torch.load(full_last, weights_only=True)
    assert ours["epoch"] == theirs["epoch"] == EPOCHS - 1
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    if full.device.type == "cpu":
        assert pieces == full.train_loss_dict  # exact floats
        for name, weight in theirs["state_dict"].items():
            assert torch.equal(ours["state_dict"][name], weight), name
        assert ours["best_valid_result"] == theirs["best_valid_result"]
    else:
        assert pieces == pytest.approx(full.train_loss_dict, rel=1e-5)
        for name, weight in theirs["state_dict"].items():
            torch.testing.assert_close(ours["state_dict"][name].cpu(), weight.cpu(), rtol=1e-3, atol=1e-5, msg=name)


def test_last_checkpoint_holds_plain_rng_states_and_best_holds_none(data_dir, in_tmp, monkeypatch):
    _, last = _killed("BERT4Rec", data_dir, in_tmp, monkeypatch)
    state = torch.load(last, weights_only=True)
    (rng,) = state["rng"]  # one entry per rank
    assert rng.keys() == {"python", "numpy", "torch", "cuda", "train", "valid"}
    assert isinstance(rng["torch"], torch.Tensor)
    # One state per GPU where the run used CUDA; none on a CPU run (CUDA never initialised).
    assert len(rng["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_initialized() else 0)
    for loader in ("train", "valid"):
        assert isinstance(rng[loader]["generator"], torch.Tensor)
        assert isinstance(rng[loader]["masking"], torch.Tensor)  # BERT4Rec's transforms had drawn
    assert "rng" not in torch.load(last.parent / "best.pth", weights_only=True)


def _rewrite(last, change):
    state = torch.load(last, weights_only=True)
    change(state)
    torch.save(state, last)


@pytest.mark.parametrize("damage, warning", [
    (lambda state: state.pop("rng"), "holds no RNG states"),
    # as if written by two processes and resumed on one
    (lambda state: state.update(rng=state["rng"] * 2), "2 processes"),
])
def test_a_checkpoint_without_usable_rng_states_resumes_reseeded_with_a_warning(
        damage, warning, data_dir, in_tmp, monkeypatch, caplog):
    model = "SASRec"
    killed, last = _killed(model, data_dir, in_tmp, monkeypatch)
    _rewrite(last, damage)
    with caplog.at_level(logging.WARNING):
        resumed = _resume(model, data_dir, last, monkeypatch)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and warning in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert sorted(resumed.train_loss_dict) == list(range(KILLED_AT, EPOCHS))
    # Reseeded from (seed, epoch, rank): no stream restarts where the run's first epochs began.
    first = resumed.epoch_rng[KILLED_AT]
    for stream in ("python", "numpy", "torch", "loader"):
        assert all(first[stream] != before[stream] for before in killed.epoch_rng.values()), stream
