"""End to end on ml-100k (shipped with RecBole): train, evaluate, checkpoint, resume.

One short training run is shared by the tests of this module; its settings are the
quick-start ones made smaller still, so that CI on 2 CPU cores stays fast.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd4rec.run import run

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--dataset=ml-100k",
    "--hidden_size=32",
    "--d_state=16",
    "--MAX_ITEM_LIST_LENGTH=20",
    "--chunk_size=32",
    "--train_batch_size=512",
    "--show_progress=False",
    "--seed=2024",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def one_epoch(workdir):
    args = SMALL + [f"--data_path={workdir / 'data'}", f"--checkpoint_dir={workdir / 'saved'}", "--epochs=1"]
    return run(args)


def test_one_epoch_beats_most_popular(one_epoch, workdir):
    popular = run(
        SMALL
        + [f"--data_path={workdir / 'data'}", f"--checkpoint_dir={workdir / 'saved'}", "--epochs=1", "--model=MostPop"]
    )
    ours, pop = one_epoch["test_result"]["ndcg@10"], popular["test_result"]["ndcg@10"]
    print(json.dumps({"SSD4Rec": one_epoch["test_result"], "MostPop": popular["test_result"]}, indent=1))
    assert set(one_epoch["test_result"]) == {f"{m}@{k}" for m in ("ndcg", "mrr", "hit") for k in (10, 20)}
    assert ours > pop, f"SSD4Rec NDCG@10 {ours} does not beat most-popular {pop} after one epoch"


def test_checkpoints_are_weights_only_and_plain(one_epoch):
    run_dir = Path(one_epoch["checkpoint"]).parent
    for name in ("best.pth", "last.pth"):
        checkpoint = torch.load(run_dir / name, weights_only=True)
        assert checkpoint["model"] == "SSD4Rec"
        assert checkpoint["config"]["hidden_size"] == 32
        assert "encoder.layers.0.forward_ssd.A_log" in checkpoint["state_dict"]
        # The history store is data, not weights.
        assert "history_item" not in checkpoint["state_dict"]
    assert torch.load(run_dir / "last.pth", weights_only=True)["finished"] is True
    assert not list(run_dir.glob("*.tmp"))


def test_evaluating_a_checkpoint_reproduces_its_test_metrics(one_epoch, workdir):
    again = run([f"--checkpoint={one_epoch['checkpoint']}", f"--data_path={workdir / 'data'}", "--show_progress=False"])
    assert again["test_result"] == pytest.approx(one_epoch["test_result"], abs=1e-4)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(one_epoch, workdir):
    run_dir = Path(one_epoch["checkpoint"]).parent
    last = torch.load(run_dir / "last.pth", weights_only=True)
    # Pretend the run died after epoch 0 of 2: the same state, not finished.
    last["finished"] = False
    last["config"]["epochs"] = 2
    resume_dir = workdir / "resume"
    resume_dir.mkdir()
    torch.save(last, resume_dir / "last.pth")
    torch.save(torch.load(run_dir / "best.pth", weights_only=True), resume_dir / "best.pth")

    result = run(
        [f"--checkpoint={resume_dir / 'last.pth'}", f"--data_path={workdir / 'data'}", "--epochs=2", "--show_progress=False"]
    )
    resumed = torch.load(resume_dir / "last.pth", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["finished"] is True
    assert result["checkpoint"] == str(resume_dir / "best.pth")


def test_main_py_reports_errors_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--dataset=no-such-data", f"--data_path={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "no-such-data" in done.stderr and "ml-1m" in done.stderr

