"""scripts/reproduce.py: the report from a fake store, and skip / resume / continue of runs.

Training is replaced by a fake run function that writes checkpoints the way the trainer
does (plain dicts, weights_only-loadable), so the resume logic is exercised without any
training; one test does a real tiny run on ml-100k.
"""

import csv
import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch

from ssd4rec.config import parse_overrides
from ssd4rec.reproduce import plan, table
from ssd4rec.reproduce.plan import MODEL_SETTINGS, Task, execute, run_overrides, to_argv
from ssd4rec.reproduce.store import ResultStore

REPO = Path(__file__).resolve().parents[1]


def record(dataset, model, seed, ndcg10, **extra):
    test = {"ndcg@10": ndcg10, "mrr@10": ndcg10 / 2, "hit@10": ndcg10 * 2,
            "ndcg@20": ndcg10 + 0.01, "mrr@20": ndcg10 / 2 + 0.01, "hit@20": ndcg10 * 2 + 0.1}
    return {"dataset": dataset, "model": model, "seed": seed, "status": "finished", "test": test,
            "valid": test, "epochs": 12, "best_epoch": 2, "seconds_per_epoch": 3.5,
            "device": "cpu (2 threads)", "implementation": {"ssd_scan": "torch"}, **extra}


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def fake_store(tmp_path):
    store = ResultStore(tmp_path)
    for seed, v in zip((2024, 2025, 2026), (0.30, 0.32, 0.34)):
        store.save_run(record("ml-1m", "SSD4Rec", seed, v))
    for seed, v in zip((2024, 2025, 2026), (0.25, 0.25, 0.28)):
        store.save_run(record("ml-1m", "SASRec", seed, v))
    store.save_run(record("ml-1m", "GRU4Rec", 2024, 0.20))
    # a baseline that beats SSD4Rec on one column only (HR@20)
    r = record("ml-1m", "Caser", 2024, 0.10)
    r["test"]["hit@20"] = 0.99
    store.save_run(r)
    store.mark_dataset_unavailable("kuairand", "dataset 'kuairand': no raw file found in /x\nfetch it")
    store.mark_model_unavailable("ml-1m", "TiM4Rec", "config key 'model': unknown model 'TiM4Rec'")
    return store


def test_report_means_std_bold_gain_and_missing_data(tmp_path):
    store = fake_store(tmp_path)
    md = table.write_report(store, ["ml-1m", "kuairand"],
                            ["SSD4Rec", "SASRec", "GRU4Rec", "Caser", "TiM4Rec"])
    md_path, csv_path = store.table_paths()
    assert md_path.read_text() == md

    section = md.split("## ml-1m\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    # mean ± sample std over the three seeds, best (SSD4Rec) in bold
    std = math.sqrt(((0.30 - 0.32) ** 2 + (0.34 - 0.32) ** 2) / 2)
    assert f"**0.3200 ± {std:.4f}**" in rows["SSD4Rec"]
    sas_std = math.sqrt(sum((v - 0.26) ** 2 for v in (0.25, 0.25, 0.28)) / 2)
    assert f"| 0.2600 ± {sas_std:.4f} |" in rows["SASRec"]
    assert "**" not in rows["SASRec"]
    # one seed: the mean alone; Caser wins HR@20 and is bold there only
    assert "| 0.2000 |" in rows["GRU4Rec"]
    assert rows["Caser"].count("**") == 2 and "**0.9900**" in rows["Caser"]
    assert rows["SSD4Rec"].count("**") == 10  # five of six columns
    # gain over the best baseline per column: NDCG@10 (0.32 - 0.26) / 0.26, HR@20 vs Caser
    gain = rows[table.GAIN_LABEL].split("|")[3:-1]
    assert gain[0].strip() == f"{100 * (0.32 - 0.26) / 0.26:+.2f}%"
    assert gain[5].strip() == f"{100 * (0.74 - 0.99) / 0.99:+.2f}%"
    # the dataset without data and the model the framework does not know
    assert "## kuairand\n\ndata not available here: dataset 'kuairand': no raw file found in /x" in md
    assert "TiM4Rec: model not available here (config key 'model': unknown model 'TiM4Rec')" in md
    # per-run list and settings
    assert md.count("| ml-1m | SSD4Rec |") == 3
    assert "| SASRec | hidden_size=64, inner_size=256, n_layers=2, n_heads=2" in md

    data = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    by = {(r["dataset"], r["model"]): r for r in data}
    assert float(by[("ml-1m", "SSD4Rec")]["ndcg@10_mean"]) == pytest.approx(0.32)
    assert float(by[("ml-1m", "SSD4Rec")]["ndcg@10_std"]) == pytest.approx(std)
    assert by[("ml-1m", "GRU4Rec")]["ndcg@10_std"] == ""
    assert float(by[("ml-1m", table.GAIN_LABEL)]["ndcg@10_mean"]) == pytest.approx(100 * 0.06 / 0.26, abs=1e-5)
    assert by[("kuairand", "")]["status"] == "data not available here"
    assert by[("ml-1m", "TiM4Rec")]["status"] == "model not available here"


def test_report_without_ours_or_baselines_has_no_gain(tmp_path):
    store = ResultStore(tmp_path)
    store.save_run(record("ml-100k", "SASRec", 1, 0.1))
    md = table.write_report(store)
    assert f"| {table.GAIN_LABEL} | | – | – |" in md


# ------------------------------------------------------------------------------------------
# Skip and resume
# ------------------------------------------------------------------------------------------
class FakeTraining:
    """Stands in for ssd4rec.run.run: trains `epochs` epochs, writing best.pth / last.pth
    as the trainer does; `kill_at` = (task key, epoch) raises in that epoch after the
    previous epoch's last.pth was written, like a process killed mid-epoch. `budget`: the
    epochs one call trains before its time budget stops it; `end`: why training ends at
    `epochs` ("early_stopping" or "epochs"). `trained` lists every (task key, epoch) trained."""

    def __init__(self, epochs=4, kill_at=None, budget=None, end="early_stopping"):
        self.epochs = epochs
        self.kill_at = kill_at
        self.budget = budget
        self.end = end
        self.calls = []
        self.trained = []

    def __call__(self, argv):
        args = parse_overrides(argv)
        self.calls.append(args)
        key = (args["dataset"], args["model"], args["seed"])
        start = 0
        if "checkpoint" in args:
            ckpt = Path(args["checkpoint"])
            run_dir = ckpt.parent
            state = torch.load(ckpt, weights_only=True)
            if ckpt.name == "last.pth":
                assert state["finished"] is False
                start = state["epoch"] + 1
            else:
                start = self.epochs  # evaluating a finished run: no training
        else:
            run_dir = Path(args["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        seconds = []
        stopped_by, budget = self.end, None
        for epoch in range(start, self.epochs):
            if self.kill_at == (key, epoch):
                self.kill_at = None
                raise KeyboardInterrupt_("killed in epoch %d" % epoch)
            if self.budget is not None and len(seconds) == self.budget:
                stopped_by, budget = "time_budget", {"after_epoch": epoch, "max_train_seconds": 60}
                break
            self.trained.append((key, epoch))
            seconds.append(1.0 + epoch)
            state = {"model": args["model"], "config": {}, "epoch": epoch,
                     "state_dict": {"w": torch.zeros(1)}}
            if epoch == 1:
                torch.save(state, run_dir / "best.pth")
            torch.save({**state, "optimizer": {}, "cur_step": epoch, "best_valid_score": 0.5,
                        "best_valid_result": {}, "finished": False}, run_dir / "last.pth")
        if start < self.epochs:
            last = torch.load(run_dir / "last.pth", weights_only=True)
            last.update(finished=True, stopped_by=stopped_by, time_budget=budget)
            torch.save(last, run_dir / "last.pth")
        else:
            stopped_by = budget = None  # only evaluated
        test = {"ndcg@10": 0.1 * args["seed"] % 1, "hit@10": 0.2}
        return {"model": args["model"], "dataset": args["dataset"], "best_valid_result": test,
                "test_result": test, "checkpoint": str(run_dir / "best.pth"),
                "epochs_run": len(seconds), "seconds_per_epoch": seconds, "device": "cpu (2 threads)",
                "stopped_by": stopped_by, "time_budget": budget}


class KeyboardInterrupt_(RuntimeError):
    """A crash inside a run (the sweep records it and goes on)."""


def run_sweep(store, training, datasets=("ml-100k",), models=("SASRec", "GRU4Rec"), seeds=(1, 2), **kw):
    kw.setdefault("log", lambda s: None)
    return execute(datasets, models, seeds, store, training, model_check=lambda m: None,
                   dataset_check=lambda d: None, **kw)


def test_killed_run_resumes_from_its_checkpoint_and_nothing_finished_reruns(tmp_path):
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=4, kill_at=(("ml-100k", "GRU4Rec", 1), 2))
    summary = run_sweep(store, training)
    assert [(t.model, t.seed) for t, _ in summary["failed"]] == [("GRU4Rec", 1)]
    assert len(summary["ran"]) == 3
    assert store.load_run("ml-100k", "GRU4Rec", 1) is None
    assert "killed in epoch 2" in (store.error_path("ml-100k", "GRU4Rec", 1)).read_text()
    last = torch.load(store.run_dir("ml-100k", "GRU4Rec", 1) / "last.pth", weights_only=True)
    assert last["finished"] is False and last["epoch"] == 1

    training.calls.clear()
    summary = run_sweep(store, training)
    assert len(summary["done"]) == 3 and len(summary["ran"]) == 1 and not summary["failed"]
    # only the killed run was called again, from its last.pth
    assert len(training.calls) == 1
    call = training.calls[0]
    assert (call["model"], call["seed"]) == ("GRU4Rec", 1)
    assert call["checkpoint"] == str(store.run_dir("ml-100k", "GRU4Rec", 1) / "last.pth")
    assert "run_dir" not in call
    rec = store.load_run("ml-100k", "GRU4Rec", 1)
    assert rec["epochs"] == 4 and rec["resumed_from_epoch"] == 2 and rec["best_epoch"] == 2
    assert rec["seconds_per_epoch_all"] == [3.0, 4.0]  # epochs 2 and 3 ran in this process
    assert not store.error_path("ml-100k", "GRU4Rec", 1).exists()
    # the per-model settings reached the run
    assert call["hidden_size"] == MODEL_SETTINGS["GRU4Rec"]["hidden_size"]
    assert rec["overrides"]["embedding_size"] == 64

    training.calls.clear()
    summary = run_sweep(store, training)
    assert training.calls == [] and len(summary["done"]) == 4


def test_finished_training_without_record_is_evaluated_not_retrained(tmp_path):
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=3)
    run_sweep(store, training, models=("SASRec",), seeds=(7,))
    store.run_path("ml-100k", "SASRec", 7).unlink()  # killed between training and the record
    training.calls.clear()
    run_sweep(store, training, models=("SASRec",), seeds=(7,))
    assert training.calls[0]["checkpoint"].endswith("seed7/best.pth")
    rec = store.load_run("ml-100k", "SASRec", 7)
    assert rec["evaluated_only"] and rec["epochs"] == 3


# ------------------------------------------------------------------------------------------
# --continue-budgeted: one run over several sessions
# ------------------------------------------------------------------------------------------
GRU1 = ("ml-100k", "GRU4Rec", 1)


def budget_session(store, training, budget, note, max_train_seconds=60, **kw):
    """One short session of the GRU4Rec seed 1 run: `budget` epochs (None: to the end)."""
    training.budget = budget
    return run_sweep(store, training, models=("GRU4Rec",), seeds=(1,), note=note,
                     extra={"max_train_seconds": max_train_seconds}, **kw)


def test_a_budget_stopped_run_continues_over_sessions_to_early_stopping(tmp_path):
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=5)
    budget_session(store, training, 2, "session 1")
    first = store.load_run(*GRU1)
    assert first["stopped_by"] == "time_budget" and first["epochs"] == 2

    budget_session(store, training, 1, "session 2", max_train_seconds=90, continue_budgeted=True)
    second = store.load_run(*GRU1)
    assert second["stopped_by"] == "time_budget" and second["epochs"] == 3
    logs = []
    summary = budget_session(store, training, None, "session 3", continue_budgeted=True,
                             log=logs.append)
    assert summary["ran"] == [Task(*GRU1)] and not summary["done"]
    assert "[continue] ml-100k GRU4Rec seed 1 from epoch 3" in logs

    # every epoch trained once, in order, each session from last.pth
    assert training.trained == [(GRU1, e) for e in range(5)]
    last_path = store.run_dir(*GRU1) / "last.pth"
    assert [c.get("checkpoint") for c in training.calls] == [None, str(last_path), str(last_path)]
    assert training.calls[1]["max_train_seconds"] == 90  # the session's own budget
    rec = store.load_run(*GRU1)
    assert rec["stopped_by"] == "early_stopping" and "time_budget" not in rec
    assert rec["epochs"] == 5 and rec["best_epoch"] == 2 and rec["resumed_from_epoch"] == 3
    assert rec["seconds_per_epoch_all"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rec["seconds_per_epoch"] == 3.0 and rec["note"] == "session 3"
    segments = rec["earlier_segments"]
    assert [(s["epochs"], s["stopped_by"], s["note"]) for s in segments] == [
        (2, "time_budget", "session 1"), (3, "time_budget", "session 2")]
    assert segments[0]["time_budget"] == {"after_epoch": 2, "max_train_seconds": 60}
    assert segments[0]["finished_at"] == first["finished_at"]
    assert segments[1]["finished_at"] == second["finished_at"]
    assert segments[0]["device"] == "cpu (2 threads)" and segments[0]["test"] == first["test"]
    last = torch.load(last_path, weights_only=True)
    assert last["finished"] is True and last["stopped_by"] == "early_stopping" and last["epoch"] == 4
    runs = table.write_report(store, ["ml-100k"], ["GRU4Rec"]).split("## Runs", 1)[1]
    assert "resumed at epoch 4, trained over 3 sessions, session 3 |" in runs

    # early-stopped now: the flag leaves it alone
    training.calls.clear()
    summary = budget_session(store, training, None, "session 4", continue_budgeted=True)
    assert training.calls == [] and summary["done"] == [Task(*GRU1)]
    assert store.load_run(*GRU1) == rec


def test_without_the_flag_a_budget_stopped_run_is_skipped(tmp_path):
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=5)
    budget_session(store, training, 2, None)
    before = store.load_run(*GRU1)
    training.calls.clear()
    logs = []
    summary = budget_session(store, training, None, None, log=logs.append)
    assert training.calls == [] and summary["done"] == [Task(*GRU1)] and not summary["ran"]
    assert logs == ["[done]   ml-100k GRU4Rec seed 1 (stopped by the time budget)"]
    assert store.load_run(*GRU1) == before
    last = torch.load(store.run_dir(*GRU1) / "last.pth", weights_only=True)
    assert last["finished"] is True and last["stopped_by"] == "time_budget"


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_budget_stopped_run_without_its_last_checkpoint_is_not_started_over(tmp_path, damage):
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=5)
    budget_session(store, training, 2, None)
    before = store.load_run(*GRU1)
    last_path = store.run_dir(*GRU1) / "last.pth"
    if damage == "missing":
        last_path.unlink()
    else:
        last_path.write_bytes(b"not a checkpoint")
    training.calls.clear()
    logs = []
    summary = budget_session(store, training, None, None, continue_budgeted=True, log=logs.append)
    assert training.calls == [] and summary["done"] == [Task(*GRU1)] and not summary["ran"]
    assert store.load_run(*GRU1) == before
    why = "is missing" if damage == "missing" else "cannot be read"
    assert logs[1] == (f"[note]   ml-100k GRU4Rec seed 1 cannot be continued because {last_path} "
                       f"{why}; deleting its record ({store.run_path(*GRU1)}) starts it again")


def test_a_budget_stopped_run_asked_for_with_other_settings_is_not_continued(tmp_path):
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=5)
    budget_session(store, training, 2, None)
    training.calls.clear()
    logs = []
    training.budget = None
    summary = run_sweep(store, training, models=("GRU4Rec",), seeds=(1,), continue_budgeted=True,
                        extra={"max_train_seconds": 60, "learning_rate": 0.01}, log=logs.append)
    assert training.calls == [] and summary["done"] == [Task(*GRU1)]
    assert "cannot be continued because it ran with other settings" in logs[1]
    assert store.load_run(*GRU1)["epochs"] == 2


def test_a_budget_stopped_run_may_change_how_its_function_is_computed(tmp_path):
    """backend, chunk_size and compile_glue change the kernels, not the model: a continued run
    may switch them, and the earlier segment keeps the overrides it ran with."""
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=4)
    budget_session(store, training, 2, "session 1")
    first = store.load_run(*GRU1)
    training.budget = None
    faster = {"max_train_seconds": 60, "compile_glue": True, "chunk_size": 128, "backend": "torch"}
    summary = run_sweep(store, training, models=("GRU4Rec",), seeds=(1,), note="session 2",
                        continue_budgeted=True, extra=faster)
    assert summary["ran"] == [Task(*GRU1)]
    assert training.calls[-1]["compile_glue"] is True and training.calls[-1]["chunk_size"] == 128
    rec = store.load_run(*GRU1)
    assert rec["epochs"] == 4 and rec["overrides"]["chunk_size"] == 128
    assert rec["earlier_segments"][0]["overrides"] == first["overrides"]
    assert "chunk_size" not in first["overrides"]
    runs = table.write_report(store, ["ml-100k"], ["GRU4Rec"]).split("## Runs", 1)[1]
    row = next(line for line in runs.splitlines() if "| GRU4Rec | 1 |" in line)
    later, earlier = row.split("epochs 3–4: ", 1)[1].split(" (epochs 1–2: ", 1)
    assert {"compile_glue: True", "chunk_size: 128", "backend: torch"} <= set(later.split("; "))
    assert "chunk_size" not in earlier.split(")")[0]


def test_runs_that_stopped_early_or_at_max_epochs_are_never_continued(tmp_path):
    store = ResultStore(tmp_path)
    training = FakeTraining(epochs=3, end="early_stopping")
    run_sweep(store, training, models=("GRU4Rec",), seeds=(1,))
    training.end = "epochs"
    run_sweep(store, training, models=("GRU4Rec",), seeds=(2,))
    records = {seed: store.load_run("ml-100k", "GRU4Rec", seed) for seed in (1, 2)}
    assert (records[1]["stopped_by"], records[2]["stopped_by"]) == ("early_stopping", "epochs")
    lasts = {seed: (store.run_dir("ml-100k", "GRU4Rec", seed) / "last.pth").read_bytes() for seed in (1, 2)}
    training.calls.clear()
    summary = run_sweep(store, training, models=("GRU4Rec",), seeds=(1, 2), continue_budgeted=True)
    assert training.calls == [] and len(summary["done"]) == 2 and not summary["ran"]
    for seed in (1, 2):
        assert store.load_run("ml-100k", "GRU4Rec", seed) == records[seed]
        assert (store.run_dir("ml-100k", "GRU4Rec", seed) / "last.pth").read_bytes() == lasts[seed]


def test_unknown_model_and_missing_data_are_recorded_and_skipped(tmp_path):
    store = ResultStore(tmp_path / "results")
    training = FakeTraining(epochs=1)
    empty = tmp_path / "no-data"
    empty.mkdir()
    summary = execute(["kuairand", "ml-100k"], ["TiM4RecNotRegistered", "SASRec"], [1], store,
                      training, model_check=plan.check_model,
                      dataset_check=lambda d: plan.check_dataset(d, data_path=empty) if d == "kuairand" else None,
                      log=lambda s: None)
    assert [c["model"] for c in training.calls] == ["SASRec"]
    assert store.unavailable_datasets()["kuairand"]["status"] == "data not available here"
    assert "kuairand" in store.unavailable_datasets()["kuairand"]["error"]
    reason = store.unavailable_models()[("ml-100k", "TiM4RecNotRegistered")]["error"]
    assert "unknown model" in reason
    assert len(summary["skipped"]) == 2 and not summary["failed"]
    md = table.write_report(store, ["kuairand", "ml-100k"], ["SSD4Rec", "SASRec"])
    assert "## kuairand\n\ndata not available here:" in md


def test_run_overrides_pin_baseline_keys_and_round_trip():
    task = Task("ml-1m", "SASRec", 2025)
    values = run_overrides(task, quick=True, data_path="/data", extra={"epochs": 1, "gpu_id": "1"})
    assert values["hidden_size"] == 64 and values["n_layers"] == 2 and values["loss_type"] == "CE"
    assert values["MAX_ITEM_LIST_LENGTH"] == 200  # from datasets/ml-1m.yaml
    assert values["epochs"] == 1  # --extra wins over --quick's 2
    assert values["data_path"] == "/data" and values["seed"] == 2025
    assert parse_overrides(to_argv(values)) == values
    ours = run_overrides(Task("amazon-beauty", "SSD4Rec", 1))
    assert "hidden_size" not in ours and "MAX_ITEM_LIST_LENGTH" not in ours
    gru = run_overrides(Task("amazon-beauty", "GRU4Rec", 1))
    assert (gru["num_layers"], gru["dropout_prob"], gru["MAX_ITEM_LIST_LENGTH"]) == (1, 0.3, 50)


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_script", REPO / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_arguments():
    args = _script().parse_args(["--datasets", "ml-100k,ml-1m", "--models", "SSD4Rec", "--seeds",
                                 "1,2,3", "--quick", "--extra", "--epochs=1", "--topk=[10]"])
    assert args.datasets == ["ml-100k", "ml-1m"] and args.models == ["SSD4Rec"]
    assert args.seeds == [1] and args.quick
    assert args.extra == {"epochs": 1, "topk": [10]}
    assert not args.continue_budgeted
    assert _script().parse_args(["--continue-budgeted"]).continue_budgeted


def test_one_real_tiny_run(tmp_path):
    """ml-100k through ssd4rec.run.run, SASRec at hidden 16, lists of 10, one epoch."""
    script = _script()
    extra = ["--hidden_size=16", "--inner_size=32", "--MAX_ITEM_LIST_LENGTH=10",
             "--epochs=1", "--train_batch_size=2048", "--checkpoint_dir=" + str(tmp_path / "saved"),
             "--gpu_id="]  # the CPU, also where a GPU is visible
    argv = ["--datasets", "ml-100k", "--models", "SASRec", "--seeds", "3", "--threads", "1",
            "--results", str(tmp_path / "results"), "--report", "--extra", *extra]
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core CI box, 2 threads made this epoch 20x slower
        assert script.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    store = ResultStore(tmp_path / "results")
    rec = store.load_run("ml-100k", "SASRec", 3)
    assert rec["epochs"] == 1 and rec["best_epoch"] == 1 and rec["device"].startswith("cpu")
    assert set(rec["test"]) >= {"ndcg@10", "mrr@20", "hit@20"}
    assert rec["overrides"]["hidden_size"] == 16 and rec["implementation"]["model"].startswith("RecBole")
    assert len(rec["seconds_per_epoch_all"]) == 1
    assert rec["stopped_by"] == "epochs"  # its one epoch ran out before early stopping could
    assert (store.run_dir("ml-100k", "SASRec", 3) / "best.pth").is_file()
    md_path, _ = store.table_paths()
    # marked as not trained to early stopping (max epochs reached)
    assert f"| SASRec {table.CUT_SHORT_MARK} | 1 |" in md_path.read_text()


def test_a_records_note_reaches_the_runs_table(tmp_path):
    store = ResultStore(tmp_path)
    r = record("ml-1m", "SSD4Rec", 2024, 0.3)
    r["note"] = "GPU shared by 5 runs"
    store.save_run(r)
    store.save_run(record("ml-1m", "SASRec", 2024, 0.2))
    md = table.write_report(store, ["ml-1m"], ["SSD4Rec", "SASRec"])
    runs = md.split("## Runs", 1)[1]
    ours = next(line for line in runs.splitlines() if "| SSD4Rec |" in line)
    theirs = next(line for line in runs.splitlines() if "| SASRec |" in line)
    assert ours.rstrip().endswith("GPU shared by 5 runs |")
    assert "GPU shared" not in theirs


def test_the_runs_table_names_the_kernels_of_each_session_that_used_others(tmp_path):
    store = ResultStore(tmp_path)
    cuda = {"causal_conv1d": "cuda", "ssd_scan": "triton"}
    torch_conv = {"causal_conv1d": "torch", "ssd_scan": "triton"}
    r = record("ml-1m", "SSD4Rec", 2024, 0.3)
    r.update(epochs=14, implementation=torch_conv, earlier_segments=[
        {"epochs": 5, "implementation": cuda}, {"epochs": 12, "implementation": torch_conv}])
    store.save_run(r)
    same = record("ml-1m", "SSD4Rec", 2025, 0.3)
    same.update(epochs=9, implementation=cuda, earlier_segments=[{"epochs": 4, "implementation": cuda}])
    store.save_run(same)
    runs = table.write_report(store, ["ml-1m"], ["SSD4Rec"]).split("## Runs", 1)[1].splitlines()
    mixed = next(line for line in runs if "| 2024 |" in line)
    assert ("| epochs 6–14: causal_conv1d: torch; ssd_scan: triton "
            "(epochs 1–5: causal_conv1d: cuda; ssd_scan: triton) |") in mixed
    plain = next(line for line in runs if "| 2025 |" in line)
    assert "| causal_conv1d: cuda; ssd_scan: triton |" in plain


def test_the_record_names_the_scan_the_backend_chose(monkeypatch):
    """implementation_notes follows the config key backend: the PyTorch scan on a GPU when asked,
    and the all-heads output pass for triton_heads, or why it could not load."""
    ssd_mod = importlib.import_module("ssd4rec.ops.ssd_scan")  # the module (the package exports the function)
    gpu = "NVIDIA H100 80GB HBM3"
    assert plan.implementation_notes("SSD4Rec", "cpu (2 threads)", "triton_heads")["ssd_scan"].startswith("torch")
    assert plan.implementation_notes("SSD4Rec", gpu, "torch")["ssd_scan"].startswith("torch (")
    monkeypatch.setattr(ssd_mod, "_load_triton_heads_scan", lambda: (None, "ImportError: no triton"))
    assert plan.implementation_notes("SSD4Rec", gpu, "triton_heads")["ssd_scan"] == "unavailable (ImportError: no triton)"
    monkeypatch.setattr(ssd_mod, "_load_triton_heads_scan", lambda: (object(), None))
    assert "ssd4rec.ops.ssd_scan_heads" in plan.implementation_notes("TiM4Rec", gpu, "triton_heads")["ssd_scan"]
    monkeypatch.setattr(ssd_mod, "_load_triton_scan", lambda: (object(), None))
    assert plan.implementation_notes("SSD4Rec", gpu)["ssd_scan"] == "triton (mamba_ssm mamba_chunk_scan_combined)"
