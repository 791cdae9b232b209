"""Each kind of bad input gets one clear SSD4RecError, never a traceback from inside RecBole."""

import pytest
import torch

from ssd4rec.errors import SSD4RecError
from ssd4rec.run import run


def write_inter(folder, name, text):
    path = folder / name / f"{name}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_dataset(tmp_path):
    with pytest.raises(SSD4RecError, match=r"no-such-data.*ml-1m|ml-1m.*no-such-data"):
        run(["--dataset=no-such-data", f"--data_path={tmp_path}"])


def test_missing_column(tmp_path):
    path = write_inter(tmp_path, "ml-1m", "user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(SSD4RecError, match=r"ml-1m\.inter line 1: missing column\(s\) timestamp:float"):
        run(["--dataset=ml-1m", f"--data_path={tmp_path}"])
    assert path.exists()


def test_empty_file(tmp_path):
    write_inter(tmp_path, "ml-1m", "")
    with pytest.raises(SSD4RecError, match=r"ml-1m\.inter: the file is empty"):
        run(["--dataset=ml-1m", f"--data_path={tmp_path}"])


def test_header_without_rows(tmp_path):
    write_inter(tmp_path, "ml-1m", "user_id:token\titem_id:token\ttimestamp:float\n")
    with pytest.raises(SSD4RecError, match="no interactions"):
        run(["--dataset=ml-1m", f"--data_path={tmp_path}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--hidden_size=abc", r"'hidden_size': expected a positive integer, got 'abc'"),
        ("--dropout_prob=1.5", r"'dropout_prob': expected a number in \[0, 1\)"),
        ("--var_len=maybe", r"'var_len': expected True or False"),
        ("--headdim=24", r"must be a multiple of 'headdim' = 24"),
        ("--backend=cuda", r"'backend': expected one of auto, torch, triton"),
        ("--amp=fp8", r"'amp': expected one of none, bf16"),
        ("--tf32=yes please", r"'tf32': expected True or False"),
        ("--model=NoSuchModel", r"unknown model 'NoSuchModel'"),
        ("hidden_size=64", r"expected --key=value"),
    ],
)
def test_bad_config_value(tmp_path, override, message):
    with pytest.raises(SSD4RecError, match=message):
        run(["--dataset=ml-100k", f"--data_path={tmp_path}", override])


def test_bad_config_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: SSD4Rec\n  hidden_size: [1,\n")
    with pytest.raises(SSD4RecError, match=r"bad\.yaml line \d+: not valid YAML"):
        run([f"--config_file={config}"])


def test_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "sasrec.pth"
    torch.save({"model": "SASRec", "config": {"dataset": "ml-100k"}, "state_dict": {}}, path)
    with pytest.raises(SSD4RecError, match=r"saved by model 'SASRec', but --model=SSD4Rec"):
        run([f"--checkpoint={path}", "--model=SSD4Rec", f"--data_path={tmp_path}"])


def test_checkpoint_that_is_not_ours(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SSD4RecError, match="not an ssd4rec checkpoint"):
        run([f"--checkpoint={path}"])
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SSD4RecError, match="could not be read"):
        run([f"--checkpoint={path}"])
