"""max_train_seconds: a wall-clock budget that ends training cleanly, and ``stopped_by``.

A run whose budget is spent stops before its next epoch, tests its best checkpoint, marks
last.pth finished and says ``stopped_by: time_budget`` in its record; a rerun of the sweep
skips it. Runs that end otherwise say ``early_stopping`` or ``epochs`` (max epochs). Real
runs are SASRec at hidden 16 on ml-100k (the cheapest model to train on CPU).
"""

import importlib.util
import os
import time
import types
from pathlib import Path

import pytest
import torch

from ssd4rec import distributed
from ssd4rec.config import collect_values, parse_overrides
from ssd4rec.errors import SSD4RecError
from ssd4rec.reproduce import plan, table
from ssd4rec.reproduce.store import ResultStore
from ssd4rec.run import run
from ssd4rec.trainer import FitClock, Trainer

ROOT = Path(__file__).resolve().parents[1]
SASREC_TINY = ["--hidden_size=16", "--inner_size=32", "--n_layers=1", "--n_heads=1",
               "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=2048", "--show_progress=False"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("budget_data")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: tiny ops are many times faster on one
    yield
    torch.set_num_threads(threads)


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# The key
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-5", "0", "soon", "True"])
def test_a_budget_that_is_not_a_positive_number_is_refused_naming_the_key(value):
    with pytest.raises(SSD4RecError, match=r"'max_train_seconds': expected a positive number"):
        collect_values(ROOT / "config.yaml", ROOT / "datasets",
                       parse_overrides(["--dataset=ml-100k", f"--max_train_seconds={value}"]))


def test_the_budget_defaults_to_none_and_takes_a_number():
    default, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", {"dataset": "ml-100k"})
    assert "max_train_seconds" in default and default["max_train_seconds"] is None
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets",
                               parse_overrides(["--dataset=ml-100k", "--max_train_seconds=480"]))
    assert values["max_train_seconds"] == 480


# ------------------------------------------------------------------------------------------
# The decision
# ------------------------------------------------------------------------------------------
def _clock(seconds_ago, epochs, validations, validates=True, budget=10.0):
    return types.SimpleNamespace(max_train_seconds=budget, stopped_by_time_budget=None,
                                 _fit_clock=FitClock(start=time.perf_counter() - seconds_ago, validates=validates,
                                                     epochs=epochs, validations=validations))


def test_the_decision_takes_the_slowest_rank_and_needs_a_validated_epoch(monkeypatch):
    # 1 s spent in 1 epoch: another would end at ~2 s, inside 10 s.
    fake = _clock(1.0, 1, 1)
    assert not Trainer._time_budget_spent(fake, 1) and fake.stopped_by_time_budget is None
    # Another rank has spent 6 s: 6 + 6 > 10, and every rank decides on that (the max).
    monkeypatch.setattr(distributed, "gather", lambda value: [value, (6.0, None)])
    assert Trainer._time_budget_spent(fake, 1)
    budget = fake.stopped_by_time_budget
    assert budget["after_epoch"] == 1 and budget["elapsed_s"] == 6.0 and budget["max_train_seconds"] == 10.0
    assert budget["mean_epoch_s"] == 6.0 and budget["epochs_this_process"] == 1
    # No epoch trained yet, or trained but not yet validated: never stop.
    assert not Trainer._time_budget_spent(_clock(100.0, 0, 0), 0)
    assert not Trainer._time_budget_spent(_clock(100.0, 1, 0), 1)
    # Without validation (no valid data), one trained epoch is enough.
    assert Trainer._time_budget_spent(_clock(100.0, 1, 0, validates=False), 1)
    # No budget: nothing is measured.
    assert not Trainer._time_budget_spent(_clock(100.0, 5, 5, budget=None), 5)


def test_the_next_epoch_is_taken_to_last_as_long_as_the_latest_not_the_mean(monkeypatch):
    # 100 s spent in 2 epochs, the first with a long warm-up: the latest took 10 s. The mean
    # (50 s) would stop at a budget of 115; the latest says another epoch ends at ~110.
    fake = _clock(100.0, 2, 2, budget=115.0)
    fake._fit_clock.latest_epoch_start = time.perf_counter() - 10.0
    assert not Trainer._time_budget_spent(fake, 2)
    # A budget of 105 it would pass: stopped, and the record says which estimate decided.
    fake.max_train_seconds = 105.0
    assert Trainer._time_budget_spent(fake, 2)
    budget = fake.stopped_by_time_budget
    assert budget["next_epoch_s"] == pytest.approx(10.0, abs=0.5) and budget["mean_epoch_s"] == pytest.approx(50.0, abs=0.5)
    # With several ranks the slowest latest epoch decides: another rank's took 20 s.
    fake.max_train_seconds = 115.0
    monkeypatch.setattr(distributed, "gather", lambda value: [value, (100.0, 20.0)])
    assert Trainer._time_budget_spent(fake, 2)
    assert fake.stopped_by_time_budget["next_epoch_s"] == 20.0


# ------------------------------------------------------------------------------------------
# A budget-stopped run through scripts/reproduce.py, and the rerun
# ------------------------------------------------------------------------------------------
def test_a_spent_budget_ends_the_run_after_one_epoch_and_the_rerun_skips_it(tmp_path, data_dir, one_thread):
    script = _script()
    results = tmp_path / "results"
    extra = SASREC_TINY + ["--epochs=5", "--max_train_seconds=0.001",
                           f"--checkpoint_dir={tmp_path / 'saved'}"]
    argv = ["--datasets", "ml-100k", "--models", "SASRec", "--seeds", "3", "--data_path", str(data_dir),
            "--results", str(results), "--report", "--extra", *extra]
    assert script.main(argv) == 0

    store = ResultStore(results)
    rec = store.load_run("ml-100k", "SASRec", 3)
    assert rec["status"] == "finished" and rec["stopped_by"] == "time_budget"
    assert rec["epochs"] == 1 and rec["best_epoch"] == 1 and len(rec["seconds_per_epoch_all"]) == 1
    assert rec["time_budget"]["after_epoch"] == 1 and rec["time_budget"]["max_train_seconds"] == 0.001
    assert rec["time_budget"]["elapsed_s"] > 0.001
    assert set(rec["test"]) >= {"ndcg@10", "hit@10", "mrr@20"}
    last = torch.load(store.run_dir("ml-100k", "SASRec", 3) / "last.pth", weights_only=True)
    assert last["finished"] is True and last["epoch"] == 0 and last["stopped_by"] == "time_budget"

    # The report says so, in the Runs table and next to the model in the dataset's table.
    md = store.table_paths()[0].read_text()
    run_row = next(line for line in md.split("## Runs", 1)[1].splitlines() if "| SASRec | 3 |" in line)
    assert "**time budget** (" in run_row and "after epoch 1" in run_row
    assert f"| SASRec {table.CUT_SHORT_MARK} | 1 |" in md
    assert "SASRec seed 3: time budget" in md

    # The rerun of the same sweep skips it: it is finished, not resumed.
    calls = []
    logs = []
    summary = plan.execute(["ml-100k"], ["SASRec"], [3], store, lambda argv: calls.append(argv),
                           data_path=str(data_dir), extra=parse_overrides(extra),
                           model_check=lambda m: None, dataset_check=lambda d: None, log=logs.append)
    assert calls == [] and summary["done"] == [plan.Task("ml-100k", "SASRec", 3)] and not summary["ran"]
    assert any("stopped by the time budget" in line for line in logs)
    assert not any("other settings" in line for line in logs)

    # Killed after training, before its record: the rerun tests best.pth and does not train;
    # the record still says why training ended (from last.pth).
    store.run_path("ml-100k", "SASRec", 3).unlink()
    assert plan.task_state(plan.Task("ml-100k", "SASRec", 3), store)[0] == "evaluate"
    assert script.main(argv) == 0
    again = store.load_run("ml-100k", "SASRec", 3)
    assert again["evaluated_only"] and again["seconds_per_epoch_all"] == []
    assert again["stopped_by"] == "time_budget" and again["time_budget"] == rec["time_budget"]
    assert again["test"] == pytest.approx(rec["test"], abs=1e-4)


# ------------------------------------------------------------------------------------------
# early_stopping against epochs
# ------------------------------------------------------------------------------------------
def _scripted_validation(monkeypatch, scores):
    """Validation scores in this order (the real validation is skipped)."""
    scores = iter(scores)

    def valid_epoch(self, valid_data, show_progress=False):
        score = next(scores)
        return score, {"ndcg@10": score}

    monkeypatch.setattr(Trainer, "_valid_epoch", valid_epoch)


def _tiny_sasrec(tmp_path, data_dir, *more):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # RecBole writes its log under the working directory
    try:
        return run(["--model=SASRec", "--dataset=ml-100k", f"--data_path={data_dir}",
                    f"--checkpoint_dir={tmp_path / 'saved'}", *SASREC_TINY, *more])
    finally:
        os.chdir(cwd)


def test_patience_running_out_is_early_stopping_even_at_the_last_epoch(tmp_path, data_dir, monkeypatch, one_thread):
    # stopping_step 1: epoch 0 best, epoch 1 one worse, epoch 2 two worse -> RecBole stops there,
    # which is also the last of 3 epochs.
    _scripted_validation(monkeypatch, [0.3, 0.2, 0.1])
    result = _tiny_sasrec(tmp_path, data_dir, "--epochs=3", "--stopping_step=1")
    assert result["stopped_by"] == "early_stopping" and result["time_budget"] is None
    assert result["epochs_run"] == 3 and result["best_valid_result"] == {"ndcg@10": 0.3}
    last = torch.load(Path(result["checkpoint"]).with_name("last.pth"), weights_only=True)
    assert last["finished"] is True and last["stopped_by"] == "early_stopping"


def test_reaching_max_epochs_while_improving_is_epochs_and_a_loose_budget_changes_nothing(
        tmp_path, data_dir, monkeypatch, one_thread):
    _scripted_validation(monkeypatch, [0.1, 0.2])
    result = _tiny_sasrec(tmp_path, data_dir, "--epochs=2", "--stopping_step=1", "--max_train_seconds=3600")
    assert result["stopped_by"] == "epochs" and result["time_budget"] is None
    assert result["epochs_run"] == 2
    last = torch.load(Path(result["checkpoint"]).with_name("last.pth"), weights_only=True)
    assert last["finished"] is True and last["stopped_by"] == "epochs" and last["epoch"] == 1


# ------------------------------------------------------------------------------------------
# --continue-budgeted: a budget-stopped run goes on where it stopped
# ------------------------------------------------------------------------------------------
def test_a_continued_run_keeps_its_patience_and_best_score_and_stops_early(
        tmp_path, data_dir, monkeypatch, one_thread):
    """Session 1 validates 0.3 then 0.2 (patience 1 of 1 used) and its budget stops it before
    epoch 2; continued, epoch 2's 0.1 ends training by early stopping. Had the patience
    counter or the best score been lost, epoch 2 would not stop it (epoch 3 or later would)."""
    script = _script()
    results = tmp_path / "results"
    common = SASREC_TINY + ["--epochs=6", "--stopping_step=1", f"--checkpoint_dir={tmp_path / 'saved'}"]

    def argv(budget, *flags):
        return ["--datasets", "ml-100k", "--models", "SASRec", "--seeds", "3", "--data_path",
                str(data_dir), "--results", str(results), *flags, "--extra", *common,
                f"--max_train_seconds={budget}"]

    _scripted_validation(monkeypatch, [0.3, 0.2, 0.1, 0.05, 0.04, 0.03])
    with monkeypatch.context() as session:
        def stop_before_epoch_2(self, epoch_idx):  # the budget, without the wall clock
            if epoch_idx < 2:
                return False
            self.stopped_by_time_budget = {"after_epoch": epoch_idx, "elapsed_s": 9.0,
                                           "max_train_seconds": 10, "mean_epoch_s": 4.5, "next_epoch_s": 4.5,
                                           "epochs_this_process": 2}
            return True

        session.setattr(Trainer, "_time_budget_spent", stop_before_epoch_2)
        assert script.main(argv(10)) == 0
    store = ResultStore(results)
    first = store.load_run("ml-100k", "SASRec", 3)
    assert first["stopped_by"] == "time_budget" and first["epochs"] == 2 and first["best_epoch"] == 1

    assert script.main(argv(3600, "--continue-budgeted")) == 0
    rec = store.load_run("ml-100k", "SASRec", 3)
    assert rec["stopped_by"] == "early_stopping" and rec["resumed_from_epoch"] == 2
    assert rec["epochs"] == 3 and rec["best_epoch"] == 1 and rec["valid"] == {"ndcg@10": 0.3}
    assert len(rec["seconds_per_epoch_all"]) == 3
    assert rec["seconds_per_epoch_all"][:2] == first["seconds_per_epoch_all"]
    assert rec["overrides"]["max_train_seconds"] == 3600
    (segment,) = rec["earlier_segments"]
    assert segment["epochs"] == 2 and segment["stopped_by"] == "time_budget"
    assert segment["time_budget"]["after_epoch"] == 2 and segment["finished_at"] == first["finished_at"]
    # the same best.pth (epoch 1) is tested again
    assert rec["test"] == pytest.approx(first["test"], abs=1e-4)
    last = torch.load(store.run_dir("ml-100k", "SASRec", 3) / "last.pth", weights_only=True)
    assert last["finished"] is True and last["stopped_by"] == "early_stopping" and last["epoch"] == 2


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def _record(seed, **extra):
    test = {"ndcg@10": 0.1, "mrr@10": 0.05, "hit@10": 0.2}
    return {"dataset": "ml-1m", "model": "SASRec", "seed": seed, "status": "finished", "test": test,
            "valid": test, "epochs": 12, "best_epoch": 2, "seconds_per_epoch": 3.5,
            "device": "cpu", "implementation": {}, **extra}


def test_the_runs_table_says_why_each_run_stopped_and_old_records_still_render(tmp_path):
    store = ResultStore(tmp_path)
    store.save_run(_record(1))  # a record from before the field
    store.save_run(_record(2, stopped_by="early_stopping"))
    store.save_run(_record(3, stopped_by="epochs"))
    store.save_run(_record(4, stopped_by="time_budget",
                           time_budget={"after_epoch": 7, "elapsed_s": 452.4, "max_train_seconds": 480}))
    md = table.write_report(store, ["ml-1m"], ["SASRec"])
    assert "| Stopped by |" in md
    rows = {line.split("|")[3].strip(): line.split("|")[6].strip()
            for line in md.split("## Runs", 1)[1].splitlines() if line.startswith("| ml-1m |")}
    assert rows == {"1": "–", "2": "early stopping", "3": "max epochs",
                    "4": "**time budget** (452 s of 480 s, after epoch 7)"}
    assert f"| SASRec {table.CUT_SHORT_MARK} | 4 |" in md
    assert "SASRec seed 3: max epochs, seed 4: time budget." in md
    csv_text = store.table_paths()[1].read_text()
    assert "not trained to early stopping: seed 3: max epochs; seed 4: time budget" in csv_text


# ------------------------------------------------------------------------------------------
# Two processes
# ------------------------------------------------------------------------------------------
def test_two_processes_stop_together_before_the_same_epoch(tmp_path, data_dir, one_thread):
    """Both ranks must stop before the same epoch: one that trained on alone would wait for
    the other in the gradient all-reduce forever. (The spawned workers take one core each.)"""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run(["--dataset=ml-100k", "--hidden_size=16", "--d_state=16", "--chunk_size=32",
                      "--MAX_ITEM_LIST_LENGTH=20", "--train_batch_size=1024", "--epochs=3",
                      "--show_progress=False", f"--data_path={data_dir}",
                      f"--checkpoint_dir={tmp_path / 'saved'}", "--nproc=2", "--gpu_id=",
                      "--max_train_seconds=0.001"])
    finally:
        os.chdir(cwd)
    assert result["world_size"] == 2 and result["epochs_run"] == 1
    assert result["stopped_by"] == "time_budget" and result["time_budget"]["after_epoch"] == 1
    assert set(result["test_result"]) >= {"ndcg@10", "hit@20"}
    last = torch.load(Path(result["checkpoint"]).with_name("last.pth"), weights_only=True)
    assert last["finished"] is True and last["stopped_by"] == "time_budget"
