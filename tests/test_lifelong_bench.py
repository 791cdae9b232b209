"""scripts/benchmark_lifelong.py at a tiny size on CPU: every measurement recorded, OOM caught."""

import csv

import pytest
import torch

from ssd4rec.models.lifelong import LifelongRec
from tests.script_support import load_script

TINY = ["--device", "cpu", "--lengths", "12,20", "--users", "3", "--items", "50",
        "--warmup", "0", "--max-batches", "1", "--eval-negatives", "9"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_lifelong")


def read_rows(out):
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_every_backbone_and_length_is_measured(bench, tmp_path):
    assert bench.main(TINY + ["--out", str(tmp_path), "--backbones", "ssd,sasrec,linrec,mamba"]) == 0
    rows = read_rows(tmp_path)
    # ssd and sasrec first at every length (the comparison), then the others
    assert [(r["backbone"], r["max_len"]) for r in rows] == [
        ("ssd", "20"), ("sasrec", "20"), ("ssd", "12"), ("sasrec", "12"),
        ("linrec", "20"), ("linrec", "12"), ("mamba", "20"), ("mamba", "12")]
    assert all(r["train_status"] == "ok" and r["eval_status"] == "ok" for r in rows)
    assert all(float(r["train_step_ms"]) > 0 and float(r["eval_batch_ms"]) > 0 for r in rows)
    assert {r["batch_seqs"] for r in rows} == {"3"}  # 512,000 tokens // L, at most --users
    table = (tmp_path / "results.md").read_text()
    assert "| ssd | 20 | 3 |" in table and "time % sasrec" in table
    assert (tmp_path / "env.json").is_file()


def test_out_of_memory_is_recorded_and_the_run_goes_on(bench, tmp_path, monkeypatch):
    original = LifelongRec.calculate_loss

    def calculate_loss(self, interaction):
        if self.backbone_name == "sasrec":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, interaction)

    monkeypatch.setattr(LifelongRec, "calculate_loss", calculate_loss)
    bench.main(TINY + ["--out", str(tmp_path), "--backbones", "sasrec,ssd", "--lengths", "12"])
    rows = {r["backbone"]: r for r in read_rows(tmp_path)}
    assert rows["sasrec"]["train_status"] == "OOM" and rows["sasrec"]["eval_status"] == "ok"
    assert "OutOfMemoryError" in rows["sasrec"]["note"]
    assert rows["ssd"]["train_status"] == "ok"
    assert "| sasrec | 12 | 3 | OOM | OOM |" in (tmp_path / "results.md").read_text()


def test_budget_skips_the_rest_and_plot_draws_the_csv(bench, tmp_path):
    bench.main(TINY + ["--out", str(tmp_path), "--backbones", "ssd", "--budget-s", "0"])
    rows = read_rows(tmp_path)
    assert [r["train_status"] for r in rows] == ["skipped", "skipped"]
    pytest.importorskip("matplotlib")
    bench.main(TINY + ["--out", str(tmp_path), "--backbones", "ssd,sasrec"])
    bench.main(["--out", str(tmp_path), "--plot"])
    assert (tmp_path / "benchmark_lifelong.png").stat().st_size > 1000
